"""The agent loop with a scripted model: decisions, grammar schemas, repairs, replay, the node glue."""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap

import pytest

from edgemesh.v1 import node_pb2
from mesh.core.errors import ConfigError, InvalidRequestError, NotFoundError
from nodes.agents import (
    DEMO_AGENTS,
    Agent,
    AgentHost,
    AgentRuntime,
    AgentSpec,
    AgentTask,
    DecisionError,
    FinalDecision,
    StepRecord,
    ToolCallDecision,
    decision_schema,
    grammar_for,
    offered_agents,
    parse_decision,
    select_tools,
)
from nodes.agents.records import AnswerEvent, OutcomeEvent, StepEvent
from nodes.config import NodeConfig
from nodes.tools import DATASETS, DemoStore, ToolContext, builtin_registry, tool
from tests.agent_fakes import ScriptedBackend

pytestmark = pytest.mark.unit


def run(coro, timeout=10):
    return asyncio.run(asyncio.wait_for(coro, timeout))


REGISTRY = builtin_registry()
ORDER, TICKET, LOOKUP = (
    REGISTRY.get(n) for n in ("order_status", "create_ticket", "customer_lookup")
)
CUSTOMER_SERVICE = DEMO_AGENTS[0]


# ---------------------------------------------------------------- decisions (pure)


def test_decision_schema_is_one_of_tools_plus_final():
    schema = decision_schema([ORDER, TICKET], max_answer_chars=100)
    tools_branch, ticket_branch, final_branch = schema["oneOf"]
    assert tools_branch["properties"]["tool"] == {"const": "order_status"}
    assert tools_branch["properties"]["arguments"] == ORDER.parameters
    assert list(tools_branch["properties"]) == ["tool", "arguments"]  # the grammar's key order
    assert ticket_branch["properties"]["tool"] == {"const": "create_ticket"}
    assert final_branch["properties"] == {"final": {"type": "string", "maxLength": 100}}
    assert "oneOf" not in decision_schema([ORDER], allow_final=False)  # one branch: itself
    assert decision_schema([])["required"] == ["final"]  # nothing offered: answer only
    output = {"type": "object", "properties": {"ok": {"type": "boolean"}}}
    assert decision_schema([], output_schema=output)["properties"]["final"] == output


def test_grammar_from_decision_schema_names_every_branch():
    grammar = grammar_for(decision_schema([ORDER, TICKET]))
    assert "root ::=" in grammar
    assert '\\"order_status\\"' in grammar and '\\"create_ticket\\"' in grammar
    assert '\\"final\\"' in grammar and '\\"order_id\\"' in grammar


def test_parse_decision_accepts_valid_replies():
    call = parse_decision('{"tool": "order_status", "arguments": {"order_id": 1042}}', [ORDER])
    assert call == ToolCallDecision("order_status", {"order_id": 1042})
    assert parse_decision('{"final": "Shipped."}', [ORDER]) == FinalDecision("Shipped.")
    structured = parse_decision('{"final": {"ok": true}}', [], output_schema={"type": "object"})
    assert structured.text() == '{"ok": true}'


@pytest.mark.parametrize(
    ("reply", "allow_final", "message"),
    [
        ("{not json", True, "not valid JSON"),
        ('["final"]', True, "one JSON object"),
        ('{"tool": "delete_all", "arguments": {}}', True, "'delete_all' is not a tool"),
        (
            '{"tool": "order_status", "arguments": {"order_id": "1042"}}',
            True,
            "arguments.order_id: expected integer",
        ),
        ('{"tool": "order_status", "arguments": {}}', True, "missing required property 'order_id'"),
        ('{"final": "Shipped."}', False, "call one of the tools first"),
        ('{"final": 3}', True, "invalid final answer"),
        ('{"answer": "x"}', True, 'either "tool"'),
    ],
)
def test_parse_decision_explains_invalid_replies(reply, allow_final, message):
    with pytest.raises(DecisionError, match=message):
        parse_decision(reply, [ORDER], allow_final=allow_final)


def test_select_tools_ranks_by_shared_words():
    tools = [LOOKUP, ORDER, TICKET]
    assert select_tools("What is the status of order 1042?", tools, 1) == [ORDER]
    assert select_tools("Please open a ticket, my printer is broken", tools, 1) == [TICKET]
    assert select_tools("Who is the customer bob@example.com?", tools, 1) == [LOOKUP]
    assert select_tools("Hello there", tools, 1) == []
    assert select_tools("Hello there", tools, 0) == tools  # 0: all, in the agent's order


# ---------------------------------------------------------------- the loop


def make_runtime(tmp_path, replies, registry=None):
    store = DemoStore(tmp_path / "data")
    store.open()
    backend = ScriptedBackend(replies)
    runtime = AgentRuntime(
        {"scripted": backend}, registry or REGISTRY, node_id="node-a", store=store
    )
    return runtime, backend, store


def collect(runtime, spec, task):
    async def go():
        return [event async for event in runtime.run(spec, task)]

    return run(go())


def test_order_status_flow(tmp_path):
    runtime, backend, _store = make_runtime(
        tmp_path,
        [
            {"tool": "order_status", "arguments": {"order_id": 1042}},
            {"final": "Order 1042 has shipped with DHL."},
        ],
    )
    task = AgentTask(
        agent="customer-service", input="What is the status of order 1042?", task_id="t1"
    )
    events = collect(runtime, CUSTOMER_SERVICE, task)
    assert [type(e) for e in events] == [StepEvent, StepEvent, AnswerEvent, OutcomeEvent]
    call, final = events[0].step, events[1].step
    assert (call.index, call.kind, call.tool) == (0, "tool_call", "order_status")
    assert json.loads(call.arguments_json) == {"order_id": 1042}
    assert json.loads(call.result_json)["status"] == "shipped"
    assert call.idempotent and call.node_id == "node-a" and call.model == "scripted"
    assert call.tokens > 0 and call.duration_ms >= 0
    assert (final.index, final.kind) == (1, "final")
    outcome = events[-1].outcome
    assert (
        outcome.answer == "Order 1042 has shipped with DHL." and outcome.finish_reason == "answer"
    )
    assert outcome.steps == (call, final) and outcome.completion_tokens > 0
    # Step 0: only the relevant tool, no final answer (tool_choice="required").
    assert backend.schema(0)["properties"]["tool"] == {"const": "order_status"}
    # Step 1: the tool was used; only an answer is left, and it sees the tool's result.
    assert backend.schema(1)["required"] == ["final"]
    last_turn = backend.requests[1].messages[-1]
    assert last_turn.role == "user" and '"shipped"' in last_turn.content
    assert backend.requests[0].messages[0].role == "system"
    assert backend.requests[0].temperature == 0.0


def test_repair_then_success(tmp_path):
    runtime, backend, _ = make_runtime(
        tmp_path,
        [
            '{"tool": "order_status", "arguments": {"order_id": "ten"}}',
            {"tool": "order_status", "arguments": {"order_id": 1042}},
            {"final": "Shipped."},
        ],
    )
    task = AgentTask(agent="customer-service", input="order 1042 status?", task_id="t2")
    events = collect(runtime, CUSTOMER_SERVICE, task)
    steps = [e.step for e in events if isinstance(e, StepEvent)]
    assert [s.kind for s in steps] == ["tool_call", "final"]
    repair = backend.requests[1].messages[-1].content
    assert "invalid" in repair and "expected integer" in repair


def test_invalid_after_repairs_ends_the_task(tmp_path):
    runtime, _backend, _ = make_runtime(tmp_path, ['{"tool": ', '{"tool": '])
    task = AgentTask(agent="customer-service", input="order 1042?", task_id="t3")
    events = collect(runtime, CUSTOMER_SERVICE, task)
    step, outcome = events[0].step, events[-1].outcome
    assert step.kind == "invalid" and "not valid JSON" in step.error
    assert outcome.finish_reason == "invalid_tool_calls" and outcome.answer == ""


def test_tool_errors_go_back_to_the_model(tmp_path):
    runtime, backend, _ = make_runtime(
        tmp_path,
        [
            {"tool": "order_status", "arguments": {"order_id": 5}},
            {"final": "I cannot find order 5."},
        ],
    )
    events = collect(
        runtime,
        CUSTOMER_SERVICE,
        AgentTask(agent="customer-service", input="order 5?", task_id="t4"),
    )
    assert events[0].step.error == "no order 5"
    assert "no order 5" in backend.requests[1].messages[-1].content
    assert events[-1].outcome.answer == "I cannot find order 5."


def test_replayed_steps_are_not_executed_again(tmp_path):
    """Failover: a ticket created on the dead node is replayed, never created twice."""
    runtime, backend, store = make_runtime(tmp_path, [{"final": "Ticket 7 is open."}])
    done = StepRecord(
        index=0,
        kind="tool_call",
        tool="create_ticket",
        arguments_json='{"customer_email": "bob@example.com", "subject": "Broken"}',
        result_json='{"ticket_id": 7, "status": "open"}',
        idempotent=False,
        node_id="node-dead",
    )
    task = AgentTask(
        agent="customer-service",
        input="Open a ticket: broken, bob@example.com",
        task_id="t5",
        completed_steps=(done,),
    )
    before = store.count_tickets()
    events = collect(runtime, CUSTOMER_SERVICE, task)
    assert store.count_tickets() == before
    new_steps = [e.step for e in events if isinstance(e, StepEvent)]
    assert [(s.index, s.kind) for s in new_steps] == [(1, "final")]  # replayed ones not re-sent
    outcome = events[-1].outcome
    assert outcome.steps[0].replayed and outcome.steps[0].node_id == "node-dead"
    assert len(backend.requests) == 1
    assert '"ticket_id": 7' in backend.requests[0].messages[-1].content
    assert backend.schema(0)["required"] == ["final"]  # the ticket tool is not offered again


def test_replayed_final_step_returns_the_answer_without_the_model(tmp_path):
    runtime, backend, _ = make_runtime(tmp_path, [])
    steps = (StepRecord(index=0, kind="final", result_json='{"final": "Done."}'),)
    events = collect(
        runtime,
        CUSTOMER_SERVICE,
        AgentTask(agent="customer-service", input="x", task_id="t6", completed_steps=steps),
    )
    assert events[-1].outcome.answer == "Done." and backend.requests == []


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ((StepRecord(index=1, kind="tool_call", tool="order_status"),), "index 1"),
        ((StepRecord(index=0, kind="tool_call", tool="book_appointment"),), "does not have"),
        ((StepRecord(index=0, kind="final"), StepRecord(index=1, kind="final")), "not the last"),
    ],
)
def test_inconsistent_replay_is_refused(tmp_path, steps, message):
    runtime, _backend, _ = make_runtime(tmp_path, [])
    with pytest.raises(InvalidRequestError, match=message):
        collect(
            runtime,
            CUSTOMER_SERVICE,
            AgentTask(agent="customer-service", input="x", task_id="t7", completed_steps=steps),
        )


def test_side_effecting_call_repeated_with_same_arguments_runs_once(tmp_path):
    calls = []

    @tool(data=())
    def ring_bell(times: int, context: ToolContext) -> dict:
        """Ring the shop bell."""
        calls.append((times, context.idempotency_key))
        return {"rang": times}

    registry = builtin_registry()
    registry.register(ring_bell)
    spec = Agent("bell", tools=[ring_bell], allow_repeat_calls=True, max_steps=3)
    runtime, _backend, _ = make_runtime(
        tmp_path,
        [
            {"tool": "ring_bell", "arguments": {"times": 2}},
            {"tool": "ring_bell", "arguments": {"times": 2}},
            {"final": "Rang."},
        ],
        registry=registry,
    )
    events = collect(
        runtime, spec, AgentTask(agent="bell", input="ring the bell twice", task_id="t8")
    )
    assert calls == [(2, "t8:0")]
    steps = events[-1].outcome.steps
    assert [s.kind for s in steps] == ["tool_call", "tool_call", "final"]
    assert steps[1].result_json == steps[0].result_json and not steps[1].idempotent


def test_a_side_effects_idempotency_key_names_the_api_key(tmp_path):
    """Two keys that use the same task id never share a side effect's idempotency key."""
    calls = []

    @tool(data=())
    def ring_bell(times: int, context: ToolContext) -> dict:
        """Ring the shop bell."""
        calls.append(context.idempotency_key)
        return {"rang": times}

    registry = builtin_registry()
    registry.register(ring_bell)
    spec = Agent("bell", tools=[ring_bell], max_steps=2)
    for key_name in ("kiosk-1", "kiosk-2"):
        runtime, _backend, _ = make_runtime(
            tmp_path / key_name,
            [{"tool": "ring_bell", "arguments": {"times": 1}}, {"final": "Rang."}],
            registry=registry,
        )
        task = AgentTask(agent="bell", input="ring", task_id="t9", key_name=key_name)
        collect(runtime, spec, task)
    assert calls == ["kiosk-1/t9:0", "kiosk-2/t9:0"]


def test_last_step_may_only_answer(tmp_path):
    spec = CUSTOMER_SERVICE.model_copy(update={"max_steps": 1})
    runtime, backend, _ = make_runtime(tmp_path, [{"final": "I can only answer."}])
    events = collect(
        runtime, spec, AgentTask(agent="customer-service", input="order 1042?", task_id="t9")
    )
    assert backend.schema(0)["required"] == ["final"]
    assert events[-1].outcome.finish_reason == "answer"


def test_unknown_model_is_not_found(tmp_path):
    runtime, _backend, _ = make_runtime(tmp_path, [])
    with pytest.raises(NotFoundError, match="does not serve"):
        collect(
            runtime,
            CUSTOMER_SERVICE,
            AgentTask(agent="customer-service", input="x", task_id="t", model="gemma"),
        )


# ---------------------------------------------------------------- definitions and the node glue


def test_agent_defined_in_python_with_tool_objects():
    @tool(idempotent=True, data=("inventory",))
    def stock_level(sku: str) -> dict:
        """How many units are in stock."""
        return {"sku": sku, "units": 3}

    kiosk = Agent(
        "retail-kiosk", tools=[stock_level, "order_status"], system_prompt="You help shoppers."
    )
    assert isinstance(kiosk, AgentSpec) and kiosk.tools == ("stock_level", "order_status")
    registry = builtin_registry()
    registry.register(stock_level)
    assert kiosk.required_datasets(registry) == {"inventory", "orders"}
    with pytest.raises(ValueError, match="listed twice"):
        AgentSpec(name="x", tools=("a", "a"))


def test_offered_agents_need_tools_data_and_model():
    offered, refused = offered_agents(
        DEMO_AGENTS, REGISTRY, {"orders", "customers", "tickets"}, {"smollm2"}, "smollm2"
    )
    assert [a.name for a in offered] == ["customer-service"]
    assert any("technical-support: does not hold dataset(s) knowledge_base" in r for r in refused)
    _offered, refused = offered_agents(
        [Agent("x", tools=["nope"])], REGISTRY, DATASETS, {"smollm2"}, "smollm2"
    )
    assert refused == ["x: no tool(s) nope"]
    _offered, refused = offered_agents(
        [Agent("y", model="big")], REGISTRY, DATASETS, {"smollm2"}, "smollm2"
    )
    assert refused == ["y: does not serve model 'big'"]


def test_host_runs_agent_request_to_proto_events(tmp_path):
    backend = ScriptedBackend(
        [{"tool": "order_status", "arguments": {"order_id": 1042}}, {"final": "Shipped."}]
    )
    host = AgentHost({"smollm2": backend}, data_dir=tmp_path, node_id="n1")
    assert [i.name for i in host.agent_infos()] == [
        "customer-service",
        "technical-support",
        "scheduling",
    ]
    assert host.agent_infos()[0].model_id == "smollm2"

    async def go():
        request = node_pb2.AgentRequest(
            agent="customer-service",
            input="order 1042?",
            task=node_pb2.TaskContext(task_id="task-x"),
        )
        return [e async for e in host.run(request)]

    events = run(go())
    assert events[0].step.call.tool == "order_status" and events[0].step.node_id == "n1"
    assert events[-2].text == "Shipped."
    result = events[-1].result
    assert result.answer == "Shipped." and result.finish_reason == "answer"
    assert [s.kind for s in result.steps] == ["tool_call", "final"]
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens

    async def unknown():
        return [e async for e in host.run(node_pb2.AgentRequest(agent="nope", input="x"))]

    with pytest.raises(NotFoundError, match="offers: customer-service"):
        run(unknown())


def test_host_from_config_loads_agent_modules(tmp_path, monkeypatch):
    (tmp_path / "shop_agents.py").write_text(
        textwrap.dedent('''
        from nodes.agents import Agent
        from nodes.tools import tool

        @tool(idempotent=True, data=("inventory",))
        def stock_level(sku: str) -> dict:
            """How many units of a product are in stock."""
            return {"sku": sku, "units": 3}

        kiosk = Agent("retail-kiosk", tools=[stock_level], system_prompt="You help shoppers.")
    ''')
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "shop_agents", raising=False)
    config = NodeConfig(state_dir=str(tmp_path / "state"), agent_modules=("shop_agents",))
    host = AgentHost.from_config(config, {"smollm2": ScriptedBackend([])}, "n1")
    assert [i.name for i in host.agent_infos()] == [
        "customer-service",
        "technical-support",
        "scheduling",
        "retail-kiosk",
    ]
    assert host.store.path.parent == tmp_path / "state" / "data"
    # A node that says which datasets it holds offers only the agents they allow.
    config = NodeConfig(
        state_dir=str(tmp_path / "state"),
        agent_modules=("shop_agents",),
        datasets=("inventory",),
        agents=(),
    )
    host = AgentHost.from_config(config, {"smollm2": ScriptedBackend([])}, "n1")
    assert [i.name for i in host.agent_infos()] == ["retail-kiosk"]
    with pytest.raises(ConfigError, match="cannot import"):
        AgentHost.from_config(NodeConfig(agent_modules=("no_such_module_x",)), {}, "n1")


def test_host_refuses_oversized_or_empty_input(tmp_path):
    host = AgentHost({"smollm2": ScriptedBackend([])}, data_dir=tmp_path, max_input_bytes=16)

    async def go(text):
        return [e async for e in host.run(node_pb2.AgentRequest(agent="scheduling", input=text))]

    with pytest.raises(InvalidRequestError, match="over this node's limit of 16"):
        run(go("x" * 17))
    with pytest.raises(InvalidRequestError, match="empty"):
        run(go("  "))
