"""What every simulation backend offers (`mesh sim ... --backend docker|netns`).

A backend brings one topology up as a mesh on this machine — a coordinator and one node per
topology node, each with its own network address, found by real mDNS — and throws faults at it.
`mesh sim` (mesh/cli/sim.py) and the scenario runner (mesh/sim/runner.py) see only this
interface, so a scenario and its report are the same whichever backend ran them.

    backend = backend_for("docker")
    status = backend.up(topology_path, progress=print, timeout_s=600)   # waits: every node ready
    backend.fault(topology_path, "edge-b", "kill")
    backend.down(topology_path, progress=print)

Addresses in a `SimStatus` are reachable from where `mesh sim` runs (the host): published ports
on 127.0.0.1 for Docker, the lab bridge's subnet for netns.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from mesh.core.errors import MeshError

Progress = Callable[[str], None]

# What `fault` takes. Targets are a node's name, or `site:NAME` (every node with that site label;
# partition/heal/delay/loss only). `heal` undoes partition, delay, loss and pause; `restart`
# starts a killed or stopped node again (same state: same id, same task-count journal).
FaultAction = Literal["kill", "stop", "pause", "restart", "partition", "heal", "delay", "loss"]
FAULT_ACTIONS: tuple[FaultAction, ...] = (
    "kill",
    "stop",
    "pause",
    "restart",
    "partition",
    "heal",
    "delay",
    "loss",
)
VALUE_ACTIONS = {"delay": "MS", "loss": "PCT"}  # actions that take a value, and its unit
SITE_PREFIX = "site:"
DEFAULT_SITE = "default"  # the network of nodes without a `site` label


class SimError(MeshError):
    """A simulation step failed; the message says what and what to do."""


@dataclass(frozen=True)
class SimNode:
    """One simulated node as the backend sees it."""

    name: str  # the topology's node name
    site: str  # its `site` label, or DEFAULT_SITE
    address: str  # host:port of its gRPC server, reachable from the host ("" when down)
    state: str  # running, paused, stopped, exited, missing
    faults: tuple[str, ...] = ()  # faults in force: "partition", "delay 200ms", "loss 5%", ...


@dataclass(frozen=True)
class SimStatus:
    """A simulated mesh: where its coordinator answers and what its nodes are doing."""

    backend: str  # "docker" or "netns"
    project: str  # the compose project / lab name
    topology: str  # the topology file's path
    coordinator_grpc: str  # host:port of the coordinator's gRPC ingress ("" when not up)
    coordinator_http: str  # host:port of its OpenAI-compatible HTTP ingress ("" when not up)
    nodes: tuple[SimNode, ...] = ()
    notes: tuple[str, ...] = field(default=())  # e.g. models stood in for in the simulation

    @property
    def up(self) -> bool:
        return bool(self.coordinator_grpc)

    def node(self, name: str) -> SimNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise SimError(f"no node {name!r} in {self.project} (nodes: {self.node_names()})")

    def node_names(self) -> str:
        return ", ".join(node.name for node in self.nodes) or "none"

    def to_json(self) -> dict[str, object]:
        return {
            "backend": self.backend,
            "project": self.project,
            "topology": self.topology,
            "coordinator_grpc": self.coordinator_grpc,
            "coordinator_http": self.coordinator_http,
            "nodes": [
                {
                    "name": n.name,
                    "site": n.site,
                    "address": n.address,
                    "state": n.state,
                    "faults": list(n.faults),
                }
                for n in self.nodes
            ],
            "notes": list(self.notes),
        }


class SimBackend(Protocol):
    """A way to run a topology as a mesh on this machine."""

    name: str

    def up(self, topology: pathlib.Path, *, progress: Progress, timeout_s: float) -> SimStatus:
        """Build what is missing, start everything, wait until the coordinator lists every
        node ready (`wait_until_ready`); SimError (with what is not ready) otherwise."""
        ...

    def status(self, topology: pathlib.Path) -> SimStatus:
        """What runs now; a SimStatus with no coordinator address when nothing does."""
        ...

    def down(self, topology: pathlib.Path, *, progress: Progress) -> list[str]:
        """Remove everything `up` made (containers, networks, volumes; or processes, namespaces,
        links, firewall rules); returns what was removed, one line each."""
        ...

    def fault(
        self, topology: pathlib.Path, target: str, action: FaultAction, value: float | None = None
    ) -> str:
        """Apply one fault now; returns a line saying what was done."""
        ...


def parse_target(target: str) -> tuple[str, str]:
    """`edge-b` -> ("node", "edge-b"); `site:store-2` -> ("site", "store-2")."""
    if target.startswith(SITE_PREFIX):
        site = target[len(SITE_PREFIX) :]
        if not site:
            raise SimError(f"fault target {target!r}: expected site:NAME")
        return "site", site
    if not target:
        raise SimError("fault target: expected a node name or site:NAME")
    return "node", target


def check_fault(action: str, value: float | None) -> FaultAction:
    """The action, checked with its value; SimError with the accepted forms otherwise."""
    if action not in FAULT_ACTIONS:
        raise SimError(f"fault {action!r}: expected one of {', '.join(FAULT_ACTIONS)}")
    unit = VALUE_ACTIONS.get(action)
    if unit and value is None:
        raise SimError(f"fault {action}: needs a value ({action} {unit})")
    if not unit and value is not None:
        raise SimError(f"fault {action}: takes no value")
    if action == "delay" and value is not None and not 0 < value <= 60_000:
        raise SimError("fault delay: MS must be 1..60000")
    if action == "loss" and value is not None and not 0 < value <= 100:
        raise SimError("fault loss: PCT must be 0..100 (above 0)")
    return action  # type: ignore[return-value]


def node_sites(names_and_labels: Sequence[tuple[str, dict[str, str]]]) -> dict[str, str]:
    """Node name -> its site (the `site` label, or DEFAULT_SITE)."""
    return {name: labels.get("site", DEFAULT_SITE) for name, labels in names_and_labels}


async def _ready_names(address: str) -> dict[str, str]:
    from mesh.coordinator_client import MeshClient

    async with MeshClient(address, timeout_s=5.0) as client:
        return {node.name: node.state for node in await client.list_nodes(timeout_s=5.0)}


def wait_until_ready(
    coordinator_grpc: str,
    expected: Sequence[str],
    *,
    progress: Progress,
    timeout_s: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, str]:
    """Poll the coordinator's node table until every `expected` node is ready, saying what
    changed as it goes; returns name -> state. SimError naming what is not ready at timeout."""
    deadline = clock() + timeout_s
    said: dict[str, str] = {}
    states: dict[str, str] = {}
    last_error = ""
    while True:
        try:
            states = asyncio.run(_ready_names(coordinator_grpc))
            last_error = ""
        except MeshError as error:  # not answering yet
            last_error = str(error)
        for name in expected:
            state = states.get(name, "not seen")
            if said.get(name) != state:
                said[name] = state
                progress(f"  node {name}: {state}")
        if all(states.get(name) == "ready" for name in expected):
            return states
        if clock() >= deadline:
            missing = [f"{n} ({states.get(n, 'not seen')})" for n in expected]
            detail = f"; last error: {last_error}" if last_error else ""
            raise SimError(
                f"not every node became ready within {timeout_s:.0f} s: "
                f"{', '.join(missing)}{detail}"
            )
        sleep(0.5)


def state_root() -> pathlib.Path:
    """Where simulations keep what they need between commands (compose files, lab state)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return pathlib.Path(base) / "edge-agent-mesh" / "sim"


def backend_for(name: str) -> SimBackend:
    """The backend called `name` ("docker" or "netns")."""
    if name == "docker":
        from mesh.sim.docker import DockerBackend

        return DockerBackend()
    if name == "netns":
        from mesh.sim.netns import NetnsBackend

        return NetnsBackend()
    raise SimError(f"backend {name!r}: expected docker or netns")
