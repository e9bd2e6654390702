"""The cache-aware policy: an agent's task goes where its prefix is warm, unless that node is busy."""

from __future__ import annotations

from mesh.routing import Candidate, PolicyState, TaskShape, choose_cache_aware, policy_by_name


def candidate(node: str, in_flight: int = 0) -> Candidate:
    return Candidate(node_id=node, in_flight=in_flight, max_concurrent=1, max_queued=4)


def test_an_agent_goes_back_to_the_node_that_ran_it_while_that_node_is_free():
    state = PolicyState(seed=1)
    shop, clinic = TaskShape(agent="customer-service"), TaskShape(agent="scheduling")
    state.remember(shop, "b")
    state.remember(clinic, "a")
    nodes = [candidate("a"), candidate("b"), candidate("c")]
    assert choose_cache_aware(nodes, shop, state) == "b"  # least loaded alone would say a
    assert choose_cache_aware(nodes, clinic, state) == "a"
    assert policy_by_name("cache_aware") is choose_cache_aware


def test_warmth_yields_to_load_and_an_unknown_agent_is_placed_by_load():
    state = PolicyState(seed=1)
    shop = TaskShape(agent="customer-service")
    state.remember(shop, "b")
    busy_b = [candidate("a", in_flight=0), candidate("b", in_flight=1)]
    assert choose_cache_aware(busy_b, shop, state) == "a"  # b is busy, a is idle: a warms up
    all_busy = [candidate("a", in_flight=1), candidate("b", in_flight=1)]
    assert choose_cache_aware(all_busy, shop, state) in ("a", "b")
    other = TaskShape(agent="technical-support")
    assert choose_cache_aware([candidate("a", 1), candidate("c", 0)], other, state) == "c"


def test_an_agent_is_warm_where_it_ran_last():
    state = PolicyState(seed=1)
    shop = TaskShape(agent="customer-service")
    for node in ("a", "b", "c", "b"):
        state.remember(shop, node)
    assert list(state.warm["agent:customer-service"]) == ["b"]
    state.remember(TaskShape(model="smollm2"), "a")  # model tasks carry no affinity key
    assert set(state.warm) == {"agent:customer-service"}


def test_agents_not_seen_yet_spread_over_the_nodes_by_rendezvous_hashing():
    state = PolicyState(seed=1)
    nodes = [candidate(n) for n in ("node-1", "node-2", "node-3")]
    agents = [f"agent-{i}" for i in range(12)]
    homes = {a: choose_cache_aware(nodes, TaskShape(agent=a), state) for a in agents}
    assert len(set(homes.values())) == 3  # least loaded alone would send all to node-1
    again = {
        a: choose_cache_aware(list(reversed(nodes)), TaskShape(agent=a), state) for a in agents
    }
    assert again == homes  # stable: the order of the candidates does not matter


def test_a_conversation_goes_back_to_where_its_earlier_turns_are_warm():
    state = PolicyState(seed=1)
    turn = TaskShape(model="smollm2", session="kiosk-7")
    nodes = [candidate("a"), candidate("b")]
    first = choose_cache_aware(nodes, turn, state)
    state.remember(turn, "b")  # it ran on b
    assert choose_cache_aware(nodes, turn, state) == "b"
    assert first in ("a", "b")
    anonymous = TaskShape(model="smollm2")  # no session: load alone decides
    assert choose_cache_aware([candidate("a", 1), candidate("b", 0)], anonymous, state) == "b"


def test_affinity_keys_are_bounded():
    from mesh.routing._policies import MAX_AFFINITY_KEYS

    state = PolicyState(seed=1)
    for index in range(MAX_AFFINITY_KEYS + 5):
        state.remember(TaskShape(model="m", session=f"user-{index}"), "a")
    assert len(state.warm) == MAX_AFFINITY_KEYS
    assert (
        "session:user-0" not in state.warm and f"session:user-{MAX_AFFINITY_KEYS + 4}" in state.warm
    )
