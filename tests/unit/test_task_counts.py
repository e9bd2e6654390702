"""A node's own per-task counts: what is counted, the bounded window, the journal that outlives
the process, and the places in the node that count (generations, agent runs, tools)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging

import pytest

from edgemesh.v1 import node_pb2
from nodes.admission import AdmissionController
from nodes.agents import DEMO_AGENTS, AgentRuntime, AgentTask, StepRecord
from nodes.config import NodeConfig
from nodes.service import NodeIdentity, NodeServicer
from nodes.task_counts import COMPACT_FACTOR, TaskCounts, TaskEvent
from nodes.tools import DemoStore, builtin_registry
from tests.agent_fakes import ScriptedBackend
from tests.exactly_once import LostWindow, NodeCounts, check_exactly_once
from tests.fakes import FakeBackend

pytestmark = pytest.mark.unit

E = TaskEvent


def run(coro, timeout=10):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def ticking_clock():
    ticks = itertools.count(1000)
    return lambda: float(next(ticks))


# ---------------------------------------------------------------- counting and the window


def test_counts_each_event_per_task_and_ignores_tasks_without_an_id():
    counts = TaskCounts(clock=ticking_clock())
    counts.record("t1", E.GENERATION_STARTED)
    counts.record("t1", E.GENERATION_COMPLETED)
    counts.record("t1", E.GENERATION_STARTED)
    counts.record("t2", E.AGENT_RUN_STARTED)
    counts.record("t2", E.SIDE_EFFECT_TOOL_RUN, tool="create_ticket")
    counts.record("t2", E.SIDE_EFFECT_TOOL_RUN, tool="create_ticket")
    counts.record("t2", E.AGENT_RUN_COMPLETED)
    counts.record("", E.GENERATION_STARTED)
    one, two = counts.get("t1"), counts.get("t2")
    assert (one.generations_started, one.generations_completed) == (2, 1)
    assert one.last_completed_unix_s == 1001.0
    assert (two.agent_runs_started, two.agent_runs_completed) == (1, 1)
    assert two.side_effect_tool_runs == {"create_ticket": 2} and two.generations_started == 0
    assert counts.task_ids() == ["t1", "t2"] and counts.evicted == 0
    (proto,) = [c for c in counts.to_proto() if c.task_id == "t2"]
    assert proto.side_effect_tool_runs["create_ticket"] == 2 and proto.agent_runs_completed == 1


def test_only_the_most_recently_touched_task_ids_are_kept_and_drops_are_counted():
    counts = TaskCounts(kept=3)
    for task_id in ("a", "b", "c"):
        counts.record(task_id, E.GENERATION_STARTED)
    counts.record("a", E.GENERATION_COMPLETED)  # "a" is the most recent now
    counts.record("d", E.GENERATION_STARTED)
    counts.record("e", E.GENERATION_STARTED)
    assert counts.task_ids() == ["a", "d", "e"] and counts.evicted == 2
    assert counts.get("b").generations_started == 0  # forgotten, not wrong


# ---------------------------------------------------------------- the journal


def test_counts_survive_a_restart_from_the_journal(tmp_path):
    journal = tmp_path / "state" / "task-counts.jsonl"
    first = TaskCounts.open(kept=10, journal=journal)
    first.record("t1", E.GENERATION_STARTED)
    first.record("t1", E.GENERATION_COMPLETED)
    first.record("t2", E.SIDE_EFFECT_TOOL_RUN, tool="create_ticket")
    # No close(): a process killed with -9 closes nothing; each event is already in the file.
    second = TaskCounts.open(kept=10, journal=journal)
    assert second.get("t1") == first.get("t1") and second.get("t1").generations_completed == 1
    assert second.get("t2").side_effect_tool_runs == {"create_ticket": 1}
    second.record("t1", E.GENERATION_STARTED)
    second.close()
    assert TaskCounts.open(kept=10, journal=journal).get("t1").generations_started == 2


def test_a_line_cut_by_a_crash_is_skipped_with_a_warning(tmp_path, caplog):
    journal = tmp_path / "task-counts.jsonl"
    counts = TaskCounts.open(journal=journal)
    counts.record("t1", E.GENERATION_STARTED)
    counts.close()
    with open(journal, "a", encoding="utf-8") as handle:
        handle.write('{"t":"t1","e":"generation_comp')  # the process died mid-write
    with caplog.at_level(logging.WARNING, logger="nodes.task_counts"):
        again = TaskCounts.open(journal=journal)
    assert again.get("t1").generations_started == 1 and again.get("t1").generations_completed == 0
    assert "skipped 1 unreadable line" in caplog.text


def test_the_journal_is_compacted_and_keeps_counts_and_drops(tmp_path):
    journal = tmp_path / "task-counts.jsonl"
    counts = TaskCounts.open(kept=2, journal=journal)
    for index in range(40):
        counts.record(f"t{index % 2}", E.GENERATION_STARTED)
    counts.record("t2", E.GENERATION_STARTED)  # drops t0
    assert len(journal.read_text().splitlines()) <= COMPACT_FACTOR * 2 + 1
    again = TaskCounts.open(kept=2, journal=journal)
    assert again.task_ids() == counts.task_ids() == ["t1", "t2"]
    assert again.get("t1") == counts.get("t1") and again.get("t1").generations_started == 20
    assert again.evicted == counts.evicted == 1


def test_a_journal_that_cannot_be_written_is_given_up_for_memory(tmp_path, caplog):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="nodes.task_counts"):
        counts = TaskCounts.open(journal=blocker / "task-counts.jsonl")
    counts.record("t1", E.GENERATION_STARTED)
    assert counts.get("t1").generations_started == 1
    assert "counting in memory only" in caplog.text


# ---------------------------------------------------------------- where the node counts


def make_servicer(tmp_path, backend=None):
    backend = backend or FakeBackend("fake", reply="one two three four")
    run(backend.load())
    config = NodeConfig.model_validate(
        {"name": "n", "state_dir": str(tmp_path), "models": [{"id": "fake", "source": "x.gguf"}]}
    )
    identity = NodeIdentity("node-1", "n", "default", "0", 1, 0.0)
    counts = TaskCounts()
    servicer = NodeServicer(
        identity, config, {"fake": backend}, None, AdmissionController(1, 4), counts=counts
    )
    return servicer, counts


def _request(task_id: str) -> node_pb2.GenerateRequest:
    return node_pb2.GenerateRequest(prompt="hi", task=node_pb2.TaskContext(task_id=task_id))


def test_a_generation_counts_started_then_completed_and_describe_shows_it(tmp_path):
    servicer, counts = make_servicer(tmp_path)

    async def scenario():
        chunks = [chunk async for chunk in servicer.generate(_request("t1"))]
        assert chunks[-1].HasField("final")

    run(scenario())
    count = counts.get("t1")
    assert (count.generations_started, count.generations_completed) == (1, 1)
    assert not servicer.describe().task_counts  # only when asked
    reply = servicer.describe(task_counts=True)
    assert [(c.task_id, c.generations_completed) for c in reply.task_counts] == [("t1", 1)]
    assert reply.task_counts_evicted == 0


def test_a_generation_cut_off_before_its_end_is_started_but_not_completed(tmp_path):
    servicer, counts = make_servicer(tmp_path, FakeBackend("fake", reply="a b c d", delay_s=0.01))

    async def scenario():
        async with contextlib.aclosing(servicer.generate(_request("t1"))) as chunks:
            async for chunk in chunks:
                assert chunk.text  # the caller goes away after the first piece
                break

    run(scenario())
    count = counts.get("t1")
    assert (count.generations_started, count.generations_completed) == (1, 0)


def _runtime(tmp_path, replies, counts):
    store = DemoStore(tmp_path / "data")
    store.open()
    registry = builtin_registry()
    backend = ScriptedBackend(replies)
    runtime = AgentRuntime(
        {"scripted": backend}, registry, node_id="node-a", store=store, counts=counts
    )
    return runtime, store


def _collect(runtime, task):
    async def go():
        return [event async for event in runtime.run(DEMO_AGENTS[0], task)]

    return run(go())


TICKET_CALL = {
    "tool": "create_ticket",
    "arguments": {"customer_email": "bob@example.com", "subject": "Broken"},
}


def test_a_side_effecting_tool_is_counted_per_execution_and_a_read_is_not(tmp_path):
    counts = TaskCounts()
    runtime, store = _runtime(tmp_path, [TICKET_CALL, {"final": "Ticket opened."}], counts)
    before = store.count_tickets()
    ticket = "Please open a ticket, my printer is broken. I am bob@example.com"
    _collect(runtime, AgentTask(agent="customer-service", input=ticket, task_id="t1"))
    assert store.count_tickets() == before + 1
    assert counts.get("t1").side_effect_tool_runs == {"create_ticket": 1}
    runtime, _store = _runtime(
        tmp_path,
        [{"tool": "order_status", "arguments": {"order_id": 1042}}, {"final": "Shipped."}],
        counts,
    )
    order = "What is the status of order 1042?"
    _collect(runtime, AgentTask(agent="customer-service", input=order, task_id="t2"))
    assert counts.get("t2").side_effect_tool_runs == {}  # order_status only reads


def test_a_replayed_side_effecting_step_is_not_counted_as_an_execution(tmp_path):
    counts = TaskCounts()
    runtime, _store = _runtime(tmp_path, [{"final": "Ticket 7 is open."}], counts)
    done = StepRecord(
        index=0,
        kind="tool_call",
        tool="create_ticket",
        arguments_json=json.dumps(TICKET_CALL["arguments"]),
        result_json='{"ticket_id": 7, "status": "open"}',
        idempotent=False,
        node_id="node-dead",
    )
    task = AgentTask(agent="customer-service", input="ticket", task_id="t", completed_steps=(done,))
    _collect(runtime, task)
    assert counts.get("t").side_effect_tool_runs == {}


def test_run_agent_counts_a_run_started_and_completed(tmp_path):
    servicer, counts = make_servicer(tmp_path)

    class Host:  # what the servicer uses of AgentHost: a step, then the result
        def check(self, request):
            pass  # a well-formed request

        def model_for(self, request):
            return "fake"  # the servicer's one (loaded) model

        async def run(self, request):
            yield node_pb2.AgentEvent(step=node_pb2.AgentStep(index=0, kind="final"))
            assert counts.get("t").agent_runs_completed == 0
            yield node_pb2.AgentEvent(result=node_pb2.AgentResult(answer="ok"))

    servicer.agents = Host()  # type: ignore[assignment]
    request = node_pb2.AgentRequest(agent="a", input="x", task=node_pb2.TaskContext(task_id="t"))

    async def scenario():
        return [event async for event in servicer.RunAgent(request, None)]  # type: ignore[arg-type]

    assert run(scenario())[-1].result.answer == "ok"
    count = counts.get("t")
    assert (count.agent_runs_started, count.agent_runs_completed) == (1, 1)


# ---------------------------------------------------------------- judging from the counts


def _node(name, evicted=0, **tasks):
    counts = {
        task_id: node_pb2.TaskCount(task_id=task_id, **fields) for task_id, fields in tasks.items()
    }
    return NodeCounts(name, counts, evicted)


def test_the_check_passes_each_task_completed_once_and_fails_a_double_run():
    once = [
        _node("a", t1={"generations_started": 1, "generations_completed": 1}),
        _node("b", t1={"generations_started": 1}, t2={"generations_completed": 1}),
    ]
    verdict = check_exactly_once(["t1", "t2"], once)
    assert verdict.completed_on == {"t1": ["a"], "t2": ["b"]} and verdict.started == 2
    twice_on_two = [
        _node("a", t1={"generations_completed": 1}),
        _node("b", t1={"generations_completed": 1}),
    ]
    with pytest.raises(AssertionError, match=r"t1: completed on \['a', 'b'\]"):
        check_exactly_once(["t1"], twice_on_two)
    with pytest.raises(AssertionError, match=r"t1: completed on \['a', 'a'\]"):
        check_exactly_once(["t1"], [_node("a", t1={"generations_completed": 2})])
    with pytest.raises(AssertionError, match="t9: completed on no node"):
        check_exactly_once(["t9"], once)


def test_only_a_result_the_cut_node_could_not_send_is_excused():
    window = LostWindow("cut", cut_unix_s=100.0, back_unix_s=105.0)
    survivor = _node("b", t1={"generations_completed": 1})
    orphan = _node("cut", t1={"generations_completed": 1, "last_completed_unix_s": 102.0})
    verdict = check_exactly_once(["t1"], [orphan, survivor], lost=[window])
    assert verdict.excused == [("t1", "cut")]
    sent_before = _node("cut", t1={"generations_completed": 1, "last_completed_unix_s": 90.0})
    with pytest.raises(AssertionError, match="not exactly once"):
        check_exactly_once(["t1"], [sent_before, survivor], lost=[window])
    after_return = _node("cut", t1={"generations_completed": 1, "last_completed_unix_s": 106.0})
    with pytest.raises(AssertionError, match="not exactly once"):
        check_exactly_once(["t1"], [after_return, survivor], lost=[window])


def test_the_check_fails_a_tool_run_twice_and_refuses_counts_with_gaps():
    nodes = [
        _node("a", t1={"agent_runs_completed": 1, "side_effect_tool_runs": {"create_ticket": 1}}),
        _node("b", t1={"side_effect_tool_runs": {"create_ticket": 1}}),
    ]
    with pytest.raises(AssertionError, match="create_ticket': 2"):
        check_exactly_once(["t1"], nodes, kind="agent")
    with pytest.raises(AssertionError, match="dropped task ids"):
        check_exactly_once(["t1"], [_node("a", evicted=3, t1={"generations_completed": 1})])
