"""A task is its API key's: another key reads nothing of it (DescribeTask, traces, the
dashboard: not found, as if it did not exist) and cannot take its task id; an open mesh is
unchanged. Over a dispatcher with fake nodes (no Ray, no sockets); several replicas in
test_shared_tasks.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import grpc
import pytest
from fastapi.testclient import TestClient

from edgemesh.v1 import mesh_pb2
from mesh.cluster.keys import KeyStore
from mesh.coordinator.access import AccessControl
from mesh.coordinator.openai_api import build_openai_app
from mesh.coordinator.service import MeshHandlers, MeshServicer
from mesh.coordinator.tasks import TaskLedger, build_task
from mesh.core.errors import AlreadyExistsError, NotFoundError
from tests.asgi_calls import call_until
from tests.coordinator_fakes import ANSWER
from tests.unit.test_ingress_keys import (
    Aborted,
    FastPathContext,
    Mesh,
    ServeContext,
    as_client_error,
)

pytestmark = pytest.mark.unit

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
UNKNOWN = "no-such-task"


class Keys:
    def __init__(self, directory) -> None:
        self.store = KeyStore(directory)
        self.secrets = {name: self.store.create(name)[1] for name in ("ana", "bob")}

    def header(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secrets[name]}"}

    def metadata(self, name: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.secrets[name]}"),)


@pytest.fixture
def keys(tmp_path):
    return Keys(tmp_path / "cluster")


@pytest.fixture
def access(keys):
    return AccessControl.for_cluster_dir(keys.store.directory)


def run(coro, timeout=10):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def _as_unknown(text: str, task_id: str) -> str:
    """`text` as it would read for the unknown task id: the same answer, or it tells apart."""
    return text.replace(task_id, UNKNOWN)


# ---------------------------------------------------------------------- the ledger


def test_the_ledger_hides_another_owners_task_and_refuses_its_id():
    async def scenario():
        ledger = TaskLedger()
        ana = dataclasses.replace(build_task("hi", task_id="order-1"), owner="ana")
        entry = ledger.begin(ana)
        bob = dataclasses.replace(ana, owner="bob")
        with pytest.raises(AlreadyExistsError, match="'order-1' is already in use"):
            ledger.begin(bob)
        assert ledger.entry("order-1") is entry  # not replaced
        assert ledger.find(ana.dedup_key) is entry and ledger.find(bob.dedup_key) is None
        assert ledger.record("order-1", "ana").owner == "ana"
        assert ledger.record("order-1").task_id == "order-1"  # no reader: an open mesh
        with pytest.raises(NotFoundError) as hidden:
            ledger.record("order-1", "bob")
        with pytest.raises(NotFoundError) as unknown:
            ledger.record(UNKNOWN, "bob")
        assert _as_unknown(str(hidden.value), "order-1") == str(unknown.value)
        assert ledger.entry("order-1", "bob") is None
        ledger.close()

    run(scenario())


# ---------------------------------------------------------------------- HTTP


def _chat(client: TestClient, headers: dict[str, str]) -> str:
    reply = client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["mesh"]["task_id"])


def _events_state(app, headers: dict[str, str]) -> dict:
    """The first state `/dashboard/events` sends, then the client hangs up."""
    status, chunks = run(call_until(app, "GET", "/dashboard/events", headers=headers, enough=len))
    assert status == 200
    return json.loads(chunks[0].decode().removeprefix("data: "))


def test_http_a_key_reads_its_own_tasks_and_finds_none_of_anothers(keys, access):
    mesh = Mesh()
    app = build_openai_app(mesh.dispatcher, access=access)
    ana, bob = keys.header("ana"), keys.header("bob")
    with TestClient(app) as client:
        anas, bobs = _chat(client, ana), _chat(client, bob)
        for route in ("/dashboard/api/tasks/{}", "/v1/mesh/traces/{}"):
            own = client.get(route.format(anas), headers=ana)
            assert own.status_code == 200 and own.json()["task_id"] == anas, own.text
            hidden = client.get(route.format(anas), headers=bob)
            unknown = client.get(route.format(UNKNOWN), headers=bob)
            assert hidden.status_code == unknown.status_code == 404  # not 403: no hint it exists
            assert _as_unknown(hidden.text, anas) == unknown.text
            assert client.get(route.format(bobs), headers=bob).status_code == 200
        for headers, own_id in ((ana, anas), (bob, bobs)):
            listed = client.get("/dashboard/api/state", headers=headers).json()
            assert [task["task_id"] for task in listed["tasks"]] == [own_id]
            assert [node["node_id"] for node in listed["nodes"]] == ["a"]  # nodes: everyone's
    streamed = _events_state(app, bob)
    assert [task["task_id"] for task in streamed["tasks"]] == [bobs]


def test_http_an_open_mesh_shows_every_task_to_everyone():
    mesh = Mesh()
    app = build_openai_app(mesh.dispatcher)
    with TestClient(app) as client:
        first, second = _chat(client, {}), _chat(client, {})
        listed = client.get("/dashboard/api/state").json()["tasks"]
        assert [task["task_id"] for task in listed] == [second, first]
        for route in ("/dashboard/api/tasks/{}", "/v1/mesh/traces/{}"):
            assert client.get(route.format(first)).status_code == 200
    assert len(_events_state(app, {})["tasks"]) == 2


# ---------------------------------------------------------------------- gRPC


async def _call(method, request, metadata):
    try:
        return await method(request, FastPathContext(metadata))
    except Aborted as aborted:
        return aborted.status


def _submit(task_id: str = "") -> mesh_pb2.SubmitRequest:
    return mesh_pb2.SubmitRequest(model="m", prompt="hi", task_id=task_id)


def _describe(task_id: str) -> mesh_pb2.DescribeTaskRequest:
    return mesh_pb2.DescribeTaskRequest(task_id=task_id)


def test_grpc_describe_task_finds_only_the_callers_own_tasks(keys, access):
    from mesh.coordinator.app import MeshIngress

    class Methods(MeshIngress):
        """MeshIngress's gRPC methods over these handlers only: not constructed, no Ray."""

        def __del__(self) -> None:
            pass

    async def scenario():
        mesh = Mesh()
        handlers = MeshHandlers(mesh.dispatcher, access=access)
        servicer = MeshServicer(handlers)
        ingress = Methods.__new__(Methods)
        ingress.handlers = handlers
        answer = await _call(servicer.Submit, _submit(), keys.metadata("ana"))
        task_id = answer.task_id
        seen = {
            name: await _call(servicer.DescribeTask, _describe(which), keys.metadata(who))
            for name, who, which in (
                ("ana", "ana", task_id),
                ("bob", "bob", task_id),
                ("unknown", "bob", UNKNOWN),
            )
        }
        # Serve's proxy: the same answers, set on its context.
        for name in ("ana", "bob"):
            context = ServeContext(keys.metadata(name))
            reply = await ingress.DescribeTask(_describe(task_id), context)
            seen[f"serve-{name}"] = (context.code, reply)
        await mesh.dispatcher.close()
        return task_id, seen

    task_id, seen = run(scenario())
    assert seen["ana"].state == "done" and seen["ana"].result.text == ANSWER
    hidden, unknown = seen["bob"], seen["unknown"]
    assert hidden.code is unknown.code is grpc.StatusCode.NOT_FOUND
    assert type(as_client_error(hidden)) is NotFoundError
    assert _as_unknown(hidden.details, task_id) == unknown.details
    code, reply = seen["serve-ana"]
    assert code is grpc.StatusCode.OK and reply.result.text == ANSWER
    code, reply = seen["serve-bob"]
    assert code is grpc.StatusCode.NOT_FOUND and not reply.result.text


def test_grpc_a_task_id_another_key_holds_is_refused_and_its_answer_stays_its_own(keys, access):
    async def scenario():
        mesh = Mesh()
        servicer = MeshServicer(MeshHandlers(mesh.dispatcher, access=access))
        ana, bob = keys.metadata("ana"), keys.metadata("bob")
        first = await _call(servicer.Submit, _submit("order-1"), ana)
        taken = await _call(servicer.Submit, _submit("order-1"), bob)
        try:
            streamed = [
                c async for c in servicer.SubmitStream(_submit("order-1"), FastPathContext(bob))
            ]
        except Aborted as aborted:
            streamed = aborted.status
        again = await _call(servicer.Submit, _submit("order-1"), ana)  # a retry: the same task
        bobs_view = await _call(servicer.DescribeTask, _describe("order-1"), bob)
        anas_view = await _call(servicer.DescribeTask, _describe("order-1"), ana)
        await mesh.dispatcher.close()
        return first, taken, streamed, again, bobs_view, anas_view, mesh.callers

    first, taken, streamed, again, bobs_view, anas_view, callers = run(scenario())
    for refused in (taken, streamed):
        assert refused.code is grpc.StatusCode.ALREADY_EXISTS
        error = as_client_error(refused)
        assert isinstance(error, AlreadyExistsError) and "choose another" in str(error)
    assert first.task_id == again.task_id == "order-1" and again.text == first.text == ANSWER
    assert len(callers) == 1  # ana's one run; bob's never reached a node
    assert bobs_view.code is grpc.StatusCode.NOT_FOUND
    assert anas_view.state == "done" and anas_view.result.text == ANSWER


def test_grpc_an_open_mesh_describes_any_task_and_repeats_a_chosen_id():
    async def scenario():
        mesh = Mesh()
        servicer = MeshServicer(MeshHandlers(mesh.dispatcher))
        first = await _call(servicer.Submit, _submit("order-1"), ())
        again = await _call(servicer.Submit, _submit("order-1"), ())
        record = await _call(servicer.DescribeTask, _describe("order-1"), ())
        await mesh.dispatcher.close()
        return first, again, record, mesh.callers

    first, again, record, callers = run(scenario())
    assert first.text == again.text == ANSWER and len(callers) == 1
    assert record.state == "done"
