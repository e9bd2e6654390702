"""The netns backend's process faults act before they return, on a real child process: a
`status` right after `kill`, `pause` or `heal` shows the signal's effect (CI once read
"running" right after a SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from mesh.sim import netns
from mesh.sim.backend import SimError
from mesh.sim.netns import NetnsBackend, NodeEntry, Proc, process_state


@pytest.fixture
def child():
    process = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True
    )
    proc = Proc(pid=process.pid, pgid=process.pid, start_ticks=netns._start_ticks(process.pid))
    node = NodeEntry(
        name="alpha", site="shop", namespace="-", veth="-", ip="-", port=0, state_dir="-", proc=proc
    )
    yield node, process
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


def _apply(node: NodeEntry, action: str) -> str:
    return NetnsBackend(firewall=object())._apply(None, node, action, None)  # type: ignore[arg-type]


def test_kill_returns_once_the_process_is_gone(child):
    node, process = child
    assert process_state(node.proc) == "running"
    assert "SIGKILL" in _apply(node, "kill")
    # Not reaped yet (a zombie of this test): still reported as exited, at once.
    assert process_state(node.proc) == "exited"
    assert process.wait(timeout=10) == -signal.SIGKILL


def test_pause_and_heal_show_at_once(child):
    node, _process = child
    assert "SIGSTOP" in _apply(node, "pause")
    assert process_state(node.proc) == "paused"
    assert "pause" in _apply(node, "heal")
    assert process_state(node.proc) == "running"


def test_a_kill_that_does_not_act_is_an_error_not_a_claim(child, monkeypatch):
    node, _process = child
    monkeypatch.setattr(netns, "SIGNAL_WAIT_S", 0.2)
    monkeypatch.setattr(netns, "process_state", lambda proc: "running")
    with pytest.raises(SimError, match=r"still runs 0.2 s after SIGKILL"):
        _apply(node, "kill")
