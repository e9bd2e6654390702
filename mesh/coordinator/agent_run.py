"""One agent task's way through the mesh: route, run, keep the step log, fail over, escalate.

An agent task runs `RunAgent` on a node that offers the agent (and serves the task's model
tier). Every step the node completes is streamed to the caller at once and kept here. If the
node dies (UNAVAILABLE, broken stream, silent past the per-attempt timeout), the task goes to
another node that offers the agent, with the same task id, the next attempt number and
`completed_steps` = the steps received so far: the new node puts them back into the
conversation and never runs their tools again, so a side-effecting tool that was reported is
never executed twice.

When the answer shows that the tier was not enough (`escalation.escalation_trigger`), the task
moves to the next tier with the steps worth keeping; the answer says which tier answered and
why. `--agent auto` first asks a node's intent router (Classify) which agent to run.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator

from edgemesh.v1 import node_pb2
from mesh.coordinator.attempts import WAITING, Attempt, Attempts
from mesh.coordinator.escalation import (
    AUTO_AGENT,
    escalated_max_steps,
    escalation_trigger,
    first_tier,
    next_tier,
    steps_to_keep,
    tier_name,
)
from mesh.coordinator.intent import routed_by
from mesh.coordinator.pool import NodeLink, NodePool
from mesh.coordinator.settings import DispatcherSettings
from mesh.coordinator.tasks import AttemptOutcome, LedgerEntry, TaskResult, TaskSpec
from mesh.core.errors import InvalidRequestError, MeshError, NotFoundError, UnavailableError
from mesh.core.ids import NodeId
from mesh.core.untrusted import quoted
from mesh.nodes_view import NodeView
from mesh.routing import TaskShape

AgentItem = str | node_pb2.AgentStep | TaskResult
_CLASSIFY_TRIES = 2  # classifier nodes asked before `--agent auto` gives up


def agent_input(request: node_pb2.GenerateRequest) -> tuple[str, list[node_pb2.ChatMessage]]:
    """(the input, earlier turns): the prompt, or the last user message of a chat."""
    if request.prompt.strip() or not request.messages:
        return request.prompt, list(request.messages)
    messages = list(request.messages)
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=None)
    if last_user is None:
        raise InvalidRequestError("an agent task needs a prompt or a user message")
    return messages[last_user].content, messages[:last_user] + messages[last_user + 1 :]


class AgentRun:
    """One agent task: `unary()` or `stream()`, each called at most once."""

    def __init__(
        self, pool: NodePool, settings: DispatcherSettings, task: TaskSpec, entry: LedgerEntry
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.task = task
        self.policy = settings.escalation
        self.agent = task.agent or ""
        self.routed_by = "request"
        self.input, self.history = agent_input(task.request)
        self.steps: list[node_pb2.AgentStep] = []  # this tier's steps, replayed ones included
        self.prompt_tokens = 0  # of tier runs that were escalated
        self._answer: tuple[node_pb2.AgentResult, NodeView] | None = None
        self.attempts = Attempts(
            pool, settings, task, entry, TaskShape(agent=self.agent, labels=task.labels)
        )

    # ------------------------------------------------------------------ entry points

    async def unary(self) -> TaskResult:
        result = None
        async for item in self.stream():
            if isinstance(item, TaskResult):
                result = item
        assert result is not None  # stream() ends with the result or raises
        return result

    async def stream(self) -> AsyncGenerator[AgentItem, None]:  # type: ignore[override]
        """Each step as it completes, the answer text, then the TaskResult."""
        confidence = None
        if self.agent == AUTO_AGENT:
            confidence = await self._route()
        choice = first_tier(
            self.policy, requested=self.task.tier or self.task.model or "", confidence=confidence
        )
        level, model, max_steps = choice.level, choice.model, 0
        reasons = [choice.reason] if choice.reason else []
        if level and not self._tier_served(model):
            if choice.reason == "requested":
                raise NotFoundError(
                    f"no ready node runs agent {quoted(self.agent)} on tier {quoted(model)}"
                )
            reasons, level, model = [], 0, self.policy.tiers[0]  # unsure, but nothing higher
        kept: list[node_pb2.AgentStep] = []
        answered: tuple[node_pb2.AgentResult, NodeView, int] | None = None  # last that answered
        fell_back = False
        while True:
            async with contextlib.aclosing(self._run_tier(model, kept, max_steps)) as steps:
                async for step in steps:
                    yield step
            assert self._answer is not None  # _run_tier returns only with an answer
            result, view = self._answer
            name = tier_name(self.policy, level)
            why = escalation_trigger(self.policy, result.finish_reason, result.steps)
            if result.finish_reason == "answer":
                answered = (result, view, level)
            higher = next_tier(self.policy, level) if why and not fell_back else None
            target = None
            if higher is not None and self._tier_served(self.policy.tiers[higher]):
                reasons.append(f"{name}: {why}")
                target = higher
            elif why and result.finish_reason != "answer":
                # No higher tier, and this one gave no answer: keep a lower tier's answer, or
                # (the task started high: the router was unsure) try the lowest tier once.
                if answered is not None:
                    result, view, level = answered
                    reasons.append(
                        f"{name}: {why}; kept the {tier_name(self.policy, level)} answer"
                    )
                elif level and not fell_back and self._tier_served(self.policy.tiers[0]):
                    reasons.append(f"{name}: {why}; fell back to {self.policy.tiers[0]}")
                    target, fell_back = 0, True
            if target is not None:
                kept = steps_to_keep(result.steps)
                max_steps = escalated_max_steps(kept, result.finish_reason)
                self.prompt_tokens += result.usage.prompt_tokens
                level, model = target, self.policy.tiers[target]
                continue
            if result.answer:
                yield result.answer
            yield self._task_result(
                view, result, tier_name(self.policy, level, result.model), "; ".join(reasons)
            )
            return

    # ------------------------------------------------------------------ routing

    async def _route(self) -> float:
        """Ask a classifier which agent the request is for; returns the confidence."""
        pool = self.pool
        asked: set[NodeId] = set()
        last_error: MeshError | None = None
        for _ in range(_CLASSIFY_TRIES):
            found = await pool.classifiers.find(
                pool.views(),
                pool.link,
                model=self.policy.router_model,  # type: ignore[arg-type]
                exclude=asked,
            )
            if found is None:
                break
            view, model = found
            asked.add(view.node_id)
            link = pool.link(view)
            timeout_s = min(self.settings.classify_timeout_s, self.attempts.remaining_s())
            try:
                reply = await link.classify(self.input, model=model, timeout_s=timeout_s)
            except MeshError as error:
                last_error = error
                pool.classifiers.forget(view.node_id)
                continue
            if not pool.serves_ready(TaskShape(agent=reply.label)):
                raise NotFoundError(
                    f"the intent router chose agent {quoted(reply.label)} "
                    f"(confidence {reply.confidence:.2f}), which no ready node offers"
                )
            self.agent = reply.label
            self.attempts.shape = TaskShape(agent=self.agent, labels=self.task.labels)
            self.routed_by = routed_by(reply.model or model, reply.confidence)
            return reply.confidence
        if last_error is not None:
            raise UnavailableError(
                f"--agent auto: the intent router failed: {last_error}", task_id=self.task.task_id
            )
        raise NotFoundError(
            "--agent auto needs a node serving a text-classification model "
            "(every node serves the bundled intent router unless started with --no-router); "
            "none is ready"
        )

    def _tier_served(self, model: str) -> bool:
        shape = TaskShape(agent=self.agent, model=model or None, labels=self.task.labels)
        return self.pool.serves_ready(shape)

    # ------------------------------------------------------------------ one tier

    def _agent_request(self, attempt: Attempt, model: str, max_steps: int) -> node_pb2.AgentRequest:
        context = node_pb2.TaskContext()
        context.CopyFrom(attempt.context)  # who is asking (key name, subject) included
        context.agent = self.agent
        return node_pb2.AgentRequest(
            agent=self.agent,
            input=self.input,
            history=self.history,
            task=context,
            completed_steps=self.steps,
            model=model,
            max_steps=max_steps,
            report_waiting_ms=self.attempts.waiting_report_ms(),
        )

    @staticmethod
    def _fatal(error: BaseException) -> bool:
        """Unlike a model task, a node's NOT_FOUND (its agent list changed since the registry
        read it) is retried elsewhere; only an invalid request ends the task."""
        return isinstance(error, InvalidRequestError)

    async def _run_tier(
        self, model: str, kept: list[node_pb2.AgentStep], max_steps: int
    ) -> AsyncGenerator[node_pb2.AgentStep, None]:
        """Run the agent on `model` (empty: its own) until a node returns a result, which is
        left in `self._answer`; yields each new step. The steps received are replayed on the
        next node when an attempt fails."""
        self.attempts.new_round(
            TaskShape(agent=self.agent, model=model or None, labels=self.task.labels)
        )
        self.steps = list(kept)

        async def call(
            link: NodeLink, attempt: Attempt
        ) -> AsyncGenerator[node_pb2.AgentStep, None]:
            request = self._agent_request(attempt, model, max_steps)
            events = link.run_agent(request, timeout_s=attempt.rpc_timeout_s)
            try:
                async for event in events:
                    if event.waiting:
                        yield WAITING  # queued behind other work on the node: not silent
                        continue
                    if event.HasField("result"):
                        self._answer = (event.result, attempt.view)
                        attempt.answered = True
                        return
                    if event.HasField("step"):
                        self.steps.append(event.step)
                        attempt.progress(event.step.tokens)
                        yield event.step
                    # `text` events repeat the answer, which the result carries too.
            finally:
                await events.aclose()  # type: ignore[attr-defined]

        steps = self.attempts.run(call, fatal=self._fatal, measure=False)
        async with contextlib.aclosing(steps):
            async for step in steps:
                yield step

    def _task_result(
        self, view: NodeView, result: node_pb2.AgentResult, tier: str, reason: str
    ) -> TaskResult:
        steps = tuple(result.steps)
        attempts = self.attempts
        records = attempts.records
        return TaskResult(
            task_id=self.task.task_id,
            text=result.answer,
            finish_reason=result.finish_reason,
            node_id=view.node_id,
            node_name=view.name,
            model=result.model,
            agent=self.agent,
            prompt_tokens=self.prompt_tokens + result.usage.prompt_tokens,
            completion_tokens=sum(a.completion_tokens for a in records),
            attempts=tuple(records),
            failed_over=any(a.outcome is not AttemptOutcome.OK for a in records),
            total_ms=(attempts.clock() - attempts.started_at) * 1000.0,
            time_to_first_token_ms=attempts.first_ms(),
            steps=steps,
            tier=tier,
            escalation_reason=reason,
            routed_by=self.routed_by,
        )
