"""The registry's state machine, driven with a fake clock and fake probe results (no sockets)."""

from __future__ import annotations

import logging

import pytest

from mesh.core.ids import NodeId
from mesh.core.records import NodeRecord
from mesh.node_table import (
    Discard,
    EventKind,
    NodeDetails,
    NodeTable,
    Probe,
    ProbeResult,
    ProbeStatus,
    RegistryTimings,
    Rejection,
    StartWatch,
    Step,
    StopWatch,
)
from mesh.nodes_view import NodeSource, NodeState

pytestmark = pytest.mark.unit

KEY = "kiosk-1-n1._edgemesh._tcp.local."
ADDRESS = "198.18.0.2:50051"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def record(
    node_id: str = "n1",
    *,
    incarnation: str = "aa",
    cluster: str = "home",
    host: str = "198.18.0.2",
    port: int = 50051,
) -> NodeRecord:
    return NodeRecord(
        node_id=NodeId(node_id),
        name=f"name-{node_id}",
        cluster=cluster,
        grpc_port=port,
        incarnation=incarnation,
        models=("smollm2",),
        cores=4,
        ram_gb=8.0,
        capacity=2,
        addresses=(host,),
    )


def ok(
    node_id: str = "n1", *, in_flight: int = 0, cluster: str = "home", protocol: int = 1
) -> ProbeResult:
    details = NodeDetails(
        node_id=NodeId(node_id),
        name=f"name-{node_id}",
        cluster=cluster,
        protocol_version=protocol,
        models=("smollm2",),
        in_flight=in_flight,
        max_concurrent=2,
        cores=4,
    )
    return ProbeResult(status=ProbeStatus.OK, details=details)


UNREACHABLE = ProbeResult(status=ProbeStatus.UNREACHABLE, reason="connection refused")
TIMEOUT = ProbeResult(status=ProbeStatus.TIMEOUT, reason="slow")
NOT_SERVING = ProbeResult(status=ProbeStatus.NOT_SERVING, reason="health NOT_SERVING")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def table(clock: FakeClock) -> NodeTable:
    timings = RegistryTimings(
        health_interval_s=2.0,
        retry_initial_s=0.25,
        retry_max_s=2.0,
        join_timeout_s=10.0,
        suspect_timeout_s=3.0,
        forget_after_s=60.0,
    )
    return NodeTable(clock=clock, timings=timings, cluster="home")


def probes(step: Step) -> list[Probe]:
    return [a for a in step.actions if isinstance(a, Probe)]


def kinds(step: Step) -> list[EventKind]:
    return [e.kind for e in step.events]


def advertise(table: NodeTable, rec: NodeRecord | None = None, key: str = KEY) -> Step:
    rec = rec or record()
    return table.advertise(key, address=rec.address, source=NodeSource.MDNS, record=rec)


def make_ready(table: NodeTable, rec: NodeRecord | None = None, key: str = KEY) -> int:
    step = advertise(table, rec, key)
    (probe,) = probes(step)
    done = table.probe_done(key, probe.epoch, ok(rec.node_id if rec else "n1"))
    assert kinds(done) == [EventKind.READY]
    return probe.epoch


def test_advertised_node_joins_then_becomes_ready_after_a_probe(table: NodeTable) -> None:
    step = advertise(table)
    assert kinds(step) == [EventKind.JOINING]
    assert [(p.key, p.address) for p in probes(step)] == [(KEY, ADDRESS)]
    assert table.state_of(KEY) is NodeState.JOINING

    done = table.probe_done(KEY, probes(step)[0].epoch, ok())
    assert kinds(done) == [EventKind.READY]
    assert any(isinstance(a, StartWatch) for a in done.actions)
    (view,) = table.snapshot()
    assert (view.node_id, view.state, view.address, view.max_concurrent) == (
        "n1",
        NodeState.READY,
        ADDRESS,
        2,
    )


def test_never_ready_without_a_successful_probe(table: NodeTable, clock: FakeClock) -> None:
    step = advertise(table)
    epoch = probes(step)[0].epoch
    table.probe_done(KEY, epoch, UNREACHABLE)
    for _ in range(44):
        clock.advance(0.25)
        for probe in probes(table.tick()):
            table.probe_done(KEY, probe.epoch, UNREACHABLE)
    assert table.state_of(KEY) is NodeState.GONE  # join_timeout_s passed
    assert all(v.state is not NodeState.READY for v in table.snapshot())


def test_joining_retries_back_off(table: NodeTable, clock: FakeClock) -> None:
    epoch = probes(advertise(table))[0].epoch
    table.probe_done(KEY, epoch, UNREACHABLE)
    times = []
    for _ in range(80):
        clock.advance(0.05)
        for probe in probes(table.tick()):
            times.append(clock.now)
            table.probe_done(KEY, probe.epoch, UNREACHABLE)
    gaps = [round(b - a, 2) for a, b in zip(times, times[1:], strict=False)]
    assert gaps[:2] == [pytest.approx(0.5, abs=0.06), pytest.approx(1.0, abs=0.06)]
    assert max(gaps) <= 2.06


def test_broken_watch_makes_suspect_then_unreachable_probe_makes_gone(table: NodeTable) -> None:
    epoch = make_ready(table)
    broken = table.watch_broken(KEY, epoch, "UNAVAILABLE")
    assert kinds(broken) == [EventKind.SUSPECT]
    (probe,) = probes(broken)
    gone = table.probe_done(KEY, probe.epoch, UNREACHABLE)
    assert kinds(gone) == [EventKind.GONE]
    assert any(isinstance(a, Discard) for a in gone.actions)
    assert table.snapshot()[0].state is NodeState.GONE


def test_suspect_node_that_answers_is_ready_again(table: NodeTable) -> None:
    epoch = make_ready(table)
    (probe,) = probes(table.watch_broken(KEY, epoch, "stream ended"))
    back = table.probe_done(KEY, probe.epoch, ok())
    assert kinds(back) == [EventKind.READY]
    assert any(isinstance(a, StartWatch) for a in back.actions)


def test_slow_node_is_suspect_not_gone_until_suspect_timeout(
    table: NodeTable, clock: FakeClock
) -> None:
    epoch = make_ready(table)
    (probe,) = probes(table.watch_broken(KEY, epoch, "DEADLINE"))
    assert kinds(table.probe_done(KEY, probe.epoch, TIMEOUT)) == []
    assert table.state_of(KEY) is NodeState.SUSPECT
    clock.advance(2.0)
    for p in probes(table.tick()):
        table.probe_done(KEY, p.epoch, TIMEOUT)
    assert table.state_of(KEY) is NodeState.SUSPECT
    clock.advance(1.5)
    assert kinds(table.tick()) == [EventKind.GONE]


def test_not_serving_on_the_watch_is_suspect_at_once(table: NodeTable) -> None:
    epoch = make_ready(table)
    step = table.watch_status(KEY, epoch, serving=False)
    assert kinds(step) == [EventKind.SUSPECT]
    assert table.watch_status(KEY, epoch, serving=True).actions  # probes again


def test_goodbye_is_gone_immediately_and_forgotten_later(
    table: NodeTable, clock: FakeClock
) -> None:
    make_ready(table)
    step = table.withdraw(KEY)
    assert kinds(step) == [EventKind.GONE]
    assert step.events[0].reason == "left"
    assert any(isinstance(a, StopWatch) for a in step.actions)
    clock.advance(30)
    assert probes(table.tick()) == []  # a node that said goodbye is not probed
    clock.advance(31)
    table.tick()
    assert table.snapshot() == []


def test_periodic_refresh_updates_load(table: NodeTable, clock: FakeClock) -> None:
    make_ready(table)
    clock.advance(1.0)
    assert probes(table.tick()) == []
    clock.advance(1.1)
    (refresh,) = probes(table.tick())
    assert refresh.refresh
    step = table.probe_done(KEY, refresh.epoch, ok(in_flight=2))
    assert kinds(step) == [EventKind.UPDATED]
    assert table.snapshot()[0].in_flight == 2
    clock.advance(2.1)
    (refresh,) = probes(table.tick())
    assert kinds(table.probe_done(KEY, refresh.epoch, ok(in_flight=2))) == []  # no change


def test_refresh_that_finds_the_node_unreachable_suspects_and_confirms(
    table: NodeTable, clock: FakeClock
) -> None:
    make_ready(table)
    clock.advance(2.1)
    (refresh,) = probes(table.tick())
    step = table.probe_done(KEY, refresh.epoch, UNREACHABLE)
    assert kinds(step) == [EventKind.SUSPECT]
    (confirm,) = probes(step)
    assert kinds(table.probe_done(KEY, confirm.epoch, UNREACHABLE)) == [EventKind.GONE]


def test_crashed_node_still_in_the_mdns_cache_is_reprobed_and_comes_back(
    table: NodeTable, clock: FakeClock
) -> None:
    epoch = make_ready(table)
    (probe,) = probes(table.watch_broken(KEY, epoch, "UNAVAILABLE"))
    table.probe_done(KEY, probe.epoch, UNREACHABLE)
    assert table.state_of(KEY) is NodeState.GONE
    clock.advance(0.3)
    (reprobe,) = probes(table.tick())
    assert kinds(table.probe_done(KEY, reprobe.epoch, ok())) == [EventKind.READY]


def test_restart_with_a_new_incarnation_rejoins_at_once(table: NodeTable) -> None:
    epoch = make_ready(table)
    (probe,) = probes(table.watch_broken(KEY, epoch, "UNAVAILABLE"))
    table.probe_done(KEY, probe.epoch, UNREACHABLE)
    step = advertise(table, record(incarnation="bb", port=50099))
    assert kinds(step) == [EventKind.JOINING]
    (probe,) = probes(step)
    assert probe.address == "198.18.0.2:50099"
    assert kinds(table.probe_done(KEY, probe.epoch, ok())) == [EventKind.READY]


def test_results_of_an_old_epoch_are_ignored(table: NodeTable) -> None:
    old = probes(advertise(table))[0].epoch
    new = probes(advertise(table, record(incarnation="bb")))[0].epoch
    assert new != old
    assert table.probe_done(KEY, old, ok()).events == []
    assert table.state_of(KEY) is NodeState.JOINING


def test_same_record_again_does_nothing(table: NodeTable) -> None:
    make_ready(table)
    step = advertise(table)
    assert step.actions == [] and step.events == []


def test_duplicate_node_id_at_another_address_is_rejected_once(
    table: NodeTable, caplog: pytest.LogCaptureFixture
) -> None:
    make_ready(table)
    caplog.set_level(logging.WARNING, logger="mesh.registry")
    other = "impostor-n1._edgemesh._tcp.local."
    step = advertise(table, record(host="198.18.0.9"), key=other)
    assert step.events == [] and probes(step) == []
    assert table.rejection_of(other) is Rejection.DUPLICATE
    advertise(table, record(host="198.18.0.9", incarnation="cc"), key=other)
    assert len([r for r in caplog.records if "duplicate" in r.getMessage()]) == 1
    assert [v.address for v in table.snapshot()] == [ADDRESS]


def test_duplicate_is_admitted_once_the_holder_is_gone(table: NodeTable, clock: FakeClock) -> None:
    make_ready(table)
    other = "moved-n1._edgemesh._tcp.local."
    advertise(table, record(host="198.18.0.9"), key=other)
    clock.advance(5.0)
    # The holder is alive: it is refreshed, the duplicate is left alone.
    assert [p.key for p in probes(table.tick())] == [KEY]
    table.withdraw(KEY)
    (probe,) = probes(table.tick())
    assert probe.key == other
    assert kinds(table.probe_done(other, probe.epoch, ok())) == [EventKind.READY]


def test_a_duplicate_admitted_late_gets_a_fresh_join_timeout(
    table: NodeTable, clock: FakeClock
) -> None:
    make_ready(table)
    other = "moved-n1._edgemesh._tcp.local."
    advertise(table, record(host="198.18.0.9"), key=other)
    clock.advance(20.0)  # longer than join_timeout_s: the holder lived a while
    table.withdraw(KEY)
    step = table.tick()
    assert kinds(step) == [EventKind.JOINING]
    (probe,) = probes(step)
    table.probe_done(other, probe.epoch, TIMEOUT)
    clock.advance(0.2)
    assert kinds(table.tick()) == []  # still joining, not gone at once
    assert table.state_of(other) is NodeState.JOINING


def test_wrong_cluster_in_the_record_is_never_probed(table: NodeTable) -> None:
    step = advertise(table, record(cluster="elsewhere"))
    assert step.actions == [] and step.events == []
    assert table.snapshot() == []
    assert table.rejection_of(KEY) is Rejection.CLUSTER


def test_registry_without_a_cluster_accepts_every_cluster(clock: FakeClock) -> None:
    table = NodeTable(clock=clock)
    assert probes(advertise(table, record(cluster="elsewhere")))


def test_node_answering_with_another_identity_is_rejected(table: NodeTable) -> None:
    (probe,) = probes(advertise(table))
    step = table.probe_done(KEY, probe.epoch, ok("someone-else"))
    assert kinds(step) == [EventKind.GONE]
    assert table.rejection_of(KEY) is Rejection.IDENTITY
    assert table.snapshot() == []


def test_node_with_another_protocol_version_is_rejected(table: NodeTable) -> None:
    (probe,) = probes(advertise(table))
    table.probe_done(KEY, probe.epoch, ok(protocol=7))
    assert table.rejection_of(KEY) is Rejection.PROTOCOL


def test_static_node_appears_only_after_its_first_answer(table: NodeTable) -> None:
    key = "static:198.18.0.5:7000"
    step = table.advertise(key, address="198.18.0.5:7000", source=NodeSource.STATIC)
    assert step.events == [] and table.snapshot() == []
    (probe,) = probes(step)
    assert kinds(table.probe_done(key, probe.epoch, ok("s1"))) == [EventKind.READY]
    (view,) = table.snapshot()
    assert (view.node_id, view.source) == ("s1", NodeSource.STATIC)


def test_static_and_mdns_views_of_one_node_merge_quietly(table: NodeTable) -> None:
    key = f"static:{ADDRESS}"
    (probe,) = probes(table.advertise(key, address=ADDRESS, source=NodeSource.STATIC))
    table.probe_done(key, probe.epoch, ok())
    step = advertise(table)
    assert step.events == [] and probes(step) == []
    assert len(table.snapshot()) == 1


def test_node_seen_on_mdns_first_then_listed_statically_is_not_reprobed_every_tick(
    table: NodeTable, clock: FakeClock
) -> None:
    make_ready(table)
    static = f"static:{ADDRESS}"
    (probe,) = probes(table.advertise(static, address=ADDRESS, source=NodeSource.STATIC))
    assert table.probe_done(static, probe.epoch, ok()).events == []
    assert table.rejection_of(static) is Rejection.DUPLICATE
    static_probes = 0
    for _ in range(100):  # 10 s of ticks at 100 ms
        clock.advance(0.1)
        for p in probes(table.tick()):
            if p.key == static:
                static_probes += 1
            else:
                table.probe_done(p.key, p.epoch, ok())  # the mDNS entry's load refreshes
    assert static_probes == 0
    assert [(v.address, v.source, v.state) for v in table.snapshot()] == [
        (ADDRESS, NodeSource.MDNS, NodeState.READY)
    ]


def test_static_view_takes_over_when_the_mdns_one_says_goodbye(
    table: NodeTable, clock: FakeClock
) -> None:
    make_ready(table)
    static = f"static:{ADDRESS}"
    (probe,) = probes(table.advertise(static, address=ADDRESS, source=NodeSource.STATIC))
    table.probe_done(static, probe.epoch, ok())
    table.withdraw(KEY)  # the node stopped advertising but still serves
    clock.advance(0.3)
    (again,) = [p for p in probes(table.tick()) if p.key == static]
    assert kinds(table.probe_done(static, again.epoch, ok())) == [EventKind.READY]
    assert table.view(static) is not None and table.view(static).source is NodeSource.STATIC


def test_quiet_duplicate_backs_off_while_the_holder_flaps(
    table: NodeTable, clock: FakeClock
) -> None:
    """Holder gone, duplicate re-probed, holder back first: the retries space out."""
    make_ready(table)
    static = f"static:{ADDRESS}"
    (probe,) = probes(table.advertise(static, address=ADDRESS, source=NodeSource.STATIC))
    table.probe_done(static, probe.epoch, ok())
    times = []
    for _ in range(200):
        clock.advance(0.1)
        table.withdraw(KEY)
        for p in probes(table.tick()):
            assert p.key == static
            times.append(clock.now)
            advertise(table, record(incarnation=f"{len(times):x}"))  # the holder is back
            table.probe_done(static, p.epoch, ok())  # ... so the static view is a duplicate
    gaps = [round(b - a, 1) for a, b in zip(times, times[1:], strict=False)]
    assert gaps[:3] == [0.5, 1.0, 2.0] and len(times) < 15


def test_multi_homed_node_is_probed_at_each_address_in_order_and_followed_where_it_answers(
    table: NodeTable, clock: FakeClock
) -> None:
    rec = record().model_copy(update={"addresses": ("172.17.0.1", "198.18.0.2", "10.8.0.5")})
    (probe,) = probes(advertise(table, rec))
    assert probe.address == "172.17.0.1:50051"
    assert probe.candidates == ("172.17.0.1:50051", "198.18.0.2:50051", "10.8.0.5:50051")
    assert probe.node_id == "n1"
    answered = ok().model_copy(update={"address": "198.18.0.2:50051"})
    done = table.probe_done(KEY, probe.epoch, answered)
    assert kinds(done) == [EventKind.READY]
    (watch,) = [a for a in done.actions if isinstance(a, StartWatch)]
    assert watch.address == "198.18.0.2:50051"
    assert table.snapshot()[0].address == "198.18.0.2:50051"
    # Refreshes go to the address that answered, and only there.
    clock.advance(2.1)
    (refresh,) = probes(table.tick())
    assert (refresh.address, refresh.candidates) == ("198.18.0.2:50051", ())
    table.probe_done(KEY, refresh.epoch, ok())
    # The same addresses in another order are not a move (no re-probe, no new epoch).
    shuffled = rec.model_copy(update={"addresses": ("10.8.0.5", "172.17.0.1", "198.18.0.2")})
    assert advertise(table, shuffled).actions == []
    # A crash is confirmed where it answered (a refusal there is proof; others could only
    # time out); once gone, it is looked for there first, then at the others.
    (confirm,) = probes(table.watch_broken(KEY, refresh.epoch, "UNAVAILABLE"))
    assert (confirm.address, confirm.candidates) == ("198.18.0.2:50051", ())
    assert kinds(table.probe_done(KEY, confirm.epoch, UNREACHABLE)) == [EventKind.GONE]
    clock.advance(0.3)
    (again,) = probes(table.tick())
    assert again.candidates == ("198.18.0.2:50051", "10.8.0.5:50051", "172.17.0.1:50051")


def test_node_that_moves_to_other_addresses_has_its_old_channels_discarded(
    table: NodeTable,
) -> None:
    make_ready(table)
    step = advertise(table, record(host="198.18.0.7"))
    assert any(isinstance(a, Discard) for a in step.actions)
    (probe,) = probes(step)
    assert probe.address == "198.18.0.7:50051"


def test_static_node_is_reprobed_forever_while_gone(table: NodeTable, clock: FakeClock) -> None:
    key = "static:198.18.0.5:7000"
    (probe,) = probes(table.advertise(key, address="198.18.0.5:7000", source=NodeSource.STATIC))
    table.probe_done(key, probe.epoch, UNREACHABLE)
    seen = 0
    for _ in range(400):
        clock.advance(0.25)
        for p in probes(table.tick()):
            seen += 1
            table.probe_done(key, p.epoch, UNREACHABLE)
    assert seen >= 40  # ~100 s at a 2 s cap
    assert key in table.keys()  # noqa: SIM118 (keys() is the table API, not a dict)


def test_not_serving_joiner_waits(table: NodeTable, clock: FakeClock) -> None:
    (probe,) = probes(advertise(table))
    assert table.probe_done(KEY, probe.epoch, NOT_SERVING).events == []
    assert table.state_of(KEY) is NodeState.JOINING
    clock.advance(0.3)
    (again,) = probes(table.tick())
    assert kinds(table.probe_done(KEY, again.epoch, ok())) == [EventKind.READY]


def test_invalid_answer_is_rejected(table: NodeTable) -> None:
    (probe,) = probes(advertise(table))
    table.probe_done(KEY, probe.epoch, ProbeResult(status=ProbeStatus.INVALID, reason="x"))
    assert table.rejection_of(KEY) is Rejection.INVALID and table.snapshot() == []


def test_view_before_describe_comes_from_the_record(table: NodeTable) -> None:
    advertise(table)
    (view,) = table.snapshot()
    assert (view.name, view.models, view.cores, view.max_concurrent, view.state) == (
        "name-n1",
        ("smollm2",),
        4,
        2,
        NodeState.JOINING,
    )


def test_the_view_says_which_model_file_each_model_is(table: NodeTable) -> None:
    """Describe's per-model sha256 and default model reach the view the coordinator routes on,
    so it knows which nodes can continue an answer from its token ids."""
    from edgemesh.v1 import node_pb2
    from mesh.health import details_from_describe

    ready, loading = node_pb2.MODEL_STATE_READY, node_pb2.MODEL_STATE_LOADING
    reply = node_pb2.DescribeResponse(
        node=node_pb2.NodeInfo(node_id="n1", name="name-n1", cluster="home", protocol_version=1),
        models=[
            node_pb2.ModelInfo(model_id="smollm2", state=ready, is_default=True, sha256="f00d"),
            node_pb2.ModelInfo(model_id="big", state=loading, sha256="beef"),
            node_pb2.ModelInfo(model_id="upstream", state=ready),  # no file: no hash
        ],
    )
    step = advertise(table)
    result = ProbeResult(status=ProbeStatus.OK, details=details_from_describe(reply))
    table.probe_done(KEY, probes(step)[0].epoch, result)
    (view,) = table.snapshot()
    assert view.model_hashes == {"smollm2": "f00d"}
    assert view.model_hash(None) == view.model_hash("smollm2") == "f00d"
    assert view.model_hash("upstream") == ""
