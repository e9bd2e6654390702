"""Agent tasks through the dispatcher, with fake agent nodes: routing by agent, the step log,
tool-call-safe failover (replay, never re-run), `--agent auto`, and escalation tiers."""

from __future__ import annotations

import asyncio
import json

import pytest

from edgemesh.v1 import mesh_pb2, node_pb2
from mesh.coordinator.agent_run import agent_input
from mesh.coordinator.dispatch import Dispatcher
from mesh.coordinator.escalation import EscalationPolicy
from mesh.coordinator.service import MeshHandlers
from mesh.coordinator.settings import DispatcherSettings
from mesh.coordinator.tasks import AttemptOutcome, TaskResult, build_task
from mesh.core.errors import InvalidRequestError, NotFoundError, UnavailableError
from mesh.nodes_view import NodeState
from tests.agent_mesh_fakes import (
    ORDER_ANSWER,
    TICKET_PLAN,
    Die,
    FakeAgentMesh,
    Plan,
    Queued,
    Stall,
    Step,
    agent_view,
)
from tests.coordinator_fakes import ManualClock

pytestmark = pytest.mark.unit

ORDER = "What is the status of order 1042?"
TIERS = EscalationPolicy(tiers=("smollm2", "gemma"))


def run(coro, timeout=10):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def make(mesh: FakeAgentMesh, *nodes, clock=None, escalation=None, **settings) -> Dispatcher:
    values = dict(
        policy="round_robin",
        queue_timeout_s=0.0,
        node_wait_s=0.0,
        escalation=escalation or EscalationPolicy(),
    )
    values.update(settings)
    dispatcher = Dispatcher(
        DispatcherSettings(**values), connect=mesh.connect, clock=clock or ManualClock()
    )
    dispatcher.update_nodes(list(nodes))
    return dispatcher


async def collect(dispatcher: Dispatcher, task) -> tuple[list[object], TaskResult]:
    items = [item async for item in dispatcher.stream(task)]
    assert isinstance(items[-1], TaskResult)
    return items[:-1], items[-1]


def tools(result: TaskResult) -> list[tuple[int, str, str]]:
    return [(s.index, s.kind, s.call.tool) for s in result.steps]


# ---------------------------------------------------------------------- routing and the step log


def test_agent_task_goes_only_to_nodes_that_offer_the_agent():
    async def scenario():
        mesh = FakeAgentMesh()
        dispatcher = make(
            mesh,
            agent_view("a", agents=("scheduling",)),
            agent_view("b"),
            agent_view("c", agents=("customer-service",), state=NodeState.SUSPECT),
        )
        for _ in range(3):
            result = await dispatcher.submit(build_task(ORDER, agent="customer-service"))
            assert result.node_id == "b" and result.agent == "customer-service"
        request = mesh.links["b"].requests[0]
        assert (request.agent, request.input, request.model) == ("customer-service", ORDER, "")
        assert request.task.task_id and request.task.attempt == 1
        assert result.text == ORDER_ANSWER and result.finish_reason == "answer"
        assert tools(result) == [(0, "tool_call", "order_status"), (1, "final", "")]
        assert result.tier == "smollm2" and result.routed_by == "request"  # no tiers: the model
        assert not result.failed_over and result.escalation_reason == ""
        assert set(mesh.links) == {"b"}
        with pytest.raises(NotFoundError, match="no node runs agent 'returns'.*customer-service"):
            await dispatcher.submit(build_task(ORDER, agent="returns"))
        await dispatcher.close()

    run(scenario())


def test_stream_yields_each_step_then_the_answer_then_the_result():
    async def scenario():
        mesh = FakeAgentMesh()
        dispatcher = make(mesh, agent_view("a"))
        items, result = await collect(dispatcher, build_task(ORDER, agent="customer-service"))
        kinds = [item.kind if isinstance(item, node_pb2.AgentStep) else item for item in items]
        assert kinds == ["tool_call", "final", ORDER_ANSWER]
        assert json.loads(items[0].result_json)["status"] == "shipped"
        assert result.completion_tokens == 11 + 7 and result.prompt_tokens == 100
        await dispatcher.close()

    run(scenario())


def test_submit_stream_chunks_carry_steps_and_the_result_lists_them():
    async def scenario():
        mesh = FakeAgentMesh()
        handlers = MeshHandlers(make(mesh, agent_view("a")))
        request = mesh_pb2.SubmitRequest(agent="customer-service", prompt=ORDER)
        chunks = [chunk async for chunk in handlers.submit_stream(request)]
        assert [c.step.kind for c in chunks if c.HasField("step")] == ["tool_call", "final"]
        assert "".join(c.text for c in chunks) == ORDER_ANSWER
        result = chunks[-1].result
        assert [s.call.tool for s in result.steps] == ["order_status", ""]
        assert result.agent == "customer-service" and result.node_id == "a"
        unary = await handlers.submit(request)
        assert unary.text == ORDER_ANSWER and len(unary.steps) == 2 and unary.routed_by == "request"
        with pytest.raises(InvalidRequestError, match="tier applies to agent tasks"):
            await handlers.submit(mesh_pb2.SubmitRequest(model="m", prompt="x", tier="gemma"))
        await handlers.dispatcher.close()

    run(scenario())


def test_a_chat_becomes_input_and_history():
    request = build_task(
        messages=[
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": ORDER},
        ]
    ).request
    text, history = agent_input(request)
    assert text == ORDER and [m.content for m in history] == ["Hi", "Hello!"]
    assert agent_input(build_task("plain").request) == ("plain", [])


# ---------------------------------------------------------------------- tool-call-safe failover


def test_node_dying_after_a_side_effect_continues_elsewhere_without_running_it_again():
    async def scenario():
        mesh = FakeAgentMesh()
        mesh.plans = {"a": {"": TICKET_PLAN}, "b": {"": TICKET_PLAN}}
        mesh.scripts["a"] = [Die(UnavailableError("connection reset"), after=1)]
        dispatcher = make(mesh, agent_view("a"), agent_view("b"))
        items, result = await collect(
            dispatcher, build_task("My headset is broken", agent="customer-service")
        )
        # The ticket was created once, on the node that died; the second node replayed it.
        assert [(node, tool) for node, _task, tool in mesh.executed] == [("a", "create_ticket")]
        first, second = mesh.links["a"].requests[0], mesh.links["b"].requests[0]
        assert first.task.task_id == second.task.task_id == result.task_id
        assert (first.task.attempt, second.task.attempt) == (1, 2)
        assert list(first.completed_steps) == []
        assert [s.call.tool for s in second.completed_steps] == ["create_ticket"]
        assert second.completed_steps[0].node_id == "a"
        # The caller saw each step once, and the answer once.
        assert [i.kind for i in items if isinstance(i, node_pb2.AgentStep)] == [
            "tool_call",
            "final",
        ]
        assert [i for i in items if isinstance(i, str)] == ["I opened ticket 7 for you."]
        assert [(s.index, s.node_id) for s in result.steps] == [(0, "a"), (1, "b")]
        assert [a.outcome for a in result.attempts] == [
            AttemptOutcome.UNAVAILABLE,
            AttemptOutcome.OK,
        ]
        assert result.failed_over and result.node_id == "b"
        assert [a.completion_tokens for a in result.attempts] == [11, 7]
        await dispatcher.close()

    run(scenario())


def test_an_agent_task_waiting_in_a_busy_nodes_queue_is_not_failed_as_silent():
    async def scenario():
        mesh = FakeAgentMesh()
        mesh.plans = {"a": {"": TICKET_PLAN}, "b": {"": TICKET_PLAN}}
        mesh.scripts["a"] = [Queued(wait_s=1.0)]
        dispatcher = make(
            mesh,
            agent_view("a"),
            agent_view("b"),
            clock=asyncio.get_running_loop().time,
            attempt_timeout_s=0.25,
        )
        result = await dispatcher.submit(build_task("broken", agent="customer-service"))
        assert [a.outcome for a in result.attempts] == [AttemptOutcome.OK]
        assert result.node_id == "a" and not mesh.links.get("b")
        assert not dispatcher.pool.cooldowns.is_cooling("a")
        await dispatcher.close()

    run(scenario())


def test_a_silent_node_times_out_and_the_task_replays_elsewhere():
    async def scenario():
        mesh = FakeAgentMesh()
        mesh.plans = {"a": {"": TICKET_PLAN}, "b": {"": TICKET_PLAN}}
        mesh.scripts["a"] = [Stall(after=1)]
        dispatcher = make(
            mesh,
            agent_view("a"),
            agent_view("b"),
            clock=asyncio.get_running_loop().time,
            attempt_timeout_s=0.05,
        )
        result = await dispatcher.submit(build_task("broken", agent="customer-service"))
        assert result.attempts[0].outcome is AttemptOutcome.TIMEOUT and result.node_id == "b"
        assert [tool for _n, _t, tool in mesh.executed] == ["create_ticket"]
        await dispatcher.close()

    run(scenario())


def test_a_node_dying_after_its_final_step_lets_the_next_one_return_that_answer():
    async def scenario():
        mesh = FakeAgentMesh()
        mesh.scripts["a"] = [Die(UnavailableError("gone"), after=2)]  # both steps, no result
        dispatcher = make(mesh, agent_view("a"), agent_view("b"))
        items, result = await collect(dispatcher, build_task(ORDER, agent="customer-service"))
        assert [s.kind for s in mesh.links["b"].requests[0].completed_steps] == [
            "tool_call",
            "final",
        ]
        assert result.text == ORDER_ANSWER and [i for i in items if isinstance(i, str)] == [
            ORDER_ANSWER
        ]
        assert [tool for _n, _t, tool in mesh.executed] == ["order_status"]
        await dispatcher.close()

    run(scenario())


def test_every_node_failing_is_one_clear_error():
    async def scenario():
        mesh = FakeAgentMesh()
        mesh.scripts = {n: [Die(UnavailableError("down"))] * 5 for n in ("a", "b")}
        dispatcher = make(mesh, agent_view("a"), agent_view("b"), max_attempts=2)
        with pytest.raises(Exception, match="attempts: name-a: unavailable"):
            await dispatcher.submit(build_task(ORDER, agent="customer-service"))
        await dispatcher.close()

    run(scenario())


# ---------------------------------------------------------------------- --agent auto


def test_auto_asks_a_classifier_node_and_runs_the_agent_it_names():
    async def scenario():
        mesh = FakeAgentMesh()
        mesh.routers = {"r"}
        mesh.classifications = {
            "My printer shows E-04": ("technical-support", 0.93),
            "Printer again": ("technical-support", 0.91),
        }
        dispatcher = make(
            mesh,
            agent_view("a"),
            agent_view("r", agents=()),
            agent_view("t", agents=("technical-support",)),
        )
        result = await dispatcher.submit(build_task("My printer shows E-04", agent="auto"))
        assert result.agent == "technical-support" and result.node_id == "t"
        assert result.routed_by == "intent-router (confidence 0.93)"
        assert mesh.links["t"].requests[0].agent == "technical-support"
        await dispatcher.submit(build_task("Printer again", agent="auto"))
        assert mesh.describes.count("r") == 1  # the classifier was found once, then cached
        await dispatcher.close()

    run(scenario())


def test_auto_without_a_classifier_or_with_an_unknown_label_is_refused():
    async def scenario():
        mesh = FakeAgentMesh()
        dispatcher = make(mesh, agent_view("a"))
        with pytest.raises(NotFoundError, match="--no-router"):
            await dispatcher.submit(build_task("hello", agent="auto"))
        mesh.routers = {"a"}
        mesh.classifications = {"book me in": ("scheduling", 0.8)}
        dispatcher.pool.classifiers.forget("a")
        with pytest.raises(NotFoundError, match="chose agent 'scheduling'"):
            await dispatcher.submit(build_task("book me in", agent="auto"))
        await dispatcher.close()

    run(scenario())


def test_low_router_confidence_starts_on_the_next_tier():
    async def scenario():
        mesh = FakeAgentMesh()
        mesh.routers = {"a"}
        mesh.classifications = {"hmm": ("customer-service", 0.41)}
        dispatcher = make(
            mesh, agent_view("a"), agent_view("big", models=("smollm2", "gemma")), escalation=TIERS
        )
        result = await dispatcher.submit(build_task("hmm", agent="auto"))
        assert result.tier == "gemma" and result.node_id == "big"
        assert result.escalation_reason == "router confidence 0.41 is below 0.60"
        assert mesh.links["big"].requests[0].model == "gemma"
        await dispatcher.close()

    run(scenario())


# ---------------------------------------------------------------------- escalation


def test_invalid_tool_calls_escalate_to_the_next_tier_keeping_good_steps():
    async def scenario():
        mesh = FakeAgentMesh()
        failing = Plan(
            [
                Step(tool="create_ticket", result={"ticket_id": 3}, idempotent=False),
                Step(kind="invalid", error="arguments.order_id: expected integer"),
            ],
            finish="invalid_tool_calls",
        )
        mesh.plans = {
            "small": {"smollm2": failing},
            "big": {
                "gemma": Plan(
                    failing.steps[:1]
                    + [
                        Step(
                            tool="order_status",
                            arguments={"order_id": 1042},
                            result={"status": "shipped"},
                        )
                    ]
                )
            },
        }
        dispatcher = make(
            mesh, agent_view("small"), agent_view("big", models=("gemma",)), escalation=TIERS
        )
        items, result = await collect(dispatcher, build_task(ORDER, agent="customer-service"))
        assert mesh.links["small"].requests[0].model == "smollm2"
        escalated = mesh.links["big"].requests[0]
        assert escalated.model == "gemma" and escalated.task.task_id == result.task_id
        assert [s.kind for s in escalated.completed_steps] == ["tool_call"]  # invalid one dropped
        assert result.tier == "gemma" and result.text == ORDER_ANSWER
        assert result.escalation_reason.startswith(
            "smollm2: tool calls stayed invalid after repair (arguments.order_id"
        )
        assert [(n, t) for n, _id, t in mesh.executed] == [
            ("small", "create_ticket"),
            ("big", "order_status"),
        ]
        assert tools(result) == [
            (0, "tool_call", "create_ticket"),
            (1, "tool_call", "order_status"),
            (2, "final", ""),
        ]
        assert [i for i in items if isinstance(i, str)] == [ORDER_ANSWER]  # one answer only
        assert not result.failed_over and len(result.attempts) == 2
        await dispatcher.close()

    run(scenario())


def test_a_rejected_tool_call_escalates_and_the_larger_tier_redoes_it():
    async def scenario():
        mesh = FakeAgentMesh()
        mesh.plans = {
            "a": {
                "smollm2": Plan(
                    [
                        Step(
                            tool="customer_lookup",
                            arguments={"email": "anana@example.com"},
                            error="no customer with email anana@example.com",
                        )
                    ],
                    answer="no customer with email anana@example.com",
                ),
                "gemma": Plan(
                    [
                        Step(
                            tool="customer_lookup",
                            arguments={"email": "ana@example.com"},
                            result={"name": "Ana Lima"},
                        )
                    ],
                    answer="Ana Lima, gold",
                ),
            }
        }
        dispatcher = make(mesh, agent_view("a", models=("smollm2", "gemma")), escalation=TIERS)
        items, result = await collect(
            dispatcher, build_task("Who is ana@example.com?", agent="customer-service")
        )
        assert result.text == "Ana Lima, gold" and result.tier == "gemma"
        assert result.escalation_reason == (
            "smollm2: tool customer_lookup rejected the call "
            "(no customer with email anana@example.com)"
        )
        assert list(mesh.links["a"].requests[1].completed_steps) == []
        assert [i for i in items if isinstance(i, str)] == ["Ana Lima, gold"]
        await dispatcher.close()

    run(scenario())


def test_no_higher_tier_or_no_node_for_it_keeps_the_answer():
    async def scenario():
        mesh = FakeAgentMesh()
        rejected = Plan([Step(tool="order_status", error="no order 9")], answer="no order 9")
        mesh.plans = {"a": {"": rejected}}
        dispatcher = make(mesh, agent_view("a"), escalation=TIERS)  # nobody serves gemma
        result = await dispatcher.submit(build_task("order 9?", agent="customer-service"))
        assert result.tier == "smollm2" and result.text == "no order 9"
        assert result.escalation_reason == "" and len(mesh.links["a"].requests) == 1
        await dispatcher.close()

    run(scenario())


def test_a_higher_tier_without_an_answer_keeps_the_lower_tier_answer():
    async def scenario():
        mesh = FakeAgentMesh()
        babble = Plan(
            [Step(kind="invalid", error="the reply is not valid JSON")], finish="invalid_tool_calls"
        )
        mesh.plans = {
            "a": {
                "smollm2": Plan(
                    [Step(tool="customer_lookup", error="no customer x")], answer="no customer x"
                ),
                "gemma": babble,
            }
        }
        dispatcher = make(mesh, agent_view("a", models=("smollm2", "gemma")), escalation=TIERS)
        result = await dispatcher.submit(build_task("Who is x?", agent="customer-service"))
        assert (result.text, result.tier) == ("no customer x", "smollm2")
        assert result.escalation_reason == (
            "smollm2: tool customer_lookup rejected the call (no customer x); gemma: tool calls "
            "stayed invalid after repair (the reply is not valid JSON); kept the smollm2 answer"
        )
        await dispatcher.close()

    run(scenario())


def test_an_unsure_start_on_a_higher_tier_falls_back_to_the_lowest_once():
    async def scenario():
        mesh = FakeAgentMesh()
        mesh.routers = {"a"}
        mesh.classifications = {"Hello there": ("customer-service", 0.40)}
        mesh.plans = {
            "a": {
                "gemma": Plan(
                    [Step(kind="invalid", error="not JSON")], finish="invalid_tool_calls"
                ),
                "smollm2": Plan([], answer="Hello! How can I help?"),
            }
        }
        dispatcher = make(mesh, agent_view("a", models=("smollm2", "gemma")), escalation=TIERS)
        result = await dispatcher.submit(build_task("Hello there", agent="auto"))
        assert (result.text, result.tier) == ("Hello! How can I help?", "smollm2")
        assert result.escalation_reason == (
            "router confidence 0.40 is below 0.60; gemma: tool calls stayed invalid after repair "
            "(not JSON); fell back to smollm2"
        )
        assert [r.model for r in mesh.links["a"].requests] == ["gemma", "smollm2"]
        # The lowest tier failing too ends there: no loop back up.
        mesh.plans["a"]["smollm2"] = Plan(
            [Step(kind="invalid", error="bad")], finish="invalid_tool_calls"
        )
        result = await dispatcher.submit(build_task("Hello there", agent="auto"))
        assert result.finish_reason == "invalid_tool_calls" and len(mesh.links["a"].requests) == 4
        await dispatcher.close()

    run(scenario())


def test_a_requested_tier_starts_there_and_an_unknown_one_is_refused():
    async def scenario():
        mesh = FakeAgentMesh()
        dispatcher = make(
            mesh, agent_view("a"), agent_view("big", models=("gemma",)), escalation=TIERS
        )
        result = await dispatcher.submit(build_task(ORDER, agent="customer-service", tier="gemma"))
        assert (result.tier, result.escalation_reason, result.node_id) == (
            "gemma",
            "requested",
            "big",
        )
        with pytest.raises(InvalidRequestError, match="not one of this mesh's tiers: smollm2, "):
            await dispatcher.submit(build_task(ORDER, agent="customer-service", tier="huge"))
        dispatcher.update_nodes([agent_view("a")])
        with pytest.raises(NotFoundError, match="on tier 'gemma'"):
            await dispatcher.submit(build_task(ORDER, agent="customer-service", tier="gemma"))
        await dispatcher.close()

    run(scenario())


# ---------------------------------------------------------------------- a channel closed under a call


def test_a_call_cut_by_a_closed_channel_is_a_failed_attempt_not_a_cancelled_task():
    """grpc.aio raises CancelledError in a call whose channel closes (the registry dropped the
    node); the caller did not cancel, so the task must go on elsewhere and end with a result."""
    from tests.coordinator_fakes import ANSWER, Fail, FakeMesh, view

    async def scenario():
        mesh = FakeMesh()
        mesh.script(
            "a", Fail(asyncio.CancelledError(), after_pieces=2), Fail(asyncio.CancelledError())
        )
        dispatcher = Dispatcher(
            DispatcherSettings(policy="round_robin", queue_timeout_s=0.0, node_wait_s=0.0),
            connect=mesh.connect,
            clock=ManualClock(),
        )
        dispatcher.update_nodes([view("a"), view("b")])
        items = [item async for item in dispatcher.stream(build_task("hi", model="m"))]
        result = items[-1]
        assert isinstance(result, TaskResult) and "".join(items[:-1]) == ANSWER
        assert result.attempts[0].outcome is AttemptOutcome.UNAVAILABLE
        assert "channel closed" in result.attempts[0].detail
        unary = await dispatcher.submit(build_task("hi", model="m"))
        assert unary.node_id == "b" and unary.attempts[0].outcome is AttemptOutcome.UNAVAILABLE
        await dispatcher.close()

        agents = FakeAgentMesh()
        agents.scripts["a"] = [Die(asyncio.CancelledError(), after=1)]
        dispatcher = make(agents, agent_view("a"), agent_view("b"))
        result = await dispatcher.submit(build_task(ORDER, agent="customer-service"))
        assert result.node_id == "b" and result.attempts[0].outcome is AttemptOutcome.UNAVAILABLE
        assert [tool for _n, _t, tool in agents.executed] == ["order_status"]
        await dispatcher.close()

    run(scenario())


def test_coalesce_never_ends_a_cut_stream_as_if_complete():
    from mesh.coordinator.service import coalesce

    async def cut():
        yield "partial"
        raise asyncio.CancelledError  # from inside, not a cancellation of the consumer

    async def scenario():
        seen = []
        with pytest.raises(UnavailableError, match="cut"):
            async for item in coalesce(cut(), 0.01):
                seen.append(item)
        assert seen == ["partial"]

    run(scenario())


def test_an_agent_task_past_its_deadline_is_deadline_exceeded():
    from mesh.core.errors import DeadlineExceededError

    async def scenario():
        mesh = FakeAgentMesh()
        mesh.scripts = {"a": [Stall(after=1)], "b": [Stall(after=1)]}
        dispatcher = make(
            mesh,
            agent_view("a"),
            agent_view("b"),
            clock=asyncio.get_running_loop().time,
            attempt_timeout_s=5,
        )
        with pytest.raises(DeadlineExceededError, match="deadline"):
            await dispatcher.submit(build_task(ORDER, agent="customer-service", deadline_s=0.1))
        await dispatcher.close()

    run(scenario())


def test_a_node_that_no_longer_offers_the_agent_is_skipped():
    async def scenario():
        mesh = FakeAgentMesh()
        mesh.scripts["a"] = [Die(NotFoundError("agent 'customer-service' is not offered"))]
        dispatcher = make(mesh, agent_view("a"), agent_view("b"))
        result = await dispatcher.submit(build_task(ORDER, agent="customer-service"))
        assert result.node_id == "b" and result.attempts[0].outcome is AttemptOutcome.ERROR
        with pytest.raises(InvalidRequestError):
            mesh.scripts["b"] = [Die(InvalidRequestError("the input is empty"))]
            mesh.scripts["a"] = [Die(InvalidRequestError("the input is empty"))]
            await dispatcher.submit(build_task(ORDER, agent="customer-service"))
        await dispatcher.close()

    run(scenario())
