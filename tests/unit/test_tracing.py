"""Traces of tasks (mesh/core/tracing.py) through the Dispatcher with fake nodes: no sockets."""

from __future__ import annotations

import asyncio

import pytest

from mesh.cli.trace import tree_lines
from mesh.coordinator.tasks import AttemptOutcome, build_task
from mesh.core.errors import NotFoundError, UnavailableError
from mesh.core.tracing import SpanRecord, Tracing, spans_from_proto, spans_to_proto, traceparent
from tests.coordinator_fakes import Fail, FakeMesh, view
from tests.unit.test_dispatcher import make

CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"


def sampled(header: str) -> bool:
    """The W3C sampled flag (bit 0 of the last field; bit 1 says the trace id is random)."""
    return bool(int(header.rsplit("-", 1)[1], 16) & 1)


def run(coro, timeout=10):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_a_failed_over_task_is_one_trace_with_an_attempt_span_per_node():
    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", Fail(UnavailableError("node killed"), after_pieces=2))
        dispatcher = make(mesh, view("a"), view("b"))
        task = build_task("hi", model="m", max_tokens=6)
        result = await dispatcher.submit(task)
        trace_id, spans = await dispatcher.trace(task.task_id)
        await dispatcher.close()
        return mesh, result, trace_id, spans

    mesh, result, trace_id, spans = run(scenario())
    assert [a.outcome for a in result.attempts] == [AttemptOutcome.UNAVAILABLE, AttemptOutcome.OK]
    (root,) = [s for s in spans if s.name == "task"]
    attempts = [s for s in spans if s.name == "attempt"]
    assert root.parent_id == "" and root.attributes["outcome"] == "ok"
    assert root.attributes["attempts"] == "2" and not root.error
    assert [(s.attributes["node"], s.attributes["outcome"], s.error) for s in attempts] == [
        ("name-a", "unavailable", True),
        ("name-b", "ok", False),
    ]
    assert all(s.parent_id == root.span_id and s.trace_id == trace_id for s in attempts)
    # Each node was called with its own attempt's span as the parent of what it records.
    for node, attempt in zip(("a", "b"), attempts, strict=True):
        (sent,) = mesh.links[node].traceparents
        assert sent.startswith(f"00-{trace_id}-{attempt.span_id}-") and sampled(sent)


def test_the_callers_traceparent_is_continued_even_when_the_coordinator_samples_nothing():
    async def scenario():
        mesh = FakeMesh()
        dispatcher = make(mesh, view("a"), trace_sample_ratio=0.0)
        traced = build_task("hi", model="m", traceparent=f"00-{CALLER_TRACE}-{CALLER_SPAN}-01")
        untraced = build_task("hi", model="m")
        await dispatcher.submit(traced)
        await dispatcher.submit(untraced)
        found = await dispatcher.trace(traced.task_id)
        with pytest.raises(NotFoundError, match="no trace of task"):
            await dispatcher.trace(untraced.task_id)
        await dispatcher.close()
        return mesh, found

    mesh, (trace_id, spans) = run(scenario())
    assert trace_id == CALLER_TRACE
    (root,) = [s for s in spans if s.name == "task"]
    assert root.parent_id == CALLER_SPAN
    sent_traced, sent_untraced = mesh.links["a"].traceparents
    assert sent_traced.startswith(f"00-{CALLER_TRACE}-") and sampled(sent_traced)
    assert not sampled(sent_untraced)  # not sampled: the node records nothing either


def test_a_garbled_traceparent_starts_a_trace_of_our_own():
    async def scenario():
        dispatcher = make(FakeMesh(), view("a"))
        task = build_task("hi", model="m", traceparent="00-not-a-trace-01")
        await dispatcher.submit(task)
        found = await dispatcher.trace(task.task_id)
        await dispatcher.close()
        return found

    trace_id, spans = run(scenario())
    assert len(trace_id) == 32 and [s.parent_id for s in spans if s.name == "task"] == [""]


def test_recent_traces_are_bounded_oldest_first():
    tracing = Tracing("coordinator", keep_traces=2)
    ids = []
    for _ in range(3):
        span = tracing.start("task")
        ids.append(traceparent(span).split("-")[1])
        span.end()
    assert tracing.spans(ids[0]) == []
    assert [len(tracing.spans(i)) for i in ids[1:]] == [1, 1]
    with pytest.raises(ValueError, match="within 0..1"):
        Tracing("x", sample_ratio=1.5)
    tracing.shutdown()


def test_spans_survive_the_wire_unchanged():
    span = SpanRecord(
        "tool.call", "a" * 32, "b" * 16, "c" * 16, 10, 2_000_010, "node n", {"k": "v"}
    )
    assert spans_from_proto(spans_to_proto([span])) == [span]
    assert span.to_json()["duration_ms"] == 2.0


def test_trace_tree_indents_children_and_escapes_what_nodes_send():
    spans = [
        {"name": "task", "span_id": "1", "parent_id": "", "duration_ms": 9.0,
         "process": "coordinator", "start_unix_ns": 1, "attributes": {"outcome": "ok"}},
        {"name": "node.agent", "span_id": "2", "parent_id": "1", "duration_ms": 5.0,
         "process": "node \x1b[31mevil", "start_unix_ns": 2, "attributes": {}},
        {"name": "orphan", "span_id": "3", "parent_id": "gone", "duration_ms": 1.0,
         "process": "node x", "start_unix_ns": 3, "attributes": {}},
    ]  # fmt: skip
    lines = list(tree_lines(spans))
    assert lines[0] == "task  9.0 ms  [coordinator]  outcome=ok"
    assert lines[1].startswith("  node.agent  5.0 ms  [node \\x1b[31mevil]")
    assert lines[2].startswith("orphan ")  # its parent is not in the trace: at the left
