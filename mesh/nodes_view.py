"""What the mesh knows about one node: the registry's row, shared by routing and the coordinator."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from mesh.core.ids import NodeId
from mesh.core.model import FrozenModel


class NodeState(StrEnum):
    JOINING = "joining"  # seen (mDNS or static) but not yet verified over gRPC
    READY = "ready"  # Describe and health check succeeded; takes work
    SUSPECT = "suspect"  # a health check failed or the watch broke; no new work
    GONE = "gone"  # left (goodbye), crashed, or unreachable past the bound


class NodeSource(StrEnum):
    MDNS = "mdns"
    STATIC = "static"


class NodeView(FrozenModel):
    """A snapshot of one node as the registry sees it."""

    node_id: NodeId
    name: str
    address: str  # host:port of the node's gRPC server
    state: NodeState
    source: NodeSource
    cluster: str = ""
    models: tuple[str, ...] = ()  # served: loaded, or loaded when asked for
    loaded_models: tuple[str, ...] = ()  # of those, resident now (the pool prefers these)
    # Model id -> decode tokens/s the node measured (the latency policy's first estimate).
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
    # Model id -> SHA-256 of its file, where the node said (Describe): the same hash on two
    # nodes means token ids from one continue an answer on the other.
    model_hashes: dict[str, str] = Field(default_factory=dict)
    default_model: str = ""  # the model a request that names none gets
    state_since_s: float = 0.0  # registry clock time of the last state change
    last_seen_s: float = 0.0  # registry clock time of the last sign of life

    def model_hash(self, model: str | None) -> str:
        """The file hash of `model` (None: the node's default) on this node; "" if unknown."""
        return self.model_hashes.get(model or self.default_model, "")

    @property
    def free_slots(self) -> int:
        """Requests the node can still take at once without queueing."""
        return max(0, self.max_concurrent - self.in_flight)
