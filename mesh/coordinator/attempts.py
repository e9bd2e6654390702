"""THE attempt loop: choose a node, call it, classify a failure, cool down, retry in the deadline.

Unary, streaming and agent runs (`runs.py`, `agent_run.py`) are thin clients of `Attempts.run`:
each supplies the call for one attempt (an async iterator of what the caller should see) and
says which failures end the task. Attempts of one task are strictly sequential: an attempt is
cancelled, and its cancellation has reached the channel, before the next one starts, so no two
nodes (nor one node twice) ever run the same task at once.

A node is silent for too long when nothing arrives for `attempt_timeout_s`: no text, no step,
and no word that the request still waits in the node's queue (a call yields `WAITING` for that:
waiting behind other work is not a failure, and a slow node that keeps producing is never cut).
The call's own gRPC deadline is the task's, so a DEADLINE_EXCEEDED from it is the task running
out of time, not the node's fault.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from opentelemetry.trace import Span

from edgemesh.v1 import node_pb2
from mesh.coordinator.pool import NodeLink, NodePool, NoNodeError, NoNodeReason
from mesh.coordinator.settings import DispatcherSettings
from mesh.coordinator.tasks import (
    AttemptOutcome,
    AttemptRecord,
    LedgerEntry,
    TaskSpec,
    caller_error,
)
from mesh.core.caller import Caller, current_caller
from mesh.core.errors import (
    CancelledError,
    DeadlineExceededError,
    MeshError,
    NotReadyError,
    OverloadedError,
    TaskFailedError,
    UnavailableError,
)
from mesh.core.ids import NodeId
from mesh.core.tracing import OUTGOING_TRACEPARENT, fail_with, trace_id_of, traceparent
from mesh.nodes_view import NodeView
from mesh.routing import TaskShape

T = TypeVar("T")

_RETRY_PAUSE_S = 0.05  # per attempt made, before trying nodes that already failed this task
_END = object()


class _Waiting:
    """What a call yields when the node says the request waits in its queue (not passed on)."""

    def __repr__(self) -> str:
        return "WAITING"


WAITING: Any = _Waiting()


def cancelled_by_caller() -> bool:
    """Whether the running task is being cancelled (the caller went away), as opposed to the
    CancelledError grpc.aio raises in a call whose channel was closed under it (the registry
    dropped the node): that one is a failed attempt like any broken connection."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def channel_closed() -> UnavailableError:
    return UnavailableError("the call was cut: the node's channel closed (node gone)")


def classify(error: BaseException) -> tuple[AttemptOutcome, bool]:
    """(outcome, whether the node is at fault) for an attempt that raised `error`."""
    if caller_error(error):
        return AttemptOutcome.ERROR, False  # a wrong request or unknown model: not the node
    if isinstance(error, TimeoutError | DeadlineExceededError):
        return AttemptOutcome.TIMEOUT, True
    if isinstance(error, OverloadedError):
        return AttemptOutcome.OVERLOADED, False  # busy is not broken: no cool-down
    if isinstance(error, UnavailableError | NotReadyError | CancelledError):
        return AttemptOutcome.UNAVAILABLE, True
    return AttemptOutcome.ERROR, True


@dataclass
class Attempt:
    """One attempt in progress: the call fills in `tokens` and sets `answered` at its end."""

    view: NodeView
    began: float
    rpc_timeout_s: float  # the call's gRPC deadline: what is left of the task's
    context: node_pb2.TaskContext
    tokens: int = 0
    answered: bool = False
    span: Span | None = field(default=None, repr=False)  # the attempt's, while it runs
    _entry: LedgerEntry | None = field(default=None, repr=False)
    _attempts: Attempts | None = field(default=None, repr=False)

    def progress(self, tokens: int) -> None:
        """The node produced `tokens` more (DescribeTask shows them; the first sets TTFT)."""
        self.tokens += tokens
        if self._entry is not None:
            self._entry.current = (self.view.node_id, self.view.name, self.began, self.tokens)
        if self._attempts is not None and self._attempts.first_token_at is None:
            self._attempts.first_token_at = self._attempts.clock()


AttemptCall = Callable[[NodeLink, Attempt], AsyncGenerator[T, None]]


class Attempts:
    """One task's attempts so far, its deadline and the nodes it tried; `run` is the loop."""

    def __init__(
        self,
        pool: NodePool,
        settings: DispatcherSettings,
        task: TaskSpec,
        entry: LedgerEntry,
        shape: TaskShape,
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.task = task
        self.entry = entry
        self.shape = shape
        self.clock = pool.clock
        self.started_at = self.clock()
        self.deadline_s = task.deadline_s or settings.deadline_s
        self.deadline_at = self.started_at + self.deadline_s
        self.max_attempts = settings.max_attempts if settings.failover else 1
        self.records: list[AttemptRecord] = []
        self.tried: set[NodeId] = set()
        self.first_token_at: float | None = None
        self.round_start = 0  # attempts before this round (an agent's tier) do not count
        self.failed_at: float | None = None  # when the last attempt failed (reroute latency)
        # Who is asking (mesh/core/caller.py), read once here, in the task's own context (the
        # ingress set it there; a task created under it inherits a copy): every attempt's
        # TaskContext names the same caller, whichever asyncio task runs the attempt.
        self.caller: Caller | None = current_caller()
        # The task's span: a child of the caller's traceparent, the parent of each attempt's.
        self.span = pool.tracing.start(
            "task",
            parent=task.traceparent,
            attributes={"task_id": task.task_id, "kind": "agent" if task.agent else "model"},
        )
        entry.trace_id = trace_id_of(self.span) if self.span.is_recording() else ""
        self._finished = False

    def finish(self, outcome: str) -> None:
        """End the task's span: "ok", or how the task ended ("unavailable", "cancelled")."""
        if not self._finished:
            self._finished = True
            self.span.set_attribute("attempts", len(self.records))
            fail_with(self.span, outcome)
            self.span.end()

    # ------------------------------------------------------------------ bookkeeping

    def remaining_s(self) -> float:
        return self.deadline_at - self.clock()

    def first_ms(self) -> float:
        at = self.first_token_at if self.first_token_at is not None else self.clock()
        return (at - self.started_at) * 1000.0

    def new_round(self, shape: TaskShape) -> None:
        """Start over with a fresh attempt budget and no node excluded (an agent's next tier)."""
        self.shape = shape
        self.tried.clear()
        self.round_start = len(self.records)

    def _tried_text(self) -> str:
        return (
            "; ".join(
                f"{a.node_name or a.node_id}: {a.outcome.value}"
                + (f" ({a.detail})" if a.detail else "")
                for a in self.records
            )
            or "none"
        )

    def failure(self, why: str) -> TaskFailedError:
        return TaskFailedError(
            f"task {self.task.task_id} failed: {why}; attempts: {self._tried_text()}",
            task_id=self.task.task_id,
            attempts=tuple(self.records),
        )

    def deadline_exceeded(self) -> DeadlineExceededError:
        """The task's own deadline ended it (DEADLINE_EXCEEDED; HTTP 504), whoever was trying."""
        return DeadlineExceededError(
            f"task {self.task.task_id} ran out of its {self.deadline_s:g} s deadline; "
            f"attempts: {self._tried_text()}",
            task_id=self.task.task_id,
            attempts=tuple(self.records),
        )

    def _record(
        self, attempt: Attempt, outcome: AttemptOutcome, *, detail: str = "", tokens: int = -1
    ) -> None:
        self.records.append(
            AttemptRecord(
                node_id=attempt.view.node_id,
                node_name=attempt.view.name,
                outcome=outcome,
                duration_ms=(self.clock() - attempt.began) * 1000.0,
                detail=detail,
                completion_tokens=attempt.tokens if tokens < 0 else tokens,
            )
        )
        if attempt.span is not None:
            attempt.span.set_attribute("completion_tokens", self.records[-1].completion_tokens)
            fail_with(attempt.span, outcome.value)
            attempt.span.end()
            attempt.span = None
        self.entry.attempts = tuple(self.records)
        self.pool.metrics.attempt(outcome.value)

    def waiting_report_ms(self) -> int:
        """How often a node is asked to say that the task still waits in its queue: well
        within the per-attempt timeout, so that waiting is never taken for silence."""
        return max(1, int(min(1.0, self.settings.attempt_timeout_s / 3) * 1000))

    def context(self) -> node_pb2.TaskContext:
        """The TaskContext of the next attempt (its number, what is left of the deadline, and
        who is asking: the key's name, never the key, and its subject; empty in an open mesh)."""
        caller = self.caller
        return node_pb2.TaskContext(
            task_id=self.task.task_id,
            idempotency_key=self.task.idempotency_key,
            attempt=len(self.records) + 1,
            deadline_unix_ms=int((time.time() + max(0.0, self.remaining_s())) * 1000),
            agent=self.task.agent or "",
            key_name=caller.key_name if caller is not None else "",
            subject=caller.subject if caller is not None else "",
        )

    # ------------------------------------------------------------------ choosing

    async def _next_node(self) -> NodeView:
        made = len(self.records) - self.round_start
        if made >= self.max_attempts:
            raise self.failure(f"all {made} attempts failed")
        while True:
            if self.remaining_s() <= 0:
                raise self.deadline_exceeded()
            try:
                return await self.pool.choose(
                    self.shape, exclude=self.tried, deadline_at=self.deadline_at
                )
            except NoNodeError as error:
                if error.reason is NoNodeReason.TRIED:
                    # Every usable node failed once: they may be tried again, after a pause
                    # that grows with the attempts made.
                    self.tried.clear()
                    await self.pool.wait_for_change(
                        min(self.remaining_s(), _RETRY_PAUSE_S * len(self.records))
                    )
                    continue
                if self.remaining_s() <= 0:
                    raise self.deadline_exceeded() from None
                if self.records:
                    raise self.failure(
                        f"no other node can take it ({error.reason.value})"
                    ) from None
                raise error.public(self.task.task_id) from None

    # ------------------------------------------------------------------ the loop

    async def run(
        self,
        call: AttemptCall[T],
        *,
        fatal: Callable[[BaseException], bool] = caller_error,
        after_failure: Callable[[Attempt], bool] | None = None,
        measure: bool = True,
    ) -> AsyncGenerator[T, None]:
        """What `call` yields, attempt after attempt, until one attempt ends `answered`.

        `fatal(error)`: the failure ends the task (the request itself is wrong: no other node
        would take it either). `after_failure(attempt)`, after a failed attempt is recorded:
        False when the task needs no further attempt (a broken stream that had sent it all).
        `measure`: the answer's ms/token feeds the latency EWMA."""
        while True:
            attempt = Attempt(
                view=await self._next_node(),
                began=self.clock(),
                rpc_timeout_s=max(0.001, self.remaining_s()),
                context=self.context(),
                _entry=self.entry,
                _attempts=self,
            )
            view = attempt.view
            attempt.span = self.pool.tracing.start(
                "attempt",
                parent=self.span,
                attributes={"node": view.name, "attempt": attempt.context.attempt},
            )
            OUTGOING_TRACEPARENT.set(traceparent(attempt.span))  # the node's spans join it
            if self.failed_at is not None:  # a failover: the task moves on after a failure
                reason = self.records[-1].outcome.value if self.records else "unknown"
                self.pool.metrics.failover(reason, attempt.began - self.failed_at)
                self.failed_at = None
            self.entry.current = (view.node_id, view.name, attempt.began, 0)
            deadline_bound = False
            try:
                async with self.pool.slot(view) as link:
                    items = call(link, attempt)
                    try:
                        while True:
                            remaining_s = self.remaining_s()
                            silence_s = min(self.settings.attempt_timeout_s, remaining_s)
                            deadline_bound = silence_s >= remaining_s
                            async with asyncio.timeout(silence_s):
                                item = await anext(items, _END)
                            if item is _END:
                                break
                            if item is not WAITING:
                                yield item  # type: ignore[misc]
                    finally:
                        await items.aclose()
                    if not attempt.answered:
                        raise UnavailableError("the node ended the call without a result")
            except (asyncio.CancelledError, GeneratorExit) as error:
                if isinstance(error, GeneratorExit) or cancelled_by_caller():
                    self._record(attempt, AttemptOutcome.CANCELLED)
                    raise
                failure: BaseException = channel_closed()
            except (MeshError, TimeoutError) as error:
                # The call's gRPC deadline is the task's: a DEADLINE_EXCEEDED is the task's.
                if isinstance(error, TimeoutError | DeadlineExceededError) and (
                    deadline_bound
                    or isinstance(error, DeadlineExceededError)
                    or self.remaining_s() <= 0
                ):
                    self._record(
                        attempt, AttemptOutcome.TIMEOUT, detail="the task's deadline passed"
                    )
                    raise self.deadline_exceeded() from error
                failure = error
            else:
                self._record(attempt, AttemptOutcome.OK)
                duration_s = self.clock() - attempt.began
                self.pool.succeeded(
                    view.node_id, duration_s, attempt.tokens if measure else 0, self.shape
                )
                return
            finally:
                self.entry.current = None
                OUTGOING_TRACEPARENT.set("")
            self._failed(attempt, failure, fatal)
            if after_failure is not None and not after_failure(attempt):
                return

    def _failed(
        self, attempt: Attempt, error: BaseException, fatal: Callable[[BaseException], bool]
    ) -> None:
        """Record a failed attempt and judge the node; raise when the task cannot go on."""
        outcome, node_fault = classify(error)
        detail = str(error) or type(error).__name__
        self._record(attempt, outcome, detail=detail[:300])
        self.failed_at = self.clock()
        self.tried.add(attempt.view.node_id)
        if node_fault:
            self.pool.failed(attempt.view.node_id)
        if fatal(error):
            raise error
