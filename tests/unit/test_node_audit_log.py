"""The node's audit log: a JSON line per agent step the node executed (never a replayed one),
naming who asked and how the step ended, never what was said or found; the file is 0600."""

from __future__ import annotations

import asyncio
import json
import os
import stat

import pytest

from mesh.core.audit import read_records
from mesh.core.errors import ConfigError
from nodes.agents import Agent, AgentHost, AgentRuntime, AgentTask, StepRecord
from nodes.agents.demo import CUSTOMER_SERVICE
from nodes.audit import AUDIT_FILE, AuditLog, StepOutcome
from nodes.config import NodeConfig
from nodes.tools import DemoStore, ToolRegistry, builtin_registry, tool
from tests.agent_fakes import ScriptedBackend

pytestmark = pytest.mark.unit

FIELDS = [
    "time",
    "task_id",
    "attempt",
    "node_id",
    "agent",
    "step",
    "kind",
    "tool",
    "side_effecting",
    "outcome",
    "key_name",
    "subject",
    "model",
]
ANA = "ana@example.com"


def run(coro, timeout=10):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture
def store(tmp_path):
    store = DemoStore(tmp_path / "data")
    store.open()
    return store


def audited_runtime(tmp_path, store, replies, registry=None) -> tuple[AgentRuntime, AuditLog]:
    audit = AuditLog.open(tmp_path / "state" / AUDIT_FILE, node_id="n1", clock=lambda: "T")
    runtime = AgentRuntime(
        {"smollm2": ScriptedBackend(replies, model_id="smollm2")},
        registry or builtin_registry(),
        node_id="n1",
        store=store,
        audit=audit,
    )
    return runtime, audit


def task(text: str, **fields) -> AgentTask:
    values = dict(agent="customer-service", input=text, task_id="task-1", attempt=1)
    values.update(fields)
    return AgentTask(**values)


async def drain(runtime: AgentRuntime, spec, agent_task: AgentTask) -> list:
    return [event async for event in runtime.run(spec, agent_task)]


def test_each_executed_step_is_one_line_naming_who_asked_and_how_it_ended(tmp_path, store):
    runtime, audit = audited_runtime(
        tmp_path,
        store,
        [
            {"tool": "order_status", "arguments": {"order_id": 1042}},
            {"final": "Order 1042 is shipped."},
        ],
    )
    asked = task("Where is my order 1042?", key_name="kiosk-7", subject=ANA)
    run(drain(runtime, CUSTOMER_SERVICE, asked))
    lines = list(read_records(audit.path))
    assert [list(line) for line in lines] == [FIELDS, FIELDS]
    assert lines[0] == {
        "time": "T",
        "task_id": "task-1",
        "attempt": 1,
        "node_id": "n1",
        "agent": "customer-service",
        "step": 0,
        "kind": "tool_call",
        "tool": "order_status",
        "side_effecting": False,
        "outcome": "ok",
        "key_name": "kiosk-7",
        "subject": ANA,
        "model": "smollm2",
    }
    assert (lines[1]["step"], lines[1]["kind"], lines[1]["tool"]) == (1, "final", "")
    # Never the user's words, the tool's arguments or its result, nor the answer.
    text = audit.path.read_text()
    for private in ("Where is my order", "1042", "shipped", "Wireless headset"):
        assert private not in text
    assert stat.S_IMODE(os.stat(audit.path).st_mode) == 0o600


def test_a_refused_call_is_logged_denied_without_naming_who_was_asked_about(tmp_path, store):
    runtime, audit = audited_runtime(
        tmp_path,
        store,
        [
            {"tool": "customer_lookup", "arguments": {"email": "bob@example.com"}},
            {"final": "I cannot tell you."},
        ],
    )
    run(drain(runtime, CUSTOMER_SERVICE, task("Who is bob@example.com?", subject=ANA)))
    lines = list(read_records(audit.path))
    assert [(line["tool"], line["outcome"]) for line in lines] == [
        ("customer_lookup", "denied"),
        ("", "ok"),
    ]
    assert "bob" not in audit.path.read_text()


def test_replayed_steps_ran_elsewhere_and_are_not_logged_here(tmp_path, store):
    runtime, audit = audited_runtime(tmp_path, store, [{"final": "I opened ticket 9."}])
    ticket = StepRecord(
        index=0,
        kind="tool_call",
        tool="create_ticket",
        arguments_json=json.dumps({"customer_email": ANA, "subject": "Broken"}),
        result_json=json.dumps({"ticket_id": 9, "status": "open"}),
        idempotent=False,
        node_id="node-that-died",
        model="smollm2",
    )
    replay = task("Open a ticket: my headset is broken", attempt=2, completed_steps=(ticket,))
    run(drain(runtime, CUSTOMER_SERVICE, replay))
    lines = list(read_records(audit.path))
    assert [(line["step"], line["kind"], line["attempt"]) for line in lines] == [(1, "final", 2)]
    assert store.count_tickets() == 1  # the seeded one: the replayed ticket was not made again


def test_a_side_effecting_call_and_its_repeat_are_told_apart(tmp_path, store):
    call = {"tool": "create_ticket", "arguments": {"customer_email": ANA, "subject": "Broken"}}
    spec = Agent("tickets", tools=["create_ticket"], max_steps=3, allow_repeat_calls=True)
    runtime, audit = audited_runtime(tmp_path, store, [call, call, {"final": "Done."}])
    run(drain(runtime, spec, task("Broken headset", agent="tickets")))
    lines = list(read_records(audit.path))
    assert [(line["tool"], line["side_effecting"], line["outcome"]) for line in lines] == [
        ("create_ticket", True, "ok"),
        ("create_ticket", True, "deduplicated"),  # returned the first result, did not act
        ("", False, "ok"),
    ]


def test_a_tool_call_cancelled_while_it_runs_is_logged_as_cancelled(tmp_path, store):
    started = asyncio.Event()

    @tool(idempotent=False)
    async def send_parcel(address: str) -> dict:
        """Send a parcel.

        Args:
            address: where to.
        """
        started.set()
        await asyncio.sleep(3600)
        return {}

    registry = ToolRegistry([send_parcel])
    spec = Agent("post", tools=[send_parcel], max_steps=2)
    replies = [{"tool": "send_parcel", "arguments": {"address": "Main St 1"}}]
    runtime, audit = audited_runtime(tmp_path, store, replies, registry)

    async def scenario():
        running = asyncio.ensure_future(drain(runtime, spec, task("Send it", agent="post")))
        await asyncio.wait_for(started.wait(), 5)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(running, 5)

    run(scenario())
    lines = list(read_records(audit.path))
    assert [(line["tool"], line["side_effecting"], line["outcome"]) for line in lines] == [
        ("send_parcel", True, "cancelled")
    ]
    assert "Main St" not in audit.path.read_text()


def test_the_node_config_turns_the_log_on_in_the_state_dir_and_makes_it_private(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    older = state / AUDIT_FILE
    older.write_text('{"old": 1}\n')
    older.chmod(0o644)
    host = AgentHost.from_config(
        NodeConfig(state_dir=str(state)), {"smollm2": ScriptedBackend([])}, "n1"
    )
    assert host.runtime.audit is not None and host.runtime.audit.path == older
    assert stat.S_IMODE(os.stat(older).st_mode) == 0o600
    assert older.read_text() == '{"old": 1}\n'  # appended to, never truncated
    quiet = tmp_path / "quiet"
    host = AgentHost.from_config(
        NodeConfig(state_dir=str(quiet), audit_log=False), {"smollm2": ScriptedBackend([])}, "n1"
    )
    assert host.runtime.audit is None and not (quiet / AUDIT_FILE).exists()


def test_a_log_that_cannot_be_written_does_not_stop_the_agent(tmp_path, store, caplog):
    runtime, audit = audited_runtime(
        tmp_path, store, [{"tool": "order_status", "arguments": {"order_id": 1042}}, {"final": "x"}]
    )
    audit.path.unlink()
    audit.path.mkdir()  # a directory where the file should be: every append fails
    events = run(drain(runtime, CUSTOMER_SERVICE, task("Where is order 1042?")))
    assert events[-1].outcome.finish_reason == "answer"
    assert audit.failures == 2
    assert len([r for r in caplog.records if "audit log" in r.getMessage()]) == 1


def test_a_huge_caller_text_still_makes_one_short_line(tmp_path):
    audit = AuditLog.open(tmp_path / AUDIT_FILE, node_id="n1")
    huge = task("x", task_id="t" * 10_000, subject="\u00e9" * 10_000, key_name="\x00" * 10_000)
    audit.step(
        huge,
        index=0,
        kind="final",
        tool="",
        side_effecting=False,
        outcome=StepOutcome.OK,
        model="m",
    )
    raw = audit.path.read_bytes()
    assert raw.count(b"\n") == 1 and len(raw) < 4096
    assert json.loads(raw)["subject"].startswith("\u00e9")


def test_a_log_that_cannot_be_created_stops_the_node_at_start_saying_why(tmp_path):
    (tmp_path / "state").write_text("a file where the state directory should be")
    with pytest.raises(ConfigError, match="cannot create the audit log .*audit_log: false"):
        AgentHost.from_config(
            NodeConfig(state_dir=str(tmp_path / "state")), {"smollm2": ScriptedBackend([])}, "n1"
        )
