"""The OpenAI-compatible HTTP API over a dispatcher with fake nodes (no Ray, no sockets)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from mesh.coordinator.dispatch import Dispatcher
from mesh.coordinator.openai_api import build_openai_app
from mesh.coordinator.settings import DispatcherSettings
from mesh.core.errors import UnavailableError
from tests.coordinator_fakes import ANSWER, Fail, FakeMesh, view

pytestmark = pytest.mark.unit

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def api():
    mesh = FakeMesh()
    dispatcher = Dispatcher(
        DispatcherSettings(queue_timeout_s=0, node_wait_s=0), connect=mesh.connect
    )
    dispatcher.update_nodes([view("a"), view("b")])
    with TestClient(build_openai_app(dispatcher, stream_window_s=0.0)) as client:
        yield client, mesh


def test_models_and_unary_completion(api):
    client, mesh = api
    assert client.get("/v1/models").json()["data"][0]["id"] == "m"
    reply = client.post(
        "/v1/chat/completions", json={**CHAT, "max_tokens": 3}, headers={"Idempotency-Key": "k"}
    ).json()
    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": "Paris is the"}
    assert (
        reply["usage"]["completion_tokens"] == 3 and reply["mesh"]["attempts"][0]["outcome"] == "ok"
    )
    again = client.post(
        "/v1/chat/completions", json={**CHAT, "max_tokens": 3}, headers={"Idempotency-Key": "k"}
    ).json()
    assert again["id"] == reply["id"] and len(mesh.calls.events) == 2  # one start, one end


def test_streaming_is_server_sent_events_and_survives_a_broken_node(api):
    client, mesh = api
    mesh.script("a", Fail(UnavailableError("gone"), after_pieces=2))
    mesh.script("b", Fail(UnavailableError("gone"), after_pieces=2))
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={**CHAT, "stream": True, "stream_options": {"include_usage": True}},
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == ANSWER
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finish[0]["mesh"]["failed_over"] and chunks[-1]["usage"]["completion_tokens"] > 0


def test_errors_use_openai_shape_and_status(api):
    client, _mesh = api
    missing = client.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found_error"
    streamed = client.post("/v1/chat/completions", json={**CHAT, "model": "nope", "stream": True})
    assert streamed.status_code == 404  # before the first token: an HTTP error, not an event
    assert client.post("/v1/chat/completions", json={**CHAT, "n": 2}).status_code == 400
    bad = client.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert bad.status_code == 400 and "invalid request body" in bad.json()["error"]["message"]
    assert client.post("/v1/chat/completions", json={"model": "m"}).status_code == 400
