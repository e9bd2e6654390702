"""An agent step as spans: `agent.step` under the task's `node.agent` span, and its tool call.

Both are built from the step's own measurements when the runtime reports it: the step ran for
`duration_ms` up to now, and a tool_call step's tool ran for `tool_ms` at its end.
"""

from __future__ import annotations

import time

from opentelemetry.trace import Span

from edgemesh.v1 import node_pb2
from mesh.core.tracing import Tracing, fail_with


def step_spans(tracing: Tracing, parent: Span, step: node_pb2.AgentStep) -> None:
    """Record `step` (just completed) as an `agent.step` span, with a `tool.call` child for a
    tool_call step. Attributes: bounded facts only (never arguments or results)."""
    if not parent.is_recording():
        return
    end_ns = time.time_ns()
    span = tracing.start(
        "agent.step",
        parent=parent,
        start_ns=end_ns - int(step.duration_ms * 1e6),
        attributes={
            "index": step.index,
            "kind": step.kind,
            "model": step.model,
            "tokens": step.tokens,
        },
    )
    if step.kind == "tool_call":
        tool = tracing.start(
            "tool.call",
            parent=span,
            start_ns=end_ns - int(step.tool_ms * 1e6),
            attributes={"tool": step.call.tool, "idempotent": step.idempotent},
        )
        fail_with(tool, "error" if step.error else "ok")
        tool.end(end_time=end_ns)
    fail_with(span, "error" if step.kind == "invalid" else "ok")
    span.end(end_time=end_ns)
