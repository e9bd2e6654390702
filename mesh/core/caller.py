"""Who is asking: the caller an ingress authenticated, for the rest of the task's path.

The ingress (gRPC or HTTP) sets `CALLER` once it has checked the credentials; the runs read it
when they build a node request's `TaskContext` (key name and subject), so tools see the
subject and the node's audit log names the key. A context variable, so it follows the task
into every asyncio task created under it, and a request that came in without credentials (an
open mesh) leaves it None.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Caller:
    """An authenticated caller. `key_name` is the API key's name (never the key itself), or
    "cert:NODE_OR_ROLE" for a cluster certificate; `subject` what the key stands for (a
    customer, a kiosk), empty when it names none. `agents` and `models`, when not empty, are
    all the caller may use."""

    key_name: str
    subject: str = ""
    agents: frozenset[str] = field(default_factory=frozenset)
    models: frozenset[str] = field(default_factory=frozenset)


CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("mesh_caller", default=None)


def current_caller() -> Caller | None:
    return CALLER.get()


def reader_of(caller: Caller | None) -> str | None:
    """Whose tasks `caller` may read back (DescribeTask, traces, the dashboard): its key's,
    by the name they are kept under (`TaskSpec.owner`). None without a caller (an open mesh):
    every task."""
    return caller.key_name if caller is not None else None
