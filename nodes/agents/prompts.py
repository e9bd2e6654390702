"""The conversation the model sees at each step. Pure functions.

Small models follow examples far better than instructions, so each offered tool's
worked examples become a short exchange (request, tool call, tool result, answer)
placed before the real request, the most relevant tool last. Tool results come
back as user turns starting with `Tool result:`: chat templates of small models
have no tool role.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from nodes.agents.decision import FINAL_KEY
from nodes.agents.records import AgentTask, StepRecord
from nodes.agents.spec import AgentSpec
from nodes.backends import Message
from nodes.tools import Tool

TOOL_RESULT_PREFIX = "Tool result: "
MAX_RESULT_CHARS = 600
FORMAT_RULES = (
    'Reply with one JSON object: {"tool": "<name>", "arguments": {...}} to call a tool, '
    'or {"final": "<answer>"} to answer the user. Copy values from the user\'s message.'
)


def clip(text: str, limit: int = MAX_RESULT_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def system_message(spec: AgentSpec, tools: Sequence[Tool]) -> Message:
    lines = [spec.system_prompt.strip(), FORMAT_RULES]
    if spec.output_schema:
        lines.append(
            f'The "final" value must match this JSON schema: {json.dumps(spec.output_schema)}'
        )
    if tools:
        lines.append("Tools:")
        lines += [f"- {t.signature()}: {t.description}" for t in tools]
    return Message("system", "\n".join(lines))


def example_messages(tools: Sequence[Tool]) -> list[Message]:
    """Worked examples of `tools` (given most relevant first; shown most relevant last)."""
    messages: list[Message] = []
    for tool in reversed(tools):
        for example in tool.examples[:1]:
            messages.append(Message("user", example.request))
            messages.append(
                Message(
                    "assistant", json.dumps({"tool": tool.name, "arguments": example.arguments})
                )
            )
            if example.answer:
                messages.append(Message("user", TOOL_RESULT_PREFIX + json.dumps(example.result)))
                messages.append(Message("assistant", json.dumps({FINAL_KEY: example.answer})))
    return messages


def step_messages(
    spec: AgentSpec, tools: Sequence[Tool], task: AgentTask, steps: Sequence[StepRecord]
) -> list[Message]:
    """System prompt, examples, earlier turns, the request, then every tool step so far."""
    messages = [
        system_message(spec, tools),
        *example_messages(tools),
        *task.history,
        Message("user", task.input),
    ]
    for step in steps:
        if step.kind != "tool_call":
            continue  # invalid replies teach the model nothing; a final step ends the task
        messages.append(
            Message("assistant", json.dumps({"tool": step.tool, "arguments": step.arguments()}))
        )
        messages.append(Message("user", TOOL_RESULT_PREFIX + clip(step.result_json)))
    return messages


def repair_messages(reply: str, error: str) -> list[Message]:
    """What is added after an invalid reply so that the model can correct it."""
    return [
        Message("assistant", clip(reply, 400)),
        Message("user", f"That reply is invalid: {error}. Reply again with one valid JSON object."),
    ]
