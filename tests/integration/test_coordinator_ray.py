"""The coordinator on real Ray Serve with two real nodes (bundled model, one thread each).

Ray starts once for this module (about 10 s on 2 cores) and is shut down at its end. Through
Ray Serve's gRPC proxy, through a dispatcher's direct fast path, and through the HTTP ingress
and the HTTP fast path with the official `openai` client.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import grpc
import httpx
import openai
import pytest
from grpc_status import rpc_status

from edgemesh.v1 import errors_pb2, mesh_pb2, mesh_pb2_grpc
from mesh.coordinator.runner import RunningCoordinator, start_coordinator, stop_coordinator
from mesh.coordinator.settings import CoordinatorConfig, DispatcherSettings
from mesh.coordinator_client import MeshClient
from mesh.core.attempts import AttemptOutcome
from mesh.core.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    NotFoundError,
    TaskFailedError,
)
from tests.mesh_processes import running_nodes

pytestmark = [pytest.mark.integration, pytest.mark.ray, pytest.mark.timeout(300)]

QUESTION = "What is the capital city of France?"
TOKENS = 12


def run(coro, timeout=60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def wait_ready_nodes(address: str, count: int, timeout_s: float = 30.0) -> list:
    async with MeshClient(address) as client:
        async with asyncio.timeout(timeout_s):
            while True:
                nodes = await client.list_nodes()
                if sum(node.state == "ready" for node in nodes) >= count:
                    return nodes
                await asyncio.sleep(0.1)


SLOW_REPLY = " ".join(f"word{i}" for i in range(40))
# One answer that takes longer than a minute: a word a second.
LONG_REPLY = " ".join(f"long{i}" for i in range(66))
BUSY = "[busy]"  # the slow nodes refuse a prompt with this as busy (bench/fake_node.py)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    directory = tmp_path_factory.mktemp("coordinator")
    with (
        running_nodes(directory, ["node-a", "node-b"]) as nodes,
        running_nodes(
            directory,
            ["slow-1", "slow-2", "slow-3"],
            fake=True,
            delay_ms=40,
            model="slow",
            reply=SLOW_REPLY,
            max_concurrent=4,
            busy_marker=BUSY,
        ) as slow,
        running_nodes(
            directory,
            ["long-1"],
            fake=True,
            delay_ms=1000,
            model="long",
            reply=LONG_REPLY,
            max_concurrent=4,
        ) as long,
    ):
        config = CoordinatorConfig(
            cluster="default",
            static_nodes=tuple(n.address for n in [*nodes, *slow, *long]),
            mdns=False,
            grpc_port=0,
            http_port=0,
            num_cpus=2,
            dispatcher=DispatcherSettings(
                policy="round_robin", attempt_timeout_s=30, deadline_s=60
            ),
        )
        try:
            running = start_coordinator(config)
            run(wait_ready_nodes(running.grpc_address, 6))
            yield running, {n.name: n for n in [*nodes, *slow, *long]}
        finally:
            stop_coordinator()


def both_paths(running: RunningCoordinator) -> list[str]:
    assert len(running.fast_paths) == 1
    return [running.grpc_address, running.fast_paths[0]]


def test_list_nodes_shows_both_ready(mesh):
    running, nodes = mesh

    async def scenario():
        for address in both_paths(running):
            async with MeshClient(address) as client:
                listed = {n.name: n for n in await client.list_nodes()}
            assert set(listed) == {"node-a", "node-b", "slow-1", "slow-2", "slow-3", "long-1"}
            assert all(n.state == "ready" and n.source == "static" for n in listed.values())
            # A node started with no flags also serves the bundled intent router.
            assert listed["node-a"].models == ["smollm2", "intent-router"]
            assert listed["slow-1"].models == ["slow"]
            assert listed["node-a"].capacity.max_concurrent == 1

    run(scenario())


def test_tasks_longer_than_a_minute_and_a_queued_burst_are_all_answered(mesh):
    """No GOAWAY (too_many_pings) from Serve's gRPC proxy: a unary task silent on the client's
    connection for over a minute, a stream as long, both on the proxy and on the fast path,
    and a burst of more tasks than the nodes run at once, sent in the middle of it."""
    running, _nodes = mesh
    words = len(LONG_REPLY.split(" "))

    async def long_unary(client: MeshClient) -> str:
        reply = await client.submit("go", model="long", deadline_s=110)
        return reply.text

    async def long_stream(client: MeshClient) -> str:
        pieces = []
        async for chunk in client.submit_stream("go", model="long", deadline_s=110):
            pieces.append(chunk.text)
        return "".join(pieces)

    async def burst(client: MeshClient) -> list[str]:
        await asyncio.sleep(45)  # when the proxy would have sent GOAWAY for 10 s pings
        tasks = [client.submit(f"b{i}", model="slow", deadline_s=50) for i in range(30)]
        return [reply.text for reply in await asyncio.gather(*tasks)]

    async def scenario():
        async with (
            MeshClient(running.grpc_address) as proxy,
            MeshClient(running.fast_paths[0]) as fast,
        ):
            return await asyncio.gather(
                long_unary(proxy), long_stream(proxy), long_unary(fast), burst(proxy)
            )

    *longs, burst_texts = run(scenario(), timeout=150)
    assert longs == [LONG_REPLY] * 3, [len(text.split(" ")) for text in longs]
    assert burst_texts == [SLOW_REPLY] * 30
    assert words > 60  # a word a second: each long task took over a minute


def test_agent_auto_works_on_nodes_started_with_no_flags(mesh):
    """The embedded default: `mesh node start` with no flags serves the intent router, so
    `--agent auto` picks the agent and the request is answered by it."""
    running, _nodes = mesh

    async def scenario():
        async with MeshClient(running.grpc_address) as client:
            return await client.submit(
                "My laptop crashes on boot",
                agent="auto",
                model="smollm2",  # the real nodes' model: the fake ones offer the agents too
                deadline_s=50,
            )

    result = run(scenario())
    assert result.agent == "technical-support"
    assert "intent-router" in result.routed_by
    assert result.node_name in {"node-a", "node-b"} and result.text


def test_unary_and_streaming_through_serve_proxy_and_fast_path(mesh):
    running, _nodes = mesh

    async def scenario():
        answers = []
        for address in both_paths(running):
            async with MeshClient(address) as client:
                reply = await client.submit(
                    QUESTION, model="smollm2", temperature=0, max_tokens=TOKENS
                )
                assert "Paris" in reply.text and reply.node_name in {"node-a", "node-b"}
                assert len(reply.attempts) == 1 and not reply.failed_over
                assert 0 < reply.usage.completion_tokens <= TOKENS
                chunks = [
                    c
                    async for c in client.submit_stream(
                        QUESTION, model="smollm2", temperature=0, max_tokens=TOKENS
                    )
                ]
                streamed = "".join(c.text for c in chunks)
                result = chunks[-1].result
                assert chunks[-1].HasField("result") and result.task_id
                assert streamed == reply.text  # temperature 0, same model on both nodes
                assert result.usage.completion_tokens == reply.usage.completion_tokens
                record = await client.describe_task(reply.task_id)
                assert record.state == "done" and record.result.text == reply.text
                answers.append(reply.text)
        assert answers[0] == answers[1]

    run(scenario())


def test_idempotency_key_answers_once(mesh):
    running, _nodes = mesh

    async def scenario():
        async with MeshClient(running.fast_paths[0]) as client:
            first, second = await asyncio.gather(
                *(
                    client.submit(
                        QUESTION,
                        model="smollm2",
                        max_tokens=TOKENS,
                        temperature=0.9,
                        idempotency_key="same-task",
                    )
                    for _ in range(2)
                )
            )
        assert first.task_id == second.task_id and first.text == second.text

    run(scenario())


def test_errors_arrive_as_mesh_errors(mesh):
    running, _nodes = mesh

    async def scenario():
        for address in both_paths(running):
            async with MeshClient(address) as client:
                with pytest.raises(NotFoundError, match="no node serves model 'gpt-9'"):
                    await client.submit(QUESTION, model="gpt-9")
                with pytest.raises(InvalidRequestError, match="empty"):
                    await client.submit("", model="smollm2")
                with pytest.raises(NotFoundError):
                    await client.describe_task("task-never-ran")
                with pytest.raises(NotFoundError, match="no node serves model 'gpt-9'"):
                    async for _chunk in client.submit_stream(QUESTION, model="gpt-9"):
                        pass

    run(scenario())


def test_a_failed_tasks_attempts_reach_the_client_through_both_paths(mesh):
    """Every slow node refuses the task as busy: the client's TaskFailedError lists the three
    nodes tried, unary and streamed, through Serve's proxy and the fast path alike; a task that
    runs out of its deadline says which attempt it was on."""
    running, _nodes = mesh
    slow_nodes = ["slow-1", "slow-2", "slow-3"]

    async def scenario():
        for address in both_paths(running):
            async with MeshClient(address) as client:
                with pytest.raises(TaskFailedError) as unary:
                    await client.submit(f"{BUSY} hi", model="slow", task_id=f"busy-{address}")
                with pytest.raises(TaskFailedError) as streamed:
                    async for _chunk in client.submit_stream(f"{BUSY} hi", model="slow"):
                        pass
                for failure in (unary, streamed):
                    assert "all 3 attempts failed" in str(failure.value)
                    assert sorted(a.node_name for a in failure.value.attempts) == slow_nodes
                    assert {a.outcome for a in failure.value.attempts} == {
                        AttemptOutcome.OVERLOADED
                    }
                assert unary.value.task_id == f"busy-{address}" and streamed.value.task_id
                with pytest.raises(DeadlineExceededError) as late:  # 20 words take 800 ms
                    await client.submit("go", model="slow", max_tokens=20, deadline_s=0.3)
                [attempt] = late.value.attempts
                assert attempt.node_name in slow_nodes
                assert attempt.outcome is AttemptOutcome.TIMEOUT

    run(scenario())


def test_a_plain_grpc_client_reads_the_error_detail_through_serves_proxy(mesh):
    """No project code on the client: the standard rich status arrives through Serve's proxy;
    a stream's last message carries the error too (the proxy sends a stream's trailer only with
    a message)."""
    running, _nodes = mesh

    def detail_of(status) -> errors_pb2.ErrorDetail:
        [packed] = [d for d in status.details if d.Is(errors_pb2.ErrorDetail.DESCRIPTOR)]
        detail = errors_pb2.ErrorDetail()
        packed.Unpack(detail)
        return detail

    async def scenario():
        async with grpc.aio.insecure_channel(running.grpc_address) as channel:
            stub = mesh_pb2_grpc.MeshServiceStub(channel)
            request = mesh_pb2.SubmitRequest(model="slow", prompt=f"{BUSY} hi", task_id="raw-1")
            unary = stub.Submit(request, timeout=30)
            with pytest.raises(grpc.aio.AioRpcError):
                await unary
            stream = stub.SubmitStream(request, timeout=30)
            chunks = []
            with pytest.raises(grpc.aio.AioRpcError):
                async for chunk in stream:
                    chunks.append(chunk)
            assert [c.HasField("error") for c in chunks] == [True]
            for call in (unary, stream):
                assert await call.code() == grpc.StatusCode.UNAVAILABLE
                detail = detail_of(await rpc_status.aio.from_call(call))
                assert detail.kind == "TaskFailedError" and detail.task_id == "raw-1"
                assert len(detail.attempts) == 3
                assert {a.outcome for a in detail.attempts} == {"overloaded"}
            assert chunks[0].error == detail

    run(scenario())


def test_serves_proxy_refuses_oversized_and_garbled_requests_as_the_callers_error(mesh):
    """The proxy actor takes messages up to the coordinator's limit (1 MiB, from the
    RAY_SERVE_GRPC_MAX_MESSAGE_SIZE the runner sets, not Serve's 2 GiB) and hands a request
    that does not decode to the ingress, which answers INVALID_ARGUMENT (gRPC's own: UNKNOWN)."""
    running, _nodes = mesh
    submit = "/edgemesh.v1.MeshService/Submit"

    async def raw(channel, method, body, stream=False):
        try:
            if stream:
                async for _ in channel.unary_stream(method)(body, timeout=30):
                    pass
            else:
                await channel.unary_unary(method)(body, timeout=30)
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details()
        return grpc.StatusCode.OK, ""

    async def scenario():
        async with grpc.aio.insecure_channel(running.grpc_address) as channel:
            big = mesh_pb2.SubmitRequest(model="slow", prompt="x" * 2_000_000)
            code, details = await raw(channel, submit, big.SerializeToString())
            assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"vs. {1024 * 1024})" in details  # the proxy's limit is ours
            for method, stream in ((submit, False), (submit + "Stream", True)):
                code, details = await raw(channel, method, b"\x12\x02\xff\xfe", stream)
                assert code is grpc.StatusCode.INVALID_ARGUMENT, details
                assert "not a valid edgemesh.v1.SubmitRequest" in details
        async with MeshClient(running.grpc_address) as client:
            with pytest.raises(InvalidRequestError, match="larger than the server accepts"):
                await client.submit("x" * 2_000_000, model="slow", timeout_s=30)
            with pytest.raises(InvalidRequestError, match="task_id is 100000 characters"):
                await client.submit("hi", model="slow", task_id="t" * 100_000, timeout_s=30)
            reply = await client.submit("hi", model="slow", timeout_s=30)
            assert reply.text == SLOW_REPLY and len(reply.attempts) == 1

    run(scenario())
    body = json.dumps({"model": "slow", "messages": [{"role": "user", "content": "hi"}]})
    request = urllib.request.Request(
        f"{running.openai_base_url}/chat/completions",
        data=body.encode(),
        headers={"Content-Type": "application/json", "Idempotency-Key": "k" * 10_000},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 400
    assert "Idempotency-Key header is 10000 characters" in refused.value.read().decode()


def test_openai_client_unary_and_streaming(mesh):
    running, _nodes = mesh
    client = openai.OpenAI(
        base_url=running.openai_base_url, api_key="unused", max_retries=0, timeout=60
    )
    listed = [m.id for m in client.models.list().data]
    models = [name for name in listed if not name.startswith("agent:")]
    assert models == ["intent-router", "long", "slow", "smollm2"]
    assert "agent:auto" in listed  # agents are listed as models too (openai_api.py)
    messages = [{"role": "user", "content": QUESTION}]
    reply = client.chat.completions.create(
        model="smollm2", messages=messages, temperature=0, max_tokens=TOKENS
    )
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert 0 < reply.usage.completion_tokens <= TOKENS
    stream = client.chat.completions.create(
        model="smollm2",
        messages=messages,
        temperature=0,
        max_tokens=TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == reply.choices[0].message.content
    assert finish in ("stop", "length") and usage.completion_tokens == reply.usage.completion_tokens
    with pytest.raises(openai.NotFoundError, match="no node serves"):
        client.chat.completions.create(model="gpt-9", messages=messages)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="smollm2", messages=messages, n=2)
    with urllib.request.urlopen(f"{running.openai_base_url}/mesh/info", timeout=10) as answer:
        assert json.load(answer)["fast_paths"]


@pytest.mark.parametrize("path", ["proxy", "fast"])
def test_stream_continues_on_another_node_when_its_node_is_killed(mesh, path):
    """A node (fake model, 40 ms per word) is `kill -9`ed mid-answer; the caller's stream goes
    on from the next word, on another node: no word repeated, none missing."""
    running, nodes = mesh
    address = running.grpc_address if path == "proxy" else running.fast_paths[0]

    async def scenario():
        task_id = f"cut-{path}"
        async with MeshClient(address) as client, MeshClient(running.fast_paths[0]) as watch:
            pieces, result, killed = [], None, None
            async for chunk in client.submit_stream(
                "go", model="slow", max_tokens=20, task_id=task_id
            ):
                if chunk.HasField("result"):
                    result = chunk.result
                    continue
                pieces.append(chunk.text)
                if killed is None and len("".join(pieces).split()) >= 3:
                    running_attempt = (await watch.describe_task(task_id)).attempts[-1]
                    killed = running_attempt.node_name
                    nodes[killed].kill_hard()
        words = SLOW_REPLY.split()[:20]
        assert "".join(pieces) == " ".join(words)
        assert result.failed_over and result.node_name != killed
        first, last = result.attempts[0], result.attempts[-1]
        assert first.node_name == killed and first.outcome == 2  # UNAVAILABLE
        assert first.completion_tokens >= 3 and last.outcome == 1
        assert first.completion_tokens + last.completion_tokens == 20
        assert result.usage.completion_tokens == 20

    run(scenario())


def test_openai_client_on_the_http_fast_path(mesh):
    """The OpenAI API served straight by the dispatcher replica (no Ray hop): the official
    client unary and streamed, and the same ledger as Serve's HTTP proxy: a task's trace and
    an idempotency key are found through either."""
    running, _nodes = mesh
    [base_url] = running.http_fast_paths
    assert base_url.startswith("http://127.0.0.1:") and base_url != running.openai_base_url
    messages = [{"role": "user", "content": QUESTION}]

    async def scenario():
        fast = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)
        proxy = openai.AsyncOpenAI(
            base_url=running.openai_base_url, api_key="unused", max_retries=0, timeout=60
        )
        async with fast, proxy, httpx.AsyncClient(timeout=30) as http:
            reply = await fast.chat.completions.create(
                model="smollm2", messages=messages, temperature=0, max_tokens=16
            )
            text = reply.choices[0].message.content
            assert "Paris" in text and 0 < reply.usage.completion_tokens <= 16
            stream = await fast.chat.completions.create(
                model="smollm2",
                messages=messages,
                temperature=0,
                max_tokens=16,
                stream=True,
                stream_options={"include_usage": True},
            )
            pieces, usage = [], None
            async for chunk in stream:
                usage = chunk.usage or usage
                pieces.extend(choice.delta.content or "" for choice in chunk.choices)
            assert "".join(pieces) == text
            assert usage.completion_tokens == reply.usage.completion_tokens

            task_id = reply.id.removeprefix("chatcmpl-")
            for base in (base_url, running.openai_base_url):
                trace = await http.get(f"{base}/mesh/traces/{task_id}")
                assert trace.status_code == 200, trace.text
                assert trace.json()["task_id"] == task_id and trace.json()["spans"]
            info = (await http.get(f"{base_url}/mesh/info")).json()
            assert info["http_fast_paths"] == [base_url]
            assert info["fast_paths"] == list(running.fast_paths)

            keyed = dict(
                model="smollm2",
                messages=messages,
                temperature=0.9,
                max_tokens=16,
                extra_headers={"Idempotency-Key": "http-fast-path-once"},
            )
            first = await fast.chat.completions.create(**keyed)
            again = await proxy.chat.completions.create(**keyed)
            assert again.id == first.id
            assert again.choices[0].message.content == first.choices[0].message.content
            with pytest.raises(openai.NotFoundError, match="no node serves"):
                await fast.chat.completions.create(model="gpt-9", messages=messages)

    run(scenario(), timeout=120)
