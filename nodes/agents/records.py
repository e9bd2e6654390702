"""The runtime's typed records: a task to run, each step it took, and the outcome."""

from __future__ import annotations

import json
from typing import Any, Literal

from mesh.core.model import FrozenModel
from nodes.backends import Message

StepKind = Literal["tool_call", "final", "invalid"]
FinishReason = Literal["answer", "max_steps", "invalid_tool_calls"]


class StepRecord(FrozenModel):
    """One step of an agent task; a completed step is never executed twice."""

    index: int
    kind: StepKind
    tool: str = ""
    arguments_json: str = ""
    result_json: str = ""
    idempotent: bool = True
    tokens: int = 0
    duration_ms: float = 0.0
    model: str = ""
    error: str = ""
    node_id: str = ""
    tool_ms: float = 0.0  # a tool_call step: how long the tool itself ran (the step's end)
    replayed: bool = False  # completed elsewhere and given back to this node

    def arguments(self) -> dict[str, Any]:
        value = json.loads(self.arguments_json or "{}")
        return value if isinstance(value, dict) else {}


class AgentTask(FrozenModel):
    """One run of an agent: the request and what is already done."""

    agent: str
    input: str
    task_id: str
    history: tuple[Message, ...] = ()
    completed_steps: tuple[StepRecord, ...] = ()
    model: str = ""  # overrides the agent's model (escalation)
    max_steps: int = 0  # 0: the agent's own limit
    attempt: int = 0  # the coordinator's attempt number (0: not said)
    # Who is asking (the TaskContext): the API key's name and what it stands for (e.g. a
    # customer's email), empty when nobody in particular; tools see both, the audit log names them.
    key_name: str = ""
    subject: str = ""


class AgentOutcome(FrozenModel):
    """The end of a task: the answer (or why there is none) and every step."""

    agent: str
    answer: str
    finish_reason: FinishReason
    steps: tuple[StepRecord, ...]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_ms: float = 0.0
    model: str = ""
    node_id: str = ""


class StepEvent(FrozenModel):
    step: StepRecord


class AnswerEvent(FrozenModel):
    text: str


class OutcomeEvent(FrozenModel):
    outcome: AgentOutcome


AgentEventData = StepEvent | AnswerEvent | OutcomeEvent
