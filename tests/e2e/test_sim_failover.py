"""`distributed-edge` simulated for real, on both backends, under load and faults.

Docker: the node and coordinator images, a compose project on a real engine, the nodes found by
the coordinator through real mDNS inside the compose network, tasks through the ports published
on 127.0.0.1. netns: the same topology as processes in network namespaces on a bridge. The shipped
scenario (topologies/scenarios/distributed-edge.yaml) runs on each; its load keeps both nodes
busy all the time, so the kill lands on a task in flight:

- 50 tasks at concurrency 4 through the gRPC client, the `openai` client and the `mesh submit`
  CLI; edge-a's container (process) is killed at 3 s and started again at 8 s; edge-b is paused
  at 14 s for 4 s;
- every task is answered; none is completed twice by the nodes' own counts (Describe with
  task_counts, read after the run from each node; the killed node's journal survives in its
  state volume); the kill did hit tasks in flight, which moved to the other node;
- `down` leaves no container, network or volume (no namespace, link or process).

Skips only where the backend cannot exist here (not root, no engine can be started), and says
why; under CI as root it never skips.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess

import pytest

from mesh.sim.backend import SimBackend
from mesh.sim.report import to_json
from mesh.sim.runner import run_scenario
from mesh.sim.scenario import load_scenario

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]

REPO = pathlib.Path(__file__).resolve().parents[2]
TOPOLOGY = REPO / "topologies" / "distributed-edge.yaml"

SCENARIO = REPO / "topologies" / "scenarios" / "distributed-edge.yaml"


def _skip_reason(backend: str) -> str | None:
    if backend == "netns":
        from mesh.sim.lab import skip_reason

        return skip_reason()
    from mesh.sim.engine import engine_skip_reason

    return engine_skip_reason()


def _backend(name: str, root: pathlib.Path) -> SimBackend:
    if name == "docker":
        from mesh.sim.docker import DockerBackend

        return DockerBackend(root=root)
    from mesh.sim.netns import NetnsBackend

    return NetnsBackend(root=lambda: root)


def _docker_leftovers(project: str) -> list[str]:
    from mesh.sim.engine import docker_env

    env = {**os.environ, **docker_env()}
    label = f"label=com.docker.compose.project={project}"
    found = []
    for kind, argv in (
        ("container", ["docker", "ps", "-a", "--filter", label, "--format", "{{.Names}}"]),
        ("network", ["docker", "network", "ls", "--filter", label, "--format", "{{.Name}}"]),
        ("volume", ["docker", "volume", "ls", "--filter", label, "--format", "{{.Name}}"]),
    ):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        found += [f"{kind} {name}" for name in done.stdout.split()]
    return found


@pytest.mark.parametrize("backend_name", ["docker", "netns"])
def test_distributed_edge_answers_every_task_once_through_kill_and_pause(
    backend_name: str, tmp_path: pathlib.Path
) -> None:
    reason = _skip_reason(backend_name)
    if reason is not None:
        if os.environ.get("CI") and os.geteuid() == 0:
            pytest.fail(f"CI as root must run the {backend_name} simulation: {reason}")
        pytest.skip(f"{backend_name} backend unavailable: {reason}")
    scenario = load_scenario(SCENARIO)
    # The backend keeps its state (compose file, faults; lab state and logs) under tmp_path.
    backend = _backend(backend_name, tmp_path / "state")
    lines: list[str] = []
    try:
        status = backend.up(TOPOLOGY, progress=lines.append, timeout_s=900)
        assert [(n.name, n.state) for n in status.nodes] == [
            ("edge-a", "running"),
            ("edge-b", "running"),
        ], lines
        assert status.coordinator_grpc and status.coordinator_http
        if backend_name == "docker":
            # Published on loopback only.
            assert status.coordinator_grpc.startswith("127.0.0.1:")
            assert all(n.address.startswith("127.0.0.1:") for n in status.nodes)
        report = to_json(run_scenario(scenario, backend, progress=lines.append))
    finally:
        removed = backend.down(TOPOLOGY, progress=lines.append)
    (tmp_path / "report.json").write_text(json.dumps(report, indent=2))

    # Every task answered, through every ingress.
    assert report["tasks"] == {"total": 50, "ok": 50, "failed": 0, "errors": {}}, report["tasks"]
    via = {row["name"]: (row["tasks"], row["ok"]) for row in report["via"]}
    assert via == {"grpc": (30, 30), "openai": (15, 15), "cli": (5, 5)}
    # None twice, by the nodes' own counts; every answer counted by the node that gave it.
    once = report["exactly_once"]
    assert once["cannot_judge"] == "" and once["missing_nodes"] == [], once
    assert once["judged"] == 50 and once["answered_twice"] == 0, once
    assert once["never_completed"] == [] and once["answered_by_node_without_count"] == []
    assert once["ok"], once["problems"]
    counted = sum(node["completed"] for node in report["nodes"].values())
    # An answer whose stream was cut after its last token is whole, but its node never sent
    # (nor counted) its end: the report lists each such task.
    cut = once["cut_after_last_token"]
    assert counted == 50 + len(once["excused"]) - len(cut), cut
    # The faults happened, mid-load, and the kill moved tasks in flight to edge-b.
    faults = {f["label"]: f for f in report["faults"]}
    kill = next(f for f in faults.values() if f["action"] == "kill")
    # What a failure needs to be understood (CI keeps no report.json): the fault and the
    # node changes and faults of the timeline, whole.
    story = json.dumps(
        {"kill": kill, "timeline": [e for e in report["timeline"] if e["kind"] != "task"]},
        indent=1,
    )
    assert kill["error"] == "" and kill["not_ready_s"] is not None, story
    assert kill["tasks_hit"] >= 1, story
    assert not any("fired anyway" in note for note in report["notes"]), report["notes"]
    assert kill["reroute_s"] is not None and kill["reroute_s"] < 30
    pause = next(f for f in faults.values() if f["action"] == "pause")
    assert pause["error"] == "" and pause["not_ready_s"] is not None, pause
    assert report["faults_not_fired"] == []
    rerouted = [t for t in report["task_list"] if t["node"] != t["attempts"][0]["node"]]
    assert rerouted, "no task moved to another node"
    # Nothing left behind.
    assert removed and not any("nothing to remove" in line for line in removed)
    if backend_name == "docker":
        assert _docker_leftovers("em-distributed-edge") == []
    else:
        from mesh.sim.netns import NetnsBackend

        assert isinstance(backend, NetnsBackend)
        assert backend.leftovers(backend.prefix(TOPOLOGY)) == []
