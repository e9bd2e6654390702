"""What the coordinator knows about a task: its spec, its attempts, its result, and the ledger.

Plain frozen dataclasses rather than pydantic models: the dispatcher builds these on every
request, and the hot path has a budget of about a millisecond.
"""

from __future__ import annotations

import asyncio
import copy
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from edgemesh.v1 import node_pb2
from mesh.core.attempts import AttemptOutcome, AttemptRecord  # in the core: errors carry them
from mesh.core.bounds import (
    MAX_IDEMPOTENCY_KEY_CHARS,
    MAX_TASK_ID_CHARS,
    check_caller_id,
    check_message_count,
    check_prompt_bytes,
)
from mesh.core.errors import AlreadyExistsError, InvalidRequestError, MeshError, NotFoundError
from mesh.core.ids import NodeId, TaskId, new_task_id
from mesh.core.untrusted import check_seed, quoted

MAX_DEADLINE_S = 86_400.0  # the longest deadline a task may ask for (a day)


def caller_error(error: BaseException) -> bool:
    """Whether `error` is the caller's: a wrong request or an unknown model. Such an error is
    the same on every node (no retry), says nothing about the node (no cool-down), and is the
    answer a repeat of the task gets too (the ledger keeps it; transient failures it forgets)."""
    return isinstance(error, InvalidRequestError | NotFoundError)


def check_deadline_s(deadline_s: float | None, name: str = "deadline_s") -> None:
    """InvalidRequestError unless `deadline_s` is None or a finite 0..MAX_DEADLINE_S."""
    if deadline_s is not None and not (
        math.isfinite(deadline_s) and 0 <= deadline_s <= MAX_DEADLINE_S
    ):
        raise InvalidRequestError(
            f"{name} must be seconds from 0 to {MAX_DEADLINE_S:g}, got {deadline_s!r}"
        )


def check_max_tokens(max_tokens: int | None, name: str = "max_tokens") -> None:
    """InvalidRequestError unless `max_tokens` is None (the node's default) or at least 1."""
    if max_tokens is not None and max_tokens < 1:
        raise InvalidRequestError(f"{name} must be at least 1, got {max_tokens}")


def detached(error: MeshError) -> MeshError:
    """`error` without its traceback, for keeping: the frames it holds (the task's request
    among them: a 10 KB model name, kept ~5 times over) would stay alive as long as the ledger
    keeps the task. The caller still gets the original, traceback and all."""
    try:
        clone = copy.copy(error)  # the class, message and fields; no __traceback__
    except TypeError:  # a subclass whose constructor takes more than the message
        return error
    clone.__cause__ = clone.__context__ = None
    return clone


def check_caller_ids(
    task_id: str,
    idempotency_key: str,
    *,
    task_id_name: str = "task_id",
    key_name: str = "idempotency_key",
) -> None:
    """InvalidRequestError when a caller-chosen id is over its limit (the ledger keeps both)."""
    check_caller_id(task_id_name, task_id, MAX_TASK_ID_CHARS)
    check_caller_id(key_name, idempotency_key, MAX_IDEMPOTENCY_KEY_CHARS)


def check_prompt_limits(
    request: node_pb2.GenerateRequest, *, max_prompt_bytes: int, max_messages: int
) -> None:
    """InvalidRequestError when a task's prompt is over the coordinator's limits (`bounds`):
    refused at the edge, before it costs a node anything, and never retried."""
    check_message_count(len(request.messages), max_messages, "the coordinator's")
    size = len(request.prompt.encode()) + sum(len(m.content.encode()) for m in request.messages)
    size += len(request.json_schema.encode())
    check_prompt_bytes(size, max_prompt_bytes, "the coordinator's")


class TaskState(StrEnum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """One task as the dispatcher receives it.

    `request` carries model, prompt or messages and sampling; the dispatcher copies it for
    each attempt and fills `task`, `continuation` and the remaining `max_tokens`. A task with
    an `agent` ("auto": the intent router picks one) runs that agent on a node that offers it,
    from the prompt (or the last message; earlier messages are its history), starting on model
    tier `tier` (or `model`; none: the lowest tier).
    """

    task_id: TaskId
    request: node_pb2.GenerateRequest
    idempotency_key: str = ""
    model: str | None = None
    agent: str | None = None
    deadline_s: float | None = None  # total time allowed; None: the dispatcher's default
    labels: Mapping[str, str] = field(default_factory=dict)
    caller_task_id: bool = False  # the caller chose the id (a repeat means the same task)
    tier: str | None = None  # agent tasks: the model tier to start on
    traceparent: str = ""  # the caller's W3C trace context: the task's trace continues it
    session: str = ""  # the caller's conversation (OpenAI `user`): routing affinity only
    # The API key that asked (its name; "": an open mesh): another key's idempotency key or
    # task id never answers this one's task with that key's answer, and only this key may
    # read the task back (`TaskLedger.record`).
    owner: str = ""

    @property
    def dedup_key(self) -> str:
        """Two submissions with the same key (by the same owner) are one task, answered once."""
        owner = f"{self.owner}\0" if self.owner else ""
        if self.idempotency_key:
            return f"key:{owner}{self.idempotency_key}"
        return f"id:{owner}{self.task_id}" if self.caller_task_id else ""


@dataclass(frozen=True, slots=True)
class TaskResult:
    task_id: TaskId
    text: str
    finish_reason: str
    node_id: NodeId
    node_name: str
    model: str
    agent: str
    prompt_tokens: int
    completion_tokens: int
    attempts: tuple[AttemptRecord, ...]
    failed_over: bool
    total_ms: float
    time_to_first_token_ms: float
    # Agent tasks: every step of the answer (replayed ones keep the node that ran them), the
    # model tier that answered, why it is not the lowest, and who chose the agent.
    steps: tuple[node_pb2.AgentStep, ...] = ()
    tier: str = ""
    escalation_reason: str = ""
    routed_by: str = ""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class TaskUsage:
    """The tokens a task's run produced, filled in by the dispatcher when the run ends: the
    answer's usage, or, for a run that failed or whose caller went away, the tokens its attempts
    produced (a node reports the prompt's only with an answer). Nothing for an answer that
    another run gave (a repeat of an idempotency key). What an API key's tpm is charged."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """What `DescribeTask` answers; `owner` (not sent to callers) is the API key whose task it
    is ("": an open mesh)."""

    task_id: TaskId
    state: TaskState
    attempts: tuple[AttemptRecord, ...] = ()
    result: TaskResult | None = None
    error: str = ""
    owner: str = ""


def readable(owner: str, reader: str | None) -> bool:
    """Whether `reader` (an API key's name; None: nobody is asking as a key, an open mesh) may
    see a task of `owner`. Another key's task is not found rather than forbidden: its
    existence is not the reader's to learn."""
    return reader is None or reader == owner


class LedgerEntry:
    __slots__ = (
        "attempts",
        "current",
        "error",
        "future",
        "key",
        "owner",
        "result",
        "state",
        "task_id",
        "trace_id",
    )

    def __init__(self, task_id: TaskId, key: str, owner: str = "") -> None:
        self.task_id = task_id
        self.key = key
        self.owner = owner  # the API key that asked ("": an open mesh)
        self.state = TaskState.RUNNING
        self.attempts: tuple[AttemptRecord, ...] = ()
        self.result: TaskResult | None = None
        self.error: MeshError | None = None
        # The attempt in progress: (node id, node name, started at (clock), tokens so far).
        self.current: tuple[NodeId, str, float, int] | None = None
        self.trace_id = ""  # the task's trace, where it is traced (mesh trace TASK_ID)
        self.future: asyncio.Future[TaskResult] = asyncio.get_running_loop().create_future()
        # Nobody may be waiting on it: mark a failure as seen so asyncio does not log it.
        self.future.add_done_callback(_consume)


def _consume(future: asyncio.Future[TaskResult]) -> None:
    if not future.cancelled():
        future.exception()


class TaskLedger:
    """Task id -> record, bounded: the oldest finished tasks are forgotten first.

    Also the idempotency index: a repeated key finds the running or finished task. A task id
    belongs to the API key whose task holds it: another key's task with that id is refused
    (`begin`), and another key's reads find nothing (`record`, `entry`). Used from one event
    loop.
    """

    def __init__(
        self, max_finished: int = 10_000, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_finished = max_finished
        self._clock = clock
        self._entries: OrderedDict[TaskId, LedgerEntry] = OrderedDict()
        self._by_key: dict[str, TaskId] = {}
        self._finished = 0
        self._listeners: list[Callable[[LedgerEntry], None]] = []

    def listen(self, listener: Callable[[LedgerEntry], None]) -> None:
        """Call `listener(entry)` when a task begins and when it ends (done, failed, cancelled)."""
        self._listeners.append(listener)

    def _tell(self, entry: LedgerEntry) -> None:
        for listener in self._listeners:
            listener(entry)

    def __len__(self) -> int:
        return len(self._entries)

    def find(self, key: str) -> LedgerEntry | None:
        """The task that holds idempotency key `key` (it names its owner: `dedup_key`)."""
        if not key:
            return None
        task_id = self._by_key.get(key)
        entry = self._entries.get(task_id) if task_id is not None else None
        return entry if entry is not None and entry.key == key else None

    def begin(self, task: TaskSpec) -> LedgerEntry:
        """A new entry for `task`; AlreadyExistsError when its (caller-chosen) id is another
        API key's task's: one id never names two keys' tasks (nodes key a task's side effects
        by its id), and a repeat of the first key's never finds the second's."""
        earlier = self._entries.get(task.task_id)
        if earlier is not None and earlier.owner != task.owner:
            raise task_id_taken(task.task_id)
        entry = LedgerEntry(task.task_id, task.dedup_key, task.owner)
        if earlier is not None:  # a retry of a task that failed
            del self._entries[task.task_id]
            self._forget_key(earlier)
            if earlier.state is not TaskState.RUNNING:
                self._finished -= 1
        self._entries[task.task_id] = entry
        if entry.key:
            self._by_key[entry.key] = task.task_id
        self._tell(entry)
        return entry

    def succeed(self, entry: LedgerEntry, result: TaskResult) -> None:
        entry.state, entry.result, entry.attempts = TaskState.DONE, result, result.attempts
        if not entry.future.done():
            entry.future.set_result(result)
        self._finish(entry)

    def fail(
        self, entry: LedgerEntry, error: MeshError, attempts: tuple[AttemptRecord, ...]
    ) -> None:
        """Callers waiting on the task get `error`. A repeat of its key runs it again, unless
        the error is the caller's (`caller_error`): overloaded, unavailable or out of time now
        says nothing about later."""
        error = detached(error)
        entry.state, entry.error, entry.attempts = TaskState.FAILED, error, attempts
        if not entry.future.done():
            entry.future.set_exception(error)
        if not caller_error(error):
            self._forget_key(entry)
        self._finish(entry)

    def abandon(self, entry: LedgerEntry, attempts: tuple[AttemptRecord, ...]) -> None:
        """The caller cancelled: the task failed, and a repeat of its key may run it again."""
        entry.state, entry.attempts = TaskState.FAILED, attempts
        entry.error = MeshError("cancelled by the caller")
        if not entry.future.done():
            entry.future.cancel()
        self._forget_key(entry)
        self._finish(entry)

    def forget(self, entry: LedgerEntry) -> None:
        """Drop `entry` and its key at once: a task refused before it began anywhere."""
        if self._entries.get(entry.task_id) is entry:
            del self._entries[entry.task_id]
            if entry.state is not TaskState.RUNNING:
                self._finished -= 1
        self._forget_key(entry)

    def _forget_key(self, entry: LedgerEntry) -> None:
        if entry.key and self._by_key.get(entry.key) == entry.task_id:
            del self._by_key[entry.key]

    def _finish(self, entry: LedgerEntry) -> None:
        self._entries.move_to_end(entry.task_id)
        self._finished += 1
        self._tell(entry)
        while self._finished > self.max_finished:
            oldest = next(
                (e for e in self._entries.values() if e.state is not TaskState.RUNNING), None
            )
            if oldest is None:
                break
            del self._entries[oldest.task_id]
            if oldest.key and self._by_key.get(oldest.key) == oldest.task_id:
                del self._by_key[oldest.key]
            self._finished -= 1

    def entry(self, task_id: str, reader: str | None = None) -> LedgerEntry | None:
        """The task's entry; None when unknown, or when `reader` (an API key's name) is not its
        owner (None: any task)."""
        entry = self._entries.get(TaskId(task_id))
        return entry if entry is not None and readable(entry.owner, reader) else None

    def record(self, task_id: str, reader: str | None = None) -> TaskRecord:
        """What DescribeTask answers; NotFoundError when unknown here, or not `reader`'s."""
        entry = self.entry(task_id, reader)
        if entry is None:
            raise NotFoundError(
                f"task {quoted(task_id)} is not known here: it never ran, was forgotten (the ledger keeps "
                f"the last {self.max_finished} tasks), or ran on another dispatcher replica "
                "that has not published it yet"
            )
        attempts = entry.attempts
        if entry.state is TaskState.RUNNING and entry.current is not None:
            node_id, name, began, tokens = entry.current
            attempts += (
                AttemptRecord(
                    node_id=node_id,
                    node_name=name,
                    outcome=AttemptOutcome.RUNNING,
                    duration_ms=(self._clock() - began) * 1000.0,
                    completion_tokens=tokens,
                ),
            )
        return TaskRecord(
            task_id=entry.task_id,
            state=entry.state,
            attempts=attempts,
            result=entry.result,
            error=str(entry.error or ""),
            owner=entry.owner,
        )

    def close(self) -> None:
        for entry in self._entries.values():
            if not entry.future.done():
                entry.future.cancel()
        self._entries.clear()
        self._by_key.clear()


def task_id_taken(task_id: str) -> AlreadyExistsError:
    return AlreadyExistsError(
        f"task id {quoted(task_id)} is already in use; choose another "
        "(or send none: the mesh makes one up)",
        task_id=task_id,
    )


def build_task(
    prompt: str = "",
    *,
    messages: Sequence[Mapping[str, str]] = (),
    model: str | None = None,
    agent: str | None = None,
    task_id: str = "",
    idempotency_key: str = "",
    deadline_s: float | None = None,
    labels: Mapping[str, str] | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    tier: str | None = None,
    traceparent: str = "",
    json_schema: str = "",
    session: str = "",
) -> TaskSpec:
    """A TaskSpec from plain values (tests, benchmarks, the OpenAI ingress)."""
    sampling = node_pb2.Sampling(stop=list(stop))
    if max_tokens is not None:
        sampling.max_tokens = max_tokens
    if temperature is not None:
        sampling.temperature = temperature
    if top_p is not None:
        sampling.top_p = top_p
    if seed is not None:
        check_seed(seed)  # never protobuf's bare "Value out of range"
        sampling.seed = seed
    request = node_pb2.GenerateRequest(
        model=model or "",
        prompt=prompt,
        sampling=sampling,
        json_schema=json_schema,
        messages=[
            node_pb2.ChatMessage(role=m["role"], content=m.get("content", "")) for m in messages
        ],
    )
    return TaskSpec(
        task_id=TaskId(task_id) if task_id else new_task_id(),
        request=request,
        idempotency_key=idempotency_key,
        model=model or None,
        agent=agent or None,
        deadline_s=deadline_s,
        labels=dict(labels or {}),
        caller_task_id=bool(task_id),
        tier=tier or None,
        traceparent=traceparent,
        session=session,
    )
