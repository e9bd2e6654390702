"""Errors on the wire: a `google.rpc.Status` whose details hold an `edgemesh.v1.ErrorDetail`,
read by a plain gRPC client (a raw stub and `grpc_status`, none of this project's client code)
and by the project's clients, which raise the same exception, attempts included.

Real grpc.aio servers on 127.0.0.1 port 0: a dispatcher's fast path (the real MeshServicer)
over fake node links that fail as scripted, and a node daemon with a fake backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import io

import grpc
import pytest
from grpc_status import rpc_status

from edgemesh.v1 import errors_pb2, mesh_pb2, mesh_pb2_grpc, node_pb2, node_pb2_grpc
from mesh.client import NodeClient
from mesh.coordinator.dispatch import Dispatcher
from mesh.coordinator.service import MeshHandlers, start_fast_path
from mesh.coordinator.settings import DispatcherSettings
from mesh.coordinator_client import MeshClient
from mesh.core.attempts import AttemptOutcome
from mesh.core.errors import DeadlineExceededError, NotFoundError, TaskFailedError, UnavailableError
from nodes.config import NodeConfig
from nodes.daemon import NodeDaemon
from tests.coordinator_fakes import Fail, FakeMesh, Hang, view
from tests.fakes import FakeBackend

pytestmark = pytest.mark.integration

NODES = ("a", "b", "c")


def run(coro, timeout=30):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@contextlib.asynccontextmanager
async def fast_path(mesh: FakeMesh, nodes=NODES, **settings):
    values = dict(policy="round_robin", cooldown_s=0, queue_timeout_s=0, node_wait_s=0)
    values.update(settings)
    dispatcher = Dispatcher(DispatcherSettings(**values), connect=mesh.connect)
    dispatcher.update_nodes([view(node) for node in nodes])
    server, port = await start_fast_path(MeshHandlers(dispatcher), "127.0.0.1:0")
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(1.0)
        await dispatcher.close()


def failing_everywhere(nodes=NODES, detail: str = "down") -> FakeMesh:
    mesh = FakeMesh()
    for node in nodes:
        mesh.script(node, default=Fail(UnavailableError(f"{node} {detail}")))
    return mesh


def error_detail(status) -> errors_pb2.ErrorDetail:
    """What a third-party client does: find the ErrorDetail among the status's details."""
    [packed] = [d for d in status.details if d.Is(errors_pb2.ErrorDetail.DESCRIPTOR)]
    detail = errors_pb2.ErrorDetail()
    packed.Unpack(detail)
    return detail


def test_a_plain_grpc_client_reads_which_nodes_a_failed_task_tried():
    async def scenario():
        async with (
            fast_path(failing_everywhere()) as address,
            grpc.aio.insecure_channel(address) as channel,
        ):
            stub = mesh_pb2_grpc.MeshServiceStub(channel)
            request = mesh_pb2.SubmitRequest(task_id="t-plain", model="m", prompt="hi")
            unary = stub.Submit(request, timeout=10)
            with pytest.raises(grpc.aio.AioRpcError):
                await unary
            stream = stub.SubmitStream(request, timeout=10)
            with pytest.raises(grpc.aio.AioRpcError):
                [chunk async for chunk in stream]
            for call in (unary, stream):
                status = await rpc_status.aio.from_call(call)  # checks code and message agree
                assert await call.code() == grpc.StatusCode.UNAVAILABLE
                assert "all 3 attempts failed" in status.message
                detail = error_detail(status)
                assert detail.kind == "TaskFailedError" and detail.task_id == "t-plain"
                assert sorted(a.node_name for a in detail.attempts) == [
                    "name-a",
                    "name-b",
                    "name-c",
                ]
                assert all(a.outcome == "unavailable" for a in detail.attempts)
                assert all(a.detail.endswith(" down") for a in detail.attempts)

    run(scenario())


def test_mesh_client_raises_task_failed_with_its_attempts():
    async def scenario():
        async with fast_path(failing_everywhere()) as address, MeshClient(address) as client:
            with pytest.raises(TaskFailedError) as unary:
                await client.submit("hi", model="m", task_id="t-unary")
            with pytest.raises(TaskFailedError) as streamed:
                async for _chunk in client.submit_stream("hi", model="m", task_id="t-stream"):
                    pass
        for failure, task_id in ((unary, "t-unary"), (streamed, "t-stream")):
            error = failure.value
            assert error.task_id == task_id and "all 3 attempts failed" in str(error)
            assert sorted(a.node_id for a in error.attempts) == ["a", "b", "c"]
            assert {a.outcome for a in error.attempts} == {AttemptOutcome.UNAVAILABLE}

    run(scenario())


def test_mesh_client_raises_deadline_exceeded_with_the_attempt_that_ran_out():
    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", default=Hang())
        async with fast_path(mesh, nodes=("a",)) as address, MeshClient(address) as client:
            with pytest.raises(DeadlineExceededError) as failed:
                await client.submit("hi", model="m", deadline_s=0.3)
        [attempt] = failed.value.attempts
        assert attempt.node_name == "name-a" and attempt.outcome is AttemptOutcome.TIMEOUT
        assert attempt.duration_ms >= 250 and failed.value.task_id.startswith("task-")

    run(scenario())


def test_the_most_attempts_with_long_details_still_fit_a_trailer():
    """20 attempts whose failures say 300 characters each: the call still ends with its status
    (grpc refuses trailers over 8 KiB), the latest attempts kept, their texts shortened."""
    nodes = tuple(f"n{i:02}" for i in range(20))

    async def scenario():
        mesh = failing_everywhere(nodes, detail="x" * 300)
        async with (
            fast_path(mesh, nodes=nodes, max_attempts=20) as address,
            MeshClient(address) as client,
        ):
            with pytest.raises(TaskFailedError) as failed:
                await client.submit("hi", model="m")
        error = failed.value
        kept, omitted = len(error.attempts), error.fields.get("omitted_attempts", 0)
        assert kept + omitted == 20 and kept >= 10
        assert "all 20 attempts failed" in str(error) and str(error).endswith("[...]")
        assert all(len(a.detail) <= 80 for a in error.attempts)

    run(scenario())


@contextlib.asynccontextmanager
async def running_node(tmp_path):
    config = NodeConfig(
        host="127.0.0.1", port=0, advertise=False, state_dir=str(tmp_path), grace_s=1.0
    )
    daemon = NodeDaemon(
        config, backends={"smollm2": FakeBackend("smollm2")}, progress=io.StringIO()
    )
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop()


def test_a_node_error_carries_its_kind_to_a_plain_client_and_to_node_client(tmp_path):
    async def scenario():
        async with running_node(tmp_path) as node:
            async with grpc.aio.insecure_channel(node.address) as channel:
                stub = node_pb2_grpc.NodeServiceStub(channel)
                call = stub.Generate(
                    node_pb2.GenerateRequest(model="gpt-9", prompt="hi"), timeout=10
                )
                with pytest.raises(grpc.aio.AioRpcError):
                    await call
                status = await rpc_status.aio.from_call(call)
                assert await call.code() == grpc.StatusCode.NOT_FOUND
                assert error_detail(status).kind == "NotFoundError"
            async with NodeClient(node.address) as client:
                with pytest.raises(NotFoundError, match="'gpt-9' is not served"):
                    await client.generate("hi", model="gpt-9")

    run(scenario())
