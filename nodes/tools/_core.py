"""Tools: plain Python functions with a schema, a side-effect flag and the data they need."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import inspect
import json
import logging
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, get_type_hints

from mesh.core.errors import ConfigError, NotFoundError
from mesh.core.model import FrozenModel
from mesh.core.untrusted import quoted
from nodes.tools._schema import SchemaError, parameters_schema

logger = logging.getLogger(__name__)

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")


class ToolError(Exception):
    """Raised by a tool for an expected failure (e.g. no such order); the model sees the message."""


class ToolAccessDenied(ToolError):
    """Raised by a tool that refuses the caller (`ToolContext.subject`) what it asked for; the
    audit log records it as "denied". Its message must not reveal whether the thing exists."""


class ToolExample(FrozenModel):
    """One worked example: shown to the model as a short exchange before the real request."""

    request: str
    arguments: dict[str, Any]
    result: Any = None
    answer: str = ""


@dataclasses.dataclass(frozen=True)
class ToolContext:
    """What a tool may know about the call besides its arguments (injected, never from the model).

    `idempotency_key` is the same for the same step of the same task on every
    attempt, so a side-effecting tool can refuse to act twice. `subject` is who is asking,
    as the API key the task came with says (e.g. a customer's email; empty: nobody in
    particular, as in an open mesh): a tool over personal data answers only for it.
    `key_name` names that key (never the key itself).
    """

    task_id: str = ""
    step_index: int = 0
    node_id: str = ""
    store: Any = None  # nodes.tools.store.DemoStore on a node
    idempotency_key: str = ""
    subject: str = ""
    key_name: str = ""


@dataclasses.dataclass(frozen=True)
class Tool:
    """A function the agent runtime can call; build one with the `@tool` decorator."""

    name: str
    description: str
    parameters: Mapping[str, Any]  # JSON schema of the arguments (an object)
    function: Callable[..., Any]
    idempotent: bool = False
    data: tuple[str, ...] = ()
    examples: tuple[ToolExample, ...] = ()
    keywords: tuple[str, ...] = ()
    timeout_s: float = 10.0
    context_parameter: str | None = None

    def signature(self) -> str:
        """`order_status(order_id: integer)`, the short form shown to the model."""
        properties = self.parameters.get("properties", {})
        required = set(self.parameters.get("required", ()))
        parts = []
        for name, schema in properties.items():
            kind = (
                "|".join(json.dumps(v) for v in schema["enum"])
                if "enum" in schema
                else schema.get("type", "any")
            )
            parts.append(f"{name}{'' if name in required else '?'}: {kind}")
        return f"{self.name}({', '.join(parts)})"

    async def call(self, arguments: Mapping[str, Any], context: ToolContext) -> Any:
        """Run the tool (a blocking function runs in a worker thread) within `timeout_s`."""
        kwargs = dict(arguments)
        if self.context_parameter:
            kwargs[self.context_parameter] = context
        if inspect.iscoroutinefunction(self.function):
            return await asyncio.wait_for(self.function(**kwargs), self.timeout_s)
        return await asyncio.wait_for(asyncio.to_thread(self.function, **kwargs), self.timeout_s)


def tool(
    function: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    idempotent: bool = False,
    data: Iterable[str] = (),
    examples: Iterable[ToolExample | Mapping[str, Any]] = (),
    keywords: Iterable[str] = (),
    timeout_s: float = 10.0,
) -> Any:
    """Turn a typed, documented function into a `Tool`.

    The argument schema comes from the type hints, descriptions from the docstring
    (first paragraph, and the `Args:` section). A parameter annotated `ToolContext`
    receives the call's context instead of a model-written value. Tools are assumed
    to have side effects unless `idempotent=True`: after a failover the mesh never
    runs a non-idempotent tool again. `data` names the datasets the tool reads or
    writes; a node offers an agent only if it holds them all.
    """

    def wrap(fn: Callable[..., Any]) -> Tool:
        tool_name = name or fn.__name__
        if not tool_name or not set(tool_name) <= _NAME_CHARS or tool_name == "final":
            raise SchemaError(f"tool name {tool_name!r} must be lower_snake_case and not 'final'")
        hints = get_type_hints(fn)
        context_names = [p for p, hint in hints.items() if hint is ToolContext]
        try:
            summary, schema = parameters_schema(fn, skip=context_names)
        except SchemaError as error:
            raise SchemaError(f"tool {tool_name}: {error}") from None
        return Tool(
            name=tool_name,
            description=description or summary or tool_name.replace("_", " "),
            parameters=schema,
            function=fn,
            idempotent=idempotent,
            data=tuple(data),
            examples=tuple(e if isinstance(e, ToolExample) else ToolExample(**e) for e in examples),
            keywords=tuple(keywords),
            timeout_s=timeout_s,
            context_parameter=context_names[0] if context_names else None,
        )

    return wrap(function) if function is not None else wrap


class ToolRegistry:
    """The tools a node can run, by name."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for item in tools:
            self.register(item)

    def register(self, item: Tool) -> Tool:
        existing = self._tools.get(item.name)
        if existing is not None and existing.function is not item.function:
            raise ConfigError(f"two different tools are named {item.name!r}")
        self._tools[item.name] = item
        return item

    def get(self, name: str) -> Tool:
        try:
            return self._tools[name]
        except KeyError:
            known = ", ".join(sorted(self._tools)) or "none"
            raise NotFoundError(
                f"no tool named {quoted(name)} on this node; tools: {known}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    def names(self) -> list[str]:
        return sorted(self._tools)


def load_module_objects(module_name: str, agent_type: type) -> tuple[list[Tool], list[Any]]:
    """Import `module_name` and return the `Tool`s and `agent_type` objects at its top level."""
    try:
        module: types.ModuleType = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"agent_modules: cannot import {module_name!r}: {error}") from None
    tools: list[Tool] = []
    agents: list[Any] = []
    for value in vars(module).values():
        if isinstance(value, Tool):
            tools.append(value)
        elif isinstance(value, agent_type):
            agents.append(value)
    logger.info("module %s: %d tools, %d agents", module_name, len(tools), len(agents))
    return tools, agents
