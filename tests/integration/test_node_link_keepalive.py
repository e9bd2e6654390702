"""The coordinator's link to a node pings often (so a silent link fails fast, see
mesh.core.channels.NODE_LINK_OPTIONS), and the node's server accepts those pings: a unary call
that runs for several seconds with no data on the wire is answered, never cut by GOAWAY."""

from __future__ import annotations

import asyncio
import io

import grpc
import pytest

from edgemesh.v1 import node_pb2_grpc
from mesh.client import build_generate_request
from mesh.coordinator.pool import GrpcNodeLink
from mesh.core.channels import NODE_LINK_OPTIONS, create_channel
from mesh.core.errors import UnavailableError
from mesh.core.grpc_status import from_grpc_error
from nodes.config import NodeConfig
from nodes.daemon import NodeDaemon
from tests.fakes import FakeBackend

pytestmark = pytest.mark.integration

REPLY = " ".join(f"w{i}" for i in range(30))  # 30 words at 0.2 s: 6 s of silence on the link


def run(coro, timeout=60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_a_long_silent_unary_call_on_a_node_link_is_answered(tmp_path):
    async def scenario():
        config = NodeConfig(host="127.0.0.1", port=0, advertise=False, state_dir=str(tmp_path))
        backend = FakeBackend("smollm2", reply=REPLY, delay_s=0.2)
        daemon = NodeDaemon(config, backends={"smollm2": backend}, progress=io.StringIO())
        await daemon.start()
        link = GrpcNodeLink(daemon.address)
        try:
            reply = await link.generate_request(build_generate_request("x"), timeout_s=30)
            assert reply.text == REPLY
        finally:
            await link.close()
            await daemon.stop()

    run(scenario())


def test_a_server_with_grpcs_default_ping_policy_would_cut_that_call(tmp_path):
    """The other side of the test above: without the node's ping policy, the same link's pings
    get the call cut with GOAWAY too_many_pings."""

    async def scenario():
        config = NodeConfig(host="127.0.0.1", port=0, advertise=False, state_dir=str(tmp_path))
        backend = FakeBackend("smollm2", reply=REPLY, delay_s=0.2)
        daemon = NodeDaemon(config, backends={"smollm2": backend}, progress=io.StringIO())
        server = grpc.aio.server()  # gRPC's defaults: pings at most every 5 min without data
        await daemon.start()
        assert daemon.servicer is not None
        node_pb2_grpc.add_NodeServiceServicer_to_server(daemon.servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = create_channel(f"127.0.0.1:{port}", options=NODE_LINK_OPTIONS)
        try:
            stub = node_pb2_grpc.NodeServiceStub(channel)
            with pytest.raises(grpc.RpcError) as raised:
                await stub.Generate(build_generate_request("x"), timeout=30)
            error = from_grpc_error(raised.value)
            assert isinstance(error, UnavailableError) and "too many pings" in str(error).lower()
        finally:
            await channel.close()
            await server.stop(0)
            await daemon.stop()

    run(scenario())
