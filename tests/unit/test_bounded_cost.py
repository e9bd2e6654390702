"""Every request has a bounded cost (issue 10, items 3-6), without a socket or a model.

Message counts and sizes are refused before any rendering or tokenizing, at the node and at the
coordinator's edge; caller-chosen ids are bounded; a request over a server's receive limit, a
request that does not decode and deeply nested JSON are the caller's error (INVALID_ARGUMENT,
never UNKNOWN or overload), tried once and never a node's fault.
"""

from __future__ import annotations

import asyncio
import json
import threading

import grpc
import pytest
from fastapi.testclient import TestClient

from edgemesh.v1 import mesh_pb2, node_pb2
from mesh.coordinator import runner
from mesh.coordinator.attempts import classify
from mesh.coordinator.dispatch import Dispatcher
from mesh.coordinator.openai_api import build_openai_app
from mesh.coordinator.service import MeshHandlers, task_from_submit
from mesh.coordinator.settings import CoordinatorConfig, DispatcherSettings
from mesh.coordinator.tasks import AttemptOutcome, build_task, caller_error
from mesh.core import bounds
from mesh.core.decoding import Undecodable, tolerant
from mesh.core.errors import InvalidRequestError, NotFoundError, OverloadedError
from mesh.core.grpc_status import from_grpc_error, grpc_status_for
from nodes.agents.host import MAX_STEP_JSON_DEPTH, task_from_request
from nodes.backends import GenerationInput, Message
from nodes.backends.llama import LlamaBackend
from nodes.backends.llama_interrupt import StopFlag, interruptible
from nodes.config import TENSOR_REQUEST_BYTES, NodeConfig
from nodes.service import to_generation_input
from tests.coordinator_fakes import Fail, FakeMesh, view
from tests.fakes import FakeBackend

pytestmark = pytest.mark.unit

TOO_LARGE = "SERVER: Received message larger than max (15000005 vs. 212992)"


def run(coro, timeout=10):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def ready_backends():
    backend = FakeBackend("smollm2")
    run(backend.load())
    return {"smollm2": backend}


def empty_messages(count: int, last: str = "hi") -> list[node_pb2.ChatMessage]:
    """`count` empty user messages and one that says something (so the prompt is not empty)."""
    return [node_pb2.ChatMessage(role="user") for _ in range(count)] + [
        node_pb2.ChatMessage(role="user", content=last)
    ]


def wire_error(code: grpc.StatusCode, message: str) -> grpc.aio.AioRpcError:
    """What a grpc.aio client raises for a status without the project's ErrorDetail."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=message)


# ---------------------------------------------------------------------- item 3: the node


def test_a_node_refuses_many_empty_messages_by_count_before_reading_them():
    request = node_pb2.GenerateRequest(messages=empty_messages(100_000))
    with pytest.raises(InvalidRequestError, match="100001 messages, over this node's limit of 256"):
        to_generation_input(request, NodeConfig(), ready_backends())
    at_limit = node_pb2.GenerateRequest(messages=empty_messages(255))
    _backend, generation = to_generation_input(at_limit, NodeConfig(), ready_backends())
    assert len(generation.messages) == 256


def test_an_agent_request_with_too_long_a_history_is_refused_by_count():
    request = node_pb2.AgentRequest(
        agent="scheduling", input="book me", history=empty_messages(999)
    )
    with pytest.raises(InvalidRequestError, match="1000 messages, over this node's limit of 256"):
        task_from_request(request, 64 * 1024, 256)


class RecordingLlama:
    """Just enough of llama_cpp.Llama to see whether a prompt reached the tokenizer."""

    def __init__(self) -> None:
        self.tokenized: list[bytes] = []

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        self.tokenized.append(text)
        return list(range(len(text) // 4 + 1))

    def n_ctx(self) -> int:
        return 1 << 20

    def create_completion(self, tokens, **kwargs):
        yield {"choices": [{"text": "ok", "finish_reason": "stop"}]}


def test_the_rendered_prompt_is_bounded_before_it_is_tokenized():
    backend = LlamaBackend("m", "unused.gguf", max_rendered_bytes=1_000)
    llama = RecordingLlama()
    many = GenerationInput(messages=[Message("user", "")] * 200 + [Message("user", "hi")])
    with pytest.raises(InvalidRequestError, match="rendered prompt is .* over this node's limit"):
        list(backend._generate(llama, many, threading.Event()))
    assert llama.tokenized == []
    few = GenerationInput(messages=[Message("user", "hi")])
    segments, _stops = backend.render_prompt(few)
    backend._check_rendered(segments)  # within the limit: no error


def test_a_stop_during_the_prompt_ends_the_stream_and_other_failures_still_raise():
    def aborted():
        raise RuntimeError("llama_decode returned 2")
        yield  # a generator

    stopped = StopFlag()
    stopped.set()
    assert list(interruptible(object(), aborted(), (threading.Event(), stopped))) == []
    with pytest.raises(RuntimeError, match="returned 2"):
        list(interruptible(object(), aborted(), (StopFlag(),)))
    chunks = iter([{"n": 1}, {"n": 2}])
    assert list(interruptible(object(), chunks, (StopFlag(),))) == [{"n": 1}, {"n": 2}]


# ---------------------------------------------------------------------- item 3: the coordinator


def coordinator(**settings: object) -> tuple[Dispatcher, FakeMesh]:
    mesh = FakeMesh()
    values: dict[str, object] = dict(queue_timeout_s=0, node_wait_s=0, failures_before_cooldown=1)
    values.update(settings)
    dispatcher = Dispatcher(DispatcherSettings(**values), connect=mesh.connect)
    dispatcher.update_nodes([view("a"), view("b"), view("c")])
    return dispatcher, mesh


@pytest.mark.parametrize(
    ("task", "fragment"),
    [
        (
            build_task(messages=[{"role": "user", "content": ""}] * 50_000, model="m"),
            "50000 messages, over the coordinator's limit of 256",
        ),
        (build_task("x" * 70_000, model="m"), "70000 bytes, over the coordinator's limit"),
        (build_task("hi", model="m", task_id="t" * 1_000_000), "task_id is 1000000 characters"),
        (build_task("hi", model="m", idempotency_key="k" * 1_000_000), "limit of 255"),
    ],
)
def test_the_coordinator_refuses_hostile_shapes_before_any_node_or_ledger(task, fragment):
    dispatcher, mesh = coordinator()

    async def scenario():
        with pytest.raises(InvalidRequestError, match=fragment):
            await dispatcher.submit(task)
        with pytest.raises(InvalidRequestError, match=fragment):
            async for _ in dispatcher.stream(task):
                pass
        with pytest.raises(NotFoundError):  # the ledger kept nothing of it
            await dispatcher.describe_task(task.task_id)
        await dispatcher.close()

    run(scenario())
    assert mesh.calls.events == []


def test_a_submit_with_a_huge_task_id_or_key_is_refused_naming_the_limit():
    with pytest.raises(InvalidRequestError, match="task_id is 1048576 characters.*limit of 128"):
        task_from_submit(mesh_pb2.SubmitRequest(prompt="hi", task_id="t" * (1 << 20)))
    with pytest.raises(InvalidRequestError, match="idempotency_key .* limit of 255"):
        task_from_submit(mesh_pb2.SubmitRequest(prompt="hi", idempotency_key="k" * 256))
    assert task_from_submit(mesh_pb2.SubmitRequest(prompt="hi", task_id="t" * 128)).caller_task_id


# ---------------------------------------------------------------------- item 6: statuses


def test_grpcs_refusal_of_an_oversized_request_is_the_callers_error_not_overload():
    refused = from_grpc_error(wire_error(grpc.StatusCode.RESOURCE_EXHAUSTED, TOO_LARGE))
    assert isinstance(refused, InvalidRequestError) and "15000005 vs. 212992" in str(refused)
    assert caller_error(refused) and classify(refused) == (AttemptOutcome.ERROR, False)
    # Busy servers stay busy: gRPC's concurrency limit, a full node (its detail says so), and a
    # reply over this side's own limit are not the request's size.
    for message in ("Concurrent RPC limit exceeded!", "CLIENT: Received message larger than max"):
        busy = from_grpc_error(wire_error(grpc.StatusCode.RESOURCE_EXHAUSTED, message))
        assert isinstance(busy, OverloadedError)
    full = grpc_status_for(OverloadedError("Received message larger than max, says the node"))
    error = grpc.aio.AioRpcError(
        full.code,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(*full.trailing_metadata),
        details=full.details,
    )
    assert isinstance(from_grpc_error(error), OverloadedError)


def test_the_coordinator_tries_a_request_too_large_for_a_node_once_and_cools_no_node():
    dispatcher, mesh = coordinator()
    for node in ("a", "b", "c"):
        too_large = from_grpc_error(wire_error(grpc.StatusCode.RESOURCE_EXHAUSTED, TOO_LARGE))
        mesh.script(node, default=Fail(too_large))

    async def scenario():
        task = build_task("hi", model="m")
        with pytest.raises(InvalidRequestError, match="larger than the server accepts"):
            await dispatcher.submit(task)
        record = await dispatcher.describe_task(task.task_id)
        await dispatcher.close()
        return record

    record = run(scenario())
    assert len([e for e in mesh.calls.events if e[0] == "start"]) == 1
    assert [a.outcome for a in record.attempts] == [AttemptOutcome.ERROR]
    assert not any(row.cooling_down for row in dispatcher.node_rows())


def test_a_request_that_does_not_decode_is_an_undecodable_not_an_exception():
    decode = tolerant(node_pb2.GenerateRequest.FromString, "edgemesh.v1.GenerateRequest")
    garbled = decode(b"\x12\x02\xff\xfe")  # prompt: two bytes that are not UTF-8
    assert isinstance(garbled, Undecodable) and "UTF-8" in garbled.reason
    assert "not a valid edgemesh.v1.GenerateRequest" in str(garbled.error())
    assert decode(node_pb2.GenerateRequest(prompt="hi").SerializeToString()).prompt == "hi"


def test_the_ingress_answers_an_undecodable_request_from_serves_proxy_as_invalid():
    dispatcher, mesh = coordinator()
    handlers = MeshHandlers(dispatcher)
    garbled = Undecodable("edgemesh.v1.SubmitRequest", "Wire format was corrupt", 3)

    async def scenario():
        with pytest.raises(InvalidRequestError, match="not a valid edgemesh.v1.SubmitRequest"):
            await handlers.submit(garbled)  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError, match="not a valid"):
            async for _ in handlers.submit_stream(garbled):  # type: ignore[arg-type]
                pass
        with pytest.raises(InvalidRequestError, match="not a valid"):
            await handlers.describe_task(garbled)  # type: ignore[arg-type]
        await dispatcher.close()

    run(scenario())
    assert mesh.calls.events == []


@pytest.mark.parametrize("field", ["arguments_json", "result_json"])
def test_deeply_nested_json_in_replayed_steps_is_invalid_argument(field):
    deep = "[" * 100_000 + "]" * 100_000  # RecursionError in json.loads
    nested = "[" * (MAX_STEP_JSON_DEPTH + 1) + "]" * (MAX_STEP_JSON_DEPTH + 1)
    kind = "tool_call" if field == "arguments_json" else "final"
    for text in (deep, nested):
        step = node_pb2.AgentStep(index=0, kind=kind, call=node_pb2.ToolCall(tool="order_status"))
        if field == "arguments_json":
            step.call.arguments_json = text
        else:
            step.result_json = text
        request = node_pb2.AgentRequest(agent="a", input="x", completed_steps=[step])
        with pytest.raises(InvalidRequestError, match=f"{field} .*deeper than 32"):
            task_from_request(request, 1 << 20)
    final = node_pb2.AgentStep(index=0, kind="final", result_json='["not", "an", "object"]')
    with pytest.raises(InvalidRequestError, match="result_json is not an object"):
        task_from_request(node_pb2.AgentRequest(agent="a", input="x", completed_steps=[final]), 99)


# ---------------------------------------------------------------------- items 4 and 5: HTTP


@pytest.fixture
def api():
    dispatcher, mesh = coordinator()
    with TestClient(build_openai_app(dispatcher)) as client:
        yield client, mesh


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_the_openai_api_bounds_keys_counts_bodies_and_nesting(api):
    client, mesh = api
    post = "/v1/chat/completions"
    reply = client.post(post, json=CHAT, headers={"Idempotency-Key": "k" * 100_000})
    assert reply.status_code == 400
    assert "Idempotency-Key header is 100000 characters" in reply.json()["error"]["message"]
    assert "limit of 255" in reply.json()["error"]["message"]
    many = {**CHAT, "messages": [{"role": "user", "content": ""}] * 1_000 + CHAT["messages"]}
    reply = client.post(post, json=many)
    assert reply.status_code == 400 and "1001 messages" in reply.json()["error"]["message"]
    huge = {**CHAT, "messages": [{"role": "user", "content": "x" * 1_000_000}]}
    reply = client.post(post, json=huge)
    assert reply.status_code == 413 and "over the limit of" in reply.json()["error"]["message"]
    nested = b'{"model": "m", "messages": [], "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    reply = client.post(post, content=nested, headers={"content-type": "application/json"})
    assert reply.status_code == 400 and "nested too deeply" in reply.json()["error"]["message"]
    reply = client.post(post, content=b'{"model": "\xff\xfe"}')
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_argument"
    assert mesh.calls.events == []
    assert client.post(post, json=CHAT, headers={"Idempotency-Key": "k" * 255}).status_code == 200


# ---------------------------------------------------------------------- item 4: limits


def test_receive_limits_follow_the_prompt_limits():
    config = NodeConfig()
    derived = 2 * 64 * 1024 + 256 * bounds.MESSAGE_OVERHEAD_BYTES + bounds.FIELDS_ALLOWANCE_BYTES
    assert config.receive_limit_bytes(tensor_models=False) == derived < 16 * 1024 * 1024 // 64
    assert config.receive_limit_bytes(tensor_models=True) == TENSOR_REQUEST_BYTES
    assert NodeConfig(max_request_bytes=8192).receive_limit_bytes(tensor_models=True) == 8192
    assert NodeConfig(max_concurrent=2, max_queued=3).rpc_limit == 2 + 3 + 64
    assert NodeConfig(max_concurrent_rpcs=7).rpc_limit == 7
    settings = DispatcherSettings()
    assert settings.receive_limit_bytes == derived
    assert CoordinatorConfig().proxy_receive_limit_bytes == 1024 * 1024  # it caps replies too
    big = CoordinatorConfig(dispatcher=DispatcherSettings(max_prompt_bytes=1024 * 1024))
    assert big.proxy_receive_limit_bytes == big.dispatcher.receive_limit_bytes > 2 * 1024 * 1024


def test_the_coordinator_sets_serves_proxy_message_limit_before_ray_starts(monkeypatch):
    environment: dict[str, str] = {}
    monkeypatch.setattr(runner.os, "environ", environment)
    runner.prepare_ray_environment(CoordinatorConfig())
    assert environment["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] == str(1024 * 1024)
    environment["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] = "12345"  # the operator's value wins
    runner.prepare_ray_environment(CoordinatorConfig())
    assert environment["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] == "12345"


def test_json_bodies_may_escape_a_whole_prompt_within_the_body_limit():
    settings = DispatcherSettings()
    prompt = "\u0001" * settings.max_prompt_bytes  # 6 bytes each in JSON
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": prompt}]})
    assert len(body) <= settings.http_body_limit_bytes
