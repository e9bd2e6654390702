"""Traces of tasks: OpenTelemetry spans, W3C `traceparent` across processes, recent traces kept.

A task's trace is a tree: `task` (the coordinator) -> `attempt` (one per node tried) ->
`node.generate` or `node.agent` (the node that ran it) -> `agent.step` -> `tool.call`. Each
process records its own spans with its own `Tracing` (an OpenTelemetry SDK TracerProvider of its
own, never the global one: several nodes share a test process), and passes the current span on
as a W3C `traceparent` in gRPC metadata or an HTTP header, so the spans link across processes.

Every `Tracing` keeps the spans of its last `keep_traces` traces in memory (`spans(trace_id)`):
without a collector the coordinator asks each node that ran a task for its part
(`NodeService.GetTrace`) and joins it to its own (`mesh trace TASK_ID`). With `otlp_endpoint`
spans are also exported over OTLP/gRPC in batches.

Sampling: `sample_ratio` of the traces that begin here (1: every one, 0: none); a span with a
parent follows the parent's decision, so an incoming `traceparent` flagged sampled is recorded
even at ratio 0. Attributes are bounded facts (model, agent, tool, outcome, counts); never a
prompt, an answer, a tool's arguments or a secret.

Needs `opentelemetry-sdk` (the node and coordinator extras); the client library never imports
this module.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from edgemesh.v1 import node_pb2

logger = logging.getLogger(__name__)

TRACEPARENT = "traceparent"  # the W3C header, and the gRPC metadata key (lowercase)
_PROPAGATOR = TraceContextTextMapPropagator()
_MAX_SPANS_PER_TRACE = 512  # a runaway agent cannot grow one trace without bound

# The `traceparent` that calls to a node made now carry in their metadata: the attempt loop
# sets it to its attempt's span before the attempt calls the node (the coordinator's links
# read it), so that the NodeLink protocol needs no argument for it.
OUTGOING_TRACEPARENT: ContextVar[str] = ContextVar("mesh_outgoing_traceparent", default="")

AttributeValue = str | bool | int | float


@dataclass(frozen=True, slots=True)
class SpanRecord:
    """One finished span, as kept in memory, sent by GetTrace and shown by `mesh trace`."""

    name: str
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_id: str  # "" for a root span
    start_ns: int  # unix time
    end_ns: int
    process: str
    attributes: Mapping[str, str] = field(default_factory=dict)
    error: bool = False

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "parent_id": self.parent_id,
            "start_unix_ns": self.start_ns,
            "duration_ms": round(self.duration_ms, 3),
            "process": self.process,
            "attributes": dict(self.attributes),
            "error": self.error,
        }


def _record(span: ReadableSpan, process: str) -> SpanRecord | None:
    ctx = span.context
    if ctx is None or span.start_time is None or span.end_time is None:
        return None
    parent = span.parent
    return SpanRecord(
        name=span.name,
        trace_id=format(ctx.trace_id, "032x"),
        span_id=format(ctx.span_id, "016x"),
        parent_id=format(parent.span_id, "016x") if parent is not None else "",
        start_ns=span.start_time,
        end_ns=span.end_time,
        process=process,
        attributes={k: str(v) for k, v in (span.attributes or {}).items()},
        error=span.status.status_code is StatusCode.ERROR,
    )


class RecentSpans(SpanProcessor):
    """The finished spans of the last `keep_traces` traces, by trace id (oldest dropped)."""

    def __init__(self, process: str, keep_traces: int = 256) -> None:
        self.process = process
        self._keep = keep_traces
        self._traces: OrderedDict[str, list[SpanRecord]] = OrderedDict()
        self._lock = threading.Lock()  # the SDK may end spans on any thread

    def on_end(self, span: ReadableSpan) -> None:
        record = _record(span, self.process)
        if record is None:
            return
        with self._lock:
            spans = self._traces.get(record.trace_id)
            if spans is None:
                spans = self._traces[record.trace_id] = []
                while len(self._traces) > self._keep:
                    self._traces.popitem(last=False)
            if len(spans) < _MAX_SPANS_PER_TRACE:
                spans.append(record)

    def spans(self, trace_id: str) -> list[SpanRecord]:
        with self._lock:
            return list(self._traces.get(trace_id.lower(), ()))

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def valid_trace_id(trace_id: str) -> bool:
    """32 lowercase-or-uppercase hex digits, not all zero (W3C trace-context)."""
    if len(trace_id) != 32:
        return False
    try:
        return int(trace_id, 16) != 0
    except ValueError:
        return False


class Tracing:
    """One process's tracer: spans kept in memory, exported over OTLP when configured."""

    def __init__(
        self,
        process: str,
        *,
        sample_ratio: float = 1.0,
        otlp_endpoint: str = "",
        keep_traces: int = 256,
    ) -> None:
        if not 0.0 <= sample_ratio <= 1.0:
            raise ValueError(f"trace sample ratio must be within 0..1, not {sample_ratio}")
        self.process = process
        self.sample_ratio = sample_ratio
        self.recent = RecentSpans(process, keep_traces)
        self.provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
            resource=Resource.create({"service.name": "edge-agent-mesh", "mesh.process": process}),
        )
        self.provider.add_span_processor(self.recent)
        if otlp_endpoint:
            self.provider.add_span_processor(_otlp_processor(otlp_endpoint))
        self.tracer = self.provider.get_tracer("edge-agent-mesh")

    def start(
        self,
        name: str,
        *,
        parent: Span | str | None = None,
        attributes: Mapping[str, AttributeValue] | None = None,
        start_ns: int | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
    ) -> Span:
        """A span, child of `parent` (a span of ours, or a `traceparent` text from another
        process; an invalid text is ignored: the span starts a new trace). End it."""
        return self.tracer.start_span(
            name,
            context=_parent_context(parent),
            kind=kind,
            attributes=dict(attributes or {}),
            start_time=start_ns,
        )

    @contextmanager
    def span(
        self,
        name: str,
        *,
        parent: Span | str | None = None,
        attributes: Mapping[str, AttributeValue] | None = None,
    ) -> Iterator[Span]:
        """`start` as a context manager: ended on exit, marked an error by an exception."""
        span = self.start(name, parent=parent, attributes=attributes)
        try:
            yield span
        except BaseException as error:
            fail(span, error)
            raise
        finally:
            span.end()

    def spans(self, trace_id: str) -> list[SpanRecord]:
        return self.recent.spans(trace_id)

    def shutdown(self) -> None:
        self.provider.shutdown()


def _parent_context(parent: Span | str | None) -> otel_context.Context | None:
    if parent is None or parent == "":
        return otel_context.Context()  # a new trace, whatever the caller's context holds
    if isinstance(parent, str):
        return _PROPAGATOR.extract({TRACEPARENT: parent})
    return trace.set_span_in_context(parent, otel_context.Context())


def traceparent(span: Span | None) -> str:
    """The W3C `traceparent` of `span`, or "" when it records nothing (not sampled)."""
    if span is None or not span.get_span_context().is_valid:
        return ""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span, otel_context.Context()))
    return carrier.get(TRACEPARENT, "")


def from_metadata(metadata: Sequence[tuple[str, Any]] | None) -> str:
    """The `traceparent` among gRPC invocation metadata, or ""."""
    for key, value in metadata or ():
        if key == TRACEPARENT and isinstance(value, str):
            return value
    return ""


def incoming_traceparent(context: Any) -> str:
    """The caller's `traceparent` from a gRPC servicer context (grpc.aio's or Ray Serve's),
    or "" (none, or no context: a servicer called directly)."""
    return from_metadata(context.invocation_metadata()) if context is not None else ""


def trace_id_of(span: Span) -> str:
    ctx = span.get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def fail(span: Span, error: BaseException) -> None:
    """Mark `span` failed with the error's type (never its text: it may quote the caller)."""
    span.set_status(Status(StatusCode.ERROR, type(error).__name__))


def fail_with(span: Span, outcome: str) -> None:
    """Set the span's `outcome` attribute ("ok", or a status such as "unavailable"), and mark
    it failed unless it is "ok"."""
    span.set_attribute("outcome", outcome)
    if outcome != "ok":
        span.set_status(Status(StatusCode.ERROR, outcome))


def spans_to_proto(spans: Sequence[SpanRecord]) -> list[node_pb2.Span]:
    return [
        node_pb2.Span(
            name=s.name,
            trace_id=s.trace_id,
            span_id=s.span_id,
            parent_span_id=s.parent_id,
            start_unix_nanos=s.start_ns,
            end_unix_nanos=s.end_ns,
            process=s.process,
            attributes=dict(s.attributes),
            error=s.error,
        )
        for s in spans
    ]


def spans_from_proto(spans: Sequence[node_pb2.Span]) -> list[SpanRecord]:
    return [
        SpanRecord(
            name=s.name,
            trace_id=s.trace_id,
            span_id=s.span_id,
            parent_id=s.parent_span_id,
            start_ns=s.start_unix_nanos,
            end_ns=s.end_unix_nanos,
            process=s.process,
            attributes=dict(s.attributes),
            error=s.error,
        )
        for s in spans
    ]


def _otlp_processor(endpoint: str) -> SpanProcessor:
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as error:  # the exporter is an extra: say which package
        raise ValueError(
            "OTLP export needs the package opentelemetry-exporter-otlp-proto-grpc "
            f"(pip install opentelemetry-exporter-otlp-proto-grpc): {error}"
        ) from None
    insecure = endpoint.startswith("http://") or not endpoint.startswith("https://")
    return BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=insecure))
