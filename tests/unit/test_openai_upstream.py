"""OpenAI-compatible upstream backend without a network: SSE, bodies, errors, keys, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import httpx
import pytest

from mesh.core.errors import (
    InvalidRequestError,
    ModelLoadError,
    NotFoundError,
    OverloadedError,
    UnavailableError,
)
from nodes.backends import GenerationInput, Message, ModelStatus
from nodes.backends.openai_upstream import (
    EchoFilter,
    OpenAIUpstreamBackend,
    SseDecoder,
    error_for_status,
    normalise_base_url,
    parse_chunk,
    redact_url,
)

pytestmark = pytest.mark.unit

SECRET = "sk-very-secret-123"


def run(coro, timeout=10):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def feed_all(lines):
    decoder = SseDecoder()
    events = [e for e in (decoder.feed(line) for line in lines) if e is not None]
    tail = decoder.flush()
    return events + ([tail] if tail else [])


def test_sse_events_comments_and_multiline_data():
    lines = [
        ": keep-alive",
        'data: {"a": 1}',
        "",
        "event: message",
        "id: 7",
        "data: line one\r",
        "data:line two",
        "",
        "",
        "data: [DONE]",
    ]
    assert feed_all(lines) == ['{"a": 1}', "line one\nline two", "[DONE]"]


def test_parse_chat_and_text_chunks():
    chat = parse_chunk(
        json.dumps({"choices": [{"delta": {"content": "Par"}, "finish_reason": None}]})
    )
    assert chat.text == "Par" and chat.finish_reason is None
    role_only = parse_chunk(json.dumps({"choices": [{"delta": {"role": "assistant"}}]}))
    assert role_only.text == ""
    text = parse_chunk(json.dumps({"choices": [{"text": "is", "finish_reason": "length"}]}))
    assert text.text == "is" and text.finish_reason == "length"
    usage = parse_chunk(
        json.dumps({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}})
    )
    assert (usage.prompt_tokens, usage.completion_tokens) == (9, 4)


def test_error_event_and_garbage_become_unavailable():
    with pytest.raises(UnavailableError, match="mid-answer: out of memory"):
        parse_chunk(json.dumps({"error": {"message": "out of memory"}}))
    with pytest.raises(UnavailableError, match="not JSON"):
        parse_chunk("<html>")


@pytest.mark.parametrize(
    "pieces, expected",
    [
        (["The cap", "ital is", " Paris"], " Paris"),  # the server repeated the prefix
        (["The capital is Paris"], " Paris"),
        ([" Paris", "."], " Paris."),  # a real continuation: nothing dropped
        (["The", " end"], "The end"),  # starts like the prefix, then diverges: all kept
        (["The cap"], "The cap"),  # stream ends while undecided: kept
    ],
)
def test_echo_filter(pieces, expected):
    echo = EchoFilter("The capital is")
    assert "".join(echo.feed(p) for p in pieces) + echo.flush() == expected


def test_urls():
    assert normalise_base_url("http://h:8000") == "http://h:8000/v1"
    assert normalise_base_url("http://h:8000/v1/") == "http://h:8000/v1"
    assert redact_url("https://user:pw@h.example:8443/v1?key=abc#x") == "https://h.example:8443/v1"
    assert redact_url("http://[::1]:8000/v1") == "http://[::1]:8000/v1"


@pytest.mark.parametrize(
    "status, error",
    [
        (400, InvalidRequestError),
        (404, NotFoundError),
        (429, OverloadedError),
        (401, UnavailableError),
        (503, UnavailableError),
    ],
)
def test_http_statuses(status, error):
    raised = error_for_status(status, json.dumps({"error": {"message": "nope"}}), "http://h/v1")
    assert isinstance(raised, error) and str(status) in str(raised)


def test_request_bodies():
    backend = OpenAIUpstreamBackend(
        "big", "http://h/v1", remote_model="qwen", system_prompt="Be brief."
    )
    chat = GenerationInput(
        messages=[Message("user", "Hi")],
        continuation="Hello",
        max_tokens=5,
        temperature=0.0,
        seed=3,
        stop=["\n"],
    )
    path, body = backend.request_body(chat)
    assert path == "/chat/completions" and body["model"] == "qwen" and body["stream"] is True
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant"]
    assert body["messages"][-1]["content"] == "Hello" and "continue_final_message" not in body
    assert (body["max_tokens"], body["seed"], body["stop"]) == (5, 3, ["\n"])
    vllm = OpenAIUpstreamBackend("big", "http://h", continuation_mode="continue_final_message")
    _, body = vllm.request_body(chat)
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    path, body = backend.request_body(GenerationInput(prompt="1, 2,", raw=True, continuation=" 3,"))
    assert path == "/completions" and body["prompt"] == "1, 2, 3,"
    schema = '{"type": "object", "properties": {"city": {"type": "string"}}}'
    _, body = backend.request_body(
        GenerationInput(messages=[Message("user", "Hi")], json_schema=schema)
    )
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"]["properties"]["city"]
    llama_server = OpenAIUpstreamBackend("big", "http://h", response_format="json_object")
    _, body = llama_server.request_body(
        GenerationInput(messages=[Message("user", "Hi")], json_schema=schema)
    )
    assert body["response_format"] == {"type": "json_object", "schema": json.loads(schema)}
    with pytest.raises(InvalidRequestError, match="not valid JSON"):
        backend.request_body(GenerationInput(messages=[Message("user", "Hi")], json_schema="{"))


def test_missing_key_variable_is_named_not_guessed(monkeypatch):
    monkeypatch.delenv("EDGEMESH_TEST_KEY", raising=False)
    backend = OpenAIUpstreamBackend("big", "http://127.0.0.1:9/v1", api_key_env="EDGEMESH_TEST_KEY")
    with pytest.raises(ModelLoadError, match="EDGEMESH_TEST_KEY .* is not set"):
        run(backend.load())
    assert backend.status is ModelStatus.FAILED


class _SlowStream(httpx.AsyncByteStream):
    """An endless SSE body that records whether the client closed it."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()
        self.sent = 0

    async def __aiter__(self):
        while True:
            self.sent += 1
            chunk = {"choices": [{"delta": {"content": f"w{self.sent} "}, "finish_reason": None}]}
            yield f"data: {json.dumps(chunk)}\n\n".encode()
            await asyncio.sleep(0.01)

    async def aclose(self) -> None:
        self.closed.set()


def _fake_server(stream, seen_headers):
    def handle(request: httpx.Request) -> httpx.Response:
        seen_headers.append(dict(request.headers))
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"object": "list", "data": [{"id": "qwen"}]})
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=stream)

    return httpx.MockTransport(handle)


def test_key_is_sent_never_shown_and_closing_the_stream_closes_the_response(monkeypatch, caplog):
    monkeypatch.setenv("EDGEMESH_TEST_KEY", SECRET)
    stream, headers = _SlowStream(), []
    backend = OpenAIUpstreamBackend(
        "big",
        "http://user@127.0.0.1:8000",
        remote_model="qwen",
        api_key_env="EDGEMESH_TEST_KEY",
        transport=_fake_server(stream, headers),
    )

    async def scenario():
        await backend.load()
        pieces = []
        async with contextlib.aclosing(
            backend.stream(GenerationInput(messages=[Message("user", "count")]))
        ) as iterator:
            async for piece in iterator:
                pieces.append(piece.text)
                if len(pieces) == 3:
                    break
        await asyncio.wait_for(stream.closed.wait(), 2)
        await backend.close()
        return pieces

    with caplog.at_level(logging.DEBUG):
        pieces = run(scenario())
    assert pieces == ["w1 ", "w2 ", "w3 "] and stream.sent < 10
    assert all(h["authorization"] == f"Bearer {SECRET}" for h in headers)
    assert backend.descriptor.source == "http://127.0.0.1:8000/v1"
    assert SECRET not in repr(backend.descriptor) and SECRET not in caplog.text


def test_model_not_served_lists_what_is(monkeypatch):
    backend = OpenAIUpstreamBackend(
        "big",
        "http://127.0.0.1:8000",
        remote_model="llama3",
        transport=_fake_server(_SlowStream(), []),
    )
    with pytest.raises(ModelLoadError, match="does not serve model 'llama3'; it serves: qwen"):
        run(backend.load())
