"""The coordinator's link to a node pings often (so a silent link fails fast, see
mesh.core.channels.NODE_LINK_OPTIONS), and the node's server accepts those pings: a unary call
that runs for several seconds with no data on the wire is answered, never cut by GOAWAY. While
calls run, the link holds the node's Heartbeat stream (data for the keepalive to go by)."""

from __future__ import annotations

import asyncio
import io

import grpc
import pytest

from edgemesh.v1 import node_pb2, node_pb2_grpc
from mesh.client import build_generate_request
from mesh.coordinator.grpc_link import GrpcNodeLink
from mesh.core.channels import (
    NODE_LINK_OPTIONS,
    NODE_SERVER_OPTIONS,
    create_channel,
    create_server,
)
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


class SlowNode(node_pb2_grpc.NodeServiceServicer):
    """Generate takes `delay_s`; Heartbeat (unless `heartbeat` is off) counts what it sends."""

    def __init__(self, delay_s: float, *, heartbeat: bool = True) -> None:
        self.delay_s = delay_s
        self.beats = 0
        self.streams_open = 0
        if not heartbeat:
            self.Heartbeat = super().Heartbeat  # type: ignore[method-assign]  # UNIMPLEMENTED

    async def Generate(self, request, context):
        await asyncio.sleep(self.delay_s)
        return node_pb2.GenerateResponse(text="done")

    async def Heartbeat(self, request, context):
        self.streams_open += 1
        try:
            while True:
                self.beats += 1
                yield node_pb2.HeartbeatBeat(sequence=self.beats)
                await asyncio.sleep(request.interval_ms / 1000)
        finally:
            self.streams_open -= 1


async def _serve(servicer) -> tuple[grpc.aio.Server, str]:
    server = create_server(
        max_receive_bytes=1 << 20, max_concurrent_rpcs=64, options=NODE_SERVER_OPTIONS
    )
    node_pb2_grpc.add_NodeServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def test_a_link_holds_a_heartbeat_while_a_call_runs_and_lets_it_go_after():
    async def scenario():
        node = SlowNode(1.5)
        server, address = await _serve(node)
        link = GrpcNodeLink(address)
        try:
            reply = await link.generate_request(build_generate_request("x"), timeout_s=10)
            assert reply.text == "done"
            assert node.beats >= 4  # one every 200 ms while the call ran: data on the link
            async with asyncio.timeout(5):
                while node.streams_open:  # and none held once the link is idle
                    await asyncio.sleep(0.05)
            beats = node.beats
            await asyncio.sleep(0.6)
            assert node.beats == beats
        finally:
            await link.close()
            await server.stop(0)

    run(scenario())


def test_a_node_without_heartbeat_is_still_served():
    async def scenario():
        node = SlowNode(0.3, heartbeat=False)
        server, address = await _serve(node)
        link = GrpcNodeLink(address)
        try:
            for _ in range(2):
                reply = await link.generate_request(build_generate_request("x"), timeout_s=10)
                assert reply.text == "done"
        finally:
            await link.close()
            await server.stop(0)

    run(scenario())
