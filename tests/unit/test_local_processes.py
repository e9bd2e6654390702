"""The local process harness (`mesh.local_processes`) with tiny Python children: no sockets."""

from __future__ import annotations

import signal
import sys
import textwrap
import time

import pytest

from mesh.local_processes import (
    COORDINATOR_READY,
    NODE_READY,
    LocalCoordinator,
    LocalNode,
    LocalProcess,
    ProcessStartError,
    stop_all,
)

pytestmark = pytest.mark.unit

NODE_LINE = "node kitchen pi (0123456789ab) serving smollm2, router on 127.0.0.1:50123"


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def node_child(before: str = "", after: str = "") -> list[str]:
    """Prints some noise and NODE_LINE; exits 0 on SIGTERM after saying so on stderr."""
    return python(
        f"""
        import signal, sys, time
        def bye(*_):
            print("draining", file=sys.stderr, flush=True)
            sys.exit(0)
        signal.signal(signal.SIGTERM, bye)
        print("loading", file=sys.stderr, flush=True)
        print("warming up", flush=True)
        {before}
        print({NODE_LINE!r}, flush=True)
        {after}
        time.sleep(60)
        """
    )


def test_the_serving_line_gives_the_address_and_leaving_the_block_stops_it_gracefully(tmp_path):
    with LocalNode.start(node_child(), name="a", log=tmp_path / "a.log", timeout_s=30) as node:
        assert (node.address, node.node_id, node.node_name) == (
            "127.0.0.1:50123",
            "0123456789ab",
            "kitchen pi",
        )
        assert node.earlier_lines == ["warming up"]
        assert node.alive() and node.ready_at >= node.started_at
    assert node.process.returncode == 0
    assert node.log_text() == "loading\ndraining\n"


def test_a_child_that_exits_first_is_reported_at_once_with_its_log(tmp_path):
    began = time.monotonic()
    with pytest.raises(ProcessStartError) as raised:
        LocalNode.start(
            python("import sys; print('no model', file=sys.stderr); sys.exit(3)"),
            name="broken",
            log=tmp_path / "broken.log",
            timeout_s=30,
        )
    assert time.monotonic() - began < 20  # not the whole timeout
    message = str(raised.value)
    assert "broken exited with code 3" in message and "no model" in message
    assert raised.value.fields["exit_code"] == 3


def test_a_child_that_never_gets_ready_is_stopped_after_the_timeout(tmp_path):
    child = LocalNode(
        python("import time; print('still loading', flush=True); time.sleep(60)"),
        name="slow",
        log=tmp_path / "slow.log",
    )
    with pytest.raises(ProcessStartError, match=r"(?s)no ready line within 0.5 s.*still loading"):
        child.wait_ready(timeout_s=0.5)
    assert not child.alive()


def test_stop_kills_a_child_that_ignores_sigterm(tmp_path):
    child = LocalNode.start(
        node_child(before="signal.signal(signal.SIGTERM, signal.SIG_IGN)"),
        name="stubborn",
        log=tmp_path / "stubborn.log",
        timeout_s=30,
    )
    assert child.stop(timeout_s=0.3) == -signal.SIGKILL


def test_kill_hard_is_kill_9(tmp_path):
    child = LocalNode.start(node_child(), name="victim", log=tmp_path / "v.log", timeout_s=30)
    assert child.kill_hard() == -signal.SIGKILL
    assert "draining" not in child.log_text()


def test_stop_all_sends_sigterm_once_so_a_node_can_drain(tmp_path):
    """A node ends at once on a second SIGTERM (nodes/daemon.py): stop_all must not send one."""
    drain_once = """
        def drain(*_):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            time.sleep(0.3)
            sys.exit(0)
        signal.signal(signal.SIGTERM, drain)
        """
    children = [
        LocalNode(node_child(after=drain_once), name=f"n{i}", log=tmp_path / f"n{i}.log")
        for i in range(2)
    ]
    for child in children:
        child.wait_ready(timeout_s=30)
    stop_all(children, timeout_s=30)
    assert [child.process.returncode for child in children] == [0, 0]


def test_without_a_ready_line_stdout_goes_to_the_log(tmp_path):
    child = LocalProcess(python("print('hello')"), name="plain", log=tmp_path / "plain.log")
    assert child.process.wait(timeout=30) == 0
    assert child.stop() == 0 and child.log_text() == "hello\n"
    with pytest.raises(ValueError):
        child.wait_ready(timeout_s=1)


def test_the_ready_lines_as_the_daemons_print_them():
    node = NODE_READY.search("node n1 (ab12cd34ef56) serving fake on 198.18.0.2:40001")
    assert node is not None and node["address"] == "198.18.0.2:40001"
    line = (
        "coordinator ready: grpc 0.0.0.0:9000 (Ray Serve, all interfaces) fast path "
        "127.0.0.1:1, 127.0.0.1:2 http http://127.0.0.1:8000/v1 (OpenAI API)"
    )
    assert COORDINATOR_READY.search(line) is not None
    assert NODE_READY.search(line) is None


def test_a_coordinators_addresses_with_two_fast_paths(tmp_path):
    line = (
        "coordinator ready: grpc 0.0.0.0:9000 (Ray Serve, all interfaces) fast path "
        "127.0.0.1:1, 127.0.0.1:2 http http://127.0.0.1:8000/v1 (OpenAI API)"
    )
    with LocalCoordinator.start(
        python(f"import time; print({line!r}, flush=True); time.sleep(60)"),
        name="coordinator",
        log=tmp_path / "c.log",
        timeout_s=30,
    ) as coordinator:
        assert coordinator.fast_paths == ["127.0.0.1:1", "127.0.0.1:2"]
        assert coordinator.addresses == {
            "grpc": "0.0.0.0:9000",
            "fast": "127.0.0.1:1",
            "http": "http://127.0.0.1:8000/v1",
        }
