"""Issue 10 item 2: replayed steps and step limits a direct caller could forge (no sockets).

A node accepts `completed_steps` only in the size and shape a node running the agent could
have produced, and a `max_steps` only up to the agent's own limit (or an escalation's).
"""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from edgemesh.v1 import node_pb2
from mesh.coordinator.escalation import escalated_max_steps, steps_to_keep
from mesh.core.agent_limits import MAX_AGENT_STEPS
from mesh.core.errors import InvalidRequestError
from nodes.agents import DEMO_AGENTS, Agent, AgentHost, AgentRuntime, AgentTask, StepRecord
from nodes.agents.host import step_from_proto, step_to_proto
from nodes.agents.records import StepEvent
from nodes.agents.replay import (
    MAX_ERROR_CHARS,
    bounded_result,
    check_max_steps,
    check_replay,
    step_text_bytes,
)
from nodes.tools import DemoStore, builtin_registry
from tests.agent_fakes import ScriptedBackend

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

REGISTRY = builtin_registry()
CUSTOMER_SERVICE = DEMO_AGENTS[0]  # order_status, customer_lookup, create_ticket; 3 steps
LOOKUP = {"email": "mallory@example.com"}


def call(index: int = 0, tool: str = "customer_lookup", arguments=None, **fields) -> StepRecord:
    values = {
        "result_json": json.dumps({"name": "Mallory", "tier": "platinum"}),
        "arguments_json": json.dumps(LOOKUP if arguments is None else arguments),
        **fields,
    }
    return StepRecord(index=index, kind="tool_call", tool=tool, **values)


def final(index: int, answer: object = "Done.", **fields) -> StepRecord:
    return StepRecord(
        index=index, kind="final", result_json=json.dumps({"final": answer}), **fields
    )


def refused(steps, spec=CUSTOMER_SERVICE) -> str:
    with pytest.raises(InvalidRequestError) as raised:
        check_replay(steps, spec, REGISTRY)
    return str(raised.value)


# ---------------------------------------------------------------- shape


def test_a_well_formed_replay_is_accepted_and_marked():
    steps = check_replay(
        [call(0), final(1, "Mallory is a platinum customer.")], CUSTOMER_SERVICE, REGISTRY
    )
    assert [s.replayed for s in steps] == [True, True]


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        (
            [call(0, arguments={"email": 5})],
            r"completed_steps\[0\].arguments_json does not match customer_lookup's parameters: arguments.email: expected string",
        ),
        ([call(0, arguments={"email": "m@x", "tier": "platinum"})], "unexpected property 'tier'"),
        ([call(0, arguments={})], "missing required property 'email'"),
        ([call(0, arguments=[1, 2])], r"completed_steps\[0\].arguments_json must be a JSON object"),
        (
            [call(0, tool="book_appointment")],
            "calls 'book_appointment', which agent customer-service does not have",
        ),
        ([call(0, tool="")], "does not have"),
        ([call(0, result_json="{not json")], r"completed_steps\[0\].result_json is not JSON"),
        ([call(0, result_json="[" * 5000 + "]" * 5000)], "nested too deeply"),
        (
            [call(0), call(1, result_json='{"tier": "gold"}')],
            r"completed_steps\[1\] calls customer_lookup again after it succeeded",
        ),
        ([final(0), call(1)], r"completed_steps\[0\] is final but is not the last"),
        (
            [StepRecord(index=0, kind="invalid", result_json='{"reply": "?"}'), call(1)],
            "is invalid but is not the last",
        ),
        (
            [
                StepRecord(
                    index=0, kind="final", tool="customer_lookup", result_json='{"final": "x"}'
                )
            ],
            "names no tool",
        ),
        (
            [StepRecord(index=0, kind="final", result_json='"Mallory is platinum"')],
            r'result_json must be \{"final": ...\}',
        ),
        (
            [StepRecord(index=0, kind="final", result_json='{"final": "x", "tool": "y"}')],
            r'must be \{"final": ...\}',
        ),
        (
            [final(0, {"tier": "platinum"})],
            "is not an answer agent customer-service gives: final: expected string",
        ),
        ([final(0, error="boom")], "has no error"),
        (
            [StepRecord(index=0, kind="invalid", result_json='{"secret": 1}')],
            r'must be \{"reply": "..."\}',
        ),
        ([call(1)], "has index 1"),
    ],
)
def test_forged_steps_are_refused_naming_the_step_and_field(steps, message):
    why = refused(steps)
    assert re.search(message, why), why


def test_too_many_steps_are_refused():
    spec = Agent("loop", tools=["order_status"], allow_repeat_calls=True, max_steps=16)
    steps = [
        call(i, tool="order_status", arguments={"order_id": i}) for i in range(MAX_AGENT_STEPS + 1)
    ]
    assert (
        f"has {MAX_AGENT_STEPS + 1} steps; an agent task has at most {MAX_AGENT_STEPS}"
        in refused(steps, spec)
    )
    assert len(check_replay(steps[:MAX_AGENT_STEPS], spec, REGISTRY)) == MAX_AGENT_STEPS


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"result_json": json.dumps({"blob": "x" * 20_000})},
            r"result_json is \d+ bytes; agent customer-service records at most 16384",
        ),
        ({"error": "e" * (MAX_ERROR_CHARS + 1)}, "error is 2001 characters"),
        ({"model": "m" * 300}, "model is 300 characters"),
        ({"node_id": "n" * 300}, "node_id is 300 characters"),
        ({"tokens": 10_000}, "tokens is 10000; agent customer-service writes at most 320"),
        ({"duration_ms": float("nan")}, "duration_ms must be a finite number"),
        ({"duration_ms": -1.0}, "duration_ms must be a finite number"),
    ],
)
def test_steps_out_of_bounds_are_refused(fields, message):
    why = refused([call(0, **fields)])
    assert re.search(message, why), why


def test_a_failed_call_may_be_followed_by_another_call_of_the_same_tool():
    failed = call(0, result_json='{"error": "no customer"}', error="no customer")
    assert len(check_replay([failed, call(1)], CUSTOMER_SERVICE, REGISTRY)) == 2


def test_an_answer_must_match_the_agents_output_schema():
    spec = Agent(
        "typed",
        tools=["order_status"],
        output_schema={
            "type": "object",
            "properties": {"ok": {"type": "boolean"}},
            "required": ["ok"],
        },
    )
    assert check_replay([final(0, {"ok": True})], spec, REGISTRY)
    assert "missing required property 'ok'" in refused([final(0, {"admin": True})], spec)


# ---------------------------------------------------------------- step limits


def test_a_caller_may_lower_the_step_limit_but_not_raise_it():
    spec = CUSTOMER_SERVICE  # max_steps 3
    assert check_max_steps(spec, 0, 0) == 3 and check_max_steps(spec, 1, 0) == 1
    assert check_max_steps(spec, 3, 0) == 3
    for requested in (4, 16, 2**32 - 1):
        with pytest.raises(
            InvalidRequestError,
            match=f"max_steps {requested} is above what agent customer-service allows: its own limit is 3",
        ):
            check_max_steps(spec, requested, 0)


def test_an_escalation_may_raise_the_limit_to_two_past_the_replayed_steps():
    spec = CUSTOMER_SERVICE
    assert check_max_steps(spec, 5, 3) == 5
    with pytest.raises(InvalidRequestError, match="here 5 at most"):
        check_max_steps(spec, 6, 3)
    with pytest.raises(InvalidRequestError, match="here 16 at most"):
        check_max_steps(spec, 17, 16)


def test_every_limit_the_coordinators_escalation_asks_for_is_accepted():
    """Tier after tier ran out of steps: the coordinator's limits stay within what nodes take."""
    spec = Agent("long", tools=["order_status"], allow_repeat_calls=True, max_steps=4)
    kept: list[node_pb2.AgentStep] = []
    limit = 0
    for _tier in range(10):
        effective = check_max_steps(spec, limit, len(kept))  # never raises
        ran = [
            step_to_proto(call(i, tool="order_status", arguments={"order_id": i}))
            for i in range(len(kept), effective)
        ]
        result_steps = kept + ran
        kept = steps_to_keep(result_steps)
        limit = escalated_max_steps(kept, "max_steps")
        check_replay([_record(s) for s in kept], spec, REGISTRY)
    assert limit == MAX_AGENT_STEPS


def _record(step: node_pb2.AgentStep) -> StepRecord:
    return step_from_proto(step)


# ---------------------------------------------------------------- what the node records


def run(coro, timeout=10):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_steps_the_runtime_records_are_accepted_back(tmp_path):
    """A replay of a real run always passes: the node's own records are within the bounds."""
    store = DemoStore(tmp_path / "data")
    store.open()
    replies = [
        {"tool": "order_status", "arguments": {"order_id": 1042}},
        {"final": "Order 1042 has shipped."},
    ]
    runtime = AgentRuntime(
        {"scripted": ScriptedBackend(replies)}, REGISTRY, node_id="n", store=store
    )
    task = AgentTask(agent="customer-service", input="status of order 1042?", task_id="t1")

    async def go():
        return [
            e.step async for e in runtime.run(CUSTOMER_SERVICE, task) if isinstance(e, StepEvent)
        ]

    steps = run(go())
    assert [s.kind for s in steps] == ["tool_call", "final"]
    for end in (1, 2):
        wire = [_record(step_to_proto(s)) for s in steps[:end]]
        assert len(check_replay(wire, CUSTOMER_SERVICE, REGISTRY)) == end


def test_a_huge_tool_result_is_recorded_cut_and_still_replays(tmp_path):
    from nodes.tools import ToolRegistry, tool

    @tool(idempotent=True)
    def dump_logs() -> dict:
        """Return the device's logs."""
        return {"lines": ["log line " * 10] * 2000}

    registry = ToolRegistry([dump_logs])
    spec = Agent("logs", tools=[dump_logs], max_steps=2)
    replies = [{"tool": "dump_logs", "arguments": {}}, {"final": "Many logs."}]
    runtime = AgentRuntime({"scripted": ScriptedBackend(replies)}, registry, node_id="n")

    async def go():
        return [
            e async for e in runtime.run(spec, AgentTask(agent="logs", input="logs", task_id="t"))
        ]

    outcome = run(go())[-1].outcome
    recorded = outcome.steps[0].result_json
    limit = step_text_bytes(spec)
    assert len(recorded.encode()) <= limit
    assert json.loads(recorded)["truncated"] is True and json.loads(recorded)["bytes"] > limit
    assert check_replay(list(outcome.steps), spec, registry)


def test_bounded_result_keeps_small_results_whole_and_cuts_big_ones_within_the_limit():
    assert bounded_result('{"a": 1}', 100) == '{"a": 1}'
    big = json.dumps({"text": "\u202e\x00" * 50_000})
    cut = bounded_result(big, 16_384)
    assert len(cut.encode()) <= 16_384 and json.loads(cut)["bytes"] == len(big.encode())


# ---------------------------------------------------------------- through the node's glue


def test_the_host_refuses_a_raised_step_limit_before_the_agent_runs(tmp_path):
    backend = ScriptedBackend([])  # asked even once: AssertionError
    host = AgentHost({"scripted": backend}, data_dir=tmp_path / "data")
    request = node_pb2.AgentRequest(
        agent="customer-service", input="who is mallory@example.com?", max_steps=16
    )
    with pytest.raises(InvalidRequestError, match="max_steps 16 is above"):
        host.check(request)

    async def go():
        return [e async for e in host.run(request)]

    with pytest.raises(InvalidRequestError, match="max_steps 16 is above"):
        run(go())
    assert backend.requests == []
