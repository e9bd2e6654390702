"""Real processes for the coordinator's integration and e2e tests: nodes and the coordinator CLI.

Each process writes its stderr to a file (so a full pipe never blocks it) and announces itself
with one line on stdout, which is awaited with a timeout.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass


@dataclass
class MeshProcess:
    name: str
    process: subprocess.Popen[str]
    line: str  # the ready line
    log: pathlib.Path
    args: tuple[str, ...] = ()  # `python ARGS`, for a restart
    env: dict[str, str] | None = None

    @property
    def address(self) -> str:
        return self.line.rsplit(" ", 1)[1]

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill_hard(self) -> None:
        """`kill -9`: no goodbye, no drain."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait(timeout=10)


@contextlib.contextmanager
def restarted(node: MeshProcess, *, timeout_s: float = 120.0) -> Iterator[MeshProcess]:
    """`node` started again with the same arguments (so the same state directory: its node id
    and its task-count journal), until the block ends. A node on port 0 gets a new port."""
    assert node.args, f"{node.name} was not started with restartable arguments"
    assert not node.alive(), f"{node.name} is still running"
    name = f"{node.name}-restarted"
    process, log = spawn(name, node.args, node.log.parent, node.env)
    again = MeshProcess(name, process, "", log, node.args, node.env)
    try:
        again.line = _read_line(process, timeout_s, log, " serving ")
        yield again
    finally:
        again.stop(timeout_s=15)


def _read_line(
    process: subprocess.Popen[str], timeout_s: float, log: pathlib.Path, expect: str
) -> str:
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    give_up = time.monotonic() + timeout_s
    try:
        while time.monotonic() < give_up:
            if selector.select(timeout=0.2):
                line = process.stdout.readline()
                if expect in line:
                    return line.strip()
                if not line and process.poll() is not None:
                    break
    finally:
        selector.close()
    process.kill()
    process.wait(timeout=10)
    raise AssertionError(
        f"no {expect!r} line within {timeout_s} s; log:\n{log.read_text()[-3000:]}"
    )


def spawn(
    name: str, args: Sequence[str], directory: pathlib.Path, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], pathlib.Path]:
    """`python ARGS` with stderr to DIRECTORY/NAME.log; `env` adds to the environment."""
    log = directory / f"{name}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log, "w") as handle:
        process = subprocess.Popen(
            [sys.executable, *args], stdout=subprocess.PIPE, stderr=handle, text=True, env=env
        )
    return process, log


def node_args(
    name: str,
    state_dir: pathlib.Path,
    *,
    fake: bool = False,
    max_concurrent: int = 1,
    max_queued: int = 8,
    delay_ms: float = 0.0,
    model: str = "smollm2",
    reply: str = "",
    config: pathlib.Path | None = None,
) -> list[str]:
    if fake:  # a real NodeDaemon with an instant (or `delay_ms` per word) fake model
        return [
            "-m",
            "bench.fake_node",
            "--name",
            name,
            "--max-concurrent",
            str(max_concurrent),
            "--max-queued",
            str(max_queued),
            "--delay-ms",
            str(delay_ms),
            "--model",
            model,
            *(["--reply", reply] if reply else []),
        ]
    return [
        "-m",
        "mesh.cli",
        "node",
        "start",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--no-advertise",
        "--state-dir",
        str(state_dir / name),
        "--name",
        name,
        "--n-threads",
        "1",
        "--max-concurrent",
        str(max_concurrent),
        "--max-queued",
        str(max_queued),
        *(["--config", str(config)] if config else []),
    ]


@contextlib.contextmanager
def running_nodes(
    directory: pathlib.Path,
    names: Sequence[str],
    *,
    timeout_s: float = 120.0,
    env: dict[str, str] | None = None,
    **options: object,
) -> Iterator[list[MeshProcess]]:
    """Start nodes at once (real bundled model unless fake=True); stop them all afterwards.
    `env` adds to their environment."""
    started: list[tuple[str, subprocess.Popen[str], pathlib.Path]] = []
    arguments: list[list[str]] = []
    nodes: list[MeshProcess] = []
    try:
        for name in names:
            args = node_args(name, directory, **options)  # type: ignore[arg-type]
            process, log = spawn(name, args, directory, env)
            started.append((name, process, log))
            arguments.append(args)
        for (name, process, log), args in zip(started, arguments, strict=True):
            line = _read_line(process, timeout_s, log, " serving ")
            nodes.append(MeshProcess(name, process, line, log, tuple(args), env))
        yield nodes
    finally:
        for _name, process, _log in started:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for _name, process, _log in started:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def start_coordinator_cli(
    directory: pathlib.Path, nodes: Sequence[str], *extra: str, timeout_s: float = 180.0
) -> MeshProcess:
    """`mesh coordinator start` with static nodes, no mDNS, free ports; waits for its ready line."""
    args = [
        "-m",
        "mesh.cli",
        "coordinator",
        "start",
        "--no-mdns",
        "--grpc-port",
        "0",
        "--http-port",
        "0",
        "--num-cpus",
        "2",
        *extra,
    ]
    for address in nodes:
        args += ["--node", address]
    process, log = spawn("coordinator", args, directory)
    line = _read_line(process, timeout_s, log, "coordinator ready")
    return MeshProcess("coordinator", process, line, log)


def ready_line_addresses(line: str) -> dict[str, str]:
    """{"grpc": ..., "fast": ..., "http": ...} from the coordinator's ready line."""
    words = line.split()
    return {
        "grpc": words[words.index("grpc") + 1],
        "fast": words[words.index("path") + 1],
        "http": words[words.index("http") + 1],
    }
