"""The node daemon's gRPC surface on 127.0.0.1 with a fake backend: statuses, admission, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import io

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from edgemesh.v1 import node_pb2, node_pb2_grpc
from mesh.client import NodeClient
from mesh.core.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
)
from nodes.config import NodeConfig
from nodes.daemon import NodeDaemon
from tests.fakes import FakeBackend

pytestmark = pytest.mark.integration

SLOW_REPLY = " ".join(f"word{i}" for i in range(200))


@contextlib.asynccontextmanager
async def running_node(tmp_path, backend, **config):
    settings = dict(
        host="127.0.0.1",
        port=0,
        advertise=False,
        state_dir=str(tmp_path),
        max_concurrent=1,
        max_queued=1,
        grace_s=1.0,
    )
    settings.update(config)
    daemon = NodeDaemon(
        NodeConfig(**settings), backends={"smollm2": backend}, progress=io.StringIO()
    )
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop()


def run(coro, timeout=30):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_describe_health_and_reflection(tmp_path):
    async def scenario():
        async with (
            running_node(tmp_path, FakeBackend("smollm2"), labels={"site": "lab"}) as d,
            NodeClient(d.address) as client,
        ):
            assert await client.health() == "SERVING"
            assert await client.health("edgemesh.v1.NodeService") == "SERVING"
            info = await client.describe()
            assert info.node.node_id == d.node_id and info.node.labels["site"] == "lab"
            assert info.hardware.logical_cores >= 1 and info.hardware.memory_total_bytes > 0
            assert [m.model_id for m in info.models] == ["smollm2"]
            assert info.models[0].state == node_pb2.MODEL_STATE_READY
            assert info.capacity.max_concurrent == 1
            async with grpc.aio.insecure_channel(d.address) as channel:
                stub = reflection_pb2_grpc.ServerReflectionStub(channel)
                request = reflection_pb2.ServerReflectionRequest(list_services="")
                async for reply in stub.ServerReflectionInfo(iter([request]), timeout=5):
                    names = {s.name for s in reply.list_services_response.service}
                    break
            assert {"edgemesh.v1.NodeService", "grpc.health.v1.Health"} <= names

    run(scenario())


def test_node_id_survives_restart(tmp_path):
    async def scenario():
        async with running_node(tmp_path, FakeBackend("smollm2")) as first:
            first_id = first.node_id
        async with running_node(tmp_path, FakeBackend("smollm2")) as second:
            assert second.node_id == first_id

    run(scenario())


def test_task_counts_in_describe_survive_a_restart(tmp_path):
    async def scenario():
        task = node_pb2.TaskContext(task_id="t-1")
        async with (
            running_node(tmp_path, FakeBackend("smollm2")) as first,
            NodeClient(first.address) as client,
        ):
            await client.generate("capital?", max_tokens=50, task=task)
            chunks = [c async for c in client.generate_stream("capital?", task=task)]
            assert chunks[-1].HasField("final")
            assert not (await client.describe()).task_counts  # only when asked
        async with (
            running_node(tmp_path, FakeBackend("smollm2")) as second,
            NodeClient(second.address) as client,
        ):
            reply = await client.describe(task_counts=True)
        (count,) = reply.task_counts
        assert (count.task_id, count.generations_started, count.generations_completed) == (
            "t-1",
            2,
            2,
        )
        assert reply.task_counts_evicted == 0

    run(scenario())


def test_unary_and_stream(tmp_path):
    async def scenario():
        async with (
            running_node(tmp_path, FakeBackend("smollm2")) as d,
            NodeClient(d.address) as client,
        ):
            reply = await client.generate("capital of France?", max_tokens=50)
            assert reply.text == "Paris is the capital of France."
            assert reply.usage.completion_tokens == 6 and reply.node_id == d.node_id
            chunks = [c async for c in client.generate_stream("capital?", max_tokens=50)]
            assert "".join(c.text for c in chunks) == "Paris is the capital of France."
            assert chunks[-1].HasField("final") and chunks[-1].final.finish_reason == "stop"
            assert [c.index for c in chunks] == list(range(len(chunks)))

    run(scenario())


def test_bad_requests_get_status_and_node_keeps_serving(tmp_path):
    async def scenario():
        async with (
            running_node(tmp_path, FakeBackend("smollm2")) as d,
            NodeClient(d.address) as client,
        ):
            with pytest.raises(InvalidRequestError, match="empty"):
                await client.generate("")
            with pytest.raises(InvalidRequestError, match="max_tokens"):
                await client.generate("hi", max_tokens=0)
            with pytest.raises(NotFoundError, match="not served"):
                await client.generate("hi", model="llama-70b")
            with pytest.raises(InvalidRequestError, match="temperature"):
                async for _ in client.generate_stream("hi", temperature=9):
                    pass
            reply = await client.generate("still there?")
            assert reply.text.startswith("Paris")
            async with grpc.aio.insecure_channel(d.address) as channel:
                stub = node_pb2_grpc.NodeServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as raw:
                    await stub.Generate(node_pb2.GenerateRequest(prompt=""), timeout=5)
                assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    run(scenario())


def test_over_capacity_is_resource_exhausted(tmp_path):
    async def scenario():
        backend = FakeBackend("smollm2", reply=SLOW_REPLY, delay_s=0.02)
        async with (
            running_node(tmp_path, backend, max_concurrent=1, max_queued=1) as d,
            NodeClient(d.address) as client,
        ):
            running = asyncio.create_task(client.generate("a", max_tokens=100))
            queued = asyncio.create_task(client.generate("b", max_tokens=100))
            while d.admission.in_flight + d.admission.queued < 2:
                await asyncio.sleep(0.01)
            with pytest.raises(OverloadedError, match="at capacity"):
                await client.generate("c", max_tokens=5)
            assert all(
                r.usage.completion_tokens == 100 for r in await asyncio.gather(running, queued)
            )
            info = await client.describe()
            assert info.load.rejected == 1 and info.load.completed == 2

    run(scenario())


def test_cancel_and_deadline_stop_generation_and_free_slot(tmp_path):
    async def scenario():
        backend = FakeBackend("smollm2", reply=SLOW_REPLY, delay_s=0.02)
        async with running_node(tmp_path, backend) as d, NodeClient(d.address) as client:
            seen = 0
            async for _chunk in client.generate_stream("go", max_tokens=200):
                seen += 1
                if seen == 5:
                    break  # leaving the loop cancels the call
            await asyncio.sleep(0.3)
            produced_after_cancel = backend.tokens_produced
            await asyncio.sleep(0.3)
            assert backend.tokens_produced == produced_after_cancel < 50
            assert d.admission.in_flight == 0 and backend.active == 0

            with pytest.raises(DeadlineExceededError):
                await client.generate("slow", max_tokens=200, timeout_s=0.3)
            await asyncio.sleep(0.3)
            assert d.admission.in_flight == 0 and backend.active == 0
            reply = await client.generate("fast", max_tokens=3)
            assert reply.usage.completion_tokens == 3

    run(scenario())


def test_graceful_stop_finishes_in_flight_request(tmp_path):
    async def scenario():
        backend = FakeBackend("smollm2", reply=" ".join(["w"] * 20), delay_s=0.02)
        daemon = NodeDaemon(
            NodeConfig(
                host="127.0.0.1", port=0, advertise=False, state_dir=str(tmp_path), grace_s=5.0
            ),
            backends={"smollm2": backend},
            progress=io.StringIO(),
        )
        await daemon.start()
        async with NodeClient(daemon.address) as client:
            pending = asyncio.create_task(client.generate("x", max_tokens=20))
            while backend.tokens_produced == 0:
                await asyncio.sleep(0.01)
            stopping = asyncio.create_task(daemon.stop())
            await asyncio.sleep(0.05)
            reply = await pending
            await stopping
            assert reply.usage.completion_tokens == 20

    run(scenario())


def test_a_queued_stream_says_it_waits_until_it_runs(tmp_path):
    """With report_waiting, a request queued behind another says so on arrival and then
    periodically, so a caller can tell waiting from silence; its answer is then whole."""

    async def scenario():
        backend = FakeBackend("smollm2", reply=SLOW_REPLY, delay_s=0.01)
        async with (
            running_node(tmp_path, backend, max_concurrent=1, max_queued=1) as d,
            NodeClient(d.address) as client,
        ):
            first = asyncio.create_task(
                collect_chunks(client, node_pb2.GenerateRequest(prompt="a"))
            )
            while backend.active == 0:
                await asyncio.sleep(0.01)
            request = node_pb2.GenerateRequest(
                prompt="b", report_waiting_ms=100, sampling=node_pb2.Sampling(max_tokens=5)
            )
            second = await collect_chunks(client, request)
            await first
        waiting = [c for c in second if c.waiting]
        text = [c for c in second if not c.waiting]
        assert len(waiting) >= 3  # ~1 s behind 200 words at 10 ms, reported every 0.1 s
        assert second[0].waiting and not any(c.waiting for c in second[len(waiting) :])
        assert [c.index for c in text] == list(range(len(text)))
        assert "".join(c.text for c in text) == " ".join(SLOW_REPLY.split(" ")[:5])
        assert text[-1].final.usage.completion_tokens == 5

    run(scenario())


def test_a_stream_that_does_not_ask_gets_no_waiting_chunks(tmp_path):
    async def scenario():
        backend = FakeBackend("smollm2", reply=SLOW_REPLY, delay_s=0.002)
        async with (
            running_node(tmp_path, backend, max_concurrent=1, max_queued=1) as d,
            NodeClient(d.address) as client,
        ):
            first = asyncio.create_task(
                collect_chunks(client, node_pb2.GenerateRequest(prompt="a"))
            )
            while backend.active == 0:
                await asyncio.sleep(0.01)
            second = await collect_chunks(client, node_pb2.GenerateRequest(prompt="b"))
            await first
        assert not any(c.waiting for c in second) and second[-1].HasField("final")

    run(scenario())


async def collect_chunks(client: NodeClient, request: node_pb2.GenerateRequest) -> list:
    return [chunk async for chunk in client.stream_request(request, timeout_s=20)]
