"""Model tiers for agent tasks: where a task starts and when it moves up. Pure policy, no I/O.

A topology lists tiers smallest first (`escalation: {tiers: [smollm2, gemma, large]}`). An agent
task starts on the first tier (or the one it asks for, or the second when the intent router was
unsure) and moves to the next tier when its result shows the model was not enough:

    choice = first_tier(policy, requested=task.tier, confidence=0.42)
    ... run the agent with AgentRequest.model = choice.model ...
    why = escalation_trigger(policy, result.finish_reason, result.steps)
    if why and next_tier(policy, choice.level) is not None:
        completed = steps_to_keep(result.steps)   # replayed on the next tier, never re-run

The mechanism (which node, retries, replay) is `mesh/coordinator/agent_run.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from pydantic import Field

from mesh.core.agent_limits import escalation_max_steps
from mesh.core.errors import InvalidRequestError
from mesh.core.model import FrozenModel
from mesh.core.untrusted import quoted

if TYPE_CHECKING:
    from edgemesh.v1 import node_pb2
    from mesh.topology import EscalationSpec

AUTO_AGENT = "auto"  # SubmitRequest.agent: let the intent router choose
_DETAIL_CHARS = 120


class EscalationPolicy(FrozenModel):
    """The topology's `escalation` section as the dispatcher uses it."""

    tiers: tuple[str, ...] = ()  # model aliases, smallest first; (): agents use their own model
    min_router_confidence: Annotated[float, Field(ge=0, le=1)] = 0.6
    on_invalid_tool_calls: bool = True
    on_tool_error: bool = True
    on_no_answer: bool = True
    router_model: str | None = None  # the classifier model id; None: any text-classification model

    @classmethod
    def from_spec(cls, spec: EscalationSpec) -> EscalationPolicy:
        return cls(
            tiers=spec.tiers,
            min_router_confidence=spec.min_router_confidence,
            on_invalid_tool_calls=spec.on_invalid_tool_calls,
            on_tool_error=spec.on_tool_error,
            on_no_answer=spec.on_no_answer,
            router_model=spec.router_model,
        )


@dataclass(frozen=True, slots=True)
class TierChoice:
    level: int  # index into the tiers (0 without tiers)
    model: str  # AgentRequest.model: "" runs the agent on its own model
    reason: str  # why the task starts above the lowest tier ("" when it does not)


def tier_name(policy: EscalationPolicy, level: int, fallback: str = "") -> str:
    """The tier's alias, or `fallback` (the model that answered) when there are no tiers."""
    return policy.tiers[level] if policy.tiers else fallback


def first_tier(
    policy: EscalationPolicy, *, requested: str = "", confidence: float | None = None
) -> TierChoice:
    """Where a task starts: the tier it asks for, else the second tier when the router's
    confidence is below the threshold, else the first. InvalidRequestError for an unknown tier."""
    tiers = policy.tiers
    if not tiers:  # no tiers: a requested model is simply the model the agent runs on
        return TierChoice(0, requested, "")
    if requested:
        if requested not in tiers:
            raise InvalidRequestError(
                f"tier {quoted(requested)} is not one of this mesh's tiers: {', '.join(tiers)}"
            )
        level = tiers.index(requested)
        return TierChoice(level, requested, "requested" if level else "")
    threshold = policy.min_router_confidence
    if confidence is not None and confidence < threshold and len(tiers) > 1:
        digits = 2 if f"{confidence:.2f}" != f"{threshold:.2f}" else 3  # never "0.60 < 0.60"
        return TierChoice(
            1,
            tiers[1],
            f"router confidence {confidence:.{digits}f} is below {threshold:.{digits}f}",
        )
    return TierChoice(0, tiers[0], "")


def next_tier(policy: EscalationPolicy, level: int) -> int | None:
    return level + 1 if level + 1 < len(policy.tiers) else None


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 3] + "..."


def _failed_call(steps: Sequence[node_pb2.AgentStep]) -> int | None:
    """Index (in `steps`) of the tool call the answer rests on, when the tool rejected it:
    the last tool call, if it has an error."""
    calls = [position for position, step in enumerate(steps) if step.kind == "tool_call"]
    if calls and steps[calls[-1]].error:
        return calls[-1]
    return None


def escalation_trigger(
    policy: EscalationPolicy, finish_reason: str, steps: Sequence[node_pb2.AgentStep]
) -> str:
    """Why an agent's result should go to the next tier; "" when it should not.

    - "invalid_tool_calls": the node gave up, the model's tool calls stayed invalid after repair;
    - "max_steps": the agent used every step without answering;
    - a tool error: the last tool call was rejected by the tool (the 135M model writes
      `anana@example.com` for `ana@example.com`, and then reports "no customer").
    """
    if finish_reason == "invalid_tool_calls" and policy.on_invalid_tool_calls:
        invalid = next((s for s in reversed(steps) if s.kind == "invalid"), None)
        detail = f" ({_short(invalid.error)})" if invalid is not None and invalid.error else ""
        return f"tool calls stayed invalid after repair{detail}"
    if finish_reason == "max_steps" and policy.on_no_answer:
        return f"no answer within {len(steps)} steps"
    failed = _failed_call(steps) if policy.on_tool_error else None
    if failed is not None:
        step = steps[failed]
        return f"tool {step.call.tool} rejected the call ({_short(step.error)})"
    return ""


def steps_to_keep(steps: Sequence[node_pb2.AgentStep]) -> list[node_pb2.AgentStep]:
    """The steps the next tier replays (their tools never run again): everything before the
    step that failed. Dropped: invalid steps, the rejected tool call and the answer built on it,
    and a final answer. Successful tool calls (side effects included) are kept."""
    end = len(steps)
    failed = _failed_call(steps)
    if failed is not None:
        end = failed
    while end and steps[end - 1].kind in ("invalid", "final"):
        end -= 1
    return list(steps[:end])


def escalated_max_steps(kept: Sequence[node_pb2.AgentStep], finish_reason: str) -> int:
    """AgentRequest.max_steps for the next tier: 0 (the agent's own limit), except after
    "max_steps", where the replayed steps alone would use the whole limit: room for one more
    tool call and the answer, never above 16: what nodes accept (mesh.core.agent_limits)."""
    if finish_reason == "max_steps":
        return escalation_max_steps(len(kept))  # what nodes accept (mesh.core.agent_limits)
    return 0
