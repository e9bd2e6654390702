"""The node's agents: which it offers, its data store, and the RunAgent RPC's body.

A node offers an agent when it serves the agent's model, has every tool the agent
names, and holds every dataset those tools declare. With no agent configuration
it offers the three demo agents over the demo store, seeded on first start.
"""

from __future__ import annotations

import asyncio
import json
import logging
import pathlib
import sqlite3
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, cast

from edgemesh.v1 import node_pb2
from mesh.core.bounds import DEFAULT_MAX_MESSAGES, DEFAULT_MAX_PROMPT_BYTES, check_message_count
from mesh.core.errors import ConfigError, InvalidRequestError, NotFoundError
from mesh.core.ids import new_task_id
from mesh.core.untrusted import quoted
from nodes.agents.demo import DEMO_AGENTS
from nodes.agents.records import (
    AgentEventData,
    AgentOutcome,
    AgentTask,
    AnswerEvent,
    StepEvent,
    StepKind,
    StepRecord,
)
from nodes.agents.runtime import AgentRuntime
from nodes.agents.spec import AgentSpec
from nodes.audit import AUDIT_FILE, AuditLog
from nodes.backends import ROLES, Backend, Message
from nodes.task_counts import TaskCounts
from nodes.tools import DATASETS, DemoStore, ToolRegistry, builtin_registry, load_module_objects

if TYPE_CHECKING:
    from nodes.config import NodeConfig

logger = logging.getLogger(__name__)


def offered_agents(
    specs: Iterable[AgentSpec],
    registry: ToolRegistry,
    datasets: Iterable[str],
    models: Iterable[str],
    default_model: str,
) -> tuple[list[AgentSpec], list[str]]:
    """(the agents this node can run, why each other one cannot). A pure function."""
    held, served = set(datasets), set(models)
    offered, refused = [], []
    for spec in specs:
        missing_tools = spec.missing_tools(registry)
        missing_data = sorted(spec.required_datasets(registry) - held)
        model = spec.model or default_model
        if missing_tools:
            refused.append(f"{spec.name}: no tool(s) {', '.join(missing_tools)}")
        elif missing_data:
            refused.append(f"{spec.name}: does not hold dataset(s) {', '.join(missing_data)}")
        elif model not in served:
            refused.append(f"{spec.name}: does not serve model {model!r}")
        else:
            offered.append(spec)
    return offered, refused


class AgentHost:
    """Everything agent-related a node runs; the servicer delegates RunAgent and Describe to it."""

    def __init__(
        self,
        backends: Mapping[str, Backend],
        *,
        agents: Sequence[AgentSpec] = DEMO_AGENTS,
        registry: ToolRegistry | None = None,
        datasets: Iterable[str] = DATASETS,
        data_dir: pathlib.Path | str | None = None,
        default_model: str = "",
        node_id: str = "",
        max_input_bytes: int = DEFAULT_MAX_PROMPT_BYTES,
        max_messages: int = DEFAULT_MAX_MESSAGES,
        counts: TaskCounts | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.max_input_bytes = max_input_bytes
        self.max_messages = max_messages
        self.registry = registry or builtin_registry()
        self.default_model = default_model or next(iter(backends), "")
        self.store = DemoStore(data_dir) if data_dir is not None else None
        self.datasets = tuple(datasets) if self.store is not None else ()
        self.runtime = AgentRuntime(
            backends,
            self.registry,
            default_model=self.default_model,
            node_id=node_id,
            store=self.store,
            counts=counts,
            audit=audit,
        )
        names = [spec.name for spec in agents]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"agents: {', '.join(duplicates)} defined more than once")
        offered, refused = offered_agents(
            agents, self.registry, self.datasets, backends, self.default_model
        )
        for reason in refused:
            logger.warning("agent not offered: %s", reason)
        self.agents: dict[str, AgentSpec] = {spec.name: spec for spec in offered}
        self._opened = False

    @classmethod
    def from_config(
        cls,
        config: NodeConfig,
        backends: Mapping[str, Backend],
        node_id: str,
        *,
        counts: TaskCounts | None = None,
    ) -> AgentHost:
        """Agents, tools and datasets as the node config says (None: the demo set), and the
        audit log in the state directory unless `audit_log` is off (created now: blocking)."""
        registry = builtin_registry()
        agents = list(DEMO_AGENTS) if config.agents is None else list(config.agents)
        module_data: set[str] = set()
        for module_name in config.agent_modules:
            tools, module_agents = load_module_objects(module_name, AgentSpec)
            for item in tools:
                registry.register(item)
                module_data.update(item.data)
            agents += [a for a in module_agents if a.name not in {b.name for b in agents}]
        datasets = (
            DATASETS + tuple(sorted(module_data)) if config.datasets is None else config.datasets
        )
        return cls(
            backends,
            agents=agents,
            registry=registry,
            datasets=datasets,
            data_dir=config.resolved_data_dir(),
            default_model=config.default_model_id,
            node_id=node_id,
            max_input_bytes=config.max_prompt_bytes,
            max_messages=config.max_messages,
            counts=counts,
            audit=(
                AuditLog.open(config.resolved_state_dir() / AUDIT_FILE, node_id=node_id)
                if config.audit_log
                else None
            ),
        )

    async def open(self) -> None:
        """Create the store's tables and seed the demo data on first start (in a thread)."""
        if self.store is not None and not self._opened:
            try:
                seeded = await asyncio.to_thread(self.store.open)
            except (OSError, sqlite3.Error) as error:
                raise ConfigError(
                    f"cannot open the agents' data store {self.store.path}: "
                    f"{error}; set data_dir to a writable directory"
                ) from None
            self._opened = True
            if seeded:
                logger.info("seeded demo data for agents in %s", self.store.path)

    def agent_infos(self) -> list[node_pb2.AgentInfo]:
        return [
            node_pb2.AgentInfo(
                name=s.name, model_id=s.model or self.default_model, description=s.description
            )
            for s in self.agents.values()
        ]

    def get(self, name: str) -> AgentSpec:
        spec = self.agents.get(name)
        if spec is None:
            known = ", ".join(sorted(self.agents)) or "none"
            raise NotFoundError(
                f"agent {quoted(name)} is not offered by this node; it offers: {known}"
            )
        return spec

    def model_for(self, request: node_pb2.AgentRequest) -> str:
        """The model a RunAgent request runs on (its tier's, the agent's, or the default)."""
        return self.runtime.model_for(self.get(request.agent), request.model)

    def check(self, request: node_pb2.AgentRequest) -> tuple[AgentSpec, AgentTask]:
        """The agent and task of a RunAgent request, checked (replayed steps and step limit
        included: nodes/agents/replay.py) before it waits for a slot; MeshError if it cannot
        run as asked."""
        spec = self.get(request.agent)
        task = task_from_request(request, self.max_input_bytes, self.max_messages)
        self.runtime.check(spec, task)
        return spec, task

    async def run(self, request: node_pb2.AgentRequest) -> AsyncIterator[node_pb2.AgentEvent]:
        """The RunAgent RPC: AgentEvents for each new step, the answer text, then the result."""
        spec, task = self.check(request)
        await self.open()
        async for event in self.runtime.run(spec, task):
            yield event_to_proto(event)


# ---------------------------------------------------------------- wire conversion


MAX_CALLER_TEXT_CHARS = 256  # TaskContext.key_name and .subject (an email has at most 254)


def task_from_request(
    request: node_pb2.AgentRequest,
    max_input_bytes: int,
    max_messages: int = DEFAULT_MAX_MESSAGES,
) -> AgentTask:
    if not request.input.strip():
        raise InvalidRequestError("the agent request's input is empty")
    for name in ("key_name", "subject"):
        if len(getattr(request.task, name)) > MAX_CALLER_TEXT_CHARS:
            raise InvalidRequestError(f"task.{name} is over {MAX_CALLER_TEXT_CHARS} characters")
    check_message_count(len(request.history), max_messages, "this node's")
    size = len(request.input.encode()) + sum(len(m.content.encode()) for m in request.history)
    if size > max_input_bytes:
        raise InvalidRequestError(
            f"the agent request is {size} bytes, over this node's limit of "
            f"{max_input_bytes}; shorten it"
        )
    for index, message in enumerate(request.history):
        if message.role not in ROLES:  # an enumeration: never text that reaches a template
            raise InvalidRequestError(
                f"history[{index}].role {message.role[:40]!r} is not one of "
                f"{', '.join(sorted(ROLES))}"
            )
    return AgentTask(
        agent=request.agent,
        input=request.input,
        task_id=request.task.task_id or new_task_id(),
        history=tuple(Message(m.role, m.content) for m in request.history),
        completed_steps=tuple(step_from_proto(s) for s in request.completed_steps),
        model=request.model,
        max_steps=request.max_steps,  # checked against the agent's limit by the runtime
        attempt=request.task.attempt,
        key_name=request.task.key_name,
        subject=request.task.subject.strip(),
    )


MAX_STEP_JSON_DEPTH = 32  # nesting of a replayed step's JSON (tool arguments, a final answer)


def _nesting(value: object, limit: int) -> int:
    """How deep `value` nests, counted up to `limit + 1` at most."""
    if limit < 0 or not isinstance(value, dict | list):
        return 0
    children = value.values() if isinstance(value, dict) else value
    return 1 + max((_nesting(child, limit - 1) for child in children), default=0)


def _step_json(step: node_pb2.AgentStep, field: str, text: str) -> object:
    """A replayed step's JSON field, parsed; InvalidRequestError if it is not JSON or nests
    deeper than MAX_STEP_JSON_DEPTH (the runtime parses and renders it again)."""
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError:
        raise InvalidRequestError(f"completed step {step.index}: {field} is not JSON") from None
    except RecursionError:  # nested past the interpreter's stack: JSON no agent produces
        value = None
        depth = MAX_STEP_JSON_DEPTH + 1
    else:
        depth = _nesting(value, MAX_STEP_JSON_DEPTH)
    if depth > MAX_STEP_JSON_DEPTH:
        raise InvalidRequestError(
            f"completed step {step.index}: {field} nests deeper than {MAX_STEP_JSON_DEPTH} levels"
        )
    return value


def step_from_proto(step: node_pb2.AgentStep) -> StepRecord:
    if step.kind not in ("tool_call", "final", "invalid"):
        raise InvalidRequestError(
            f"completed step {step.index} has unknown kind {quoted(step.kind)}"
        )
    if step.kind == "tool_call":
        _step_json(step, "arguments_json", step.call.arguments_json)
    if step.kind == "final" and not isinstance(
        _step_json(step, "result_json", step.result_json), dict
    ):
        raise InvalidRequestError(f"completed step {step.index}: result_json is not an object")
    return StepRecord(
        index=step.index,
        kind=cast(StepKind, step.kind),  # one of StepKind's values: checked above
        tool=step.call.tool,
        arguments_json=step.call.arguments_json,
        result_json=step.result_json,
        idempotent=step.idempotent,
        tokens=step.tokens,
        duration_ms=step.duration_ms,
        model=step.model,
        error=step.error,
        node_id=step.node_id,
        tool_ms=step.tool_ms,
    )


def step_to_proto(step: StepRecord) -> node_pb2.AgentStep:
    return node_pb2.AgentStep(
        index=step.index,
        kind=step.kind,
        call=node_pb2.ToolCall(tool=step.tool, arguments_json=step.arguments_json),
        result_json=step.result_json,
        idempotent=step.idempotent,
        tokens=step.tokens,
        duration_ms=step.duration_ms,
        model=step.model,
        error=step.error,
        node_id=step.node_id,
        tool_ms=step.tool_ms,
    )


def outcome_to_proto(outcome: AgentOutcome) -> node_pb2.AgentResult:
    return node_pb2.AgentResult(
        agent=outcome.agent,
        answer=outcome.answer,
        finish_reason=outcome.finish_reason,
        steps=[step_to_proto(s) for s in outcome.steps],
        usage=node_pb2.Usage(
            prompt_tokens=outcome.prompt_tokens,
            completion_tokens=outcome.completion_tokens,
            total_tokens=outcome.prompt_tokens + outcome.completion_tokens,
        ),
        total_ms=outcome.total_ms,
        model=outcome.model,
        node_id=outcome.node_id,
    )


def event_to_proto(event: AgentEventData) -> node_pb2.AgentEvent:
    if isinstance(event, StepEvent):
        return node_pb2.AgentEvent(step=step_to_proto(event.step))
    if isinstance(event, AnswerEvent):
        return node_pb2.AgentEvent(text=event.text)
    return node_pb2.AgentEvent(result=outcome_to_proto(event.outcome))
