"""What the model may say at each step, and reading what it said. Pure functions.

At every step the model writes one JSON object, either a tool call or the final
answer:

    {"tool": "order_status", "arguments": {"order_id": 1042}}
    {"final": "Order 1042 has shipped."}

`decision_schema` builds the JSON schema of that object for the tools offered at
this step (a `oneOf` with one branch per tool, whose `arguments` are the tool's
own parameter schema, plus the final answer); llama.cpp turns it into a grammar,
so the model cannot write anything else. `parse_decision` reads and validates the
reply anyway: other backends may not constrain, and schemas can say more than a
grammar enforces. `select_tools` ranks an agent's tools by their relevance to the
request, so a small model can be offered only the best one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mesh.core.untrusted import quoted
from nodes.tools import Tool, validate

FINAL_KEY = "final"


@dataclass(frozen=True)
class ToolCallDecision:
    tool: str
    arguments: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps({"tool": self.tool, "arguments": self.arguments})


@dataclass(frozen=True)
class FinalDecision:
    answer: Any  # a string, or a value matching the agent's output schema

    def to_json(self) -> str:
        return json.dumps({FINAL_KEY: self.answer})

    def text(self) -> str:
        return self.answer if isinstance(self.answer, str) else json.dumps(self.answer)


Decision = ToolCallDecision | FinalDecision


class DecisionError(ValueError):
    """The model's reply is not a valid decision; the message is shown to it for a repair."""


def _strict(properties: dict[str, Any], required: Sequence[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


def decision_schema(
    tools: Sequence[Tool],
    *,
    allow_final: bool = True,
    output_schema: Mapping[str, Any] | None = None,
    max_answer_chars: int = 0,
) -> dict[str, Any]:
    """The JSON schema of one step's reply: a call to one of `tools`, or (if allowed) the answer.

    `max_answer_chars` (0: no limit) bounds a free-text answer: the grammar then
    closes the string by that length, where a small model would otherwise repeat
    itself until it runs out of tokens and leave invalid JSON.
    """
    branches = [
        _strict({"tool": {"const": t.name}, "arguments": dict(t.parameters)}, ["tool", "arguments"])
        for t in tools
    ]
    if allow_final or not branches:
        answer: dict[str, Any] = dict(output_schema) if output_schema else {"type": "string"}
        if max_answer_chars and not output_schema:
            answer["maxLength"] = max_answer_chars
        branches.append(_strict({FINAL_KEY: answer}, [FINAL_KEY]))
    return branches[0] if len(branches) == 1 else {"oneOf": branches}


def parse_decision(
    text: str,
    tools: Sequence[Tool],
    *,
    allow_final: bool = True,
    output_schema: Mapping[str, Any] | None = None,
) -> Decision:
    """The decision in the model's reply; DecisionError says what is wrong with it."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise DecisionError(
            f"the reply is not valid JSON ({error.msg} at character {error.pos})"
        ) from None
    if not isinstance(value, dict):
        raise DecisionError("the reply must be one JSON object")
    offered = {t.name: t for t in tools}
    if "tool" in value:
        name = value["tool"]
        tool = offered.get(name) if isinstance(name, str) else None
        if tool is None:
            choices = ", ".join(offered) or "none (give the final answer)"
            raise DecisionError(f"{quoted(name)} is not a tool you can call now; tools: {choices}")
        extra = set(value) - {"tool", "arguments"}
        if extra:
            raise DecisionError(f"unexpected key(s) {', '.join(sorted(extra))} next to 'tool'")
        arguments = value.get("arguments", {})
        errors = validate(arguments, tool.parameters, "arguments")
        if errors:
            raise DecisionError(f"invalid arguments for {name}: {'; '.join(errors)}")
        return ToolCallDecision(name, arguments)
    if FINAL_KEY in value:
        if not allow_final and offered:
            raise DecisionError(f"call one of the tools first: {', '.join(offered)}")
        schema = output_schema or {"type": "string"}
        errors = validate(value[FINAL_KEY], schema, FINAL_KEY) + [
            f"unexpected key {quoted(k)}" for k in value if k != FINAL_KEY
        ]
        if errors:
            raise DecisionError(f"invalid final answer: {'; '.join(errors)}")
        return FinalDecision(value[FINAL_KEY])
    raise DecisionError('the reply needs either "tool" and "arguments", or "final"')


def grammar_for(schema: Mapping[str, Any]) -> str:
    """The llama.cpp GBNF grammar of a JSON schema (what the llama.cpp backend builds)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    return str(json_schema_to_gbnf(json.dumps(schema)))


# ---------------------------------------------------------------- tool relevance

_STOPWORDS = frozenset(
    {
        "a",
        "an",
        "and",
        "any",
        "are",
        "as",
        "at",
        "be",
        "by",
        "can",
        "could",
        "do",
        "does",
        "for",
        "from",
        "get",
        "have",
        "i",
        "in",
        "is",
        "it",
        "me",
        "my",
        "of",
        "on",
        "or",
        "please",
        "the",
        "their",
        "there",
        "this",
        "to",
        "we",
        "what",
        "with",
        "yet",
        "you",
        "your",
    }
)


def _words(text: str) -> set[str]:
    words = set()
    for word in re.findall(r"[a-z]+", text.lower()):
        if word in _STOPWORDS or len(word) < 2:
            continue
        words.add(word[:-1] if len(word) > 3 and word.endswith("s") else word)
    return words


def relevance(request: str, tool: Tool) -> int:
    """How many words the request shares with the tool: twice for its name and keywords."""
    asked = _words(request)
    strong = _words(" ".join([tool.name.replace("_", " "), *tool.keywords]))
    weak = _words(" ".join([tool.description, *(e.request for e in tool.examples)])) - strong
    return 2 * len(asked & strong) + len(asked & weak)


def select_tools(request: str, tools: Sequence[Tool], limit: int = 0) -> list[Tool]:
    """The tools relevant to `request`, most relevant first (ties keep the agent's order).

    With `limit` 0 every tool is returned, relevant ones first; otherwise at most
    `limit` tools that share at least one word with the request.
    """
    scored = sorted(
        ((relevance(request, t), i, t) for i, t in enumerate(tools)),
        key=lambda item: (-item[0], item[1]),
    )
    if limit == 0:
        return [t for _score, _i, t in scored]
    return [t for score, _i, t in scored if score > 0][:limit]
