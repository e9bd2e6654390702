"""Spans leave over OTLP/gRPC when an endpoint is configured: a real gRPC collector on
127.0.0.1 port 0 (OpenTelemetry's own TraceService definition) receives them."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from mesh.core.tracing import Tracing, traceparent

pytestmark = pytest.mark.integration


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[tuple[str, str, dict[str, str]]] = []
        self.received = threading.Event()

    def Export(self, request, context):  # noqa: N802 - gRPC's name
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    self.spans.append((span.name, span.trace_id.hex(), resource))
        self.received.set()
        return trace_service_pb2.ExportTraceServiceResponse()


def test_spans_are_exported_to_an_otlp_collector():
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    tracing = Tracing("coordinator", otlp_endpoint=f"http://127.0.0.1:{port}")
    try:
        task = tracing.start("task", attributes={"kind": "model"})
        attempt = tracing.start("attempt", parent=task)
        attempt.end()
        task.end()
        trace_id = traceparent(task).split("-")[1]
        assert tracing.provider.force_flush(10_000)
        assert collector.received.wait(10)
    finally:
        tracing.shutdown()
        server.stop(grace=None)
    assert sorted(name for name, _trace, _resource in collector.spans) == ["attempt", "task"]
    assert {trace for _name, trace, _resource in collector.spans} == {trace_id}
    assert collector.spans[0][2]["mesh.process"] == "coordinator"
    assert tracing.spans(trace_id)  # kept in memory as well
