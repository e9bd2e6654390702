"""The announcer's record building, naming and rate limiting, with a fake zeroconf (no sockets)."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import pytest

from edgemesh.v1 import node_pb2
from mesh.core.errors import ConfigError
from mesh.core.ids import NodeId
from mesh.core.records import SERVICE_TYPE, NodeRecord
from nodes.announcer import (
    DaemonAnnouncement,
    MulticastAnnouncer,
    UpdateThrottle,
    check_advertisable,
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


# ---------------------------------------------------------------- the daemon's announcement


class FakeServicer:
    """The part of the node servicer the announcement uses: `describe()`, which can fail."""

    def __init__(self, models: tuple[str, ...] = ("smollm2",)) -> None:
        self.models = models
        self.calls = 0
        self.fail_calls: set[int] = set()
        self.in_flight = 0

    def describe(self) -> node_pb2.DescribeResponse:
        self.calls += 1
        if self.calls in self.fail_calls:
            raise RuntimeError("describe bug")
        return node_pb2.DescribeResponse(
            node=node_pb2.NodeInfo(node_id="abc123", name="kiosk", cluster="c"),
            models=[
                node_pb2.ModelInfo(model_id=m, state=node_pb2.MODEL_STATE_READY)
                for m in self.models
            ],
            load=node_pb2.Load(in_flight=self.in_flight),
            capacity=node_pb2.Capacity(max_concurrent=4),
        )


def announcement(
    servicer: FakeServicer, *, interface: str | None = None, zeroconf: Any = None
) -> DaemonAnnouncement:
    daemon = SimpleNamespace(
        config=SimpleNamespace(host="0.0.0.0", interface=interface),
        servicer=servicer,
        port=5000,
        tls=None,  # an open node: no certificate fingerprint in the record
    )
    made = DaemonAnnouncement(daemon, refresh_interval_s=0.02, min_update_interval_s=0.0)  # type: ignore[arg-type]
    if zeroconf is not None:
        made.announcer = MulticastAnnouncer(
            interface_ip=interface,
            addresses=["198.18.0.2"],
            min_update_interval_s=0.0,
            zeroconf=zeroconf,
        )
    return made


def test_refresh_loop_survives_a_failing_refresh_and_stop_does_not_raise(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> list[tuple[str, Any]]:
        zc = FakeZeroconf()
        servicer = FakeServicer()
        made = announcement(servicer, zeroconf=zc)
        await made.start()
        servicer.fail_calls = {servicer.calls + 1, servicer.calls + 2}  # two refreshes fail
        async with asyncio.timeout(5):
            while servicer.calls < 6:
                await asyncio.sleep(0.01)
        servicer.in_flight = 4  # load 100%: the loop must still notice and send it
        async with asyncio.timeout(5):
            while not any(kind == "update" for kind, _ in zc.calls):
                await asyncio.sleep(0.01)
        servicer.fail_calls = {servicer.calls + 1}  # fails again right at shutdown
        await asyncio.sleep(0.05)
        await made.stop()  # must not re-raise the loop's error: the daemon's drain follows
        return zc.calls

    caplog.set_level(logging.INFO, logger="nodes.announcer")
    calls = run(scenario())
    assert [kind for kind, _ in calls] == ["register", "update", "unregister"]
    assert calls[1][1].properties[b"ld"] == b"100"
    tracebacks = [r for r in caplog.records if r.exc_info is not None]
    assert len(tracebacks) >= 1 and "describe bug" in str(tracebacks[0].exc_info[1])
    assert len(tracebacks) <= 2  # logged when it starts failing, not on every iteration


def test_an_interface_name_instead_of_an_ip_is_a_config_error() -> None:
    async def scenario() -> None:
        made = announcement(FakeServicer(), interface="eth0")
        await made.start()

    with pytest.raises(ConfigError) as error:
        run(scenario())
    assert str(error.value) == "--interface takes an IP address of this machine, got 'eth0'"


def test_multicast_announcer_checks_the_interface_before_touching_zeroconf() -> None:
    async def scenario() -> None:
        zc = FakeZeroconf()
        announcer = MulticastAnnouncer(interface_ip="wlan0", zeroconf=zc)  # type: ignore[arg-type]
        try:
            await announcer.start(record())
        finally:
            assert zc.calls == []

    with pytest.raises(ConfigError, match="got 'wlan0'"):
        run(scenario())


@pytest.mark.parametrize("bad", [".hidden", "_private", ":tag", "-dash", "a,b"])
def test_a_model_id_browsers_would_reject_fails_the_start_and_is_named(bad: str) -> None:
    async def scenario() -> list[tuple[str, Any]]:
        zc = FakeZeroconf()
        made = announcement(FakeServicer(models=("smollm2", bad)), zeroconf=zc)
        try:
            await made.start()
        finally:
            await made.stop()
        return zc.calls

    with pytest.raises(ConfigError) as error:
        run(scenario())
    assert f"model id {bad!r} cannot be advertised" in str(error.value)


def test_check_advertisable_accepts_what_browsers_accept() -> None:
    check_advertisable(record().model_copy(update={"models": ("smollm2", "qwen2.5:0.5b-q4")}))
    with pytest.raises(ConfigError, match="agent id '_x'"):
        check_advertisable(record().model_copy(update={"agents": ("_x",)}))


def test_an_update_browsers_would_reject_is_not_sent() -> None:
    async def scenario() -> list[tuple[str, Any]]:
        zc = FakeZeroconf()
        announcer = MulticastAnnouncer(
            addresses=["198.18.0.2"],
            min_update_interval_s=0.0,
            zeroconf=zc,  # type: ignore[arg-type]
        )
        await announcer.start(record())
        await announcer.update(record().model_copy(update={"models": (".late",)}))
        assert announcer.record == record()  # the last good one stays advertised
        await announcer.stop()
        return zc.calls

    assert [kind for kind, _ in run(scenario())] == ["register", "unregister"]


@pytest.mark.parametrize(
    ("host", "interface", "expected"),
    [
        ("0.0.0.0", None, None),
        ("198.18.0.2", None, "198.18.0.2"),
        ("localhost", None, None),  # a host name is not an interface address
        ("0.0.0.0", "198.18.0.3", "198.18.0.3"),
    ],
)
def test_the_interface_comes_from_interface_or_a_specific_host_ip(
    host: str, interface: str | None, expected: str | None
) -> None:
    daemon = SimpleNamespace(config=SimpleNamespace(host=host, interface=interface))
    made = DaemonAnnouncement(daemon)  # type: ignore[arg-type]
    assert made.announcer.interface_ip == expected
