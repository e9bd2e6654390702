"""Routing policies, candidate filtering and the per-node trackers: pure, seeded, fake clock."""

from __future__ import annotations

import collections
import random

import pytest

from mesh.core.errors import ConfigError
from mesh.core.ids import NodeId
from mesh.nodes_view import NodeSource, NodeState, NodeView
from mesh.routing import (
    POLICIES,
    Candidate,
    CooldownTracker,
    Ewma,
    PolicyState,
    TaskShape,
    choose_latency_aware,
    choose_least_loaded,
    choose_power_of_two,
    choose_round_robin,
    filter_candidates,
    ms_per_token,
    policy_by_name,
)
from mesh.topology import POLICY_NAMES

pytestmark = pytest.mark.unit

TASK = TaskShape(model="smollm2")


def cand(
    node_id: str, load: int = 0, *, slots: int = 1, queue: int = 8, ewma: float | None = None
) -> Candidate:
    in_flight = min(load, slots)
    return Candidate(
        node_id=NodeId(node_id),
        in_flight=in_flight,
        queued=load - in_flight,
        max_concurrent=slots,
        max_queued=queue,
        ewma_ms_per_token=ewma,
    )


def view(
    node_id: str,
    *,
    state: NodeState = NodeState.READY,
    models=("smollm2",),
    agents=(),
    labels=None,
    in_flight=0,
    queued=0,
    max_concurrent=1,
    max_queued=2,
) -> NodeView:
    return NodeView(
        node_id=NodeId(node_id),
        name=node_id,
        address="127.0.0.1:1",
        state=state,
        source=NodeSource.STATIC,
        models=tuple(models),
        agents=tuple(agents),
        labels=labels or {},
        in_flight=in_flight,
        queued=queued,
        max_concurrent=max_concurrent,
        max_queued=max_queued,
    )


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- policies -----------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", list(POLICIES.values()), ids=list(POLICIES))
def test_every_policy_returns_none_without_candidates_and_the_only_one_otherwise(policy):
    state = PolicyState(seed=1)
    assert policy([], TASK, state) is None
    assert policy([cand("solo", load=3)], TASK, state) == "solo"


def test_round_robin_cycles_in_node_id_order_whatever_the_input_order():
    state = PolicyState()
    nodes = [cand("c"), cand("a"), cand("b")]
    picks = [choose_round_robin(nodes, TASK, state) for _ in range(7)]
    assert picks == ["a", "b", "c", "a", "b", "c", "a"]


def test_round_robin_stays_fair_when_nodes_join_and_leave():
    state = PolicyState()
    assert choose_round_robin([cand("a"), cand("b")], TASK, state) == "a"
    # "b" left and "c" joined: the cycle continues after "a" rather than restarting.
    assert choose_round_robin([cand("a"), cand("c")], TASK, state) == "c"
    assert choose_round_robin([cand("a"), cand("c")], TASK, state) == "a"


def test_round_robin_keeps_one_cursor_per_model_and_agent():
    state = PolicyState()
    nodes = [cand("a"), cand("b")]
    other = TaskShape(agent="scheduling")
    assert choose_round_robin(nodes, TASK, state) == "a"
    assert choose_round_robin(nodes, other, state) == "a"
    assert choose_round_robin(nodes, TASK, state) == "b"


def test_least_loaded_compares_load_per_execution_slot():
    state = PolicyState()
    nodes = [cand("busy", load=1), cand("big", load=2, slots=4), cand("queueing", load=3)]
    assert choose_least_loaded(nodes, TASK, state) == "big"  # 0.5 per slot beats 1 and 3


def test_least_loaded_breaks_ties_deterministically_and_spreads_them():
    nodes = [cand("b"), cand("a"), cand("c", load=1)]
    state, again = PolicyState(), PolicyState()
    first = [choose_least_loaded(nodes, TASK, state) for _ in range(4)]
    second = [choose_least_loaded(list(reversed(nodes)), TASK, again) for _ in range(4)]
    assert first == ["a", "b", "a", "b"]  # never "c"; the tie alternates instead of piling on "a"
    assert second == first


def test_power_of_two_never_picks_the_more_loaded_of_two():
    state = PolicyState(seed=7)
    nodes = [cand("light", load=0), cand("heavy", load=5)]
    assert {choose_power_of_two(nodes, TASK, state) for _ in range(200)} == {"light"}


def test_power_of_two_never_picks_the_most_loaded_and_spreads_over_the_rest():
    state = PolicyState(seed=3)
    nodes = [cand("a", load=0), cand("b", load=1), cand("c", load=1), cand("d", load=6)]
    counts = collections.Counter(choose_power_of_two(nodes, TASK, state) for _ in range(3000))
    assert "d" not in counts
    assert counts["a"] > counts["b"] > 0 and counts["c"] > 0
    # a is chosen whenever it is drawn: in 3 of the 6 pairs
    assert 0.45 < counts["a"] / 3000 < 0.55


def test_power_of_two_is_reproducible_with_a_seed_and_ignores_input_order():
    nodes = [cand(name) for name in "abcdef"]
    one = choose_power_of_two(nodes, TASK, PolicyState(seed=42))
    state_a, state_b = PolicyState(seed=42), PolicyState(rng=random.Random(42))
    run_a = [choose_power_of_two(nodes, TASK, state_a) for _ in range(50)]
    run_b = [choose_power_of_two(list(reversed(nodes)), TASK, state_b) for _ in range(50)]
    assert run_a == run_b and run_a[0] == one
    assert set(run_a) == set("abcdef")


def test_latency_aware_prefers_the_faster_node_at_equal_load():
    state = PolicyState()
    nodes = [cand("slow", ewma=40.0), cand("fast", ewma=10.0)]
    assert {choose_latency_aware(nodes, TASK, state) for _ in range(10)} == {"fast"}


def test_latency_aware_explores_idle_unmeasured_nodes_first():
    state = PolicyState()
    nodes = [cand("fast", ewma=5.0), cand("new-b"), cand("new-a")]
    assert choose_latency_aware(nodes, TASK, state) == "new-a"
    assert choose_latency_aware(nodes, TASK, state) == "new-b"
    # While "new-a" is busy with its first request, work is not piled onto it.
    exploring = [cand("fast", ewma=5.0), cand("new-a", load=1)]
    assert choose_latency_aware(exploring, TASK, state) == "fast"


def test_latency_aware_leaves_a_busy_fast_node_for_an_idle_slower_one():
    state = PolicyState()
    nodes = [cand("fast", load=3, ewma=10.0), cand("slow", ewma=25.0)]
    assert choose_latency_aware(nodes, TASK, state) == "slow"  # 10 x 4 > 25 x 1
    nodes = [cand("fast", load=1, ewma=10.0), cand("slow", ewma=25.0)]
    assert choose_latency_aware(nodes, TASK, state) == "fast"  # 10 x 2 < 25


def test_latency_aware_without_any_measurement_is_least_loaded():
    state = PolicyState()
    nodes = [cand("a", load=2), cand("b", load=1)]
    assert choose_latency_aware(nodes, TASK, state) == "b"


def test_policies_by_name_match_the_topology_names():
    assert tuple(POLICIES) == POLICY_NAMES
    assert policy_by_name("power_of_two") is choose_power_of_two
    with pytest.raises(ConfigError, match="unknown routing policy 'fastest'"):
        policy_by_name("fastest")


# --- candidates ---------------------------------------------------------------------------------


def test_filter_keeps_ready_nodes_that_serve_the_task():
    nodes = [
        view("joining", state=NodeState.JOINING),
        view("suspect", state=NodeState.SUSPECT),
        view("gone", state=NodeState.GONE),
        view("other-model", models=("gemma",)),
        view("ok-b", agents=("kiosk",), labels={"tier": "kiosk"}),
        view("ok-a", agents=("kiosk",), labels={"tier": "kiosk", "zone": "entrance"}),
        view("office", agents=("kiosk",), labels={"tier": "office"}),
    ]
    kiosk = TaskShape(model="smollm2", agent="kiosk", labels={"tier": "kiosk"})
    assert [c.node_id for c in filter_candidates(nodes, kiosk)] == ["ok-a", "ok-b"]
    assert [c.node_id for c in filter_candidates(nodes, TaskShape(agent="nobody"))] == []
    assert len(filter_candidates(nodes, TaskShape())) == 4  # any ready node


def test_filter_drops_tried_and_cooling_nodes():
    nodes = [view("a"), view("b"), view("c")]
    clock = FakeClock()
    cooldowns = CooldownTracker(failures_before_cooldown=1, cooldown_s=5, clock=clock)
    cooldowns.record_failure(NodeId("c"))
    kept = filter_candidates(nodes, TASK, exclude={NodeId("a")}, cooling=cooldowns)
    assert [c.node_id for c in kept] == ["b"]
    clock.now += 5
    kept = filter_candidates(nodes, TASK, exclude={NodeId("a")}, cooling=cooldowns)
    assert [c.node_id for c in kept] == ["b", "c"]


def test_filter_never_offers_more_than_the_advertised_capacity():
    full = view("full", in_flight=1, queued=2, max_concurrent=1, max_queued=2)
    room = view("room", in_flight=1, queued=1, max_concurrent=1, max_queued=2)
    assert [c.node_id for c in filter_candidates([full, room], TASK)] == ["room"]
    # This dispatcher has already sent 3 that the node has not reported yet: no room either.
    assert filter_candidates([room], TASK, outstanding={NodeId("room"): 3}) == []
    [candidate] = filter_candidates([room], TASK, outstanding={NodeId("room"): 2})
    assert (candidate.in_flight, candidate.queued, candidate.spare) == (1, 1, 1)


def test_dispatching_until_full_fills_every_node_to_exactly_its_capacity():
    nodes = [
        view("a", max_concurrent=1, max_queued=2),
        view("b", max_concurrent=2, max_queued=1),
        view("c", max_concurrent=1, max_queued=0),
    ]
    for name, policy in POLICIES.items():
        state, outstanding = PolicyState(seed=5), collections.Counter[NodeId]()
        ewma = Ewma()
        ewma.update(NodeId("a"), 10.0)
        while (
            node_id := policy(
                filter_candidates(nodes, TASK, ewma=ewma, outstanding=outstanding), TASK, state
            )
        ) is not None:
            outstanding[node_id] += 1
            assert sum(outstanding.values()) <= 7, name
        assert outstanding == {"a": 3, "b": 3, "c": 1}, name


def test_filter_carries_ewma_into_candidates():
    ewma = Ewma()
    ewma.update(NodeId("a"), 12.0)
    by_id = {c.node_id: c for c in filter_candidates([view("a"), view("b")], TASK, ewma=ewma)}
    assert by_id["a"].ewma_ms_per_token == 12.0 and by_id["b"].ewma_ms_per_token is None


# --- trackers -----------------------------------------------------------------------------------


def test_ewma_takes_the_first_sample_then_weights_by_alpha():
    ewma = Ewma(alpha=0.25)
    node = NodeId("a")
    assert ewma.get(node) is None
    assert ewma.update(node, 20.0) == 20.0
    assert ewma.update(node, 40.0) == pytest.approx(25.0)
    assert ewma.snapshot() == {node: pytest.approx(25.0)}
    ewma.forget(node)
    assert ewma.get(node) is None
    with pytest.raises(ValueError):
        ewma.update(node, -1.0)
    with pytest.raises(ValueError):
        Ewma(alpha=0)


def test_ms_per_token():
    assert ms_per_token(0.5, 50) == pytest.approx(10.0)
    assert ms_per_token(0.5, 0) is None


def test_cooldown_after_consecutive_failures_for_cooldown_s():
    clock = FakeClock()
    tracker = CooldownTracker(failures_before_cooldown=3, cooldown_s=10, clock=clock)
    node = NodeId("a")
    assert not tracker.record_failure(node)
    tracker.record_success(node)  # a success breaks the run
    assert not tracker.record_failure(node)
    assert not tracker.record_failure(node)
    assert tracker.record_failure(node)
    assert node in tracker and tracker.cooling() == {node}
    clock.now += 9.5
    assert tracker.remaining_s(node) == pytest.approx(0.5)
    clock.now += 0.5
    assert node not in tracker and tracker.cooling() == frozenset()


def test_after_a_cooldown_one_more_failure_cools_again_until_a_success():
    clock = FakeClock()
    tracker = CooldownTracker(failures_before_cooldown=2, cooldown_s=5, clock=clock)
    node = NodeId("a")
    tracker.record_failure(node)
    assert tracker.record_failure(node)
    clock.now += 5
    assert tracker.record_failure(node)  # probation: cooled again at once
    clock.now += 5
    tracker.record_success(node)
    assert not tracker.record_failure(node)


def test_zero_cooldown_never_cools():
    tracker = CooldownTracker(failures_before_cooldown=1, cooldown_s=0, clock=FakeClock())
    assert not tracker.record_failure(NodeId("a"))
    assert tracker.cooling() == frozenset()
