"""The coordinator's join port: ClusterService (join, renew) on plaintext gRPC, found by mDNS.

Plaintext because a joining node holds no certificate yet; nothing secret crosses it (see
proto/edgemesh/v1/cluster.proto). The service is advertised as `_edgemesh-join._tcp` with
the cluster's name and CA fingerprint in its TXT record (public facts), so a node started with
a join token finds the coordinator of its own cluster without an address.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import grpc
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from edgemesh.v1 import cluster_pb2, cluster_pb2_grpc
from mesh.cluster.authority import ClusterAuthority
from mesh.core.channels import add_server_port, create_server, format_address
from mesh.core.errors import MeshError
from mesh.core.grpc_status import abort_with_error

logger = logging.getLogger("mesh.cluster")

JOIN_SERVICE_TYPE = "_edgemesh-join._tcp.local."
_REQUEST_BYTES = 64 * 1024
_CONCURRENT_RPCS = 64


class ClusterServicer(cluster_pb2_grpc.ClusterServiceServicer):
    """Joins and renewals against the cluster directory. The CA's work (file locks, signing)
    runs in a thread so the coordinator's loop keeps serving."""

    def __init__(self, authority: ClusterAuthority) -> None:
        self._authority = authority

    async def GetClusterInfo(
        self, request: cluster_pb2.ClusterInfoRequest, context: grpc.aio.ServicerContext
    ) -> cluster_pb2.ClusterInfo:
        return cluster_pb2.ClusterInfo(cluster=self._authority.name, ca_pem=self._authority.ca_pem)

    async def Join(
        self, request: cluster_pb2.JoinRequest, context: grpc.aio.ServicerContext
    ) -> cluster_pb2.JoinResponse:
        try:
            return await asyncio.to_thread(self._authority.join, request)
        except MeshError as error:
            logger.warning("join refused from %s: %s", context.peer(), error)
            await abort_with_error(context, error)
            raise  # abort raises; for the type checker

    async def Renew(
        self, request: cluster_pb2.RenewRequest, context: grpc.aio.ServicerContext
    ) -> cluster_pb2.JoinResponse:
        try:
            return await asyncio.to_thread(self._authority.renew, request)
        except MeshError as error:
            logger.warning("renewal refused from %s: %s", context.peer(), error)
            await abort_with_error(context, error)
            raise


class JoinServer:
    """ClusterService on `host:port`, optionally advertised on mDNS."""

    def __init__(self, authority: ClusterAuthority) -> None:
        self._authority = authority
        self._server: grpc.aio.Server | None = None
        self._zeroconf: AsyncZeroconf | None = None
        self._info: AsyncServiceInfo | None = None
        self.port = 0

    async def start(self, host: str, port: int, *, advertise: bool = True) -> int:
        server = create_server(
            max_receive_bytes=_REQUEST_BYTES, max_concurrent_rpcs=_CONCURRENT_RPCS
        )
        cluster_pb2_grpc.add_ClusterServiceServicer_to_server(
            ClusterServicer(self._authority), server
        )
        self.port = add_server_port(server, format_address(host, port))
        await server.start()
        self._server = server
        if advertise:
            await self._advertise(host)
        return self.port

    async def _advertise(self, host: str) -> None:
        addresses = _addresses(host)
        if not addresses:
            logger.warning("no address to advertise the join port on; nodes need --coordinator")
            return
        specific = host not in ("", "0.0.0.0", "::")
        self._zeroconf = (
            AsyncZeroconf(interfaces=[host])
            if specific
            else AsyncZeroconf(ip_version=IPVersion.V4Only)
        )
        self._info = AsyncServiceInfo(
            JOIN_SERVICE_TYPE,
            f"{_instance(self._authority)}.{JOIN_SERVICE_TYPE}",
            port=self.port,
            properties={
                b"v": b"1",
                b"c": self._authority.name.encode(),
                b"fp": self._authority.ca_fingerprint.encode(),
            },
            server=f"emc-{self._authority.ca_fingerprint[:12]}.local.",
            parsed_addresses=addresses,
        )
        await self._zeroconf.async_register_service(self._info, allow_name_change=True)
        logger.info("join port %s advertised on mDNS", self.port)

    async def stop(self) -> None:
        if self._zeroconf is not None:
            if self._info is not None:
                await self._zeroconf.async_unregister_service(self._info)
            await self._zeroconf.async_close()
            self._zeroconf = None
        if self._server is not None:
            await self._server.stop(0.5)
            self._server = None


def _addresses(host: str) -> list[str]:
    """What to advertise: the bound address, or every IPv4 address of this host for 0.0.0.0."""
    if host not in ("", "0.0.0.0", "::"):
        return [host]
    import ipaddress

    import ifaddr  # a dependency of zeroconf

    found = [
        ip.ip
        for adapter in ifaddr.get_adapters()
        for ip in adapter.ips
        if isinstance(ip.ip, str) and not ipaddress.ip_address(ip.ip).is_link_local
    ]
    return [a for a in found if not ipaddress.ip_address(a).is_loopback] or found[:1]


def _instance(authority: ClusterAuthority) -> str:
    return f"{authority.name}-{socket.gethostname()[:20]}-{authority.ca_fingerprint[:8]}"
