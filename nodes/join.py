"""A node's membership of a cluster: join with a token, keep the certificate, renew it.

    <state dir>/tls/node.key        the node's private key (0600; made here, never sent)
    <state dir>/tls/node.pem        its certificate, for its node id, from the cluster CA
    <state dir>/tls/ca.pem          the cluster CA, pinned by the join token's fingerprint
    <state dir>/tls/membership.json cluster name, CA fingerprint, the coordinator's join
                                    address(es), the labels the token gave

`enroll` runs before the node listens: with a certificate already kept it uses it (a restart
needs no token); otherwise, with a join token, it finds the coordinator's join port (mDNS
`_edgemesh-join._tcp` with the token's CA fingerprint, or the address given), checks the CA
the coordinator shows against the token, proves the token and receives a certificate.
`Renewal` asks for a new certificate when a third of the current one's life is left; the
node's server serves it from the next connection on (mesh/core/channels.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hmac
import json
import logging
import os
import pathlib
import secrets
import time
from collections.abc import Callable, Sequence

import grpc

from edgemesh.v1 import cluster_pb2, cluster_pb2_grpc
from mesh.core import pki
from mesh.core.channels import ChannelSecurity, create_channel
from mesh.core.errors import ConfigError, MeshError
from mesh.core.files import write_private
from mesh.core.grpc_status import from_grpc_error

logger = logging.getLogger(__name__)

JOIN_SERVICE_TYPE = "_edgemesh-join._tcp.local."
DEFAULT_JOIN_PORT = 9100
_CALL_TIMEOUT_S = 10.0
_RENEW_CHECK_S = 3600.0


def _replace_pair(directory: pathlib.Path, key_pem: bytes, certificate_pem: bytes) -> None:
    """Key and certificate replaced as a pair. Both are first written in full beside the
    current ones (`*.next`); a crash between the two renames leaves a pair `NodeTls.load`
    completes from `node.pem.next`."""
    write_private(directory / "node.key.next", key_pem)
    write_private(directory / "node.pem.next", certificate_pem)
    os.replace(directory / "node.key.next", directory / "node.key")
    os.replace(directory / "node.pem.next", directory / "node.pem")


@dataclasses.dataclass
class NodeTls:
    """A node's kept membership: its files and what they say."""

    directory: pathlib.Path
    cluster: str
    ca_fingerprint: str
    coordinators: tuple[str, ...]
    labels: dict[str, str]

    @property
    def key_file(self) -> pathlib.Path:
        return self.directory / "node.key"

    @property
    def cert_file(self) -> pathlib.Path:
        return self.directory / "node.pem"

    @property
    def ca_file(self) -> pathlib.Path:
        return self.directory / "ca.pem"

    @property
    def security(self) -> ChannelSecurity:
        """The server's credentials: this certificate; clients must hold one of the CA's."""
        return ChannelSecurity(
            ca_file=str(self.ca_file), cert_file=str(self.cert_file), key_file=str(self.key_file)
        )

    def certificate(self) -> pki.Identity:
        return pki.identity_of_pem(self.cert_file.read_bytes())

    def fingerprint(self) -> str:
        return self.certificate().fingerprint

    def save(self) -> None:
        data = {
            "cluster": self.cluster,
            "ca_fingerprint": self.ca_fingerprint,
            "coordinators": list(self.coordinators),
            "labels": self.labels,
        }
        write_private(self.directory / "membership.json", json.dumps(data, indent=1).encode())

    def _complete_pair(self) -> None:
        """Finish a renewal a crash interrupted (`_replace_pair`): the certificate waiting in
        node.pem.next is the one for the key now in node.key."""
        waiting = self.directory / "node.pem.next"
        if not waiting.is_file() or not self.key_file.is_file():
            return
        key = pki.load_key(self.key_file.read_bytes())
        if pki.load_cert(waiting.read_bytes()).public_key() == key.public_key():
            os.replace(waiting, self.cert_file)
        else:
            waiting.unlink()
        (self.directory / "node.key.next").unlink(missing_ok=True)

    @classmethod
    def load(cls, directory: pathlib.Path) -> NodeTls | None:
        try:
            data = json.loads((directory / "membership.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            raise ConfigError(f"{directory}/membership.json: cannot read it: {error}") from None
        tls = cls(
            directory=directory,
            cluster=str(data["cluster"]),
            ca_fingerprint=str(data["ca_fingerprint"]),
            coordinators=tuple(data.get("coordinators") or ()),
            labels={str(k): str(v) for k, v in (data.get("labels") or {}).items()},
        )
        tls._complete_pair()
        for path in (tls.key_file, tls.cert_file, tls.ca_file):
            if not path.is_file():
                raise ConfigError(
                    f"{path} is missing: the node's membership is incomplete; remove {directory} "
                    "and join again with a new token"
                )
        return tls


async def find_join_ports(
    ca_fingerprint: str, *, timeout_s: float, interface: str | None
) -> list[str]:
    """The join ports of this cluster's coordinator(s) seen on mDNS within `timeout_s`."""
    from zeroconf import IPVersion, ServiceStateChange
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

    zeroconf = (
        AsyncZeroconf(interfaces=[interface])
        if interface
        else AsyncZeroconf(ip_version=IPVersion.V4Only)
    )
    names: asyncio.Queue[str] = asyncio.Queue()

    def on_change(
        zeroconf: object, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is not ServiceStateChange.Removed:
            names.put_nowait(name)

    browser = AsyncServiceBrowser(zeroconf.zeroconf, JOIN_SERVICE_TYPE, handlers=[on_change])
    found: list[str] = []
    deadline = time.monotonic() + timeout_s
    try:
        while not found and time.monotonic() < deadline:
            try:
                name = await asyncio.wait_for(names.get(), deadline - time.monotonic())
            except TimeoutError:
                break
            info = AsyncServiceInfo(JOIN_SERVICE_TYPE, name)
            if not await info.async_request(zeroconf.zeroconf, 3000):
                continue
            if (info.properties or {}).get(b"fp") != ca_fingerprint.encode():
                continue  # another cluster's coordinator
            found += [f"{address}:{info.port}" for address in info.parsed_addresses()]
    finally:
        await browser.async_cancel()
        await zeroconf.async_close()
    return found


def _message(error: BaseException) -> str:
    if isinstance(error, grpc.RpcError):
        mesh_error = from_grpc_error(error)
        return str(mesh_error)
    return str(error)


async def _join_at(
    address: str,
    token: pki.JoinToken,
    *,
    node_id: str,
    node_name: str,
    key: pki.PrivateKey,
) -> tuple[cluster_pb2.JoinResponse, bytes]:
    """One join at `address`: returns the answer and the CA's PEM, both checked."""
    async with create_channel(address) as channel:
        stub = cluster_pb2_grpc.ClusterServiceStub(channel)
        info = await stub.GetClusterInfo(cluster_pb2.ClusterInfoRequest(), timeout=_CALL_TIMEOUT_S)
        ca_cert = pki.load_cert(info.ca_pem)
        if not hmac.compare_digest(pki.fingerprint(ca_cert), token.ca_fingerprint):
            raise pki.TrustError(
                f"the coordinator at {address} is not of the token's cluster "
                "(its CA's fingerprint differs): check the address or the token"
            )
        csr = pki.csr_for(key, node_id)
        nonce = secrets.token_bytes(16)
        proof_key = pki.proof_key(token.secret)
        reply = await stub.Join(
            cluster_pb2.JoinRequest(
                token_id=token.token_id,
                node_id=node_id,
                node_name=node_name,
                csr_der=csr,
                nonce=nonce,
                proof=pki.join_proof(proof_key, token.token_id, node_id, node_name, nonce, csr),
            ),
            timeout=_CALL_TIMEOUT_S,
        )
    expected = pki.joined_proof(
        proof_key, nonce, reply.certificate_pem, info.ca_pem, reply.cluster, dict(reply.labels)
    )
    if not hmac.compare_digest(expected, reply.proof) or reply.ca_pem != info.ca_pem:
        raise pki.TrustError(f"the answer from {address} does not prove the token: not trusted")
    _check_mine(reply.certificate_pem, ca_cert, node_id, key)
    return reply, info.ca_pem


def _check_mine(
    certificate_pem: bytes, ca_cert: pki.x509.Certificate, node_id: str, key: pki.PrivateKey
) -> None:
    """The certificate is the CA's, for this node, and for `key`: else TrustError."""
    cert = pki.load_cert(certificate_pem)
    identity = pki.check_issued(cert, ca_cert)
    if identity.role != pki.ROLE_NODE or identity.identity != node_id:
        raise pki.TrustError("the certificate received is not for this node")
    if cert.public_key() != key.public_key():
        raise pki.TrustError("the certificate received is not for this node's key")


async def join(
    directory: pathlib.Path,
    token: pki.JoinToken,
    *,
    node_id: str,
    node_name: str,
    coordinators: Sequence[str],
    timeout_s: float,
    interface: str | None,
    say: Callable[[str], None],
) -> NodeTls:
    """Join the token's cluster; keep the key, certificate and CA in `directory`."""
    addresses = list(coordinators)
    if not addresses:
        say(f"looking for the cluster's coordinator on mDNS (up to {timeout_s:g} s)")
        addresses = await find_join_ports(
            token.ca_fingerprint, timeout_s=timeout_s, interface=interface
        )
        if not addresses:
            raise ConfigError(
                f"no coordinator of the token's cluster answered on mDNS within {timeout_s:g} s; "
                "is it running (with its cluster dir)? pass --coordinator HOST:PORT of its "
                f"join port ({DEFAULT_JOIN_PORT} by default)"
            )
    key = pki.new_key()
    problems: list[str] = []
    for address in addresses:
        try:
            reply, ca_pem = await _join_at(
                address, token, node_id=node_id, node_name=node_name, key=key
            )
        except (grpc.RpcError, MeshError) as error:
            problems.append(f"{address}: {_message(error)}")
            continue
        write_private(directory / "node.key", pki.key_pem(key))
        write_private(directory / "node.pem", reply.certificate_pem)
        write_private(directory / "ca.pem", ca_pem)
        tls = NodeTls(
            directory=directory,
            cluster=reply.cluster,
            ca_fingerprint=token.ca_fingerprint,
            coordinators=(address,),
            labels=dict(reply.labels),
        )
        tls.save()
        say(f"joined cluster {reply.cluster} through {address} as node {node_id}")
        return tls
    raise ConfigError("could not join: " + "; ".join(problems))


async def enroll(
    state_dir: pathlib.Path,
    token_text: str | None,
    *,
    node_id: str,
    node_name: str,
    coordinators: Sequence[str],
    timeout_s: float,
    interface: str | None,
    say: Callable[[str], None],
) -> NodeTls | None:
    """The node's membership: kept, or made now from `token_text`; None for an open node."""
    directory = state_dir / "tls"
    kept = NodeTls.load(directory)
    token = pki.JoinToken.parse(token_text) if token_text else None
    if kept is not None:
        if token is not None and token.ca_fingerprint != kept.ca_fingerprint:
            raise ConfigError(
                f"this node is already a member of cluster {kept.cluster} (another CA than the "
                f"token's); to move it, remove {directory} and start again with the token"
            )
        identity = kept.certificate()
        if identity.identity != node_id:
            raise ConfigError(
                f"{kept.cert_file} is for node {identity.identity}, this node is {node_id}"
            )
        if identity.not_after <= datetime.datetime.now(datetime.UTC):
            if token is None:
                raise ConfigError(
                    f"this node's certificate expired at {identity.not_after:%Y-%m-%d %H:%M} UTC;"
                    " ask for a new token (`mesh cluster token`) and start with --join"
                )
        else:
            if coordinators and tuple(coordinators) != kept.coordinators:
                kept.coordinators = tuple(coordinators)
                kept.save()
            return kept
    if token is None:
        return None
    return await join(
        directory,
        token,
        node_id=node_id,
        node_name=node_name,
        coordinators=coordinators,
        timeout_s=timeout_s,
        interface=interface,
        say=say,
    )


class Renewal:
    """Renews the node's certificate when a third of its life is left (checked hourly, and at
    once on start), at the coordinator it joined through."""

    def __init__(
        self,
        tls: NodeTls,
        *,
        on_renewed: Callable[[], object] | None = None,
        clock: Callable[[], float] = time.time,
        check_every_s: float = _RENEW_CHECK_S,
    ) -> None:
        self._tls = tls
        self._on_renewed = on_renewed
        self._clock = clock
        self._check_every_s = check_every_s

    def due(self) -> bool:
        cert = pki.load_cert(self._tls.cert_file.read_bytes())
        begin = cert.not_valid_before_utc.timestamp()
        end = cert.not_valid_after_utc.timestamp()
        return self._clock() >= end - (end - begin) / 3

    async def renew(self) -> None:
        key = pki.new_key()
        csr = pki.csr_for(key, self._tls.certificate().identity)
        now = int(self._clock())
        current_key = pki.load_key(self._tls.key_file.read_bytes())
        request = cluster_pb2.RenewRequest(
            certificate_pem=self._tls.cert_file.read_bytes(),
            csr_der=csr,
            unix_s=now,
            signature=pki.sign(current_key, pki.renew_message(now, csr)),
        )
        problems = []
        ca_cert = pki.load_cert(self._tls.ca_file.read_bytes())
        for address in self._tls.coordinators:
            try:
                async with create_channel(address) as channel:
                    reply = await cluster_pb2_grpc.ClusterServiceStub(channel).Renew(
                        request, timeout=_CALL_TIMEOUT_S
                    )
                _check_mine(reply.certificate_pem, ca_cert, self._tls.certificate().identity, key)
            except (grpc.RpcError, MeshError) as error:
                problems.append(f"{address}: {_message(error)}")
                continue
            # A server reading the pair between the two renames fails that one handshake; the
            # next connection reads both again.
            _replace_pair(self._tls.directory, pki.key_pem(key), reply.certificate_pem)
            logger.info("certificate renewed at %s", address)
            if self._on_renewed is not None:
                result = self._on_renewed()
                if asyncio.iscoroutine(result):
                    await result
            return
        raise ConfigError(
            "could not renew the certificate: " + "; ".join(problems or ["no address"])
        )

    async def run(self) -> None:
        while True:
            try:
                if self.due():
                    await self.renew()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # keep serving with the current one; try again later
                logger.warning("certificate renewal failed (will retry): %s", error)
            await asyncio.sleep(self._check_every_s)
