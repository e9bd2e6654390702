"""A node or a coordinator as a child process on this machine, started the way a user would.

`mesh demo`, the integration and e2e tests and the benchmarks start `mesh node start` and
`mesh coordinator start` (or a fake node) as child processes and wait for the one line each
prints on stdout once it serves:

    with LocalNode.start(local_node_command(state_dir, name="a"), name="a", log=log) as node:
        ... node.address ...
    # stopped: SIGTERM, then SIGKILL after `stop_timeout_s`

Every wait has a timeout. stderr goes to a log file (or, with `log=None`, to ours), never to a
pipe that nobody reads; a process that does not get ready is stopped, and the error carries
the tail of its log. Imports neither Ray nor zeroconf, so that `mesh demo --node-only` and the
client library's users can run it.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import IO, Any, Self

from mesh.core.errors import ProcessStartError

__all__ = [
    "COORDINATOR_READY",
    "NODE_READY",
    "LocalCoordinator",
    "LocalNode",
    "LocalProcess",
    "ProcessStartError",
    "coordinator_command",
    "local_node_command",
    "mesh_command",
    "python_command",
    "stop_all",
]

# `nodes/daemon.py` run_daemon (and bench/fake_node.py): node NAME (ID) serving MODELS on ADDRESS
NODE_READY = re.compile(
    r"^node (?P<name>.+) \((?P<node_id>\w+)\) serving (?P<models>.*) on (?P<address>\S+)$"
)
# `mesh/cli/coordinator.py`: coordinator ready: grpc ADDR (...) fast path A[, B...] http URL (...)
COORDINATOR_READY = re.compile(
    r"^coordinator ready: grpc (?P<grpc>\S+) .*fast path (?P<fast>.+?) http (?P<http>\S+)"
)
KILL_WAIT_S = 10.0  # after SIGKILL: only a process stuck in the kernel takes longer
LOG_TAIL_CHARS = 3000

Popen = Callable[..., "subprocess.Popen[Any]"]


def python_command(*args: str) -> list[str]:
    """`python ARGS` with this interpreter."""
    return [sys.executable, *args]


def mesh_command(*args: str) -> list[str]:
    """`python -m mesh.cli ARGS` with this interpreter."""
    return python_command("-m", "mesh.cli", *args)


def local_node_command(
    state_dir: str | os.PathLike[str],
    *,
    name: str | None = None,
    n_threads: int | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """`mesh node start` on 127.0.0.1, a free port, not announced on mDNS."""
    args = ["--host", "127.0.0.1", "--port", "0", "--no-advertise", "--state-dir", str(state_dir)]
    if name is not None:
        args += ["--name", name]
    if n_threads is not None:
        args += ["--n-threads", str(n_threads)]
    return mesh_command("node", "start", *args, *extra)


def coordinator_command(nodes: Sequence[str], *extra: str, num_cpus: int = 2) -> list[str]:
    """`mesh coordinator start` with static `nodes`, no mDNS, free ports."""
    args = ["--no-mdns", "--grpc-port", "0", "--http-port", "0", "--num-cpus", str(num_cpus)]
    for address in nodes:
        args += ["--node", address]
    if "--cluster-dir" not in extra:  # never the default cluster dir a user may have made
        args.append("--no-cluster")
    return mesh_command("coordinator", "start", *args, *extra)


class LocalProcess:
    """A child process that prints one ready line on stdout once it serves.

    The constructor starts it; `wait_ready` waits for the line (`start` does both). With
    `ready=None` nothing is awaited and stdout goes to the log too (a server whose readiness the
    caller checks itself). `env` adds to our environment; `popen` replaces `subprocess.Popen`
    (e.g. to start it inside a network namespace).
    """

    ready: re.Pattern[str] | None = None

    def __init__(
        self,
        argv: Sequence[str],
        *,
        name: str,
        log: pathlib.Path | None = None,
        ready: re.Pattern[str] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        stop_timeout_s: float = 30.0,
        popen: Popen = subprocess.Popen,
    ) -> None:
        if ready is not None:
            self.ready = ready
        self.name = name
        self.log = log
        self.argv = list(argv)  # what it runs, for a restart
        self.env = dict(env or {})
        self.stop_timeout_s = stop_timeout_s
        self.match: re.Match[str] | None = None
        self.ready_at = 0.0  # time.monotonic() when the ready line was read
        self.earlier_lines: list[str] = []  # what it printed on stdout before the ready line
        self._pending = b""
        self._terminated = False
        self.started_at = time.monotonic()
        self.process = self._popen(popen, argv, env, cwd)

    def _popen(
        self,
        popen: Popen,
        argv: Sequence[str],
        env: Mapping[str, str] | None,
        cwd: str | os.PathLike[str] | None,
    ) -> subprocess.Popen[Any]:
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        handle: IO[str] | None = None
        try:
            if self.log is not None:
                handle = open(self.log, "w")  # noqa: SIM115 - the child keeps its own copy
            stdout: int | IO[str] | None = subprocess.PIPE
            if self.ready is None:
                stdout = handle if handle is not None else subprocess.DEVNULL
            return popen(list(argv), stdout=stdout, stderr=handle, env=environment, cwd=cwd)
        finally:
            if handle is not None:
                handle.close()

    @classmethod
    def start(cls, argv: Sequence[str], *, timeout_s: float, **options: Any) -> Self:
        """Start and wait up to `timeout_s` for the ready line; ProcessStartError if none."""
        started = cls(argv, **options)
        started.wait_ready(timeout_s)
        return started

    @property
    def ready_line(self) -> str:
        return self._ready_match().string

    def _ready_match(self) -> re.Match[str]:
        if self.match is None:
            raise ProcessStartError(f"{self.name} has not printed its ready line", name=self.name)
        return self.match

    def wait_ready(self, timeout_s: float) -> re.Match[str]:
        """The ready line's match, read within `timeout_s`; else stops it and raises
        ProcessStartError (exit code and the log's tail in the message)."""
        if self.match is not None:
            return self.match
        if self.ready is None or self.process.stdout is None:
            raise ValueError(f"{self.name} was started without a ready line to wait for")
        deadline = time.monotonic() + timeout_s
        fd = self.process.stdout.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while (left := deadline - time.monotonic()) > 0:
                if not selector.select(timeout=left):
                    break
                chunk = os.read(fd, 65536)
                if not chunk:  # stdout closed: it exited (or is exiting)
                    self._wait_quietly(min(max(left, 0.0), 5.0))
                    break
                match = self._take_lines(chunk)
                if match is not None:
                    return match
        raise self._not_ready(timeout_s)

    def _take_lines(self, chunk: bytes) -> re.Match[str] | None:
        """Add `chunk`; the match once a whole line matches the ready pattern."""
        assert self.ready is not None
        self._pending += chunk
        while b"\n" in self._pending:
            raw, _, self._pending = self._pending.partition(b"\n")
            line = raw.decode(errors="replace").strip()
            match = self.ready.search(line)
            if match:
                self.ready_at = time.monotonic()
                self.match = match
                return match
            self.earlier_lines = [*self.earlier_lines[-19:], line]
        return None

    def _not_ready(self, timeout_s: float) -> ProcessStartError:
        code = self.process.poll()
        if code is None:
            self.stop(timeout_s=KILL_WAIT_S)
            how = f"printed no ready line within {timeout_s:g} s"
        else:
            self._close_stdout()
            how = f"exited with code {code} before its ready line"
        parts = [f"{self.name} {how}"]
        if self.earlier_lines:
            parts.append("its stdout:\n" + "\n".join(self.earlier_lines))
        if self.log is None:
            parts.append("its stderr is above")
        else:
            parts.append(f"the end of {self.log}:\n{self.log_tail()}")
        return ProcessStartError("\n".join(parts), name=self.name, exit_code=code)

    def log_text(self) -> str:
        """Everything it has written to its log so far ('' without a log)."""
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        return self.log_text()[-chars:]

    def alive(self) -> bool:
        return self.process.poll() is None

    def terminate(self) -> None:
        """Send SIGTERM once (a second one would end a node at once, without draining)."""
        if not self._terminated and self.process.poll() is None:
            self._terminated = True
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float | None = None) -> int:
        """SIGTERM, then SIGKILL if it is still running after `timeout_s`; its exit code."""
        self.terminate()
        try:
            code = self.process.wait(
                timeout=self.stop_timeout_s if timeout_s is None else timeout_s
            )
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(timeout=KILL_WAIT_S)
        self._close_stdout()
        return code

    def kill_hard(self) -> int:
        """`kill -9`: no goodbye, no drain. Its exit code (-9)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        code = self.process.wait(timeout=KILL_WAIT_S)
        self._close_stdout()
        return code

    def _wait_quietly(self, timeout_s: float) -> None:
        # Still running with stdout closed: _not_ready stops it.
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=timeout_s)

    def _close_stdout(self) -> None:
        if self.process.stdout is not None and self.process.poll() is not None:
            self.process.stdout.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.alive() else f"exited {self.process.returncode}"
        return f"<{type(self).__name__} {self.name} pid {self.process.pid} {state}>"


class LocalNode(LocalProcess):
    """`mesh node start` (or bench/fake_node.py): ready when it prints its serving line."""

    ready = NODE_READY

    @property
    def address(self) -> str:
        return self._group("address")

    @property
    def node_id(self) -> str:
        return self._group("node_id")

    @property
    def node_name(self) -> str:
        return self._group("name")

    def _group(self, group: str) -> str:
        return self._ready_match()[group]


class LocalCoordinator(LocalProcess):
    """`mesh coordinator start`: ready when it prints `coordinator ready: ...`."""

    ready = COORDINATOR_READY

    @property
    def addresses(self) -> dict[str, str]:
        """{"grpc": ..., "fast": (the first fast path, or "off"), "http": (OpenAI base URL)}."""
        match = self._ready_match()
        return {
            "grpc": match["grpc"],
            "fast": self.fast_paths[0] if self.fast_paths else "off",
            "http": match["http"],
        }

    @property
    def fast_paths(self) -> list[str]:
        """One address per dispatcher replica; [] when the fast path is off."""
        listed = self._ready_match()["fast"]
        return [] if listed == "off" else [path.strip() for path in listed.split(",")]


def stop_all(processes: Iterable[LocalProcess], timeout_s: float = 30.0) -> None:
    """SIGTERM to all at once, then wait for each (SIGKILL at `timeout_s` from now)."""
    started = list(processes)
    for process in started:
        process.terminate()
    deadline = time.monotonic() + timeout_s
    for process in started:
        process.stop(timeout_s=max(0.0, deadline - time.monotonic()))
