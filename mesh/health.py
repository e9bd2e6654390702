"""How the registry checks a node: a probe (Describe + health Check) and a health Watch stream.

Mechanism only; what the results mean for a node's state is decided in `mesh.node_table`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgemesh.v1 import node_pb2
from mesh.client import NodeClient
from mesh.core.channels import PLAINTEXT, ChannelSecurity, create_channel
from mesh.core.errors import DeadlineExceededError, MeshError, UnavailableError
from mesh.core.ids import NodeId
from mesh.core.records import accelerator_kinds, served_models
from mesh.node_table import NodeDetails, ProbeResult, ProbeStatus
from mesh.nodes_view import NodeSource, NodeState, NodeView

logger = logging.getLogger("mesh.registry")

_SERVING = health_pb2.HealthCheckResponse.SERVING


class Prober(Protocol):
    """What the registry needs to check nodes; `GrpcProber` is the real one, tests use fakes."""

    async def probe(
        self, key: str, address: str, *, timeout_s: float, refresh: bool = False
    ) -> ProbeResult:
        """Check the node answers and serves, and describe it. `refresh`: a periodic load
        refresh of a node whose health Watch runs, so Describe alone will do."""
        ...

    async def watch(self, key: str, address: str, on_status: Callable[[bool], None]) -> str:
        """Follow the node's health until the stream breaks; return why it broke."""
        ...

    async def discard(self, key: str) -> None: ...

    async def close(self) -> None: ...


def details_from_describe(reply: node_pb2.DescribeResponse) -> NodeDetails:
    """The proto-free summary of a Describe reply (models ready, or loaded when asked)."""
    served, loaded = served_models(reply.models)
    hardware = reply.hardware
    return NodeDetails(
        node_id=NodeId(reply.node.node_id),
        name=reply.node.name or reply.node.node_id,
        cluster=reply.node.cluster,
        protocol_version=reply.node.protocol_version,
        models=served,
        loaded_models=loaded,
        agents=tuple(a.name for a in reply.agents),
        labels=dict(reply.node.labels),
        in_flight=reply.load.in_flight,
        queued=reply.load.queued,
        max_concurrent=max(1, reply.capacity.max_concurrent),
        max_queued=reply.capacity.max_queued,
        cpu_percent=reply.load.cpu_percent,
        memory_percent=reply.load.memory_percent,
        cores=hardware.logical_cores or hardware.physical_cores,
        memory_total_bytes=hardware.memory_total_bytes,
        accelerators=accelerator_kinds(
            (gpu.vendor for gpu in hardware.gpus), hardware.onnx_providers
        ),
        model_hashes={
            m.model_id: m.sha256 for m in reply.models if m.model_id in loaded and m.sha256
        },
        default_model=next((m.model_id for m in reply.models if m.is_default), ""),
        decode_tokens_per_s={
            m.model_id: m.decode_tokens_per_s for m in reply.models if m.decode_tokens_per_s > 0
        },
    )


def result_for_error(error: MeshError) -> ProbeResult:
    """Classify a failed probe: a dead node and a slow node are different facts."""
    if isinstance(error, UnavailableError):
        return ProbeResult(status=ProbeStatus.UNREACHABLE, reason=str(error)[:200])
    if isinstance(error, DeadlineExceededError):
        return ProbeResult(status=ProbeStatus.TIMEOUT, reason="no answer before the deadline")
    if error.fields.get("grpc_code") == "UNIMPLEMENTED":
        return ProbeResult(status=ProbeStatus.INVALID, reason="not an edgemesh node service")
    return ProbeResult(status=ProbeStatus.TIMEOUT, reason=f"probe failed: {str(error)[:200]}")


# Which failure to report when no address of a multi-homed node answers: the most alive one.
_FAILURE_RANK = {
    ProbeStatus.NOT_SERVING: 0,  # something answered health: a node loading or draining
    ProbeStatus.TIMEOUT: 1,  # slow or cut off: not proven dead
    ProbeStatus.UNREACHABLE: 2,  # refused or reset
    ProbeStatus.INVALID: 3,
    ProbeStatus.OK: 4,  # an answer from another node (wrong id): the last thing to report
}


async def probe_in_order(
    prober: Prober,
    key: str,
    addresses: Sequence[str],
    *,
    node_id: str | None,
    timeout_s: float,
) -> ProbeResult:
    """Probe `addresses` one after another; the first OK answer from `node_id` wins.

    A multi-homed node advertises every address it has (docker0, a VPN, ...), and only some
    reach it from here, or reach another process. The result names the address that gave it;
    when none answers as `node_id` (any id when None), it is the most alive failure seen.
    """
    best: ProbeResult | None = None
    for address in addresses:
        result = await prober.probe(key, address, timeout_s=timeout_s)
        result = result.model_copy(update={"address": address})
        details = result.details
        if (
            result.status is ProbeStatus.OK
            and details is not None
            and node_id in (None, details.node_id)
        ):
            return result
        if best is None or _FAILURE_RANK[result.status] < _FAILURE_RANK[best.status]:
            best = result
    if best is None:
        return ProbeResult(status=ProbeStatus.UNREACHABLE, reason="no address to probe")
    return best


class GrpcProber:
    """Probes and watches nodes over gRPC, one channel per tracked entry and address."""

    def __init__(self, security: ChannelSecurity = PLAINTEXT) -> None:
        self._security = security
        self._channels: dict[str, dict[str, grpc.aio.Channel]] = {}

    def _channel(self, key: str, address: str) -> grpc.aio.Channel:
        # One channel per address, so that trying another address of a multi-homed node never
        # closes the channel its health watch runs on; `discard` closes them all.
        held = self._channels.setdefault(key, {})
        channel = held.get(address)
        if channel is None:
            channel = held[address] = create_channel(address, self._security)
        return channel

    async def probe(
        self, key: str, address: str, *, timeout_s: float, refresh: bool = False
    ) -> ProbeResult:
        client = NodeClient(address, channel=self._channel(key, address), timeout_s=timeout_s)
        try:
            # A refresh skips the health Check: the Watch stream reports NOT_SERVING already,
            # and one RPC instead of two halves the registry's CPU per refreshed node.
            status = "SERVING" if refresh else await client.health(timeout_s=timeout_s)
            if status != "SERVING":
                return ProbeResult(status=ProbeStatus.NOT_SERVING, reason=f"health {status}")
            reply = await client.describe(timeout_s=timeout_s)
        except MeshError as error:
            return result_for_error(error)
        if not reply.node.node_id:
            return ProbeResult(status=ProbeStatus.INVALID, reason="Describe has no node id")
        return ProbeResult(status=ProbeStatus.OK, details=details_from_describe(reply))

    async def watch(self, key: str, address: str, on_status: Callable[[bool], None]) -> str:
        stub = health_pb2_grpc.HealthStub(self._channel(key, address))
        # A watch is long-lived by design, so it has no deadline; a dead peer ends it through
        # the connection (RST on a crash) or keepalive (a vanished host), and the periodic
        # Describe refresh (with its deadline) covers the rest.
        call = stub.Watch(health_pb2.HealthCheckRequest(service=""))
        try:
            async for reply in call:
                on_status(reply.status == _SERVING)
        except grpc.RpcError as error:
            code = error.code() if hasattr(error, "code") else None
            return f"{code.name if code else 'error'}"
        finally:
            call.cancel()
        return "stream ended"

    async def discard(self, key: str) -> None:
        held = self._channels.pop(key, {})
        await asyncio.gather(*(channel.close() for channel in held.values()))

    async def close(self) -> None:
        for key in list(self._channels):
            await self.discard(key)


async def ready_view(address: str, *, timeout_s: float = 10.0) -> NodeView:
    """A READY, static NodeView of the node at `address`, from its Describe: for a Dispatcher
    used without a registry (benchmarks, tests)."""
    async with NodeClient(address) as client:
        details = details_from_describe(await client.describe(timeout_s=timeout_s))
    return NodeView(
        **details.model_dump(exclude={"protocol_version"}),
        address=address,
        state=NodeState.READY,
        source=NodeSource.STATIC,
    )
