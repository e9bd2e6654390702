"""Every request has a bounded cost, on the wire (issue 10, items 3-6).

Real servers on 127.0.0.1 port 0: node daemons (a fake model, and the real bundled one where
prompt evaluation is what is tested), and the coordinator's fast path over an in-process
Dispatcher reaching those nodes over gRPC. Hostile requests are sent the way an attacker on the
LAN would: raw gRPC stubs with oversized, garbled or oddly shaped bodies. Each must get the
status that tells the caller to change the request, cost the node nothing it keeps, and never
be retried nor cool a node down; the node answers a normal request right after.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import time

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from edgemesh.v1 import errors_pb2, mesh_pb2, node_pb2, node_pb2_grpc
from mesh.client import NodeClient
from mesh.coordinator.dispatch import Dispatcher
from mesh.coordinator.service import MeshHandlers, start_fast_path
from mesh.coordinator.settings import DispatcherSettings
from mesh.coordinator_client import MeshClient
from mesh.core.errors import InvalidRequestError, OverloadedError
from mesh.core.ids import NodeId
from mesh.nodes_view import NodeSource, NodeState, NodeView
from nodes import service
from nodes.backends import GenerationInput, Message
from nodes.config import ModelConfig, NodeConfig
from nodes.daemon import NodeDaemon
from tests.fakes import FakeBackend
from tests.mesh_processes import running_nodes

pytestmark = pytest.mark.integration

GARBAGE = b"\xff\xff\xff\xff"  # not a protobuf message at all
BAD_UTF8 = b"\x12\x02\xff\xfe"  # field 2 (a string) holding bytes that are not UTF-8
QUESTION = "What is the capital city of France?"


def run(coro, timeout=120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@contextlib.asynccontextmanager
async def fake_node(tmp_path, name: str = "n", **config):
    settings: dict[str, object] = dict(
        host="127.0.0.1", port=0, advertise=False, state_dir=str(tmp_path / name), router=None
    )
    settings.update(config)
    backend = FakeBackend("m", reply="Paris is the capital of France.")
    daemon = NodeDaemon(NodeConfig(**settings), backends={"m": backend}, progress=io.StringIO())
    await daemon.start()
    try:
        yield daemon, backend
    finally:
        await daemon.stop()


def node_view(daemon: NodeDaemon, name: str) -> NodeView:
    return NodeView(
        node_id=NodeId(daemon.node_id),
        name=name,
        address=daemon.address,
        state=NodeState.READY,
        source=NodeSource.STATIC,
        models=("m",),
        max_concurrent=daemon.config.max_concurrent,
        max_queued=daemon.config.max_queued,
    )


async def raw_call(channel: grpc.aio.Channel, method: str, body: bytes, *, stream: bool = False):
    """Send `body` as it is to `method`; (status code, details, ErrorDetail or None)."""
    if stream:
        call = channel.unary_stream(method)(body, timeout=20)
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details(), detail_kind(error)
        return grpc.StatusCode.OK, "", None
    try:
        await channel.unary_unary(method)(body, timeout=20)
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details(), detail_kind(error)
    return grpc.StatusCode.OK, "", None


def detail_kind(error: grpc.aio.AioRpcError) -> str | None:
    status = rpc_status.from_call(error)
    for packed in status.details if status is not None else ():
        detail = errors_pb2.ErrorDetail()
        if packed.Unpack(detail):
            return detail.kind
    return None


def count_examined(monkeypatch) -> list[node_pb2.GenerateRequest]:
    """Every GenerateRequest a node (in this process) examined, refused or not."""
    examined: list[node_pb2.GenerateRequest] = []
    real = service.to_generation_input

    def counting(request, config, backends, **options):
        examined.append(request)
        return real(request, config, backends, **options)

    monkeypatch.setattr(service, "to_generation_input", counting)
    return examined


# ---------------------------------------------------------------------- item 6: undecodable


NODE_METHODS = [
    ("/edgemesh.v1.NodeService/Generate", False),
    ("/edgemesh.v1.NodeService/GenerateStream", True),
    ("/edgemesh.v1.NodeService/RunAgent", True),
    ("/edgemesh.v1.NodeService/Classify", False),
    ("/edgemesh.v1.NodeService/Describe", False),
    ("/grpc.health.v1.Health/Check", False),
]


def test_a_node_answers_garbage_and_bad_utf8_with_invalid_argument_never_unknown(tmp_path):
    async def scenario():
        async with (
            fake_node(tmp_path) as (daemon, backend),
            grpc.aio.insecure_channel(daemon.address) as channel,
        ):
            for method, stream in NODE_METHODS:
                for body in (GARBAGE, BAD_UTF8):
                    if body is BAD_UTF8 and method.endswith(("Describe", "Check")):
                        continue  # their field 2 is not a string (or does not exist)
                    code, details, kind = await raw_call(channel, method, body, stream=stream)
                    assert code is grpc.StatusCode.INVALID_ARGUMENT, (method, code, details)
                    assert "is not a valid edgemesh.v1." in details or "grpc.health" in details
                    assert kind == "InvalidRequestError"
            async with NodeClient(daemon.address) as client:
                assert (await client.generate("hi", model="m", timeout_s=10)).text.startswith(
                    "Paris"
                )
            assert len(backend.requests) == 1

    run(scenario())


# ---------------------------------------------------------------------- item 4: sizes, calls


def test_a_node_refuses_a_15_mb_request_unread_at_its_derived_limit(tmp_path):
    async def scenario():
        async with (
            fake_node(tmp_path) as (daemon, backend),
            grpc.aio.insecure_channel(daemon.address) as channel,
        ):
            limit = daemon.config.receive_limit_bytes(tensor_models=False)
            body = node_pb2.GenerateRequest(prompt="x" * 15_000_000).SerializeToString()
            began = time.perf_counter()
            code, details, kind = await raw_call(channel, "/edgemesh.v1.NodeService/Generate", body)
            assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and kind is None
            assert f"larger than max ({len(body)} vs. {limit})" in details
            assert time.perf_counter() - began < 10
            async with NodeClient(daemon.address) as client:
                with pytest.raises(InvalidRequestError, match="larger than the server accepts"):
                    await client.generate("x" * 15_000_000, model="m", timeout_s=20)
                assert (await client.generate("hi", model="m", timeout_s=10)).text.startswith(
                    "Paris"
                )
            assert len(backend.requests) == 1

    run(scenario())


def test_a_node_caps_concurrent_calls_and_says_it_is_busy(tmp_path):
    async def scenario():
        async with (
            fake_node(tmp_path, max_concurrent_rpcs=3) as (daemon, _backend),
            grpc.aio.insecure_channel(daemon.address) as channel,
            NodeClient(daemon.address) as client,
        ):
            health = health_pb2_grpc.HealthStub(channel)
            watches = [health.Watch(health_pb2.HealthCheckRequest(), timeout=30) for _ in range(3)]
            for watch in watches:  # each open, answering SERVING: three calls in flight
                assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(OverloadedError):
                await client.describe(timeout_s=5)
            watches.pop().cancel()
            await asyncio.sleep(0.2)
            assert (await client.describe(timeout_s=5)).node.node_id == daemon.node_id
            for watch in watches:
                watch.cancel()

    run(scenario())


def test_40_concurrent_15_mb_requests_do_not_grow_a_node(tmp_path):
    async def scenario(address: str, process: psutil.Process) -> tuple[int, float]:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = node_pb2_grpc.NodeServiceStub(channel)
            await stub.Describe(node_pb2.DescribeRequest(), timeout=10)
            before = process.memory_info().rss
            body = node_pb2.GenerateRequest(prompt="x" * 15_000_000).SerializeToString()
            generate = channel.unary_unary("/edgemesh.v1.NodeService/Generate")

            async def one() -> grpc.StatusCode:
                try:
                    await generate(body, timeout=60)
                except grpc.aio.AioRpcError as error:
                    return error.code()
                return grpc.StatusCode.OK

            codes = await asyncio.gather(*(one() for _ in range(40)))
            assert set(codes) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            began = time.perf_counter()
            await stub.Describe(node_pb2.DescribeRequest(), timeout=10)
            return process.memory_info().rss - before, time.perf_counter() - began

    with running_nodes(tmp_path, ["flooded"], fake=True) as [node]:
        growth, next_s = run(scenario(node.address, psutil.Process(node.process.pid)))
    assert growth < 50e6, f"the node grew by {growth / 1e6:.0f} MB"
    assert next_s < 5


# ---------------------------------------------------------------------- items 3 and 6: coordinator


@contextlib.asynccontextmanager
async def coordinated(tmp_path, *, node_config: dict | None = None, **settings):
    """Two fake nodes, a Dispatcher reaching them over gRPC, and its fast path."""
    values: dict[str, object] = dict(
        policy="round_robin", queue_timeout_s=0, node_wait_s=0, failures_before_cooldown=1
    )
    values.update(settings)
    async with (
        fake_node(tmp_path, "a", **(node_config or {})) as (a, backend_a),
        fake_node(tmp_path, "b", **(node_config or {})) as (b, backend_b),
    ):
        dispatcher = Dispatcher(DispatcherSettings(**values))
        dispatcher.update_nodes([node_view(a, "a"), node_view(b, "b")])
        server, port = await start_fast_path(MeshHandlers(dispatcher), "127.0.0.1:0")
        try:
            yield dispatcher, f"127.0.0.1:{port}", (backend_a, backend_b)
        finally:
            await server.stop(1.0)
            await dispatcher.close()


def test_a_task_too_large_for_the_nodes_is_tried_once_and_cools_no_node(tmp_path, monkeypatch):
    """The coordinator allows 1 MiB prompts, the nodes 4 KiB: gRPC refuses the request at the
    first node (RESOURCE_EXHAUSTED, like a full node), which is the request's fault."""
    examined = count_examined(monkeypatch)

    async def scenario():
        async with (
            coordinated(
                tmp_path, node_config={"max_prompt_bytes": 4096}, max_prompt_bytes=1 << 20
            ) as (dispatcher, address, backends),
            MeshClient(address) as client,
        ):
            with pytest.raises(InvalidRequestError, match="larger than the server accepts"):
                await client.submit("x" * 500_000, model="m", task_id="t-big", timeout_s=20)
            record = await client.describe_task("t-big")
            assert [a.outcome for a in record.attempts] == [mesh_pb2.ATTEMPT_OUTCOME_ERROR]
            assert not any(row.cooling_down for row in dispatcher.node_rows())
            assert (await client.submit("hi", model="m", timeout_s=10)).text.startswith("Paris")
            return [len(b.requests) for b in backends]

    assert sorted(run(scenario())) == [0, 1]
    assert len(examined) == 1  # only the normal task: the big one never reached a servicer


def test_a_task_over_a_nodes_message_count_is_tried_once_with_invalid_argument(
    tmp_path, monkeypatch
):
    examined = count_examined(monkeypatch)
    messages = [{"role": "user", "content": ""}] * 999 + [{"role": "user", "content": "hi"}]

    async def scenario():
        async with (
            coordinated(tmp_path, max_messages=10_000) as (dispatcher, address, backends),
            MeshClient(address) as client,
        ):
            with pytest.raises(InvalidRequestError, match="1000 messages, over this node's limit"):
                await client.submit(messages=messages, model="m", task_id="t-many", timeout_s=20)
            record = await client.describe_task("t-many")
            assert len(record.attempts) == 1
            assert not any(row.cooling_down for row in dispatcher.node_rows())
            return [len(b.requests) for b in backends]

    assert run(scenario()) == [0, 0]
    assert len(examined) == 1  # one node looked at it once, refused it by count


def test_the_fast_path_refuses_hostile_submits_before_any_node(tmp_path, monkeypatch):
    examined = count_examined(monkeypatch)

    async def scenario():
        async with (
            coordinated(tmp_path) as (dispatcher, address, backends),
            grpc.aio.insecure_channel(address) as channel,
            MeshClient(address) as client,
        ):
            submit, stream = (
                "/edgemesh.v1.MeshService/Submit",
                "/edgemesh.v1.MeshService/SubmitStream",
            )
            for method, streamed in ((submit, False), (stream, True)):
                for body in (GARBAGE, BAD_UTF8):
                    code, details, kind = await raw_call(channel, method, body, stream=streamed)
                    assert code is grpc.StatusCode.INVALID_ARGUMENT, (method, details)
                    assert "not a valid edgemesh.v1.SubmitRequest" in details
            code, details, _ = await raw_call(
                channel, "/edgemesh.v1.MeshService/DescribeTask", GARBAGE
            )
            assert code is grpc.StatusCode.INVALID_ARGUMENT
            huge = mesh_pb2.SubmitRequest(model="m", prompt="x" * 15_000_000).SerializeToString()
            code, details, _ = await raw_call(channel, submit, huge)
            assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details
            with pytest.raises(InvalidRequestError, match="larger than the server accepts"):
                await client.submit("x" * 15_000_000, model="m", timeout_s=20)
            # Within the receive limit but not the prompt limits: refused by what they say.
            cases = [
                (dict(messages=[{"role": "user", "content": ""}] * 20_000), "20000 messages"),
                (dict(prompt="hi", task_id="t" * 100_000), "task_id is 100000 characters"),
                (dict(prompt="hi", idempotency_key="k" * 100_000), "limit of 255"),
                (dict(prompt="x" * 100_000), "100000 bytes, over the coordinator's limit"),
            ]
            for fields, fragment in cases:
                with pytest.raises(InvalidRequestError, match=fragment):
                    await client.submit(model="m", timeout_s=20, **fields)
                with pytest.raises(InvalidRequestError, match=fragment):
                    async for _ in client.submit_stream(model="m", timeout_s=20, **fields):
                        pass
            with pytest.raises(InvalidRequestError, match="task_id is 1000 characters"):
                await client.describe_task("t" * 1000)
            assert (await client.submit("hi", model="m", timeout_s=10)).text.startswith("Paris")
            assert not any(row.cooling_down for row in dispatcher.node_rows())
            return [len(b.requests) for b in backends]

    assert sorted(run(scenario())) == [0, 1]
    assert len(examined) == 1


# ---------------------------------------------------------------------- item 3: the real model


def long_prompt(words: int) -> str:
    return " ".join(f"w{i % 97}" for i in range(words))


def prompt_size(backend, llama, text: str) -> int:
    """The tokens of `text` as the node's one user message (while the instance is free)."""
    segments, _ = backend.render_prompt(GenerationInput(messages=[Message("user", text)]))
    return len(backend.tokenize(llama, segments))


def test_a_long_prompt_stops_evaluating_on_cancel_and_on_shutdown(tmp_path):
    """Cancelled, and then stopped by a shutdown, while llama.cpp evaluates a long prompt: the
    evaluation ends at once (the context holds fewer tokens than the prompt), the instance is
    free, and the next request gets the answer it would have got anyway."""
    model = ModelConfig(id="smollm2", source="bundled:smollm2", n_ctx=2048, n_batch=32, n_threads=2)
    config = NodeConfig(
        host="127.0.0.1",
        port=0,
        advertise=False,
        state_dir=str(tmp_path),
        models=(model,),
        router=None,
        grace_s=0.0,
    )

    async def evaluating(backend, llama, prompt_tokens: int, at_least: int) -> None:
        """Until the instance is busy and its context holds at least `at_least` tokens (more
        than the last request left in it: this prompt is being evaluated)."""
        give_up = time.perf_counter() + 60
        while backend._free.qsize() or llama.n_tokens < at_least:
            assert time.perf_counter() < give_up, "the prompt never started evaluating"
            assert llama.n_tokens < prompt_tokens, "evaluated the whole prompt before the test"
            await asyncio.sleep(0.005)

    async def scenario():
        daemon = NodeDaemon(config, progress=io.StringIO())
        await daemon.start()
        backend = daemon.backends["smollm2"]
        llama = backend._instances[0].llama
        try:
            async with NodeClient(daemon.address) as client:
                expected = (await client.generate(QUESTION, temperature=0, max_tokens=12)).text
                prompt, other = long_prompt(550), long_prompt(550).replace("w", "v")
                prompt_tokens, other_tokens = (
                    prompt_size(backend, llama, p) for p in (prompt, other)
                )
                assert 1000 < prompt_tokens < 2000 and 1000 < other_tokens < 2000

                async def consume(text: str) -> None:
                    async for _ in client.generate_stream(text, max_tokens=4, timeout_s=120):
                        pass

                left = llama.n_tokens  # by the first request (a prefix of it may be reused)
                consumer = asyncio.create_task(consume(prompt))
                await evaluating(backend, llama, prompt_tokens, left + 64)
                consumer.cancel()
                cancelled_at = time.perf_counter()
                while backend._free.qsize() == 0:
                    await asyncio.sleep(0.005)
                freed_s = time.perf_counter() - cancelled_at
                with contextlib.suppress(asyncio.CancelledError):
                    await consumer
                assert llama.n_tokens < prompt_tokens, "the whole prompt was evaluated"
                reply = await client.generate(QUESTION, temperature=0, max_tokens=12)
                assert reply.text == expected
                # Shutdown with the other prompt in evaluation.
                left = llama.n_tokens
                consumer = asyncio.create_task(consume(other))
                await evaluating(backend, llama, other_tokens, left + 64)
                stopping_at = time.perf_counter()
                await daemon.stop()
                stopped_s = time.perf_counter() - stopping_at
                with contextlib.suppress(Exception):
                    await consumer
        finally:
            await daemon.stop()
        assert freed_s < 10, f"the instance was busy {freed_s:.1f} s after the cancel"
        assert stopped_s < 15, f"the node took {stopped_s:.1f} s to stop"
        return llama.n_tokens, other_tokens

    evaluated, prompt_tokens = run(scenario(), timeout=300)
    assert evaluated < prompt_tokens, "shutdown waited for the whole prompt"
