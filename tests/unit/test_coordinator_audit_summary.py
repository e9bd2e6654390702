"""The coordinator's audit summary: one JSON line per agent task however it ended (answered,
failed, abandoned by its caller), naming who asked, the agent, the tools and the nodes; no
line for a model task; the file is 0600 and where the config says."""

from __future__ import annotations

import asyncio
import os
import stat

import pytest

from edgemesh.v1 import mesh_pb2
from mesh.cluster import AUDIT
from mesh.coordinator.dispatch import Dispatcher
from mesh.coordinator.service import MeshHandlers
from mesh.coordinator.settings import CoordinatorConfig, DispatcherSettings
from mesh.coordinator.tasks import build_task
from mesh.core.audit import read_records
from mesh.core.caller import CALLER, Caller
from mesh.core.errors import TaskFailedError, UnavailableError
from tests.agent_mesh_fakes import TICKET_PLAN, Die, FakeAgentMesh, Stall, agent_view
from tests.coordinator_fakes import FakeMesh, ManualClock, view

pytestmark = pytest.mark.unit

ANA = Caller(key_name="kiosk-7", subject="ana@example.com")
FIELDS = {
    "time",
    "task_id",
    "key_name",
    "subject",
    "agent",
    "outcome",
    "finish_reason",
    "error",
    "steps",
    "tools",
    "side_effecting_tools",
    "nodes",
    "attempts",
    "tier",
    "duration_ms",
}


def run(coro, timeout=10):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def audited(tmp_path, mesh, *nodes, **settings) -> Dispatcher:
    values: dict[str, object] = dict(
        policy="round_robin",
        queue_timeout_s=0.0,
        node_wait_s=0.0,
        audit_log=str(tmp_path / "cluster" / AUDIT),
    )
    values.update(settings)
    dispatcher = Dispatcher(DispatcherSettings(**values), connect=mesh.connect, clock=ManualClock())
    dispatcher.update_nodes(list(nodes))
    return dispatcher


def lines(tmp_path) -> list[dict]:
    return list(read_records(tmp_path / "cluster" / AUDIT))


def test_an_answered_task_is_one_line_naming_who_asked_the_tools_and_the_nodes(tmp_path):
    async def scenario():
        mesh = FakeAgentMesh()
        mesh.plans = {"a": {"": TICKET_PLAN}, "b": {"": TICKET_PLAN}}
        mesh.scripts["a"] = [Die(UnavailableError("connection reset"), after=1)]
        dispatcher = audited(tmp_path, mesh, agent_view("a"), agent_view("b"))
        CALLER.set(ANA)
        task = build_task("My headset is broken", agent="customer-service", task_id="t-1")
        await dispatcher.submit(task)
        await dispatcher.close()

    run(scenario())
    [line] = lines(tmp_path)
    assert set(line) == FIELDS
    assert line | {"time": "T", "duration_ms": 0} == {
        "time": "T",
        "task_id": "t-1",
        "key_name": "kiosk-7",
        "subject": "ana@example.com",
        "agent": "customer-service",
        "outcome": "ok",
        "finish_reason": "answer",
        "error": "",
        "steps": 2,
        "tools": ["create_ticket"],
        "side_effecting_tools": ["create_ticket"],
        "nodes": ["name-a", "name-b"],
        "attempts": 2,
        "tier": "smollm2",
        "duration_ms": 0,
    }
    assert "headset" not in (tmp_path / "cluster" / AUDIT).read_text()
    mode = stat.S_IMODE(os.stat(tmp_path / "cluster" / AUDIT).st_mode)
    assert mode == 0o600


def test_a_failed_task_says_how_in_a_code_and_a_streamed_one_is_logged_too(tmp_path):
    async def scenario():
        mesh = FakeAgentMesh()
        mesh.scripts = {"a": [Die(UnavailableError("down for maintenance"))] * 3}
        dispatcher = audited(tmp_path, mesh, agent_view("a"), max_attempts=2, cooldown_s=0.0)
        with pytest.raises(TaskFailedError):
            await dispatcher.submit(build_task("Order 1042?", agent="customer-service"))
        mesh.scripts = {}
        handlers = MeshHandlers(dispatcher, stream_window_s=0.01)
        request = mesh_pb2.SubmitRequest(agent="customer-service", prompt="Order 1042?")
        [chunk async for chunk in handlers.submit_stream(request)]
        await dispatcher.close()

    run(scenario())
    failed, streamed = lines(tmp_path)
    assert (failed["outcome"], failed["error"], failed["attempts"]) == ("failed", "unavailable", 2)
    assert "maintenance" not in str(failed)
    assert (failed["key_name"], failed["subject"]) == ("", "")  # an open mesh: nobody named
    assert (streamed["outcome"], streamed["tools"], streamed["steps"]) == (
        "ok",
        ["order_status"],
        2,
    )


def test_a_task_its_caller_abandoned_is_logged_cancelled_with_the_steps_so_far(tmp_path):
    async def scenario():
        mesh = FakeAgentMesh()
        mesh.plans = {"a": {"": TICKET_PLAN}}
        mesh.scripts["a"] = [Stall(after=1)]
        dispatcher = audited(tmp_path, mesh, agent_view("a"))
        CALLER.set(ANA)
        submitted = asyncio.ensure_future(
            dispatcher.submit(build_task("broken", agent="customer-service"))
        )
        while not mesh.executed:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.01)  # the step reaches the dispatcher
        submitted.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(submitted, 5)
        await dispatcher.close()

    run(scenario())
    [line] = lines(tmp_path)
    assert (line["outcome"], line["subject"], line["side_effecting_tools"]) == (
        "cancelled",
        "ana@example.com",
        ["create_ticket"],
    )


def test_a_model_task_leaves_no_line_and_no_file_means_no_log(tmp_path):
    async def scenario():
        mesh = FakeMesh()
        dispatcher = audited(tmp_path, mesh, view("a"))
        await dispatcher.submit(build_task("hello"))
        await dispatcher.close()
        quiet = audited(tmp_path / "quiet", FakeAgentMesh(), agent_view("a"), audit_log="")
        await quiet.submit(build_task("Order 1042?", agent="customer-service"))
        await quiet.close()
        return quiet

    quiet = run(scenario())
    assert lines(tmp_path) == [] and quiet.audit is None
    assert not (tmp_path / "quiet").exists()


def test_the_summary_goes_to_the_cluster_directory_unless_the_config_says_otherwise(tmp_path):
    cluster = str(tmp_path / "cluster")
    assert CoordinatorConfig().dispatcher_settings().audit_log == ""
    with_cluster = CoordinatorConfig(cluster_dir=cluster).dispatcher_settings()
    assert with_cluster.audit_log == str(tmp_path / "cluster" / AUDIT)
    assert (
        CoordinatorConfig(cluster_dir=cluster, audit_log="").dispatcher_settings().audit_log == ""
    )
    elsewhere = str(tmp_path / "audit" / "tasks.jsonl")
    config = CoordinatorConfig.from_topology(None, audit_log=elsewhere)
    assert config.dispatcher.audit_log == elsewhere
