"""Model tasks through the mesh: a unary answer, or a stream that continues on another node.

Both are thin clients of the one attempt loop (`attempts.Attempts.run`): each says how one
attempt calls a node and what the caller sees of it. Agent tasks are `agent_run.py`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator

from edgemesh.v1 import node_pb2
from mesh.coordinator.attempts import WAITING, Attempt, Attempts
from mesh.coordinator.pool import NodeLink, NodePool
from mesh.coordinator.settings import DispatcherSettings
from mesh.coordinator.tasks import LedgerEntry, TaskResult, TaskSpec
from mesh.routing import TaskShape

_HAS_TOKEN_COUNT = "tokens" in node_pb2.GenerateChunk.DESCRIPTOR.fields_by_name


def chunk_tokens(chunk: node_pb2.GenerateChunk) -> int:
    """Tokens a chunk carries (`GenerateChunk.tokens`: a node merges several tokens into one
    chunk when its reader is slow). A continued stream asks the next node for exactly the
    tokens still missing. A node too old to say counts one per chunk: a lower bound, so such a
    continuation may run a few tokens past max_tokens but never stops short."""
    if _HAS_TOKEN_COUNT:
        return int(getattr(chunk, "tokens", 0)) or 1
    return 1


class TaskRun:
    """One model task (no agent): `unary()` or `stream()`, each called at most once."""

    def __init__(
        self, pool: NodePool, settings: DispatcherSettings, task: TaskSpec, entry: LedgerEntry
    ) -> None:
        self.task = task
        self.settings = settings
        self.attempts = Attempts(
            pool,
            settings,
            task,
            entry,
            TaskShape(model=task.model or None, labels=task.labels, session=task.session),
        )
        self._sent: list[str] = []  # streams: text the caller already has
        self._produced = 0  # streams: tokens of that text
        # Streams: the ids of those tokens and the hash of the model file that sampled them,
        # while every token sent has its id (None once one has not: continue from the text).
        self._token_ids: list[int] | None = [] if settings.resume_from_token_ids else None
        self._ids_model_hash = ""
        self._final: tuple[Attempt, node_pb2.GenerateResponse] | None = None
        self._broken: Attempt | None = None  # streams: the last attempt that broke
        # JSON constrained by a schema (tools, response_format) is taken whole: an attempt's
        # text is passed on only once its node ended it, and a broken attempt is run again
        # from the start (the grammar cannot continue another node's half-written JSON).
        self._whole = bool(task.request.json_schema)

    def _request(self, attempt: Attempt) -> node_pb2.GenerateRequest:
        request = node_pb2.GenerateRequest()
        request.CopyFrom(self.task.request)
        request.task.CopyFrom(attempt.context)
        request.report_waiting_ms = self.attempts.waiting_report_ms()
        if self._sent:
            request.continuation = self.task.request.continuation + "".join(self._sent)
            if self._token_ids and self._same_model(attempt):
                request.continuation_token_ids.extend(self._token_ids)
        if self._produced and request.sampling.HasField("max_tokens"):
            request.sampling.max_tokens = request.sampling.max_tokens - self._produced
        return request

    def _same_model(self, attempt: Attempt) -> bool:
        """Whether `attempt`'s node runs the model file that sampled the token ids so far."""
        model_hash = attempt.view.model_hash(self.task.model)
        return bool(model_hash) and model_hash == self._ids_model_hash

    def _took(self, attempt: Attempt, chunk: node_pb2.GenerateChunk) -> None:
        """Keep the ids of a chunk's tokens, or stop keeping any where it lacks some."""
        if self._token_ids is None:
            return
        if not self._token_ids:  # the first tokens of the answer: who sampled them
            self._ids_model_hash = attempt.view.model_hash(self.task.model)
        ids = chunk.token_ids
        if ids and len(ids) == chunk_tokens(chunk) and self._ids_model_hash:
            self._token_ids.extend(ids)
        else:
            self._token_ids = None

    def _result(
        self,
        attempt: Attempt,
        final: node_pb2.GenerateResponse,
        text: str,
        tokens: int,
        first_ms: float,
    ) -> TaskResult:
        """The answer; `attempt`'s node gave its last part."""
        attempts = self.attempts
        return TaskResult(
            task_id=self.task.task_id,
            text=text,
            finish_reason=final.finish_reason,
            node_id=attempt.view.node_id,
            node_name=attempt.view.name,
            model=final.model or self.task.model or "",
            agent=self.task.agent or "",
            prompt_tokens=final.usage.prompt_tokens,
            completion_tokens=tokens,
            attempts=tuple(attempts.records),
            failed_over=len(attempts.records) > 1,
            total_ms=(attempts.clock() - attempts.started_at) * 1000.0,
            time_to_first_token_ms=first_ms,
        )

    # ------------------------------------------------------------------ unary

    async def unary(self) -> TaskResult:
        """The whole answer. It is streamed from the node all the same, so that a node that
        keeps producing (or says it still queues the request) is never cut off as silent,
        and an answer broken halfway continues on another node from what was produced."""
        result = None
        async with contextlib.aclosing(self.stream()) as items:
            async for item in items:
                if isinstance(item, TaskResult):
                    result = item
        assert result is not None  # stream() ends with the result or raises
        return result

    # ------------------------------------------------------------------ streaming

    async def _call_stream(self, link: NodeLink, attempt: Attempt) -> AsyncGenerator[str, None]:
        chunks = link.stream_request(self._request(attempt), timeout_s=attempt.rpc_timeout_s)
        held: list[str] = []  # a whole answer's text, until its node ends it
        try:
            async for chunk in chunks:
                if chunk.waiting:
                    yield WAITING  # queued behind other work on the node: not silent
                    continue
                if chunk.HasField("final"):
                    if chunk.final.HasField("usage"):  # exact, even where a chunk said none
                        attempt.tokens = chunk.final.usage.completion_tokens
                    self._final = (attempt, chunk.final)
                    attempt.answered = True
                    if held:
                        self._sent.append("".join(held))
                        yield self._sent[-1]
                    return
                if chunk.text and self._whole:
                    held.append(chunk.text)
                    attempt.progress(chunk_tokens(chunk))
                    yield WAITING  # progress, kept back until the answer is whole
                elif chunk.text:
                    self._sent.append(chunk.text)
                    self._took(attempt, chunk)
                    attempt.progress(chunk_tokens(chunk))
                    yield chunk.text
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]

    def _after_failure(self, attempt: Attempt) -> bool:
        if self._whole:
            return True  # nothing of it was passed on: the next attempt starts afresh
        if attempt.tokens and not self.settings.resume_streams:
            raise self.attempts.failure(
                f"the stream broke after {attempt.tokens} tokens and resuming is off"
            )
        self._produced += attempt.tokens
        self._broken = attempt
        # Go on unless the broken attempt sent every token asked for.
        return not (self._produced and self._tokens_left() == 0)

    async def stream(self) -> AsyncGenerator[str | TaskResult, None]:
        """Text pieces, then the result. After a failure mid-answer the next node continues from
        the text already sent, with max_tokens reduced by the tokens already produced; a node
        with the same model file also gets the ids of those tokens, to go on token for token."""
        # Closed with this generator, so a caller that goes away frees the node at once.
        pieces = self.attempts.run(self._call_stream, after_failure=self._after_failure)
        async with contextlib.aclosing(pieces):
            async for piece in pieces:
                yield piece
        text, first_ms = "".join(self._sent), self.attempts.first_ms()
        if self._final is None:
            # The broken attempt sent every token asked for: the answer is complete, and the
            # node that sent its end is the one that answered (no other is needed).
            assert self._broken is not None  # run() ended after a failure, not an answer
            final = node_pb2.GenerateResponse(finish_reason="length")
            yield self._result(self._broken, final, text, self._produced, first_ms)
            return
        attempt, final = self._final
        yield self._result(attempt, final, text, self._produced + attempt.tokens, first_ms)

    def _tokens_left(self) -> int | None:
        """Tokens still to generate; None: no limit (the node's default)."""
        sampling = self.task.request.sampling
        if not sampling.HasField("max_tokens"):
            return None
        return max(0, sampling.max_tokens - self._produced)
