"""A model of an OpenAI-compatible server (Ollama, Foundry Local, vLLM, llama-server) as a backend.

The node fronts the upstream and offers its model to the mesh like its own:
`load` checks that `GET /v1/models` answers and lists the model; `stream`
posts `/v1/chat/completions` (raw prompts: `/v1/completions`) with
`stream: true` and reads the server-sent events. Closing the iterator closes
the HTTP response, which is how an OpenAI-compatible server learns that the
client went away and stops generating.

Continuations (the text of a broken answer to continue from): in chat mode the
text is sent as a trailing assistant message. Ollama, llama-server and LM Studio
treat that as a prefix to continue; vLLM needs `continuation_mode:
continue_final_message` (adds `continue_final_message: true,
add_generation_prompt: false`). A server that does neither starts a new answer
instead: best effort only. If the server echoes the prefix back, the echo is
dropped. Raw prompts are exact: the continuation is appended to the prompt.

A JSON schema (constrained output, as the agent runtime asks for) is sent as
`response_format`: `json_schema` (OpenAI, vLLM, Ollama, llama-server) or, with
`response_format: json_object`, as llama-cpp-python's server wants it.

The API key is read from the environment variable the config names, once, at
load; it is sent as a bearer token and appears in no log, error or Describe
(the source shown is the base URL without credentials, query or fragment).
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.parse
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from mesh.core.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    MeshError,
    ModelLoadError,
    NotFoundError,
    OverloadedError,
    UnavailableError,
)
from nodes.backends import Completion, GenerationInput, ModelDescriptor, ModelStatus, Piece

logger = logging.getLogger(__name__)

BACKEND_NAME = "openai-upstream"
CONTINUATION_MODES = ("prefill", "continue_final_message")
# How a JSON schema (GenerationInput.json_schema) is sent: OpenAI, vLLM, Ollama and
# llama-server take "json_schema"; llama-cpp-python's server only "json_object" + schema.
RESPONSE_FORMATS = ("json_schema", "json_object")


def normalise_base_url(url: str) -> str:
    """`url` with no trailing slash and ending in /v1 (the OpenAI API's root)."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def redact_url(url: str) -> str:
    """`url` without user, password, query or fragment: what may be shown and logged."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class SseDecoder:
    """Server-sent events, one line at a time: `feed` returns an event's data when it completes."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        line = line.rstrip("\r\n")
        if not line:  # a blank line ends the event
            return self.flush()
        if line.startswith(":"):  # a comment (keep-alive)
            return None
        field, _, value = line.partition(":")
        if field == "data":
            self._data.append(value.removeprefix(" "))
        return None  # event:, id:, retry: carry nothing the client needs

    def flush(self) -> str | None:
        if not self._data:
            return None
        data, self._data = "\n".join(self._data), []
        return data


@dataclass
class StreamDelta:
    """What one streamed chunk says."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


def parse_chunk(data: str) -> StreamDelta:
    """One `data:` payload of a chat or text completion stream; MeshError for an error event."""
    try:
        chunk = json.loads(data)
    except json.JSONDecodeError:
        raise UnavailableError(
            f"the upstream sent a stream event that is not JSON: {data[:80]!r}"
        ) from None
    if not isinstance(chunk, dict):
        raise UnavailableError("the upstream sent a stream event that is not a JSON object")
    if "error" in chunk:
        error = chunk["error"]
        message = error.get("message", str(error)) if isinstance(error, dict) else str(error)
        raise UnavailableError(f"the upstream failed mid-answer: {message}")
    delta = StreamDelta()
    choices = chunk.get("choices") or []
    if choices:
        choice = choices[0]
        content = (
            (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
        )
        delta.text = content or ""
        delta.finish_reason = choice.get("finish_reason") or None
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        delta.prompt_tokens = usage.get("prompt_tokens")
        delta.completion_tokens = usage.get("completion_tokens")
    return delta


def error_for_status(status: int, body: str, shown_url: str) -> MeshError:
    """The project's exception for an upstream HTTP error status."""
    detail = body.strip().replace("\n", " ")[:300]
    try:
        parsed = json.loads(body)
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            detail = str(parsed["error"].get("message", detail))[:300]
    except json.JSONDecodeError:
        pass  # not JSON: keep the raw text
    where = f"the upstream at {shown_url} answered {status}"
    if status in (400, 413, 422):
        return InvalidRequestError(f"{where}: {detail}")
    if status == 404:
        return NotFoundError(f"{where}: {detail}")
    if status == 429:
        return OverloadedError(f"{where} (too many requests): {detail}")
    if status in (401, 403):
        return UnavailableError(f"{where}: it refused this node's API key")
    return UnavailableError(f"{where}: {detail}")


class OpenAIUpstreamBackend:
    """A model served by an OpenAI-compatible HTTP server."""

    def __init__(
        self,
        model_id: str,
        base_url: str,
        *,
        remote_model: str | None = None,
        api_key_env: str | None = None,
        system_prompt: str | None = None,
        connect_timeout_s: float = 5.0,
        request_timeout_s: float = 120.0,
        continuation_mode: str = "prefill",
        response_format: str = "json_schema",
        transport: Any = None,
    ) -> None:
        """`transport`: an httpx transport to use instead of the network (tests)."""
        if continuation_mode not in CONTINUATION_MODES:
            raise ValueError(f"continuation_mode must be one of {', '.join(CONTINUATION_MODES)}")
        # Credentials travel only as the bearer token from api_key_env: a user or
        # password in the URL is dropped (httpx would send it as basic auth and log it).
        self._base_url = self._shown_url = redact_url(normalise_base_url(base_url))
        self._remote_model = remote_model or model_id
        self._api_key_env = api_key_env
        self._system_prompt = system_prompt
        self._connect_timeout_s = connect_timeout_s
        self._request_timeout_s = request_timeout_s
        self._continuation_mode = continuation_mode
        if response_format not in RESPONSE_FORMATS:
            raise ValueError(f"response_format must be one of {', '.join(RESPONSE_FORMATS)}")
        self._response_format = response_format
        self._transport = transport
        self.descriptor = ModelDescriptor(
            model_id=model_id,
            backend=BACKEND_NAME,
            source=self._shown_url,
            family=self._remote_model,
        )
        self.status = ModelStatus.UNLOADED
        self.error = ""
        self._client: Any = None

    # ------------------------------------------------------------------ loading

    def expected_bytes(self) -> int:
        return 0  # the upstream server holds the model, not this node

    async def load(self) -> None:
        self.status = ModelStatus.LOADING
        try:
            await self._connect()
        except ModelLoadError as error:
            self.status, self.error = ModelStatus.FAILED, str(error)
            await self.close(status=ModelStatus.FAILED)
            raise
        self.status = ModelStatus.READY

    async def _connect(self) -> None:
        try:
            import httpx
        except ImportError:
            raise ModelLoadError(
                "httpx is not installed; install the node extra: "
                "pip install 'edge-agent-mesh[node]'"
            ) from None
        headers = {"Accept": "application/json"}
        if self._api_key_env:
            key = os.environ.get(self._api_key_env, "")
            if not key:
                raise ModelLoadError(
                    f"the environment variable {self._api_key_env} (named by "
                    f"api_key_env for model {self.descriptor.model_id!r}) is not set"
                )
            headers["Authorization"] = f"Bearer {key}"
        self._client = httpx.AsyncClient(
            base_url=self._base_url,
            headers=headers,
            transport=self._transport,
            timeout=httpx.Timeout(self._request_timeout_s, connect=self._connect_timeout_s),
        )
        where = f"the OpenAI-compatible server at {self._shown_url}"
        try:
            response = await self._client.get("/models", timeout=self._connect_timeout_s * 2)
        except httpx.HTTPError as error:
            raise ModelLoadError(
                f"cannot reach {where}: {_describe_transport_error(error)}; is it running?"
            ) from None
        if response.status_code in (401, 403):
            source = f" (from ${self._api_key_env})" if self._api_key_env else " (none configured)"
            raise ModelLoadError(
                f"{where} refused the API key{source}: HTTP {response.status_code}"
            )
        if response.status_code != 200:
            raise ModelLoadError(
                f"{where} answered GET /models with HTTP {response.status_code}; "
                "is it an OpenAI-compatible server?"
            )
        try:
            entries = response.json().get("data") or []
            served = {str(e["id"]): e for e in entries if isinstance(e, dict) and "id" in e}
        except (ValueError, AttributeError):
            raise ModelLoadError(
                f"{where} answered GET /models with something that is not the OpenAI model list"
            ) from None
        entry = served.get(self._remote_model)
        if entry is None:
            raise ModelLoadError(
                f"{where} does not serve model {self._remote_model!r}; it serves: "
                f"{', '.join(sorted(served)) or 'nothing'}"
            )
        context = next(
            (
                int(entry[k])
                for k in ("max_model_len", "context_length", "n_ctx")
                if isinstance(entry.get(k), int)
            ),
            0,
        )
        self.descriptor = ModelDescriptor(
            model_id=self.descriptor.model_id,
            backend=BACKEND_NAME,
            source=self._shown_url,
            context_length=context,
            family=self._remote_model,
        )
        logger.info(
            "model %s is %s at %s", self.descriptor.model_id, self._remote_model, self._shown_url
        )

    async def close(self, status: ModelStatus = ModelStatus.UNLOADED) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        self.status = status

    # ------------------------------------------------------------------ requests

    def request_body(self, request: GenerationInput) -> tuple[str, dict[str, Any]]:
        """The endpoint path and JSON body for one generation."""
        body: dict[str, Any] = {
            "model": self._remote_model,
            "stream": True,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "stream_options": {"include_usage": True},
        }
        if request.seed is not None:
            body["seed"] = request.seed
        if request.stop:
            body["stop"] = list(request.stop)
        if request.json_schema:
            body["response_format"] = self._response_format_for(request.json_schema)
        if request.raw:
            body["prompt"] = request.prompt + request.continuation
            return "/completions", body
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        if self._system_prompt and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": self._system_prompt})
        if request.continuation:
            messages.append({"role": "assistant", "content": request.continuation})
            if self._continuation_mode == "continue_final_message":
                body.update(continue_final_message=True, add_generation_prompt=False)
        body["messages"] = messages
        return "/chat/completions", body

    def _response_format_for(self, json_schema: str) -> dict[str, Any]:
        try:
            schema = json.loads(json_schema)
        except json.JSONDecodeError:
            raise InvalidRequestError("json_schema is not valid JSON") from None
        if self._response_format == "json_object":
            return {"type": "json_object", "schema": schema}
        return {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}

    async def stream(self, request: GenerationInput) -> AsyncGenerator[Piece, None]:
        if self._client is None or self.status is not ModelStatus.READY:
            raise UnavailableError(f"model {self.descriptor.model_id!r} is not connected")
        import httpx

        path, body = self.request_body(request)
        echo = EchoFilter(request.continuation if not request.raw else "")
        completion = Completion(finish_reason="")
        counted = 0
        first_at = last_at = 0.0
        try:
            async with self._client.stream("POST", path, json=body) as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode("utf-8", errors="replace")
                    raise error_for_status(response.status_code, text, self._shown_url)
                decoder = SseDecoder()
                done = False
                async for line in response.aiter_lines():
                    data = decoder.feed(line)
                    if data is None:
                        continue
                    if data.strip() == "[DONE]":
                        done = True
                        break
                    delta = parse_chunk(data)
                    text = echo.feed(delta.text)
                    if text:
                        counted += 1
                        last_at = time.perf_counter()
                        first_at = first_at or last_at
                        yield Piece(text)
                    completion.finish_reason = delta.finish_reason or completion.finish_reason
                    if delta.completion_tokens is not None:
                        completion.completion_tokens = delta.completion_tokens
                    if delta.prompt_tokens is not None:
                        completion.prompt_tokens = delta.prompt_tokens
                tail = echo.flush()
                if tail:
                    yield Piece(tail)
                if not done and not completion.finish_reason:
                    raise UnavailableError(
                        f"the upstream at {self._shown_url} ended the stream "
                        "before the answer was finished"
                    )
        except httpx.TimeoutException:
            raise DeadlineExceededError(
                f"the upstream at {self._shown_url} sent nothing for {self._request_timeout_s:g} s"
            ) from None
        except httpx.TransportError as error:
            raise UnavailableError(
                f"lost the upstream at {self._shown_url} mid-request: "
                f"{_describe_transport_error(error)}"
            ) from None
        completion.completion_tokens = completion.completion_tokens or counted
        completion.finish_reason = _FINISH_REASONS.get(completion.finish_reason, "stop")
        completion.decode_s = last_at - first_at
        yield Piece("", completion)


_FINISH_REASONS = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "stop",
    "content_filter": "stop",
    "": "stop",
}


class EchoFilter:
    """Drops `prefix` from the start of streamed text if the server repeats it, else passes all.

    Text is held back only while everything so far could still be the repeated prefix.
    """

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._held = ""
        self._deciding = bool(prefix)

    def feed(self, text: str) -> str:
        if not self._deciding:
            return text
        self._held += text
        if len(self._held) < len(self._prefix) and self._prefix.startswith(self._held):
            return ""  # still possibly the echo: wait for more
        self._deciding = False
        held, self._held = self._held, ""
        return held[len(self._prefix) :] if held.startswith(self._prefix) else held

    def flush(self) -> str:
        """Text still held when the stream ends (a short answer that matched the prefix so far)."""
        self._deciding = False
        held, self._held = self._held, ""
        return held


def _describe_transport_error(error: Exception) -> str:
    text = str(error) or type(error).__name__
    return text if len(text) < 200 else text[:200] + "..."
