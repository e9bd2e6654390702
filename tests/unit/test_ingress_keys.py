"""API keys at the ingress, over a dispatcher with fake nodes (no Ray, no sockets): the HTTP
app's 401/403/429, MeshService's UNAUTHENTICATED/PERMISSION_DENIED/RESOURCE_EXHAUSTED (fast
path and Serve's glue), the caller reaching the dispatcher's calls to nodes, and no secret in
any log record, error message or answer."""

from __future__ import annotations

import asyncio
import json
import logging

import grpc
import pytest
from fastapi.testclient import TestClient
from google.rpc import error_details_pb2, status_pb2

from edgemesh.v1 import mesh_pb2
from mesh.cluster.keys import KeyStore
from mesh.coordinator.access import AccessControl
from mesh.coordinator.dispatch import Dispatcher
from mesh.coordinator.openai_api import build_openai_app
from mesh.coordinator.service import MeshHandlers, MeshServicer
from mesh.coordinator.settings import DispatcherSettings
from mesh.core.caller import Caller, current_caller
from mesh.core.errors import PermissionDeniedError, RateLimitedError, UnauthenticatedError
from mesh.core.grpc_status import DETAILS_KEY, RETRY_AFTER_KEY, from_grpc_error
from tests.coordinator_fakes import FakeMesh, view

pytestmark = pytest.mark.unit

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
ANA = Caller(key_name="full", subject="ana@example.com")


class Keys:
    """A cluster directory's keys and the secrets `create` showed once."""

    def __init__(self, directory) -> None:
        self.store = KeyStore(directory)
        self.secrets: dict[str, str] = {}
        for name, options in {
            "full": {"subject": "ana@example.com"},
            "scoped": {"agents": ("customer-service",), "models": ("m",), "subject": "kiosk"},
            "limited": {"rpm": 2},
            "tokens": {"tpm": 5},
            "gone": {},
        }.items():
            self.secrets[name] = self.store.create(name, **options)[1]  # type: ignore[arg-type]
        self.store.revoke("gone")

    def header(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secrets[name]}"}

    def metadata(self, name: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.secrets[name]}"),)


class Mesh:
    """A dispatcher over fake nodes whose links note who was calling (`current_caller()`)."""

    def __init__(self) -> None:
        self.fakes = FakeMesh()
        self.callers: list[Caller | None] = []
        self.dispatcher = Dispatcher(
            DispatcherSettings(queue_timeout_s=0, node_wait_s=0), connect=self.connect
        )
        self.dispatcher.update_nodes([view("a", models=("m", "n"))])

    def connect(self, node):
        link = self.fakes.connect(node)
        generate, stream = link.generate_request, link.stream_request

        async def generate_request(request, **options):
            self.callers.append(current_caller())
            return await generate(request, **options)

        def stream_request(request, **options):
            self.callers.append(current_caller())
            return stream(request, **options)

        link.generate_request, link.stream_request = generate_request, stream_request
        return link


@pytest.fixture
def keys(tmp_path):
    return Keys(tmp_path / "cluster")


@pytest.fixture
def access(keys):
    return AccessControl.for_cluster_dir(keys.store.directory)


@pytest.fixture
def api(access):
    mesh = Mesh()
    with TestClient(build_openai_app(mesh.dispatcher, access=access)) as client:
        yield client, mesh


# ---------------------------------------------------------------------- HTTP


PROTECTED = [
    ("GET", "/v1/models"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/responses"),
    ("GET", "/v1/mesh/traces/task-1"),
    ("GET", "/dashboard/api/state"),
    ("GET", "/dashboard/api/tasks/task-1"),
    ("GET", "/dashboard/events"),
    ("GET", "/v2/anything"),  # what no route answers is refused too: default deny
]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_http_without_a_valid_key_is_401_in_openai_shape(api, keys, method, path):
    client, mesh = api
    for headers in (
        {},
        {"Authorization": "Bearer "},
        {"Authorization": f"Basic {keys.secrets['full']}"},
        {"Authorization": "Bearer emk_0123456789ab_" + "0" * 64},
        keys.header("gone"),
    ):
        reply = client.request(method, path, json=CHAT, headers=headers)
        assert reply.status_code == 401, (headers, reply.text)
        assert reply.headers["www-authenticate"].startswith("Bearer")
        error = reply.json()["error"]
        assert error["type"] == "authentication_error" and error["code"] == "unauthenticated"
    assert "revoked" in reply.json()["error"]["message"]
    assert mesh.callers == []


def test_http_open_paths_need_no_key(api):
    client, _mesh = api
    for path in ("/metrics", "/dashboard", "/dashboard/static/dashboard.js", "/v1/mesh/info"):
        assert client.get(path).status_code == 200, path


def test_http_a_valid_key_runs_the_task_as_its_caller(api, keys):
    client, mesh = api
    reply = client.post("/v1/chat/completions", json=CHAT, headers=keys.header("full"))
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]
    with client.stream(
        "POST", "/v1/chat/completions", json={**CHAT, "stream": True}, headers=keys.header("full")
    ) as streamed:
        assert streamed.status_code == 200
        events = [line for line in streamed.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    responses = client.post(
        "/v1/responses", json={"model": "m", "input": "hi"}, headers=keys.header("full")
    )
    assert responses.status_code == 200
    with client.stream(
        "POST",
        "/v1/responses",
        json={"model": "m", "input": "hi", "stream": True},
        headers=keys.header("full"),
    ) as streamed:
        assert "response.completed" in "".join(streamed.iter_lines())
    assert mesh.callers == [ANA] * 4  # unary and streamed, chat and responses


def test_http_out_of_scope_is_403_and_models_are_listed_within_scope(api, keys):
    client, mesh = api
    scoped = keys.header("scoped")
    for body, headers in (
        ({**CHAT, "model": "n"}, {}),  # a model it does not name (that exists)
        ({**CHAT, "model": "agent:billing"}, {}),
        ({**CHAT, "model": "agent:auto"}, {}),  # the router could pick any agent
        (CHAT, {"X-Mesh-Agent": "billing"}),
    ):
        reply = client.post("/v1/chat/completions", json=body, headers={**scoped, **headers})
        assert reply.status_code == 403, reply.text
        assert reply.json()["error"]["type"] == "permission_error"
        assert "'scoped' may not" in reply.json()["error"]["message"]
    other = client.post("/v1/responses", json={"model": "n", "input": "hi"}, headers=scoped)
    assert other.status_code == 403
    assert mesh.callers == []
    assert client.post("/v1/chat/completions", json=CHAT, headers=scoped).status_code == 200
    assert mesh.callers == [
        Caller("scoped", "kiosk", frozenset({"customer-service"}), frozenset({"m"}))
    ]
    listed = client.get("/v1/models", headers=scoped).json()["data"]
    assert [model["id"] for model in listed] == ["m"]
    everything = client.get("/v1/models", headers=keys.header("full")).json()["data"]
    assert [model["id"] for model in everything] == ["m", "n"]


def test_http_over_rpm_is_429_with_retry_after(api, keys):
    client, _mesh = api
    limited = keys.header("limited")
    for _ in range(2):
        assert client.post("/v1/chat/completions", json=CHAT, headers=limited).status_code == 200
    refused = client.post("/v1/chat/completions", json=CHAT, headers=limited)
    assert refused.status_code == 429
    assert 55 <= int(refused.headers["retry-after"]) <= 60
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_error" and "2 requests per minute" in error["message"]
    streamed = client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=limited)
    assert streamed.status_code == 429 and streamed.headers["retry-after"]
    # Another key is not held back by this one.
    assert client.post("/v1/chat/completions", json=CHAT, headers=keys.header("full")).is_success


def test_http_over_tpm_is_429_after_a_task_that_spent_them(api, keys):
    client, _mesh = api
    tokens = keys.header("tokens")
    first = client.post("/v1/chat/completions", json=CHAT, headers=tokens)
    assert first.status_code == 200 and first.json()["usage"]["total_tokens"] >= 5
    refused = client.post("/v1/chat/completions", json=CHAT, headers=tokens)
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert "5 tokens per minute" in refused.json()["error"]["message"]


def test_http_streamed_tokens_count_too(api, keys):
    client, _mesh = api
    tokens = keys.header("tokens")
    with client.stream(
        "POST", "/v1/chat/completions", json={**CHAT, "stream": True}, headers=tokens
    ) as streamed:
        assert streamed.status_code == 200
        list(streamed.iter_lines())
    assert client.post("/v1/chat/completions", json=CHAT, headers=tokens).status_code == 429


def test_http_one_keys_idempotency_key_never_answers_another_keys_task(api, keys):
    client, mesh = api
    once = {"Idempotency-Key": "same"}
    first = client.post("/v1/chat/completions", json=CHAT, headers={**keys.header("full"), **once})
    again = client.post("/v1/chat/completions", json=CHAT, headers={**keys.header("full"), **once})
    other = client.post(
        "/v1/chat/completions", json=CHAT, headers={**keys.header("limited"), **once}
    )
    assert first.json()["id"] == again.json()["id"] != other.json()["id"]
    assert len(mesh.callers) == 2


def test_an_open_app_needs_no_key(tmp_path):
    mesh = Mesh()
    with TestClient(build_openai_app(mesh.dispatcher)) as client:
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert client.get("/dashboard/api/state").status_code == 200
    assert mesh.callers == [None]


# ---------------------------------------------------------------------- gRPC


class Aborted(Exception):
    def __init__(self, status: grpc.Status) -> None:
        super().__init__(status.code)
        self.status = status


class FastPathContext:
    """What MeshServicer reads of a grpc.aio servicer context."""

    def __init__(self, metadata=()) -> None:
        self.metadata = tuple(metadata)

    def invocation_metadata(self):
        return self.metadata

    async def abort_with_status(self, status: grpc.Status) -> None:
        raise Aborted(status)


def as_client_error(status: grpc.Status):
    """What the client library makes of a call that ended with `status`."""
    error = grpc.aio.AioRpcError(
        status.code,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(*status.trailing_metadata),
        details=status.details,
    )
    return from_grpc_error(error)


def run(coro, timeout=10):
    return asyncio.run(asyncio.wait_for(coro, timeout))


REQUEST = mesh_pb2.SubmitRequest(model="m", prompt="hi")


async def _unary(servicer, request, metadata):
    try:
        return await servicer.Submit(request, FastPathContext(metadata))
    except Aborted as aborted:
        return aborted.status


async def _streamed(servicer, request, metadata):
    try:
        return [c async for c in servicer.SubmitStream(request, FastPathContext(metadata))]
    except Aborted as aborted:
        return aborted.status


def test_grpc_fast_path_statuses_and_the_caller(access, keys):
    async def scenario():
        mesh = Mesh()
        servicer = MeshServicer(MeshHandlers(mesh.dispatcher, access=access))
        outcomes = {}
        for name, request, metadata in (
            ("none", REQUEST, ()),
            ("wrong", REQUEST, (("authorization", "Bearer emk_0123456789ab_" + "1" * 64),)),
            ("revoked", REQUEST, keys.metadata("gone")),
            (
                "scope",
                mesh_pb2.SubmitRequest(agent="billing", prompt="hi"),
                keys.metadata("scoped"),
            ),
            ("ok", REQUEST, keys.metadata("full")),
        ):
            outcomes[name] = (
                await _unary(servicer, request, metadata),
                await _streamed(servicer, request, metadata),
            )
        for call in (servicer.ListNodes, servicer.DescribeTask):
            try:
                await call(mesh_pb2.DescribeTaskRequest(task_id="t"), FastPathContext())
            except Aborted as aborted:
                outcomes[call.__name__] = aborted.status
        await mesh.dispatcher.close()
        return outcomes, mesh.callers

    outcomes, callers = run(scenario())
    for name in ("none", "wrong", "revoked"):
        for status in outcomes[name]:
            assert isinstance(as_client_error(status), UnauthenticatedError), name
            assert status.code is grpc.StatusCode.UNAUTHENTICATED
    for status in outcomes["scope"]:
        assert status.code is grpc.StatusCode.PERMISSION_DENIED
        assert type(as_client_error(status)) is PermissionDeniedError
    unary, chunks = outcomes["ok"]
    assert unary.text and chunks[-1].HasField("result")
    assert callers == [ANA, ANA]  # unary, then streamed
    assert outcomes["ListNodes"].code is grpc.StatusCode.UNAUTHENTICATED
    assert outcomes["DescribeTask"].code is grpc.StatusCode.UNAUTHENTICATED


def test_grpc_over_the_limit_is_resource_exhausted_with_retry_info(access, keys):
    async def scenario():
        mesh = Mesh()
        servicer = MeshServicer(MeshHandlers(mesh.dispatcher, access=access))
        limited = keys.metadata("limited")
        answers = [await _unary(servicer, REQUEST, limited) for _ in range(2)]
        answers.append(await _streamed(servicer, REQUEST, limited))
        tokens = keys.metadata("tokens")
        answers.append(await _streamed(servicer, REQUEST, tokens))
        answers.append(await _unary(servicer, REQUEST, tokens))
        await mesh.dispatcher.close()
        return answers

    first, second, third, spent, over_tokens = run(scenario())
    assert first.text and second.text and spent[-1].HasField("result")
    for status, what in ((third, "2 requests per minute"), (over_tokens, "5 tokens per minute")):
        assert status.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        trailers = dict(status.trailing_metadata)
        assert 1 <= int(trailers[RETRY_AFTER_KEY]) <= 60
        rich = status_pb2.Status.FromString(trailers[DETAILS_KEY])
        assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in rich.details)
        error = as_client_error(status)
        assert isinstance(error, RateLimitedError) and what in str(error)
        assert 0 < error.retry_after_s <= 60


class ServeContext(FastPathContext):
    """What MeshIngress reads and sets of Ray Serve's gRPC context (it cannot abort)."""

    def __init__(self, metadata=()) -> None:
        super().__init__(metadata)
        self.code = grpc.StatusCode.OK
        self.trailers: list = []

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details

    def set_trailing_metadata(self, trailers):
        self.trailers = trailers


def test_serve_ingress_methods_check_the_key_too(access, keys):
    from mesh.coordinator.app import MeshIngress

    class Methods(MeshIngress):
        """MeshIngress's gRPC methods over these handlers only: not constructed, no Ray."""

        def __del__(self) -> None:
            pass

    async def scenario():
        mesh = Mesh()
        ingress = Methods.__new__(Methods)
        ingress.handlers = MeshHandlers(mesh.dispatcher, access=access)
        seen = {}
        for name, metadata in (("none", ()), ("ok", keys.metadata("full"))):
            context = ServeContext(metadata)
            reply = await ingress.Submit(REQUEST, context)
            stream_context = ServeContext(metadata)
            chunks = [c async for c in ingress.SubmitStream(REQUEST, stream_context)]
            listing = ServeContext(metadata)
            await ingress.ListNodes(mesh_pb2.ListNodesRequest(), listing)
            seen[name] = (context.code, reply, stream_context.code, chunks, listing.code)
        await mesh.dispatcher.close()
        return seen, mesh.callers

    seen, callers = run(scenario())
    code, _reply, stream_code, chunks, listing = seen["none"]
    assert code is stream_code is listing is grpc.StatusCode.UNAUTHENTICATED
    assert chunks[-1].error.kind == "UnauthenticatedError"
    code, reply, stream_code, chunks, listing = seen["ok"]
    assert code is stream_code is listing is grpc.StatusCode.OK
    assert reply.text and chunks[-1].HasField("result")
    assert callers == [ANA, ANA]


# ---------------------------------------------------------------------- secrets


def test_no_secret_in_logs_errors_or_answers(api, keys, access, caplog):
    caplog.set_level(logging.DEBUG)
    client, _mesh = api
    texts: list[str] = []
    secret = keys.secrets["limited"]
    wrong = secret[:-4] + "beef"
    for key in (secret, wrong, keys.secrets["gone"], secret, secret):
        reply = client.post(
            "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"}
        )
        texts.append(reply.text + json.dumps(dict(reply.headers)))

    async def grpc_calls():
        mesh = Mesh()
        servicer = MeshServicer(MeshHandlers(mesh.dispatcher, access=access))
        for key in (wrong, keys.secrets["gone"], secret):
            status = await _unary(servicer, REQUEST, (("authorization", f"Bearer {key}"),))
            if isinstance(status, grpc.Status):
                texts.append(str(as_client_error(status)) + repr(status.trailing_metadata))
        await mesh.dispatcher.close()

    run(grpc_calls())
    texts.append(caplog.text)
    texts.append(repr([record.__dict__ for record in caplog.records]))
    texts.append(keys.store.path.read_text())
    everything = "\n".join(texts)
    assert "429" in everything or "rate_limit_error" in everything  # the requests did run
    for name, key in keys.secrets.items():
        assert key not in everything, name
        assert key.rsplit("_", 1)[1] not in everything, name  # not even the secret part
    assert wrong not in everything


# ---------------------------------------------------------------------- command line


def test_coordinator_start_takes_the_cluster_dir_as_an_absolute_path(tmp_path, monkeypatch):
    from mesh.cli import build_parser
    from mesh.cli.coordinator import _config

    monkeypatch.chdir(tmp_path)
    flags = ["coordinator", "start", "--no-mdns"]
    config = _config(build_parser().parse_args([*flags, "--cluster-dir", "cluster"]))
    assert config.cluster_dir == str(tmp_path / "cluster")  # type: ignore[attr-defined]
    assert _config(build_parser().parse_args(flags)).cluster_dir is None  # type: ignore[attr-defined]


def test_cli_errors_are_one_line_and_say_when_to_retry(monkeypatch):
    from mesh.cli import build_parser
    from mesh.cli._common import api_key_of, error_line

    assert error_line(RateLimitedError("over its limit", retry_after_s=12.2)) == (
        "error: over its limit (retry after 13 s)"
    )
    said = RateLimitedError("over; retry after 5 s", retry_after_s=4.5)
    assert error_line(said) == "error: over; retry after 5 s"  # not twice
    assert error_line(UnauthenticatedError("the API key is not valid")) == (
        "error: the API key is not valid"
    )
    monkeypatch.setenv("MESH_API_KEY", "from-env")
    parser = build_parser()
    assert api_key_of(parser.parse_args(["submit", "--model", "m", "hi"])) == "from-env"
    flag = parser.parse_args(["submit", "--model", "m", "--api-key", "flag", "hi"])
    assert api_key_of(flag) == "flag"
    for command in (["nodes"], ["top"], ["trace", "t"]):
        assert api_key_of(parser.parse_args([*command, "--api-key", "k"])) == "k"
