"""Fakes for the coordinator's tests: node links that implement `NodeLink`, and a manual clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from edgemesh.v1 import node_pb2
from mesh.coordinator.shared_tasks import Claim, Outcome, TaskDirectory
from mesh.coordinator.tasks import TaskRecord
from mesh.core.errors import MeshError
from mesh.core.ids import NodeId, TaskId
from mesh.core.tracing import OUTGOING_TRACEPARENT
from mesh.nodes_view import NodeSource, NodeState, NodeView

ANSWER = "Paris is the capital of France and a city of art."


class ManualClock:
    """Monotonic seconds that move only when a test (or a fake node) says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def view(
    node_id: str,
    *,
    state: NodeState = NodeState.READY,
    models: tuple[str, ...] = ("m",),
    max_concurrent: int = 4,
    max_queued: int = 4,
    **extra: object,
) -> NodeView:
    return NodeView(
        node_id=NodeId(node_id),
        name=f"name-{node_id}",
        address=f"{node_id}:1",
        state=state,
        source=NodeSource.STATIC,
        models=models,
        max_concurrent=max_concurrent,
        max_queued=max_queued,
        **extra,
    )


@dataclass
class Reply:
    """Answer (the rest of) `text`, one word per chunk."""

    text: str = ANSWER
    delay_s: float = 0.0


@dataclass
class Fail:
    """Stream `after_pieces` words of the answer, then raise `error`."""

    error: Exception
    after_pieces: int = 0
    advance_clock_s: float = 0.0


@dataclass
class Hang:
    """Never answer (until cancelled)."""


@dataclass
class Queued:
    """Wait `wait_s` in the node's queue (saying so every `report_s` when the request asks for
    it, as a real node does), then answer like `Reply`."""

    wait_s: float
    report_s: float = 0.02
    text: str = ANSWER


@dataclass
class Calls:
    """Everything every fake saw, in order: ("start"|"end", node, task_id) events."""

    events: list[tuple[str, str, str]] = field(default_factory=list)
    running: dict[str, int] = field(default_factory=dict)  # task id -> attempts running now
    most_at_once: int = 0


def words_after(text: str, continuation: str) -> list[str]:
    """The pieces a deterministic model emits after `continuation` (a prefix of `text`)."""
    pieces = [word if i == 0 else " " + word for i, word in enumerate(text.split(" "))]
    done = ""
    while pieces and continuation.startswith(done + pieces[0]) and len(done) < len(continuation):
        done += pieces.pop(0)
    assert done == continuation, f"continuation {continuation!r} is not a prefix at a word edge"
    return pieces


def word_ids(start: int, end: int) -> list[int]:
    """The fake model's token ids of words start..end-1 of an answer (one token per word)."""
    return [1000 + position for position in range(start, end)]


class FakeLink:
    """A node that follows a script of behaviours, one per call, then `default`."""

    def __init__(
        self,
        node_id: str,
        calls: Calls,
        script: list[object] | None = None,
        *,
        clock: ManualClock | None = None,
        default: object | None = None,
    ) -> None:
        self.node_id = node_id
        self.calls = calls
        self.script = list(script or [])
        self.clock = clock
        self.default = default or Reply()
        self.requests: list[node_pb2.GenerateRequest] = []
        self.closed = False
        self.token_ids = True  # chunks carry their token ids (one per word), as a real node's
        self.traceparents: list[str] = []  # what each call would send in its metadata

    def _next(self) -> object:
        return self.script.pop(0) if self.script else self.default

    def _start(self, request: node_pb2.GenerateRequest) -> str:
        self.requests.append(request)
        self.traceparents.append(OUTGOING_TRACEPARENT.get())
        task_id = request.task.task_id
        self.calls.events.append(("start", self.node_id, task_id))
        self.calls.running[task_id] = self.calls.running.get(task_id, 0) + 1
        self.calls.most_at_once = max(self.calls.most_at_once, self.calls.running[task_id])
        return task_id

    def _end(self, task_id: str) -> None:
        self.calls.running[task_id] -= 1
        self.calls.events.append(("end", self.node_id, task_id))

    async def _pieces(self, request: node_pb2.GenerateRequest) -> AsyncIterator[str]:
        behaviour = self._next()
        if isinstance(behaviour, Hang):
            await asyncio.sleep(3600)
        text = behaviour.text if isinstance(behaviour, Reply) else ANSWER
        pieces = words_after(text, request.continuation)
        if request.continuation_token_ids:  # the ids of the words sent so far, in order
            sent = len(text.split(" ")) - len(pieces)
            assert list(request.continuation_token_ids) == word_ids(0, sent)
        if request.sampling.HasField("max_tokens"):
            pieces = pieces[: request.sampling.max_tokens]
        if isinstance(behaviour, Fail):
            for piece in pieces[: behaviour.after_pieces]:
                yield piece
            if self.clock is not None:
                self.clock.advance(behaviour.advance_clock_s)
            raise behaviour.error
        for piece in pieces:
            if isinstance(behaviour, Reply) and behaviour.delay_s:
                await asyncio.sleep(behaviour.delay_s)
            yield piece

    def _final(self, request: node_pb2.GenerateRequest, tokens: int) -> node_pb2.GenerateResponse:
        return node_pb2.GenerateResponse(
            finish_reason="stop",
            model=request.model or "m",
            node_id=self.node_id,
            usage=node_pb2.Usage(
                prompt_tokens=5, completion_tokens=tokens, total_tokens=5 + tokens
            ),
            timing=node_pb2.Timing(time_to_first_token_ms=1.0, total_ms=2.0),
        )

    async def generate_request(
        self, request: node_pb2.GenerateRequest, *, timeout_s: float | None = None
    ) -> node_pb2.GenerateResponse:
        task_id = self._start(request)
        try:
            pieces = [piece async for piece in self._pieces(request)]
            reply = self._final(request, len(pieces))
            reply.text = "".join(pieces)
            return reply
        finally:
            self._end(task_id)

    async def stream_request(
        self, request: node_pb2.GenerateRequest, *, timeout_s: float | None = None
    ) -> AsyncIterator[node_pb2.GenerateChunk]:
        if self.script and isinstance(self.script[0], Queued):
            queued = self.script[0]
            self.script[0] = Reply(queued.text)
            loop = asyncio.get_running_loop()
            until = loop.time() + queued.wait_s
            while loop.time() < until:
                if request.report_waiting_ms:
                    yield node_pb2.GenerateChunk(waiting=True)
                await asyncio.sleep(queued.report_s)
        task_id = self._start(request)
        try:
            index = 0
            first = len(request.continuation.split(" ")) if request.continuation else 0
            # Like a real node: ids where the answer goes on token for token (not from text).
            exact = self.token_ids and (
                not request.continuation or bool(request.continuation_token_ids)
            )
            async for piece in self._pieces(request):
                ids = word_ids(first + index, first + index + 1) if exact else []
                yield node_pb2.GenerateChunk(text=piece, index=index, tokens=1, token_ids=ids)
                index += 1
            yield node_pb2.GenerateChunk(index=index, final=self._final(request, index))
        finally:
            self._end(task_id)

    async def get_trace(
        self, trace_id: str, *, timeout_s: float | None = None
    ) -> node_pb2.GetTraceResponse:
        return node_pb2.GetTraceResponse()  # a fake node records no spans of its own

    async def close(self) -> None:
        self.closed = True


class FakeMesh:
    """Fake links by node id, handed to the Dispatcher as its `connect`."""

    def __init__(self, clock: ManualClock | None = None) -> None:
        self.calls = Calls()
        self.clock = clock
        self.links: dict[str, FakeLink] = {}
        self.scripts: dict[str, list[object]] = {}
        self.defaults: dict[str, object] = {}

    def script(self, node_id: str, *behaviours: object, default: object | None = None) -> None:
        self.scripts[node_id] = list(behaviours)
        if default is not None:
            self.defaults[node_id] = default

    def connect(self, node: NodeView) -> FakeLink:
        link = FakeLink(
            node.node_id,
            self.calls,
            self.scripts.get(node.node_id),
            clock=self.clock,
            default=self.defaults.get(node.node_id),
        )
        self.links[node.node_id] = link
        return link

    def served_by(self, node_id: str) -> int:
        return sum(
            1 for kind, node, _task in self.calls.events if kind == "start" and node == node_id
        )


def unavailable() -> MeshError:
    from mesh.core.errors import UnavailableError

    return UnavailableError("connection reset by peer")


class LocalDirectory:
    """A DirectoryClient over a TaskDirectory in the same event loop (tests, one process)."""

    def __init__(self, directory: TaskDirectory) -> None:
        self.directory = directory

    async def claim(self, key: str, token: str, task_id: TaskId, ttl_s: float, owner: str) -> Claim:
        return self.directory.claim(key, token, task_id, ttl_s, owner)

    async def settle(self, key: str, token: str, outcome: Outcome) -> None:
        self.directory.settle(key, token, outcome)

    async def outcome(self, key: str, token: str, wait_s: float) -> Outcome | None:
        return await self.directory.outcome(key, token, wait_s)

    async def publish(self, records: list[TaskRecord]) -> None:
        self.directory.publish(records)

    async def record(self, task_id: str, reader: str | None) -> TaskRecord | None:
        return self.directory.record(task_id, reader)
