"""OpenAI function calling and structured output over any model the mesh serves. Pure functions.

A small model's chat template has no tool role and no tool syntax, so the ingress turns a
request's `tools` into what the mesh's own agents use (nodes/agents): a system message that
lists the functions and the reply format, and a JSON schema for the answer, which the node
enforces as a grammar (llama.cpp) or passes upstream as `response_format` (vLLM, Ollama,
llama-server). The model then writes exactly one JSON object:

    {"tool": "get_weather", "arguments": {"city": "Paris"}}      a call of a declared function
    {"final": "It is sunny in Paris."}                             an answer (where allowed)

`tool_choice` picks the branches: "auto" both, "required" the calls, a named function that one,
"none" no tools at all. A conversation's earlier calls (assistant `tool_calls`) and results
(`tool` messages) are written back in the same format, so the model sees what it did.
`response_format` (`json_object`, `json_schema`) constrains a plain answer the same way.

One call per reply: with `parallel_tool_calls` the model may still make one (the OpenAI API
allows fewer calls than asked for); the caller sends the result and the model calls again.
With "auto", a function already called since the last user message (its result is in the
conversation) is not offered again: a small model otherwise repeats the call it sees instead
of answering from its result (the mesh's agents do the same, nodes/agents/runtime.py). With
"required" or a named function every declared function stays callable.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mesh.core.errors import InvalidRequestError
from mesh.core.untrusted import quoted

MAX_TOOLS = 128  # OpenAI's own limit
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
TOOL_RESULT_PREFIX = "Tool result: "  # as the mesh's agents show results (nodes/agents/prompts)
FINAL_KEY = "final"
_ANSWER_CHARS_PER_TOKEN = 3  # a free-text answer's grammar closes the string by then
_MAX_ANSWER_CHARS = 2000


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    description: str = ""
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str = "function"
    function: FunctionDef


class _NamedFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str


class NamedChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str = "function"
    function: _NamedFunction


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = "answer"
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # shadows .schema
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None


ToolChoice = Literal["auto", "none", "required"] | NamedChoice


@dataclass(frozen=True)
class ToolPlan:
    """What a request with tools or a response format becomes: the system text to add, the
    answer's JSON schema ("" for free text), and how to read the answer back."""

    system: str
    schema: str
    tools: tuple[str, ...]  # the callable functions' names (none: no call may be made)
    wrapped: bool  # the answer comes as {"tool": ...} or {"final": ...}, not as itself


def plan(
    tools: Sequence[ToolDef] | None,
    choice: ToolChoice | None,
    response_format: ResponseFormat | None,
    *,
    max_tokens: int | None,
    answered: Collection[str] = (),
) -> ToolPlan | None:
    """The plan for a request, or None when it uses neither tools nor a response format.
    `answered`: functions whose results this turn already holds (`answered_calls`): with
    "auto" they are not offered again. InvalidRequestError says what is wrong."""
    answer = _answer_schema(response_format, max_tokens)
    tools = list(tools or ())
    if len(tools) > MAX_TOOLS:
        raise InvalidRequestError(f"at most {MAX_TOOLS} tools, got {len(tools)}")
    for index, tool in enumerate(tools):
        if tool.type != "function":
            raise InvalidRequestError(f"tools[{index}].type must be 'function'")
        if not _NAME.match(tool.function.name):
            raise InvalidRequestError(
                f"tools[{index}].function.name {quoted(tool.function.name, 64)} must be 1-64 "
                "letters, digits, '_' or '-'"
            )
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise InvalidRequestError("tools: two functions have the same name")
    mode = choice if choice is not None else ("auto" if tools else "none")
    if isinstance(mode, NamedChoice):
        if mode.function.name not in names:
            raise InvalidRequestError(
                f"tool_choice names {quoted(mode.function.name, 64)}, which is not among tools"
            )
        tools = [t for t in tools if t.function.name == mode.function.name]
    elif mode == "required" and not tools:
        raise InvalidRequestError("tool_choice 'required' needs at least one tool")
    if not tools:  # a response format alone: the answer is that JSON itself
        if answer is None:
            return None
        return ToolPlan(_format_rule(answer), json.dumps(answer), tools=(), wrapped=False)
    if mode == "none":  # tools in the conversation, none to call now: a final answer, in the
        # format the model has seen after each call
        return ToolPlan(
            system=_tools_system((), True, answer),
            schema=json.dumps(_call_schema((), True, answer, max_tokens)),
            tools=(),
            wrapped=True,
        )
    allow_final = mode == "auto"
    if allow_final:
        tools = [t for t in tools if t.function.name not in answered]
    return ToolPlan(
        system=_tools_system(tools, allow_final, answer),
        schema=json.dumps(_call_schema(tools, allow_final, answer, max_tokens)),
        tools=tuple(t.function.name for t in tools),
        wrapped=True,
    )


def _answer_schema(
    response_format: ResponseFormat | None, max_tokens: int | None
) -> dict[str, Any] | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return {"type": "object"}
    spec = response_format.json_schema
    if spec is None or not spec.schema_:
        raise InvalidRequestError("response_format json_schema needs json_schema.schema")
    return dict(spec.schema_)


def _format_rule(schema: Mapping[str, Any]) -> str:
    return f"Reply with JSON only, matching this JSON schema: {json.dumps(schema)}"


def _signature(tool: ToolDef) -> str:
    parameters = tool.function.parameters or {}
    properties = parameters.get("properties", {}) if isinstance(parameters, dict) else {}
    args = ", ".join(
        f"{name}: {spec.get('type', 'any') if isinstance(spec, dict) else 'any'}"
        for name, spec in properties.items()
    )
    return f"{tool.function.name}({args})"


def _tools_system(
    tools: Sequence[ToolDef], allow_final: bool, answer: Mapping[str, Any] | None
) -> str:
    if not tools:
        rule = 'Reply with one JSON object: {"final": <answer>} to answer the user.'
    else:
        rule = 'Reply with one JSON object: {"tool": "<name>", "arguments": {...}} to call a tool'
        rule += ', or {"final": <answer>} to answer the user.' if allow_final else "."
    lines = [rule, "Copy values from the user's message."]
    if allow_final and answer is not None:
        lines.append(f'The "final" value must match this JSON schema: {json.dumps(answer)}')
    if tools:
        lines.append("Tools:")
    lines += [f"- {_signature(t)}: {t.function.description}".rstrip(": ").rstrip() for t in tools]
    return "\n".join(lines)


def _strict(properties: dict[str, Any], required: Sequence[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


def _call_schema(
    tools: Sequence[ToolDef],
    allow_final: bool,
    answer: Mapping[str, Any] | None,
    max_tokens: int | None,
) -> dict[str, Any]:
    """A `oneOf` with a branch per function (its own parameter schema as `arguments`) and,
    where allowed, the final answer. `$defs` of the functions' schemas move to the root, where
    their `$ref`s point."""
    definitions: dict[str, Any] = {}
    branches = []
    for tool in tools:
        parameters = dict(tool.function.parameters or {"type": "object", "properties": {}})
        for key in ("$defs", "definitions"):
            definitions.update(parameters.pop(key, None) or {})
        branches.append(
            _strict(
                {"tool": {"const": tool.function.name}, "arguments": parameters},
                ["tool", "arguments"],
            )
        )
    if allow_final:
        final: dict[str, Any] = dict(answer) if answer is not None else {"type": "string"}
        if answer is None:
            final["maxLength"] = min(
                _MAX_ANSWER_CHARS, _ANSWER_CHARS_PER_TOKEN * (max_tokens or 256)
            )
        branches.append(_strict({FINAL_KEY: final}, [FINAL_KEY]))
    schema: dict[str, Any] = branches[0] if len(branches) == 1 else {"oneOf": branches}
    if definitions:
        schema = {**schema, "$defs": definitions}
    return schema


# ---------------------------------------------------------------------- the conversation


def history(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """OpenAI messages as plain chat turns: an assistant's `tool_calls` become the calls it
    wrote, a `tool` message the result it was shown (as the mesh's agents see them)."""
    turns: list[dict[str, str]] = []
    for index, message in enumerate(messages):
        role, content = message["role"], message.get("content") or ""
        if role == "tool":
            turns.append({"role": "user", "content": TOOL_RESULT_PREFIX + content})
            continue
        calls = message.get("tool_calls") or []
        if role == "assistant" and calls:
            for call_index, call in enumerate(calls):
                turns.append(
                    {"role": "assistant", "content": _written_call(call, index, call_index)}
                )
            continue
        if role == "developer":
            role = "system"
        turns.append({"role": role, "content": content})
    return turns


def _written_call(call: Mapping[str, Any], index: int, call_index: int) -> str:
    function = call.get("function") or {}
    name = function.get("name", "") if isinstance(function, Mapping) else ""
    raw = function.get("arguments", "{}") if isinstance(function, Mapping) else "{}"
    try:
        arguments = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError:
        raise InvalidRequestError(
            f"messages[{index}].tool_calls[{call_index}].function.arguments is not JSON"
        ) from None
    return json.dumps({"tool": name, "arguments": arguments})


def answered_calls(messages: Sequence[Mapping[str, Any]]) -> set[str]:
    """The functions called since the last user message whose results came back."""
    answered: set[str] = set()
    for message in reversed(messages):
        if message["role"] == "user":
            break
        for call in message.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, Mapping) else None
            if isinstance(function, Mapping) and isinstance(function.get("name"), str):
                answered.add(function["name"])
    return answered


def with_system(turns: list[dict[str, str]], system: str) -> list[dict[str, str]]:
    """`system` added to the conversation's first system turn (or as one, first)."""
    if turns and turns[0]["role"] == "system":
        return [{"role": "system", "content": f"{turns[0]['content']}\n{system}"}, *turns[1:]]
    return [{"role": "system", "content": system}, *turns]


# ---------------------------------------------------------------------- the answer


@dataclass(frozen=True)
class Answer:
    content: str | None
    tool_calls: list[dict[str, Any]]
    finish_reason: str


def call_id(task_id: str, index: int) -> str:
    """A tool call's id: the same for the same task (a replayed answer keeps its ids)."""
    return "call_" + hashlib.sha256(f"{task_id}:{index}".encode()).hexdigest()[:24]


def read_answer(text: str, tool_plan: ToolPlan, task_id: str, finish_reason: str) -> Answer:
    """The model's JSON reply as OpenAI's message. A reply that is not the JSON the plan asked
    for (cut by max_tokens, or from an upstream that did not constrain) is returned as text."""
    if not tool_plan.wrapped:
        return Answer(text, [], finish_reason)
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return Answer(text, [], finish_reason if finish_reason == "length" else "stop")
    if isinstance(value, dict) and value.get("tool") in tool_plan.tools:
        arguments = value.get("arguments", {})
        call = {
            "id": call_id(task_id, 0),
            "type": "function",
            "function": {"name": value["tool"], "arguments": json.dumps(arguments)},
        }
        return Answer(None, [call], "tool_calls")
    if isinstance(value, dict) and FINAL_KEY in value:
        final = value[FINAL_KEY]
        return Answer(final if isinstance(final, str) else json.dumps(final), [], finish_reason)
    return Answer(text, [], finish_reason)
