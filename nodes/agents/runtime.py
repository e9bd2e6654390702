"""The agent loop on a node: the model decides, the node runs the tool, the result goes back.

Each step the model writes one JSON object constrained by a grammar (see
`decision.py`): a call to one of the tools offered at this step, or the final
answer. The arguments are validated against the tool's schema; an invalid reply
is shown back to the model with the error (a repair), and if it stays invalid
the step is recorded as "invalid" and the task ends so that the caller can
escalate. The last allowed step may only answer, so a task ends with an answer
unless the model cannot produce valid JSON at all.

Steps completed elsewhere (`AgentTask.completed_steps`, after a failover) go back
into the conversation as they were, once checked (`replay.py`: a caller may forge
them): their tools are never run again. Within a task, a non-idempotent tool called
again with the same arguments returns the first result instead of acting twice, and
its idempotency key (task id and step index) lets the tool itself refuse a duplicate.

Every step executed here (never a replayed one) goes to the audit log (`nodes/audit.py`)
as it is recorded, and a tool call cancelled while it runs is logged too: it may have acted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

from mesh.core.errors import NotFoundError, NotReadyError
from mesh.core.untrusted import quoted
from nodes.agents.decision import (
    Decision,
    DecisionError,
    FinalDecision,
    ToolCallDecision,
    decision_schema,
    parse_decision,
    select_tools,
)
from nodes.agents.prompts import clip, repair_messages, step_messages
from nodes.agents.records import (
    AgentEventData,
    AgentOutcome,
    AgentTask,
    AnswerEvent,
    FinishReason,
    OutcomeEvent,
    StepEvent,
    StepRecord,
)
from nodes.agents.replay import (
    bounded_result,
    check_max_steps,
    check_replay,
    clip_error,
    step_text_bytes,
)
from nodes.agents.spec import AgentSpec
from nodes.audit import AuditLog, StepOutcome
from nodes.backends import Backend, Completion, GenerationInput, Message, ModelStatus
from nodes.task_counts import TaskCounts, TaskEvent
from nodes.tools import Tool, ToolAccessDenied, ToolContext, ToolError, ToolRegistry

logger = logging.getLogger(__name__)


class _StepFields(TypedDict):
    """The StepRecord fields that every kind of step fills the same way."""

    index: int
    tokens: int
    model: str
    node_id: str


@dataclass(frozen=True)
class _Attempts:
    """The outcome of asking the model for one decision, repairs included."""

    decision: Decision | None
    reply: str
    error: str
    prompt_tokens: int
    completion_tokens: int


def offered_tools(
    spec: AgentSpec, relevant: Sequence[Tool], steps: Sequence[StepRecord]
) -> list[Tool]:
    """The tools the model may call at the next step (before the last one)."""
    if spec.allow_repeat_calls:
        return list(relevant)
    done = {s.tool for s in steps if s.kind == "tool_call" and not s.error}
    return [t for t in relevant if t.name not in done]


class AgentRuntime:
    """Runs agents with the node's models and tools."""

    def __init__(
        self,
        backends: Mapping[str, Backend],
        registry: ToolRegistry,
        *,
        default_model: str = "",
        node_id: str = "",
        store: Any = None,
        counts: TaskCounts | None = None,
        audit: AuditLog | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.backends = backends
        self.registry = registry
        self.default_model = default_model or next(iter(backends), "")
        self.node_id = node_id
        self.store = store
        self.counts = counts  # side-effecting tool executions are counted per task
        self.audit = audit  # one line per step executed here; None: not audited
        self._clock = clock
        # Models the node loads when asked (nodes/model_manager.py): not refused as unloaded.
        self.on_demand: Callable[[str], bool] = lambda _model_id: False

    def model_for(self, spec: AgentSpec, override: str = "") -> str:
        return override or spec.model or self.default_model

    def backend_for(self, spec: AgentSpec, override: str = "") -> Backend:
        model_id = self.model_for(spec, override)
        backend = self.backends.get(model_id)
        if backend is None:
            raise NotFoundError(
                f"agent {spec.name} needs model {quoted(model_id)}, which this node "
                f"does not serve; it serves: {', '.join(sorted(self.backends))}"
            )
        if backend.status is not ModelStatus.READY and not self.on_demand(model_id):
            raise NotReadyError(f"model {model_id!r} is {backend.status.value}; retry when ready")
        return backend

    def check(self, spec: AgentSpec, task: AgentTask) -> tuple[Backend, int, list[StepRecord]]:
        """(the backend, the step limit, the replayed steps) of `task`; InvalidRequestError,
        NotFoundError or NotReadyError before any work when the task cannot run as asked."""
        steps = check_replay(task.completed_steps, spec, self.registry)
        max_steps = check_max_steps(spec, task.max_steps, len(steps))
        return self.backend_for(spec, task.model), max_steps, steps

    async def run(self, spec: AgentSpec, task: AgentTask) -> AsyncIterator[AgentEventData]:
        """Run `task`; yields a StepEvent per new step, the answer text, then the outcome."""
        began = self._clock()
        backend, max_steps, steps = self.check(spec, task)
        model_id = backend.descriptor.model_id
        tools = [self.registry.get(name) for name in spec.tools]
        relevant = select_tools(task.input, tools, spec.offered_tools)
        text_bytes = step_text_bytes(spec)  # what a replay of these steps may carry
        prompt_tokens = completion_tokens = 0

        def outcome(answer: str, reason: FinishReason) -> OutcomeEvent:
            return OutcomeEvent(
                outcome=AgentOutcome(
                    agent=spec.name,
                    answer=answer,
                    finish_reason=reason,
                    steps=tuple(steps),
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                    total_ms=(self._clock() - began) * 1000,
                    model=model_id,
                    node_id=self.node_id,
                )
            )

        if steps and steps[-1].kind == "final":  # finished elsewhere; only the result was lost
            answer = json.loads(steps[-1].result_json or "{}").get("final", "")
            yield AnswerEvent(text=answer)
            yield outcome(answer, "answer")
            return
        for index in range(len(steps), max_steps):
            step_began = self._clock()
            offered = [] if index == max_steps - 1 else offered_tools(spec, relevant, steps)
            first_call = not any(s.kind == "tool_call" for s in steps)
            allow_final = not (spec.tool_choice == "required" and offered and first_call)
            messages = step_messages(spec, relevant, task, steps)
            attempt = await self._decide(backend, spec, messages, offered, allow_final)
            prompt_tokens += attempt.prompt_tokens
            completion_tokens += attempt.completion_tokens
            common = _StepFields(
                index=index, tokens=attempt.completion_tokens, model=model_id, node_id=self.node_id
            )
            decision = attempt.decision
            if decision is None:
                steps.append(
                    StepRecord(
                        kind="invalid",
                        result_json=json.dumps({"reply": clip(attempt.reply, text_bytes // 16)}),
                        error=clip_error(attempt.error),
                        duration_ms=(self._clock() - step_began) * 1000,
                        **common,
                    )
                )
                self._audit(task, steps[-1], StepOutcome.INVALID)
                yield StepEvent(step=steps[-1])
                yield outcome("", "invalid_tool_calls")
                return
            if isinstance(decision, FinalDecision):
                steps.append(
                    StepRecord(
                        kind="final",
                        result_json=decision.to_json(),
                        duration_ms=(self._clock() - step_began) * 1000,
                        **common,
                    )
                )
                self._audit(task, steps[-1], StepOutcome.OK)
                yield StepEvent(step=steps[-1])
                yield AnswerEvent(text=decision.text())
                yield outcome(decision.text(), "answer")
                return
            tool_began = self._clock()
            try:
                result_json, error, idempotent, ran = await self._execute(
                    decision, task, index, steps
                )
            except asyncio.CancelledError:  # the caller went away while the tool ran: it may
                # have acted (a worker thread runs on), so the audit says it was called
                self._audit_call(task, index, decision.tool, model_id, StepOutcome.CANCELLED)
                raise
            tool_ms = (self._clock() - tool_began) * 1000
            steps.append(
                StepRecord(
                    kind="tool_call",
                    tool=decision.tool,
                    arguments_json=json.dumps(decision.arguments),
                    result_json=bounded_result(result_json, text_bytes),
                    idempotent=idempotent,
                    error=clip_error(error),
                    duration_ms=(self._clock() - step_began) * 1000,
                    tool_ms=tool_ms,
                    **common,
                )
            )
            self._audit(task, steps[-1], ran)
            yield StepEvent(step=steps[-1])
        yield outcome("", "max_steps")

    # ------------------------------------------------------------------ the model

    async def _decide(
        self,
        backend: Backend,
        spec: AgentSpec,
        messages: list[Message],
        offered: Sequence[Tool],
        allow_final: bool,
    ) -> _Attempts:
        schema = decision_schema(
            offered,
            allow_final=allow_final,
            output_schema=spec.output_schema,
            max_answer_chars=spec.max_answer_chars,
        )
        request = GenerationInput(
            messages=tuple(messages),
            max_tokens=spec.max_tokens_per_step,
            temperature=spec.temperature,
            json_schema=json.dumps(schema),
        )
        prompt_tokens = completion_tokens = 0
        reply = error = ""
        for attempt in range(1 + spec.repair_attempts):
            reply, completion = await _generate(backend, request)
            prompt_tokens += completion.prompt_tokens
            completion_tokens += completion.completion_tokens
            try:
                decision = parse_decision(
                    reply, offered, allow_final=allow_final, output_schema=spec.output_schema
                )
            except DecisionError as invalid:
                error = str(invalid)
                logger.info(
                    "agent %s: invalid reply (attempt %d): %s", spec.name, attempt + 1, error
                )
                request = GenerationInput(
                    messages=(*request.messages, *repair_messages(reply, error)),
                    max_tokens=request.max_tokens,
                    temperature=request.temperature,
                    json_schema=request.json_schema,
                )
                continue
            return _Attempts(decision, reply, "", prompt_tokens, completion_tokens)
        return _Attempts(None, reply, error, prompt_tokens, completion_tokens)

    # ------------------------------------------------------------------ the tools

    async def _execute(
        self, call: ToolCallDecision, task: AgentTask, index: int, steps: Sequence[StepRecord]
    ) -> tuple[str, str, bool, StepOutcome]:
        """(result JSON, error, idempotent, how it went) of running one tool call."""
        tool = self.registry.get(call.tool)
        if not tool.idempotent:
            for earlier in steps:
                if (
                    earlier.kind == "tool_call"
                    and earlier.tool == call.tool
                    and not earlier.error
                    and earlier.arguments() == call.arguments
                ):
                    logger.info(
                        "task %s: %s already ran with these arguments in step %d; "
                        "not running it again",
                        task.task_id,
                        call.tool,
                        earlier.index,
                    )
                    return earlier.result_json, "", False, StepOutcome.DEDUPLICATED
        context = ToolContext(
            task_id=task.task_id,
            step_index=index,
            node_id=self.node_id,
            store=self.store,
            # The API key's name too: a task id another key used once (and the coordinator has
            # since forgotten) never finds that task's side effects.
            idempotency_key=(
                f"{task.key_name}/{task.task_id}:{index}"
                if task.key_name
                else f"{task.task_id}:{index}"
            ),
            subject=task.subject,
            key_name=task.key_name,
        )
        if not tool.idempotent and self.counts is not None:  # counted before it can act
            self.counts.record(task.task_id, TaskEvent.SIDE_EFFECT_TOOL_RUN, tool=tool.name)
        try:
            value = await tool.call(call.arguments, context)
        except ToolError as error:
            how = (
                StepOutcome.DENIED
                if isinstance(error, ToolAccessDenied)
                else StepOutcome.TOOL_ERROR
            )
            return json.dumps({"error": str(error)}), str(error), tool.idempotent, how
        except TimeoutError:
            message = f"{tool.name} did not finish within {tool.timeout_s:g} s"
            return json.dumps({"error": message}), message, tool.idempotent, StepOutcome.TIMEOUT
        except Exception as error:  # noqa: BLE001 - a broken tool is reported, never crashes the node
            logger.exception("tool %s failed", tool.name)
            message = f"{tool.name} failed: {type(error).__name__}: {error}"
            return json.dumps({"error": message}), message, tool.idempotent, StepOutcome.FAILED
        return _to_json(value), "", tool.idempotent, StepOutcome.OK

    # ------------------------------------------------------------------ the audit log

    def _audit(self, task: AgentTask, step: StepRecord, how: StepOutcome) -> None:
        """Log a step this node executed (never call it for a replayed one)."""
        if self.audit is not None:
            self.audit.step(
                task,
                index=step.index,
                kind=step.kind,
                tool=step.tool,
                side_effecting=step.kind == "tool_call" and not step.idempotent,
                outcome=how,
                model=step.model,
            )

    def _audit_call(
        self, task: AgentTask, index: int, tool: str, model: str, how: StepOutcome
    ) -> None:
        """Log a tool call that left no step (cancelled while it ran)."""
        if self.audit is not None:
            self.audit.step(
                task,
                index=index,
                kind="tool_call",
                tool=tool,
                side_effecting=not self.registry.get(tool).idempotent,
                outcome=how,
                model=model,
            )


def _to_json(value: Any) -> str:
    if hasattr(value, "model_dump"):  # a pydantic model
        value = value.model_dump(mode="json")
    return json.dumps(value, default=str)


async def _generate(backend: Backend, request: GenerationInput) -> tuple[str, Completion]:
    pieces: list[str] = []
    completion = Completion()
    async with contextlib.aclosing(backend.stream(request)) as stream:
        async for piece in stream:
            pieces.append(piece.text)
            if piece.completion is not None:
                completion = piece.completion
    return "".join(pieces), completion
