"""Routing policies: pure choices of one candidate for a task.

Every policy has the signature of `Policy`:

    choose(candidates, task, state) -> NodeId | None

`candidates` come from `filter_candidates` (ready, serving, not tried, not cooling, with spare
capacity), in any order; the result is one of their node ids, or None only when there are none.
`state` is the little memory a policy keeps between calls (a round-robin cursor, a seeded random
generator); it is the only thing a policy mutates, so a policy is unit-tested with plain asserts.
"""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence

from mesh.core.errors import ConfigError
from mesh.core.ids import NodeId
from mesh.routing._candidates import Candidate, TaskShape, prefer_warm


class PolicyState:
    """What policies remember between calls: one per dispatcher, used from one event loop."""

    def __init__(self, *, seed: int | None = None, rng: random.Random | None = None) -> None:
        self.rng = rng if rng is not None else random.Random(seed)
        self.last_chosen: dict[str, NodeId] = {}  # TaskShape.route_key -> node id
        # Affinity key -> the nodes that last ran such a task, most recent last (cache_aware);
        # the last MAX_AFFINITY_KEYS keys (sessions are the callers').
        self.warm: OrderedDict[str, deque[NodeId]] = OrderedDict()

    def remember(self, task: TaskShape, node_id: NodeId) -> None:
        """`node_id` ran `task`: its caches (an agent's prefix) are warm for such tasks."""
        key = affinity_key(task)
        if key is None:
            return
        nodes = self.warm.setdefault(key, deque(maxlen=WARM_NODES_PER_KEY))
        self.warm.move_to_end(key)
        if node_id in nodes:
            nodes.remove(node_id)
        nodes.append(node_id)
        while len(self.warm) > MAX_AFFINITY_KEYS:
            self.warm.popitem(last=False)


WARM_NODES_PER_KEY = 1  # an agent is warm where it ran last (more: every node soon is)
MAX_AFFINITY_KEYS = 10_000


def affinity_key(task: TaskShape) -> str | None:
    """What makes two tasks share a cache on a node: the agent (its long fixed prefix), or for
    a model task the conversation (its earlier turns are the next prompt's prefix)."""
    if task.agent:
        return f"agent:{task.agent}"
    return f"session:{task.session}" if task.session else None


Policy = Callable[[Sequence[Candidate], TaskShape, PolicyState], NodeId | None]


def _rotate(node_ids: Sequence[NodeId], task: TaskShape, state: PolicyState) -> NodeId | None:
    """The first id after the last one chosen for this task's key, wrapping around.

    Keyed on ids, not positions, so the cycle stays fair when nodes join or leave.
    """
    if not node_ids:
        return None
    ordered = sorted(node_ids)
    last = state.last_chosen.get(task.route_key)
    choice = next((node_id for node_id in ordered if last is None or node_id > last), ordered[0])
    state.last_chosen[task.route_key] = choice
    return choice


def _load_key(candidate: Candidate) -> tuple[float, int]:
    return candidate.utilisation, candidate.load


def choose_round_robin(
    candidates: Sequence[Candidate], task: TaskShape, state: PolicyState
) -> NodeId | None:
    """Each candidate in turn, in node-id order, per task key."""
    return _rotate([candidate.node_id for candidate in candidates], task, state)


def choose_least_loaded(
    candidates: Sequence[Candidate], task: TaskShape, state: PolicyState
) -> NodeId | None:
    """The lowest load per execution slot, then the fewest requests.

    Ties go round-robin among the tied nodes (deterministic given `state`), so an idle mesh fed one
    request at a time still spreads the work instead of always picking the same node.
    """
    if not candidates:
        return None
    best = min(_load_key(candidate) for candidate in candidates)
    tied = [candidate.node_id for candidate in candidates if _load_key(candidate) == best]
    return _rotate(tied, task, state)


def choose_power_of_two(
    candidates: Sequence[Candidate], task: TaskShape, state: PolicyState
) -> NodeId | None:
    """Two distinct candidates drawn with `state.rng`; the less loaded one (the first on a tie)."""
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0].node_id
    ordered = sorted(candidates, key=lambda candidate: candidate.node_id)  # input order is noise
    first, second = state.rng.sample(ordered, 2)
    return second.node_id if _load_key(second) < _load_key(first) else first.node_id


def choose_latency_aware(
    candidates: Sequence[Candidate], task: TaskShape, state: PolicyState
) -> NodeId | None:
    """The lowest expected time per token: EWMA ms/token x (1 + load per slot).

    Idle nodes without measurements are explored first (least-loaded among them), so a new node
    gets one request and a measurement. A node being explored (busy, still unmeasured) is not
    sent more until its first answer, unless nothing has been measured yet. With equal loads the
    faster node wins; a fast node that is busy loses to a slower idle one once the wait outweighs
    the speed.
    """
    if not candidates:
        return None
    unexplored = [c for c in candidates if c.ewma_ms_per_token is None and c.load == 0]
    if unexplored:
        return choose_least_loaded(unexplored, task, state)
    measured = [c for c in candidates if c.ewma_ms_per_token is not None]
    if not measured:
        return choose_least_loaded(candidates, task, state)

    def expected(candidate: Candidate) -> tuple[float, str]:
        assert candidate.ewma_ms_per_token is not None
        return candidate.ewma_ms_per_token * (1 + candidate.utilisation), candidate.node_id

    return min(measured, key=expected).node_id


def choose_cache_aware(
    candidates: Sequence[Candidate], task: TaskShape, state: PolicyState
) -> NodeId | None:
    """The node where the task's agent ran last (its prefix is warm there:
    nodes/backends/prefix_states.py) or, for an agent not seen yet, its home: the candidate
    that rendezvous hashing of the agent gives, so that agents spread over the nodes and each
    node keeps few prefixes. Chosen while it has a free slot; else the least loaded of the
    others with a free slot (which then warms up), else the least loaded of all. Warmth yields
    to load: a warm node is never sent work it would only queue while another is idle."""
    key = affinity_key(task)
    if key is None or not candidates:
        return choose_least_loaded(candidates, task, state)
    warm = state.warm.get(key) or (_home(key, candidates),)
    return choose_least_loaded(prefer_warm(candidates, warm), task, state)


def _home(key: str, candidates: Sequence[Candidate]) -> NodeId:
    """Rendezvous (highest random weight) hashing: stable while the candidates are."""

    def weight(candidate: Candidate) -> bytes:
        return hashlib.blake2b(f"{key}|{candidate.node_id}".encode(), digest_size=8).digest()

    return max(candidates, key=weight).node_id


POLICIES: dict[str, Policy] = {
    "round_robin": choose_round_robin,
    "least_loaded": choose_least_loaded,
    "power_of_two": choose_power_of_two,
    "latency_aware": choose_latency_aware,
    "cache_aware": choose_cache_aware,
}


def policy_by_name(name: str) -> Policy:
    """The policy a topology's `routing.policy` names; ConfigError for an unknown name."""
    try:
        return POLICIES[name]
    except KeyError:
        raise ConfigError(
            f"unknown routing policy {name!r}; known: {', '.join(POLICIES)}"
        ) from None
