"""The node's audit log: one JSON line per agent step this node executed.

    audit = AuditLog.open(state_dir / AUDIT_FILE, node_id="48c17e5c9ce2")
    audit.step(task, index=0, kind="tool_call", tool="order_status", side_effecting=False,
               outcome=StepOutcome.OK, model="smollm2")

appends to `<state_dir>/audit.jsonl` (created 0600: it names people):

    {"time": "2026-01-05T10:12:03.512Z", "task_id": "task-9da0", "attempt": 1,
     "node_id": "48c17e5c9ce2", "agent": "customer-service", "step": 0, "kind": "tool_call",
     "tool": "order_status", "side_effecting": false, "outcome": "ok",
     "key_name": "kiosk-7", "subject": "ana@example.com", "model": "smollm2"}

What a line holds is who asked (the API key's name, never the key; the key's subject, which
is personal data such as an email: an auditor needs to know who, so the file is its owner's
only), what ran (agent, step, tool, whether it has side effects) and how it ended (`outcome`,
a class: never the tool's arguments, its result or the error's text, and never the user's
words: those hold personal data of anyone the user names, and the node's store keeps what the
tools did). Steps replayed from another node after a failover ran there and are logged there,
never here. A tool call cancelled while it ran (the caller went away) is logged "cancelled": it
may have acted.

Lines are appended as `mesh.core.audit` says (one write each, the file 0600). A write that
fails is logged once and the node goes on serving.
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING

from mesh.core.audit import AUDIT_FILE, append_line, clip, encode_line, make_private, utc_now
from mesh.core.errors import ConfigError

if TYPE_CHECKING:
    from nodes.agents.records import AgentTask

logger = logging.getLogger(__name__)

__all__ = ["AUDIT_FILE", "AuditLog", "StepOutcome"]


class StepOutcome(StrEnum):
    """How an audited step ended (a class, never the text of an error)."""

    OK = "ok"
    DENIED = "denied"  # the tool refused the caller (ToolAccessDenied)
    TOOL_ERROR = "tool_error"  # the tool reported an expected failure (ToolError)
    TIMEOUT = "timeout"  # the tool did not finish in its timeout_s
    FAILED = "failed"  # the tool raised something else (a bug)
    DEDUPLICATED = "deduplicated"  # a repeat of an earlier side-effecting call: not run again
    INVALID = "invalid"  # the model's reply stayed invalid after repair
    CANCELLED = "cancelled"  # the task was cancelled while the tool ran


class AuditLog:
    """Appends one line per executed agent step to `path`."""

    def __init__(
        self, path: pathlib.Path, *, node_id: str, clock: Callable[[], str] = utc_now
    ) -> None:
        self.path = path
        self.node_id = node_id
        self._clock = clock
        self.failures = 0  # lines that could not be written

    @classmethod
    def open(
        cls, path: pathlib.Path, *, node_id: str, clock: Callable[[], str] = utc_now
    ) -> AuditLog:
        """An audit log at `path`, created 0600 now (blocking: call before serving);
        ConfigError when it cannot be (a node asked to audit never runs unaudited)."""
        try:
            make_private(path)
        except OSError as error:
            raise ConfigError(
                f"cannot create the audit log {path}: {error.strerror}; make the state "
                "directory writable, or set audit_log: false"
            ) from None
        return cls(path, node_id=node_id, clock=clock)

    def step(
        self,
        task: AgentTask,
        *,
        index: int,
        kind: str,
        tool: str,
        side_effecting: bool,
        outcome: StepOutcome,
        model: str,
    ) -> None:
        """Log one step this node executed for `task`."""
        record: dict[str, object] = {
            "time": self._clock(),
            "task_id": clip(task.task_id),
            "attempt": task.attempt,
            "node_id": clip(self.node_id),
            "agent": clip(task.agent),
            "step": index,
            "kind": kind,
            "tool": clip(tool),
            "side_effecting": side_effecting,
            "outcome": outcome.value,
            "key_name": clip(task.key_name),
            "subject": clip(task.subject),
            "model": clip(model),
        }
        try:
            append_line(self.path, encode_line(record))
        except OSError as error:
            self.failures += 1
            if self.failures == 1:  # once: a full disk would otherwise log every step
                logger.error("cannot append to the audit log %s: %s", self.path, error)
