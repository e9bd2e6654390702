"""The announcer's record building, naming and rate limiting, with a fake zeroconf (no sockets)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from edgemesh.v1 import node_pb2
from mesh.discovery.records import SERVICE_TYPE, NodeRecord
from mesh.ids import NodeId
from nodes.announcer import (
    MulticastAnnouncer,
    UpdateThrottle,
    new_incarnation,
    record_from_describe,
    service_instance_name,
)

pytestmark = pytest.mark.unit


class FakeZeroconf:
    """Implements the part of AsyncZeroconf the announcer uses; records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    async def _done(self) -> None:
        return None

    async def async_register_service(self, info: Any, **_: Any) -> Any:
        self.calls.append(("register", info))
        return asyncio.ensure_future(self._done())

    async def async_update_service(self, info: Any) -> Any:
        self.calls.append(("update", info))
        return asyncio.ensure_future(self._done())

    async def async_unregister_service(self, info: Any) -> Any:
        self.calls.append(("unregister", info))
        return asyncio.ensure_future(self._done())


def record(load: int = 0, name: str = "kiosk") -> NodeRecord:
    return NodeRecord(
        node_id=NodeId("abc123"),
        name=name,
        cluster="c",
        grpc_port=5000,
        incarnation="1f",
        models=("smollm2",),
        load_percent=load,
    )


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_start_registers_the_record_and_stop_says_goodbye() -> None:
    async def scenario() -> list[tuple[str, Any]]:
        zc = FakeZeroconf()
        announcer = MulticastAnnouncer(addresses=["198.18.0.2"], zeroconf=zc)  # type: ignore[arg-type]
        await announcer.start(record())
        await announcer.stop()
        return zc.calls

    calls = run(scenario())
    assert [kind for kind, _ in calls] == ["register", "unregister"]
    info = calls[0][1]
    assert info.name == f"kiosk-abc123.{SERVICE_TYPE}"
    assert info.port == 5000 and info.parsed_addresses() == ["198.18.0.2"]
    parsed = NodeRecord.from_txt(info.properties, addresses=info.parsed_addresses(), port=info.port)
    assert parsed.model_copy(update={"addresses": ()}) == record()


def test_updates_are_rate_limited_and_coalesced_to_the_latest() -> None:
    async def scenario() -> list[tuple[str, Any]]:
        zc = FakeZeroconf()
        announcer = MulticastAnnouncer(
            addresses=["198.18.0.2"],
            min_update_interval_s=0.2,
            zeroconf=zc,  # type: ignore[arg-type]
        )
        await announcer.start(record())
        await announcer.update(record())  # unchanged: nothing sent
        for load in (10, 20, 30, 40):
            await announcer.update(record(load))
        assert [kind for kind, _ in zc.calls] == ["register"]  # inside the interval
        await asyncio.sleep(0.3)
        assert announcer.record == record(40)
        await announcer.update(record(50))  # interval passed since the last send: held again
        await asyncio.sleep(0.3)
        await announcer.stop()
        return zc.calls

    calls = run(scenario())
    assert [kind for kind, _ in calls] == ["register", "update", "update", "unregister"]
    loads = [info.properties[b"ld"] for kind, info in calls if kind == "update"]
    assert loads == [b"40", b"50"]


def test_stop_drops_a_pending_update() -> None:
    async def scenario() -> list[str]:
        zc = FakeZeroconf()
        announcer = MulticastAnnouncer(
            addresses=["198.18.0.2"],
            min_update_interval_s=5,
            zeroconf=zc,  # type: ignore[arg-type]
        )
        await announcer.start(record())
        await announcer.update(record(90))
        await announcer.stop()
        return [kind for kind, _ in zc.calls]

    assert run(scenario()) == ["register", "unregister"]


def test_throttle_with_an_injected_clock() -> None:
    now = [100.0]
    throttle = UpdateThrottle(2.0, clock=lambda: now[0])
    assert throttle.delay_s() == 0.0
    throttle.mark_sent()
    now[0] = 100.5
    assert throttle.delay_s() == pytest.approx(1.5)
    now[0] = 103.0
    assert throttle.delay_s() == 0.0


def test_instance_name_is_one_dns_label_at_most_63_bytes() -> None:
    name = service_instance_name(
        record(name=("a very long name with spaces/and slashes " * 3)[:63])
    )
    label = name.removesuffix(f".{SERVICE_TYPE}")
    assert len(label) <= 63 and label.endswith("-abc123") and "/" not in label and " " not in label


def test_incarnations_differ() -> None:
    assert len({new_incarnation() for _ in range(50)}) == 50


def test_record_from_describe_summarises_without_secrets() -> None:
    reply = node_pb2.DescribeResponse(
        node=node_pb2.NodeInfo(
            node_id="abc123",
            name="kiosk",
            cluster="store",
            protocol_version=1,
            labels={"api_key": "hunter2"},
        ),
        hardware=node_pb2.Hardware(
            logical_cores=8,
            memory_total_bytes=16_000_000_000,
            gpus=[node_pb2.Gpu(vendor="NVIDIA")],
            onnx_providers=["CPUExecutionProvider"],
        ),
        models=[
            node_pb2.ModelInfo(
                model_id="smollm2",
                state=node_pb2.MODEL_STATE_READY,
                source="/secret/path/model.gguf",
            ),
            node_pb2.ModelInfo(model_id="loading", state=node_pb2.MODEL_STATE_LOADING),
        ],
        load=node_pb2.Load(in_flight=1, queued=1),
        capacity=node_pb2.Capacity(max_concurrent=4, max_queued=8),
    )
    rec = record_from_describe(reply, grpc_port=6000, incarnation="beef")
    assert (rec.node_id, rec.name, rec.cluster, rec.grpc_port) == ("abc123", "kiosk", "store", 6000)
    assert rec.models == ("smollm2",)
    assert (rec.cores, rec.ram_gb, rec.accelerators) == (8, 16.0, ("nvidia",))
    assert (rec.load_percent, rec.capacity) == (50, 4)
    txt = b"".join(k + v for k, v in rec.to_txt().items())
    assert b"hunter2" not in txt and b"/secret" not in txt
