"""Run a scenario against a simulated mesh and report what happened (`mesh sim run FILE`).

    report = run_scenario(load_scenario(path), backend_for("netns"), progress=print)
    print(render_text(report)); json.dump(to_json(report), out)

The run, through the `SimBackend` interface only (so a report means the same on every backend):

1. The mesh must be up: if `backend.status` says it is not, the runner brings it up (and says
   so); it never takes it down (`mesh sim run` does, after the report, unless `--keep`).
2. The load: `load.tasks` tasks, at most `load.concurrency` at a time, task i starting no
   earlier than i * duration_s / tasks; each has its own key (`sim-<run>-<index>`), sent as
   both task id and idempotency key through gRPC (`MeshClient`) and as the `Idempotency-Key`
   header through the OpenAI-compatible ingress (the `openai` package's AsyncOpenAI at
   http://COORDINATOR_HTTP/v1, no retries: a failure is reported, not hidden). Which task goes
   through which ingress and which runs an agent is spread evenly over the run by the shares in
   `load.via` and `load.agents`.
3. The faults fire on schedule, one after another, each `backend.fault` in a worker thread so a
   slow docker command never stalls the load; a fault that fails is recorded and the run goes on.
4. The coordinator's node table is polled every 0.25 s; each change goes into the timeline.
5. At the end (load and faults done, or `deadline_s` passed: what was still running is recorded
   as failed, faults not yet fired as not fired): every fault still in force is healed, every
   node killed or stopped is restarted (also what `backend.status` still shows faulted), the
   runner waits until every node answers Describe, and reads each node's own task counts to
   judge exactly-once (mesh/sim/counts.py). A node that was killed, stopped, restarted, paused,
   partitioned or losing packets gets a `LostWindow` for that time: from the moment the fault
   was asked for until it was over (a kill: until the kill command returned; a pause, partition
   or loss: until its heal returned, plus `RESUME_GRACE_S` for a generation that was frozen
   mid-way and ends just after). A delay never cuts a node off and gets none.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from mesh.core.errors import MeshError
from mesh.sim.backend import (
    DEFAULT_SITE,
    Progress,
    SimBackend,
    SimError,
    SimStatus,
    parse_target,
)
from mesh.sim.counts import AGENT, GENERATION, LostWindow, NodeCounts, judge_exactly_once
from mesh.sim.report import (
    AttemptView,
    ExactlyOnce,
    FaultRecord,
    NodeChange,
    Report,
    TaskOutcome,
)
from mesh.sim.scenario import HEALABLE, Scenario, ScheduledFault

if TYPE_CHECKING:
    from mesh.client import NodeClient

POLL_S = 0.25  # the coordinator's node table, read this often
BUSY_POLL_S = 0.05  # a `busy` fault's node asked this often whether it has a task in flight
BUSY_WAIT_S = 10.0  # ... for up to this long; then it fires anyway, with a note
RESUME_GRACE_S = 2.0  # a generation frozen by a pause (or cut) may end this long after the heal
CUTTING = ("kill", "stop", "restart", "pause", "partition", "loss")  # faults that get a window
DOWN = ("kill", "stop")  # faults after which a node needs a restart
BROKEN_STATES = ("exited", "stopped", "dead", "created")  # what `restart` fixes in SimStatus

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class PlannedTask:
    """One task of the load, as planned before the run."""

    index: int
    key: str
    via: str  # grpc, openai or cli
    agent: str  # "" for a plain generation
    prompt: str


@dataclass(frozen=True)
class Answer:
    task_id: str
    node: str
    attempts: tuple[AttemptView, ...]


class TaskFailure(Exception):
    """A task ended without an answer; what the ingress said."""

    def __init__(
        self, kind: str, message: str, *, task_id: str = "", attempts: Sequence[AttemptView] = ()
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.task_id = task_id
        self.attempts = tuple(attempts)


class MeshAccess(Protocol):
    """How the runner talks to the simulated mesh (the real one: `LiveMesh`; tests: fakes)."""

    async def submit(self, task: PlannedTask) -> Answer:
        """Run one task to its answer; TaskFailure when it ends without one."""
        ...

    async def list_nodes(self) -> dict[str, str]:
        """The coordinator's table: node name -> state."""
        ...

    async def node_counts(self, name: str, address: str) -> NodeCounts:
        """The node's own task counts (Describe with task_counts)."""
        ...

    async def in_flight(self, name: str, address: str) -> int:
        """The tasks the node is running now, by its own count (Describe's load)."""
        ...

    async def aclose(self) -> None: ...


def plan_tasks(scenario: Scenario, run_id: str) -> list[PlannedTask]:
    """Every task of the load: which ingress and which agent spread evenly over the run by
    their shares (`_spread`), prompts in turn; keys `sim-<run id>-<index>`."""
    load = scenario.load
    total = load.tasks
    vias = _spread(total, {str(k): v for k, v in load.via.items()}, default="grpc")
    agents = _spread(total, dict(load.agents), default="")
    return [
        PlannedTask(
            index,
            f"sim-{run_id}-{index:04d}",
            vias[index],
            agents[index],
            load.prompts[index % len(load.prompts)],
        )
        for index in range(total)
    ]


def _spread(total: int, shares: dict[str, float], *, default: str) -> list[str]:
    """`total` slots shared out by `shares` (largest remainders get the slots left over; what
    the shares leave is `default`'s), each name's slots spread evenly over the run."""
    parts = dict(shares)
    rest = 1.0 - sum(parts.values())
    if rest > 1e-9:
        parts[default] = parts.get(default, 0.0) + rest
    exact = {name: share * total for name, share in parts.items()}
    counts = {name: math.floor(value) for name, value in exact.items()}
    left = total - sum(counts.values())
    for name in sorted(exact, key=lambda n: (counts[n] - exact[n], n))[:left]:
        counts[name] += 1
    slots = [default] * total
    taken: set[int] = set()
    for name in sorted(n for n in counts if n != default):
        n = counts[name]
        for k in range(n):
            slot = min(total - 1, int((k + 0.5) * total / n))
            while slot in taken:  # the next free slot, wrapping
                slot = (slot + 1) % total
            taken.add(slot)
            slots[slot] = name
    return slots


def _outcome(value: object) -> str:
    """An attempt's outcome as a word, from a proto enum number or a StrEnum."""
    if isinstance(value, int):
        from edgemesh.v1 import mesh_pb2

        name = mesh_pb2.AttemptOutcome.Name(value)
        return name.removeprefix("ATTEMPT_OUTCOME_").lower()
    return str(value)


class LiveMesh:
    """The real thing: MeshClient, AsyncOpenAI and NodeClient at a SimStatus's addresses. A
    cluster coordinator wants an API key: $MESH_API_KEY (for both ingresses)."""

    def __init__(self, status: SimStatus, scenario: Scenario) -> None:
        from mesh.coordinator_client import MeshClient

        self.status = status
        self.load = scenario.load
        api_key = os.environ.get("MESH_API_KEY")
        self._api_key = api_key
        self._mesh = MeshClient(status.coordinator_grpc, api_key=api_key)
        self._watch = MeshClient(status.coordinator_grpc, api_key=api_key)  # never queued behind
        self._openai: object | None = None
        self._nodes: dict[str, NodeClient] = {}  # by address, for `in_flight`

    def _task_timeout_s(self) -> float:
        return (self.load.task_deadline_s or 120.0) + 10.0

    async def submit(self, task: PlannedTask) -> Answer:
        if task.via == "openai":
            return await self._submit_openai(task)
        if task.via == "cli":
            return await self._submit_cli(task)
        try:
            reply = await self._mesh.submit(
                task.prompt,
                model="" if task.agent else self.load.model,
                agent=task.agent,
                max_tokens=self.load.max_tokens,
                temperature=self.load.temperature,
                task_id=task.key,
                idempotency_key=task.key,
                deadline_s=self.load.task_deadline_s or 0.0,
                timeout_s=self._task_timeout_s(),
            )
        except MeshError as error:
            attempts = [
                AttemptView(a.node_name, _outcome(a.outcome), a.duration_ms) for a in error.attempts
            ]
            raise TaskFailure(
                type(error).__name__,
                str(error),
                task_id=error.task_id or task.key,
                attempts=attempts,
            ) from None
        return Answer(
            reply.task_id,
            reply.node_name,
            tuple(
                AttemptView(a.node_name, _outcome(a.outcome), a.duration_ms) for a in reply.attempts
            ),
        )

    async def _submit_openai(self, task: PlannedTask) -> Answer:
        import openai

        if self._openai is None:
            self._openai = openai.AsyncOpenAI(
                base_url=f"http://{self.status.coordinator_http}/v1",
                api_key=self._api_key or "not-needed",
                max_retries=0,
                timeout=self._task_timeout_s(),
            )
        client: openai.AsyncOpenAI = self._openai  # type: ignore[assignment]
        headers = {"Idempotency-Key": task.key}
        if self.load.task_deadline_s:
            headers["X-Mesh-Deadline-S"] = f"{self.load.task_deadline_s:g}"
        try:
            completion = await client.chat.completions.create(
                model=f"agent:{task.agent}" if task.agent else self.load.model,
                messages=[{"role": "user", "content": task.prompt}],
                max_tokens=self.load.max_tokens,
                temperature=self.load.temperature,
                extra_headers=headers,
            )
        except openai.APIError as error:
            raise TaskFailure(type(error).__name__, str(error)) from None
        mesh = (completion.model_extra or {}).get("mesh") or {}
        attempts = tuple(
            AttemptView(
                str(a.get("node_name", "")),
                str(a.get("outcome", "")),
                float(a.get("duration_ms", 0.0)),
            )
            for a in mesh.get("attempts", ())
        )
        return Answer(str(mesh.get("task_id", "")), str(mesh.get("node_name", "")), attempts)

    async def _submit_cli(self, task: PlannedTask) -> Answer:
        """`mesh submit --json` as a user would type it (the key through $MESH_API_KEY)."""
        argv = [
            sys.executable,
            "-m",
            "mesh.cli",
            "submit",
            *(("--agent", task.agent) if task.agent else ("--model", self.load.model)),
            "--coordinator",
            self.status.coordinator_grpc,
            "--max-tokens",
            str(self.load.max_tokens),
            "--temperature",
            f"{self.load.temperature:g}",
            "--idempotency-key",
            task.key,
            *(
                ("--deadline", f"{self.load.task_deadline_s:g}")
                if self.load.task_deadline_s
                else ()
            ),
            "--json",
            task.prompt,
        ]
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        try:
            out, err = await asyncio.wait_for(process.communicate(), self._task_timeout_s())
        except TimeoutError:
            process.kill()
            await process.wait()
            raise TaskFailure("CliTimeout", "mesh submit did not finish in time") from None
        if process.returncode != 0:
            message = err.decode(errors="replace").strip().splitlines()
            raise TaskFailure("CliError", message[-1] if message else f"exit {process.returncode}")
        try:
            data = json.loads(out)
            attempts = tuple(
                AttemptView(str(a["node"]), str(a["outcome"]), float(a["duration_ms"]))
                for a in data.get("attempts", ())
            )
            return Answer(str(data["task_id"]), str(data["node"]["name"]), attempts)
        except (ValueError, KeyError, TypeError) as error:
            text = out.decode(errors="replace")[:200]
            raise TaskFailure(
                "CliOutput", f"mesh submit --json printed {text!r}: {error}"
            ) from None

    async def list_nodes(self) -> dict[str, str]:
        return {node.name: node.state for node in await self._watch.list_nodes(timeout_s=2.0)}

    async def node_counts(self, name: str, address: str) -> NodeCounts:
        from mesh.sim.counts import node_counts

        return await node_counts(name, address, timeout_s=5.0)

    async def in_flight(self, name: str, address: str) -> int:
        from mesh.client import NodeClient

        client = self._nodes.get(address)
        if client is None:
            client = self._nodes[address] = NodeClient(address)
        reply = await client.describe(timeout_s=1.0)
        return int(reply.load.in_flight)

    async def aclose(self) -> None:
        await self._mesh.close()
        await self._watch.close()
        for client in self._nodes.values():
            await client.close()
        if self._openai is not None:
            await self._openai.close()  # type: ignore[attr-defined]


MeshFactory = Callable[[SimStatus, Scenario], MeshAccess]


def run_scenario(
    scenario: Scenario,
    backend: SimBackend,
    *,
    progress: Progress,
    clock: Clock = time.monotonic,
    wall: Clock = time.time,
    sleep: Sleep = asyncio.sleep,
    mesh: MeshFactory = LiveMesh,
    up_timeout_s: float = 900.0,
    recover_timeout_s: float = 180.0,
    poll_s: float = POLL_S,
    run_id: str | None = None,
) -> Report:
    """Run `scenario` on `backend` (bringing the mesh up first if it is not) and report."""
    notes = []
    status = backend.status(scenario.topology_path)
    if not status.up:
        progress(f"{scenario.topology_path.name} is not up on {backend.name}: bringing it up")
        status = backend.up(scenario.topology_path, progress=progress, timeout_s=up_timeout_s)
        notes.append(
            "the mesh was not up: the runner brought it up (`mesh sim down` takes it down)"
        )
    run = _Run(
        scenario,
        backend,
        status,
        progress=progress,
        clock=clock,
        wall=wall,
        sleep=sleep,
        mesh=mesh,
        recover_timeout_s=recover_timeout_s,
        poll_s=poll_s,
        run_id=run_id or uuid.uuid4().hex[:8],
    )
    run.notes += notes
    return asyncio.run(run.run())


class _Run:
    """One run of a scenario: the load, the faults, the watcher, then recovery and counts."""

    def __init__(
        self,
        scenario: Scenario,
        backend: SimBackend,
        status: SimStatus,
        *,
        progress: Progress,
        clock: Clock,
        wall: Clock,
        sleep: Sleep,
        mesh: MeshFactory,
        recover_timeout_s: float,
        poll_s: float,
        run_id: str,
    ) -> None:
        self.scenario = scenario
        self.backend = backend
        self.status = status
        self.progress = progress
        self.clock = clock
        self.wall = wall
        self.sleep = sleep
        self.connect = mesh  # called inside the run's event loop (gRPC channels belong to one)
        self.mesh: MeshAccess
        self.recover_timeout_s = recover_timeout_s
        self.poll_s = poll_s
        self.run_id = run_id
        self.start = 0.0
        self.tasks: dict[int, TaskOutcome] = {}
        self.sent: dict[int, float] = {}
        self.faults: list[FaultRecord] = []
        self.changes: list[NodeChange] = []
        self.listed: dict[str, str] = {}  # the coordinator's table at the last poll
        self.notes: list[str] = []
        self.sites = {
            node.name: node.labels.get("site", DEFAULT_SITE) for node in scenario.topology.nodes
        }

    def now(self) -> float:
        return self.clock() - self.start

    def say(self, line: str) -> None:
        self.progress(f"  +{self.now():6.2f} s  {line}")

    def nodes_of(self, target: str) -> tuple[str, ...]:
        kind, name = parse_target(target)
        if kind == "node":
            return (name,)
        return tuple(node for node, site in self.sites.items() if site == name)

    async def sleep_until(self, at_s: float) -> None:
        while (left := at_s - self.now()) > 1e-3:  # a millisecond early is on time
            await self.sleep(min(left, 1.0))

    async def run(self) -> Report:
        scenario = self.scenario
        planned = plan_tasks(scenario, self.run_id)
        self.mesh = self.connect(self.status, scenario)
        self.start = self.clock()
        started_unix = self.wall()
        load = scenario.load
        self.progress(
            f"run {self.run_id}: {load.tasks} tasks ({load.concurrency} at a time"
            + (f", over {load.duration_s:g} s" if load.duration_s else "")
            + f"), {len(scenario.schedule())} faults, giving up after {scenario.deadline_s:g} s"
        )
        watcher = asyncio.create_task(self._watch())
        load_task = asyncio.create_task(self._load(planned))
        faults_task = asyncio.create_task(self._fire(scenario.schedule()))
        deadline = asyncio.create_task(self.sleep_until(scenario.deadline_s))
        try:
            pending = {load_task, faults_task}
            while pending:
                done, _ = await asyncio.wait(
                    pending | {deadline}, return_when=asyncio.FIRST_COMPLETED
                )
                pending -= done
                if deadline in done and pending:
                    self.say(f"deadline: {scenario.deadline_s:g} s passed; stopping the load")
                    self.notes.append(
                        f"the run gave up at its deadline ({scenario.deadline_s:g} s)"
                    )
                    for task in pending:
                        task.cancel()
                    await asyncio.gather(*pending, return_exceptions=True)
                    pending = set()
            for task in (load_task, faults_task):
                if task.done() and not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            self._unfinished(planned)
            self._unfired(scenario.schedule())
            duration = self.now()
            self.say(
                f"load done: {sum(t.ok for t in self.tasks.values())} ok, "
                f"{sum(not t.ok for t in self.tasks.values())} failed; recovering the mesh"
            )
            counts, missing = await self._recover_and_count()
            verdict = self._judge(counts, missing)
        finally:
            for task in (deadline, watcher, load_task, faults_task):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(
                    deadline, watcher, load_task, faults_task, return_exceptions=True
                )
            await self.mesh.aclose()
        return Report(
            scenario=scenario.name,
            backend=self.backend.name,
            topology=str(scenario.topology_path),
            started_unix=started_unix,
            duration_s=duration,
            tasks=[self.tasks[i] for i in sorted(self.tasks)],
            faults=sorted(self.faults, key=lambda f: (f.planned_s, f.issued_s)),
            changes=self.changes,
            phases=scenario.phases(),
            exactly_once=verdict,
            notes=self.notes,
        )

    # ------------------------------------------------------------------ load

    async def _load(self, planned: list[PlannedTask]) -> None:
        load = self.scenario.load
        gate = asyncio.Semaphore(load.concurrency)
        step = load.duration_s / load.tasks if load.duration_s else 0.0

        async def one(task: PlannedTask) -> None:
            await self.sleep_until(task.index * step)
            async with gate:
                await self._one(task)

        await asyncio.gather(*(one(task) for task in planned))

    async def _one(self, task: PlannedTask) -> None:
        self.sent[task.index] = sent = self.now()
        try:
            answer = await self.mesh.submit(task)
        except TaskFailure as failure:
            outcome = TaskOutcome(
                task.index, task.key, failure.task_id, task.via, task.agent, sent, self.now(),
                attempts=failure.attempts, error_kind=failure.kind, error=failure.message[:500],
            )  # fmt: skip
            self.say(f"task {task.key} failed ({failure.kind}): {failure.message[:120]}")
        else:
            outcome = TaskOutcome(
                task.index, task.key, answer.task_id or task.key, task.via, task.agent, sent,
                self.now(), node=answer.node, attempts=answer.attempts,
            )  # fmt: skip
        self.tasks[task.index] = outcome
        done = len(self.tasks)
        if done % 10 == 0 or done == self.scenario.load.tasks:
            ok = sum(t.ok for t in self.tasks.values())
            self.say(f"load: {done}/{self.scenario.load.tasks} done ({ok} ok)")

    def _unfinished(self, planned: list[PlannedTask]) -> None:
        """Tasks the deadline cut short: failed, said so."""
        now = self.now()
        for task in planned:
            if task.index in self.tasks:
                continue
            sent = self.sent.get(task.index)
            kind, why = (
                ("NotStarted", "the scenario's deadline passed before it was sent")
                if sent is None
                else ("ScenarioDeadline", "the scenario's deadline passed while it ran")
            )
            self.tasks[task.index] = TaskOutcome(
                task.index, task.key, task.key if task.via == "grpc" and sent is not None else "",
                task.via, task.agent, now if sent is None else sent, now, error_kind=kind,
                error=why,
            )  # fmt: skip

    # ------------------------------------------------------------------ faults

    async def _fire(self, schedule: list[ScheduledFault]) -> None:
        put_off: dict[int, float] = {}  # per file fault: how long waiting for `busy` took
        for event in schedule:
            await self.sleep_until(event.at + (put_off.get(event.index, 0.0) * event.healing))
            if event.busy:
                put_off[event.index] = await self._until_busy(event)
            await self._apply(event, "heal" if event.healing else "scheduled")

    async def _until_busy(self, event: ScheduledFault) -> float:
        """Wait until `event`'s node has a task in flight, by its own count, up to BUSY_WAIT_S
        (then it fires anyway, with a note); the seconds waited."""
        start = self.now()
        status, fresh = self.status, False
        problem = ""
        while self.now() - start < BUSY_WAIT_S:
            address = next((n.address for n in status.nodes if n.name == event.target), "")
            try:
                if not address:
                    raise MeshError("no address")
                if await self.mesh.in_flight(event.target, address) > 0:
                    waited = self.now() - start
                    if waited > 0:
                        self.say(f"fault {event.label}: {event.target} busy after {waited:.2f} s")
                    return waited
                problem = ""
            except (MeshError, OSError) as error:
                problem = str(error)
                if not fresh:  # a restart may have moved it (a new published port): ask again
                    fresh = True
                    with contextlib.suppress(SimError):
                        path = self.scenario.topology_path
                        status = await asyncio.to_thread(self.backend.status, path)
                    continue
            await self.sleep(BUSY_POLL_S)
        waited = self.now() - start
        self.notes.append(
            f"{event.label}: {event.target} had no task in flight within {waited:.1f} s"
            + (f" ({problem})" if problem else "")
            + "; fired anyway"
        )
        return waited

    async def _apply(self, event: ScheduledFault, kind: str) -> FaultRecord:
        issued, issued_unix = self.now(), self.wall()
        result = error = ""
        call = asyncio.ensure_future(
            asyncio.to_thread(
                self.backend.fault,
                self.scenario.topology_path,
                event.target,
                event.action,
                event.value,
            )
        )
        stopping = False
        try:
            while True:
                try:
                    result = await asyncio.shield(call)
                    break
                except asyncio.CancelledError:
                    # The run is stopping (its deadline): the command goes on in its thread
                    # whatever we do, so wait for it and record what it did (a lost window for
                    # the judgement), and recovery never races it.
                    stopping = True
        except Exception as failure:  # recorded, and the run goes on: a report, not a crash
            error = f"{type(failure).__name__}: {failure}"
        record = FaultRecord(
            label=event.label if kind != "recovery" else f"end: {event.action} {event.target}",
            target=event.target,
            action=event.action,
            value=event.value,
            nodes=self.nodes_of(event.target),
            planned_s=event.at,
            issued_s=issued,
            done_s=self.now(),
            issued_unix=issued_unix,
            done_unix=self.wall(),
            result=result,
            error=error,
            kind=kind,
        )
        self.faults.append(record)
        took = f" ({record.command_s:.2f} s)" if record.command_s else ""
        self.say(f"fault {event.label}{' [' + kind + ']' if kind != 'scheduled' else ''}: "
                 f"{error or result}{took}")  # fmt: skip
        if stopping:
            raise asyncio.CancelledError
        return record

    def _unfired(self, schedule: list[ScheduledFault]) -> None:
        fired = {(f.planned_s, f.target, f.action) for f in self.faults}
        for event in schedule:
            if (event.at, event.target, event.action) not in fired:
                self.faults.append(
                    FaultRecord(
                        label=event.label,
                        target=event.target,
                        action=event.action,
                        value=event.value,
                        nodes=self.nodes_of(event.target),
                        planned_s=event.at,
                        error="not fired: the scenario's deadline passed first",
                        kind="heal" if event.healing else "scheduled",
                    )
                )

    # ------------------------------------------------------------------ watching

    async def _watch(self) -> None:
        known: dict[str, str] = {}
        last_error = ""
        while True:
            try:
                states = await self.mesh.list_nodes()
                last_error = ""
            except (MeshError, OSError) as error:
                if str(error) != last_error:
                    last_error = str(error)
                    self.say(f"coordinator's node table unreadable: {error}")
                await self.sleep(self.poll_s)
                continue
            at = self.now()
            for name in sorted(set(states) | set(known)):
                state = states.get(name, "not listed")
                if known.get(name) != state:
                    if name in known or state != "ready":
                        self.say(f"node {name}: {state}")
                    known[name] = state
                    self.changes.append(NodeChange(at, name, state))
            self.listed = dict(known)
            await self.sleep(self.poll_s)

    # ------------------------------------------------------------------ the end

    def _in_force(self) -> tuple[list[str], list[str]]:
        """(targets with a healable fault in force, nodes down) by what this run did."""
        healable: dict[str, bool] = {}
        down: dict[str, bool] = {}
        for fault in sorted(
            (f for f in self.faults if f.fired and not f.error), key=lambda f: f.issued_s
        ):
            if fault.action in HEALABLE:
                healable[fault.target] = True
            elif fault.action == "heal":
                healable[fault.target] = False
                for target in list(healable):  # a site's heal heals its nodes too
                    if set(self.nodes_of(target)) <= set(fault.nodes):
                        healable[target] = False
            elif fault.action in DOWN:
                down[fault.target] = True
            elif fault.action == "restart":
                down[fault.target] = False
                if fault.target in healable:  # a restart unpauses; a new namespace, no netem
                    healable[fault.target] = False
        return [t for t, on in healable.items() if on], [n for n, on in down.items() if on]

    async def _recover(self, target: str, action: str, kind: str = "recovery") -> None:
        event = ScheduledFault(self.now(), target, action)  # type: ignore[arg-type]
        await self._apply(event, kind)

    async def _recover_and_count(self) -> tuple[list[NodeCounts], list[str]]:
        healable, down = self._in_force()
        for target in healable:
            await self._recover(target, "heal")
        for node in down:
            await self._recover(node, "restart")
        status = await asyncio.to_thread(self.backend.status, self.scenario.topology_path)
        for sim_node in status.nodes:  # what our own record missed (a fault that failed)
            if sim_node.state in BROKEN_STATES or sim_node.state == "missing":
                await self._recover(sim_node.name, "restart")
            elif sim_node.faults or sim_node.state == "paused":
                await self._recover(sim_node.name, "heal")
        give_up = self.now() + self.recover_timeout_s
        counts: dict[str, NodeCounts] = {}
        expected = [node.name for node in self.scenario.topology.nodes]
        last_error: dict[str, str] = {}
        while True:
            status = await asyncio.to_thread(self.backend.status, self.scenario.topology_path)
            addresses = {node.name: node.address for node in status.nodes}
            for name in expected:
                if name in counts or not addresses.get(name):
                    continue
                try:
                    counts[name] = await self.mesh.node_counts(name, addresses[name])
                except (MeshError, OSError) as error:
                    last_error[name] = str(error)
            if len(counts) == len(expected) or self.now() >= give_up:
                break
            await self.sleep(0.5)
        missing = [name for name in expected if name not in counts]
        if missing:
            detail = "; ".join(f"{n}: {last_error.get(n, 'no address')}" for n in missing)
            self.say(
                f"no counts from {', '.join(missing)} within {self.recover_timeout_s:g} s ({detail})"
            )
        else:
            self.say(f"every node answered Describe; counts read from {len(counts)} nodes")
        # And the coordinator takes them back (the timeline shows it; the mesh is left whole).
        while any(self.listed.get(name) != "ready" for name in expected):
            if self.now() >= give_up:
                waiting = [n for n in expected if self.listed.get(n) != "ready"]
                self.notes.append(
                    f"at the end the coordinator did not list {', '.join(waiting)} ready "
                    f"within {self.recover_timeout_s:g} s"
                )
                break
            await self.sleep(self.poll_s)
        return [counts[name] for name in expected if name in counts], missing

    def lost_windows(self) -> list[LostWindow]:
        """When each node could not deliver results (module docstring)."""
        fired = sorted((f for f in self.faults if f.fired), key=lambda f: f.issued_s)
        windows = []
        for position, fault in enumerate(fired):
            if fault.action not in CUTTING:
                continue
            if fault.action in ("kill", "stop", "restart"):
                end = fault.done_unix
                for node in fault.nodes:
                    windows.append(LostWindow(node, fault.issued_unix, end))
                continue
            for node in fault.nodes:  # until the heal (or restart) that reached this node
                ending = next(
                    (
                        later
                        for later in fired[position + 1 :]
                        if node in later.nodes and later.action in ("heal", "restart")
                    ),
                    None,
                )
                end = ending.done_unix + RESUME_GRACE_S if ending is not None else math.inf
                windows.append(LostWindow(node, fault.issued_unix, end))
        return windows

    def _judge(self, counts: list[NodeCounts], missing: list[str]) -> ExactlyOnce:
        tasks = [self.tasks[i] for i in sorted(self.tasks)]
        judged = [t for t in tasks if t.task_id]
        kinds = {t.task_id: AGENT if t.agent else GENERATION for t in judged}
        # An answer none of whose attempts ended ok was assembled from a stream that broke
        # after its last token (mesh/coordinator/runs.py): its node sent every token asked for
        # but not its end, so it counted a start and no completion. Without that start it
        # stays a task completed on no node.
        started = {
            (n.name, task_id)
            for n in counts
            for task_id, c in n.counts.items()
            if (c.agent_runs_started if kinds.get(task_id) == AGENT else c.generations_started)
        }
        cut = [
            t
            for t in judged
            if t.ok
            and not any(a.outcome == "ok" for a in t.attempts)
            and (t.node, t.task_id) in started
        ]
        verdict = judge_exactly_once(
            [t.task_id for t in judged],
            counts,
            lost=self.lost_windows(),
            kinds=kinds,
            may_be_unfinished=[t.task_id for t in judged if not t.ok] + [t.task_id for t in cut],
        )
        result = ExactlyOnce(
            judged=len(judged) if not verdict.cannot_judge else 0,
            not_judged=[t.key for t in tasks if not t.task_id],
            twice=verdict.twice,
            never=verdict.never,
            excused=verdict.excused,
            tools_twice=verdict.tools_twice,
            problems=verdict.problems,
            cannot_judge=verdict.cannot_judge,
            missing_nodes=missing,
            cut_after_last_token=[(t.task_id, t.node) for t in cut],
        )
        for task in judged:
            on = verdict.completed_on.get(task.task_id, [])
            for node in on:
                result.completions[node] = result.completions.get(node, 0) + 1
            if task.ok and on and task.node not in on:
                result.mismatched.append(task.task_id)
        for node_counts in counts:
            result.completions.setdefault(node_counts.name, 0)
        return result
