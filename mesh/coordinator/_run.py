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
from mesh.coordinator.tasks import (
    AttemptOutcome,
    AttemptRecord,
    TaskResult,
    TaskSpec,
    caller_error,
)
from mesh.errors import (
    CancelledError,
    DeadlineExceededError,
    MeshError,
    NotReadyError,
    OverloadedError,
    TaskFailedError,
    UnavailableError,
)
from mesh.ids import NodeId
from mesh.nodes_view import NodeView
from mesh.routing import TaskShape, ms_per_token

if TYPE_CHECKING:
    from mesh.coordinator.dispatch import Dispatcher
    from mesh.coordinator.tasks import LedgerEntry


_HAS_TOKEN_COUNT = "tokens" in node_pb2.GenerateChunk.DESCRIPTOR.fields_by_name


def chunk_tokens(chunk: node_pb2.GenerateChunk) -> int:
    """Tokens a chunk carries (`GenerateChunk.tokens`: a node merges several tokens into one
    chunk when its reader is slow). A continued stream asks the next node for exactly the
    tokens still missing. A node too old to say counts one per chunk: a lower bound, so such a
    continuation may run a few tokens past max_tokens but never stops short."""
    if _HAS_TOKEN_COUNT:
        return int(getattr(chunk, "tokens", 0)) or 1
    return 1


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

    def _tried(self) -> str:
        return (
            "; ".join(
                f"{a.node_name or a.node_id}: {a.outcome.value}"
                + (f" ({a.detail})" if a.detail else "")
                for a in self.attempts
            )
            or "none"
        )

    def failure(self, why: str) -> TaskFailedError:
        return TaskFailedError(
            f"task {self.task.task_id} failed: {why}; attempts: {self._tried()}",
            task_id=self.task.task_id,
            attempts=tuple(self.attempts),
        )

    def deadline_exceeded(self) -> DeadlineExceededError:
        """The task's own deadline ended it (DEADLINE_EXCEEDED; HTTP 504), whoever was trying."""
        return DeadlineExceededError(
            f"task {self.task.task_id} ran out of its {self.deadline_s:g} s deadline; "
            f"attempts: {self._tried()}",
            task_id=self.task.task_id,
            attempts=tuple(self.attempts),
        )

    def _deadline_fired(self, error: BaseException, deadline_bound: bool) -> bool:
        """Whether a timeout is the task's deadline (the bound in force, or already past)
        rather than the per-attempt timeout: then the node is not to blame."""
        return isinstance(error, TimeoutError | DeadlineExceededError) and (
            deadline_bound or self.remaining_s() <= 0
        )

    def _out_of_time(self, view: NodeView, began: float, tokens: int = 0) -> DeadlineExceededError:
        self._record(
            view, AttemptOutcome.TIMEOUT, began, detail="the task's deadline passed", tokens=tokens
        )
        return self.deadline_exceeded()

    def _record(
        self,
        view: NodeView,
        outcome: AttemptOutcome,
        began: float,
        *,
        detail: str = "",
        tokens: int = 0,
    ) -> None:
        self.attempts.append(
            AttemptRecord(
                node_id=view.node_id,
                node_name=view.name,
                outcome=outcome,
                duration_ms=(self.clock() - began) * 1000.0,
                detail=detail,
                completion_tokens=tokens,
            )
        )
        self.entry.attempts = tuple(self.attempts)

    def _failed_attempt(
        self, view: NodeView, error: BaseException, began: float, tokens: int = 0
    ) -> None:
        """Record a failed attempt and judge the node; raise when the task cannot go on."""
        outcome, node_fault = classify(error)
        detail = str(error) or type(error).__name__
        self._record(view, outcome, began, detail=detail[:300], tokens=tokens)
        self.tried.add(view.node_id)
        if node_fault:
            self.dispatcher.cooldowns.record_failure(view.node_id)
        if caller_error(error):
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
            raise self.deadline_exceeded()
        return await self.dispatcher.choose(self)

    def _request(self, continuation: str = "", produced: int = 0) -> node_pb2.GenerateRequest:
        request = node_pb2.GenerateRequest()
        request.CopyFrom(self.task.request)
        context = request.task
        context.task_id = self.task.task_id
        context.idempotency_key = self.task.idempotency_key
        context.attempt = len(self.attempts) + 1
        context.deadline_unix_ms = int((time.time() + max(0.0, self.remaining_s())) * 1000)
        context.agent = self.task.agent or ""
        if continuation:
            request.continuation = self.task.request.continuation + continuation
        if produced and request.sampling.HasField("max_tokens"):
            request.sampling.max_tokens = request.sampling.max_tokens - produced
        return request

    def _result(
        self,
        node: tuple[NodeId, str],
        final: node_pb2.GenerateResponse,
        text: str,
        completion_tokens: int,
        first_token_ms: float,
    ) -> TaskResult:
        """The answer; `node` (id, name) gave its last part."""
        now = self.clock()
        return TaskResult(
            task_id=self.task.task_id,
            text=text,
            finish_reason=final.finish_reason,
            node_id=node[0],
            node_name=node[1],
            model=final.model or self.task.model or "",
            agent=self.task.agent or "",
            prompt_tokens=final.usage.prompt_tokens,
            completion_tokens=completion_tokens,
            attempts=tuple(self.attempts),
            failed_over=len(self.attempts) > 1,
            total_ms=(now - self.started_at) * 1000.0,
            time_to_first_token_ms=first_token_ms,
        )

    # ------------------------------------------------------------------ unary

    async def unary(self) -> TaskResult:
        dispatcher = self.dispatcher
        while True:
            view = await self._next_node()
            link = dispatcher.link(view)
            remaining_s = self.remaining_s()
            timeout_s = min(dispatcher.settings.attempt_timeout_s, remaining_s)
            deadline_bound = timeout_s >= remaining_s  # the task's deadline comes first
            began = self.clock()
            self.entry.current = (view.node_id, view.name, began, 0)
            dispatcher.acquire(view.node_id)
            try:
                async with asyncio.timeout(timeout_s):
                    reply = await link.generate_request(self._request(), timeout_s=timeout_s)
            except asyncio.CancelledError:
                if cancelled_by_caller():
                    self._record(view, AttemptOutcome.CANCELLED, began)
                    raise
                self._failed_attempt(view, channel_closed(), began)
                continue
            except (MeshError, TimeoutError) as error:
                if self._deadline_fired(error, deadline_bound):
                    raise self._out_of_time(view, began) from error
                self._failed_attempt(view, error, began)
                continue
            finally:
                dispatcher.release(view.node_id)
                self.entry.current = None
            tokens = reply.usage.completion_tokens
            self._succeeded(view, began, tokens)
            first_ms = (began - self.started_at) * 1000.0 + reply.timing.time_to_first_token_ms
            return self._result((view.node_id, view.name), reply, reply.text, tokens, first_ms)

    # ------------------------------------------------------------------ streaming

    async def stream(self) -> AsyncIterator[str | TaskResult]:
        """Text pieces, then the result. After a failure mid-answer the next node continues from
        the text already sent, with max_tokens reduced by the tokens already produced."""
        dispatcher = self.dispatcher
        sent: list[str] = []
        produced = 0
        while True:
            if produced and self._tokens_left(produced) == 0:
                # The broken attempt sent every token asked for: the answer is complete, and
                # the node that sent its end is the one that answered (no other is needed).
                last = self.attempts[-1]
                final = node_pb2.GenerateResponse(finish_reason="length")
                yield self._result(
                    (last.node_id, last.node_name), final, "".join(sent), produced, self._first_ms()
                )
                return
            view = await self._next_node()
            request = self._request("".join(sent), produced)
            link = dispatcher.link(view)
            began = self.clock()
            tokens = 0
            final = None
            deadline_bound = False
            self.entry.current = (view.node_id, view.name, began, 0)
            dispatcher.acquire(view.node_id)
            try:
                chunks = link.stream_request(request, timeout_s=max(0.001, self.remaining_s()))
                try:
                    while True:
                        remaining_s = self.remaining_s()
                        silence_s = min(dispatcher.settings.attempt_timeout_s, remaining_s)
                        deadline_bound = silence_s >= remaining_s
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
            except (asyncio.CancelledError, GeneratorExit) as error:
                if isinstance(error, GeneratorExit) or cancelled_by_caller():
                    self._record(view, AttemptOutcome.CANCELLED, began, tokens=tokens)
                    raise
                self._failed_attempt(view, channel_closed(), began, tokens)
                produced += tokens
                continue
            except (MeshError, TimeoutError) as error:
                # The stream's gRPC deadline is the task's: a DEADLINE_EXCEEDED is the task's.
                if self._deadline_fired(
                    error, deadline_bound or isinstance(error, DeadlineExceededError)
                ):
                    raise self._out_of_time(view, began, tokens) from error
                self._failed_attempt(view, error, began, tokens)
                produced += tokens
                continue
            finally:
                dispatcher.release(view.node_id)
                self.entry.current = None
            attempt_tokens = final.usage.completion_tokens or tokens
            self._succeeded(view, began, attempt_tokens)
            yield self._result(
                (view.node_id, view.name),
                final,
                "".join(sent),
                produced + attempt_tokens,
                self._first_ms(),
            )
            return

    def _tokens_left(self, produced: int) -> int | None:
        """Tokens still to generate after `produced`; None: no limit (the node's default)."""
        sampling = self.task.request.sampling
        if not sampling.HasField("max_tokens"):
            return None
        return max(0, sampling.max_tokens - produced)

    def _first_ms(self) -> float:
        at = self.first_token_at if self.first_token_at is not None else self.clock()
        return (at - self.started_at) * 1000.0
