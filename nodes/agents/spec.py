"""Agent definitions: a model, a system prompt, the tools it may call, and how its loop is bounded.

An `AgentSpec` is plain data: it appears in node config files (`agents:`) and is
built in Python with `Agent(...)`, which also accepts `Tool` objects in place of
tool names.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from mesh.core.agent_limits import MAX_AGENT_STEPS
from mesh.core.model import FrozenModel
from nodes.tools import Tool, ToolRegistry

AgentName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9._-]*$")]


class AgentSpec(FrozenModel):
    """One agent: what a node needs to run its tool-calling loop."""

    name: AgentName
    description: str = ""
    # The model alias on the node; "" means the node's default model.
    model: str = ""
    system_prompt: Annotated[str, Field(min_length=1)] = "You are a helpful assistant."
    tools: tuple[str, ...] = ()
    max_steps: Annotated[int, Field(ge=1, le=MAX_AGENT_STEPS)] = 4
    # The answer's JSON schema; None: the answer is free text.
    output_schema: dict[str, Any] | None = None
    # How many tools the model is offered for a request, the most relevant first
    # (0: all of them). Small models choose far better between one tool and an answer
    # than among many tools.
    offered_tools: Annotated[int, Field(ge=0, le=32)] = 0
    # "required": the first step must call one of the offered tools (when any is
    # relevant to the request); "auto": the model may answer at once.
    tool_choice: Literal["auto", "required"] = "auto"
    # Whether the model may call a tool it already called successfully in this task.
    allow_repeat_calls: bool = False
    repair_attempts: Annotated[int, Field(ge=0, le=3)] = 1
    max_tokens_per_step: Annotated[int, Field(ge=8, le=4096)] = 160
    # Longest free-text answer, enforced by the grammar (0: no limit; see decision_schema).
    max_answer_chars: Annotated[int, Field(ge=0, le=4000)] = 160
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.0

    @field_validator("tools")
    @classmethod
    def _unique_tools(cls, tools: tuple[str, ...]) -> tuple[str, ...]:
        duplicates = sorted({t for t in tools if tools.count(t) > 1})
        if duplicates:
            raise ValueError(f"tool(s) listed twice: {', '.join(duplicates)}")
        return tools

    def required_datasets(self, registry: ToolRegistry) -> frozenset[str]:
        """The datasets a node must hold to run this agent: those its tools declare."""
        return frozenset(
            d for name in self.tools if name in registry for d in registry.get(name).data
        )

    def missing_tools(self, registry: ToolRegistry) -> list[str]:
        return [name for name in self.tools if name not in registry]


def Agent(  # noqa: N802 - reads as a definition: Agent("returns", tools=[...])
    name: str,
    *,
    tools: Iterable[Tool | str] = (),
    system_prompt: str = "You are a helpful assistant.",
    **options: Any,
) -> AgentSpec:
    """Define an agent in a few lines: tools may be `Tool` objects (from `@tool`) or names."""
    names = tuple(t.name if isinstance(t, Tool) else t for t in tools)
    return AgentSpec(name=name, tools=names, system_prompt=system_prompt, **options)
