"""Failover off loopback: three real nodes in network namespaces, found by the coordinator by
mDNS alone (no static list), a load driver next to the coordinator (tests/netns_mesh.py).

- Under load (60 tasks, 8 in flight) one node's cable is pulled (its veth down: no reset, no
  goodbye). Every task is answered, each ran to completion once by the nodes' own counts
  (tests/exactly_once.py), and the tasks in flight on the cut node moved on before the
  coordinator declared the node gone: on the link's keepalive (mesh.core.channels.
  NODE_LINK_OPTIONS), not on the registry's bound. Timings: bench/bench_link_loss.py.
- A node whose cable is back, and a node killed and restarted, are used again.

Ray starts once for the module (2 CPUs), inside the coordinator's namespace.
"""

from __future__ import annotations

import pathlib
import time
from collections import Counter, defaultdict

import pytest

from tests.exactly_once import LostWindow, check_exactly_once
from tests.netns import skip_reason
from tests.netns_mesh import NetnsMesh, cut_under_load

pytestmark = [pytest.mark.e2e, pytest.mark.ray, pytest.mark.timeout(900)]

TASKS = 60
CONCURRENCY = 8


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    directory: pathlib.Path = tmp_path_factory.mktemp("netns-mesh")
    with NetnsMesh.create(directory, nodes=3) as mesh:
        yield mesh
        log = mesh.coordinator_log()
    assert "Traceback" not in log, log[-3000:]


def _texts_by_question(answered: list[dict]) -> dict[int, set[str]]:
    texts: dict[int, set[str]] = defaultdict(set)
    for event in answered:
        texts[event["index"] % 4].add(event["text"])
    return texts


def test_a_cable_pulled_under_load_moves_the_tasks_in_flight_and_each_runs_once(mesh):
    report = cut_under_load(mesh, tasks=TASKS, concurrency=CONCURRENCY, cut_after=12, prefix="cut")
    print("\n" + report.summary())
    assert not report.failed, report.failed[:3]
    assert len({e["task_id"] for e in report.answered}) == TASKS  # every task answered, once
    for question, texts in _texts_by_question(report.answered).items():
        assert len(texts) == 1, (question, texts)  # temperature 0: one answer, whoever gave it
    assert report.rerouted_s, "the cut hit no task in flight on the node"
    # The tasks in flight moved on the link's keepalive, well before the registry's verdict.
    assert max(report.rerouted_s) < report.gone_after_s, report.summary()
    assert all(e["attempts"][-1][1] == 1 for e in report.answered)  # each ends with an OK

    # The nodes' own counts, every node asked in its namespace once the cable is back: each
    # task completed once, on the node the coordinator says answered. The cut node may have
    # finished tasks that it could no longer deliver while cut off (the coordinator rightly ran
    # them again elsewhere): those alone are excused, and reported.
    lost = [LostWindow(report.node, report.cut_unix_s, report.back_unix_s)]
    counts = [node.counts() for node in mesh.nodes]
    task_ids = [e["task_id"] for e in report.answered]
    verdict = check_exactly_once(task_ids, counts, lost=lost)
    for event in report.answered:
        assert event["node"] in verdict.completed_on[event["task_id"]], event
    print(
        f"nodes' own counts: {len(task_ids)} tasks completed once; finished by the cut node "
        f"with no one left to receive them: {len(verdict.excused)}"
    )


def test_a_node_whose_cable_is_back_or_that_restarted_is_used_again(mesh):
    watch = mesh.load(tasks=0, prefix="watch", linger_s=300)
    try:
        cable, restart = mesh.nodes[0], mesh.nodes[1]
        cable.host.set_link(up=False)
        watch.wait_state(cable.name, "gone", timeout_s=30)
        plugged = time.monotonic()
        cable.host.set_link(up=True)
        back_s = watch.wait_state(cable.name, "ready", timeout_s=30) - plugged

        old_address = restart.address
        restart.kill()
        watch.wait_state(restart.name, "gone", timeout_s=30)
        started = time.monotonic()
        restart.start()  # same state directory: same node id, a new port, announced by mDNS
        assert restart.address != old_address
        restarted_s = watch.wait_state(restart.name, "ready", timeout_s=60) - started
    finally:
        watch.stop()

    run = mesh.load(tasks=24, concurrency=CONCURRENCY, prefix="again", wait_ready=3)
    run.finish(timeout_s=300)
    assert not run.failed(), run.failed()[:3]
    answered = run.answered()
    by_node = Counter(e["node"] for e in answered)
    print(
        f"\ncable back -> ready {back_s:.2f} s; restart -> ready {restarted_s:.2f} s "
        f"(model load included); answers by node: {dict(by_node)}"
    )
    assert by_node[cable.name] and by_node[restart.name], by_node
    counts = [node.counts() for node in mesh.nodes]
    verdict = check_exactly_once([e["task_id"] for e in answered], counts)
    for name in (cable.name, restart.name):  # and they say so themselves
        assert any(name in on for on in verdict.completed_on.values()), name
    restart.stop()  # this test started that process; each test cleans up its own
