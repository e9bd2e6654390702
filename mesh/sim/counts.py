"""Exactly-once, judged from the nodes' own counts (`Describe` with `task_counts`), not from the
coordinator's records: what a simulation's report says about tasks answered twice.

    counts = [await node_counts(name, address) for name, address in every_node]
    verdict = judge_exactly_once(task_ids, counts, lost=[LostWindow("node-c", cut, back)])
    verdict.ok, verdict.problems, verdict.twice, verdict.excused

The argument, for a set of tasks, that the judgement is complete and can fail:

- Every node that could have run one of the tasks is asked, each in its own words: a node that
  is still up through Describe; a node that was killed through a restart from its state
  directory, whose journal (nodes/task_counts.py) has every count it made before it died, and
  a node counts a completion *before* it sends the result, so nothing it sent is missing.
- No node dropped a task id from its window (`task_counts_evicted == 0`); a node that did makes
  the verdict "cannot judge", never "exactly once".
- So the sum over nodes of a task's completions is every time the task ran to its end. It must
  be 1: a coordinator that ran the task twice, on two nodes or twice on one, makes it 2.

One exception is inherent, and bounded: a node cut off (killed, paused, or its link gone) may
finish a task whose result can no longer reach the coordinator, which then, rightly, runs it
elsewhere. Such a completion is excused only when it happened on that node inside one of its
`LostWindow`s (from `SEND_WINDOW_S` before the cut, for a result that was still on its way out,
until the node was back): a second completion anywhere else, or at any other time, is a
problem. Excused completions are listed in the verdict, never dropped.

Side-effecting tools: the sum over nodes of each tool's executions for a task is at most one;
no exception (a replayed step is never an execution).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from google.protobuf import json_format

from edgemesh.v1 import node_pb2

# A result counted this long before a node was cut off may still have been on its way out (the
# node's loop, its gRPC send, the kernel): a generous bound on 2 busy cores.
SEND_WINDOW_S = 0.5

GENERATION = "generation"
AGENT = "agent"


@dataclass(frozen=True)
class NodeCounts:
    """One node's own counts, as its Describe reported them."""

    name: str
    counts: dict[str, node_pb2.TaskCount]
    evicted: int

    @classmethod
    def from_describe(cls, name: str, reply: node_pb2.DescribeResponse) -> NodeCounts:
        return cls(name, {c.task_id: c for c in reply.task_counts}, reply.task_counts_evicted)

    @classmethod
    def from_json(cls, name: str, text: str) -> NodeCounts:
        """From `mesh node describe --task-counts --json`."""
        reply = json_format.Parse(text, node_pb2.DescribeResponse(), ignore_unknown_fields=True)
        return cls.from_describe(name, reply)

    def get(self, task_id: str) -> node_pb2.TaskCount:
        return self.counts.get(task_id, node_pb2.TaskCount(task_id=task_id))


@dataclass(frozen=True)
class LostWindow:
    """A node could not deliver results from `cut_unix_s` (less SEND_WINDOW_S) until
    `back_unix_s` (killed: the kill itself). A node may have several (killed, then paused)."""

    node: str
    cut_unix_s: float
    back_unix_s: float

    def covers(self, count: node_pb2.TaskCount) -> bool:
        return self.cut_unix_s - SEND_WINDOW_S <= count.last_completed_unix_s <= self.back_unix_s

    def excuses(self, count: node_pb2.TaskCount, completed: int) -> bool:
        return completed == 1 and self.covers(count)


async def node_counts(name: str, address: str, *, timeout_s: float = 10.0) -> NodeCounts:
    """Ask a running node (Describe with task_counts)."""
    from mesh.client import NodeClient

    async with NodeClient(address) as client:
        reply = await client.describe(task_counts=True, timeout_s=timeout_s)
    return NodeCounts.from_describe(name, reply)


@dataclass
class Verdict:
    """What the judgement found.

    `completed_on`: per task, a node once per completion; `excused`: (task id, node) of each
    completion beyond the first that a lost window excuses; `twice`: tasks completed more than
    once beyond what is excused; `never`: tasks that had to complete and did on no node;
    `tools_twice`: tasks whose side-effecting tools ran more than once; `problems`: one line
    each, for people; `cannot_judge`: why no judgement was possible ("" when it was)."""

    completed_on: dict[str, list[str]] = field(default_factory=dict)
    excused: list[tuple[str, str]] = field(default_factory=list)
    started: int = 0
    twice: list[str] = field(default_factory=list)
    never: list[str] = field(default_factory=list)
    tools_twice: dict[str, dict[str, int]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    cannot_judge: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems and not self.cannot_judge


def _completed(count: node_pb2.TaskCount, kind: str) -> int:
    return count.agent_runs_completed if kind == AGENT else count.generations_completed


def judge_exactly_once(
    task_ids: Iterable[str],
    nodes: Sequence[NodeCounts],
    *,
    lost: Sequence[LostWindow] = (),
    kind: str = GENERATION,
    kinds: Mapping[str, str] | None = None,
    may_be_unfinished: Iterable[str] = (),
) -> Verdict:
    """Judge, from the nodes' counts, whether each task ran to completion exactly once, and
    that no side-effecting tool ran twice for a task. Never raises for what it finds.

    `kind`: "generation" or "agent", for every task; `kinds`: per task id, overriding it (a
    mixed load). `may_be_unfinished`: tasks for which no completion is right too — failed
    tasks, or answers assembled from a stream that broke after its last token; at most one
    completion (beyond the excused) is still the rule for them."""
    verdict = Verdict()
    if not nodes:
        verdict.cannot_judge = "no node's counts to judge by"
        return verdict
    dropped = {n.name: n.evicted for n in nodes if n.evicted}
    if dropped:
        verdict.cannot_judge = f"nodes dropped task ids from their counts: {dropped}"
        return verdict
    windows: dict[str, list[LostWindow]] = {}
    for window in lost:
        windows.setdefault(window.node, []).append(window)
    unfinished = set(may_be_unfinished)
    for task_id in task_ids:
        task_kind = (kinds or {}).get(task_id, kind)
        on: list[str] = []  # a node once per completion
        excusable: list[str] = []
        tools: dict[str, int] = {}
        for node in nodes:
            count = node.get(task_id)
            verdict.started += (
                count.agent_runs_started if task_kind == AGENT else count.generations_started
            )
            for tool, runs in count.side_effect_tool_runs.items():
                tools[tool] = tools.get(tool, 0) + runs
            completed = _completed(count, task_kind)
            on += [node.name] * completed
            if any(w.excuses(count, completed) for w in windows.get(node.name, ())):
                excusable.append(node.name)
        verdict.completed_on[task_id] = on
        # Delivered once: at least one completion, and every completion beyond one is a result
        # that could not get out of a node cut off at that moment.
        extra = len(on) - 1
        if not on and task_id not in unfinished:
            verdict.never.append(task_id)
            verdict.problems.append(f"{task_id}: completed on no node")
        elif extra > len(excusable):
            verdict.twice.append(task_id)
            verdict.problems.append(
                f"{task_id}: completed on {on} (could not deliver: {excusable or 'none'})"
            )
        elif extra > 0:
            verdict.excused += [(task_id, name) for name in excusable[:extra]]
        twice = {tool: runs for tool, runs in tools.items() if runs > 1}
        if twice:
            verdict.tools_twice[task_id] = twice
            verdict.problems.append(f"{task_id}: side-effecting tools ran more than once: {twice}")
    return verdict
