"""The dispatch mechanism with fake nodes and a manual clock: retries, timeouts, cool-downs,
deadlines, mid-stream continuation, idempotency and capacity."""

from __future__ import annotations

import asyncio

import pytest

from mesh.coordinator.dispatch import Dispatcher
from mesh.coordinator.settings import DispatcherSettings
from mesh.coordinator.tasks import AttemptOutcome, TaskResult, TaskState, build_task
from mesh.core.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    TaskFailedError,
    UnavailableError,
)
from mesh.nodes_view import NodeState
from tests.coordinator_fakes import (
    ANSWER,
    Fail,
    FakeMesh,
    Hang,
    ManualClock,
    Queued,
    Reply,
    view,
    word_ids,
)

pytestmark = pytest.mark.unit


def run(coro, timeout=10):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def make(mesh: FakeMesh, *nodes, clock=None, **settings) -> Dispatcher:
    values = dict(policy="round_robin", queue_timeout_s=0.0, node_wait_s=0.0)
    values.update(settings)
    dispatcher = Dispatcher(
        DispatcherSettings(**values), connect=mesh.connect, clock=clock or ManualClock()
    )
    dispatcher.update_nodes(list(nodes))
    return dispatcher


async def collect(dispatcher: Dispatcher, task) -> tuple[list[str], TaskResult]:
    pieces: list[str] = []
    result = None
    async for item in dispatcher.stream(task):
        if isinstance(item, TaskResult):
            result = item
        else:
            pieces.append(item)
    assert result is not None
    return pieces, result


@pytest.mark.parametrize("streamed", [False, True])
def test_a_task_waiting_in_a_busy_nodes_queue_is_not_failed_as_silent(streamed):
    """Queued behind other work for ten times the per-attempt timeout: the node says it still
    waits, so the task is answered there, once, and the busy node is not cooled down."""

    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", Queued(wait_s=1.0))
        dispatcher = make(
            mesh,
            view("a"),
            view("b"),
            attempt_timeout_s=0.25,
            clock=asyncio.get_running_loop().time,
        )
        task = build_task("hi", model="m")
        if streamed:
            _pieces, result = await collect(dispatcher, task)
        else:
            result = await dispatcher.submit(task)
        assert result.text == ANSWER and result.node_id == "a"
        assert [a.outcome for a in result.attempts] == [AttemptOutcome.OK]
        assert mesh.served_by("b") == 0 and not dispatcher.pool.cooldowns.is_cooling("a")
        await dispatcher.close()

    run(scenario())


def test_a_node_silent_past_the_attempt_timeout_still_fails_over():
    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", Hang())
        dispatcher = make(
            mesh,
            view("a"),
            view("b"),
            attempt_timeout_s=0.05,
            clock=asyncio.get_running_loop().time,
        )
        result = await dispatcher.submit(build_task("hi", model="m"))
        assert result.node_id == "b"
        assert [a.outcome for a in result.attempts] == [AttemptOutcome.TIMEOUT, AttemptOutcome.OK]
        await dispatcher.close()

    run(scenario())


def test_unavailable_node_is_retried_on_another():
    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", Fail(UnavailableError("connection reset")))
        dispatcher = make(mesh, view("a"), view("b"))
        result = await dispatcher.submit(build_task("hi", model="m"))
        assert result.text == ANSWER and result.node_id == "b"
        assert [a.outcome for a in result.attempts] == [
            AttemptOutcome.UNAVAILABLE,
            AttemptOutcome.OK,
        ]
        assert result.failed_over and "connection reset" in result.attempts[0].detail
        # The second attempt carries its number; the task id is the same on both nodes.
        first, second = mesh.links["a"].requests[0], mesh.links["b"].requests[0]
        assert (first.task.attempt, second.task.attempt) == (1, 2)
        assert first.task.task_id == second.task.task_id == result.task_id
        await dispatcher.close()

    run(scenario())


def test_attempt_timeout_cancels_then_retries_elsewhere():
    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", Hang())
        dispatcher = make(
            mesh,
            view("a"),
            view("b"),
            clock=asyncio.get_running_loop().time,
            attempt_timeout_s=0.05,
        )
        result = await dispatcher.submit(build_task("hi", model="m"))
        assert result.node_id == "b"
        assert result.attempts[0].outcome is AttemptOutcome.TIMEOUT
        assert 40 <= result.attempts[0].duration_ms < 1000
        # The hung attempt ended (was cancelled) before the retry started.
        assert [e[:2] for e in mesh.calls.events] == [
            ("start", "a"),
            ("end", "a"),
            ("start", "b"),
            ("end", "b"),
        ]
        await dispatcher.close()

    run(scenario())


def test_a_task_never_runs_twice_at_once():
    async def scenario():
        mesh = FakeMesh()
        for node in "abc":
            mesh.script(node, Hang(), Fail(UnavailableError("down"), after_pieces=2))
        dispatcher = make(
            mesh,
            view("a"),
            view("b"),
            view("c"),
            clock=asyncio.get_running_loop().time,
            attempt_timeout_s=0.02,
            max_attempts=6,
            cooldown_s=0,
        )
        tasks = [build_task("hi", model="m") for _ in range(6)]
        results = await asyncio.gather(
            *(dispatcher.submit(t) for t in tasks), return_exceptions=True
        )
        assert mesh.calls.most_at_once == 1
        assert all(isinstance(r, TaskResult) for r in results), results
        await dispatcher.close()

    run(scenario())


def test_repeated_failures_cool_a_node_down_until_it_has_rested():
    async def scenario():
        clock = ManualClock()
        mesh = FakeMesh(clock)
        mesh.script("a", Fail(UnavailableError("x")), Fail(UnavailableError("x")))
        dispatcher = make(
            mesh, view("a"), view("b"), clock=clock, failures_before_cooldown=2, cooldown_s=10
        )
        for _ in range(2):  # round robin starts at a each time a fails over to b
            assert (await dispatcher.submit(build_task("hi", model="m"))).node_id == "b"
        assert dispatcher.pool.cooldowns.is_cooling("a")
        served = [(await dispatcher.submit(build_task("hi", model="m"))).node_id for _ in range(3)]
        assert served == ["b", "b", "b"] and mesh.served_by("a") == 2
        assert next(r for r in dispatcher.node_rows() if r.view.node_id == "a").cooling_down
        clock.advance(10.5)
        served = {(await dispatcher.submit(build_task("hi", model="m"))).node_id for _ in range(2)}
        assert served == {"a", "b"}
        await dispatcher.close()

    run(scenario())


def test_deadline_exhausted_fails_with_every_attempt_listed():
    async def scenario():
        clock = ManualClock()
        mesh = FakeMesh(clock)
        for node in "abc":
            mesh.script(node, default=Fail(UnavailableError(f"{node} down"), advance_clock_s=4))
        dispatcher = make(
            mesh, view("a"), view("b"), view("c"), clock=clock, max_attempts=10, cooldown_s=0
        )
        with pytest.raises(DeadlineExceededError) as failed:  # the deadline ended it
            await dispatcher.submit(build_task("hi", model="m", deadline_s=10))
        attempts = failed.value.fields["attempts"]
        assert len(attempts) == 3  # 0 s, 4 s, 8 s: the fourth would start past the deadline
        assert all(a.outcome is AttemptOutcome.UNAVAILABLE for a in attempts)
        assert "deadline" in str(failed.value) and "b down" in str(failed.value)
        record = await dispatcher.describe_task(failed.value.fields["task_id"])
        assert record.state is TaskState.FAILED and len(record.attempts) == 3
        await dispatcher.close()

    run(scenario())


def test_max_attempts_bounds_retries():
    async def scenario():
        mesh = FakeMesh()
        for node in "ab":
            mesh.script(node, default=Fail(UnavailableError("down")))
        dispatcher = make(mesh, view("a"), view("b"), max_attempts=3, cooldown_s=0)
        with pytest.raises(TaskFailedError, match="all 3 attempts failed"):
            await dispatcher.submit(build_task("hi", model="m"))
        await dispatcher.close()

    run(scenario())


def test_mid_stream_failover_continues_without_duplicate_or_missing_text():
    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", Fail(UnavailableError("node killed"), after_pieces=4))
        dispatcher = make(mesh, view("a"), view("b"))
        pieces, result = await collect(dispatcher, build_task("hi", model="m", max_tokens=8))
        words = ANSWER.split(" ")
        assert "".join(pieces) == " ".join(words[:8]) == result.text
        continued = mesh.links["b"].requests[0]
        assert continued.continuation == " ".join(words[:4])
        assert continued.sampling.max_tokens == 4  # 8 asked, 4 already produced
        assert result.failed_over and result.completion_tokens == 8
        assert [(a.node_id, a.outcome, a.completion_tokens) for a in result.attempts] == [
            ("a", AttemptOutcome.UNAVAILABLE, 4),
            ("b", AttemptOutcome.OK, 4),
        ]
        await dispatcher.close()

    run(scenario())


def test_stream_that_breaks_twice_still_reads_as_one_answer():
    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", Fail(UnavailableError("x"), after_pieces=2))
        mesh.script("b", Fail(UnavailableError("y"), after_pieces=3))
        dispatcher = make(mesh, view("a"), view("b"), view("c"), cooldown_s=0)
        pieces, result = await collect(dispatcher, build_task("hi", model="m"))
        assert "".join(pieces) == ANSWER and result.node_id == "c"
        assert [a.completion_tokens for a in result.attempts][:2] == [2, 3]
        await dispatcher.close()

    run(scenario())


def test_stream_total_is_max_tokens_after_two_failovers():
    """Usage is a promise kept across nodes: each next node is asked for exactly the tokens
    still missing, and the result counts each token once."""

    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", Fail(UnavailableError("x"), after_pieces=2))
        mesh.script("b", Fail(UnavailableError("y"), after_pieces=3))
        dispatcher = make(mesh, view("a"), view("b"), view("c"), cooldown_s=0)
        pieces, result = await collect(dispatcher, build_task("hi", model="m", max_tokens=8))
        assert "".join(pieces) == " ".join(ANSWER.split(" ")[:8]) == result.text
        assert [link.requests[0].sampling.max_tokens for link in mesh.links.values()] == [8, 6, 3]
        assert result.completion_tokens == 8
        assert sum(a.completion_tokens for a in result.attempts) == 8
        await dispatcher.close()

    run(scenario())


def test_stream_continues_from_token_ids_on_a_node_with_the_same_model_file():
    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", Fail(UnavailableError("node killed"), after_pieces=4))
        same = {"model_hashes": {"m": "f00d"}}
        dispatcher = make(mesh, view("a", **same), view("b", **same))
        pieces, result = await collect(dispatcher, build_task("hi", model="m", max_tokens=8))
        assert "".join(pieces) == " ".join(ANSWER.split(" ")[:8]) == result.text
        continued = mesh.links["b"].requests[0]
        assert list(continued.continuation_token_ids) == word_ids(0, 4)
        assert continued.continuation == " ".join(ANSWER.split(" ")[:4])  # for older nodes
        assert result.completion_tokens == 8
        await dispatcher.close()

    run(scenario())


@pytest.mark.parametrize(
    ("a_hashes", "b_hashes", "settings"),
    [
        ({"m": "f00d"}, {"m": "beef"}, {}),  # another model file under the same name
        ({"m": "f00d"}, {}, {}),  # a node that does not say
        ({}, {}, {}),
        ({"m": "f00d"}, {"m": "f00d"}, {"resume_from_token_ids": False}),
    ],
)
def test_stream_continues_from_text_where_token_ids_would_not_fit(a_hashes, b_hashes, settings):
    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", Fail(UnavailableError("node killed"), after_pieces=3))
        dispatcher = make(
            mesh,
            view("a", model_hashes=a_hashes),
            view("b", model_hashes=b_hashes),
            **settings,
        )
        pieces, result = await collect(dispatcher, build_task("hi", model="m", max_tokens=8))
        assert "".join(pieces) == " ".join(ANSWER.split(" ")[:8])
        continued = mesh.links["b"].requests[0]
        assert not continued.continuation_token_ids and continued.continuation
        await dispatcher.close()

    run(scenario())


def test_token_ids_are_not_passed_on_once_a_node_continued_from_text():
    """b (another file) continues from the text and sends no ids, so c, though it has a's
    file, cannot get ids for all the text: it continues from the text too."""

    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", Fail(UnavailableError("x"), after_pieces=2))
        mesh.script("b", Fail(UnavailableError("y"), after_pieces=2))
        dispatcher = make(
            mesh,
            view("a", model_hashes={"m": "f00d"}),
            view("b", model_hashes={"m": "beef"}),
            view("c", model_hashes={"m": "f00d"}),
            cooldown_s=0,
        )
        pieces, result = await collect(dispatcher, build_task("hi", model="m"))
        assert "".join(pieces) == ANSWER and result.node_id == "c"
        assert not mesh.links["c"].requests[0].continuation_token_ids
        await dispatcher.close()

    run(scenario())


def test_token_ids_of_the_default_model_follow_the_nodes_default():
    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", Fail(UnavailableError("x"), after_pieces=2))
        same = {"model_hashes": {"m": "f00d"}, "default_model": "m"}
        dispatcher = make(mesh, view("a", **same), view("b", **same))
        await collect(dispatcher, build_task("hi"))  # no model named: each node's default
        assert list(mesh.links["b"].requests[0].continuation_token_ids) == word_ids(0, 2)
        await dispatcher.close()

    run(scenario())


def test_stream_silence_longer_than_attempt_timeout_fails_over():
    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", Hang())
        dispatcher = make(
            mesh,
            view("a"),
            view("b"),
            clock=asyncio.get_running_loop().time,
            attempt_timeout_s=0.05,
        )
        pieces, result = await collect(dispatcher, build_task("hi", model="m"))
        assert "".join(pieces) == ANSWER and result.attempts[0].outcome is AttemptOutcome.TIMEOUT
        await dispatcher.close()

    run(scenario())


def test_same_idempotency_key_returns_the_same_answer_without_rerunning():
    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", default=Reply(delay_s=0.01))
        dispatcher = make(mesh, view("a"))
        first, second = await asyncio.gather(
            dispatcher.submit(build_task("hi", model="m", idempotency_key="k1")),
            dispatcher.submit(build_task("hi", model="m", idempotency_key="k1")),
        )
        third = await dispatcher.submit(build_task("hi", model="m", idempotency_key="k1"))
        assert first is second is third and mesh.served_by("a") == 1
        pieces, streamed = await collect(
            dispatcher, build_task("hi", model="m", idempotency_key="k1")
        )
        assert "".join(pieces) == first.text and streamed is first and mesh.served_by("a") == 1
        other = await dispatcher.submit(build_task("hi", model="m", idempotency_key="k2"))
        assert other.task_id != first.task_id and mesh.served_by("a") == 2
        assert (await dispatcher.describe_task(first.task_id)).result is first
        await dispatcher.close()

    run(scenario())


def test_beyond_the_mesh_capacity_is_refused_and_no_node_is_overfilled():
    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", default=Reply(delay_s=0.05))
        dispatcher = make(
            mesh, view("a", max_concurrent=1, max_queued=1), clock=asyncio.get_running_loop().time
        )
        running = [
            asyncio.create_task(dispatcher.submit(build_task("hi", model="m"))) for _ in range(2)
        ]
        await asyncio.sleep(0.01)
        assert dispatcher.pool.outstanding["a"] == 2
        with pytest.raises(OverloadedError, match="capacity"):
            await dispatcher.submit(build_task("hi", model="m"))
        await asyncio.gather(*running)
        assert (await dispatcher.submit(build_task("hi", model="m"))).node_id == "a"
        await dispatcher.close()

    run(scenario())


def test_full_mesh_queues_briefly_for_a_free_slot():
    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", default=Reply(delay_s=0.01))
        dispatcher = make(
            mesh,
            view("a", max_concurrent=1, max_queued=0),
            clock=asyncio.get_running_loop().time,
            queue_timeout_s=2.0,
        )
        results = await asyncio.gather(
            *(dispatcher.submit(build_task("hi", model="m")) for _ in range(3))
        )
        assert len(results) == 3 and mesh.calls.most_at_once == 1
        await dispatcher.close()

    run(scenario())


def test_capacity_is_shared_between_replicas():
    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", default=Reply(delay_s=0.05))
        dispatcher = make(
            mesh,
            view("a", max_concurrent=2, max_queued=2),
            clock=asyncio.get_running_loop().time,
            capacity_share=2,
        )
        running = [
            asyncio.create_task(dispatcher.submit(build_task("hi", model="m"))) for _ in range(2)
        ]
        await asyncio.sleep(0.01)
        with pytest.raises(OverloadedError):  # this replica's share is 1 + 1
            await dispatcher.submit(build_task("hi", model="m"))
        await asyncio.gather(*running)
        await dispatcher.close()

    run(scenario())


def test_invalid_request_is_not_retried():
    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", Fail(InvalidRequestError("max_tokens too large")))
        dispatcher = make(mesh, view("a"), view("b"))
        with pytest.raises(InvalidRequestError):
            await dispatcher.submit(build_task("hi", model="m"))
        assert mesh.served_by("b") == 0
        await dispatcher.close()

    run(scenario())


def test_unknown_model_and_no_ready_node():
    async def scenario():
        mesh = FakeMesh()
        dispatcher = make(mesh, view("a"), view("b", state=NodeState.SUSPECT, models=("z",)))
        with pytest.raises(NotFoundError, match="no node serves model 'nope'.*ready models: m"):
            await dispatcher.submit(build_task("hi", model="nope"))
        with pytest.raises(UnavailableError, match="no ready node"):
            await dispatcher.submit(build_task("hi", model="z"))
        await dispatcher.close()

    run(scenario())


def test_labels_constrain_the_node():
    async def scenario():
        mesh = FakeMesh()
        dispatcher = make(mesh, view("a", labels={"site": "x"}), view("b", labels={"site": "y"}))
        for _ in range(3):
            result = await dispatcher.submit(build_task("hi", model="m", labels={"site": "y"}))
            assert result.node_id == "b"
        await dispatcher.close()

    run(scenario())


def test_channels_of_gone_nodes_are_closed_and_latency_is_recorded():
    async def scenario():
        mesh = FakeMesh()
        dispatcher = make(mesh, view("a"), clock=asyncio.get_running_loop().time)
        await dispatcher.submit(build_task("hi", model="m"))
        assert dispatcher.pool.ewma.get("a") is not None
        dispatcher.update_nodes([view("a", state=NodeState.GONE)])
        await asyncio.sleep(0)
        assert mesh.links["a"].closed
        await dispatcher.close()

    run(scenario())


def test_cancelled_caller_cancels_the_attempt():
    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", Hang())
        dispatcher = make(mesh, view("a"), clock=asyncio.get_running_loop().time)
        task = build_task("hi", model="m", idempotency_key="c1")
        call = asyncio.create_task(dispatcher.submit(task))
        await asyncio.sleep(0.01)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert mesh.calls.running[task.task_id] == 0 and not dispatcher.pool.outstanding
        record = await dispatcher.describe_task(task.task_id)
        assert record.attempts[0].outcome is AttemptOutcome.CANCELLED
        # A cancelled task does not pin its key: the caller may try again.
        assert (
            await dispatcher.submit(build_task("hi", model="m", idempotency_key="c1"))
        ).text == ANSWER
        await dispatcher.close()

    run(scenario())


def test_describe_task_shows_the_attempt_in_progress():
    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", Fail(UnavailableError("x")), default=Reply(delay_s=0.05))
        dispatcher = make(
            mesh, view("a"), view("b"), clock=asyncio.get_running_loop().time, cooldown_s=0
        )
        mesh.script("b", Reply(delay_s=0.05))
        task = build_task("hi", model="m", task_id="t-1")
        items = dispatcher.stream(task)
        assert await anext(items) == "Paris"
        record = await dispatcher.describe_task("t-1")
        assert record.state is TaskState.RUNNING
        assert [(a.node_id, a.outcome) for a in record.attempts] == [
            ("a", AttemptOutcome.UNAVAILABLE),
            ("b", AttemptOutcome.RUNNING),
        ]
        assert record.attempts[-1].completion_tokens == 1
        async for _item in items:
            pass
        assert (await dispatcher.describe_task("t-1")).attempts[-1].outcome is AttemptOutcome.OK
        await dispatcher.close()

    run(scenario())
