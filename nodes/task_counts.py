"""What this node did, per task id: counted where it happens, so exactly-once can be checked
from the nodes' side instead of from the coordinator's own records.

    counts = TaskCounts.open(kept=4096, journal=state_dir / "task-counts.jsonl")
    counts.record(task_id, TaskEvent.GENERATION_STARTED)
    ...
    reply.task_counts.extend(counts.to_proto())          # Describe(task_counts=true)

Per task id: generations and agent runs started (admitted) and completed (the final chunk or
the result is about to be sent), and executions of side-effecting tools by name. Only the
`kept` most recently touched task ids are kept; `evicted` says how many were dropped, so a
reader can tell whether the window covers everything the node ran.

The journal makes the counts outlive the process: each event is appended to it (one short
line, one unbuffered `os.write` to the page cache: the cost of a log line) *before* it takes
effect outside, so a node killed at any moment has counted at least what it sent, and a restart
from the same state directory reads the counts back. It is rewritten from the counts when it
grows past `COMPACT_FACTOR * kept` lines. A journal that cannot be written is given up with one
warning; the counts then live in memory only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from edgemesh.v1 import node_pb2

logger = logging.getLogger(__name__)

COMPACT_FACTOR = 4  # journal lines per kept task id before it is rewritten
JOURNAL_NAME = "task-counts.jsonl"


class TaskEvent(StrEnum):
    """Something a node did for a task."""

    GENERATION_STARTED = "generation_started"
    GENERATION_COMPLETED = "generation_completed"
    AGENT_RUN_STARTED = "agent_run_started"
    AGENT_RUN_COMPLETED = "agent_run_completed"
    SIDE_EFFECT_TOOL_RUN = "side_effect_tool_run"  # with the tool's name


_FIELDS = {
    TaskEvent.GENERATION_STARTED: "generations_started",
    TaskEvent.GENERATION_COMPLETED: "generations_completed",
    TaskEvent.AGENT_RUN_STARTED: "agent_runs_started",
    TaskEvent.AGENT_RUN_COMPLETED: "agent_runs_completed",
}
_COMPLETIONS = frozenset({TaskEvent.GENERATION_COMPLETED, TaskEvent.AGENT_RUN_COMPLETED})


@dataclass
class TaskCount:
    """The counts of one task id (mirrors `node_pb2.TaskCount`)."""

    generations_started: int = 0
    generations_completed: int = 0
    agent_runs_started: int = 0
    agent_runs_completed: int = 0
    side_effect_tool_runs: dict[str, int] = field(default_factory=dict)
    last_completed_unix_s: float = 0.0

    def add(self, event: TaskEvent, tool: str, at: float) -> None:
        if event is TaskEvent.SIDE_EFFECT_TOOL_RUN:
            self.side_effect_tool_runs[tool] = self.side_effect_tool_runs.get(tool, 0) + 1
            return
        name = _FIELDS[event]
        setattr(self, name, getattr(self, name) + 1)
        if event in _COMPLETIONS:
            self.last_completed_unix_s = at

    def to_proto(self, task_id: str) -> node_pb2.TaskCount:
        return node_pb2.TaskCount(task_id=task_id, **dataclasses.asdict(self))


class TaskCounts:
    """Counts for the `kept` most recently touched task ids, optionally journaled to a file."""

    def __init__(
        self,
        *,
        kept: int = 4096,
        journal: pathlib.Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if kept < 1:
            raise ValueError(f"kept must be at least 1, got {kept}")
        self.kept = kept
        self.evicted = 0
        self.journal = journal
        self._clock = clock
        self._counts: OrderedDict[str, TaskCount] = OrderedDict()
        self._fd: int | None = None
        self._lines = 0

    @classmethod
    def open(
        cls,
        *,
        kept: int = 4096,
        journal: pathlib.Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> TaskCounts:
        """Counts read back from `journal` (if it exists), which is then compacted and kept
        open for appending. Blocking file I/O: call before serving."""
        counts = cls(kept=kept, journal=journal, clock=clock)
        if journal is not None:
            counts._replay(journal)
            counts._compact()
        return counts

    # ------------------------------------------------------------------ counting

    def record(self, task_id: str, event: TaskEvent, *, tool: str = "") -> None:
        """Count `event` for `task_id` (nothing for an empty id: no task to attribute it to)."""
        if not task_id:
            return
        at = self._clock()
        self._write({"t": task_id, "e": event.value, "tool": tool, "at": at})
        self._apply(task_id, event, tool, at)
        if self._fd is not None and self._lines > COMPACT_FACTOR * self.kept:
            self._compact()

    def get(self, task_id: str) -> TaskCount:
        """A copy of `task_id`'s counts (all zero when unknown or evicted)."""
        count = self._counts.get(task_id)
        return dataclasses.replace(count) if count is not None else TaskCount()

    def task_ids(self) -> list[str]:
        """Kept task ids, least recently touched first."""
        return list(self._counts)

    def to_proto(self) -> list[node_pb2.TaskCount]:
        return [count.to_proto(task_id) for task_id, count in self._counts.items()]

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    # ------------------------------------------------------------------ mechanism

    def _apply(self, task_id: str, event: TaskEvent, tool: str, at: float) -> None:
        count = self._counts.get(task_id)
        if count is None:
            count = self._counts[task_id] = TaskCount()
        else:
            self._counts.move_to_end(task_id)
        count.add(event, tool, at)
        self._apply_limit()

    def _write(self, entry: dict[str, object]) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, (json.dumps(entry, separators=(",", ":")) + "\n").encode())
        except OSError as error:  # disk full, file system gone: keep counting in memory
            self._give_up(error)
            return
        self._lines += 1

    def _give_up(self, error: OSError) -> None:
        logger.warning(
            "task counts: cannot write %s (%s); counting in memory only from now on",
            self.journal,
            error.strerror or error,
        )
        self.close()

    def _replay(self, path: pathlib.Path) -> None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        except OSError as error:
            logger.warning("task counts: cannot read %s (%s)", path, error.strerror or error)
            return
        skipped = 0
        for line in text.splitlines():
            try:
                self._replay_line(json.loads(line))
            except (ValueError, KeyError, TypeError):  # a line cut by a crash, or foreign data
                skipped += 1
        if skipped:
            logger.warning("task counts: skipped %d unreadable line(s) of %s", skipped, path)

    def _replay_line(self, entry: dict[str, Any]) -> None:
        """One journal line: an event, a compacted task, or the eviction count."""
        if "evicted" in entry:
            self.evicted += int(entry["evicted"])
            return
        task_id = str(entry["t"])
        if "count" in entry:
            self._counts.pop(task_id, None)
            self._counts[task_id] = TaskCount(**entry["count"])
            self._apply_limit()
            return
        event = TaskEvent(str(entry["e"]))
        self._apply(task_id, event, str(entry.get("tool", "")), float(entry["at"]))

    def _apply_limit(self) -> None:
        while len(self._counts) > self.kept:
            self._counts.popitem(last=False)
            self.evicted += 1

    def _compact(self) -> None:
        """Rewrite the journal as one line per kept task (plus the eviction count), then
        append to the new file."""
        assert self.journal is not None
        self.close()
        lines = [json.dumps({"evicted": self.evicted})]
        lines += [
            json.dumps({"t": task_id, "count": dataclasses.asdict(count)}, separators=(",", ":"))
            for task_id, count in self._counts.items()
        ]
        temporary = self.journal.with_name(self.journal.name + ".tmp")
        try:
            self.journal.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text("\n".join(lines) + "\n", encoding="utf-8")
            os.replace(temporary, self.journal)
            self._fd = os.open(self.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as error:
            self._give_up(error)
            return
        self._lines = len(lines)
