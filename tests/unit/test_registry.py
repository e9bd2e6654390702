"""The registry's mechanism with a fake prober (no sockets): it survives raising subscribers and
probers, tries a multi-homed node's addresses in order, and cleans up when it cannot start."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from mesh.cli import discover
from mesh.core.errors import ConfigError
from mesh.core.ids import NodeId
from mesh.health import probe_in_order
from mesh.node_table import (
    EventKind,
    NodeDetails,
    NodeEvent,
    ProbeResult,
    ProbeStatus,
    RegistryTimings,
)
from mesh.nodes_view import NodeState
from mesh.registry import NodeRegistry, wait_for_state

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

ADDRESS = "198.18.0.2:50051"
TIMINGS = RegistryTimings(
    health_interval_s=0.05,
    probe_timeout_s=0.5,
    retry_initial_s=0.02,
    retry_max_s=0.1,
    suspect_timeout_s=5.0,
    tick_interval_s=0.01,
)


def details(node_id: str = "n1") -> NodeDetails:
    return NodeDetails(node_id=NodeId(node_id), name=node_id, cluster="c", protocol_version=1)


def ok(node_id: str = "n1") -> ProbeResult:
    return ProbeResult(status=ProbeStatus.OK, details=details(node_id))


UNREACHABLE = ProbeResult(status=ProbeStatus.UNREACHABLE, reason="refused")
TIMEOUT = ProbeResult(status=ProbeStatus.TIMEOUT, reason="slow")


class FakeProber:
    """Implements mesh.health.Prober. `answers` maps an address to its result (default OK);
    `probe_errors` / `watch_errors` make the next calls raise, as a buggy prober would."""

    def __init__(self, answers: dict[str, ProbeResult] | None = None) -> None:
        self.answers = answers or {}
        self.probes: list[tuple[str, float]] = []  # (address, timeout_s)
        self.watches = 0
        self.refreshes = 0
        self.probe_errors = 0
        self.watch_errors = 0
        self.closed = False

    async def probe(
        self,
        key: str,
        address: str,
        *,
        timeout_s: float,
        refresh: bool = False,
        node_id: str | None = None,
    ) -> ProbeResult:
        self.probes.append((address, timeout_s))
        self.refreshes += refresh
        if self.probe_errors:
            self.probe_errors -= 1
            raise RuntimeError("prober bug")
        return self.answers.get(address, ok())

    async def watch(self, key: str, address: str, on_status: Callable[[bool], None]) -> str:
        self.watches += 1
        if self.watch_errors:
            self.watch_errors -= 1
            raise RuntimeError("watch bug")
        await asyncio.Event().wait()
        return "never"

    async def discard(self, key: str) -> None:
        return None

    async def close(self) -> None:
        self.closed = True


def run(make: Callable[[], Awaitable[Any]]) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(make(), 20)

    return asyncio.run(bounded())


async def eventually(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


def test_a_raising_subscriber_stops_neither_events_nor_refreshes() -> None:
    async def scenario() -> None:
        prober = FakeProber()
        registry = NodeRegistry(timings=TIMINGS, static_addresses=[ADDRESS], prober=prober)
        seen: list[NodeEvent] = []

        def broken(event: NodeEvent) -> None:
            raise RuntimeError("subscriber bug")

        registry.subscribe(broken)
        registry.subscribe(seen.append)
        async with registry:
            await wait_for_state(registry, "n1", NodeState.READY, timeout_s=5)
            assert [e.kind for e in seen] == [EventKind.READY]
            # The tick loop still refreshes the node (it would die with an unguarded callback)...
            before = prober.refreshes
            await eventually(lambda: prober.refreshes >= before + 3)
            # ... and still moves it: a refresh that finds nothing makes it suspect, then gone.
            prober.answers[ADDRESS] = UNREACHABLE
            await wait_for_state(registry, "n1", NodeState.GONE, timeout_s=5)
        assert [e.kind for e in seen] == [EventKind.READY, EventKind.SUSPECT, EventKind.GONE]

    run(scenario)


def test_a_probe_that_raises_is_a_failed_probe_and_the_node_is_probed_again() -> None:
    async def scenario() -> None:
        prober = FakeProber()
        prober.probe_errors = 2
        async with NodeRegistry(
            timings=TIMINGS, static_addresses=[ADDRESS], prober=prober
        ) as registry:
            await wait_for_state(registry, "n1", NodeState.READY, timeout_s=5)
        assert len(prober.probes) >= 3

    run(scenario)


def test_a_watch_that_raises_makes_the_node_suspect_and_is_started_again() -> None:
    async def scenario() -> None:
        prober = FakeProber()
        prober.watch_errors = 1
        events: list[EventKind] = []
        registry = NodeRegistry(
            timings=TIMINGS.model_copy(update={"health_interval_s": 60.0}),
            static_addresses=[ADDRESS],
            prober=prober,
        )
        registry.subscribe(lambda event: events.append(event.kind))
        async with registry:
            await eventually(lambda: prober.watches >= 2)
            await wait_for_state(registry, "n1", NodeState.READY, timeout_s=5)
            assert len(registry._watches) == 1  # the second watch runs; the first is forgotten
        # Without a refresh for 60 s, only the broken watch can have made it suspect.
        assert events[:3] == [EventKind.READY, EventKind.SUSPECT, EventKind.READY]

    run(scenario)


class ChannelClosingProber(FakeProber):
    """Like GrpcProber: a probe in flight when its entry is discarded (its channel closed)
    raises CancelledError, though nobody cancelled the task awaiting it. While `silent`,
    probes get no answer until their deadline (a cable pulled)."""

    def __init__(self) -> None:
        super().__init__()
        self.silent = False
        self.in_flight: set[asyncio.Future[None]] = set()

    async def probe(
        self,
        key: str,
        address: str,
        *,
        timeout_s: float,
        refresh: bool = False,
        node_id: str | None = None,
    ) -> ProbeResult:
        if not self.silent:
            return await super().probe(key, address, timeout_s=timeout_s, refresh=refresh)
        self.probes.append((address, timeout_s))
        answer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.in_flight.add(answer)
        try:
            await asyncio.wait_for(answer, timeout_s)
        except TimeoutError:
            return TIMEOUT
        finally:
            self.in_flight.discard(answer)
        return ok()

    async def discard(self, key: str) -> None:
        for answer in list(self.in_flight):
            answer.cancel()


def test_a_node_gone_while_probed_is_probed_again_and_comes_back() -> None:
    """A cable pulled, then plugged in again: the node goes gone while a probe is in flight
    (its channel is closed under it), and must still be found again."""

    async def scenario() -> None:
        prober = ChannelClosingProber()
        timings = TIMINGS.model_copy(update={"suspect_timeout_s": 0.3, "probe_timeout_s": 0.5})
        async with NodeRegistry(
            timings=timings, static_addresses=[ADDRESS], prober=prober
        ) as registry:
            await wait_for_state(registry, "n1", NodeState.READY, timeout_s=5)
            prober.silent = True
            await wait_for_state(registry, "n1", NodeState.GONE, timeout_s=5)
            prober.silent = False
            await wait_for_state(registry, "n1", NodeState.READY, timeout_s=5)

    run(scenario)


class FailingBrowser:
    """An MdnsBrowser whose interface is unusable."""

    stopped = False

    async def start(self) -> None:
        raise ConfigError("cannot listen for mDNS on 198.51.100.7: No such device")

    async def stop(self) -> None:
        self.stopped = True


def test_a_browser_that_cannot_start_leaves_no_task_behind() -> None:
    async def scenario() -> None:
        baseline = asyncio.all_tasks()
        prober = FakeProber()
        browser = FailingBrowser()
        registry = NodeRegistry(
            timings=TIMINGS,
            static_addresses=[ADDRESS],
            browser=browser,  # type: ignore[arg-type]
            prober=prober,
        )
        with pytest.raises(ConfigError, match="198.51.100.7"):
            await registry.start()
        await asyncio.sleep(0.05)  # a leaked tick task would probe by now
        assert registry._tasks == set() and registry._watches == {}
        assert asyncio.all_tasks() == baseline
        assert prober.probes == [] and prober.closed

    run(scenario)


# ---------------------------------------------------------------- multi-homed nodes


def test_addresses_are_tried_in_order_until_one_answers_as_the_node() -> None:
    prober = FakeProber(
        {
            "172.17.0.1:50051": ok("someone-else"),  # docker0: another node answers there
            "10.8.0.5:50051": UNREACHABLE,  # a VPN address that does not route here
            "198.18.0.2:50051": ok("n1"),
            "198.18.0.3:50051": ok("n1"),
        }
    )
    order = ("172.17.0.1:50051", "10.8.0.5:50051", "198.18.0.2:50051", "198.18.0.3:50051")
    result = run(lambda: probe_in_order(prober, "k", order, node_id="n1", timeout_s=0.3))
    assert result.status is ProbeStatus.OK and result.address == "198.18.0.2:50051"
    assert prober.probes == [(a, 0.3) for a in order[:3]]  # stops at the first right answer


def test_without_a_known_id_the_first_answer_wins() -> None:
    prober = FakeProber({"a:1": UNREACHABLE, "b:1": ok("x")})
    result = run(lambda: probe_in_order(prober, "k", ("a:1", "b:1"), node_id=None, timeout_s=1))
    assert (result.status, result.address) == (ProbeStatus.OK, "b:1")


@pytest.mark.parametrize(
    ("answers", "expected", "address"),
    [
        ((UNREACHABLE, TIMEOUT, UNREACHABLE), ProbeStatus.TIMEOUT, "b:1"),  # slow is not dead
        ((UNREACHABLE, UNREACHABLE, UNREACHABLE), ProbeStatus.UNREACHABLE, "a:1"),
        ((ok("other"), UNREACHABLE, UNREACHABLE), ProbeStatus.UNREACHABLE, "b:1"),
        ((ok("other"), ok("other"), ok("other")), ProbeStatus.OK, "a:1"),  # an impostor
    ],
)
def test_when_no_address_answers_as_the_node_the_most_alive_failure_is_reported(
    answers: tuple[ProbeResult, ...], expected: ProbeStatus, address: str
) -> None:
    addresses = ("a:1", "b:1", "c:1")
    prober = FakeProber(dict(zip(addresses, answers, strict=True)))
    result = run(lambda: probe_in_order(prober, "k", addresses, node_id="n1", timeout_s=1))
    assert (result.status, result.address) == (expected, address)
    assert len(prober.probes) == 3


def test_the_registry_probes_a_multi_homed_node_with_the_short_per_address_deadline() -> None:
    async def scenario() -> None:
        from mesh.core.records import NodeRecord
        from mesh.discovery.browser import DiscoveryEvent, DiscoveryKind

        record = NodeRecord(
            node_id=NodeId("n1"),
            name="n1",
            cluster="c",
            grpc_port=50051,
            incarnation="ab",
            addresses=("172.17.0.1", "198.18.0.2"),
        )
        prober = FakeProber({"172.17.0.1:50051": UNREACHABLE})
        timings = TIMINGS.model_copy(update={"address_timeout_s": 0.2, "health_interval_s": 60})
        async with NodeRegistry(timings=timings, prober=prober) as registry:
            registry.handle_discovery(
                DiscoveryEvent(kind=DiscoveryKind.ADDED, name="n1._edgemesh._tcp", record=record)
            )
            view = await wait_for_state(registry, "n1", NodeState.READY, timeout_s=5)
        assert view.address == "198.18.0.2:50051"
        assert prober.probes == [("172.17.0.1:50051", 0.2), ("198.18.0.2:50051", 0.2)]

    run(scenario)


def test_a_refused_record_is_never_probed_and_a_revoked_node_is_dropped(caplog) -> None:
    """In a cluster: `admit` refuses a record before any probe (logged once); `evict` drops
    a ready node at once (a revocation)."""

    async def scenario() -> None:
        from mesh.core.records import NodeRecord
        from mesh.discovery.browser import DiscoveryEvent, DiscoveryKind

        def record(node_id: str, fp: str = "") -> NodeRecord:
            return NodeRecord(
                node_id=NodeId(node_id),
                name=node_id,
                cluster="c",
                grpc_port=50051,
                incarnation="ab",
                cert_fingerprint=fp,
                addresses=(f"198.18.0.{len(node_id)}",),
            )

        def admit(candidate: NodeRecord) -> str | None:
            return None if candidate.cert_fingerprint == "a" * 32 else "not a member"

        prober = FakeProber()
        async with NodeRegistry(timings=TIMINGS, prober=prober, admit=admit) as registry:
            for _ in range(3):  # announced again and again: logged once, never probed
                registry.handle_discovery(
                    DiscoveryEvent(kind=DiscoveryKind.ADDED, name="rogue", record=record("rg"))
                )
            registry.handle_discovery(
                DiscoveryEvent(kind=DiscoveryKind.ADDED, name="m", record=record("n1", "a" * 32))
            )
            await wait_for_state(registry, "n1", NodeState.READY, timeout_s=5)
            assert [a for a, _ in prober.probes] == ["198.18.0.2:50051"]
            assert registry.evict({"n1"}, "revoked") == 1
            assert [v.node_id for v in registry.ready_nodes()] == []
        refusals = [r for r in caplog.records if "ignoring rogue" in r.getMessage()]
        assert len(refusals) == 1

    run(scenario)


def test_the_txt_record_carries_the_certificate_fingerprint_both_ways() -> None:
    from mesh.core.records import NodeRecord

    record = NodeRecord(
        node_id=NodeId("n1"), name="n1", grpc_port=5, incarnation="ab", cert_fingerprint="f" * 32
    )
    txt = record.to_txt()
    assert txt[b"fp"] == b"f" * 32
    parsed = NodeRecord.from_txt(txt, addresses=("198.18.0.2",), port=5)
    assert parsed.cert_fingerprint == "f" * 32
    open_node = record.model_copy(update={"cert_fingerprint": ""})
    assert b"fp" not in open_node.to_txt()
    with pytest.raises(Exception):  # noqa: B017 - a pydantic error: not hex
        NodeRecord(
            node_id=NodeId("n1"),
            name="n1",
            grpc_port=5,
            incarnation="ab",
            cert_fingerprint="secret!",
        )


# ---------------------------------------------------------------- mesh discover flags


def discover_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mesh")
    discover.register(parser.add_subparsers(dest="command"))
    return parser


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_discover_rejects_a_health_interval_that_is_not_a_positive_number(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        discover_parser().parse_args(["discover", "--health-interval", value])
    assert exit_info.value.code == 2
    assert "--health-interval" in capsys.readouterr().err


def test_discover_health_interval_defaults_to_the_registry_default() -> None:
    args = discover_parser().parse_args(["discover"])
    assert args.health_interval == RegistryTimings().health_interval_s
