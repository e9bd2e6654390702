"""Several dispatcher replicas sharing one TaskDirectory: a key runs once whichever replica a
retry lands on, a task is described by any replica, and a silent holder's claim lapses."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from mesh.coordinator.dispatch import Dispatcher
from mesh.coordinator.settings import DispatcherSettings
from mesh.coordinator.shared_tasks import (
    LAPSED,
    Outcome,
    SharedTasks,
    TaskDirectory,
)
from mesh.coordinator.tasks import (
    TaskLedger,
    TaskRecord,
    TaskResult,
    TaskSpec,
    TaskState,
    build_task,
)
from mesh.core.errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    InvalidRequestError,
    NotFoundError,
    TaskFailedError,
    UnavailableError,
)
from mesh.core.ids import TaskId
from tests.coordinator_fakes import (
    ANSWER,
    Fail,
    FakeMesh,
    Hang,
    LocalDirectory,
    ManualClock,
    Reply,
    view,
)

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
        assert directory.claim("k", "c1", t1, ttl_s=5.0).granted
        held = directory.claim("k", "c2", t2, ttl_s=5.0)
        assert not held.granted and (held.token, held.task_id) == ("c1", t1)
        assert await directory.outcome("k", "c1", wait_s=0.01) is None  # still running
        clock.advance(6.0)  # the holder's replica died: no word, ever
        assert await directory.outcome("k", "c1", wait_s=0.01) is LAPSED
        assert directory.claim("k", "c2", t2, ttl_s=5.0).granted
        directory.settle("k", "c1", Outcome(error=NotFoundError("late")))  # ignored: lapsed
        assert not directory.claim("k", "c3", TaskId("t-3"), ttl_s=5.0).granted
        directory.settle("k", "c2", LAPSED)
        assert directory.claim("k", "c3", TaskId("t-3"), ttl_s=5.0).granted

    run(scenario())


def test_claims_of_the_same_task_id_are_told_apart_by_their_tokens():
    async def scenario():
        directory = TaskDirectory()
        same = TaskId("caller-chose-this")
        assert directory.claim("id:caller-chose-this", "c1", same, ttl_s=30.0).granted
        assert not directory.claim("id:caller-chose-this", "c2", same, ttl_s=30.0).granted
        directory.settle("id:caller-chose-this", "c2", LAPSED)  # not the holder: ignored
        assert await directory.outcome("id:caller-chose-this", "c1", wait_s=0.01) is None

    run(scenario())


def test_a_waiter_is_woken_by_the_holders_outcome():
    async def scenario():
        directory = TaskDirectory()
        directory.claim("k", "c1", TaskId("t-1"), ttl_s=30.0)
        waiting = asyncio.create_task(directory.outcome("k", "c1", wait_s=5.0))
        await asyncio.sleep(0.01)
        directory.settle("k", "c1", Outcome(error=NotFoundError("no model x")))
        outcome = await asyncio.wait_for(waiting, 1.0)
        assert isinstance(outcome.error, NotFoundError)
        # The caller's own error is kept: the key stays claimed with that outcome.
        assert not directory.claim("k", "c2", TaskId("t-2"), ttl_s=30.0).granted

    run(scenario())


def test_the_directory_stays_bounded_even_behind_a_dead_holders_claim():
    async def scenario():
        clock = ManualClock()
        directory = TaskDirectory(max_tasks=3, clock=clock)
        for i in range(10):  # holders that die without a word
            directory.claim(f"dead-{i}", f"c{i}", TaskId(f"t{i}"), ttl_s=5.0)
        clock.advance(6.0)
        for i in range(10):
            directory.claim(f"k-{i}", f"d{i}", TaskId(f"u{i}"), ttl_s=5.0)
            directory.settle(f"k-{i}", f"d{i}", Outcome(error=NotFoundError("kept")))
        assert len(directory) <= 3
        running = directory.claim("live", "e", TaskId("v"), ttl_s=5.0)
        for i in range(10):
            directory.claim(f"more-{i}", f"f{i}", TaskId(f"w{i}"), ttl_s=5.0)
        assert not directory.claim("live", "g", TaskId("x"), ttl_s=5.0).granted  # never trimmed
        assert running.granted

    run(scenario())


def test_records_published_while_a_batch_is_in_flight_still_arrive():
    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", default=Reply(delay_s=0.05))  # runs through several publish batches
        mesh.script("b", default=Reply(delay_s=0.05))
        directory = TaskDirectory()
        one, two = replicas(mesh, directory)
        result = await one.submit(build_task("hi", model="m"))
        async with asyncio.timeout(3):
            while (record := directory.record(result.task_id)) is None or (
                record.state is not TaskState.DONE
            ):
                await asyncio.sleep(0.05)
        assert record.result is not None and record.result.text == ANSWER
        await close(one, two)

    run(scenario())


def test_a_task_that_cannot_start_frees_its_key_for_an_answer_elsewhere():
    async def scenario():
        mesh = FakeMesh()
        one, two = replicas(mesh, TaskDirectory())
        no_user = [{"role": "system", "content": "be brief"}]
        for dispatcher in (one, two):  # the second gets the kept error at once, no hang
            with pytest.raises(InvalidRequestError, match="needs a prompt or a user message"):
                await dispatcher.submit(
                    build_task(messages=no_user, agent="helper", idempotency_key="k1")
                )
        assert one.ledger.find("key:k1").state is TaskState.FAILED
        await close(one, two)

    run(scenario())


class _SlowClaims(LocalDirectory):
    async def claim(self, key, token, task_id, ttl_s, owner):
        await asyncio.sleep(0.1)  # the owner grants it, but the answer is slow to come back
        return await super().claim(key, token, task_id, ttl_s, owner)


def test_a_caller_cancelled_while_its_claim_is_in_flight_does_not_block_the_key():
    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", default=Reply())
        mesh.script("b", default=Reply())
        directory = TaskDirectory()
        settings = DispatcherSettings(policy="round_robin", deadline_s=30.0)
        one = Dispatcher(settings, connect=mesh.connect, directory=_SlowClaims(directory))
        two = Dispatcher(settings, connect=mesh.connect, directory=LocalDirectory(directory))
        for dispatcher in (one, two):
            dispatcher.update_nodes([view("a"), view("b")])
        gone = asyncio.create_task(one.submit(build_task("hi", model="m", idempotency_key="k")))
        await asyncio.sleep(0.05)
        gone.cancel()
        await asyncio.sleep(0.1)  # the grant arrives after the caller left: released at once
        result = await asyncio.wait_for(
            two.submit(build_task("hi", model="m", idempotency_key="k")), 2.0
        )
        assert result.text == ANSWER  # not a 30 s wait for the claim to lapse
        await close(one, two)

    run(scenario())


def test_a_waiter_that_runs_the_task_itself_keeps_to_its_own_deadline():
    async def scenario():
        directory = TaskDirectory()
        directory.claim("key:k", "someone", TaskId("t-0"), ttl_s=30.0)
        ledger = TaskLedger()
        shared = SharedTasks(LocalDirectory(directory), ledger, default_deadline_s=30.0)
        task = build_task("hi", model="m", idempotency_key="k", deadline_s=10.0)
        entry = ledger.begin(task)

        async def holder_goes_away():
            await asyncio.sleep(0.2)
            directory.settle("key:k", "someone", LAPSED)

        asyncio.create_task(holder_goes_away())
        runnable = await shared.claim_or_wait(task, entry)
        assert runnable is not None and runnable.task_id == task.task_id
        assert runnable.deadline_s is not None and runnable.deadline_s <= 10.0 - 0.2
        await shared.close()

    run(scenario())


def test_a_waiter_gives_up_at_its_own_deadline_with_a_clear_error():
    async def scenario():
        directory = TaskDirectory()
        directory.claim("key:k", "someone", TaskId("t-0"), ttl_s=30.0)  # runs, silent
        mesh = FakeMesh()
        dispatcher = Dispatcher(
            DispatcherSettings(), connect=mesh.connect, directory=LocalDirectory(directory)
        )
        task = build_task("hi", model="m", idempotency_key="k", deadline_s=0.3)
        with pytest.raises(DeadlineExceededError, match="still runs on another dispatcher"):
            await asyncio.wait_for(dispatcher.submit(task), 2.0)
        await dispatcher.close()

    run(scenario())


class _Unreachable(LocalDirectory):
    async def claim(self, key, token, task_id, ttl_s, owner):
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


def _owned(owner: str, **options) -> TaskSpec:
    return dataclasses.replace(build_task("hi", model="m", **options), owner=owner)


def test_across_replicas_a_task_id_is_one_keys_and_its_record_is_hidden_from_others():
    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", default=Reply())
        mesh.script("b", default=Reply())
        one, two = replicas(mesh, TaskDirectory())
        answer = await one.submit(_owned("ana", task_id="order-1"))
        with pytest.raises(AlreadyExistsError, match="'order-1' is already in use"):
            await two.submit(_owned("bob", task_id="order-1"))
        with pytest.raises(AlreadyExistsError):
            async for _item in two.stream(_owned("bob", task_id="order-1")):
                pass
        assert two.ledger.entry("order-1") is None  # bob's refused task left nothing here
        async with asyncio.timeout(2):
            while True:  # records are published in batches
                try:
                    record = await two.describe_task("order-1", reader="ana")
                    break
                except NotFoundError:
                    await asyncio.sleep(0.05)
        assert record.state is TaskState.DONE and record.result is not None
        with pytest.raises(NotFoundError, match="not known here"):  # another key's
            await two.describe_task("order-1", reader="bob")
        assert (await two.describe_task("order-1")).owner == "ana"  # no reader: an open mesh
        # ana's retry on the other replica: her answer, still one run.
        again = await two.submit(_owned("ana", task_id="order-1"))
        assert again.text == answer.text == ANSWER
        assert mesh.served_by("a") + mesh.served_by("b") == 1
        await close(one, two)

    run(scenario())


def test_the_directory_keeps_a_task_id_to_its_owner():
    async def scenario():
        directory = TaskDirectory()
        claim = directory.claim("id:ana\0t-1", "c1", TaskId("t-1"), ttl_s=5.0, owner="ana")
        assert claim.granted and not claim.in_use
        taken = directory.claim("id:bob\0t-1", "c2", TaskId("t-1"), ttl_s=5.0, owner="bob")
        assert taken.in_use and not taken.granted
        directory.publish(
            [
                TaskRecord(TaskId("t-1"), TaskState.RUNNING, owner="ana"),
                TaskRecord(TaskId("t-1"), TaskState.DONE, owner="bob"),  # never over ana's
                TaskRecord(TaskId("t-2"), TaskState.DONE, owner="bob"),
            ]
        )
        ana = directory.record("t-1", "ana")
        assert ana is not None and ana.state is TaskState.RUNNING
        assert directory.record("t-1", "bob") is None and directory.record("t-2", "ana") is None
        assert directory.record("t-2") is not None  # no reader: an open mesh
        assert directory.claim("id:ana\0t-2", "c3", TaskId("t-2"), ttl_s=5.0, owner="ana").in_use
        # An open mesh has one owner, "": no id is refused.
        assert directory.claim("id:t-3", "c4", TaskId("t-3"), ttl_s=5.0).granted
        assert not directory.claim("id:t-3", "c5", TaskId("t-3"), ttl_s=5.0).in_use

    run(scenario())
