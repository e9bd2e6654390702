"""Joining a cluster for real on 127.0.0.1: the CA, a join token, the join port (gRPC), a node
daemon that enrolls and then serves mTLS only, and the coordinator's prober that accepts it
only as the node its certificate names. Fake backends: no model is needed for trust."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import pathlib
import socket

import grpc
import pytest

from edgemesh.v1 import node_pb2, node_pb2_grpc
from mesh.client import NodeClient
from mesh.cluster.authority import ClusterAuthority, MemberDirectory, init_cluster
from mesh.cluster.join_server import JoinServer
from mesh.core import pki
from mesh.core.channels import PLAINTEXT, ChannelSecurity, create_channel
from mesh.core.errors import ConfigError, MeshError
from mesh.health import GrpcProber
from mesh.node_table import ProbeStatus
from nodes.announcer import DaemonAnnouncement
from nodes.config import NodeConfig
from nodes.daemon import NodeDaemon
from tests.fakes import FakeBackend

pytestmark = pytest.mark.integration


def run(coro, timeout=60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@contextlib.asynccontextmanager
async def join_server(directory: pathlib.Path):
    server = JoinServer(ClusterAuthority(directory))
    port = await server.start("127.0.0.1", 0, advertise=False)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def node(state_dir: pathlib.Path, **config):
    settings = dict(
        host="127.0.0.1", port=0, advertise=False, state_dir=str(state_dir), grace_s=0.5
    )
    settings.update(config)
    progress = io.StringIO()
    daemon = NodeDaemon(
        NodeConfig(**settings), backends={"smollm2": FakeBackend("smollm2")}, progress=progress
    )
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop()


@pytest.fixture()
def cluster(tmp_path):
    directory = tmp_path / "cluster"
    init_cluster(directory, "store")
    return directory


def test_a_node_joins_serves_mtls_only_and_is_probed_as_its_id(cluster, tmp_path):
    authority = ClusterAuthority(cluster)
    token = authority.create_token(ttl_s=600, uses=1, labels={"site": "store-1"})

    async def scenario():
        async with join_server(cluster) as join_address:
            async with node(
                tmp_path / "n1", join_token=str(token), coordinator=(join_address,), name="till-1"
            ) as daemon:
                assert daemon.tls is not None
                assert daemon.config.cluster == "store"
                assert daemon.config.labels["site"] == "store-1"
                mode = os.stat(daemon.tls.key_file).st_mode & 0o777
                assert mode == 0o600
                member = authority.members()[daemon.node_id]
                assert member.name == "till-1"
                assert member.fingerprint == daemon.tls.fingerprint()

                # Plaintext is refused at the TLS layer.
                async with NodeClient(daemon.address, timeout_s=2) as plain:
                    with pytest.raises(MeshError):
                        await plain.describe(timeout_s=2)
                # The coordinator's certificate, expecting this node's id: served.
                members = MemberDirectory(authority)
                prober = GrpcProber(authority.security(), members)
                ok = await prober.probe("k1", daemon.address, timeout_s=5, node_id=daemon.node_id)
                assert ok.status is ProbeStatus.OK, ok.reason
                assert ok.details.node_id == daemon.node_id
                # The token's secret is nowhere the node shows: Describe, its mDNS record.
                secret = str(token).split(".")[2]
                admin = authority.security("admin").expecting(pki.node_name(daemon.node_id))
                async with NodeClient(daemon.address, timeout_s=5, security=admin) as operator:
                    described = await operator.describe(timeout_s=5)
                assert secret not in str(described) and str(token) not in str(described)
                txt = DaemonAnnouncement(daemon).build_record().to_txt()
                assert not any(secret.encode() in value for value in txt.values())
                assert txt[b"fp"] == daemon.tls.fingerprint().encode()
                # A static address (no advertised id) is checked against the id it answers as.
                static = await prober.probe("k2", daemon.address, timeout_s=5)
                assert static.status is ProbeStatus.OK, static.reason
                # Expecting another id (a copied TXT record names the victim's id): refused.
                other = await prober.probe(
                    "k3", daemon.address, timeout_s=5, node_id="0123abcd0123"
                )
                assert other.status is ProbeStatus.INVALID
                await prober.close()

                # A node's certificate may not drive another node (PeerGuard): only the
                # coordinator and the operator are served.
                node_security = daemon.tls.security.expecting(pki.node_name(daemon.node_id))
                async with NodeClient(daemon.address, timeout_s=2, security=node_security) as peer:
                    with pytest.raises(MeshError) as refused:
                        await peer.describe(timeout_s=2)
                assert refused.value.fields.get("grpc_code") == "PERMISSION_DENIED"
                # ... nor use a client-streaming call (reflection's is bidirectional).
                from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

                async with create_channel(daemon.address, node_security) as channel:
                    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
                    call = stub.ServerReflectionInfo(
                        iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                        timeout=3,
                    )
                    with pytest.raises(grpc.RpcError) as reflected:
                        async for _ in call:
                            pass
                assert reflected.value.code() is grpc.StatusCode.PERMISSION_DENIED

                # Revoked: the prober refuses it as soon as members.json says so.
                authority.revoke("till-1")
                await asyncio.sleep(0.3)
                prober = GrpcProber(authority.security(), MemberDirectory(authority))
                gone = await prober.probe("k4", daemon.address, timeout_s=5, node_id=daemon.node_id)
                assert gone.status is ProbeStatus.INVALID
                assert "revoked" in gone.reason
                await prober.close()

            # A restart needs no token: the certificate is kept.
            async with node(tmp_path / "n1", coordinator=(join_address,), name="till-1") as again:
                assert again.tls is not None

    run(scenario())


def test_refused_joins_say_why_and_leak_no_secret(cluster, tmp_path):
    authority = ClusterAuthority(cluster)
    once = authority.create_token(ttl_s=600, uses=1)
    expired = authority.create_token(ttl_s=0.01)
    other_dir = tmp_path / "other"
    init_cluster(other_dir, "elsewhere")
    foreign = ClusterAuthority(other_dir).create_token(ttl_s=600)
    secret_text = str(once).split(".")[2]

    async def scenario():
        async with join_server(cluster) as address:
            async with node(tmp_path / "a", join_token=str(once), coordinator=(address,), name="a"):
                pass
            problems = {}
            for label, token, name in (
                ("used up", once, "b"),
                ("expired", expired, "c"),
                ("foreign", foreign, "d"),
            ):
                await asyncio.sleep(0.02)
                with pytest.raises(ConfigError) as error:
                    async with node(
                        tmp_path / label, join_token=str(token), coordinator=(address,), name=name
                    ):
                        pass
                problems[label] = str(error.value)
            assert "used up" in problems["used up"]
            assert "expired" in problems["expired"]
            assert "not of the token's cluster" in problems["foreign"]
            assert all(secret_text not in text for text in problems.values())
            # A damaged token is refused before anything is sent, without echoing it.
            with pytest.raises(ConfigError) as damaged:
                async with node(tmp_path / "e", join_token=str(once)[:-3], name="e"):
                    pass
            assert secret_text not in str(damaged.value)

    run(scenario())
    tokens = json.loads((cluster / "tokens.json").read_text())
    assert all(secret_text not in json.dumps(entry) for entry in tokens.values())


def test_garbage_on_the_tls_port_does_not_disturb_the_node(cluster, tmp_path):
    authority = ClusterAuthority(cluster)
    token = authority.create_token(ttl_s=600)

    async def scenario():
        async with (
            join_server(cluster) as address,
            node(tmp_path / "g", join_token=str(token), coordinator=(address,)) as daemon,
        ):
            host, port = daemon.address.rsplit(":", 1)
            for payload in (b"\x00" * 4096, b"GET / HTTP/1.1\r\n\r\n", os.urandom(65536)):
                with socket.create_connection((host, int(port)), timeout=2) as raw:
                    raw.sendall(payload)
                    with contextlib.suppress(OSError):
                        raw.recv(1024)
            security = authority.security().expecting(pki.node_name(daemon.node_id))
            async with create_channel(daemon.address, security) as channel:
                stub = node_pb2_grpc.NodeServiceStub(channel)
                reply = await stub.Generate(node_pb2.GenerateRequest(prompt="hello"), timeout=10)
            assert reply.text

    run(scenario())


def test_another_cas_certificate_is_refused_by_the_node(cluster, tmp_path):
    authority = ClusterAuthority(cluster)
    token = authority.create_token(ttl_s=600)
    other_dir = tmp_path / "other"
    init_cluster(other_dir, "store")  # same name, another CA

    async def scenario():
        async with (
            join_server(cluster) as address,
            node(tmp_path / "x", join_token=str(token), coordinator=(address,)) as daemon,
        ):
            foreign: ChannelSecurity = ClusterAuthority(other_dir).security()
            # The foreign coordinator does not trust the node either way round.
            prober = GrpcProber(foreign, None)
            result = await prober.probe("k", daemon.address, timeout_s=5, node_id=daemon.node_id)
            assert result.status is ProbeStatus.INVALID
            await prober.close()
            # Trusting the node's CA but presenting the foreign certificate: refused.
            mixed = ChannelSecurity(
                ca_file=str(cluster / "ca.pem"),
                cert_file=foreign.cert_file,
                key_file=foreign.key_file,
                server_name=pki.node_name(daemon.node_id),
            )
            async with create_channel(daemon.address, mixed) as channel:
                with pytest.raises(grpc.RpcError):
                    await node_pb2_grpc.NodeServiceStub(channel).Describe(
                        node_pb2.DescribeRequest(), timeout=3
                    )
            assert PLAINTEXT.enabled is False

    run(scenario())


def test_renewal_over_grpc_gives_a_new_certificate_the_node_serves_at_once(cluster, tmp_path):
    from nodes.join import Renewal

    authority = ClusterAuthority(cluster)
    token = authority.create_token(ttl_s=600)

    async def scenario():
        async with (
            join_server(cluster) as address,
            node(tmp_path / "r", join_token=str(token), coordinator=(address,)) as daemon,
        ):
            before = daemon.tls.fingerprint()
            renewed = asyncio.Event()
            await Renewal(daemon.tls, on_renewed=renewed.set).renew()
            assert renewed.is_set()
            after = daemon.tls.fingerprint()
            assert after != before
            assert authority.members()[daemon.node_id].fingerprint == after
            assert os.stat(daemon.tls.key_file).st_mode & 0o777 == 0o600
            # A new connection gets the new certificate (the server reads its files again).
            prober = GrpcProber(authority.security(), MemberDirectory(authority))
            result = await prober.probe("k", daemon.address, timeout_s=5, node_id=daemon.node_id)
            assert result.status is ProbeStatus.OK, result.reason
            await prober.close()
            assert await served_fingerprint(authority, daemon) == after

    run(scenario())


async def served_fingerprint(authority: ClusterAuthority, daemon: NodeDaemon) -> str:
    """The fingerprint of the certificate the node's server presents on a new connection."""
    import ssl

    from cryptography import x509

    security = authority.security()
    context = ssl.create_default_context(cafile=security.ca_file)
    context.load_cert_chain(security.cert_file, security.key_file)
    context.set_alpn_protocols(["h2"])
    host, port = daemon.address.rsplit(":", 1)
    _reader, writer = await asyncio.wait_for(
        asyncio.open_connection(
            host, int(port), ssl=context, server_hostname=pki.node_name(daemon.node_id)
        ),
        5,
    )
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return pki.fingerprint(x509.load_der_x509_certificate(der))
