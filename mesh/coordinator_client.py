"""Client library for the coordinator's MeshService. Raises `mesh.core.errors` exceptions, never grpc ones.

    async with MeshClient("127.0.0.1:9000") as mesh:
        reply = await mesh.submit("What is the capital city of France?", model="smollm2")
        print(reply.text, reply.node_name, [a.outcome for a in reply.attempts])
        async for chunk in mesh.submit_stream("Tell me a story", model="smollm2"):
            print(chunk.text, end="")           # the last chunk carries `result`
        reply = await mesh.submit("What is the status of order 1042?", agent="customer-service")
        print(reply.text, reply.tier, [(s.call.tool, s.result_json) for s in reply.steps])

Works against Ray Serve's gRPC proxy and against a dispatcher's direct fast path alike. A
coordinator with a cluster directory wants an API key: `MeshClient(address, api_key=KEY)` sends
it on every call (UnauthenticatedError without a valid one, PermissionDeniedError out of its
scope, RateLimitedError with `retry_after_s` over its limits).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence

import grpc

from edgemesh.v1 import mesh_pb2, mesh_pb2_grpc, node_pb2
from mesh.core.channels import PLAINTEXT, ChannelClient, ChannelSecurity, Keepalive
from mesh.core.grpc_status import error_from_detail, from_grpc_error
from mesh.core.untrusted import check_seed

DEFAULT_TIMEOUT_S = 130.0  # a little over the default task deadline (120 s)
_MARGIN_S = 5.0  # the RPC outlives the task's own deadline, so the coordinator's error arrives


def build_submit_request(
    prompt: str = "",
    *,
    model: str = "",
    agent: str = "",
    messages: Sequence[Mapping[str, str]] = (),
    task_id: str = "",
    idempotency_key: str = "",
    deadline_s: float = 0.0,
    labels: Mapping[str, str] | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    tier: str = "",
) -> mesh_pb2.SubmitRequest:
    """A SubmitRequest from plain values. `agent` ("auto": the intent router picks) runs an agent
    task; `tier` starts it on that model tier instead of the lowest."""
    check_seed(seed)  # never protobuf's bare "Value out of range"
    sampling = node_pb2.Sampling(stop=list(stop))
    for name, value in (
        ("max_tokens", max_tokens),
        ("temperature", temperature),
        ("top_p", top_p),
        ("seed", seed),
    ):
        if value is not None:
            setattr(sampling, name, value)
    return mesh_pb2.SubmitRequest(
        task_id=task_id,
        idempotency_key=idempotency_key,
        agent=agent,
        model=model,
        prompt=prompt,
        sampling=sampling,
        deadline_s=deadline_s,
        labels=dict(labels or {}),
        tier=tier,
        messages=[
            node_pb2.ChatMessage(role=m["role"], content=m.get("content", "")) for m in messages
        ],
    )


class MeshClient(ChannelClient):
    """An asyncio client for the coordinator. Use as an async context manager, or `close()`."""

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        security: ChannelSecurity = PLAINTEXT,
        channel: grpc.aio.Channel | None = None,
        api_key: str | None = None,
    ) -> None:
        # The ingress may be Ray Serve's gRPC proxy, which allows few pings (Keepalive).
        super().__init__(
            address,
            timeout_s=timeout_s,
            security=security,
            channel=channel,
            keepalive=Keepalive.INGRESS,
        )
        self._stub = mesh_pb2_grpc.MeshServiceStub(self._channel)
        # Sent with every call; never part of a message or an error.
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None

    def _timeout(self, request: mesh_pb2.SubmitRequest, timeout_s: float | None) -> float:
        if timeout_s is not None:
            return timeout_s
        return request.deadline_s + _MARGIN_S if request.deadline_s else self.timeout_s

    async def submit_request(
        self, request: mesh_pb2.SubmitRequest, *, timeout_s: float | None = None
    ) -> mesh_pb2.SubmitResponse:
        try:
            return await self._stub.Submit(
                request, timeout=self._timeout(request, timeout_s), metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise from_grpc_error(error) from None

    async def stream_request(
        self, request: mesh_pb2.SubmitRequest, *, timeout_s: float | None = None
    ) -> AsyncIterator[mesh_pb2.SubmitChunk]:
        call = self._stub.SubmitStream(
            request, timeout=self._timeout(request, timeout_s), metadata=self._metadata
        )
        failure = None  # through Serve's proxy, a failing stream's last chunk carries its error
        try:
            async for chunk in call:
                if chunk.HasField("error"):
                    failure = chunk.error
                    continue
                yield chunk
        except grpc.RpcError as error:
            raise from_grpc_error(error, detail=failure) from None
        finally:
            call.cancel()  # leaving early cancels the task on the mesh
        if failure is not None:  # an error chunk, then a stream ended as if it had succeeded
            raise error_from_detail(
                "UNKNOWN", "the stream ended after its error, without the error's status", failure
            )

    async def submit(
        self, prompt: str = "", *, timeout_s: float | None = None, **options: object
    ) -> mesh_pb2.SubmitResponse:
        """One answer; options are those of `build_submit_request`."""
        return await self.submit_request(
            build_submit_request(prompt, **options),  # type: ignore[arg-type]
            timeout_s=timeout_s,
        )

    async def submit_stream(
        self, prompt: str = "", *, timeout_s: float | None = None, **options: object
    ) -> AsyncIterator[mesh_pb2.SubmitChunk]:
        """Chunks of text; the last one has `result` (node, attempts, usage, failed_over)."""
        request = build_submit_request(prompt, **options)  # type: ignore[arg-type]
        async for chunk in self.stream_request(request, timeout_s=timeout_s):
            yield chunk

    async def list_nodes(self, *, timeout_s: float = 10.0) -> list[mesh_pb2.NodeEntry]:
        try:
            reply = await self._stub.ListNodes(
                mesh_pb2.ListNodesRequest(), timeout=timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise from_grpc_error(error) from None
        return list(reply.nodes)

    async def describe_task(self, task_id: str, *, timeout_s: float = 10.0) -> mesh_pb2.TaskRecord:
        try:
            return await self._stub.DescribeTask(
                mesh_pb2.DescribeTaskRequest(task_id=task_id),
                timeout=timeout_s,
                metadata=self._metadata,
            )
        except grpc.RpcError as error:
            raise from_grpc_error(error) from None
