"""Routing: which node takes a task. Pure policy here; retries, deadlines and probes live elsewhere.

Typical use by a dispatcher (one set of these objects per dispatcher, used from its event loop):

    from mesh.routing import (CooldownTracker, Ewma, PolicyState, TaskShape, filter_candidates,
                              policy_by_name)

    policy = policy_by_name(topology.routing.policy)
    state = PolicyState(seed=topology.routing.seed)
    ewma = Ewma(alpha=topology.routing.ewma_alpha)
    cooldowns = CooldownTracker(failures_before_cooldown=topology.failover.failures_before_cooldown,
                                cooldown_s=topology.failover.cooldown_s)

    task = TaskShape(agent="customer-service")
    tried: set[NodeId] = set()
    candidates = filter_candidates(registry_snapshot, task, exclude=tried, cooling=cooldowns,
                                   ewma=ewma, outstanding=my_in_flight_per_node)
    node_id = policy(candidates, task, state)   # None: nothing can take it now
    ... on success:  ewma.update(node_id, ms_per_token(duration_s, tokens)); cooldowns.record_success(node_id)
    ... on failure:  cooldowns.record_failure(node_id); tried.add(node_id); choose again

`filter_candidates` enforces capacity: a node is never offered more than the
`max_concurrent + max_queued` it advertised (counting this dispatcher's own `outstanding`
requests), so an empty list with `any(serves(view, task) ...)` true means "mesh full": queue or
refuse with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

from mesh.routing._candidates import (
    Candidate,
    SupportsGet,
    TaskShape,
    candidate_from_view,
    capacity_share,
    filter_candidates,
    prefer_warm,
    serves,
)
from mesh.routing._policies import (
    POLICIES,
    Policy,
    PolicyState,
    affinity_key,
    choose_cache_aware,
    choose_latency_aware,
    choose_least_loaded,
    choose_power_of_two,
    choose_round_robin,
    policy_by_name,
)
from mesh.routing._trackers import CooldownTracker, Ewma, ms_per_token

__all__ = [
    "POLICIES",
    "Candidate",
    "CooldownTracker",
    "Ewma",
    "Policy",
    "PolicyState",
    "SupportsGet",
    "TaskShape",
    "candidate_from_view",
    "capacity_share",
    "affinity_key",
    "choose_cache_aware",
    "choose_latency_aware",
    "choose_least_loaded",
    "choose_power_of_two",
    "choose_round_robin",
    "filter_candidates",
    "prefer_warm",
    "ms_per_token",
    "policy_by_name",
    "serves",
]
