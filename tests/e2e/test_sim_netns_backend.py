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
