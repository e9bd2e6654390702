"""The coordinator's side of cluster trust (mesh/cluster): who may be a node, and the join port.

In a coordinator started with a cluster directory, the node-table owner:
- probes nodes over mTLS with the coordinator's certificate, each expecting the certificate of
  the id it advertised (mesh/health.py `GrpcProber`), and refuses mDNS records of nodes that
  are not members, were revoked, or advertise another certificate than their current one
  (`admit`: logged once, never probed);
- serves the join port (ClusterService, mesh/cluster/join_server.py), advertised on mDNS;
- re-reads members.json every 0.25 s, and drops a revoked member from the table at once (its
  links close; the dispatchers see the change on their next long-poll).
"""

from __future__ import annotations

import asyncio
import logging
import pathlib

from mesh.cluster.authority import ClusterAuthority, MemberDirectory
from mesh.cluster.join_server import JoinServer
from mesh.coordinator.settings import CoordinatorConfig
from mesh.core.channels import PLAINTEXT, ChannelSecurity, format_address
from mesh.core.records import NodeRecord
from mesh.health import GrpcProber
from mesh.registry import NodeRegistry

logger = logging.getLogger("mesh.coordinator")

REVOCATION_CHECK_S = 0.25


def node_security(config: CoordinatorConfig) -> ChannelSecurity:
    """The coordinator's credentials towards nodes (plaintext in an open mesh)."""
    if not config.cluster_dir:
        return PLAINTEXT
    return ClusterAuthority(pathlib.Path(config.cluster_dir)).security()


class ClusterTrust:
    def __init__(self, authority: ClusterAuthority) -> None:
        self.authority = authority
        self.members = MemberDirectory(authority, recheck_s=REVOCATION_CHECK_S / 2)
        self._join = JoinServer(authority)
        self._watch: asyncio.Task[None] | None = None
        self.join_address = ""

    @classmethod
    def open(cls, config: CoordinatorConfig) -> ClusterTrust | None:
        if not config.cluster_dir:
            return None
        return cls(ClusterAuthority(pathlib.Path(config.cluster_dir)))

    def prober(self) -> GrpcProber:
        return GrpcProber(self.authority.security(), self.members)

    def admit(self, record: NodeRecord) -> str | None:
        if not record.cert_fingerprint:
            return f"node {record.node_id} advertises no cluster certificate (not joined)"
        return self.members.refusal(record.node_id, record.name, record.cert_fingerprint)

    async def start(self, registry: NodeRegistry, config: CoordinatorConfig) -> None:
        port = await self._join.start(config.host, config.join_port, advertise=config.mdns)
        self.join_address = format_address(config.host, port)
        logger.info("join port on %s (cluster %s)", self.join_address, self.authority.name)
        self._watch = asyncio.get_running_loop().create_task(self._watch_revocations(registry))

    async def _watch_revocations(self, registry: NodeRegistry) -> None:
        dropped: set[str] = set()
        while True:
            try:
                if self.members.refresh():
                    revoked = self.members.revoked()
                    if revoked - dropped:
                        registry.evict(revoked - dropped, "revoked")
                    dropped = revoked  # an id that joins again and is revoked again: again
            except Exception:  # a damaged members.json: keep the last view, say so
                logger.exception("reading the cluster's members failed")
            await asyncio.sleep(REVOCATION_CHECK_S)

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        await self._join.stop()
