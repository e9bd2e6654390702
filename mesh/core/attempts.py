"""What one attempt at a task did: the coordinator records these, and errors carry them.

They live in the core, not in the coordinator, because every client reads them back from a
failed task's error (`TaskFailedError.attempts`), and clients do not load the coordinator.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from mesh.core.ids import NodeId


class AttemptOutcome(StrEnum):
    OK = "ok"
    UNAVAILABLE = "unavailable"  # connection lost, node down, not serving
    TIMEOUT = "timeout"  # exceeded the per-attempt timeout
    OVERLOADED = "overloaded"  # the node answered RESOURCE_EXHAUSTED
    ERROR = "error"  # the node answered another error
    CANCELLED = "cancelled"  # the caller went away
    RUNNING = "running"  # still in progress (DescribeTask of a running task)


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    node_id: NodeId
    node_name: str
    outcome: AttemptOutcome
    duration_ms: float
    detail: str = ""
    completion_tokens: int = 0  # tokens this attempt contributed to the answer
