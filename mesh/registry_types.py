"""The registry's vocabulary: what probes report, what the table asks for, what it announces.

Plain data shared by `mesh.node_table` (the rules), `mesh.health` (the probes) and
`mesh.registry` (the mechanism); `mesh.node_table` re-exports all of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from pydantic import Field

from mesh.core.ids import NodeId
from mesh.core.model import FrozenModel
from mesh.nodes_view import NodeView


class NodeDetails(FrozenModel):
    """What a node's `Describe` said, free of protobuf."""

    node_id: NodeId
    name: str
    cluster: str = ""
    protocol_version: int = 0
    models: tuple[str, ...] = ()
    loaded_models: tuple[str, ...] = ()  # of `models`, those resident now
    # Model id -> decode tokens/s the node measured on its hardware (nodes/capability.py).
    decode_tokens_per_s: dict[str, float] = Field(default_factory=dict)
    agents: tuple[str, ...] = ()
    labels: dict[str, str] = Field(default_factory=dict)
    in_flight: int = 0
    queued: int = 0
    max_concurrent: int = 1
    max_queued: int = 0
    cpu_percent: float = 0.0
    memory_percent: float = 0.0
    cores: int = 0
    memory_total_bytes: int = 0
    accelerators: tuple[str, ...] = ()
    model_hashes: dict[str, str] = Field(default_factory=dict)  # model id -> file sha256
    default_model: str = ""  # the model a request that names none gets


class ProbeStatus(StrEnum):
    OK = "ok"  # Describe answered and health is SERVING
    NOT_SERVING = "not_serving"  # alive but not taking work (loading, draining)
    UNREACHABLE = "unreachable"  # connection refused/reset: the process is not there
    TIMEOUT = "timeout"  # no answer in time: slow or cut off, not proven dead
    INVALID = "invalid"  # answered with something that is not a node of ours


class ProbeResult(FrozenModel):
    status: ProbeStatus
    details: NodeDetails | None = None
    reason: str = ""
    address: str = ""  # the address that gave this answer ("" : the one the Probe named)


class RegistryTimings(FrozenModel):
    """Tunables of the registry.

    A process that dies is gone well under a second with any of these values (its health
    Watch stream breaks on the connection reset, one probe confirms). A host that vanishes
    without a word (power or network lost) is noticed by the refresh probes: gone within
    `vanished_host_bound_s` (health_interval_s + probe_timeout_s + suspect_timeout_s).
    """

    health_interval_s: float = Field(default=1.0, gt=0)  # Describe refresh of ready nodes
    probe_timeout_s: float = Field(default=1.0, gt=0)  # deadline of each probe RPC
    # Deadline per address when a node advertises several (multi-homed) and the registry
    # looks for the one that answers; the first that answers with the right node id is kept.
    address_timeout_s: float = Field(default=0.5, gt=0)
    retry_initial_s: float = Field(default=0.25, gt=0)  # first retry of a failed probe
    retry_max_s: float = Field(default=5.0, gt=0)  # backoff cap (joining and gone nodes)
    join_timeout_s: float = Field(default=15.0, gt=0)  # joining this long without an answer: gone
    suspect_timeout_s: float = Field(default=1.5, gt=0)  # suspect this long: gone
    forget_after_s: float = Field(default=300.0, gt=0)  # withdrawn and gone this long: dropped
    tick_interval_s: float = Field(default=0.1, gt=0)  # how often the mechanism calls tick()

    @property
    def vanished_host_bound_s(self) -> float:
        """Worst case from a host vanishing (no reset, no goodbye) to its node being gone."""
        return (
            self.health_interval_s
            + self.probe_timeout_s
            + self.suspect_timeout_s
            + self.tick_interval_s
        )


class EventKind(StrEnum):
    JOINING = "joining"
    READY = "ready"
    UPDATED = "updated"  # a ready node's load, models or agents changed
    SUSPECT = "suspect"
    GONE = "gone"


class NodeEvent(FrozenModel):
    kind: EventKind
    view: NodeView
    reason: str = ""


@dataclass(frozen=True)
class Probe:
    key: str
    address: str
    epoch: int
    refresh: bool = False  # a periodic load refresh of a ready node
    # Every address to try, in order (a multi-homed node); empty: `address` only. The first
    # that answers with `node_id` (when known) wins, and the result names it.
    candidates: tuple[str, ...] = ()
    node_id: NodeId | None = None


@dataclass(frozen=True)
class StartWatch:
    key: str
    address: str
    epoch: int


@dataclass(frozen=True)
class StopWatch:
    key: str


@dataclass(frozen=True)
class Discard:
    """Close whatever channel the mechanism holds for this entry."""

    key: str


Action = Probe | StartWatch | StopWatch | Discard


@dataclass
class Step:
    actions: list[Action] = field(default_factory=list)
    events: list[NodeEvent] = field(default_factory=list)

    def extend(self, other: Step) -> None:
        self.actions.extend(other.actions)
        self.events.extend(other.events)


class Rejection(StrEnum):
    DUPLICATE = "duplicate node id"
    CLUSTER = "other cluster"
    PROTOCOL = "protocol version"
    IDENTITY = "identity mismatch"
    INVALID = "invalid answer"
