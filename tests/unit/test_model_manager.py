"""Models on demand under a node's caps (nodes/model_manager.py), with fake models and a clock."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from mesh.core.errors import ConfigError, OverloadedError
from mesh.routing import Candidate, prefer_warm
from nodes.backends import ModelStatus
from nodes.model_manager import ModelManager
from tests.coordinator_fakes import ManualClock
from tests.fakes import FakeBackend

MB = 1024 * 1024


def run(coro, timeout=10):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def models(**sizes_mb: int) -> dict[str, FakeBackend]:
    backends = {}
    for name, size in sizes_mb.items():
        backend = FakeBackend(name)
        backend.descriptor = dataclasses.replace(backend.descriptor, size_bytes=size * MB)
        backends[name] = backend
    return backends


def states(backends) -> dict[str, str]:
    return {name: b.status.value for name, b in backends.items()}


def manager(backends, **options) -> ModelManager:
    said: list[str] = []
    made = ModelManager(backends, say=said.append, **options)
    made.said = said  # type: ignore[attr-defined]
    return made


def test_start_loads_while_the_caps_hold_and_a_request_loads_the_rest():
    backends = models(a=100, b=100, c=100)

    async def scenario():
        m = manager(backends, max_loaded_models=2)
        await m.start()
        assert states(backends) == {"a": "ready", "b": "ready", "c": "unloaded"}
        assert m.on_demand("c") and not m.on_demand("a")
        async with m.use("c") as backend:  # loads c; a is the least recently used
            assert backend is backends["c"] and backend.status is ModelStatus.READY
        return m

    m = run(scenario())
    assert states(backends) == {"a": "unloaded", "b": "ready", "c": "ready"}
    assert any("unloading model a (least recently used" in line for line in m.said)


def test_the_memory_cap_evicts_least_recently_used_first_and_spares_pinned_models():
    backends = models(a=300, b=300, c=300, d=300)
    clock = ManualClock()

    async def scenario():
        m = manager(backends, pinned=frozenset({"a"}), max_model_memory_mb=700, clock=clock)
        await m.start()  # a (pinned), then b; c and d do not fit
        assert states(backends) == {"a": "ready", "b": "ready", "c": "unloaded", "d": "unloaded"}
        clock.advance(1)
        async with m.use("c"):  # b goes, never a
            pass
        clock.advance(1)
        async with m.use("b"):  # c goes
            pass
        return m

    m = run(scenario())
    assert states(backends) == {"a": "ready", "b": "ready", "c": "unloaded", "d": "unloaded"}
    assert m.resident_bytes() == 600 * MB


def test_a_model_in_use_is_never_unloaded_and_no_room_is_overloaded_with_the_numbers():
    backends = models(a=100, b=100)

    async def scenario():
        m = manager(backends, max_loaded_models=1)
        await m.start()
        async with m.use("a"):
            with pytest.raises(
                OverloadedError, match=r"no room to load model b \(100 MB\).*a is pinned or in use"
            ):
                async with m.use("b"):
                    pass
            assert backends["a"].status is ModelStatus.READY
        async with m.use("b"):  # a is free now
            pass

    run(scenario())
    assert states(backends) == {"a": "unloaded", "b": "ready"}


def test_a_model_over_the_memory_cap_is_refused_at_start_with_the_numbers():
    backends = models(small=100, huge=900)
    with pytest.raises(
        ConfigError, match=r"model huge is 900 MB, over max_model_memory_mb \(500 MB\)"
    ):
        run(manager(backends, max_model_memory_mb=500).start())
    assert states(backends) == {"small": "unloaded", "huge": "unloaded"}


def test_idle_models_unload_after_idle_unload_s_but_pinned_and_busy_ones_stay():
    backends = models(a=10, b=10, c=10)
    clock = ManualClock()

    async def scenario():
        m = manager(backends, pinned=frozenset({"a"}), idle_unload_s=60, clock=clock)
        await m.start()
        clock.advance(30)
        async with m.use("b"):
            clock.advance(45)  # c idle 75 s; b busy
            assert await m.unload_idle() == ["c"]
        clock.advance(59)
        assert await m.unload_idle() == []  # b was used 59 s ago
        clock.advance(1)
        assert await m.unload_idle() == ["b"]
        async with m.use("c"):  # asked for again: loaded again
            pass

    run(scenario())
    assert states(backends) == {"a": "ready", "b": "unloaded", "c": "ready"}


def test_unmanaged_models_count_against_no_cap():
    backends = models(router=1, a=100, b=100)

    async def scenario():
        m = manager(backends, unmanaged=frozenset({"router"}), max_loaded_models=1)
        await m.start()
        return m

    m = run(scenario())
    assert states(backends) == {"router": "ready", "a": "ready", "b": "unloaded"}
    assert m.loaded() == ["a"]


def candidate(node: str, in_flight: int, max_concurrent: int = 1) -> Candidate:
    return Candidate(node_id=node, in_flight=in_flight, max_concurrent=max_concurrent, max_queued=4)


def test_affinity_prefers_resident_nodes_and_yields_to_load():
    warm_free, warm_busy = candidate("w1", 0), candidate("w2", 1)
    cold_free, cold_busy = candidate("c1", 0), candidate("c2", 1)
    assert prefer_warm([warm_free, cold_free], {"w1"}) == [warm_free]
    # The resident node is busy: a free node loads the model rather than queue behind it.
    assert prefer_warm([warm_busy, cold_free], {"w2"}) == [cold_free]
    # Everything is busy: every candidate stays (the policy ranks the queues).
    assert prefer_warm([warm_busy, cold_busy], {"w2"}) == [warm_busy, cold_busy]
    # All alike (none resident, or all): unchanged.
    assert prefer_warm([cold_free, cold_busy], set()) == [cold_free, cold_busy]
    assert prefer_warm([warm_free, warm_busy], {"w1", "w2"}) == [warm_free, warm_busy]
