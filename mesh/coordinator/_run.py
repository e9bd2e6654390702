"""One task's way through the mesh: attempts on nodes until one answers or the deadline ends.

The dispatcher owns the shared state (nodes, channels, in-flight counts, cool-downs, EWMA);
a `TaskRun` is the per-task state (attempts so far, nodes tried, deadline, text already sent)
and the retry loop. Attempts of one task are strictly sequential: an attempt is cancelled, and
its cancellation has reached the channel, before the next one starts, so no two nodes (nor one
node twice) ever run the same task at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from edgemesh.v1 import node_pb2
from mesh.coordinator.tasks import AttemptOutcome, AttemptRecord, TaskResult, TaskSpec
from mesh.errors import (
    CancelledError,
    DeadlineExceededError,
    InvalidRequestError,
    MeshError,
    NotReadyError,
    OverloadedError,
    TaskFailedError,
    UnavailableError,
)
from mesh.nodes_view import NodeView
from mesh.routing import TaskShape, ms_per_token

if TYPE_CHECKING:
    from mesh.coordinator.dispatch import Dispatcher
    from mesh.coordinator.tasks import LedgerEntry


_HAS_TOKEN_COUNT = "tokens" in node_pb2.GenerateChunk.DESCRIPTOR.fields_by_name


def chunk_tokens(chunk: node_pb2.GenerateChunk) -> int:
    """Tokens a chunk carries. A node may merge several tokens into one chunk (a slow reader
    gets fewer, larger ones); until GenerateChunk says how many (`tokens`, requested in
    notes/coordinator-integration.md), one per chunk is a lower bound, so a continued stream
    may run a few tokens past max_tokens but never stops short."""
    if _HAS_TOKEN_COUNT:
        return int(getattr(chunk, "tokens", 0)) or 1
    return 1


def classify(error: BaseException) -> tuple[AttemptOutcome, bool]:
    """(outcome, whether the node is at fault) for an attempt that raised `error`."""
    if isinstance(error, TimeoutError | DeadlineExceededError):
        return AttemptOutcome.TIMEOUT, True
    if isinstance(error, OverloadedError):
        return AttemptOutcome.OVERLOADED, False  # busy is not broken: no cool-down
    if isinstance(error, UnavailableError | NotReadyError | CancelledError):
        return AttemptOutcome.UNAVAILABLE, True
    return AttemptOutcome.ERROR, True


class TaskRun:
    def __init__(self, dispatcher: Dispatcher, task: TaskSpec, entry: LedgerEntry) -> None:
        self.dispatcher = dispatcher
        self.task = task
        self.entry = entry
        settings = dispatcher.settings
        self.clock = dispatcher.clock
        self.started_at = self.clock()
        self.deadline_s = task.deadline_s or settings.deadline_s
        self.deadline_at = self.started_at + self.deadline_s
        self.max_attempts = settings.max_attempts if settings.failover else 1
        self.attempts: list[AttemptRecord] = []
        self.tried: set[str] = set()
        # Agents are not placed on nodes yet: a task routes by its model.
        self.shape = TaskShape(model=task.model or None, labels=task.labels)
        self.first_token_at: float | None = None

    # ------------------------------------------------------------------ bookkeeping

    def remaining_s(self) -> float:
        return self.deadline_at - self.clock()

    def failure(self, why: str) -> TaskFailedError:
        tried = "; ".join(f"{a.node_name or a.node_id}: {a.outcome.value}"
                          + (f" ({a.detail})" if a.detail else "") for a in self.attempts)
        return TaskFailedError(
            f"task {self.task.task_id} failed: {why}; attempts: {tried or 'none'}",
            task_id=self.task.task_id, attempts=tuple(self.attempts))

    def _record(self, view: NodeView, outcome: AttemptOutcome, began: float, *,
                detail: str = "", tokens: int = 0) -> None:
        self.attempts.append(AttemptRecord(
            node_id=view.node_id, node_name=view.name, outcome=outcome,
            duration_ms=(self.clock() - began) * 1000.0, detail=detail, completion_tokens=tokens))
        self.entry.attempts = tuple(self.attempts)

    def _failed_attempt(self, view: NodeView, error: BaseException, began: float,
                        tokens: int = 0) -> None:
        """Record a failed attempt and judge the node; raise when the task cannot go on."""
        outcome, node_fault = classify(error)
        detail = str(error) or type(error).__name__
        self._record(view, outcome, began, detail=detail[:300], tokens=tokens)
        self.tried.add(view.node_id)
        if node_fault:
            self.dispatcher.cooldowns.record_failure(view.node_id)
        if isinstance(error, InvalidRequestError):
            raise error  # the request itself is wrong: no other node will take it either
        if tokens and not self.dispatcher.settings.resume_streams:
            raise self.failure(f"the stream broke after {tokens} tokens and resuming is off")

    def _succeeded(self, view: NodeView, began: float, tokens: int) -> None:
        duration_s = self.clock() - began
        self._record(view, AttemptOutcome.OK, began, tokens=tokens)
        self.dispatcher.cooldowns.record_success(view.node_id)
        sample = ms_per_token(duration_s, tokens)
        if sample is not None:
            self.dispatcher.ewma.update(view.node_id, sample)

    async def _next_node(self) -> NodeView:
        if len(self.attempts) >= self.max_attempts:
            raise self.failure(f"all {len(self.attempts)} attempts failed")
        if self.remaining_s() <= 0:
            raise self.failure(f"ran out of its {self.deadline_s:g} s deadline")
        return await self.dispatcher.choose(self)

    def _request(self, continuation: str = "", produced: int = 0) -> node_pb2.GenerateRequest:
        request = node_pb2.GenerateRequest()
        request.CopyFrom(self.task.request)
        context = request.task
        context.task_id = self.task.task_id
        context.idempotency_key = self.task.idempotency_key
        context.attempt = len(self.attempts) + 1
        context.deadline_unix_ms = int((time.time() + self.remaining_s()) * 1000)
        context.agent = self.task.agent or ""
        if continuation:
            request.continuation = self.task.request.continuation + continuation
        if produced and request.sampling.HasField("max_tokens"):
            request.sampling.max_tokens = request.sampling.max_tokens - produced
        return request

    def _result(self, view: NodeView, final: node_pb2.GenerateResponse, text: str,
                completion_tokens: int, first_token_ms: float) -> TaskResult:
        now = self.clock()
        return TaskResult(
            task_id=self.task.task_id, text=text, finish_reason=final.finish_reason,
            node_id=view.node_id, node_name=view.name, model=final.model or self.task.model or "",
            agent=self.task.agent or "", prompt_tokens=final.usage.prompt_tokens,
            completion_tokens=completion_tokens, attempts=tuple(self.attempts),
            failed_over=len(self.attempts) > 1, total_ms=(now - self.started_at) * 1000.0,
            time_to_first_token_ms=first_token_ms)

    # ------------------------------------------------------------------ unary

    async def unary(self) -> TaskResult:
        dispatcher = self.dispatcher
        while True:
            view = await self._next_node()
            link = dispatcher.link(view)
            timeout_s = min(dispatcher.settings.attempt_timeout_s, self.remaining_s())
            began = self.clock()
            self.entry.current = (view.node_id, view.name, began, 0)
            dispatcher.acquire(view.node_id)
            try:
                async with asyncio.timeout(timeout_s):
                    reply = await link.generate_request(self._request(), timeout_s=timeout_s)
            except asyncio.CancelledError:
                self._record(view, AttemptOutcome.CANCELLED, began)
                raise
            except (MeshError, TimeoutError) as error:
                self._failed_attempt(view, error, began)
                continue
            finally:
                dispatcher.release(view.node_id)
                self.entry.current = None
            tokens = reply.usage.completion_tokens
            self._succeeded(view, began, tokens)
            first_ms = (began - self.started_at) * 1000.0 + reply.timing.time_to_first_token_ms
            return self._result(view, reply, reply.text, tokens, first_ms)

    # ------------------------------------------------------------------ streaming

    async def stream(self) -> AsyncIterator[str | TaskResult]:
        """Text pieces, then the result. After a failure mid-answer the next node continues from
        the text already sent, with max_tokens reduced by the tokens already produced."""
        dispatcher = self.dispatcher
        sent: list[str] = []
        produced = 0
        while True:
            view = await self._next_node()
            request = self._request("".join(sent), produced)
            if request.sampling.HasField("max_tokens") and request.sampling.max_tokens < 1:
                final = node_pb2.GenerateResponse(finish_reason="length")
                yield self._result(view, final, "".join(sent), produced, self._first_ms())
                return
            link = dispatcher.link(view)
            began = self.clock()
            tokens = 0
            final = None
            self.entry.current = (view.node_id, view.name, began, 0)
            dispatcher.acquire(view.node_id)
            try:
                chunks = link.stream_request(request, timeout_s=max(0.001, self.remaining_s()))
                try:
                    while True:
                        silence_s = min(dispatcher.settings.attempt_timeout_s, self.remaining_s())
                        async with asyncio.timeout(silence_s):
                            chunk = await anext(chunks, None)
                        if chunk is None:
                            raise UnavailableError("the node ended the stream without a result")
                        if chunk.HasField("final"):
                            final = chunk.final
                            break
                        if chunk.text:
                            tokens += chunk_tokens(chunk)
                            sent.append(chunk.text)
                            self.entry.current = (view.node_id, view.name, began, tokens)
                            if self.first_token_at is None:
                                self.first_token_at = self.clock()
                            yield chunk.text
                finally:
                    await chunks.aclose()  # type: ignore[attr-defined]
            except (asyncio.CancelledError, GeneratorExit):
                self._record(view, AttemptOutcome.CANCELLED, began, tokens=tokens)
                raise
            except (MeshError, TimeoutError) as error:
                self._failed_attempt(view, error, began, tokens)
                produced += tokens
                continue
            finally:
                dispatcher.release(view.node_id)
                self.entry.current = None
            attempt_tokens = final.usage.completion_tokens or tokens
            self._succeeded(view, began, attempt_tokens)
            yield self._result(view, final, "".join(sent), produced + attempt_tokens,
                               self._first_ms())
            return

    def _first_ms(self) -> float:
        at = self.first_token_at if self.first_token_at is not None else self.clock()
        return (at - self.started_at) * 1000.0
