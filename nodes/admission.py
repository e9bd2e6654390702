"""Admission control: a fixed number of requests run at once, a bounded number wait, the rest are refused."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from mesh.core.errors import OverloadedError


class AdmissionController:
    """`max_concurrent` run, up to `max_queued` wait in arrival order, beyond that OverloadedError."""

    def __init__(self, max_concurrent: int, max_queued: int) -> None:
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        self._slots = asyncio.Semaphore(max_concurrent)
        self.in_flight = 0
        self.queued = 0
        self.completed = 0
        self.rejected = 0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold a slot for the duration of the block; raises OverloadedError when full."""
        if self.in_flight >= self.max_concurrent and self.queued >= self.max_queued:
            self.rejected += 1
            raise OverloadedError(
                f"node is at capacity: {self.in_flight} running, {self.queued} queued "
                f"(max_concurrent={self.max_concurrent}, max_queued={self.max_queued}); "
                "retry later or on another node",
                in_flight=self.in_flight,
                queued=self.queued,
            )
        self.queued += 1
        try:
            await self._slots.acquire()
        finally:
            self.queued -= 1
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            self.completed += 1
            self._slots.release()
