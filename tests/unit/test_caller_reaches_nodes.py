"""Who is asking reaches the nodes: the caller the ingress authenticated (`mesh.core.caller`)
is named in every node request's TaskContext (key name and subject, never the key), on every
attempt, through every path a task takes through the dispatcher."""

from __future__ import annotations

import asyncio

import pytest

from edgemesh.v1 import mesh_pb2
from mesh.coordinator.dispatch import Dispatcher
from mesh.coordinator.service import MeshHandlers
from mesh.coordinator.settings import DispatcherSettings
from mesh.coordinator.tasks import build_task
from mesh.core.caller import CALLER, Caller
from mesh.core.errors import UnavailableError
from tests.agent_mesh_fakes import TICKET_PLAN, Die, FakeAgentMesh, agent_view
from tests.coordinator_fakes import FakeMesh, ManualClock, view

pytestmark = pytest.mark.unit

ANA = Caller(key_name="kiosk-7", subject="ana@example.com")


def run(coro, timeout=10):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def dispatcher_for(mesh: FakeAgentMesh | FakeMesh, *nodes) -> Dispatcher:
    settings = DispatcherSettings(policy="round_robin", queue_timeout_s=0.0, node_wait_s=0.0)
    dispatcher = Dispatcher(settings, connect=mesh.connect, clock=ManualClock())
    dispatcher.update_nodes(list(nodes))
    return dispatcher


def test_every_attempt_of_an_agent_task_names_the_caller_also_after_a_failover():
    async def scenario():
        mesh = FakeAgentMesh()
        mesh.plans = {"a": {"": TICKET_PLAN}, "b": {"": TICKET_PLAN}}
        mesh.scripts["a"] = [Die(UnavailableError("connection reset"), after=1)]
        dispatcher = dispatcher_for(mesh, agent_view("a"), agent_view("b"))
        CALLER.set(ANA)
        await dispatcher.submit(build_task("My headset is broken", agent="customer-service"))
        await dispatcher.close()
        return [link.requests[0].task for link in (mesh.links["a"], mesh.links["b"])]

    first, second = run(scenario())
    assert (first.attempt, second.attempt) == (1, 2)
    for context in (first, second):
        assert (context.key_name, context.subject) == ("kiosk-7", "ana@example.com")
        assert context.agent == "customer-service"


def test_a_streamed_task_through_the_handlers_names_the_caller_set_before_it_began():
    """The stream is pumped by an asyncio task of its own (coalesce): it inherits the caller."""

    async def scenario():
        mesh = FakeAgentMesh()
        handlers = MeshHandlers(dispatcher_for(mesh, agent_view("a")), stream_window_s=0.01)
        CALLER.set(ANA)
        request = mesh_pb2.SubmitRequest(agent="customer-service", prompt="Order 1042?")
        chunks = [chunk async for chunk in handlers.submit_stream(request)]
        await handlers.dispatcher.close()
        return chunks, mesh.links["a"].requests

    chunks, requests = run(scenario())
    assert chunks[-1].HasField("result")
    assert [(r.task.key_name, r.task.subject) for r in requests] == [("kiosk-7", "ana@example.com")]


def test_concurrent_tasks_of_different_callers_each_name_their_own():
    async def one(dispatcher: Dispatcher, caller: Caller | None, task_id: str) -> None:
        CALLER.set(caller)  # each coroutine below runs as its own asyncio task (gather)
        await asyncio.sleep(0)  # let the other one set its caller first
        await dispatcher.submit(
            build_task("Order 1042?", agent="customer-service", task_id=task_id)
        )

    async def scenario():
        mesh = FakeAgentMesh()
        dispatcher = dispatcher_for(mesh, agent_view("a"))
        bob = Caller(key_name="shop-2", subject="bob@example.com")
        await asyncio.gather(
            one(dispatcher, ANA, "task-ana"),
            one(dispatcher, bob, "task-bob"),
            one(dispatcher, None, "task-open"),
        )
        await dispatcher.close()
        return {r.task.task_id: (r.task.key_name, r.task.subject) for r in mesh.links["a"].requests}

    assert run(scenario()) == {
        "task-ana": ("kiosk-7", "ana@example.com"),
        "task-bob": ("shop-2", "bob@example.com"),
        "task-open": ("", ""),
    }


def test_a_model_task_names_the_caller_and_no_caller_leaves_the_fields_empty():
    async def scenario():
        mesh = FakeMesh()
        dispatcher = dispatcher_for(mesh, view("a"))
        await dispatcher.submit(build_task("hello", task_id="open"))
        CALLER.set(Caller(key_name="batch-jobs"))
        await dispatcher.submit(build_task("hello", task_id="keyed"))
        await dispatcher.close()
        return {r.task.task_id: (r.task.key_name, r.task.subject) for r in mesh.links["a"].requests}

    assert run(scenario()) == {"open": ("", ""), "keyed": ("batch-jobs", "")}
