"""Tasks shared by dispatcher replicas: one run per idempotency key, any replica describes any task.

With one replica (the default) the dispatcher's own ledger is all there is and nothing here runs.
With several, the node-table owner also keeps a `TaskDirectory`, and each dispatcher a
`SharedTasks` that talks to it:

- Before running a task that has a key (an idempotency key or a caller-chosen task id), a
  replica claims the key. The first claim wins. A replica that loses waits for the winner's
  outcome and answers its caller with it, so a retry that lands on another replica (through
  Serve's proxy, or on another fast path) is still answered once, by one run.
- A claim lapses when its holder's caller went away, when the holder failed for a reason that
  says nothing about later (the ledger's rule: only the caller's own errors are kept), or when
  the task's deadline has passed without a word (a replica that died says nothing). A waiter
  then claims again and runs the task itself.
- Every replica publishes its tasks' records (when they start and when they end) in batches,
  so DescribeTask answers wherever it lands.

A claim costs one call to the owner per keyed task; tasks without a key cost nothing more
than their share of a batched publish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from mesh.coordinator.tasks import (
    AttemptRecord,
    LedgerEntry,
    TaskLedger,
    TaskRecord,
    TaskResult,
    TaskSpec,
    TaskState,
    caller_error,
)
from mesh.errors import DeadlineExceededError, MeshError, NotFoundError, UnavailableError
from mesh.ids import TaskId

logger = logging.getLogger("mesh.coordinator")
_T = TypeVar("_T")

_CLAIM_GRACE_S = 5.0  # a claim outlives its task's deadline by this much before it lapses
_WAIT_S = 1.0  # longest one wait for an outcome at the owner (a long-poll)
_PUBLISH_EVERY_S = 0.2  # how often a replica sends its batch of task records


@dataclass(frozen=True, slots=True)
class Claim:
    granted: bool
    task_id: TaskId  # the task that holds the key: the claimant's own when granted


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a claimed task ended. Neither result nor error: the claim lapsed, claim again."""

    result: TaskResult | None = None
    error: MeshError | None = None
    attempts: tuple[AttemptRecord, ...] = ()

    @property
    def lapsed(self) -> bool:
        return self.result is None and self.error is None


LAPSED = Outcome()


@dataclass
class _Held:
    task_id: TaskId
    expires_at: float
    outcome: Outcome | None = None
    settled: asyncio.Event = field(default_factory=asyncio.Event)


class TaskDirectory:
    """The owner's side: claims by key, their outcomes, and published records by task id.

    Pure logic on one event loop, with an injected clock; the Ray deployment only forwards."""

    def __init__(self, max_tasks: int = 10_000, *, clock: Callable[[], float] = time.monotonic):
        self.max_tasks = max_tasks
        self._clock = clock
        self._claims: OrderedDict[str, _Held] = OrderedDict()
        self._records: OrderedDict[TaskId, TaskRecord] = OrderedDict()

    def claim(self, key: str, task_id: TaskId, ttl_s: float) -> Claim:
        held = self._current(key)
        if held is not None:
            return Claim(granted=False, task_id=held.task_id)
        self._claims[key] = _Held(task_id, self._clock() + ttl_s)
        self._trim(self._claims)
        return Claim(granted=True, task_id=task_id)

    def settle(self, key: str, task_id: TaskId, outcome: Outcome) -> None:
        """The holder's word on how its task ended; ignored once its claim has lapsed."""
        held = self._claims.get(key)
        if held is None or held.task_id != task_id or held.outcome is not None:
            return
        held.outcome = outcome
        held.settled.set()
        if not _kept(outcome):
            del self._claims[key]  # the next claim runs it again
        else:
            self._claims.move_to_end(key)

    async def outcome(self, key: str, task_id: TaskId, wait_s: float) -> Outcome | None:
        """The outcome of `task_id`'s claim on `key`; None while it runs after `wait_s`."""
        held = self._current(key)
        if held is None or held.task_id != task_id:
            return LAPSED
        if held.outcome is None:
            remaining = min(wait_s, held.expires_at - self._clock())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(remaining, 0.0)):
                    await held.settled.wait()
            if held.outcome is None:
                return LAPSED if self._current(key) is not held else None
        return held.outcome

    def publish(self, records: list[TaskRecord]) -> None:
        for record in records:
            self._records[record.task_id] = record
            self._records.move_to_end(record.task_id)
        self._trim(self._records)

    def record(self, task_id: str) -> TaskRecord | None:
        return self._records.get(TaskId(task_id))

    def _current(self, key: str) -> _Held | None:
        """The claim on `key`, after letting it lapse if its holder has been silent too long."""
        held = self._claims.get(key)
        if held is not None and held.outcome is None and self._clock() >= held.expires_at:
            held.outcome = LAPSED
            held.settled.set()
            del self._claims[key]
            return None
        return held

    def _trim(self, table: OrderedDict) -> None:
        while len(table) > self.max_tasks:
            oldest_key, oldest = next(iter(table.items()))
            if isinstance(oldest, _Held) and oldest.outcome is None:
                break  # never forget a claim whose task still runs
            del table[oldest_key]


class DirectoryClient(Protocol):
    """How a replica reaches the TaskDirectory (through Ray in the app, directly in tests)."""

    async def claim(self, key: str, task_id: TaskId, ttl_s: float) -> Claim: ...
    async def settle(self, key: str, task_id: TaskId, outcome: Outcome) -> None: ...
    async def outcome(self, key: str, task_id: TaskId, wait_s: float) -> Outcome | None: ...
    async def publish(self, records: list[TaskRecord]) -> None: ...
    async def record(self, task_id: str) -> TaskRecord | None: ...


class SharedTasks:
    """A dispatcher's side: claims keys before running, waits on other replicas' runs, and
    reports its own tasks to the directory. Listens to the dispatcher's ledger."""

    def __init__(
        self, directory: DirectoryClient, ledger: TaskLedger, *, default_deadline_s: float
    ) -> None:
        self._directory = directory
        self._default_deadline_s = default_deadline_s
        self._ledger = ledger
        self._held: dict[TaskId, str] = {}  # this replica's running tasks that hold a key
        self._pending: dict[TaskId, LedgerEntry] = {}  # records not yet published
        self._publisher: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        ledger.listen(self._changed)

    async def held_elsewhere(self, task: TaskSpec, entry: LedgerEntry) -> bool:
        """Claim `entry`'s key. True when another replica holds it: `entry` is then settled
        with that run's outcome (the caller replays it). False: this replica runs the task."""
        if not entry.key:
            return False
        deadline_s = task.deadline_s or self._default_deadline_s
        ttl_s = deadline_s + _CLAIM_GRACE_S
        give_up = time.monotonic() + deadline_s
        try:
            while True:
                claim = await self._call(self._directory.claim(entry.key, task.task_id, ttl_s))
                if claim.granted:
                    self._held[entry.task_id] = entry.key
                    return False
                outcome = await self._wait(entry.key, claim.task_id, give_up)
                if outcome.lapsed or not _kept(outcome):
                    # Its caller or its replica went away, or it failed for a reason that says
                    # nothing about now: this caller asked again, so run it (one claim wins).
                    continue
                if outcome.result is not None:
                    self._ledger.succeed(entry, outcome.result)
                else:
                    self._ledger.fail(entry, outcome.error or MeshError(""), outcome.attempts)
                return True
        except asyncio.CancelledError:
            self._ledger.abandon(entry, ())
            raise
        except MeshError as error:
            self._ledger.fail(entry, error, ())
            raise

    async def record(self, task_id: str) -> TaskRecord:
        """A task's record from this replica's ledger, else from what the replicas published."""
        try:
            return self._ledger.record(task_id)
        except NotFoundError:
            published = await self._call(self._directory.record(task_id))
            if published is None:
                raise
            return published

    async def close(self) -> None:
        if self._publisher is not None:
            self._publisher.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    async def _wait(self, key: str, holder: TaskId, give_up: float) -> Outcome:
        while True:
            left = give_up - time.monotonic()
            if left <= 0:
                raise DeadlineExceededError(
                    f"task {holder} with the same key still runs on another dispatcher replica "
                    "and this request's deadline has passed",
                    task_id=holder,
                )
            outcome = await self._call(self._directory.outcome(key, holder, min(_WAIT_S, left)))
            if outcome is not None:
                return outcome

    async def _call(self, call: Awaitable[_T]) -> _T:
        try:
            return await call
        except (MeshError, asyncio.CancelledError):
            raise
        except Exception as error:  # Ray raises many kinds while the owner restarts
            raise UnavailableError(
                f"the coordinator's task directory is not answering ({error}); retry shortly"
            ) from error

    # -------------------------------------------------------------- the ledger's events

    def _changed(self, entry: LedgerEntry) -> None:
        # Only the replica that runs a keyed task settles its claim; every replica publishes
        # the records of what its callers asked (a waiter's record carries the runner's result).
        key = self._held.pop(entry.task_id, None) if entry.state is not TaskState.RUNNING else None
        if key is not None:
            outcome = _outcome_of(entry)
            self._spawn(self._directory.settle(key, entry.task_id, outcome))
        self._pending[entry.task_id] = entry
        if self._publisher is None or self._publisher.done():
            self._publisher = asyncio.get_running_loop().create_task(self._publish_soon())

    async def _publish_soon(self) -> None:
        await asyncio.sleep(_PUBLISH_EVERY_S)
        entries, self._pending = self._pending, {}
        records = []
        for task_id in entries:
            with contextlib.suppress(NotFoundError):  # forgotten already
                records.append(self._ledger.record(task_id))
        try:
            await self._directory.publish(records)
        except Exception as error:  # Ray raises many kinds while the owner restarts
            logger.warning("could not publish %d task records: %s", len(records), error)

    def _spawn(self, call: Awaitable[None]) -> None:
        async def report() -> None:
            try:
                await call
            except Exception as error:  # the claim lapses by itself after its deadline
                logger.warning("could not report a task's outcome to the directory: %s", error)

        task = asyncio.get_running_loop().create_task(report())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _kept(outcome: Outcome) -> bool:
    """Whether an outcome answers later requests with the same key: a result, or an error
    that is the caller's own (the ledger's rule); not a lapse or a transient failure."""
    if outcome.result is not None:
        return True
    return outcome.error is not None and caller_error(outcome.error)


def _outcome_of(entry: LedgerEntry) -> Outcome:
    if entry.state is TaskState.DONE and entry.result is not None:
        return Outcome(result=entry.result, attempts=entry.attempts)
    if entry.future.cancelled():
        return LAPSED  # the caller went away: whoever waits runs it
    return Outcome(error=entry.error or MeshError("failed"), attempts=entry.attempts)


class LocalDirectory:
    """A DirectoryClient over a TaskDirectory in the same event loop (tests, one process)."""

    def __init__(self, directory: TaskDirectory) -> None:
        self.directory = directory

    async def claim(self, key: str, task_id: TaskId, ttl_s: float) -> Claim:
        return self.directory.claim(key, task_id, ttl_s)

    async def settle(self, key: str, task_id: TaskId, outcome: Outcome) -> None:
        self.directory.settle(key, task_id, outcome)

    async def outcome(self, key: str, task_id: TaskId, wait_s: float) -> Outcome | None:
        return await self.directory.outcome(key, task_id, wait_s)

    async def publish(self, records: list[TaskRecord]) -> None:
        self.directory.publish(records)

    async def record(self, task_id: str) -> TaskRecord | None:
        return self.directory.record(task_id)
