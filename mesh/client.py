"""Client library for a node's gRPC service. Raises `mesh.core.errors` exceptions, never grpc ones.

Example (inside a coroutine)::

    async with NodeClient("127.0.0.1:50051") as node:
        reply = await node.generate("What is the capital city of France?", temperature=0)
        async for chunk in node.generate_stream("Tell me a story"):
            print(chunk.text, end="")
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgemesh.v1 import node_pb2, node_pb2_grpc
from mesh.core.channels import PLAINTEXT, ChannelClient, ChannelSecurity
from mesh.core.grpc_status import from_grpc_error
from mesh.core.untrusted import check_seed

DEFAULT_TIMEOUT_S = 120.0
NODE_SERVICE = "edgemesh.v1.NodeService"


def build_generate_request(
    prompt: str = "",
    *,
    messages: Sequence[dict[str, str]] | None = None,
    model: str = "",
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    continuation: str = "",
    continuation_token_ids: Sequence[int] = (),
    raw: bool = False,
    task: node_pb2.TaskContext | None = None,
) -> node_pb2.GenerateRequest:
    """A GenerateRequest from plain Python values; unset sampling fields use the node's defaults."""
    sampling = node_pb2.Sampling(stop=list(stop))
    if max_tokens is not None:
        sampling.max_tokens = max_tokens
    if temperature is not None:
        sampling.temperature = temperature
    if top_p is not None:
        sampling.top_p = top_p
    if seed is not None:
        check_seed(seed)  # never protobuf's bare "Value out of range"
        sampling.seed = seed
    request = node_pb2.GenerateRequest(
        model=model,
        prompt=prompt,
        messages=[node_pb2.ChatMessage(**m) for m in (messages or ())],
        sampling=sampling,
        continuation=continuation,
        continuation_token_ids=list(continuation_token_ids),
        raw=raw,
    )
    if task is not None:
        request.task.CopyFrom(task)
    return request


class NodeClient(ChannelClient):
    """An asyncio client for one node. Use as an async context manager, or call `close()`."""

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        security: ChannelSecurity = PLAINTEXT,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        super().__init__(address, timeout_s=timeout_s, security=security, channel=channel)
        self._stub = node_pb2_grpc.NodeServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _call_metadata(self) -> tuple[tuple[str, str], ...] | None:
        """Metadata for a generation or agent call (the coordinator's link adds its trace
        context); none here."""
        return None

    async def classify(
        self, text: str, *, model: str = "", timeout_s: float | None = None
    ) -> node_pb2.ClassifyResponse:
        """Classify `text` with a classifier model (default: the node's intent router)."""
        try:
            return await self._stub.Classify(
                node_pb2.ClassifyRequest(model=model, text=text), timeout=timeout_s or 10.0
            )
        except grpc.RpcError as error:
            raise from_grpc_error(error) from None

    async def infer(
        self, request: node_pb2.InferRequest, *, timeout_s: float | None = None
    ) -> node_pb2.InferResponse:
        """Run a tensor model (see nodes.backends.tensors for numpy conversion)."""
        try:
            return await self._stub.Infer(request, timeout=timeout_s or self.timeout_s)
        except grpc.RpcError as error:
            raise from_grpc_error(error) from None

    async def describe(
        self, *, timeout_s: float | None = None, task_counts: bool = False
    ) -> node_pb2.DescribeResponse:
        """Who the node is and its load; `task_counts`: also what it did per task id."""
        try:
            return await self._stub.Describe(
                node_pb2.DescribeRequest(task_counts=task_counts),
                timeout=timeout_s or min(self.timeout_s, 10.0),
            )
        except grpc.RpcError as error:
            raise from_grpc_error(error) from None

    async def health(self, service: str = "", *, timeout_s: float = 5.0) -> str:
        """The health status name ("SERVING", "NOT_SERVING", ...) of `service` ("" = the node)."""
        try:
            reply = await self._health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as error:
            raise from_grpc_error(error) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    async def get_trace(
        self, trace_id: str, *, timeout_s: float | None = None
    ) -> node_pb2.GetTraceResponse:
        """The spans the node kept of one trace (32 hex digits)."""
        try:
            return await self._stub.GetTrace(
                node_pb2.GetTraceRequest(trace_id=trace_id),
                timeout=timeout_s or min(self.timeout_s, 10.0),
            )
        except grpc.RpcError as error:
            raise from_grpc_error(error) from None

    async def generate_request(
        self, request: node_pb2.GenerateRequest, *, timeout_s: float | None = None
    ) -> node_pb2.GenerateResponse:
        try:
            return await self._stub.Generate(
                request, timeout=timeout_s or self.timeout_s, metadata=self._call_metadata()
            )
        except grpc.RpcError as error:
            raise from_grpc_error(error) from None

    async def stream_request(
        self, request: node_pb2.GenerateRequest, *, timeout_s: float | None = None
    ) -> AsyncIterator[node_pb2.GenerateChunk]:
        call = self._stub.GenerateStream(
            request, timeout=timeout_s or self.timeout_s, metadata=self._call_metadata()
        )
        try:
            async for chunk in call:
                yield chunk
        except grpc.RpcError as error:
            raise from_grpc_error(error) from None
        finally:
            # Leaving the loop early (break, exception, cancellation) stops the
            # generation on the node instead of letting it run to the end.
            call.cancel()

    async def generate(
        self, prompt: str = "", *, timeout_s: float | None = None, **options: Any
    ) -> node_pb2.GenerateResponse:
        """One completion. Options are those of `build_generate_request`."""
        return await self.generate_request(
            build_generate_request(prompt, **options), timeout_s=timeout_s
        )

    async def generate_stream(
        self, prompt: str = "", *, timeout_s: float | None = None, **options: Any
    ) -> AsyncIterator[node_pb2.GenerateChunk]:
        """A completion as chunks; the last one has `final` set (usage, timing)."""
        async for chunk in self.stream_request(
            build_generate_request(prompt, **options), timeout_s=timeout_s
        ):
            yield chunk
