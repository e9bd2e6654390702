"""Per-node memory the routing mechanism keeps: decode speed (EWMA) and cool-downs."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from mesh.core.ids import NodeId


class Ewma:
    """Exponentially weighted moving average of milliseconds per generated token, per node.

    `alpha` is the weight of the newest sample (topology `routing.ewma_alpha`); the first sample
    is taken as is. Not thread-safe: one per dispatcher, used from its event loop.
    """

    def __init__(self, alpha: float = 0.3) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self._values: dict[NodeId, float] = {}

    def update(self, node_id: NodeId, ms_per_token: float) -> float:
        """Fold in one observation; returns the new average."""
        if not math.isfinite(ms_per_token) or ms_per_token < 0:
            raise ValueError(f"ms_per_token must be a finite number >= 0, got {ms_per_token}")
        previous = self._values.get(node_id)
        value = (
            ms_per_token
            if previous is None
            else (self.alpha * ms_per_token + (1 - self.alpha) * previous)
        )
        self._values[node_id] = value
        return value

    def get(self, node_id: NodeId, /) -> float | None:
        return self._values.get(node_id)

    def forget(self, node_id: NodeId) -> None:
        """Drop a node's history (it left, or came back as a different machine)."""
        self._values.pop(node_id, None)

    def snapshot(self) -> dict[NodeId, float]:
        return dict(self._values)


def ms_per_token(duration_s: float, tokens: int) -> float | None:
    """The observation for `Ewma.update` from one answer; None when no token was generated."""
    return duration_s * 1000.0 / tokens if tokens > 0 and duration_s >= 0 else None


class CooldownTracker:
    """Nodes that failed `failures_before_cooldown` times in a row sit out for `cooldown_s`.

    A success resets the count (it does not end a cool-down already begun). When a cool-down
    ends the node is on probation: one more failure before a success cools it down again.
    `clock` returns seconds (monotonic); tests inject a fake. Supports `node_id in tracker`, so
    it can be passed as `filter_candidates(..., cooling=tracker)`.
    """

    def __init__(
        self,
        *,
        failures_before_cooldown: int = 2,
        cooldown_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failures_before_cooldown < 1:
            raise ValueError("failures_before_cooldown must be >= 1")
        if cooldown_s < 0:
            raise ValueError("cooldown_s must be >= 0")
        self.failures_before_cooldown = failures_before_cooldown
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._failures: dict[NodeId, int] = {}
        self._until: dict[NodeId, float] = {}

    def record_failure(self, node_id: NodeId) -> bool:
        """Count a failure; True when the node is cooling down after it."""
        if self.is_cooling(node_id):
            return True
        failures = self._failures.get(node_id, 0) + 1
        if failures >= self.failures_before_cooldown and self.cooldown_s > 0:
            self._until[node_id] = self._clock() + self.cooldown_s
            self._failures[node_id] = self.failures_before_cooldown - 1  # probation afterwards
            return True
        self._failures[node_id] = failures
        return False

    def record_success(self, node_id: NodeId) -> None:
        self._failures.pop(node_id, None)

    def is_cooling(self, node_id: NodeId) -> bool:
        return self.remaining_s(node_id) > 0

    def __contains__(self, node_id: object) -> bool:
        return isinstance(node_id, str) and self.is_cooling(NodeId(node_id))

    def remaining_s(self, node_id: NodeId) -> float:
        until = self._until.get(node_id)
        if until is None:
            return 0.0
        remaining = until - self._clock()
        if remaining <= 0:
            del self._until[node_id]
            return 0.0
        return remaining

    def cooling(self) -> frozenset[NodeId]:
        """The nodes cooling down now."""
        return frozenset(node_id for node_id in list(self._until) if self.is_cooling(node_id))

    def consecutive_failures(self, node_id: NodeId) -> int:
        return self._failures.get(node_id, 0)

    def forget(self, node_id: NodeId) -> None:
        self._failures.pop(node_id, None)
        self._until.pop(node_id, None)
