"""What a scenario run found (`mesh sim run`): the raw record of the run and the figures drawn
from it, as text for people (`render_text`) and as JSON with stable keys (`to_json`).

The record: every task (when it was sent and finished, through which ingress, who answered, each
attempt, the error), every fault (when it was asked for, how long the backend took), every change
of a node's state in the coordinator's table, and the nodes' own verdict on exactly-once
(mesh/sim/counts.py). Times are seconds from the start of the run (the monotonic clock), except
`started_unix` and the fault's `*_unix` (wall clock: the nodes stamp their counts with it).

The figures, defined here once:

- tasks: total, ok, failed, and failures by error kind (the exception's class name).
- answered twice: tasks that the nodes' own counts say ran to completion more than once, beyond
  what a lost window excuses; `excused`: completions beyond the first that happened on a node
  while it was cut off (killed, paused, partitioned, losing packets), stated separately;
  `cut_after_last_token`: answers whose node sent every token asked for and was cut before it
  sent its end (the coordinator's answer is whole; the node counts a start, no completion).
- per-node load: tasks answered per node by the coordinator's answers, and completions per node
  by the nodes' own counts (over this run's task ids; excused completions included).
- per fault (`fault_figures`), with T the moment the runner asked the backend for the fault, N
  the nodes it touched, and T' the next fault touching one of N (or the end of the run):
  `not_ready_s`: from T to the first time the coordinator's table (polled every 0.25 s) lists a
  node of N in a state other than ready, before T'; `reroute_s`: from T to the first answer
  (before T') of a task that had a failed attempt on a node of N and was answered by a node
  outside N; `ready_s` (restart, heal): from T to the coordinator listing every node of N ready
  again, after it left ready at or after T (or was not ready at T). Each is None when it did not
  happen; each is measured from T, so it includes the backend's own command time (`command_s`).
- latency per phase: of the tasks answered ok whose answer arrived in the phase, the p50 and p99
  of (finished - sent), nearest rank (p99 of 10 answers is the slowest of them).
- via: the same per ingress (grpc, openai).
"""

from __future__ import annotations

import datetime
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from mesh.sim.scenario import Phase

REROUTE_ACTIONS = ("kill", "stop", "pause", "partition", "delay", "loss")
RESTORE_ACTIONS = ("restart", "heal")


@dataclass(frozen=True)
class AttemptView:
    """One attempt at a task, as the coordinator reported it."""

    node: str
    outcome: str  # ok, unavailable, timeout, overloaded, error, cancelled
    ms: float = 0.0


@dataclass(frozen=True)
class TaskOutcome:
    """One task of the load and how it ended."""

    index: int
    key: str  # the idempotency key the runner chose (and the task id, through gRPC)
    task_id: str  # the coordinator's task id ("" when a failure never named it)
    via: str  # grpc or openai
    agent: str  # "" for a plain generation
    sent_s: float
    finished_s: float
    node: str = ""  # the node that answered ("" when failed)
    attempts: tuple[AttemptView, ...] = ()
    error_kind: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error_kind

    @property
    def latency_s(self) -> float:
        return self.finished_s - self.sent_s


@dataclass(frozen=True)
class FaultRecord:
    """One fault as fired (or not): the file's, a `for` heal, or a recovery at the end."""

    label: str
    target: str
    action: str
    value: float | None
    nodes: tuple[str, ...]  # the nodes the target names
    planned_s: float
    issued_s: float = math.nan
    done_s: float = math.nan
    issued_unix: float = math.nan
    done_unix: float = math.nan
    result: str = ""  # the backend's line
    error: str = ""  # why it failed, or was not fired
    kind: str = "scheduled"  # scheduled, heal (from `for`), recovery (the runner, at the end)

    @property
    def fired(self) -> bool:
        return not math.isnan(self.issued_s)

    @property
    def command_s(self) -> float | None:
        return None if math.isnan(self.done_s) else self.done_s - self.issued_s


@dataclass(frozen=True)
class NodeChange:
    """The coordinator's table listed `node` in `state` from `at_s` on ("not listed": absent)."""

    at_s: float
    node: str
    state: str


@dataclass(frozen=True)
class TimelineEvent:
    at_s: float
    kind: str  # fault, node, task, note
    subject: str
    detail: str


@dataclass
class ExactlyOnce:
    """The nodes' own verdict (mesh/sim/counts.py) over this run's tasks."""

    judged: int = 0  # task ids judged
    not_judged: list[str] = field(default_factory=list)  # keys of failed tasks with no task id
    twice: list[str] = field(default_factory=list)
    never: list[str] = field(default_factory=list)  # answered, yet no node counts a completion
    excused: list[tuple[str, str]] = field(default_factory=list)  # (task id, node)
    tools_twice: dict[str, dict[str, int]] = field(default_factory=dict)
    mismatched: list[str] = field(default_factory=list)  # answered by a node that counts none
    problems: list[str] = field(default_factory=list)
    cannot_judge: str = ""
    missing_nodes: list[str] = field(default_factory=list)  # never answered Describe
    completions: dict[str, int] = field(default_factory=dict)  # node -> completions counted
    # (task id, node): answered whole from a stream cut after its last token (module docstring)
    cut_after_last_token: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.problems or self.mismatched or self.cannot_judge or self.missing_nodes)


@dataclass(frozen=True)
class FaultFigures:
    """What one fault did to the mesh (see the module's docstring for the definitions)."""

    fault: FaultRecord
    not_ready_s: float | None
    reroute_s: float | None
    ready_s: float | None
    affected: int  # tasks with a failed attempt on its nodes, finished before the next fault


@dataclass(frozen=True)
class Figures:
    """Tasks, latency and count of a group of tasks (a phase, an ingress)."""

    name: str
    tasks: int
    ok: int
    failed: int
    p50_s: float | None
    p99_s: float | None


@dataclass
class Report:
    """A scenario run: the record, and the figures (methods) drawn from it."""

    scenario: str
    backend: str
    topology: str
    started_unix: float
    duration_s: float
    tasks: list[TaskOutcome] = field(default_factory=list)
    faults: list[FaultRecord] = field(default_factory=list)
    changes: list[NodeChange] = field(default_factory=list)
    phases: list[Phase] = field(default_factory=list)
    exactly_once: ExactlyOnce = field(default_factory=ExactlyOnce)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> list[TaskOutcome]:
        return [task for task in self.tasks if task.ok]

    @property
    def failed(self) -> list[TaskOutcome]:
        return [task for task in self.tasks if not task.ok]

    def error_kinds(self) -> dict[str, int]:
        return dict(sorted(Counter(task.error_kind for task in self.failed).items()))

    def answered_per_node(self) -> dict[str, int]:
        return dict(sorted(Counter(task.node for task in self.ok).items()))

    def phase_figures(self) -> list[Figures]:
        """Per phase: the tasks that finished in it (answered or failed), latency of the ok."""
        return [
            figures(phase.name, [t for t in self.tasks if phase.holds(t.finished_s)])
            for phase in self.phases
        ]

    def via_figures(self) -> list[Figures]:
        vias = sorted({task.via for task in self.tasks}, key=lambda v: (v != "grpc", v))
        return [figures(via, [t for t in self.tasks if t.via == via]) for via in vias]

    def fault_figures(self) -> list[FaultFigures]:
        return fault_figures(self.faults, self.tasks, self.changes, end_s=self.duration_s)

    def timeline(self) -> list[TimelineEvent]:
        """Faults, node state changes and task outcomes, in order of time."""
        events = [
            TimelineEvent(change.at_s, "node", change.node, change.state) for change in self.changes
        ]
        for fault in self.faults:
            if fault.fired:
                detail = f"{fault.action}{_value(fault)}: {fault.error or fault.result}"
                if fault.kind != "scheduled":
                    detail += f" ({fault.kind})"
                events.append(TimelineEvent(fault.issued_s, "fault", fault.target, detail))
            else:
                events.append(
                    TimelineEvent(
                        fault.planned_s, "fault", fault.target, f"{fault.action}: {fault.error}"
                    )
                )
        for task in self.tasks:
            if task.ok:
                detail = f"answered by {task.node} in {task.latency_s:.2f} s{_path(task)}"
            else:
                detail = f"failed ({task.error_kind}) after {task.latency_s:.2f} s: {task.error}"
            events.append(TimelineEvent(task.finished_s, "task", task.key, detail))
        order = {"fault": 0, "node": 1, "task": 2, "note": 3}
        return sorted(events, key=lambda e: (e.at_s, order.get(e.kind, 9)))


def percentile(values: Sequence[float], p: float) -> float | None:
    """The nearest-rank p-th percentile (0 < p <= 100): the smallest value with at least p% of
    the values at or below it. None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def figures(name: str, tasks: Sequence[TaskOutcome]) -> Figures:
    latencies = [task.latency_s for task in tasks if task.ok]
    return Figures(
        name,
        len(tasks),
        len(latencies),
        len(tasks) - len(latencies),
        percentile(latencies, 50),
        percentile(latencies, 99),
    )


def _state_at(changes: Sequence[NodeChange], node: str, at_s: float) -> str:
    state = "not seen"
    for change in changes:
        if change.node == node and change.at_s <= at_s:
            state = change.state
    return state


def fault_figures(
    faults: Sequence[FaultRecord],
    tasks: Sequence[TaskOutcome],
    changes: Sequence[NodeChange],
    *,
    end_s: float,
) -> list[FaultFigures]:
    """Per fired fault, its not-ready, reroute and ready-again times (module docstring)."""
    fired = sorted((f for f in faults if f.fired), key=lambda f: f.issued_s)
    ordered_changes = sorted(changes, key=lambda c: c.at_s)
    found = []
    for position, fault in enumerate(fired):
        start = fault.issued_s
        nodes = set(fault.nodes)
        until = next(
            (later.issued_s for later in fired[position + 1 :] if nodes & set(later.nodes)),
            math.inf,
        )
        until = max(until, start)
        window = [c for c in ordered_changes if c.node in nodes and start <= c.at_s < until]
        not_ready = next((c.at_s - start for c in window if c.state != "ready"), None)
        hit = [
            task
            for task in tasks
            if start <= task.finished_s < until
            and any(a.node in nodes and a.outcome != "ok" for a in task.attempts)
        ]
        rerouted = [t.finished_s - start for t in hit if t.ok and t.node not in nodes]
        ready = None
        if fault.action in RESTORE_ACTIONS and nodes:
            ready = _ready_again(
                fault, nodes, ordered_changes, until if until < math.inf else end_s + 1
            )
        found.append(
            FaultFigures(
                fault,
                not_ready if fault.action in REROUTE_ACTIONS else None,
                min(rerouted) if rerouted and fault.action in REROUTE_ACTIONS else None,
                ready,
                len(hit),
            )
        )
    return found


def _ready_again(
    fault: FaultRecord, nodes: Iterable[str], changes: Sequence[NodeChange], until: float
) -> float | None:
    start = fault.issued_s
    latest = 0.0
    for node in nodes:
        left = _state_at(changes, node, start) != "ready"
        back = None
        for change in changes:
            if change.node != node or not start <= change.at_s < until:
                continue
            if change.state != "ready":
                left = True
            elif left:
                back = change.at_s
                break
        if back is None:
            return None
        latest = max(latest, back - start)
    return latest


def _value(fault: FaultRecord) -> str:
    if fault.value is None:
        return ""
    return f" {fault.value:g}{'ms' if fault.action == 'delay' else '%'}"


def _path(task: TaskOutcome) -> str:
    if len(task.attempts) <= 1:
        return ""
    return " after " + ", ".join(f"{a.node} {a.outcome}" for a in task.attempts[:-1])


def _seconds(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f} s"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"


def _table(
    headers: Sequence[str], rows: Iterable[Sequence[str]], *, left: Sequence[int] = (0,)
) -> list[str]:
    """Aligned columns: those in `left` left-aligned (text), the others right-aligned (figures)."""
    table = [list(headers)] + [list(row) for row in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    lines = []
    indent = "  "
    for row in table:
        cells = [
            cell.ljust(widths[i]) if i in left else cell.rjust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines


def render_text(report: Report, *, timeline_tasks: bool = False) -> str:
    """The report for people: aligned columns; the timeline shows faults, node changes and
    failed tasks (every answer too with `timeline_tasks`; all of it is in `to_json`)."""
    started = datetime.datetime.fromtimestamp(report.started_unix, tz=datetime.UTC)
    lines = [
        f"Scenario {report.scenario} on {report.backend} ({report.topology})",
        f"started {started:%Y-%m-%d %H:%M:%S} UTC, ran {report.duration_s:.1f} s",
        "",
    ]
    failed = report.failed
    lines.append(f"Tasks: {len(report.tasks)}, ok {len(report.ok)}, failed {len(failed)}")
    if failed:
        kinds = ", ".join(f"{kind} {n}" for kind, n in report.error_kinds().items())
        lines.append(f"  failures by kind: {kinds}")
    lines += ["", *_exactly_once_lines(report.exactly_once), ""]

    lines.append("Load per node")
    answered = report.answered_per_node()
    counted = report.exactly_once.completions
    names = sorted(set(answered) | set(counted))
    lines += _table(
        ("node", "answered", "completed (node's count)"),
        ((n, str(answered.get(n, 0)), str(counted.get(n, "-"))) for n in names),
    )
    lines.append("")

    fault_rows = report.fault_figures()
    if fault_rows or report.faults:
        lines.append("Faults (times from the moment the runner asked for the fault)")
        rows = [
            (
                f.fault.label + ("" if f.fault.kind == "scheduled" else f" ({f.fault.kind})"),
                _seconds(f.fault.issued_s),
                _seconds(f.fault.command_s),
                _seconds(f.not_ready_s),
                _seconds(f.reroute_s),
                _seconds(f.ready_s),
                str(f.affected),
                "failed: " + f.fault.error if f.fault.error else "",
            )
            for f in fault_rows
        ]
        rows += [
            (fault.label, "not fired", "-", "-", "-", "-", "-", fault.error)
            for fault in report.faults
            if not fault.fired
        ]
        lines += _table(
            ("fault", "at", "command", "not ready", "rerouted", "ready again", "tasks hit", ""),
            rows,
            left=(0, 7),
        )
        lines.append("")

    lines.append("Latency per phase (answers arriving in it)")
    lines += _figure_table("phase", report.phase_figures())
    lines.append("")
    lines.append("Per ingress")
    lines += _figure_table("via", report.via_figures())
    lines.append("")

    lines.append("Timeline")
    shown = [
        e
        for e in report.timeline()
        if e.kind != "task" or timeline_tasks or e.detail.startswith("failed")
    ]
    hidden = sum(1 for e in report.timeline() if e.kind == "task") - sum(
        1 for e in shown if e.kind == "task"
    )
    lines += _table(
        ("at", "what", "who", "detail"),
        ((f"+{e.at_s:.2f} s", e.kind, e.subject, e.detail) for e in shown),
        left=(1, 2, 3),
    )
    if hidden:
        lines.append(f"  ({hidden} answers not shown; every one is in the JSON report)")
    if report.notes:
        lines += ["", "Notes", *(f"  {note}" for note in report.notes)]
    return "\n".join(lines) + "\n"


def _figure_table(title: str, rows: Sequence[Figures]) -> list[str]:
    return _table(
        (title, "tasks", "ok", "failed", "p50", "p99"),
        (
            (f.name, str(f.tasks), str(f.ok), str(f.failed), _ms(f.p50_s), _ms(f.p99_s))
            for f in rows
        ),
    )


def _exactly_once_lines(verdict: ExactlyOnce) -> list[str]:
    lines = [
        "Exactly once, by the nodes' own counts",
        f"  {verdict.judged} tasks judged: answered twice {len(verdict.twice)}, "
        f"excused {len(verdict.excused)} (finished on a node while it was cut off, whose "
        "result could not get out)",
    ]
    if verdict.cannot_judge:
        lines.append(f"  CANNOT JUDGE: {verdict.cannot_judge}")
    if verdict.missing_nodes:
        lines.append(
            f"  INCOMPLETE: no counts from {', '.join(verdict.missing_nodes)} "
            "(never answered Describe)"
        )
    for task_id, node in verdict.excused:
        lines.append(f"  excused: {task_id} on {node}")
    for task_id, node in verdict.cut_after_last_token:
        lines.append(
            f"  cut after its last token: {task_id} on {node} (answered whole; the node "
            "counts a start, no completion)"
        )
    for problem in verdict.problems:
        lines.append(f"  PROBLEM: {problem}")
    for task_id in verdict.mismatched:
        lines.append(f"  PROBLEM: {task_id}: answered by a node that counts no completion of it")
    if verdict.not_judged:
        lines.append(
            f"  not judged: {len(verdict.not_judged)} failed tasks the coordinator never named "
            f"({', '.join(verdict.not_judged[:5])}{' ...' if len(verdict.not_judged) > 5 else ''})"
        )
    return lines


def _num(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else round(value, 4)


def _figures_json(f: Figures) -> dict[str, object]:
    return {
        "name": f.name,
        "tasks": f.tasks,
        "ok": f.ok,
        "failed": f.failed,
        "p50_s": _num(f.p50_s),
        "p99_s": _num(f.p99_s),
    }


def to_json(report: Report) -> dict[str, object]:
    """The report as JSON-ready data; the keys are stable (add, never rename)."""
    verdict = report.exactly_once
    return {
        "scenario": report.scenario,
        "backend": report.backend,
        "topology": report.topology,
        "started_unix": report.started_unix,
        "duration_s": _num(report.duration_s),
        "tasks": {
            "total": len(report.tasks),
            "ok": len(report.ok),
            "failed": len(report.failed),
            "errors": report.error_kinds(),
        },
        "exactly_once": {
            "ok": verdict.ok,
            "judged": verdict.judged,
            "answered_twice": len(verdict.twice),
            "twice": verdict.twice,
            "excused": [{"task_id": t, "node": n} for t, n in verdict.excused],
            "never_completed": verdict.never,
            "answered_by_node_without_count": verdict.mismatched,
            "tools_twice": verdict.tools_twice,
            "problems": verdict.problems,
            "cannot_judge": verdict.cannot_judge,
            "missing_nodes": verdict.missing_nodes,
            "not_judged": verdict.not_judged,
            "cut_after_last_token": [
                {"task_id": t, "node": n} for t, n in verdict.cut_after_last_token
            ],
        },
        "nodes": {
            name: {
                "answered": report.answered_per_node().get(name, 0),
                "completed": verdict.completions.get(name),
            }
            for name in sorted(set(report.answered_per_node()) | set(verdict.completions))
        },
        "faults": [
            {
                "label": f.fault.label,
                "kind": f.fault.kind,
                "target": f.fault.target,
                "action": f.fault.action,
                "value": f.fault.value,
                "nodes": list(f.fault.nodes),
                "planned_s": f.fault.planned_s,
                "issued_s": _num(f.fault.issued_s),
                "command_s": _num(f.fault.command_s),
                "issued_unix": _num(f.fault.issued_unix),
                "done_unix": _num(f.fault.done_unix),
                "result": f.fault.result,
                "error": f.fault.error,
                "not_ready_s": _num(f.not_ready_s),
                "reroute_s": _num(f.reroute_s),
                "ready_s": _num(f.ready_s),
                "tasks_hit": f.affected,
            }
            for f in report.fault_figures()
        ],
        "faults_not_fired": [
            {"label": f.label, "error": f.error} for f in report.faults if not f.fired
        ],
        "phases": [
            {
                **_figures_json(figure),
                "from_s": phase.start_s,
                "to_s": None if math.isinf(phase.end_s) else phase.end_s,
            }
            for phase, figure in zip(report.phases, report.phase_figures(), strict=True)
        ],
        "via": [_figures_json(f) for f in report.via_figures()],
        "timeline": [
            {"at_s": round(e.at_s, 4), "kind": e.kind, "subject": e.subject, "detail": e.detail}
            for e in report.timeline()
        ],
        "task_list": [
            {
                "index": t.index,
                "key": t.key,
                "task_id": t.task_id,
                "via": t.via,
                "agent": t.agent,
                "sent_s": round(t.sent_s, 4),
                "finished_s": round(t.finished_s, 4),
                "node": t.node,
                "attempts": [
                    {"node": a.node, "outcome": a.outcome, "ms": a.ms} for a in t.attempts
                ],
                "error_kind": t.error_kind,
                "error": t.error,
            }
            for t in report.tasks
        ],
        "notes": report.notes,
    }
