"""Fake nodes that run agents, for the coordinator's agent tests: they implement the agent side
of the dispatcher's node link (`run_agent`, `classify`, `describe`) like a real node does.

A fake node follows a plan (the steps an agent takes before its answer; per model, so a
smaller tier can fail where a larger one succeeds), continues after `completed_steps` exactly
like a real node (replayed steps are not run again, numbering goes on), and records every tool
it really runs in `FakeAgentMesh.executed`: a side effect counted there happened.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from edgemesh.v1 import node_pb2
from mesh.nodes_view import NodeView
from tests.coordinator_fakes import view

ORDER_ANSWER = "Order 1042 is shipped."


@dataclass
class Step:
    kind: str = "tool_call"  # "tool_call" or "invalid"
    tool: str = ""
    arguments: dict[str, Any] = field(default_factory=dict)
    result: Any = None
    error: str = ""
    idempotent: bool = True


@dataclass
class Plan:
    steps: list[Step]
    answer: str = ORDER_ANSWER
    finish: str = "answer"  # "answer" ends with a final step; else the task ends without one


ORDER_PLAN = Plan(
    [
        Step(
            tool="order_status",
            arguments={"order_id": 1042},
            result={"order_id": 1042, "status": "shipped"},
        )
    ]
)
TICKET_PLAN = Plan(
    [
        Step(
            tool="create_ticket",
            arguments={"subject": "Broken"},
            result={"ticket_id": 7},
            idempotent=False,
        )
    ],
    answer="I opened ticket 7 for you.",
)


@dataclass
class Die:
    """Emit `after` new steps, then fail with `error` (a killed node: no result)."""

    error: Exception
    after: int = 0


@dataclass
class Stall:
    """Emit `after` new steps, then say nothing more (until cancelled)."""

    after: int = 0


@dataclass
class Queued:
    """Wait `wait_s` in the node's queue, saying so every `report_s` when the request asks for
    it (as a real node does), then run the plan."""

    wait_s: float
    report_s: float = 0.02


class FakeAgentLink:
    def __init__(self, node_id: str, mesh: FakeAgentMesh) -> None:
        self.node_id = node_id
        self.mesh = mesh
        self.requests: list[node_pb2.AgentRequest] = []
        self.classified: list[str] = []
        self.closed = False

    def _plan(self, model: str) -> Plan:
        plans = self.mesh.plans.get(self.node_id, {})
        return plans.get(model) or plans.get("") or ORDER_PLAN

    def _step(
        self, spec: Step | None, index: int, request: node_pb2.AgentRequest, answer: str
    ) -> node_pb2.AgentStep:
        model = request.model or "smollm2"
        if spec is None:
            return node_pb2.AgentStep(
                index=index,
                kind="final",
                tokens=7,
                model=model,
                result_json=json.dumps({"final": answer}),
                node_id=self.node_id,
            )
        return node_pb2.AgentStep(
            index=index,
            kind=spec.kind,
            call=node_pb2.ToolCall(tool=spec.tool, arguments_json=json.dumps(spec.arguments)),
            result_json=json.dumps(spec.result if not spec.error else {"error": spec.error}),
            idempotent=spec.idempotent,
            tokens=11,
            model=model,
            error=spec.error,
            node_id=self.node_id,
        )

    async def run_agent(
        self, request: node_pb2.AgentRequest, *, timeout_s: float | None = None
    ) -> AsyncIterator[node_pb2.AgentEvent]:
        self.requests.append(request)
        script = self.mesh.scripts.get(self.node_id, [])
        behaviour = script.pop(0) if script else None
        if isinstance(behaviour, Queued):
            loop = asyncio.get_running_loop()
            until = loop.time() + behaviour.wait_s
            while loop.time() < until:
                if request.report_waiting_ms:
                    yield node_pb2.AgentEvent(waiting=True)
                await asyncio.sleep(behaviour.report_s)
            behaviour = None
        plan = self._plan(request.model)
        completed = list(request.completed_steps)
        planned: list[Step | None] = list(plan.steps) + ([None] if plan.finish == "answer" else [])
        new = [] if completed and completed[-1].kind == "final" else planned[len(completed) :]
        answer = (
            json.loads(completed[-1].result_json)["final"]
            if completed and completed[-1].kind == "final"
            else plan.answer
        )
        finish = "answer" if not new and completed else plan.finish
        emitted: list[node_pb2.AgentStep] = []
        for position in range(len(new) + 1):
            if isinstance(behaviour, Die) and behaviour.after == position:
                raise behaviour.error
            if isinstance(behaviour, Stall) and behaviour.after == position:
                await asyncio.sleep(3600)
            if position == len(new):
                break
            spec = new[position]
            if spec is not None and spec.kind == "tool_call":
                self.mesh.executed.append((self.node_id, request.task.task_id, spec.tool))
            emitted.append(self._step(spec, len(completed) + position, request, answer))
            yield node_pb2.AgentEvent(step=emitted[-1])
        if finish == "answer":
            yield node_pb2.AgentEvent(text=answer)
        yield node_pb2.AgentEvent(
            result=node_pb2.AgentResult(
                agent=request.agent,
                answer=answer if finish == "answer" else "",
                finish_reason=finish,
                steps=completed + emitted,
                usage=node_pb2.Usage(prompt_tokens=100, completion_tokens=11 * len(emitted)),
                model=request.model or "smollm2",
                node_id=self.node_id,
            )
        )

    async def classify(
        self, text: str, *, model: str = "", timeout_s: float | None = None
    ) -> node_pb2.ClassifyResponse:
        self.classified.append(text)
        label, confidence = self.mesh.classifications[text]
        return node_pb2.ClassifyResponse(label=label, confidence=confidence, model=model)

    async def describe(self, *, timeout_s: float | None = None) -> node_pb2.DescribeResponse:
        self.mesh.describes.append(self.node_id)
        models = [
            node_pb2.ModelInfo(
                model_id="smollm2", task="text-generation", state=node_pb2.MODEL_STATE_READY
            )
        ]
        if self.node_id in self.mesh.routers:
            models.append(
                node_pb2.ModelInfo(
                    model_id="intent-router",
                    task="text-classification",
                    state=node_pb2.MODEL_STATE_READY,
                    labels=["customer-service", "technical-support"],
                )
            )
        return node_pb2.DescribeResponse(models=models)

    async def close(self) -> None:
        self.closed = True


class FakeAgentMesh:
    """Fake agent nodes by id, handed to the Dispatcher as its `connect`."""

    def __init__(self) -> None:
        self.links: dict[str, FakeAgentLink] = {}
        self.plans: dict[str, dict[str, Plan]] = {}  # node id -> model ("" any) -> plan
        self.scripts: dict[str, list[object]] = {}
        self.executed: list[tuple[str, str, str]] = []  # (node, task id, tool) really run
        self.routers: set[str] = set()
        self.classifications: dict[str, tuple[str, float]] = {}
        self.describes: list[str] = []

    def connect(self, node: NodeView) -> FakeAgentLink:
        link = FakeAgentLink(node.node_id, self)
        self.links[node.node_id] = link
        return link


def agent_view(
    node_id: str,
    *,
    agents: tuple[str, ...] = ("customer-service",),
    models: tuple[str, ...] = ("smollm2",),
    **extra: object,
) -> NodeView:
    return view(node_id, models=models, agents=agents, **extra)
