"""One task's trace across processes: the coordinator (this process: its Dispatcher and the HTTP
app that Ray Serve wraps, served by uvicorn on 127.0.0.1 port 0) and a real node process with
the bundled model, which runs an agent with a real tool.

The OpenAI client's `traceparent` is honoured (the task's trace continues the caller's), the
node's spans come back through NodeService.GetTrace, every span links to its parent across the
process boundary, and there is one `agent.step` span per step the task reported. `mesh trace`
prints the same tree.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import httpx
import pytest

from tests.coordinator_app import coordinator_app
from tests.mesh_processes import running_nodes

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


def mesh_trace(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mesh.cli", "trace", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_an_agent_task_is_one_trace_across_coordinator_and_node(tmp_path):
    with running_nodes(tmp_path, ["node-a"], timeout_s=180) as nodes:

        async def scenario():
            async with (
                coordinator_app([n.address for n in nodes]) as app,
                httpx.AsyncClient(base_url=app.base, timeout=120) as http,
            ):
                reply = await http.post(
                    "/v1/chat/completions",
                    json={
                        "model": "smollm2",
                        "messages": [
                            {"role": "user", "content": "What is the status of order 1042?"}
                        ],
                    },
                    headers={
                        "X-Mesh-Agent": "customer-service",
                        "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01",
                    },
                )
                assert reply.status_code == 200, reply.text
                task_id = reply.json()["mesh"]["task_id"]
                task = (await http.get(f"/dashboard/api/tasks/{task_id}")).json()
                trace = await http.get(f"/v1/mesh/traces/{task_id}")
                assert trace.status_code == 200, trace.text
                missing = await http.get("/v1/mesh/traces/no-such-task")
                assert missing.status_code == 404
                assert "no trace" in missing.json()["error"]["message"]
                printed = await asyncio.to_thread(mesh_trace, task_id, "--http", app.address)
                as_json = await asyncio.to_thread(
                    mesh_trace, task_id, "--http", app.address, "--json"
                )
                return task, trace.json(), printed, as_json

        task, trace, printed, as_json = asyncio.run(asyncio.wait_for(scenario(), 240))

    assert trace["trace_id"] == CALLER_TRACE  # the caller's trace goes on
    spans = trace["spans"]
    assert {s["trace_id"] for s in spans} == {CALLER_TRACE}
    by_name: dict[str, list[dict]] = {}
    for span in spans:
        by_name.setdefault(span["name"], []).append(span)
    (root,) = by_name["task"]
    assert root["parent_id"] == CALLER_SPAN and root["process"] == "coordinator"
    (attempt,) = by_name["attempt"]
    assert attempt["parent_id"] == root["span_id"]
    assert attempt["attributes"]["node"] == "node-a"
    (agent,) = by_name["node.agent"]  # recorded by the node process, fetched by GetTrace
    assert agent["process"] == "node node-a"
    assert agent["parent_id"] == attempt["span_id"]
    assert agent["attributes"]["agent"] == "customer-service"
    assert agent["attributes"]["outcome"] == "ok"

    steps = by_name["agent.step"]
    assert len(steps) == len(task["steps"]) >= 2  # a tool call, then the answer
    assert all(s["parent_id"] == agent["span_id"] for s in steps)
    assert [s["attributes"]["kind"] for s in steps] == [s["kind"] for s in task["steps"]]
    tools = by_name["tool.call"]
    called = [s["tool"] for s in task["steps"] if s["kind"] == "tool_call"]
    assert [t["attributes"]["tool"] for t in tools] == called
    step_ids = {s["span_id"] for s in steps}
    assert all(t["parent_id"] in step_ids for t in tools)
    # A child lies within its parent (one clock per process: allow a little skew).
    for child, parent in ((agent, attempt), (attempt, root)):
        assert child["duration_ms"] <= parent["duration_ms"] + 5

    assert printed.returncode == 0, printed.stderr
    lines = printed.stdout.splitlines()
    assert lines[0].startswith(f"trace {CALLER_TRACE}")
    assert lines[1].startswith("task ") and "[coordinator]" in lines[1]
    assert any(line.startswith("    node.agent ") and "[node node-a]" in line for line in lines)
    assert sum("agent.step" in line for line in lines) == len(steps)
    assert json.loads(as_json.stdout)["spans"] == spans


def test_mesh_trace_says_what_is_wrong_without_a_traceback():
    result = mesh_trace("some-task", "--http", "127.0.0.1:1")
    assert result.returncode == 1
    assert "cannot reach" in result.stderr and "Traceback" not in result.stderr
