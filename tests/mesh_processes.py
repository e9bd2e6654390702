"""Real nodes and the coordinator CLI for the integration and e2e tests.

Thin helpers over `mesh.local_processes`: each process logs its stderr to DIRECTORY/NAME.log
and is ready once it prints its one line on stdout, awaited with a timeout.
"""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import Iterator, Mapping, Sequence

from mesh.local_processes import (
    LocalCoordinator,
    LocalNode,
    coordinator_command,
    local_node_command,
    python_command,
    stop_all,
)

STOP_TIMEOUT_S = 30.0


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
    busy_marker: str = "",
    config: pathlib.Path | None = None,
) -> list[str]:
    """The command line of a node (`mesh node start`, one thread, on 127.0.0.1 port 0)."""
    limits = ["--max-concurrent", str(max_concurrent), "--max-queued", str(max_queued)]
    if fake:  # a real NodeDaemon with an instant (or `delay_ms` per word) fake model
        return [
            *python_command("-m", "bench.fake_node"),
            "--name",
            name,
            *limits,
            "--delay-ms",
            str(delay_ms),
            "--model",
            model,
            *(["--reply", reply] if reply else []),
            *(["--busy-marker", busy_marker] if busy_marker else []),
        ]
    return local_node_command(
        state_dir / name,
        name=name,
        n_threads=1,
        extra=[*limits, *(["--config", str(config)] if config else [])],
    )


@contextlib.contextmanager
def started_together(
    commands: Mapping[str, Sequence[str]],
    directory: pathlib.Path,
    *,
    timeout_s: float = 120.0,
    env: dict[str, str] | None = None,
) -> Iterator[dict[str, LocalNode]]:
    """Start every node at once, wait for each serving line; stop them all afterwards.
    `env` adds to their environment."""
    nodes: dict[str, LocalNode] = {}
    try:
        for name, command in commands.items():
            nodes[name] = LocalNode(command, name=name, log=directory / f"{name}.log", env=env)
        for node in nodes.values():
            node.wait_ready(timeout_s)
        yield nodes
    finally:
        stop_all(nodes.values(), timeout_s=STOP_TIMEOUT_S)


@contextlib.contextmanager
def running_nodes(
    directory: pathlib.Path,
    names: Sequence[str],
    *,
    timeout_s: float = 120.0,
    env: dict[str, str] | None = None,
    **options: object,
) -> Iterator[list[LocalNode]]:
    """Start nodes at once (real bundled model unless fake=True); stop them all afterwards.
    `env` adds to their environment."""
    commands = {name: node_args(name, directory, **options) for name in names}  # type: ignore[arg-type]
    with started_together(commands, directory, timeout_s=timeout_s, env=env) as nodes:
        yield list(nodes.values())


def start_coordinator_cli(
    directory: pathlib.Path, nodes: Sequence[str], *extra: str, timeout_s: float = 180.0
) -> LocalCoordinator:
    """`mesh coordinator start` with static nodes, no mDNS, free ports; waits for its ready line."""
    return LocalCoordinator.start(
        coordinator_command(nodes, *extra),
        name="coordinator",
        log=directory / "coordinator.log",
        timeout_s=timeout_s,
    )


@contextlib.contextmanager
def restarted(node: LocalNode, *, timeout_s: float = 120.0) -> Iterator[LocalNode]:
    """`node` started again with the same command (so the same state directory: its node id
    and its task-count journal), until the block ends. A node on port 0 gets a new port."""
    assert not node.alive(), f"{node.name} is still running"
    name = f"{node.name}-restarted"
    log = node.log.parent / f"{name}.log" if node.log is not None else None
    again = LocalNode(node.argv, name=name, log=log, env=node.env)
    try:
        again.wait_ready(timeout_s)
        yield again
    finally:
        again.stop(timeout_s=15)
