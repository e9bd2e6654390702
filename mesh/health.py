"""How the registry checks a node: a probe (Describe + health Check) and a health Watch stream.

Mechanism only; what the results mean for a node's state is decided in `mesh.node_table`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgemesh.v1 import node_pb2
from mesh.client import NodeClient
from mesh.core.channels import PLAINTEXT, ChannelSecurity, create_channel
from mesh.core.errors import DeadlineExceededError, MeshError, UnavailableError
from mesh.core.ids import NodeId
from mesh.core.pki import MEMBER_NAME, node_name
from mesh.core.records import accelerator_kinds, served_models
from mesh.node_table import NodeDetails, ProbeResult, ProbeStatus
from mesh.nodes_view import NodeSource, NodeState, NodeView

logger = logging.getLogger("mesh.registry")

_SERVING = health_pb2.HealthCheckResponse.SERVING


class Prober(Protocol):
    """What the registry needs to check nodes; `GrpcProber` is the real one, tests use fakes."""

    async def probe(
        self,
        key: str,
        address: str,
        *,
        timeout_s: float,
        refresh: bool = False,
        node_id: str | None = None,
    ) -> ProbeResult:
        """Check the node answers and serves, and describe it. `refresh`: a periodic load
        refresh of a node whose health Watch runs, so Describe alone will do. `node_id`: the
        id the node advertised (None for a static address)."""
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
        result = await prober.probe(key, address, timeout_s=timeout_s, node_id=node_id)
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


class Member(Protocol):
    @property
    def labels(self) -> Mapping[str, str]: ...


class Membership(Protocol):
    """Who may be a node (mesh/cluster/authority.py `MemberDirectory`)."""

    def refusal(self, node_id: str, name: str | None, fingerprint: str | None) -> str | None: ...

    def get(self, node_id: str) -> Member | None: ...


# What gRPC says when a handshake proves the peer is not the member it claims: its certificate
# does not verify (another CA, another node's name), it refuses ours, or it does not speak TLS.
# A connection dropped mid-handshake ("Socket closed") is no such proof: a flaky link.
_NOT_A_MEMBER = (
    "certificate_verify_failed",
    "certificate verify failed",
    "peer name",
    "not in peer certificate",
    "wrong_version_number",
    "unknown_ca",
    "bad_certificate",
    "certificate_unknown",
    "certificate_required",
)


def _handshake_failed(error: MeshError) -> bool:
    text = str(error).lower()
    return isinstance(error, UnavailableError) and any(w in text for w in _NOT_A_MEMBER)


class GrpcProber:
    """Probes and watches nodes over gRPC, one channel per tracked entry and address.

    In a cluster (`security` with the coordinator's certificate, and `members`) a node is
    reached over mTLS expecting the certificate of the id it advertised: a process that
    copies a member's TXT record, a node of another CA, or one that is not (or no longer) a
    member fails the probe as INVALID, which the table logs once and never makes ready. A
    static address (no advertised id) is first reached as any member, and then again as the
    id its Describe gave, so that it too is ready only as the node its certificate names."""

    def __init__(
        self, security: ChannelSecurity = PLAINTEXT, members: Membership | None = None
    ) -> None:
        self._security = security
        self._members = members
        self._channels: dict[str, dict[str, grpc.aio.Channel]] = {}
        self._expected: dict[str, str] = {}  # key -> the node id its channels expect

    def _channel(self, key: str, address: str) -> grpc.aio.Channel:
        # One channel per address, so that trying another address of a multi-homed node never
        # closes the channel its health watch runs on; `discard` closes them all.
        held = self._channels.setdefault(key, {})
        channel = held.get(address)
        if channel is None:
            security = self._security
            if security.enabled:
                expected = self._expected.get(key)
                security = security.expecting(node_name(expected) if expected else MEMBER_NAME)
            channel = held[address] = create_channel(address, security)
        return channel

    async def probe(
        self,
        key: str,
        address: str,
        *,
        timeout_s: float,
        refresh: bool = False,
        node_id: str | None = None,
    ) -> ProbeResult:
        verifying = self._security.enabled
        if verifying and self._members is not None and node_id is not None:
            refusal = self._members.refusal(node_id, None, None)
            if refusal is not None:
                return ProbeResult(status=ProbeStatus.INVALID, reason=refusal)
        if node_id is not None:
            self._expected.setdefault(key, node_id)
        client = NodeClient(address, channel=self._channel(key, address), timeout_s=timeout_s)
        try:
            # A refresh skips the health Check: the Watch stream reports NOT_SERVING already,
            # and one RPC instead of two halves the registry's CPU per refreshed node.
            status = "SERVING" if refresh else await client.health(timeout_s=timeout_s)
            if status != "SERVING":
                return ProbeResult(status=ProbeStatus.NOT_SERVING, reason=f"health {status}")
            reply = await client.describe(timeout_s=timeout_s)
        except MeshError as error:
            if verifying:
                # gRPC names most certificate failures in its UNAVAILABLE message; where it does
                # not, a handshake of our own tells a certificate problem from a dropped link.
                expected = self._expected.get(key)
                name = node_name(expected) if expected else MEMBER_NAME
                problem = "" if _handshake_failed(error) else None
                if problem is None and isinstance(error, UnavailableError):
                    # Only a connection that failed: a deadline (a silent, vanished host) gets
                    # no second try, which would double the time to notice it is gone.
                    problem = await self._tls_problem(address, name, timeout_s)
                if problem is not None:
                    who = f"node {node_id}" if node_id else "a member"
                    return ProbeResult(
                        status=ProbeStatus.INVALID,
                        reason=f"TLS handshake failed: no valid cluster certificate for {who}"
                        + (f" ({problem})" if problem else ""),
                    )
            return result_for_error(error)
        if not reply.node.node_id:
            return ProbeResult(status=ProbeStatus.INVALID, reason="Describe has no node id")
        details = details_from_describe(reply)
        if verifying and self._members is not None:
            refusal = self._members.refusal(details.node_id, details.name, None)
            if refusal is not None:
                return ProbeResult(status=ProbeStatus.INVALID, reason=refusal)
            expected = self._expected.get(key)
            if expected is None:  # a static address: check the certificate's id
                problem = await self._check_identity(address, details.node_id, timeout_s)
                if problem:
                    return ProbeResult(status=ProbeStatus.INVALID, reason=problem)
                self._expected[key] = details.node_id
                # From now on this entry's channels expect that id's certificate.
                await self._close_channels(key)
            elif details.node_id != expected:
                return ProbeResult(
                    status=ProbeStatus.INVALID,
                    reason=f"answers as {details.node_id}, its certificate is for {expected}",
                )
            # The labels its join token gave are the cluster's word, not the node's.
            member = self._members.get(details.node_id)
            if member is not None and member.labels:
                details = details.model_copy(
                    update={"labels": {**details.labels, **dict(member.labels)}}
                )
        return ProbeResult(status=ProbeStatus.OK, details=details)

    async def _tls_problem(self, address: str, name: str, timeout_s: float) -> str | None:
        """Why a TLS handshake with `address` as `name` fails, or None if it holds (or the
        peer cannot be reached at all: then it is not a question of certificates)."""
        security = self._security
        context = ssl.create_default_context(cafile=security.ca_file)
        if security.cert_file and security.key_file:
            context.load_cert_chain(security.cert_file, security.key_file)
        context.set_alpn_protocols(["h2"])
        host, _, port = address.rpartition(":")
        try:
            _reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    host.strip("[]"), int(port), ssl=context, server_hostname=name
                ),
                timeout_s,
            )
        except ssl.SSLError as error:
            reason = str(error.reason or error)
            if isinstance(error, ssl.SSLCertVerificationError) or any(
                w in reason.lower() for w in _NOT_A_MEMBER
            ):
                return reason[:120]
            return None  # EOF or a reset mid-handshake: the link, not the certificate
        except (OSError, TimeoutError, ValueError):
            return None
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
        return None

    async def _check_identity(self, address: str, node_id: str, timeout_s: float) -> str:
        """ "" if the server at `address` holds the certificate of `node_id`, else why not."""
        security = self._security.expecting(node_name(node_id))
        async with create_channel(address, security) as channel:
            client = NodeClient(address, channel=channel, timeout_s=timeout_s)
            try:
                await client.health(timeout_s=timeout_s)
            except MeshError as error:
                if _handshake_failed(error):
                    return f"its certificate is not for node {node_id}, the id it answers as"
                return f"could not confirm its certificate: {str(error)[:120]}"
        return ""

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

    async def _close_channels(self, key: str) -> None:
        held = self._channels.pop(key, {})
        await asyncio.gather(*(channel.close() for channel in held.values()))

    async def discard(self, key: str) -> None:
        self._expected.pop(key, None)
        held = self._channels.pop(key, {})
        await asyncio.gather(*(channel.close() for channel in held.values()))

    async def close(self) -> None:
        for key in list(self._channels):
            await self.discard(key)


async def ready_view(
    address: str, *, timeout_s: float = 10.0, security: ChannelSecurity = PLAINTEXT
) -> NodeView:
    """A READY, static NodeView of the node at `address`, from its Describe: for a Dispatcher
    used without a registry (benchmarks, tests)."""
    async with NodeClient(address, security=security) as client:
        details = details_from_describe(await client.describe(timeout_s=timeout_s))
    return NodeView(
        **details.model_dump(exclude={"protocol_version"}),
        address=address,
        state=NodeState.READY,
        source=NodeSource.STATIC,
    )
