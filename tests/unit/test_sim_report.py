"""A scenario's report (mesh/sim/report.py): percentiles per phase and ingress, the reroute and
not-ready times after each fault as defined there, answered twice and excused from the nodes'
own counts (mesh/sim/counts.py), and the shape of render_text and to_json."""

from __future__ import annotations

import json
import math

from edgemesh.v1 import node_pb2
from mesh.sim.counts import LostWindow, NodeCounts, judge_exactly_once
from mesh.sim.report import (
    AttemptView,
    ExactlyOnce,
    FaultRecord,
    NodeChange,
    Report,
    TaskOutcome,
    fault_figures,
    percentile,
    render_text,
    to_json,
)
from mesh.sim.scenario import Phase


def _task(index, sent, finished, node="a", *, via="grpc", attempts=None, error=""):
    attempts = attempts if attempts is not None else [(node, "ok")]
    return TaskOutcome(
        index=index,
        key=f"k{index}",
        task_id=f"t{index}",
        via=via,
        agent="",
        sent_s=sent,
        finished_s=finished,
        node="" if error else node,
        attempts=tuple(AttemptView(n, o) for n, o in attempts),
        error_kind=error,
        error="it broke" if error else "",
    )


def _fault(label, action, target, issued, done=None, *, nodes=None, kind="scheduled"):
    return FaultRecord(
        label=label,
        target=target,
        action=action,
        value=None,
        nodes=tuple(nodes or [target]),
        planned_s=issued,
        issued_s=issued,
        done_s=issued + 0.2 if done is None else done,
        issued_unix=1e9 + issued,
        done_unix=1e9 + (issued + 0.2 if done is None else done),
        result=f"{action} {target}: done",
        kind=kind,
    )


def test_percentiles_are_nearest_rank():
    assert percentile([], 50) is None
    values = [float(v) for v in range(1, 11)]  # 1..10
    assert percentile(values, 50) == 5.0 and percentile(values, 99) == 10.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile([7.0], 99) == 7.0
    hundred = [float(v) for v in range(1, 101)]
    assert percentile(hundred, 99) == 99.0 and percentile(hundred, 100) == 100.0


def test_latency_per_phase_counts_the_answers_that_arrived_in_it():
    tasks = [
        _task(0, 0.0, 1.0),  # before: 1.0 s
        _task(1, 0.5, 2.5),  # before: 2.0 s
        _task(2, 4.0, 6.0, "b"),  # sent before, answered in the fault's phase: 2.0 s
        _task(3, 5.5, 6.0, "b"),  # 0.5 s
        _task(4, 6.0, 9.0, error="UnavailableError"),  # failed in the fault's phase
        _task(5, 11.0, 11.25, via="openai"),  # after
    ]
    report = Report("s", "fake", "t.yaml", 1e9, 12.0, tasks=tasks)
    report.phases = [Phase("before", 0, 5), Phase("5s kill a", 5, 10), Phase("after", 10)]
    rows = {f.name: f for f in report.phase_figures()}
    assert (rows["before"].tasks, rows["before"].p50_s, rows["before"].p99_s) == (2, 1.0, 2.0)
    hurt = rows["5s kill a"]
    assert (hurt.tasks, hurt.ok, hurt.failed, hurt.p50_s, hurt.p99_s) == (3, 2, 1, 0.5, 2.0)
    assert (rows["after"].tasks, rows["after"].p50_s) == (1, 0.25)
    via = {f.name: f for f in report.via_figures()}
    assert [f.name for f in report.via_figures()] == ["grpc", "openai"]
    assert (via["grpc"].tasks, via["grpc"].failed, via["openai"].ok) == (5, 1, 1)
    assert report.error_kinds() == {"UnavailableError": 1}
    assert report.answered_per_node() == {"a": 3, "b": 2}


def test_reroute_not_ready_and_ready_again_follow_their_definitions():
    kill = _fault("5s kill a", "kill", "a", 5.0)
    restart = _fault("15s restart a", "restart", "a", 15.0, 17.0)
    tasks = [
        _task(0, 4.0, 5.5, "b", attempts=[("a", "unavailable"), ("b", "ok")]),  # hit: +0.5
        _task(1, 4.5, 6.0, "b", attempts=[("a", "unavailable"), ("b", "ok")]),  # hit: +1.0
        _task(2, 4.0, 4.9, "b", attempts=[("a", "overloaded"), ("b", "ok")]),  # before the fault
        _task(3, 6.0, 7.0, "b"),  # never tried a: not a reroute
        _task(4, 6.0, 8.0, error="TaskFailedError", attempts=[("a", "unavailable")]),  # hit, failed
        _task(5, 16.0, 16.5, "b", attempts=[("a", "unavailable"), ("b", "ok")]),  # restart's time
    ]
    changes = [
        NodeChange(0.0, "a", "ready"),
        NodeChange(0.0, "b", "ready"),
        NodeChange(6.25, "a", "suspect"),
        NodeChange(8.5, "a", "gone"),
        NodeChange(19.0, "a", "ready"),
    ]
    rows = fault_figures([restart, kill], tasks, changes, end_s=30.0)
    assert [r.fault.label for r in rows] == ["5s kill a", "15s restart a"]
    killed, restarted = rows
    assert killed.reroute_s == 0.5  # the first answer elsewhere of a task that failed on a
    assert killed.not_ready_s == 1.25  # the first poll listing a not ready
    assert killed.affected == 3 and killed.ready_s is None
    assert restarted.ready_s == 4.0  # a was not ready at the restart; ready again at 19.0
    assert restarted.reroute_s is None and restarted.not_ready_s is None
    nothing = fault_figures([_fault("1s delay b", "delay", "b", 1.0)], tasks[:1], changes, end_s=9)
    assert nothing[0].reroute_s is None and nothing[0].not_ready_s is None


def test_a_restart_of_a_running_node_is_ready_again_once_it_came_back():
    restart = _fault("8s restart local", "restart", "local", 8.0, 12.0)
    changes = [NodeChange(0.0, "local", "ready"), NodeChange(10.0, "local", "gone"),
               NodeChange(13.5, "local", "ready")]  # fmt: skip
    (row,) = fault_figures([restart], [], changes, end_s=20.0)
    assert row.ready_s == 5.5
    quiet = fault_figures([restart], [], changes[:1], end_s=20.0)
    assert quiet[0].ready_s is None  # never left ready: nothing to measure


def _counts(name, **tasks):
    return NodeCounts(
        name, {t: node_pb2.TaskCount(task_id=t, **fields) for t, fields in tasks.items()}, 0
    )


def test_answered_twice_comes_from_the_nodes_counts_and_excused_ones_are_listed_apart():
    cut = 1e9 + 5.0
    windows = [LostWindow("a", cut, cut + 0.2), LostWindow("a", cut + 20, cut + 27)]
    nodes = [
        _counts(
            "a",
            t1={"generations_completed": 1, "last_completed_unix_s": cut + 0.1},  # as it died
            t2={"generations_completed": 1, "last_completed_unix_s": cut - 3.0},  # long before
            t3={"generations_completed": 1, "last_completed_unix_s": cut + 26.0},  # 2nd window
            t4={"agent_runs_completed": 1, "side_effect_tool_runs": {"create_ticket": 1}},
        ),
        _counts(
            "b",
            t1={"generations_completed": 1},
            t2={"generations_completed": 1},
            t3={"generations_completed": 1},
            t4={"side_effect_tool_runs": {"create_ticket": 1}},
        ),
    ]
    verdict = judge_exactly_once(
        ["t1", "t2", "t3", "t4", "t5", "t6"],
        nodes,
        lost=windows,
        kinds={"t4": "agent"},
        may_be_unfinished=["t6"],
    )
    assert verdict.excused == [("t1", "a"), ("t3", "a")]
    assert verdict.twice == ["t2"] and verdict.never == ["t5"]
    assert verdict.tools_twice == {"t4": {"create_ticket": 2}}
    assert not verdict.ok and len(verdict.problems) == 3
    gaps = judge_exactly_once(["t1"], [NodeCounts("a", {}, 4)])
    assert gaps.cannot_judge and not gaps.ok and not gaps.problems


def _report() -> Report:
    tasks = [
        _task(0, 0.1, 0.6),
        _task(1, 4.0, 5.5, "b", attempts=[("a", "unavailable"), ("b", "ok")]),
        _task(2, 6.0, 7.0, "b", via="openai"),
        _task(3, 7.0, 9.0, error="DeadlineExceededError"),
    ]
    faults = [
        _fault("5s kill a", "kill", "a", 5.0),
        _fault("9.5s restart a", "restart", "a", 9.5, kind="recovery"),
        FaultRecord("30s heal a", "a", "heal", None, ("a",), 30.0, error="not fired: deadline"),
    ]
    verdict = ExactlyOnce(
        judged=4,
        twice=["t1"],
        excused=[("t0", "a")],
        problems=["t1: completed on ['a', 'b'] (could not deliver: none)"],
        completions={"a": 2, "b": 2},
    )
    return Report(
        scenario="demo",
        backend="fake",
        topology="topologies/distributed-edge.yaml",
        started_unix=1_700_000_000.0,
        duration_s=10.0,
        tasks=tasks,
        faults=faults,
        changes=[NodeChange(0.0, "a", "ready"), NodeChange(6.0, "a", "gone")],
        phases=[Phase("before", 0, 5), Phase("5s kill a", 5, 9.5), Phase("after", 9.5)],
        exactly_once=verdict,
        notes=["the mesh was not up: the runner brought it up"],
    )


def test_render_text_says_everything_in_aligned_columns():
    text = render_text(_report())
    for needle in (
        "Scenario demo on fake (topologies/distributed-edge.yaml)",
        "started 2023-11-14 22:13:20 UTC, ran 10.0 s",
        "Tasks: 4, ok 3, failed 1",
        "failures by kind: DeadlineExceededError 1",
        "answered twice 1, excused 1",
        "excused: t0 on a",
        "PROBLEM: t1: completed on",
        "30s heal a",
        "not fired",
        "(recovery)",
        "(3 answers not shown; every one is in the JSON report)",
        "the mesh was not up",
    ):
        assert needle in text, (needle, text)
    lines = text.splitlines()
    table = lines[lines.index("Latency per phase (answers arriving in it)") + 1 :][:4]
    header, *rows = table
    for column in ("tasks", "p50", "p99"):  # right-aligned: every cell ends where its title does
        end = header.index(column) + len(column)
        assert all(row[end - 1] != " " and (len(row) == end or row[end] == " ") for row in rows)
    assert "1500 ms" in text  # task 1: 1.5 s, the fault's phase
    everything = render_text(_report(), timeline_tasks=True)
    assert "answered by b in 1.50 s after a unavailable" in everything


def test_to_json_has_stable_keys_and_is_plain_json():
    data = to_json(_report())
    assert list(data) == [
        "scenario",
        "backend",
        "topology",
        "started_unix",
        "duration_s",
        "tasks",
        "exactly_once",
        "nodes",
        "faults",
        "faults_not_fired",
        "phases",
        "via",
        "timeline",
        "task_list",
        "notes",
    ]
    assert data["tasks"] == {
        "total": 4,
        "ok": 3,
        "failed": 1,
        "errors": {"DeadlineExceededError": 1},
    }
    once = data["exactly_once"]
    assert once["answered_twice"] == 1 and once["excused"] == [{"task_id": "t0", "node": "a"}]
    assert once["ok"] is False
    assert data["nodes"] == {
        "a": {"answered": 1, "completed": 2},
        "b": {"answered": 2, "completed": 2},
    }
    kill = data["faults"][0]
    assert (kill["label"], kill["reroute_s"], kill["not_ready_s"], kill["tasks_hit"]) == (
        "5s kill a",
        0.5,
        1.0,
        1,
    )
    assert data["faults_not_fired"] == [{"label": "30s heal a", "error": "not fired: deadline"}]
    assert [p["name"] for p in data["phases"]] == ["before", "5s kill a", "after"]
    assert data["phases"][-1]["to_s"] is None and data["phases"][0]["p50_s"] == 0.5
    assert [e["kind"] for e in data["timeline"]][:2] == ["node", "task"]
    assert (
        len(data["task_list"]) == 4
        and data["task_list"][1]["attempts"][0]["outcome"] == "unavailable"
    )
    json.dumps(data, allow_nan=False)  # no NaN or inf anywhere
    assert not math.isnan(data["faults"][1]["command_s"])
