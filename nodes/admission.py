"""Admission control: a fixed number of requests run at once, a bounded number wait, the rest are refused."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from mesh.core.errors import OverloadedError


class Ticket:
    """A request admitted to the queue: `wait` until it holds a running slot."""

    def __init__(
        self, acquiring: asyncio.Future[bool] | None, on_start: Callable[[], None]
    ) -> None:
        self._acquiring = acquiring  # None: it ran at once
        self._on_start = on_start
        self.running = acquiring is None

    async def wait(self, timeout_s: float | None = None) -> bool:
        """True once the request runs; False when `timeout_s` passed first (still queued)."""
        if not self.running and self._acquiring is not None:
            await asyncio.wait({self._acquiring}, timeout=timeout_s)
            if self._acquiring.done() and not self._acquiring.cancelled():
                self.running = True
                self._on_start()
        return self.running

    def _leave(self) -> bool:
        """Leave the queue before running; True when a slot was granted all the same."""
        acquiring = self._acquiring
        if acquiring is None:
            return False
        if acquiring.done():
            return not acquiring.cancelled()
        acquiring.cancel()
        return False


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

    def _refuse(self) -> OverloadedError:
        self.rejected += 1
        return OverloadedError(
            f"node is at capacity: {self.in_flight} running, {self.queued} queued "
            f"(max_concurrent={self.max_concurrent}, max_queued={self.max_queued}); "
            "retry later or on another node",
            in_flight=self.in_flight,
            queued=self.queued,
        )

    def _start(self) -> None:
        self.queued -= 1
        self.in_flight += 1

    @contextlib.asynccontextmanager
    async def ticket(self) -> AsyncIterator[Ticket]:
        """A place for the duration of the block (OverloadedError when full): running at once
        when a slot is free, else queued until `ticket.wait()` returns True. Leaving the block
        frees the slot, or the place in the queue."""
        if self.in_flight >= self.max_concurrent and self.queued >= self.max_queued:
            raise self._refuse()
        if not self._slots.locked():
            await self._slots.acquire()  # free: returns without suspending
            self.in_flight += 1
            ticket = Ticket(None, self._start)
        else:
            self.queued += 1
            ticket = Ticket(asyncio.ensure_future(self._slots.acquire()), self._start)
        try:
            yield ticket
        finally:
            if ticket.running:
                self.in_flight -= 1
                self.completed += 1
                self._slots.release()
            else:
                self.queued -= 1
                if ticket._leave():  # granted after the last look: give it back
                    self._slots.release()
                elif ticket._acquiring is not None:
                    # A cancel can lose the race with the grant: then free the slot later.
                    ticket._acquiring.add_done_callback(self._release_if_granted)

    def _release_if_granted(self, acquiring: asyncio.Future[bool]) -> None:
        if not acquiring.cancelled():
            self._slots.release()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold a running slot for the duration of the block; raises OverloadedError when full."""
        async with self.ticket() as ticket:
            await ticket.wait()
            yield
