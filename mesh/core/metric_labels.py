"""Bounded label values for Prometheus metrics, shared by nodes and the coordinator.

A label taken from text a caller or a model chose (a tool name, a model alias) is cut short,
and once `limit` distinct values have been seen, any new one is counted as "other": a
misbehaving client cannot grow a metric's series without bound. No task ids, ever.
"""

from __future__ import annotations

from mesh.core.untrusted import printable

OTHER = "other"


class BoundedLabels:
    """Up to `limit` distinct values of one label, each at most `max_chars` long."""

    def __init__(self, limit: int = 64, max_chars: int = 40) -> None:
        self.limit = limit
        self.max_chars = max_chars
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        text = printable(value or "none", self.max_chars)
        if text in self._seen:
            return text
        if len(self._seen) >= self.limit:
            return OTHER
        self._seen.add(text)
        return text
