"""The coordinator's audit summary: one JSON line per agent task, however it ended.

    {"time": "2026-01-05T10:12:04.101Z", "task_id": "task-9da0", "key_name": "kiosk-7",
     "subject": "ana@example.com", "agent": "customer-service", "outcome": "ok",
     "finish_reason": "answer", "error": "", "steps": 2, "tools": ["order_status"],
     "side_effecting_tools": [], "nodes": ["node-a"], "attempts": 1, "tier": "smollm2",
     "duration_ms": 3321.8}

`outcome` is "ok" (an answer or a result), "failed" (`error` then names the error's gRPC code,
e.g. "unavailable", never its text) or "cancelled" (the caller went away). `steps` counts
the steps of the answer (replayed ones included), `tools` the tools they called,
`side_effecting_tools` those of them that are not idempotent, `nodes` the nodes attempts went
to. Like the nodes' per-step log (`nodes/audit.py`), it names who asked (the key's name,
never the key; its subject, personal data an auditor needs) and never what was asked or
answered. Several dispatcher replicas append to the same file (`mesh.core.audit`: one write per
line); the write is small and made on the event loop.
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Callable, Iterable, Sequence

from edgemesh.v1 import node_pb2
from mesh.core.attempts import AttemptRecord
from mesh.core.audit import append_line, clip, encode_line, make_private, utc_now
from mesh.core.caller import Caller
from mesh.core.errors import ConfigError

logger = logging.getLogger(__name__)

MAX_LISTED = 16  # names listed per field (an agent runs at most 16 steps)
MAX_NAME_CHARS = 40  # per listed name: with the other fields, a line stays under 4 KiB


def _names(values: Iterable[str]) -> list[str]:
    """Distinct names in order of first appearance, clipped, at most MAX_LISTED."""
    return [clip(name, MAX_NAME_CHARS) for name in dict.fromkeys(v for v in values if v)][
        :MAX_LISTED
    ]


class TaskAudit:
    """Appends one summary line per agent task to `path`."""

    def __init__(self, path: pathlib.Path, *, clock: Callable[[], str] = utc_now) -> None:
        self.path = path
        self._clock = clock
        self.failures = 0  # lines that could not be written

    @classmethod
    def open(cls, path: pathlib.Path, *, clock: Callable[[], str] = utc_now) -> TaskAudit:
        """A summary log at `path`, created 0600 now (blocking: call at start); ConfigError
        when it cannot be."""
        try:
            make_private(path)
        except OSError as error:
            raise ConfigError(
                f"cannot create the audit log {path}: {error.strerror}; make its directory "
                "writable, or choose another audit_log"
            ) from None
        return cls(path, clock=clock)

    def task_ended(
        self,
        *,
        task_id: str,
        caller: Caller | None,
        agent: str,
        outcome: str,
        steps: Sequence[node_pb2.AgentStep],
        attempts: Sequence[AttemptRecord],
        duration_ms: float,
        finish_reason: str = "",
        error: str = "",
        tier: str = "",
    ) -> None:
        """Log one agent task that ended with `outcome` ("ok", "failed", "cancelled")."""
        calls = [s for s in steps if s.kind == "tool_call"]
        record: dict[str, object] = {
            "time": self._clock(),
            "task_id": clip(task_id),
            "key_name": clip(caller.key_name) if caller is not None else "",
            "subject": clip(caller.subject) if caller is not None else "",
            "agent": clip(agent),
            "outcome": outcome,
            "finish_reason": clip(finish_reason, 32),
            "error": clip(error, 32),
            "steps": len(steps),
            "tools": _names(s.call.tool for s in calls),
            "side_effecting_tools": _names(s.call.tool for s in calls if not s.idempotent),
            "nodes": _names(a.node_name or a.node_id for a in attempts),
            "attempts": len(attempts),
            "tier": clip(tier, 64),
            "duration_ms": round(duration_ms, 1),
        }
        try:
            append_line(self.path, encode_line(record))
        except OSError as problem:
            self.failures += 1
            if self.failures == 1:  # once: a full disk would otherwise log every task
                logger.error("cannot append to the audit log %s: %s", self.path, problem)
