"""`mesh node start --topology FILE --node NAME` as a real process: the node a coordinator (or a
simulation) then finds is the topology's node, by name, labels, models and agents."""

from __future__ import annotations

import asyncio
import json
import pathlib
import subprocess

import pytest

from mesh.client import NodeClient
from mesh.local_processes import LocalNode, mesh_command
from mesh.topology import load_topology

pytestmark = pytest.mark.integration

TOPOLOGIES = pathlib.Path(__file__).parents[2] / "topologies"
EDGE = TOPOLOGIES / "distributed-edge.yaml"


def start_command(state_dir: pathlib.Path, topology: pathlib.Path, node: str, *extra: str):
    return mesh_command(
        "node",
        "start",
        "--topology",
        str(topology),
        "--node",
        node,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--state-dir",
        str(state_dir),
        "--no-advertise",
        *extra,
    )


@pytest.fixture
def edge_a(tmp_path):
    command = start_command(tmp_path / "state", EDGE, "edge-a", "--stand-ins")
    with LocalNode.start(
        command, name="edge-a", log=tmp_path / "edge-a.log", timeout_s=120
    ) as node:
        yield node


def test_a_node_started_from_the_topology_is_the_topologys_node(edge_a):
    declared = load_topology(EDGE).node_named("edge-a")
    assert declared is not None
    assert edge_a.node_name == "edge-a"
    assert edge_a.ready_line.endswith(f"serving smollm2, router, intent-router on {edge_a.address}")

    async def describe():
        async with NodeClient(edge_a.address) as client:
            return await client.describe(timeout_s=10)

    info = asyncio.run(asyncio.wait_for(describe(), 30))
    assert info.node.name == "edge-a" and info.node.cluster == "distributed-edge"
    assert dict(info.node.labels) == declared.labels == {"site": "lab", "tier": "edge"}
    assert {m.model_id for m in info.models} == {"smollm2", "router", "intent-router"}
    assert [(a.name, a.model_id) for a in info.agents] == [
        ("intent-router", "router"),
        ("customer-service", "smollm2"),
        ("scheduling", "smollm2"),
    ]
    assert (info.capacity.max_concurrent, info.capacity.max_queued) == (1, 8)

    described = subprocess.run(
        mesh_command("node", "describe", edge_a.address, "--json"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert described.returncode == 0, described.stderr
    shown = json.loads(described.stdout)
    assert shown["node"]["name"] == "edge-a" and shown["node"]["labels"] == declared.labels
    assert sorted(a["name"] for a in shown["agents"]) == sorted(declared.agents)
    assert edge_a.stop(timeout_s=30) == 0
    assert "stand-in:" not in edge_a.log_text()  # edge-a has everything it names


def test_a_node_missing_tools_does_not_start_without_stand_ins(tmp_path):
    done = subprocess.run(
        start_command(tmp_path / "state", TOPOLOGIES / "retail-store.yaml", "kiosk-1"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert "agent 'kiosk-assistant' names tool(s) this node does not have" in done.stderr
    assert "--stand-ins" in done.stderr and "Traceback" not in done.stderr


def test_with_stand_ins_a_node_serves_what_the_simulation_lacks(tmp_path, monkeypatch):
    # edge-b's `large` is an upstream server that a simulated network cannot reach (and its
    # key is not set): the bundled smollm2 serves that alias, so the node starts and serves.
    monkeypatch.delenv("EDGE_MESH_UPSTREAM_KEY", raising=False)
    command = start_command(tmp_path / "state", EDGE, "edge-b", "--stand-ins")
    with LocalNode.start(
        command, name="edge-b", log=tmp_path / "edge-b.log", timeout_s=120
    ) as node:
        assert "serving smollm2, large, intent-router on" in node.ready_line
        assert node.stop(timeout_s=30) == 0
        lines = [line for line in node.log_text().splitlines() if "stand-in:" in line]
    assert len(lines) == 1 and "WARNING" in lines[0], lines
    assert lines[0].split(": ", 1)[1] == (
        "stand-in: model large: $EDGE_MESH_UPSTREAM_KEY (its API key) is not set; "
        "serving the bundled smollm2 in its place"
    )
