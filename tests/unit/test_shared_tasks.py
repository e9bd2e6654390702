"""Several dispatcher replicas sharing one TaskDirectory: a key runs once whichever replica a
retry lands on, a task is described by any replica, and a silent holder's claim lapses."""

from __future__ import annotations

import asyncio

import pytest

from mesh.coordinator.dispatch import Dispatcher
from mesh.coordinator.settings import DispatcherSettings
from mesh.coordinator.shared_tasks import LAPSED, LocalDirectory, Outcome, TaskDirectory
from mesh.coordinator.tasks import TaskResult, TaskState, build_task
from mesh.errors import InvalidRequestError, NotFoundError, TaskFailedError, UnavailableError
from mesh.ids import TaskId
from tests.coordinator_fakes import ANSWER, Fail, FakeMesh, Hang, ManualClock, Reply, view

pytestmark = pytest.mark.unit


def run(coro, timeout=10):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def replicas(mesh: FakeMesh, directory: TaskDirectory, count: int = 2) -> list[Dispatcher]:
    settings = DispatcherSettings(
        policy="round_robin", queue_timeout_s=0.0, node_wait_s=0.0, deadline_s=5.0, max_attempts=2
    )
    dispatchers = []
    for _ in range(count):
        dispatcher = Dispatcher(
            settings, connect=mesh.connect, clock=ManualClock(), directory=LocalDirectory(directory)
        )
        dispatcher.update_nodes([view("a"), view("b")])
        dispatchers.append(dispatcher)
    return dispatchers


async def close(*dispatchers: Dispatcher) -> None:
    for dispatcher in dispatchers:
        await dispatcher.close()


def test_one_key_runs_once_across_replicas_and_every_replica_answers_it():
    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", default=Reply(delay_s=0.05))
        mesh.script("b", default=Reply(delay_s=0.05))
        one, two = replicas(mesh, TaskDirectory())
        first, second = await asyncio.gather(
            one.submit(build_task("hi", model="m", idempotency_key="k1")),
            two.submit(build_task("hi", model="m", idempotency_key="k1")),
        )
        assert first.text == second.text == ANSWER
        assert first.task_id == second.task_id  # the same task, run by one replica
        assert mesh.served_by("a") + mesh.served_by("b") == 1
        # A later retry on the other replica, streamed: the same answer, still one run.
        pieces = []
        async for item in two.stream(build_task("hi", model="m", idempotency_key="k1")):
            pieces.append(item)
        assert "".join(p for p in pieces if isinstance(p, str)) == ANSWER
        assert isinstance(pieces[-1], TaskResult) and pieces[-1].task_id == first.task_id
        assert mesh.served_by("a") + mesh.served_by("b") == 1
        # A different key is another task.
        other = await two.submit(build_task("hi", model="m", idempotency_key="k2"))
        assert other.task_id != first.task_id
        assert mesh.served_by("a") + mesh.served_by("b") == 2
        await close(one, two)

    run(scenario())


def test_any_replica_describes_a_task_another_ran():
    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", default=Reply())
        mesh.script("b", default=Reply())
        one, two = replicas(mesh, TaskDirectory())
        result = await one.submit(build_task("hi", model="m"))  # no key: no claim
        async with asyncio.timeout(2):
            while True:
                try:
                    record = await two.describe_task(result.task_id)
                    break
                except NotFoundError:
                    await asyncio.sleep(0.05)  # records are published in batches
        assert record.state is TaskState.DONE and record.result is not None
        assert record.result.text == ANSWER and record.result.node_id == result.node_id
        with pytest.raises(NotFoundError, match="never ran"):
            await two.describe_task("task-never-ran")
        await close(one, two)

    run(scenario())


def test_when_the_holders_caller_goes_away_the_waiting_replica_runs_the_task():
    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", Hang())
        mesh.script("b", Hang())
        one, two = replicas(mesh, TaskDirectory())
        holder = asyncio.create_task(one.submit(build_task("hi", model="m", idempotency_key="k1")))
        await asyncio.sleep(0.05)  # `one` holds the key, its node hangs
        mesh.script("a", default=Reply())  # what `two` will find (links take scripts on connect)
        mesh.script("b", default=Reply())
        waiter = asyncio.create_task(two.submit(build_task("hi", model="m", idempotency_key="k1")))
        await asyncio.sleep(0.05)
        assert not waiter.done()  # waits for the holder's outcome
        assert mesh.served_by("a") + mesh.served_by("b") == 1
        holder.cancel()
        result = await waiter
        assert result.text == ANSWER
        assert mesh.served_by("a") + mesh.served_by("b") == 2
        with pytest.raises(asyncio.CancelledError):
            await holder
        await close(one, two)

    run(scenario())


def test_a_transient_failure_is_not_kept_a_retry_elsewhere_runs_again():
    async def scenario():
        mesh = FakeMesh()
        down = UnavailableError("connection reset")
        mesh.script("a", Fail(down))
        mesh.script("b", Fail(down))
        one, two = replicas(mesh, TaskDirectory())
        with pytest.raises(TaskFailedError):
            await one.submit(build_task("hi", model="m", idempotency_key="k1"))
        mesh.script("a", default=Reply())  # the nodes are back
        mesh.script("b", default=Reply())
        result = await two.submit(build_task("hi", model="m", idempotency_key="k1"))
        assert result.text == ANSWER
        assert mesh.served_by("a") + mesh.served_by("b") == 3
        await close(one, two)

    run(scenario())


def test_the_callers_own_error_is_kept_a_retry_elsewhere_gets_it_without_a_run():
    async def scenario():
        mesh = FakeMesh()
        wrong = InvalidRequestError("prompt is longer than the context")
        mesh.script("a", Fail(wrong))
        mesh.script("b", Fail(wrong))
        one, two = replicas(mesh, TaskDirectory())
        with pytest.raises(InvalidRequestError, match="longer than the context"):
            await one.submit(build_task("hi", model="m", idempotency_key="k2"))
        await asyncio.sleep(0.01)  # the outcome reaches the directory
        with pytest.raises(InvalidRequestError, match="longer than the context"):
            await two.submit(build_task("hi", model="m", idempotency_key="k2"))
        assert mesh.served_by("a") + mesh.served_by("b") == 1
        await close(one, two)

    run(scenario())


def test_a_silent_holders_claim_lapses_after_its_ttl():
    async def scenario():
        clock = ManualClock()
        directory = TaskDirectory(clock=clock)
        t1, t2 = TaskId("t-1"), TaskId("t-2")
        assert directory.claim("k", t1, ttl_s=5.0).granted
        held = directory.claim("k", t2, ttl_s=5.0)
        assert not held.granted and held.task_id == t1
        assert await directory.outcome("k", t1, wait_s=0.01) is None  # still running
        clock.advance(6.0)  # the holder's replica died: no word, ever
        assert await directory.outcome("k", t1, wait_s=0.01) is LAPSED
        assert directory.claim("k", t2, ttl_s=5.0).granted
        directory.settle("k", t1, Outcome(error=UnavailableError("late")))  # ignored
        assert not directory.claim("k", TaskId("t-3"), ttl_s=5.0).granted

    run(scenario())


def test_a_waiter_is_woken_by_the_holders_outcome():
    async def scenario():
        directory = TaskDirectory()
        t1 = TaskId("t-1")
        directory.claim("k", t1, ttl_s=30.0)
        waiting = asyncio.create_task(directory.outcome("k", t1, wait_s=5.0))
        await asyncio.sleep(0.01)
        directory.settle("k", t1, Outcome(error=NotFoundError("no model x")))
        outcome = await asyncio.wait_for(waiting, 1.0)
        assert isinstance(outcome.error, NotFoundError)
        # The caller's own error is kept: the key stays claimed with that outcome.
        assert not directory.claim("k", TaskId("t-2"), ttl_s=30.0).granted

    run(scenario())


class _Unreachable(LocalDirectory):
    async def claim(self, key, task_id, ttl_s):
        raise ConnectionError("actor died")


def test_an_unreachable_directory_is_a_clear_error_and_leaves_nothing_running():
    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", default=Reply())
        dispatcher = Dispatcher(
            DispatcherSettings(policy="round_robin"),
            connect=mesh.connect,
            directory=_Unreachable(TaskDirectory()),
        )
        dispatcher.update_nodes([view("a")])
        task = build_task("hi", model="m", idempotency_key="k1")
        with pytest.raises(UnavailableError, match="task directory is not answering"):
            await dispatcher.submit(task)
        assert mesh.served_by("a") == 0
        assert dispatcher.ledger.find(task.dedup_key) is None  # a retry may run it
        # Tasks without a key need no claim and still run.
        assert (await dispatcher.submit(build_task("hi", model="m"))).text == ANSWER
        await dispatcher.close()

    run(scenario())
