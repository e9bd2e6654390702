"""Who may take a task: the candidate rows that routing policies choose among."""

from __future__ import annotations

from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from mesh.core.ids import NodeId
from mesh.nodes_view import NodeState, NodeView


@dataclass(frozen=True, slots=True)
class TaskShape:
    """What a task needs from a node. Empty fields mean "any"."""

    model: str | None = None  # model alias the node must serve
    agent: str | None = None  # agent the node must run
    labels: Mapping[str, str] = field(default_factory=dict)  # labels the node must carry
    # A conversation's key (the OpenAI `user`): no requirement, an affinity (cache_aware).
    session: str = ""

    @property
    def route_key(self) -> str:
        """Tasks with the same key share a round-robin cursor."""
        return f"{self.agent or ''}|{self.model or ''}"


@dataclass(frozen=True, slots=True)
class Candidate:
    """One node a task may go to, with the load it reports.

    A plain frozen dataclass rather than a pydantic model: routing builds these on every request.
    `ewma_ms_per_token` is None until the node has answered at least once. The load and
    capacity are the node's whole ones (what policies rank by); `share_left` is what this
    dispatcher may still send there when it has only a share of the node (None: all of it).
    """

    node_id: NodeId
    in_flight: int = 0
    queued: int = 0
    max_concurrent: int = 1
    max_queued: int = 0
    ewma_ms_per_token: float | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    models: tuple[str, ...] = ()
    agents: tuple[str, ...] = ()
    share_left: int | None = None

    @property
    def load(self) -> int:
        return self.in_flight + self.queued

    @property
    def capacity(self) -> int:
        """The most requests the node accepts at once: running plus waiting."""
        return self.max_concurrent + self.max_queued

    @property
    def spare(self) -> int:
        spare = self.capacity - self.load
        if self.share_left is not None:
            spare = min(spare, self.share_left)
        return max(0, spare)

    @property
    def utilisation(self) -> float:
        """Load per execution slot: 0 idle, 1 every slot busy, above 1 requests are queueing."""
        return self.load / max(1, self.max_concurrent)


class SupportsGet(Protocol):
    def get(self, node_id: NodeId, /) -> float | None: ...


def capacity_share(max_concurrent: int, max_queued: int, share: int) -> tuple[int, int]:
    """(running, waiting) slots of one of `share` dispatchers that send to the same node: an
    equal part of its slots, rounded down, so that together they never send more than the node
    accepts. A node with fewer slots than dispatchers gets (0, 0) from each: refused, never
    overfilled."""
    if share <= 1:
        return max_concurrent, max_queued
    slots = (max_concurrent + max_queued) // share
    running = min(slots, max(1, max_concurrent // share))
    return running, slots - running


def candidate_from_view(
    view: NodeView,
    *,
    ewma_ms_per_token: float | None = None,
    outstanding: int = 0,
    share: int = 1,
) -> Candidate:
    """A candidate from a registry row; `outstanding`: requests this dispatcher has sent there.

    The node's reported load lags behind what a dispatcher just sent; the larger of the two is
    taken, so a burst never overshoots what the node advertised.

    `share`: how many dispatchers send to the node. Each may use its `capacity_share`, and the
    node's room too: spare = min(share slots - outstanding, capacity - reported load).
    """
    load = max(view.in_flight + view.queued, outstanding)
    in_flight = min(load, view.max_concurrent)
    share_left = None
    if share > 1:
        share_left = sum(capacity_share(view.max_concurrent, view.max_queued, share)) - outstanding
    return Candidate(
        node_id=view.node_id,
        in_flight=in_flight,
        queued=load - in_flight,
        max_concurrent=view.max_concurrent,
        max_queued=view.max_queued,
        ewma_ms_per_token=ewma_ms_per_token,
        labels=view.labels,
        models=view.models,
        agents=view.agents,
        share_left=share_left,
    )


def serves(view: NodeView, task: TaskShape) -> bool:
    """Whether the node serves the task's model and agent and carries its labels (load aside)."""
    if task.model is not None and task.model not in view.models:
        return False
    if task.agent is not None and task.agent not in view.agents:
        return False
    return all(view.labels.get(key) == value for key, value in task.labels.items())


def filter_candidates(
    nodes: Sequence[NodeView],
    task: TaskShape,
    *,
    exclude: Container[NodeId] = (),
    cooling: Container[NodeId] = (),
    ewma: SupportsGet | None = None,
    outstanding: Mapping[NodeId, int] | None = None,
    share: int = 1,
) -> list[Candidate]:
    """The nodes a policy may choose for `task`, in node-id order.

    Kept: READY nodes that serve the task (`serves`), not in `exclude` (already tried for this
    task), not in `cooling` (a set, or a `CooldownTracker`), and with spare capacity: a node never
    gets more than `max_concurrent + max_queued` requests. An empty list means the mesh is full
    (queue or refuse with RESOURCE_EXHAUSTED) or nothing serves the task (`serves` tells which).
    With `share` dispatchers sending to the same nodes, each keeps to its `capacity_share`.
    """
    outstanding = outstanding or {}
    chosen = []
    for view in nodes:
        if view.state != NodeState.READY or view.node_id in exclude or view.node_id in cooling:
            continue
        if not serves(view, task):
            continue
        candidate = candidate_from_view(
            view,
            ewma_ms_per_token=ewma.get(view.node_id) if ewma is not None else None,
            outstanding=outstanding.get(view.node_id, 0),
            share=share,
        )
        if candidate.spare > 0:
            chosen.append(candidate)
    chosen.sort(key=lambda candidate: candidate.node_id)
    return chosen


def prefer_warm(candidates: Sequence[Candidate], warm: Container[NodeId]) -> list[Candidate]:
    """The candidates to choose among when some are warm for the task (its model resident,
    its agent's prefix kept) and others are not: warm ones with a free slot first; else,
    rather than queue behind a busy warm node, a cold one with a free slot (which warms up);
    else all of them. Affinity yields to load: a warm node never takes work it would only
    queue while another node is idle."""

    def free(candidate: Candidate) -> bool:
        return candidate.in_flight < candidate.max_concurrent

    hot = [c for c in candidates if c.node_id in warm]
    if not hot or len(hot) == len(candidates):
        return list(candidates)  # all alike: the policy alone decides
    return (
        [c for c in hot if free(c)]
        or [c for c in candidates if c.node_id not in warm and free(c)]
        or list(candidates)
    )
