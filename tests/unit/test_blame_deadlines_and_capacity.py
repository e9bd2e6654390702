"""Whose fault an error is (and so what is retried and what cools down), the task's own
deadline, what the idempotency ledger remembers, capacity shared by replicas, limits checked at
the ingresses, streams released at once, and `mesh coordinator start` failing in one line."""

from __future__ import annotations

import asyncio
import json
import logging
import signal

import grpc
import pytest
from fastapi.testclient import TestClient

from edgemesh.v1 import mesh_pb2, node_pb2
from mesh.coordinator import runner
from mesh.coordinator.dispatch import Dispatcher
from mesh.coordinator.openai_api import build_openai_app, error_body
from mesh.coordinator.service import coalesce, task_from_submit
from mesh.coordinator.settings import CoordinatorConfig, DispatcherSettings
from mesh.coordinator.tasks import AttemptOutcome, TaskLedger, TaskResult, TaskState, build_task
from mesh.core.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    TaskFailedError,
    UnavailableError,
)
from mesh.core.grpc_status import status_code_for
from mesh.nodes_view import NodeState
from mesh.routing import TaskShape, capacity_share, filter_candidates
from mesh.topology import default_topology
from tests.coordinator_fakes import ANSWER, Fail, FakeMesh, Hang, ManualClock, Reply, view

pytestmark = pytest.mark.unit

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


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


async def collect(items) -> tuple[list[str], TaskResult]:
    pieces, result = [], None
    async for item in items:
        if isinstance(item, TaskResult):
            result = item
        else:
            pieces.append(item)
    assert result is not None
    return pieces, result


# ---------------------------------------------------------------- 1. the caller's errors


@pytest.mark.parametrize(
    "error", [InvalidRequestError("max_tokens too large"), NotFoundError("no model 'm' here")]
)
def test_a_callers_error_from_a_node_cools_nothing_and_is_not_retried(error):
    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", Fail(error))
        dispatcher = make(mesh, view("a"), view("b"), failures_before_cooldown=1)
        with pytest.raises(type(error)):
            await dispatcher.submit(build_task("hi", model="m"))
        assert mesh.served_by("b") == 0
        assert not dispatcher.pool.cooldowns.is_cooling("a")
        assert dispatcher.pool.cooldowns.consecutive_failures("a") == 0
        await dispatcher.close()

    run(scenario())


def test_max_tokens_below_one_is_refused_at_every_ingress():
    with pytest.raises(InvalidRequestError, match="max_tokens must be at least 1"):
        task_from_submit(
            mesh_pb2.SubmitRequest(prompt="hi", sampling=node_pb2.Sampling(max_tokens=0))
        )
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        task_from_submit(
            mesh_pb2.SubmitRequest(prompt="hi", sampling=node_pb2.Sampling(max_tokens=-3))
        )
    assert (
        task_from_submit(mesh_pb2.SubmitRequest(prompt="hi")).request.sampling.HasField(
            "max_tokens"
        )
        is False
    )

    async def scenario():
        mesh = FakeMesh()
        dispatcher = make(mesh, view("a"))
        with pytest.raises(InvalidRequestError):
            await dispatcher.submit(build_task("hi", model="m", max_tokens=0))
        assert mesh.served_by("a") == 0
        await dispatcher.close()

    run(scenario())


def test_openai_max_tokens_below_one_is_a_400_in_openai_shape():
    mesh = FakeMesh()
    dispatcher = Dispatcher(
        DispatcherSettings(queue_timeout_s=0, node_wait_s=0), connect=mesh.connect
    )
    dispatcher.update_nodes([view("a")])
    with TestClient(build_openai_app(dispatcher)) as client:
        for field in ("max_tokens", "max_completion_tokens"):
            reply = client.post("/v1/chat/completions", json={**CHAT, field: 0})
            assert reply.status_code == 400
            error = reply.json()["error"]
            assert error["type"] == "invalid_request_error" and field in error["message"]
            assert error["code"] == "invalid_argument"
        assert mesh.served_by("a") == 0


# ---------------------------------------------------------------- 2. the task's deadline


def test_the_tasks_own_deadline_is_deadline_exceeded_and_not_the_nodes_fault():
    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", Hang())
        dispatcher = make(
            mesh,
            view("a"),
            view("b"),
            clock=asyncio.get_running_loop().time,
            attempt_timeout_s=30,
            failures_before_cooldown=1,
        )
        with pytest.raises(DeadlineExceededError) as raised:
            await dispatcher.submit(build_task("hi", model="m", deadline_s=0.05))
        error = raised.value
        assert status_code_for(error) is grpc.StatusCode.DEADLINE_EXCEEDED
        assert error_body(error)[0] == 504
        attempts = error.fields["attempts"]
        assert [a.outcome for a in attempts] == [AttemptOutcome.TIMEOUT]
        assert "deadline" in attempts[0].detail and error.fields["task_id"]
        assert not dispatcher.pool.cooldowns.is_cooling("a")  # the node did nothing wrong
        assert mesh.served_by("b") == 0
        await dispatcher.close()

    run(scenario())


def test_a_stream_that_outlives_its_deadline_is_deadline_exceeded():
    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", Reply(delay_s=0.5))  # slower per word than the whole deadline
        dispatcher = make(
            mesh,
            view("a"),
            view("b"),
            clock=asyncio.get_running_loop().time,
            attempt_timeout_s=30,
            failures_before_cooldown=1,
        )
        with pytest.raises(DeadlineExceededError):
            await collect(dispatcher.stream(build_task("hi", model="m", deadline_s=0.05)))
        assert not dispatcher.pool.cooldowns.is_cooling("a") and mesh.served_by("b") == 0
        await dispatcher.close()

    run(scenario())


def test_the_node_saying_deadline_exceeded_after_the_deadline_blames_the_deadline():
    async def scenario():
        clock = ManualClock()
        mesh = FakeMesh(clock)
        mesh.script("a", Fail(DeadlineExceededError("deadline exceeded"), advance_clock_s=6))
        dispatcher = make(
            mesh,
            view("a"),
            view("b"),
            clock=clock,
            attempt_timeout_s=30,
            failures_before_cooldown=1,
        )
        with pytest.raises(DeadlineExceededError):
            await dispatcher.submit(build_task("hi", model="m", deadline_s=5))
        assert not dispatcher.pool.cooldowns.is_cooling("a")
        await dispatcher.close()

    run(scenario())


def test_a_per_attempt_timeout_still_fails_over_and_counts_against_the_node():
    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", Hang())
        dispatcher = make(
            mesh,
            view("a"),
            view("b"),
            clock=asyncio.get_running_loop().time,
            attempt_timeout_s=0.05,
            failures_before_cooldown=1,
        )
        result = await dispatcher.submit(build_task("hi", model="m", deadline_s=5))
        assert result.node_id == "b" and result.attempts[0].outcome is AttemptOutcome.TIMEOUT
        assert dispatcher.pool.cooldowns.is_cooling("a")
        await dispatcher.close()

    run(scenario())


# ---------------------------------------------------------------- 3. the idempotency ledger


def test_a_transient_failure_is_not_the_answer_to_a_retry_with_the_same_key():
    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", Fail(UnavailableError("down")))
        dispatcher = make(mesh, view("a"), max_attempts=1)
        with pytest.raises(TaskFailedError):
            await dispatcher.submit(build_task("hi", model="m", idempotency_key="k"))
        again = await dispatcher.submit(build_task("hi", model="m", idempotency_key="k"))
        assert again.text == ANSWER and mesh.served_by("a") == 2
        await dispatcher.close()

    run(scenario())


def test_a_retry_with_the_same_task_id_runs_again_after_a_transient_failure():
    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", Fail(OverloadedError("busy")))
        dispatcher = make(mesh, view("a"), max_attempts=1)
        with pytest.raises(TaskFailedError):
            await dispatcher.submit(build_task("hi", model="m", task_id="t-1"))
        again = await dispatcher.submit(build_task("hi", model="m", task_id="t-1"))
        assert again.task_id == "t-1" and again.text == ANSWER
        record = await dispatcher.describe_task("t-1")
        assert record.state is TaskState.DONE and record.result is again
        await dispatcher.close()

    run(scenario())


def test_a_callers_error_stays_the_answer_to_the_same_key():
    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", Fail(InvalidRequestError("prompt too long")))
        dispatcher = make(mesh, view("a"))
        for _ in range(2):
            with pytest.raises(InvalidRequestError, match="prompt too long"):
                await dispatcher.submit(build_task("hi", model="m", idempotency_key="k"))
        assert mesh.served_by("a") == 1
        await dispatcher.close()

    run(scenario())


def test_a_retried_task_id_is_counted_once_in_the_bounded_ledger():
    async def scenario():
        ledger = TaskLedger(max_finished=1)
        task = build_task("hi", task_id="t-1")
        ledger.fail(ledger.begin(task), UnavailableError("down"), ())
        entry = ledger.begin(task)
        result = TaskResult(
            task_id=task.task_id,
            text="x",
            finish_reason="stop",
            node_id="a",
            node_name="a",
            model="m",
            agent="",
            prompt_tokens=1,
            completion_tokens=1,
            attempts=(),
            failed_over=False,
            total_ms=1.0,
            time_to_first_token_ms=1.0,
        )
        ledger.succeed(entry, result)
        assert ledger.record("t-1").result is result  # not evicted by a double count
        ledger.close()

    run(scenario())


# ---------------------------------------------------------------- 4. a waiter whose leader left


def test_a_caller_waiting_on_the_same_key_runs_the_task_when_the_first_one_cancels():
    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", Hang())  # the first caller's attempt never ends; the rerun answers
        dispatcher = make(mesh, view("a"), clock=asyncio.get_running_loop().time)
        first = asyncio.create_task(
            dispatcher.submit(build_task("hi", model="m", idempotency_key="k"))
        )
        await asyncio.sleep(0.01)
        second = asyncio.create_task(
            dispatcher.submit(build_task("hi", model="m", idempotency_key="k"))
        )
        await asyncio.sleep(0.01)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        result = await asyncio.wait_for(second, 5)
        assert result.text == ANSWER and mesh.served_by("a") == 2
        await dispatcher.close()

    run(scenario())


def test_a_streaming_waiter_runs_the_task_when_the_first_caller_cancels():
    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", Hang())
        dispatcher = make(mesh, view("a"), clock=asyncio.get_running_loop().time)
        first = asyncio.create_task(
            dispatcher.submit(build_task("hi", model="m", idempotency_key="k"))
        )
        await asyncio.sleep(0.01)
        second = asyncio.create_task(
            collect(dispatcher.stream(build_task("hi", model="m", idempotency_key="k")))
        )
        await asyncio.sleep(0.01)
        first.cancel()
        pieces, result = await asyncio.wait_for(second, 5)
        assert "".join(pieces) == ANSWER == result.text
        await dispatcher.close()

    run(scenario())


def test_a_waiter_that_is_cancelled_itself_is_still_cancelled():
    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", Hang())
        dispatcher = make(mesh, view("a"), clock=asyncio.get_running_loop().time)
        first = asyncio.create_task(
            dispatcher.submit(build_task("hi", model="m", idempotency_key="k"))
        )
        await asyncio.sleep(0.01)
        second = asyncio.create_task(
            dispatcher.submit(build_task("hi", model="m", idempotency_key="k"))
        )
        await asyncio.sleep(0.01)
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        assert mesh.served_by("a") == 1 and not first.done()
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await dispatcher.close()

    run(scenario())


# ---------------------------------------------------------------- 5. capacity and replicas


def test_replicas_from_the_command_line_share_the_capacity():
    config = CoordinatorConfig.from_topology(default_topology(), replicas=4)
    assert config.replicas == 4 and config.dispatcher.capacity_share == 4
    assert CoordinatorConfig(replicas=3).dispatcher_settings().capacity_share == 3
    assert CoordinatorConfig.from_topology(default_topology()).dispatcher.capacity_share == 1


def test_a_node_with_fewer_slots_than_replicas_is_refused_not_overfilled():
    async def scenario():
        mesh = FakeMesh()
        dispatcher = make(mesh, view("a", max_concurrent=2, max_queued=0), capacity_share=4)
        with pytest.raises(OverloadedError, match="fewer slots than the 4 dispatcher replicas"):
            await dispatcher.submit(build_task("hi", model="m"))
        assert mesh.served_by("a") == 0
        await dispatcher.close()

    run(scenario())


def test_each_replica_gets_an_equal_part_of_the_slots_rounded_down():
    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", default=Reply(delay_s=0.05))
        # 4 + 4 slots among 3 replicas: 2 each (6 in all, never more than 8).
        dispatcher = make(
            mesh,
            view("a", max_concurrent=4, max_queued=4),
            clock=asyncio.get_running_loop().time,
            capacity_share=3,
        )
        running = [
            asyncio.create_task(dispatcher.submit(build_task("hi", model="m"))) for _ in range(2)
        ]
        await asyncio.sleep(0.01)
        with pytest.raises(OverloadedError):
            await dispatcher.submit(build_task("hi", model="m"))
        await asyncio.gather(*running)
        await dispatcher.close()

    run(scenario())


def test_a_replica_may_use_its_share_while_the_others_use_theirs():
    async def scenario():
        mesh = FakeMesh()
        # 8 slots, 2 replicas; the node reports 4 in use, all the other replica's.
        busy = view("a", max_concurrent=4, max_queued=4, in_flight=4)
        dispatcher = make(mesh, busy, capacity_share=2)
        assert (await dispatcher.submit(build_task("hi", model="m"))).node_id == "a"
        # Full (8 reported): nothing left for anyone.
        dispatcher.update_nodes([view("a", max_concurrent=4, max_queued=4, in_flight=4, queued=4)])
        with pytest.raises(OverloadedError):
            await dispatcher.submit(build_task("hi", model="m"))
        await dispatcher.close()

    run(scenario())


def test_spare_is_the_smaller_of_the_share_left_and_the_nodes_room_left():
    node = view("a", max_concurrent=4, max_queued=4, in_flight=5)  # 8 slots, 5 in use
    [candidate] = filter_candidates([node], TaskShape(), outstanding={"a": 1}, share=2)
    assert candidate.spare == 3  # min(4 - 1, 8 - 5)
    assert candidate.utilisation == 5 / 4  # ranked by the whole node's load
    [candidate] = filter_candidates([node], TaskShape(), outstanding={"a": 3}, share=2)
    assert candidate.spare == 1  # min(4 - 3, 8 - 5)
    assert filter_candidates([node], TaskShape(), outstanding={"a": 4}, share=2) == []
    assert (
        filter_candidates(
            [view("a", max_concurrent=4, max_queued=4, in_flight=8)], TaskShape(), share=2
        )
        == []
    )
    assert capacity_share(4, 4, 3) == (1, 1) and capacity_share(2, 0, 4) == (0, 0)
    assert capacity_share(5, 1, 1) == (5, 1)


# ---------------------------------------------------------------- 6. non-finite deadlines


@pytest.mark.parametrize("deadline", [float("nan"), float("inf"), -1.0, 1e12])
def test_a_deadline_that_is_not_a_finite_time_is_an_invalid_request(deadline):
    with pytest.raises(InvalidRequestError, match="deadline_s"):
        task_from_submit(mesh_pb2.SubmitRequest(prompt="hi", deadline_s=deadline))

    async def scenario():
        dispatcher = make(FakeMesh(), view("a"))
        with pytest.raises(InvalidRequestError):
            await dispatcher.submit(build_task("hi", model="m", deadline_s=deadline))
        with pytest.raises(InvalidRequestError):
            await collect(dispatcher.stream(build_task("hi", model="m", deadline_s=deadline)))
        await dispatcher.close()

    run(scenario())


def test_openai_deadline_header_must_be_a_finite_time():
    mesh = FakeMesh()
    dispatcher = Dispatcher(
        DispatcherSettings(queue_timeout_s=0, node_wait_s=0), connect=mesh.connect
    )
    dispatcher.update_nodes([view("a")])
    with TestClient(build_openai_app(dispatcher)) as client:
        for value in ("nan", "inf", "-inf", "-2"):
            reply = client.post(
                "/v1/chat/completions", json=CHAT, headers={"X-Mesh-Deadline-S": value}
            )
            assert reply.status_code == 400, value
            assert "X-Mesh-Deadline-S" in reply.json()["error"]["message"]
        assert (
            client.post(
                "/v1/chat/completions", json=CHAT, headers={"X-Mesh-Deadline-S": "5"}
            ).status_code
            == 200
        )


# ---------------------------------------------------------------- 8. streams released at once


def test_closing_a_stream_frees_the_node_at_once_and_records_the_cancel():
    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", Reply(delay_s=0.01))
        dispatcher = make(mesh, view("a"), clock=asyncio.get_running_loop().time)
        task = build_task("hi", model="m")
        items = dispatcher.stream(task)
        assert await anext(items) == "Paris"
        assert dispatcher.pool.outstanding == {"a": 1}
        await items.aclose()
        assert dispatcher.pool.outstanding == {}  # not when the garbage collector gets to it
        assert mesh.calls.running[task.task_id] == 0
        assert (await dispatcher.describe_task(task.task_id)).attempts[-1].outcome is (
            AttemptOutcome.CANCELLED
        )
        await dispatcher.close()

    run(scenario())


def test_closing_an_unbatched_stream_closes_the_dispatcher_stream_too():
    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", Reply(delay_s=0.01))
        dispatcher = make(mesh, view("a"), clock=asyncio.get_running_loop().time)
        items = coalesce(dispatcher.stream(build_task("hi", model="m")), 0.0)
        assert await anext(items) == "Paris"
        await items.aclose()
        assert dispatcher.pool.outstanding == {}
        await dispatcher.close()

    run(scenario())


# ---------------------------------------------------------------- 10. a stream already complete


def test_a_stream_broken_after_its_last_token_is_complete_without_another_node():
    async def scenario():
        mesh = FakeMesh()
        mesh.script("a", Fail(UnavailableError("gone"), after_pieces=4))
        dispatcher = make(mesh, view("a"), max_attempts=1)
        pieces, result = await collect(dispatcher.stream(build_task("hi", model="m", max_tokens=4)))
        assert "".join(pieces) == "Paris is the capital" == result.text
        assert (result.node_id, result.finish_reason, result.completion_tokens) == (
            "a",
            "length",
            4,
        )
        assert [a.outcome for a in result.attempts] == [AttemptOutcome.UNAVAILABLE]
        assert mesh.served_by("a") == 1
        await dispatcher.close()

    run(scenario())


# ---------------------------------------------------------------- 12. nodes that are gone


def test_what_was_measured_about_a_node_is_forgotten_when_it_is_gone():
    async def scenario():
        mesh = FakeMesh()
        mesh.script("b", Fail(UnavailableError("x")))
        dispatcher = make(
            mesh,
            view("a"),
            view("b"),
            clock=asyncio.get_running_loop().time,
            failures_before_cooldown=1,
            policy="round_robin",
        )
        await dispatcher.submit(build_task("hi", model="m"))  # a answers
        await dispatcher.submit(build_task("hi", model="m"))  # b fails, a answers
        assert dispatcher.pool.ewma.get("a") is not None and dispatcher.pool.cooldowns.is_cooling(
            "b"
        )
        dispatcher.update_nodes([view("b", state=NodeState.GONE)])
        assert dispatcher.pool.ewma.get("a") is None and not dispatcher.pool.cooldowns.is_cooling(
            "b"
        )
        await dispatcher.close()

    run(scenario())


def test_a_failing_node_table_poll_is_logged_once_until_it_answers(caplog, monkeypatch):
    from mesh.coordinator import app

    monkeypatch.setattr(app, "_POLL_RETRY_S", 0.0)
    answered = asyncio.Event()

    class Snapshot:
        def __init__(self) -> None:
            self.calls = 0

        def remote(self, version: int, wait_s: float):
            self.calls += 1
            calls = self.calls

            async def answer():
                if calls <= 20 or 22 <= calls <= 30:
                    raise RuntimeError("owner restarting")
                if calls == 21:
                    return 1, []
                answered.set()
                await asyncio.sleep(3600)

            return answer()

    class Owner:
        snapshot = Snapshot()

    class Ingress(app.MeshIngress):
        def __del__(self) -> None:  # Serve's async teardown: nothing was started here
            pass

    async def scenario():
        ingress = Ingress.__new__(Ingress)
        ingress._owner = Owner()
        ingress._version = 0
        ingress.dispatcher = Dispatcher(DispatcherSettings())
        poller = asyncio.create_task(ingress._poll_forever())
        await asyncio.wait_for(answered.wait(), 5)
        poller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await poller
        await ingress.dispatcher.close()

    with caplog.at_level(logging.WARNING, logger="mesh.coordinator"):
        run(scenario())
    messages = [record.getMessage() for record in caplog.records]
    assert sum("poll failed" in m for m in messages) == 2, messages  # once per outage
    assert messages.count("node table poll answers again") == 1, messages


# ---------------------------------------------------------------- 9. `mesh coordinator start`


def _main(argv, monkeypatch, **fakes):
    from mesh.cli import main

    monkeypatch.setattr(signal, "signal", lambda *_args: None)  # keep pytest's handlers
    monkeypatch.setattr(runner, "prepare_ray_environment", lambda _config: None, raising=False)
    stopped = []
    monkeypatch.setattr(runner, "stop_coordinator", lambda: stopped.append(True))
    for name, fake in fakes.items():
        monkeypatch.setattr(runner, name, fake)
    return main(["coordinator", "start", *argv]), stopped


def test_start_with_a_port_out_of_range_is_a_usage_error(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exited:
        _main(["--grpc-port", "70000"], monkeypatch)
    assert exited.value.code == 2
    assert "--grpc-port: must be 0..65535" in capsys.readouterr().err


def test_start_errors_are_one_line_exit_1_and_stop_what_started(monkeypatch, capsys):
    def fail(_config):
        raise RuntimeError("Failed to start the GCS\n  port 6379 is taken")

    code, stopped = _main(["--no-mdns"], monkeypatch, start_coordinator=fail)
    err = capsys.readouterr().err
    assert code == 1 and stopped == [True]
    assert err == "error: Failed to start the GCS port 6379 is taken\n"


def test_start_with_invalid_settings_is_one_line_without_starting_ray(monkeypatch, capsys):
    started = []
    code, _stopped = _main(
        ["--replicas", "0"], monkeypatch, start_coordinator=lambda config: started.append(config)
    )
    err = capsys.readouterr().err
    assert code == 1 and not started
    assert err.startswith("error: replicas: ") and err.count("\n") == 1


def test_fast_paths_not_reported_in_time_are_an_error_not_fewer_addresses(monkeypatch):
    import urllib.error

    class Reply:
        def __enter__(self):
            return self

        def __exit__(self, *_exc):
            return False

        def read(self, *_args):
            return json.dumps({"fast_paths": ["127.0.0.1:5001"]}).encode()

    calls = []

    def urlopen(url, timeout):
        calls.append(url)
        if len(calls) == 1:
            raise urllib.error.URLError("connection refused")
        return Reply()

    monkeypatch.setattr(runner.urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(runner.time, "sleep", lambda _s: None)
    coordinator = runner.RunningCoordinator("127.0.0.1:9000", "127.0.0.1:8000", ())
    with pytest.raises(UnavailableError, match="1 of 2 dispatcher replicas"):
        runner._fast_paths(coordinator, 2, 0.2)
    assert runner._fast_paths(coordinator, 1, 5.0) == ("127.0.0.1:5001",)


def test_a_loopback_coordinator_keeps_a_local_ray_on_loopback(monkeypatch):
    assert runner.local_loopback_ray(CoordinatorConfig(host="127.0.0.1"))
    assert runner.local_loopback_ray(CoordinatorConfig(host="localhost"))
    assert not runner.local_loopback_ray(CoordinatorConfig(host="0.0.0.0"))
    assert not runner.local_loopback_ray(
        CoordinatorConfig(host="127.0.0.1", ray_address="10.0.0.5:6379")
    )
    environment: dict[str, str] = {}
    monkeypatch.setattr(runner.os, "environ", environment)
    runner.prepare_ray_environment(CoordinatorConfig(host="127.0.0.1"))
    assert environment[runner.LOOPBACK_RAY_VARIABLE] == "0"
    assert environment["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
