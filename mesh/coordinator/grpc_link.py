"""The coordinator's real link to a node: a NodeClient on a channel with the node-link keepalive,
plus the agent RPC, plus a Heartbeat stream held while calls are in flight (see
`mesh.core.channels.NODE_LINK_OPTIONS` for why both)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import grpc

from edgemesh.v1 import node_pb2
from mesh.agent_client import run_agent_request
from mesh.client import NodeClient
from mesh.core.channels import (
    NODE_LINK_HEARTBEAT_MS,
    NODE_LINK_OPTIONS,
    PLAINTEXT,
    ChannelSecurity,
    create_channel,
)
from mesh.core.tracing import OUTGOING_TRACEPARENT, TRACEPARENT

_HEARTBEAT_CALL_S = 600.0  # a Heartbeat call's deadline (every RPC has one); then a new one
_HEARTBEAT_RETRY_S = 0.25  # after a Heartbeat call broke, before the next while calls remain


class GrpcNodeLink(NodeClient):
    """A NodeClient plus the agent RPC (`mesh.agent_client`): the real NodeLink.

    Its channel has the node-link keepalive (`mesh.core.channels.NODE_LINK_OPTIONS`), and
    while it has calls in flight it holds a Heartbeat stream, so the link always receives data
    and the keepalive notices a silent link within about a second: the calls on it then fail
    UNAVAILABLE and the attempt loop retries them elsewhere. A node without Heartbeat (an
    older one) gets the keepalive alone."""

    def __init__(self, address: str, security: ChannelSecurity = PLAINTEXT) -> None:
        super().__init__(
            address, channel=create_channel(address, security, options=NODE_LINK_OPTIONS)
        )
        self._owns_channel = True  # made for this link alone: closed with it
        self._calls = 0
        self._heartbeat: asyncio.Task[None] | None = None
        self._heartbeat_unsupported = False

    def _call_metadata(self) -> tuple[tuple[str, str], ...] | None:
        """The attempt's trace context (set by the attempt loop), so the node's spans join
        the task's trace."""
        parent = OUTGOING_TRACEPARENT.get()
        return ((TRACEPARENT, parent),) if parent else None

    @contextlib.contextmanager
    def _in_flight(self) -> Iterator[None]:
        self._calls += 1
        if not self._heartbeat_unsupported and (self._heartbeat is None or self._heartbeat.done()):
            self._heartbeat = asyncio.get_running_loop().create_task(self._beat())
        try:
            yield
        finally:
            self._calls -= 1

    async def _beat(self) -> None:
        """Read the node's Heartbeat while calls are in flight; ends soon after the last."""
        request = node_pb2.HeartbeatRequest(interval_ms=NODE_LINK_HEARTBEAT_MS)
        while self._calls:
            call = self._stub.Heartbeat(request, timeout=_HEARTBEAT_CALL_S)
            try:
                async for _beat in call:
                    if not self._calls:
                        break
            except grpc.RpcError as error:
                if error.code() is grpc.StatusCode.UNIMPLEMENTED:
                    self._heartbeat_unsupported = True  # an older node: keepalive alone
                    return
                # The link broke (and the calls on it with it) or the call's deadline passed:
                # hold a new one while calls remain, after a pause.
                await asyncio.sleep(_HEARTBEAT_RETRY_S)
            finally:
                call.cancel()

    async def generate_request(
        self, request: node_pb2.GenerateRequest, *, timeout_s: float | None = None
    ) -> node_pb2.GenerateResponse:
        with self._in_flight():
            return await super().generate_request(request, timeout_s=timeout_s)

    async def stream_request(
        self, request: node_pb2.GenerateRequest, *, timeout_s: float | None = None
    ) -> AsyncIterator[node_pb2.GenerateChunk]:
        with self._in_flight():
            chunks = super().stream_request(request, timeout_s=timeout_s)
            async with contextlib.aclosing(chunks):  # type: ignore[type-var]
                async for chunk in chunks:
                    yield chunk

    async def run_agent(
        self, request: node_pb2.AgentRequest, *, timeout_s: float | None = None
    ) -> AsyncIterator[node_pb2.AgentEvent]:
        with self._in_flight():
            events = run_agent_request(self, request, timeout_s=timeout_s)
            async with contextlib.aclosing(events):  # type: ignore[type-var]
                async for event in events:
                    yield event

    async def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        await super().close()
