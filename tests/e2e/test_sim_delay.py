"""`delay MS` and `loss PCT` for real (mesh/sim/shaping.py): two hosts of a namespace lab, a TCP
echo server in one, round trips measured from the other before, during and after. On a kernel
without netem (this project's VM and CI) the delay is the NFQUEUE delayer (mesh/sim/nfqueue.py)
holding every packet the server's namespace sends; with netem, netem. Either way the packets
are really held: an ESTABLISHED connection slows down as much as a new one, and a burst of
messages is not serialised behind the delay."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from mesh.sim import nfqueue, shaping
from mesh.sim.lab import LineReader, NetnsHost, ip_command

pytestmark = [pytest.mark.e2e]

REPO = pathlib.Path(__file__).resolve().parents[2]

ECHO_SERVER = """
import socket, threading
listener = socket.socket()
listener.bind(("0.0.0.0", 0))
listener.listen(64)
print(listener.getsockname()[1], flush=True)
def echo(conn):
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=echo, args=(conn,), daemon=True).start()
"""

# Reads one command a line, answers one JSON line. `held` is connected before any fault.
ECHO_CLIENT = """
import json, socket, sys, time
address = (sys.argv[1], int(sys.argv[2]))
def connect(timeout):
    sock = socket.create_connection(address, timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock
def round_trip(sock):
    start = time.monotonic()
    sock.sendall(b"x")
    assert sock.recv(1) == b"x"
    return (time.monotonic() - start) * 1000
held = connect(10)
print(json.dumps({"ready": True}), flush=True)
sent_at = 0.0
for line in sys.stdin:
    word, *args = line.split()
    if word == "rtt":
        answer = {"ms": [round_trip(held) for _ in range(int(args[0]))]}
    elif word == "fresh":
        start = time.monotonic()
        try:
            sock = connect(float(args[0]))
        except OSError as error:
            answer = {"error": type(error).__name__}
        else:
            with sock:
                connect_ms = (time.monotonic() - start) * 1000
                answer = {"connect_ms": connect_ms, "rtt_ms": round_trip(sock)}
    elif word == "burst":
        count = int(args[0])
        start = time.monotonic()
        for _ in range(count):
            held.sendall(b"y" * 64)
        got = 0
        while got < 64 * count:
            got += len(held.recv(65536))
        answer = {"ms": (time.monotonic() - start) * 1000}
    elif word == "send":
        sent_at = time.monotonic()
        held.sendall(b"z")
        answer = {"sent": True}
    elif word == "receive":
        assert held.recv(1) == b"z"
        answer = {"after_send_ms": (time.monotonic() - sent_at) * 1000}
    print(json.dumps(answer), flush=True)
"""


class EchoClient:
    """The client process in its namespace, driven one command at a time."""

    def __init__(self, host: NetnsHost, address: str, port: int) -> None:
        self.process = host.popen(
            [sys.executable, "-c", ECHO_CLIENT, address, str(port)], stdin=subprocess.PIPE
        )
        assert self.process.stdout is not None
        self.reader = LineReader(self.process.stdout, name="echo-client")
        self.read(timeout_s=15)

    def read(self, *, timeout_s: float) -> dict[str, object]:
        _at, line = self.reader.wait_for(lambda text: text.startswith("{"), timeout_s=timeout_s)
        return dict(json.loads(line))

    def ask(self, command: str, *, timeout_s: float = 30) -> dict[str, object]:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.read(timeout_s=timeout_s)

    def median_rtt(self, count: int = 7) -> float:
        samples = sorted(float(ms) for ms in self.ask(f"rtt {count}")["ms"])  # type: ignore[attr-defined]
        return samples[len(samples) // 2]


def _start_echo(netns_lab_factory):
    lab = netns_lab_factory(2)
    server, client_host = lab.hosts
    echo = server.popen([sys.executable, "-c", ECHO_SERVER])
    assert echo.stdout is not None
    port = int(LineReader(echo.stdout, name="echo-server").wait_for(str.isdigit, timeout_s=15)[1])
    client = EchoClient(client_host, server.ip, port)
    enter = ["ip", "netns", "exec", server.name]
    return lab, server, echo, client, enter


def _assert_nothing_left(server: NetnsHost, echo: subprocess.Popen, state: dict, tag: str):
    """No rule with our tag, no NFQUEUE rule at all, no qdisc, no delayer, no other process."""
    enter = ["ip", "netns", "exec", server.name]
    assert shaping.tagged_rules(enter, tag) == []
    listed = shaping.run_command([*enter, "iptables", "-w", "-S", "OUTPUT"]).stdout
    assert "NFQUEUE" not in listed and "statistic" not in listed, listed
    assert "netem" not in shaping.run_command([*enter, "tc", "qdisc", "show"]).stdout
    pid = int(state.get("delayer_pid") or 0)
    if pid:
        assert not nfqueue.is_delayer(pid), f"delayer {pid} still running"
    pids = ip_command("netns", "pids", server.name).stdout.split()
    assert pids == [str(echo.pid)], f"processes left in {server.name}: {pids}"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("entered_by", ["ip-netns-exec", "nsenter"])
def test_delay_holds_every_packet_the_namespace_sends_and_clear_undoes_it(
    netns_lab_factory, tmp_path, entered_by
):
    """Entered as the netns backend enters a node (`ip netns exec NAME`) and as the Docker
    backend enters a container (`nsenter -t PID -n`, the pid of a process inside)."""
    lab, server, echo, client, enter = _start_echo(netns_lab_factory)
    if entered_by == "nsenter":
        enter = ["nsenter", "-t", str(echo.pid), "-n"]
    tag = shaping.shaping_tag(lab.prefix, "server")
    state: dict = {}
    try:
        before = client.median_rtt()
        fresh_before = client.ask("fresh 5")
        state = shaping.apply(
            enter, delay_ms=200, loss_pct=None, tag=tag, log=str(tmp_path / "delayer.log")
        )
        print(f"\ndelay 200 ms applied {shaping.describe(state)}")
        held = client.median_rtt()  # the connection opened before the delay
        fresh = client.ask("fresh 5")  # SYN-ACK and echo both held
        burst = float(client.ask("burst 50")["ms"])  # type: ignore[arg-type]
        removed = shaping.clear(enter, state)
        after = client.median_rtt()
        fresh_after = client.ask("fresh 5")
        figures = {
            "entered_by": entered_by,
            "method": state["method"],
            "rtt_before_ms": round(before, 2),
            "rtt_delay_200_ms": round(held, 2),
            "fresh_connect_ms": round(float(fresh["connect_ms"]), 2),  # type: ignore[arg-type]
            "fresh_rtt_ms": round(float(fresh["rtt_ms"]), 2),  # type: ignore[arg-type]
            "burst_50_ms": round(burst, 2),
            "rtt_after_ms": round(after, 2),
            "fresh_before": fresh_before,
            "fresh_after": fresh_after,
            "removed": removed,
        }
        print(json.dumps(figures, indent=1))
        assert before < 50
        assert 200 <= held < 400, figures  # an ESTABLISHED connection is held too
        assert 200 <= float(fresh["connect_ms"]) < 400, figures  # type: ignore[arg-type]
        assert 200 <= float(fresh["rtt_ms"]) < 400, figures  # type: ignore[arg-type]
        assert burst < 2000, figures  # 50 messages serialised behind 200 ms would be 10 s
        assert after < 50, figures
        assert float(fresh_after["rtt_ms"]) < 50, figures  # type: ignore[arg-type]
        _assert_nothing_left(server, echo, state, tag)
    finally:
        shaping.clear(enter, state)
    if state.get("method") == "iptables":
        log = (tmp_path / "delayer.log").read_text()
        assert "ended after" in log, log  # it stopped on SIGTERM, cleanly


@pytest.mark.timeout(180)
def test_loss_100_times_out_connections_and_clear_lets_them_through(netns_lab_factory):
    lab, server, echo, client, enter = _start_echo(netns_lab_factory)
    tag = shaping.shaping_tag(lab.prefix, "server")
    state: dict = {}
    try:
        state = shaping.apply(enter, delay_ms=None, loss_pct=100, tag=tag)
        lost = client.ask("fresh 2", timeout_s=30)
        print(f"\nloss 100% {shaping.describe(state)}: {lost}")
        assert lost == {"error": "TimeoutError"}
        state = shaping.apply(enter, delay_ms=50, loss_pct=100, tag=tag, previous=state)
        assert client.ask("fresh 2", timeout_s=30) == {"error": "TimeoutError"}
        shaping.clear(enter, state)
        back = client.ask("fresh 5")
        print(f"cleared: {back}")
        assert float(back["rtt_ms"]) < 50  # type: ignore[arg-type]
        _assert_nothing_left(server, echo, state, tag)
    finally:
        shaping.clear(enter, state)


@pytest.mark.timeout(120)
def test_stopping_the_delayer_lets_what_it_holds_go_at_once(netns_lab_factory):
    """A packet held for 5 s is let out when the delay is cleared after 0.5 s: the delayer
    accepts what it holds on SIGTERM (unbinding would make the kernel drop it, and TCP would
    only resend it a retransmission timeout later)."""
    lab, server, echo, client, enter = _start_echo(netns_lab_factory)
    tag = shaping.shaping_tag(lab.prefix, "server")
    state: dict = {}
    try:
        state = shaping.apply(enter, delay_ms=5000, loss_pct=None, tag=tag)
        if state["method"] != "iptables":
            pytest.skip("this kernel has netem: no delayer to stop")
        client.ask("send")
        time.sleep(0.5)
        shaping.clear(enter, state)
        cleared_at_ms = 500.0
        answer = client.ask("receive", timeout_s=10)
        print(f"\nheld 5 s, cleared after 0.5 s: echo after {answer['after_send_ms']:.0f} ms")
        assert float(answer["after_send_ms"]) < cleared_at_ms + 400, answer  # type: ignore[arg-type]
        _assert_nothing_left(server, echo, state, tag)
    finally:
        shaping.clear(enter, state)


@pytest.mark.timeout(60)
def test_the_delayer_runs_with_the_system_python_as_a_module_and_by_path(netns_lab_factory):
    """What the backends rely on: /usr/bin/python3 (no venv) runs it inside a namespace, as
    `-m mesh.sim.nfqueue` with PYTHONPATH and as `-I FILE`; SIGTERM ends it with status 0."""
    python = "/usr/bin/python3"
    if not os.access(python, os.X_OK):
        pytest.skip("no /usr/bin/python3 here")
    host = netns_lab_factory(1).hosts[0]
    for argv, env in [
        ([python, "-m", "mesh.sim.nfqueue"], {**os.environ, "PYTHONPATH": str(REPO)}),
        ([python, "-I", str(shaping.DELAYER)], None),
    ]:
        process = host.popen([*argv, "--queue", "99", "--delay-ms", "10"], env=env, cwd="/")
        assert process.stderr is not None
        reader = LineReader(process.stderr, name="delayer")
        reader.wait_for(lambda line: "holds queue 99" in line, timeout_s=15)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        reader.wait_for(lambda line: "ended after" in line, timeout_s=5)
        # The queue is free again: a second delayer binds it.
        background = ["--queue", "99", "--delay-ms", "10", "--background"]
        again = host.run([python, "-I", str(shaping.DELAYER), *background])
        assert again.returncode == 0 and again.stdout.strip().isdigit(), again.stderr
        stopped = subprocess.run(
            [python, "-I", str(shaping.DELAYER), "--stop", again.stdout.strip()],
            capture_output=True,
            text=True,
            timeout=15,
        )
        assert stopped.stdout.strip().endswith("stopped"), stopped
