"""`mesh top --once` against the coordinator's real HTTP app, and against nothing at all.

Two real node processes (bench/fake_node: a real NodeDaemon with an instant model) behind an
in-process NodeRegistry and Dispatcher; the coordinator's HTTP app (the one Ray Serve wraps) is
served by uvicorn on 127.0.0.1 port 0. `mesh top` runs as its own process, as a user runs it.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import httpx
import pytest

from mesh.coordinator.settings import DispatcherSettings
from tests.coordinator_app import coordinator_app
from tests.mesh_processes import running_nodes

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

CLI_TIMEOUT_S = 60


def mesh_top(*args: str) -> subprocess.CompletedProcess[str]:
    # Wide enough that no cell is cut (a pipe has no width; the runner's COLUMNS may say 80).
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "mesh.cli", "top", *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        env=env,
    )


async def until_ready(base: str, names: set[str]) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=5) as http:
        while True:
            nodes = (await http.get("/dashboard/api/state")).json()["nodes"]
            if {n["name"] for n in nodes if n["state"] == "ready"} == names:
                return
            await asyncio.sleep(0.05)


async def check_top(base: str, port: int) -> None:
    async with asyncio.timeout(20):
        await until_ready(base, {"node-a", "node-b"})
    async with httpx.AsyncClient(base_url=base, timeout=20) as http:
        body = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]}
        reply = await asyncio.wait_for(http.post("/v1/chat/completions", json=body), 30)
    assert reply.status_code == 200, reply.text
    task_id = reply.json()["mesh"]["task_id"]

    address = f"127.0.0.1:{port}"
    frame = await asyncio.to_thread(mesh_top, "--once", "--http", address)
    assert frame.returncode == 0, frame.stderr
    for expected in ("node-a", "node-b", "ready", task_id, "done", f"http://{address}"):
        assert expected in frame.stdout, (expected, frame.stdout)
    assert "2 nodes: 2 ready" in frame.stdout

    raw = await asyncio.to_thread(mesh_top, "--once", "--json", "--http", address)
    assert raw.returncode == 0, raw.stderr
    state = json.loads(raw.stdout)
    assert sorted(n["name"] for n in state["nodes"]) == ["node-a", "node-b"]
    assert [t["task_id"] for t in state["tasks"]] == [task_id]


def test_top_once_shows_the_nodes_and_a_finished_task(tmp_path):
    with running_nodes(tmp_path, ["node-a", "node-b"], fake=True, model="smollm2") as nodes:

        async def scenario() -> None:
            settings = DispatcherSettings(deadline_s=30)
            async with coordinator_app([n.address for n in nodes], settings) as app:
                await check_top(app.base, app.port)

        asyncio.run(asyncio.wait_for(scenario(), 200))


def test_top_once_without_a_coordinator_says_so_in_one_line_and_exits_1():
    done = mesh_top("--once", "--http", "127.0.0.1:1")  # port 1: nothing listens there
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("mesh top: cannot reach http://127.0.0.1:1: ")
    assert "Traceback" not in done.stderr
