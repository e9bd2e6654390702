"""An impostor for the trust e2e test: a node daemon (fake model) that advertises by mDNS a
record copied from a real member, down to its certificate fingerprint.

    python -m tests.e2e.trust_impostor --interface IP --state-dir DIR --name NAME \
        --node-id ID --cluster C --fingerprint FP [--foreign-ca]

Plaintext by default (it has no certificate of the cluster); with --foreign-ca it serves TLS
with a certificate for the victim's id from a CA of its own, and advertises that
certificate's fingerprint. Prints "impostor serving ADDRESS" once announced, and
"PROMPT RECEIVED" for every request its model gets: the test asserts none ever comes.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import io
import pathlib
import sys

from zeroconf.asyncio import AsyncServiceInfo

from mesh.core import pki
from mesh.core.channels import ChannelSecurity
from mesh.core.records import NodeRecord
from nodes.announcer import DaemonAnnouncement
from nodes.backends import GenerationInput
from nodes.config import NodeConfig
from nodes.daemon import NodeDaemon
from nodes.join import NodeTls
from tests.fakes import FakeBackend


class TellingBackend(FakeBackend):
    async def stream(self, request: GenerationInput):  # type: ignore[override]
        print("PROMPT RECEIVED", flush=True)
        async for piece in super().stream(request):
            yield piece


class CopiedRecord(DaemonAnnouncement):
    fingerprint = ""

    def __init__(self, daemon: NodeDaemon) -> None:
        super().__init__(daemon)
        announcer = self.announcer
        plain = announcer._service_info

        def own_host(record: NodeRecord):  # type: ignore[no-untyped-def]
            # The TXT record is the victim's; the host name under which its address is
            # announced is the impostor's own, so that the victim's goodbye (which retracts
            # its host name's addresses) does not retract the impostor's record too.
            info = plain(record)
            return AsyncServiceInfo(
                info.type,
                info.name,
                port=info.port,
                properties=info.properties,
                server=f"impostor-{record.node_id}.local.",
                parsed_addresses=info.parsed_addresses(),
            )

        announcer._service_info = own_host  # type: ignore[method-assign]

    def build_record(self) -> NodeRecord:
        return super().build_record().model_copy(update={"cert_fingerprint": self.fingerprint})


def foreign_tls(directory: pathlib.Path, node_id: str, cluster: str) -> NodeTls:
    """Key, certificate for `node_id` and CA, all of a CA that is not the cluster's."""
    ca_key, ca_cert = pki.make_ca(cluster)
    key = pki.new_key()
    cert = pki.issue(
        ca_key,
        ca_cert,
        key.public_key(),
        role=pki.ROLE_NODE,
        identity=node_id,
        lifetime=datetime.timedelta(days=1),
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "node.key").write_bytes(pki.key_pem(key))
    (directory / "node.pem").write_bytes(pki.cert_pem(cert))
    (directory / "ca.pem").write_bytes(pki.cert_pem(ca_cert))
    return NodeTls(directory, cluster, pki.fingerprint(ca_cert), (), {})


def main() -> None:
    parser = argparse.ArgumentParser()
    for flag in ("--interface", "--state-dir", "--name", "--node-id", "--cluster"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--fingerprint", default="")
    parser.add_argument("--foreign-ca", action="store_true")
    args = parser.parse_args()
    state = pathlib.Path(args.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    (state / "node-id").write_text(args.node_id + "\n")
    tls = foreign_tls(state / "tls", args.node_id, args.cluster) if args.foreign_ca else None
    asyncio.run(serve(args, state, tls))


async def serve(args: argparse.Namespace, state: pathlib.Path, tls: NodeTls | None) -> None:
    config = NodeConfig(
        name=args.name,
        cluster=args.cluster,
        host=args.interface,
        port=0,
        state_dir=str(state),
        insecure=True,
        router=None,
    )
    CopiedRecord.fingerprint = args.fingerprint
    daemon = NodeDaemon(
        config,
        backends={"smollm2": TellingBackend("smollm2")},
        announcer_factory=CopiedRecord,
        progress=io.StringIO(),
    )
    if tls is not None:
        CopiedRecord.fingerprint = tls.fingerprint()

        async def keep(self: NodeDaemon) -> None:  # no join: this certificate is its own
            self.tls = tls

        daemon._enroll = keep.__get__(daemon)  # type: ignore[method-assign]
    await daemon.start()
    await daemon.announce()
    security: ChannelSecurity | None = daemon.tls.security if daemon.tls else None
    print(f"impostor serving {daemon.address} tls={security is not None}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await daemon.stop()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(0)
