"""Tasks shared by dispatcher replicas: one run per idempotency key, any replica describes any task.

With one replica (the default) the dispatcher's own ledger is all there is and nothing here runs.
With several, the node-table owner also keeps a `TaskDirectory`, and each dispatcher a
`SharedTasks` that talks to it:

- Before running a task that has a key (an idempotency key or a caller-chosen task id), a
  replica claims the key. The first claim wins. A replica that loses waits for the winner's
  outcome and answers its caller with it, so a retry that lands on another replica (through
  Serve's proxy, or on another fast path) is still answered once, by one run.
- A claim lapses when its holder's caller went away (also while the claim call itself was
  still on its way), when the holder failed for a reason that says nothing about later (the
  ledger's rule: only the caller's own errors are kept), when its replica shuts down, or when
  the task's deadline has passed without a word (a replica that died says nothing). A waiter
  then claims again and runs the task itself, within what is left of its own deadline.
- A claim is named by a token the claimant makes up, not by the task id: a caller-chosen task
  id is the same on every replica it is sent to.
- Every replica publishes its tasks' records (when they start and when they end) in batches,
  so DescribeTask answers wherever it lands, to the API key whose task it is.
- A task id is one API key's (the claim names its owner): another key's claim of that id is
  refused (ALREADY_EXISTS), so one id never names two keys' tasks on any replica.

A claim costs one call to the owner per keyed task; tasks without a key cost nothing more
than their share of a batched publish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
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
    readable,
    task_id_taken,
)
from mesh.core.errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    MeshError,
    NotFoundError,
    UnavailableError,
)
from mesh.core.ids import TaskId

logger = logging.getLogger("mesh.coordinator")
_T = TypeVar("_T")

_CLAIM_GRACE_S = 5.0  # a claim outlives its task's deadline by this much before it lapses
_WAIT_S = 1.0  # longest one wait for an outcome at the owner (a long-poll)
_CALL_TIMEOUT_S = 5.0  # longest the owner may take to answer a call (beyond a long-poll)
_PUBLISH_EVERY_S = 0.2  # how often a replica sends its batch of task records


@dataclass(frozen=True, slots=True)
class Claim:
    granted: bool
    token: str  # the claim that holds the key: the claimant's own when granted
    task_id: TaskId  # the task that holds the key
    in_use: bool = False  # refused: the task id is another API key's task's


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
    token: str
    task_id: TaskId
    expires_at: float
    outcome: Outcome | None = None
    settled: asyncio.Event = field(default_factory=asyncio.Event)

    def running(self, now: float) -> bool:
        return self.outcome is None and now < self.expires_at


class TaskDirectory:
    """The owner's side: claims by key, their outcomes, and published records by task id.

    A claim is named by a token its claimant makes up, never by the task id (a caller-chosen
    task id is the same on every replica it is sent to). Pure logic on one event loop, with an
    injected clock; the Ray deployment only forwards."""

    def __init__(self, max_tasks: int = 10_000, *, clock: Callable[[], float] = time.monotonic):
        self.max_tasks = max_tasks
        self._clock = clock
        self._claims: OrderedDict[str, _Held] = OrderedDict()
        self._records: OrderedDict[TaskId, TaskRecord] = OrderedDict()
        # Task id -> the API key whose task holds it, from claims and records (both bounded).
        self._owners: OrderedDict[TaskId, str] = OrderedDict()

    def __len__(self) -> int:
        """Claims held (running, or finished and kept to answer repeats)."""
        return len(self._claims)

    def claim(self, key: str, token: str, task_id: TaskId, ttl_s: float, owner: str = "") -> Claim:
        """Claim `key` for task `task_id` of API key `owner` ("": an open mesh). Refused
        (`in_use`) when another key's task holds that id."""
        if self._owners.get(task_id, owner) != owner:
            return Claim(granted=False, token="", task_id=task_id, in_use=True)
        held = self._current(key)
        if held is not None:
            return Claim(granted=False, token=held.token, task_id=held.task_id)
        self._claims[key] = _Held(token, task_id, self._clock() + ttl_s)
        self._own(task_id, owner)
        self._trim_claims()
        return Claim(granted=True, token=token, task_id=task_id)

    def settle(self, key: str, token: str, outcome: Outcome) -> None:
        """The holder's word on how its task ended; ignored once its claim has lapsed."""
        held = self._claims.get(key)
        if held is None or held.token != token or held.outcome is not None:
            return
        held.outcome = outcome
        held.settled.set()
        if not _kept(outcome):
            del self._claims[key]  # the next claim runs it again
        else:
            self._claims.move_to_end(key)

    async def outcome(self, key: str, token: str, wait_s: float) -> Outcome | None:
        """The outcome of claim `token` on `key`; None while it runs after `wait_s`."""
        held = self._current(key)
        if held is None or held.token != token:
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
            if self._owners.get(record.task_id, record.owner) != record.owner:
                continue  # never over another key's task (its claim refuses that id)
            self._records[record.task_id] = record
            self._records.move_to_end(record.task_id)
            self._own(record.task_id, record.owner)
        while len(self._records) > self.max_tasks:
            self._records.popitem(last=False)

    def record(self, task_id: str, reader: str | None = None) -> TaskRecord | None:
        """The task's published record; None when unknown, or not `reader`'s (an API key's
        name; None: any task's)."""
        record = self._records.get(TaskId(task_id))
        return record if record is not None and readable(record.owner, reader) else None

    def _own(self, task_id: TaskId, owner: str) -> None:
        """Note `owner` as the holder of `task_id`, as long as a claim or a record may name it."""
        self._owners[task_id] = owner
        self._owners.move_to_end(task_id)
        while len(self._owners) > 2 * self.max_tasks:
            self._owners.popitem(last=False)

    def _current(self, key: str) -> _Held | None:
        """The claim on `key`, after letting it lapse if its holder has been silent too long."""
        held = self._claims.get(key)
        if held is not None and held.outcome is None and self._clock() >= held.expires_at:
            self._lapse(key, held)
            return None
        return held

    def _lapse(self, key: str, held: _Held) -> None:
        held.outcome = LAPSED
        held.settled.set()
        del self._claims[key]

    def _trim_claims(self) -> None:
        """Forget the oldest finished or lapsed claims beyond `max_tasks`; never a running one."""
        if len(self._claims) <= self.max_tasks:
            return
        now = self._clock()
        for key, held in list(self._claims.items()):
            if len(self._claims) <= self.max_tasks:
                break
            if held.running(now):
                continue
            if held.outcome is None:
                self._lapse(key, held)
            else:
                del self._claims[key]


def _kept(outcome: Outcome) -> bool:
    """Whether an outcome answers later requests with the same key: a result, or an error
    that is the caller's own (the ledger's rule); not a lapse or a transient failure."""
    if outcome.result is not None:
        return True
    return outcome.error is not None and caller_error(outcome.error)


class DirectoryClient(Protocol):
    """How a replica reaches the TaskDirectory (through Ray in the app, directly in tests)."""

    async def claim(
        self, key: str, token: str, task_id: TaskId, ttl_s: float, owner: str
    ) -> Claim: ...
    async def settle(self, key: str, token: str, outcome: Outcome) -> None: ...
    async def outcome(self, key: str, token: str, wait_s: float) -> Outcome | None: ...
    async def publish(self, records: list[TaskRecord]) -> None: ...
    async def record(self, task_id: str, reader: str | None) -> TaskRecord | None: ...


class SharedTasks:
    """A dispatcher's side: claims keys before running, waits on other replicas' runs, and
    reports its own tasks to the directory. Listens to the dispatcher's ledger."""

    def __init__(
        self, directory: DirectoryClient, ledger: TaskLedger, *, default_deadline_s: float
    ) -> None:
        self._directory = directory
        self._ledger = ledger
        self._default_deadline_s = default_deadline_s
        self._held: dict[int, tuple[str, str]] = {}  # id(entry) -> (key, token): runs here
        self._waiters: set[int] = set()  # id(entry) of entries that wait on another replica
        self._pending: dict[TaskId, None] = {}  # task ids whose records are not yet published
        self._publisher: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        ledger.listen(self._changed)

    async def claim_or_wait(self, task: TaskSpec, entry: LedgerEntry) -> TaskSpec | None:
        """Claim `entry`'s key. None when another replica ran or runs it: `entry` is then
        settled with that run's outcome. Else the task to run here, its deadline less the time
        spent waiting for another replica. AlreadyExistsError when the task id is another API
        key's task's: `entry` is then forgotten, as if it had never begun here."""
        if not entry.key:
            return task
        deadline_s = task.deadline_s or self._default_deadline_s
        began = time.monotonic()
        waited = False
        self._waiters.add(id(entry))
        try:
            while True:
                left = deadline_s - (time.monotonic() - began)
                claim = await self._claim(entry.key, task, ttl_s=left + _CLAIM_GRACE_S)
                if claim.in_use:
                    raise task_id_taken(task.task_id)
                if claim.granted:
                    self._waiters.discard(id(entry))
                    self._held[id(entry)] = (entry.key, claim.token)
                    self._pending[entry.task_id] = None  # publish it as running
                    self._publish_later()
                    return replace(task, deadline_s=max(left, 0.001)) if waited else task
                outcome = await self._wait(entry.key, claim, began + deadline_s)
                waited = True
                if outcome.lapsed or not _kept(outcome):
                    # Its caller or its replica went away, or it failed for a reason that says
                    # nothing about now: this caller asked again, so run it (one claim wins).
                    continue
                if outcome.result is not None:
                    self._ledger.succeed(entry, outcome.result)
                else:
                    self._ledger.fail(entry, outcome.error or MeshError(""), outcome.attempts)
                return None
        except asyncio.CancelledError:
            self._ledger.abandon(entry, ())
            raise
        except MeshError as error:
            self._ledger.fail(entry, error, ())
            if isinstance(error, AlreadyExistsError):
                self._ledger.forget(entry)  # the id is not this key's, here either
            raise

    async def record(self, task_id: str, reader: str | None = None) -> TaskRecord:
        """A task's record from this replica's ledger, else from what the replicas published;
        NotFoundError as well when it is not `reader`'s (an API key's name; None: any)."""
        try:
            return self._ledger.record(task_id, reader)
        except NotFoundError:
            published = await self._call(self._directory.record(task_id, reader))
            if published is None:
                raise
            return published

    async def close(self) -> None:
        """Release the keys of tasks still running here, so other replicas need not wait out
        their deadlines, and send what is left to publish."""
        releases = [
            self._directory.settle(key, token, LAPSED) for key, token in self._held.values()
        ]
        self._held.clear()
        if self._publisher is not None:
            self._publisher.cancel()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_CALL_TIMEOUT_S):
                await asyncio.gather(*releases, *self._background, return_exceptions=True)

    async def _claim(self, key: str, task: TaskSpec, ttl_s: float) -> Claim:
        """One claim call. Cancelled or timed out after the owner may have granted it: the
        claim is released as soon as its answer comes, so nobody waits on it."""
        token = uuid.uuid4().hex
        call = asyncio.ensure_future(
            _awaited(self._directory.claim(key, token, task.task_id, ttl_s, task.owner))
        )
        try:
            return await self._call(asyncio.shield(call))
        except (asyncio.CancelledError, MeshError):
            self._spawn(self._release_if_granted(call, key, token))
            raise

    async def _release_if_granted(self, call: asyncio.Future[Claim], key: str, token: str) -> None:
        with contextlib.suppress(Exception):  # not granted, or never arrived: nothing to free
            if (await call).granted:
                await self._directory.settle(key, token, LAPSED)

    async def _wait(self, key: str, holder: Claim, give_up: float) -> Outcome:
        while True:
            left = give_up - time.monotonic()
            if left <= 0:
                raise DeadlineExceededError(
                    f"task {holder.task_id} with the same key still runs on another dispatcher "
                    "replica and this request's deadline has passed",
                    task_id=holder.task_id,
                )
            wait_s = min(_WAIT_S, left)
            outcome = await self._call(self._directory.outcome(key, holder.token, wait_s), wait_s)
            if outcome is not None:
                return outcome

    async def _call(self, call: Awaitable[_T], wait_s: float = 0.0) -> _T:
        try:
            async with asyncio.timeout(wait_s + _CALL_TIMEOUT_S):
                return await call
        except (MeshError, asyncio.CancelledError):
            raise
        except Exception as error:  # Ray raises many kinds while the owner restarts
            reason = "no answer in time" if isinstance(error, TimeoutError) else str(error)
            raise UnavailableError(
                f"the coordinator's task directory is not answering ({reason}); retry shortly"
            ) from error

    # -------------------------------------------------------------- the ledger's events

    def _changed(self, entry: LedgerEntry) -> None:
        if entry.state is TaskState.RUNNING:
            if not entry.key:
                self._pending[entry.task_id] = None  # keyed tasks: once their claim is granted
                self._publish_later()
            return
        if id(entry) in self._waiters:
            self._waiters.discard(id(entry))
            return  # the replica that ran it publishes it
        held = self._held.pop(id(entry), None)
        if held is not None:
            key, token = held
            self._spawn(self._directory.settle(key, token, _outcome_of(entry)))
        self._pending[entry.task_id] = None
        self._publish_later()

    def _publish_later(self) -> None:
        if self._publisher is None or self._publisher.done():
            self._publisher = asyncio.get_running_loop().create_task(self._publish())

    async def _publish(self) -> None:
        """Every _PUBLISH_EVERY_S while there is something to send; a failed batch is kept
        for the next (within the ledger's size)."""
        while self._pending:
            await asyncio.sleep(_PUBLISH_EVERY_S)
            task_ids, self._pending = self._pending, {}
            records = []
            for task_id in task_ids:
                with contextlib.suppress(NotFoundError):  # forgotten already
                    records.append(self._ledger.record(task_id))
            try:
                await self._call(self._directory.publish(records))
            except UnavailableError as error:
                logger.warning("could not publish %d task records: %s", len(records), error)
                self._pending = {**task_ids, **self._pending}
                while len(self._pending) > self._ledger.max_finished:
                    del self._pending[next(iter(self._pending))]

    def _spawn(self, call: Awaitable[None]) -> None:
        async def report() -> None:
            try:
                await call
            except Exception as error:  # the claim lapses by itself after its deadline
                logger.warning("could not report a task's outcome to the directory: %s", error)

        task = asyncio.get_running_loop().create_task(report())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


async def _awaited(call: Awaitable[_T]) -> _T:
    return await call


def _outcome_of(entry: LedgerEntry) -> Outcome:
    if entry.state is TaskState.DONE and entry.result is not None:
        return Outcome(result=entry.result, attempts=entry.attempts)
    if entry.future.cancelled():
        return LAPSED  # the caller went away: whoever waits runs it
    return Outcome(error=entry.error or MeshError("failed"), attempts=entry.attempts)
