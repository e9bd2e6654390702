"""The scenario runner (mesh/sim/runner.py) against a fake backend and a fake mesh on virtual
time: the load's shares, faults on schedule with their `for` heals, recovery at the end (heal,
restart, every node's counts read), lost windows for cut nodes, answered-twice from the nodes'
counts, and the deadline."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import pathlib
import re
import textwrap
from collections import Counter

import pytest

from edgemesh.v1 import node_pb2
from mesh.core.errors import UnavailableError
from mesh.sim.backend import SimNode, SimStatus
from mesh.sim.counts import NodeCounts
from mesh.sim.report import AttemptView
from mesh.sim.runner import Answer, PlannedTask, TaskFailure, plan_tasks, run_scenario
from mesh.sim.scenario import load_scenario

TOPOLOGY = pathlib.Path(__file__).resolve().parents[2] / "topologies" / "distributed-edge.yaml"
WALL_OFFSET = 1.7e9


class VirtualTime:
    """A clock that moves only when every coroutine is asleep: then to the earliest wake-up."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._ticker: asyncio.Task[None] | None = None

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now + WALL_OFFSET

    async def sleep(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        if self._ticker is None or self._ticker.get_loop() is not loop or self._ticker.done():
            self._ticker = loop.create_task(self._tick())
        wake: asyncio.Future[None] = loop.create_future()
        heapq.heappush(self._sleepers, (self.now + max(seconds, 0.0), next(self._order), wake))
        await wake

    async def _tick(self) -> None:
        while True:
            for _ in range(30):  # let everything that can run, run
                await asyncio.sleep(0)
            if not self._sleepers:
                await asyncio.sleep(0.001)  # a fault in its worker thread: real time
                continue
            at, _order, wake = heapq.heappop(self._sleepers)
            if wake.done():
                continue
            self.now = max(self.now, at)
            wake.set_result(None)


class World:
    """Two nodes, what the coordinator lists, and what each node counted."""

    def __init__(self, time: VirtualTime, names=("edge-a", "edge-b")) -> None:
        self.time = time
        self.state = dict.fromkeys(names, "running")  # the backend's view
        self.listed = dict.fromkeys(names, "ready")  # the coordinator's
        self.counts: dict[str, dict[str, node_pb2.TaskCount]] = {n: {} for n in names}
        self.up = True
        self.faults: list[tuple[float, str, str, float | None]] = []
        self.turn = itertools.count()
        self.busy: Counter[str] = Counter()  # tasks in flight per node

    def complete(self, node: str, task_id: str, *, agent: bool = False, at: float | None = None):
        count = self.counts[node].setdefault(task_id, node_pb2.TaskCount(task_id=task_id))
        if agent:
            count.agent_runs_completed += 1
        else:
            count.generations_completed += 1
        count.last_completed_unix_s = self.time.wall() if at is None else at


class FakeBackend:
    name = "fake"

    def __init__(self, world: World) -> None:
        self.world = world
        self.ups = 0

    def status(self, topology):
        world = self.world
        nodes = tuple(
            SimNode(
                name,
                "lab",
                f"{name}:1" if state != "exited" else "",
                state,
                ("partition",) if state == "partitioned" else (),
            )
            for name, state in world.state.items()
        )
        grpc = "coordinator:9000" if world.up else ""
        return SimStatus("fake", "em-test", str(topology), grpc, "coordinator:8000", nodes)

    def up(self, topology, *, progress, timeout_s):
        self.ups += 1
        self.world.up = True
        return self.status(topology)

    def down(self, topology, *, progress):
        raise AssertionError("the runner never takes the mesh down")

    def fault(self, topology, target, action, value=None):
        world = self.world
        world.faults.append((world.time.now, target, action, value))
        names = [target] if not target.startswith("site:") else list(world.state)
        for name in names:
            if action in ("kill", "stop"):
                world.state[name], world.listed[name] = "exited", "gone"
            elif action == "pause":
                world.state[name], world.listed[name] = "paused", "gone"
            elif action == "partition":
                world.state[name], world.listed[name] = "partitioned", "gone"
            elif action in ("restart", "heal"):
                world.state[name], world.listed[name] = "running", "ready"
        return f"{action} {target}: done"


class FakeMesh:
    """Tasks go round the nodes; one on a node that is not running fails over to the next."""

    def __init__(self, world: World, *, hang: bool = False) -> None:
        self.world = world
        self.hang = hang
        self.closed = False
        self.asked_busy: list[tuple[float, str, str]] = []

    async def submit(self, task: PlannedTask) -> Answer:
        world = self.world
        if self.hang:
            await world.time.sleep(10_000)
        names = list(world.state)
        first = next(world.turn) % len(names)
        attempts = []
        for name in names[first:] + names[:first]:
            if world.state[name] != "running":
                attempts.append(AttemptView(name, "unavailable", 5.0))
                continue
            world.busy[name] += 1
            await world.time.sleep(0.4)
            world.busy[name] -= 1
            world.complete(name, task.key, agent=bool(task.agent))
            attempts.append(AttemptView(name, "ok", 400.0))
            return Answer(task.key, name, tuple(attempts))
        raise TaskFailure(
            "TaskFailedError", "every node failed", task_id=task.key, attempts=attempts
        )

    async def list_nodes(self) -> dict[str, str]:
        return dict(self.world.listed)

    async def node_counts(self, name: str, address: str) -> NodeCounts:
        if self.world.state[name] != "running":
            raise UnavailableError(f"{name} is down")
        return NodeCounts(name, dict(self.world.counts[name]), 0)

    async def in_flight(self, name: str, address: str) -> int:
        self.asked_busy.append((self.world.time.now, name, address))
        return self.world.busy[name]

    async def aclose(self) -> None:
        self.closed = True


def _scenario(tmp_path, body: str):
    path = tmp_path / "scenario.yaml"
    path.write_text(f"name: test\ntopology: {TOPOLOGY}\n" + textwrap.dedent(body), encoding="utf-8")
    return load_scenario(path)


@pytest.fixture(autouse=True)
def _backend_calls_inline(monkeypatch):
    """The runner calls the backend in a worker thread (a slow docker command must not stall
    the load); here the fake backend runs inline, so in virtual time a fault takes effect at
    exactly its instant, whatever the machine's load (a real thread lets the clock move on)."""

    async def inline(function, /, *args, **kwargs):
        return function(*args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", inline)


def _run(scenario, world, *, mesh=None, backend=None, **options):
    lines: list[str] = []
    fake = mesh or FakeMesh(world)
    report = run_scenario(
        scenario,
        backend or FakeBackend(world),
        progress=lines.append,
        clock=world.time,
        wall=world.time.wall,
        sleep=world.time.sleep,
        mesh=lambda status, scenario: fake,
        run_id="r1",
        **options,
    )
    return report, lines, fake


def test_tasks_are_shared_out_evenly_by_ingress_and_agent(tmp_path):
    scenario = _scenario(
        tmp_path,
        """\
        load:
          tasks: 50
          via: {grpc: 0.8, openai: 0.2}
          agents: {customer-service: 0.1}
          prompts: [one, two, three]
        """,
    )
    tasks = plan_tasks(scenario, "r1")
    assert Counter(t.via for t in tasks) == {"grpc": 40, "openai": 10}
    assert Counter(t.agent for t in tasks) == {"": 45, "customer-service": 5}
    openai = [t.index for t in tasks if t.via == "openai"]
    assert openai == [2, 7, 12, 17, 22, 27, 32, 37, 42, 47]  # spread over the run
    assert len({t.key for t in tasks}) == 50 and tasks[3].key == "sim-r1-0003"
    assert [t.prompt for t in tasks[:4]] == ["one", "two", "three", "one"]
    odd = _scenario(tmp_path, "load: {tasks: 7, via: {grpc: 0.5, openai: 0.5}}\n")
    assert Counter(t.via for t in plan_tasks(odd, "x")) in (
        {"grpc": 4, "openai": 3},
        {"grpc": 3, "openai": 4},
    )


def test_faults_fire_on_schedule_and_the_end_heals_restarts_and_judges(tmp_path):
    scenario = _scenario(
        tmp_path,
        """\
        load: {tasks: 30, concurrency: 2, duration_s: 20, via: {grpc: 0.8, openai: 0.2}}
        faults:
          - {at: 6, target: edge-a, action: kill}
          - {at: 2, target: edge-b, action: pause, for: 1.5}
        deadline_s: 120
        """,
    )
    world = World(VirtualTime())
    report, lines, mesh = _run(scenario, world)

    fired = [(round(at - 1000.0, 1), target, action) for at, target, action, _ in world.faults]
    assert [(t, a) for _at, t, a in fired] == [
        ("edge-b", "pause"),
        ("edge-b", "heal"),  # the `for`
        ("edge-a", "kill"),
        ("edge-a", "restart"),  # the end: a killed node comes back for its counts
    ]
    assert [at for at, _t, _a in fired[:3]] == [2.0, 3.5, 6.0]
    assert [(f.label, f.kind) for f in sorted(report.faults, key=lambda f: f.issued_s)] == [
        ("2s pause edge-b", "scheduled"),
        ("3.5s heal edge-b", "heal"),
        ("6s kill edge-a", "scheduled"),
        ("end: restart edge-a", "recovery"),
    ]
    assert len(report.tasks) == 30 and not report.failed
    assert Counter(t.via for t in report.tasks) == {"grpc": 24, "openai": 6}
    assert report.exactly_once.ok and report.exactly_once.judged == 30
    assert report.exactly_once.completions == report.answered_per_node()
    # The coordinator's table was watched: edge-a gone after the kill, edge-b gone and back.
    assert [(c.node, c.state) for c in report.changes if c.at_s > 0] == [
        ("edge-b", "gone"),
        ("edge-b", "ready"),
        ("edge-a", "gone"),
        ("edge-a", "ready"),
    ]
    (kill,) = [f for f in report.fault_figures() if f.fault.action == "kill"]
    assert kill.not_ready_s is not None and 0 <= kill.not_ready_s <= 0.25 + 1e-9
    assert kill.reroute_s is not None and kill.affected >= 1  # a task tried edge-a, then edge-b
    assert [p.name for p in report.phases] == [
        "before",
        "2s pause edge-b",
        "3.5s heal edge-b",
        "6s kill edge-a",  # the last fault breaks: its phase runs to the end
    ]
    assert sum(f.tasks for f in report.phase_figures()) == 30
    assert any("fault 6s kill edge-a: kill edge-a: done" in line for line in lines)
    assert any("counts read from 2 nodes" in line for line in lines)
    assert mesh.closed


def test_a_mesh_that_is_not_up_is_brought_up_and_the_report_says_so(tmp_path):
    scenario = _scenario(tmp_path, "load: {tasks: 2}\n")
    world = World(VirtualTime())
    world.up = False
    backend = FakeBackend(world)
    lines: list[str] = []
    report = run_scenario(
        scenario,
        backend,
        progress=lines.append,
        clock=world.time,
        wall=world.time.wall,
        sleep=world.time.sleep,
        mesh=lambda status, scenario: FakeMesh(world),
    )
    assert backend.ups == 1 and "bringing it up" in lines[0]
    assert any("runner brought it up" in note for note in report.notes)
    assert len(report.ok) == 2


class DoubleMesh(FakeMesh):
    """Also completes some tasks a second time on the other node, as a broken coordinator would."""

    def __init__(self, world: World, twice: dict[str, tuple[str, float]]) -> None:
        super().__init__(world)
        self.twice = twice  # task key -> (node, unix time) of a second completion

    async def submit(self, task: PlannedTask) -> Answer:
        answer = await super().submit(task)
        if task.key in self.twice:
            node, at = self.twice[task.key]
            self.world.complete(node, task.key, at=at)
        return answer


def test_answered_twice_by_the_nodes_counts_and_a_completion_in_a_lost_window_excused(tmp_path):
    scenario = _scenario(
        tmp_path,
        """\
        load: {tasks: 6, concurrency: 1, duration_s: 12}
        faults:
          - {at: 5, target: edge-a, action: kill}
          - {at: 7, target: edge-a, action: restart}
        """,
    )
    world = World(VirtualTime())
    kill_unix = 1000.0 + 5.0 + WALL_OFFSET
    twice = {
        "sim-r1-0000": ("edge-b", 1000.5 + WALL_OFFSET),  # task 0 went to edge-a
        "sim-r1-0003": ("edge-a", kill_unix - 0.2),  # sent at 6 s to edge-b: edge-a is dead
    }
    report, _lines, _mesh = _run(scenario, world, mesh=DoubleMesh(world, twice))
    verdict = report.exactly_once
    assert not report.failed
    assert report.tasks[0].node == "edge-a" and report.tasks[3].node == "edge-b"
    # Task 0: a second completion long before any fault: answered twice, a problem.
    assert verdict.twice == ["sim-r1-0000"] and not verdict.ok
    assert verdict.problems == [
        "sim-r1-0000: completed on ['edge-a', 'edge-b'] (could not deliver: none)"
    ]
    # Task 3: its second completion was on edge-a as edge-a was killed (its result could not
    # get out): excused, and said so.
    assert verdict.excused == [("sim-r1-0003", "edge-a")]
    assert verdict.completions == {"edge-a": 4, "edge-b": 4}


def test_the_deadline_stops_the_load_and_says_what_never_ran(tmp_path):
    scenario = _scenario(
        tmp_path,
        """\
        load: {tasks: 4, concurrency: 1}
        faults:
          - {at: 2, target: edge-a, action: partition, for: 100}
        deadline_s: 10
        """,
    )
    world = World(VirtualTime())
    report, lines, _mesh = _run(scenario, world, mesh=FakeMesh(world, hang=True))
    kinds = Counter(t.error_kind for t in report.tasks)
    assert kinds == {"ScenarioDeadline": 1, "NotStarted": 3}
    assert [f.label for f in report.faults if not f.fired] == ["102s heal edge-a"]
    assert any("deadline" in note for note in report.notes)
    # The partition still in force is healed at the end, and the counts are read.
    assert [a for _at, _t, a, _v in world.faults] == ["partition", "heal"]
    assert report.duration_s == pytest.approx(10.0, abs=0.5)
    assert report.exactly_once.not_judged == ["sim-r1-0001", "sim-r1-0002", "sim-r1-0003"]
    assert not report.exactly_once.problems  # the cut-short task may have no completion


def test_a_node_that_never_answers_describe_leaves_the_verdict_incomplete(tmp_path):
    scenario = _scenario(tmp_path, "load: {tasks: 2}\n")
    world = World(VirtualTime())

    class Stuck(FakeMesh):
        async def node_counts(self, name, address):
            if name == "edge-b":
                raise UnavailableError("edge-b does not answer")
            return await super().node_counts(name, address)

    report, lines, _mesh = _run(scenario, world, mesh=Stuck(world), recover_timeout_s=5.0)
    assert report.exactly_once.missing_nodes == ["edge-b"] and not report.exactly_once.ok
    assert any("no counts from edge-b" in line for line in lines)


def test_a_fault_the_backend_refuses_is_recorded_and_the_run_goes_on(tmp_path):
    scenario = _scenario(
        tmp_path,
        "load: {tasks: 3, duration_s: 3}\nfaults: [{at: 1, target: edge-a, action: kill}]\n",
    )
    world = World(VirtualTime())

    class Refusing(FakeBackend):
        def fault(self, topology, target, action, value=None):
            if action == "kill":
                from mesh.sim.backend import SimError

                raise SimError("docker kill: no such container")
            return super().fault(topology, target, action, value)

    report, _lines, _mesh = _run(scenario, world, backend=Refusing(world))
    (kill,) = report.faults
    assert kill.fired and kill.error == "SimError: docker kill: no such container"
    assert len(report.ok) == 3 and report.exactly_once.ok


def test_a_busy_fault_waits_for_a_task_in_flight_and_puts_its_heal_off(tmp_path):
    # One task every 5 s, 0.4 s each, round the nodes: edge-a is idle at 6 s, busy from 10 s.
    scenario = _scenario(
        tmp_path,
        """\
        load: {tasks: 4, concurrency: 1, duration_s: 20}
        faults:
          - {at: 6, target: edge-a, action: pause, for: 1, busy: true}
        deadline_s: 120
        """,
    )
    world = World(VirtualTime())
    report, lines, mesh = _run(scenario, world)

    (pause, heal) = [
        (round(at - 1000.0, 2), target, action) for at, target, action, _ in world.faults
    ][:2]
    # When task 2 was on edge-a (10 s to 10.4 s, asked every 0.05 s), not at 6 s; its `for`
    # from when it fired.
    assert pause[1:] == ("edge-a", "pause") and 10.0 <= pause[0] <= 10.05 + 1e-6
    assert heal[1:] == ("edge-a", "heal") and heal[0] == pytest.approx(pause[0] + 1.0)
    assert {address for _at, _name, address in mesh.asked_busy} == {"edge-a:1"}
    assert min(at for at, _n, _a in mesh.asked_busy) - 1000.0 == pytest.approx(6.0)
    assert any(re.search(r"fault 6s pause edge-a: edge-a busy after 4\.0\d s", x) for x in lines)
    assert report.notes == []


def test_a_busy_fault_whose_node_stays_idle_fires_after_the_wait_with_a_note(tmp_path):
    from mesh.sim.runner import BUSY_WAIT_S

    scenario = _scenario(
        tmp_path,
        """\
        load: {tasks: 1, concurrency: 1}
        faults:
          - {at: 2, target: edge-a, action: kill, busy: true}
        deadline_s: 120
        """,
    )
    world = World(VirtualTime())
    report, _lines, _mesh = _run(scenario, world)

    (at, target, action, _value) = world.faults[0]
    assert (target, action) == ("edge-a", "kill")
    assert at - 1000.0 == pytest.approx(2.0 + BUSY_WAIT_S, abs=0.06)
    assert report.notes == [
        f"2s kill edge-a: edge-a had no task in flight within {BUSY_WAIT_S:.1f} s; fired anyway"
    ]


class CutMesh(FakeMesh):
    """Tasks 1 and 2 come back whole from a stream cut after its last token: their one attempt
    failed (edge-a went away before its end). Task 1's node counted the start, task 2's none."""

    async def submit(self, task: PlannedTask) -> Answer:
        if task.index not in (1, 2):
            return await super().submit(task)
        world = self.world
        if task.index == 1:
            started = world.counts["edge-a"].setdefault(
                task.key, node_pb2.TaskCount(task_id=task.key)
            )
            started.generations_started += 1
        await world.time.sleep(0.4)
        return Answer(task.key, "edge-a", (AttemptView("edge-a", "unavailable", 400.0),))


def test_an_answer_cut_after_its_last_token_is_judged_by_the_start_its_node_counted(tmp_path):
    from mesh.sim.report import render_text, to_json

    scenario = _scenario(tmp_path, "load: {tasks: 4, concurrency: 1}\n")
    world = World(VirtualTime())
    report, _lines, _mesh = _run(scenario, world, mesh=CutMesh(world))
    verdict = report.exactly_once
    assert len(report.ok) == 4
    # Task 1: answered whole, started on edge-a, never completed there: not a problem, shown.
    assert verdict.cut_after_last_token == [("sim-r1-0001", "edge-a")]
    # Task 2: no node even started it: still completed on no node.
    assert verdict.never == ["sim-r1-0002"] and not verdict.ok
    assert verdict.problems == ["sim-r1-0002: completed on no node"]
    data = to_json(report)["exactly_once"]
    assert data["cut_after_last_token"] == [{"task_id": "sim-r1-0001", "node": "edge-a"}]
    assert "cut after its last token: sim-r1-0001 on edge-a" in render_text(report)
