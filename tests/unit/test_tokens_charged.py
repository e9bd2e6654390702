"""An API key's tokens per minute count what its tasks produced, however they ended: an
answer (prompt and completion), a failure (the tokens its attempts streamed), a stream the
client cut (the tokens sent so far), a cancelled call; an answer repeated from the ledger costs
nothing. Over a dispatcher with fake nodes (no Ray, no sockets)."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from fastapi.testclient import TestClient

from edgemesh.v1 import mesh_pb2
from mesh.cluster.keys import KeyStore
from mesh.coordinator.access import AccessControl, LocalLimits
from mesh.coordinator.dispatch import Dispatcher
from mesh.coordinator.openai_api import build_openai_app
from mesh.coordinator.service import MeshHandlers, MeshServicer
from mesh.coordinator.settings import DispatcherSettings
from mesh.coordinator.tasks import TaskState
from mesh.core.caller import Caller
from tests.asgi_calls import call_until
from tests.coordinator_fakes import ANSWER, Fail, FakeMesh, Reply, unavailable, view
from tests.unit.test_ingress_keys import Aborted, FastPathContext

pytestmark = pytest.mark.unit

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
WORDS = len(ANSWER.split(" "))  # the fake model's tokens: one per word
PROMPT = 5  # the prompt tokens a fake node reports with its answer
METERED = Caller(key_name="metered")


class CountedLimits(LocalLimits):
    """The limits of one dispatcher, noting every charge."""

    def __init__(self) -> None:
        super().__init__()
        self.spent: list[tuple[str, int]] = []

    def spend(self, key: str, tokens: int) -> None:
        self.spent.append((key, tokens))
        super().spend(key, tokens)


class Metered:
    """A key with a tpm limit (never reached here), a dispatcher over one fake node that
    follows `behaviours`, and the charges made."""

    def __init__(self, directory, *behaviours: object, failover: bool = True) -> None:
        store = KeyStore(directory)
        self.secret = store.create("metered", tpm=1_000_000)[1]
        self.limits = CountedLimits()
        self.access = AccessControl.for_cluster_dir(store.directory, self.limits)
        self.fakes = FakeMesh()
        self.fakes.script("a", *behaviours)
        self.dispatcher = Dispatcher(
            DispatcherSettings(queue_timeout_s=0, node_wait_s=0, failover=failover, cooldown_s=0),
            connect=self.fakes.connect,
        )
        self.dispatcher.update_nodes([view("a")])

    @property
    def header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret}"}

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.secret}"),)

    def servicer(self) -> MeshServicer:
        return MeshServicer(MeshHandlers(self.dispatcher, access=self.access))

    def states(self) -> list[TaskState]:
        return [
            self.dispatcher.ledger.record(task_id).state
            for task_id in {event[2] for event in self.fakes.calls.events}
        ]


def run(coro, timeout=10):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def _content_events(chunks: list[bytes]) -> int:
    """Server-sent events of a chat stream that carry answer text."""
    events = b"".join(chunks).decode().split("\n\n")
    return sum('"content": "' in e and '"content": ""' not in e for e in events)


# ---------------------------------------------------------------------- answers


def test_an_answer_charges_its_prompt_and_completion_tokens(tmp_path):
    metered = Metered(tmp_path)
    with TestClient(build_openai_app(metered.dispatcher, access=metered.access)) as client:
        reply = client.post("/v1/chat/completions", json=CHAT, headers=metered.header)
        assert reply.status_code == 200
        assert reply.json()["usage"]["total_tokens"] == PROMPT + WORDS
        once = {**metered.header, "Idempotency-Key": "k"}
        first = client.post("/v1/chat/completions", json=CHAT, headers=once)
        repeat = client.post("/v1/chat/completions", json=CHAT, headers=once)
        assert first.json()["id"] == repeat.json()["id"]
    # The repeat was answered from the ledger: no node produced anything for it.
    assert metered.limits.spent == [("metered", PROMPT + WORDS)] * 2


# ---------------------------------------------------------------------- cut short


def test_http_a_stream_the_client_cuts_charges_the_tokens_streamed_so_far(tmp_path):
    metered = Metered(tmp_path, Reply(delay_s=0.05))
    app = build_openai_app(metered.dispatcher, access=metered.access)
    body = json.dumps({**CHAT, "stream": True}).encode()

    async def scenario():
        status, chunks = await call_until(
            app,
            "POST",
            "/v1/chat/completions",
            headers=metered.header,
            body=body,
            enough=lambda chunks: _content_events(chunks) >= 3,
        )
        await metered.dispatcher.close()
        return status, chunks

    status, chunks = run(scenario())
    assert status == 200 and b"[DONE]" not in b"".join(chunks)  # cut before the end
    [(key, tokens)] = metered.limits.spent
    assert key == "metered" and 3 <= tokens < WORDS  # what was streamed; no prompt reported


def test_grpc_a_stream_the_client_cuts_charges_the_tokens_streamed_so_far(tmp_path):
    metered = Metered(tmp_path, Reply(delay_s=0.05))

    async def scenario():
        request = mesh_pb2.SubmitRequest(model="m", prompt="hi")
        received: list[mesh_pb2.SubmitChunk] = []

        async def call() -> None:
            context = FastPathContext(metered.metadata)
            async for chunk in metered.servicer().SubmitStream(request, context):
                received.append(chunk)

        calling = asyncio.create_task(call())
        async with asyncio.timeout(5):
            while len(received) < 3:
                await asyncio.sleep(0.01)
        calling.cancel()  # the client cancelled: grpc.aio cancels the servicer's task
        with pytest.raises(asyncio.CancelledError):
            await calling
        states = metered.states()
        await metered.dispatcher.close()
        return received, states

    received, states = run(scenario())
    assert all(chunk.text for chunk in received) and states == [TaskState.FAILED]
    [(key, tokens)] = metered.limits.spent
    assert key == "metered" and 3 <= tokens < WORDS


def test_a_cancelled_unary_call_charges_what_its_node_produced(tmp_path):
    metered = Metered(tmp_path, Reply(delay_s=0.05))

    async def scenario():
        request = mesh_pb2.SubmitRequest(model="m", prompt="hi")
        call = asyncio.create_task(
            metered.servicer().Submit(request, FastPathContext(metered.metadata))
        )
        async with asyncio.timeout(5):
            while _tokens_so_far(metered) < 3:
                await asyncio.sleep(0.01)
        call.cancel()  # the caller went away (grpc.aio cancels the servicer's task)
        with pytest.raises(asyncio.CancelledError):
            await call
        await metered.dispatcher.close()

    run(scenario())
    [(key, tokens)] = metered.limits.spent
    assert key == "metered" and 3 <= tokens < WORDS


def _running(metered: Metered) -> set[str]:
    return {event[2] for event in metered.fakes.calls.events}


def _tokens_so_far(metered: Metered) -> int:
    """Tokens the running attempts have produced (what DescribeTask shows)."""
    total = 0
    for task_id in _running(metered):
        entry = metered.dispatcher.ledger.entry(task_id)
        if entry is not None and entry.current is not None:
            total += entry.current[3]
    return total


# ---------------------------------------------------------------------- failures


def test_a_failed_task_charges_the_tokens_its_attempts_produced(tmp_path):
    broken = Fail(unavailable(), after_pieces=4)
    metered = Metered(tmp_path, broken, broken, broken, failover=False)
    with TestClient(build_openai_app(metered.dispatcher, access=metered.access)) as client:
        reply = client.post("/v1/chat/completions", json=CHAT, headers=metered.header)
        assert reply.status_code == 503, reply.text

    async def grpc_calls():
        servicer = metered.servicer()
        request = mesh_pb2.SubmitRequest(model="m", prompt="hi")
        try:
            await servicer.Submit(request, FastPathContext(metered.metadata))
        except Aborted as aborted:
            unary = aborted.status
        try:
            [c async for c in servicer.SubmitStream(request, FastPathContext(metered.metadata))]
        except Aborted as aborted:
            streamed = aborted.status
        states = metered.states()
        await metered.dispatcher.close()
        return unary, streamed, states

    unary, streamed, states = run(grpc_calls())
    assert unary.code is streamed.code is grpc.StatusCode.UNAVAILABLE
    assert states == [TaskState.FAILED] * 3
    assert metered.limits.spent == [("metered", 4)] * 3  # HTTP, gRPC unary, gRPC stream
