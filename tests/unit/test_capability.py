"""Measured capability (nodes/capability.py): kept per file and hardware, used by routing, and
less capacity on battery."""

from __future__ import annotations

import asyncio

from mesh.coordinator.tasks import build_task
from nodes.capability import Capabilities, Capability, battery_slots, hardware_key
from tests.coordinator_fakes import FakeMesh, view
from tests.unit.test_dispatcher import make
from tests.unit.test_task_counts import make_servicer


def test_capabilities_are_kept_in_the_state_dir_and_a_torn_file_is_measured_again(tmp_path):
    key = f"abc|{hardware_key(2)}"
    Capabilities(tmp_path).put(key, Capability(410.5, 92.0))
    assert Capabilities(tmp_path).get(key) == Capability(410.5, 92.0)
    assert Capabilities(tmp_path).get(f"abc|{hardware_key(1)}") is None  # other threads
    (tmp_path / "capabilities.json").write_text("{not json", encoding="utf-8")
    assert Capabilities(tmp_path).get(key) is None


def test_a_node_on_battery_advertises_half_its_slots(tmp_path):
    assert [battery_slots(n, True) for n in (1, 2, 5)] == [1, 1, 2]
    assert battery_slots(4, False) == 4
    servicer, _counts = make_servicer(tmp_path)
    servicer.admission.max_concurrent = 4
    servicer.on_battery = lambda: True
    assert servicer.describe().capacity.max_concurrent == 2
    servicer.on_battery = lambda: False
    assert servicer.describe().capacity.max_concurrent == 4


def test_latency_aware_routing_starts_from_what_nodes_measured_instead_of_exploring():
    async def scenario():
        mesh = FakeMesh()
        slow = view("a", decode_tokens_per_s={"m": 20.0})
        fast = view("b", decode_tokens_per_s={"m": 90.0})
        dispatcher = make(mesh, slow, fast, policy="latency_aware")
        served = [(await dispatcher.submit(build_task("hi", model="m"))).node_id for _ in range(3)]
        await dispatcher.close()
        return served

    # Unmeasured, node a (first by id) would be explored first.
    assert asyncio.run(asyncio.wait_for(scenario(), 10))[0] == "b"
