"""Requests and tokens per minute for each API key: a sliding window of the last `WINDOW_S`.

    limiter = RateLimiter(clock=time.monotonic)
    refusal = limiter.admit("kiosk-12", rpm=60, tpm=20_000)   # None: admitted, and counted
    if refusal is not None:
        ...  # 429 / RESOURCE_EXHAUSTED, Retry-After: refusal.retry_after_s
    limiter.spend("kiosk-12", result.total_tokens)              # once the task has finished

Requests are counted when admitted, tokens when a task has finished (what it used is known only
then): a key over its tokens per minute is refused until enough of them are a minute old. A
pure object over an injected clock, holding a window only for the keys it has seen (as many
as keys.json names); the coordinator keeps one per dispatcher, or, with several
dispatcher replicas, one in the node-table owner that they all ask (mesh/coordinator/app.py).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

WINDOW_S = 60.0
_BUCKET_S = 1.0  # tokens spent within a second share one entry: at most ~60 per key


@dataclass(frozen=True)
class Refusal:
    """Why a request was refused: "rpm" and/or "tpm", and how long until it may come back."""

    over: tuple[str, ...]
    retry_after_s: float
    rpm: int | None = None
    tpm: int | None = None

    def describe(self, key_name: str) -> str:
        limits = []
        if "rpm" in self.over:
            limits.append(f"{self.rpm} requests per minute")
        if "tpm" in self.over:
            limits.append(f"{self.tpm} tokens per minute")
        return (
            f"the API key {key_name!r} is over its {' and '.join(limits)}; "
            f"retry after {max(1, math.ceil(self.retry_after_s))} s"
        )


@dataclass
class _Window:
    requests: deque[float] = field(default_factory=deque)  # admission times
    tokens: deque[list[float]] = field(default_factory=deque)  # [first, last, tokens] buckets
    token_total: float = 0.0

    def expire(self, now: float) -> None:
        cutoff = now - WINDOW_S
        while self.requests and self.requests[0] <= cutoff:
            self.requests.popleft()
        while self.tokens and self.tokens[0][1] <= cutoff:
            self.token_total -= self.tokens.popleft()[2]
        if not self.tokens:
            self.token_total = 0.0  # no float drift left behind

    def empty(self) -> bool:
        return not self.requests and not self.tokens


class RateLimiter:
    """Sliding-window limits per key. `admit` checks and counts one request atomically (no
    await inside), so concurrent requests can never pass one over its limit."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._windows: dict[str, _Window] = {}

    def _window(self, key: str, now: float) -> _Window:
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = _Window()
        window.expire(now)
        return window

    def admit(self, key: str, rpm: int | None, tpm: int | None) -> Refusal | None:
        """Count a request of `key` and return None, or return why it is refused (and count
        nothing). None limits: no limit of that kind."""
        if rpm is None and tpm is None:
            return None
        now = self._clock()
        window = self._window(key, now)
        over: list[str] = []
        waits: list[float] = []
        if rpm is not None and len(window.requests) >= rpm:
            over.append("rpm")
            # The request `rpm` places from the end must leave the window.
            waits.append(window.requests[-rpm] + WINDOW_S - now)
        if tpm is not None and window.token_total >= tpm:
            over.append("tpm")
            waits.append(self._tokens_wait(window, tpm, now))
        if over:
            return Refusal(tuple(over), max(0.0, max(waits)), rpm=rpm, tpm=tpm)
        window.requests.append(now)
        return None

    @staticmethod
    def _tokens_wait(window: _Window, tpm: int, now: float) -> float:
        """Seconds until the tokens still in the window are fewer than `tpm`."""
        left = window.token_total
        for _first, last, tokens in window.tokens:
            left -= tokens
            if left < tpm:
                return last + WINDOW_S - now
        return 0.0  # unreachable while token_total >= tpm

    def spend(self, key: str, tokens: int) -> None:
        """Count `tokens` (a finished task's prompt and completion tokens) against `key`."""
        if tokens <= 0:
            return
        now = self._clock()
        window = self._window(key, now)
        if window.tokens and now - window.tokens[-1][0] < _BUCKET_S:
            bucket = window.tokens[-1]
            bucket[1], bucket[2] = now, bucket[2] + tokens
        else:
            window.tokens.append([now, now, float(tokens)])
        window.token_total += tokens
