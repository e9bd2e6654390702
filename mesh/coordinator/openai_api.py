"""An OpenAI-compatible HTTP API over a Dispatcher: `/v1/models`, `/v1/chat/completions` (with
tools: openai_tools.py) and `/v1/responses` (openai_responses.py).

Usable by the official `openai` client unmodified (`base_url=http://HOST:PORT/v1`). Streams are
server-sent events in OpenAI's chunk format ending with `data: [DONE]`; errors use OpenAI's
`{"error": {"message", "type", "param", "code"}}` shape. Mesh extensions, all optional:
headers `Idempotency-Key`, `X-Mesh-Deadline-S`, `X-Mesh-Agent`; a `mesh` object in unary
answers (task id, node, attempts, failed_over). Independent of Ray: Serve wraps it as ingress.
With an `AccessControl` (a coordinator with a cluster directory), every route but a few needs
`Authorization: Bearer KEY` (mesh/coordinator/http_access.py): 401, 403 out of the key's
scope, 429 with `Retry-After` over its limits.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, StrictBool, ValidationError

from mesh.coordinator.agent_run import AgentItem
from mesh.coordinator.dispatch import Dispatcher
from mesh.coordinator.openai_tools import (
    ResponseFormat,
    ToolChoice,
    ToolDef,
    ToolPlan,
    answered_calls,
    history,
    plan,
    read_answer,
    with_system,
)
from mesh.coordinator.service import coalesce
from mesh.coordinator.tasks import (
    TaskResult,
    TaskSpec,
    TaskUsage,
    build_task,
    check_caller_ids,
    check_deadline_s,
    check_max_tokens,
)
from mesh.core.bounds import DEFAULT_MAX_MESSAGES, check_message_count
from mesh.core.caller import current_caller, reader_of
from mesh.core.errors import InvalidRequestError, MeshError
from mesh.core.grpc_status import retry_after_header
from mesh.core.untrusted import printable, quoted
from mesh.observe.dashboard_api import add_dashboard
from mesh.observe.metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from mesh.coordinator.access import AccessControl

_HTTP_STATUS = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "NOT_FOUND": (404, "not_found_error"),
    "ALREADY_EXISTS": (409, "conflict_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "DEADLINE_EXCEEDED": (504, "timeout_error"),
    "PERMISSION_DENIED": (403, "permission_error"),
    "UNAVAILABLE": (503, "service_unavailable_error"),
    "CANCELLED": (499, "cancelled_error"),
}


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's calls (openai_tools)
    tool_call_id: str | None = None  # a tool message: the call it answers

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: keep the text ones
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool = False  # JSON true/false only: "no" is not true


class ChatCompletionRequest(BaseModel):
    """The fields of OpenAI's request the mesh uses; other fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[_Message]
    stream: StrictBool = False
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream_options: _StreamOptions | None = None
    user: str | None = None
    tools: list[ToolDef] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    response_format: ResponseFormat | None = None


def _first_error(error: ValidationError) -> str:
    """`stream_options.include_usage: Input should be a valid boolean`: where, then what."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{printable(where, 80)}: {first['msg']}" if where else first["msg"]


def error_body(error: MeshError) -> tuple[int, dict[str, Any]]:
    status, kind = _HTTP_STATUS.get(error.grpc_code_name, (500, "server_error"))
    return status, {
        "error": {
            "message": str(error),
            "type": kind,
            "param": None,
            "code": error.grpc_code_name.lower(),
        }
    }


def error_headers(error: MeshError) -> dict[str, str]:
    """`WWW-Authenticate` for a missing or wrong key, `Retry-After` when the error says when."""
    if error.grpc_code_name == "UNAUTHENTICATED":
        return {"WWW-Authenticate": 'Bearer realm="edge-agent-mesh"'}
    retry_after_s = float(error.fields.get("retry_after_s") or 0.0)
    return {"Retry-After": retry_after_header(retry_after_s)} if retry_after_s > 0 else {}


def error_response(error: MeshError, status: int | None = None) -> JSONResponse:
    default_status, body = error_body(error)
    return JSONResponse(body, status_code=status or default_status, headers=error_headers(error))


class BodyTooLarge(Exception):
    """The request body is over the coordinator's limit (answered 413)."""


async def read_body(request: Request, limit_bytes: int) -> bytes:
    """The request body, read no further than `limit_bytes` (BodyTooLarge beyond): a declared
    Content-Length over the limit is refused before anything is read."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit_bytes:
        raise BodyTooLarge(f"the request body is {declared} bytes, over the limit of {limit_bytes}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit_bytes:
            raise BodyTooLarge(f"the request body is over the limit of {limit_bytes} bytes")
    return bytes(body)


def parse_body(body: bytes) -> ChatCompletionRequest:
    """The chat request in `body`; InvalidRequestError says what is wrong with it."""
    try:
        return ChatCompletionRequest.model_validate(json.loads(body))
    except ValidationError as error:
        raise InvalidRequestError(f"invalid request body: {_first_error(error)}") from None
    except ValueError as error:  # JSONDecodeError, and UnicodeDecodeError for bytes not UTF-8
        raise InvalidRequestError(f"invalid request body: {error}") from None
    except RecursionError:  # JSON nested past the interpreter's stack
        raise InvalidRequestError("invalid request body: JSON nested too deeply") from None


MAX_SESSION_CHARS = 128  # the `user` kept as a conversation's routing affinity
AGENT_MODEL_PREFIX = "agent:"  # `model: "agent:customer-service"` runs that agent


def task_from_chat(
    body: ChatCompletionRequest, headers: Any, max_messages: int = DEFAULT_MAX_MESSAGES
) -> tuple[TaskSpec, ToolPlan | None]:
    """The task, and the plan for its tools or response format (None: a plain answer)."""
    if body.n != 1:
        raise InvalidRequestError(f"n must be 1 (the mesh answers once per task), got {body.n}")
    if not body.messages:
        raise InvalidRequestError("messages must not be empty")
    check_message_count(len(body.messages), max_messages, "the coordinator's")
    idempotency_key = headers.get("idempotency-key", "")
    check_caller_ids("", idempotency_key, key_name="the Idempotency-Key header")
    deadline = headers.get("x-mesh-deadline-s")
    try:
        deadline_s = float(deadline) if deadline else None
    except ValueError:
        raise InvalidRequestError(
            f"X-Mesh-Deadline-S must be seconds, got {quoted(deadline)}"
        ) from None
    check_deadline_s(deadline_s, "X-Mesh-Deadline-S")
    max_tokens, name = body.max_completion_tokens, "max_completion_tokens"
    if max_tokens is None:
        max_tokens, name = body.max_tokens, "max_tokens"
    check_max_tokens(max_tokens, name)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or ())
    model, agent = body.model, headers.get("x-mesh-agent") or None
    if model.startswith(AGENT_MODEL_PREFIX):
        model, agent = "", model.removeprefix(AGENT_MODEL_PREFIX) or None
    messages = [
        {"role": m.role, "content": m.text(), "tool_calls": m.tool_calls} for m in body.messages
    ]
    tool_plan = plan(
        body.tools,
        body.tool_choice,
        body.response_format,
        max_tokens=max_tokens,
        answered=answered_calls(messages),
    )
    if agent and tool_plan is not None:
        raise InvalidRequestError(
            "tools and response_format apply to a model; an agent has tools of its own "
            f"(agent {quoted(agent, 64)})"
        )
    turns = history(messages)
    if tool_plan is not None:
        turns = with_system(turns, tool_plan.system)
    task = build_task(
        messages=turns,
        model=model,
        agent=agent,
        idempotency_key=idempotency_key,
        deadline_s=deadline_s,
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=stop,
        traceparent=headers.get("traceparent", ""),
        json_schema=tool_plan.schema if tool_plan is not None else "",
        session=(body.user or "")[:MAX_SESSION_CHARS],
    )
    return task, tool_plan


def _usage(result: TaskResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.total_tokens,
    }


def _mesh_info(result: TaskResult) -> dict[str, Any]:
    info = {
        "task_id": result.task_id,
        "node_id": result.node_id,
        "node_name": result.node_name,
        "failed_over": result.failed_over,
        "total_ms": round(result.total_ms, 3),
        "attempts": [
            {
                "node_id": a.node_id,
                "node_name": a.node_name,
                "outcome": a.outcome.value,
                "duration_ms": round(a.duration_ms, 3),
                "completion_tokens": a.completion_tokens,
                "detail": a.detail,
            }
            for a in result.attempts
        ],
    }
    if result.agent:  # agent tasks: who answered how (steps as in `mesh submit --json`)
        info.update(
            agent=result.agent,
            tier=result.tier,
            routed_by=result.routed_by,
            escalation_reason=result.escalation_reason,
            steps=[
                {
                    "index": s.index,
                    "kind": s.kind,
                    "tool": s.call.tool,
                    "arguments": s.call.arguments_json,
                    "result": s.result_json,
                    "error": s.error,
                    "node_id": s.node_id,
                }
                for s in result.steps
            ],
        )
    return info


def completion_body(
    result: TaskResult, model: str, tool_plan: ToolPlan | None = None
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": result.text}
    finish = result.finish_reason or "stop"
    if tool_plan is not None and tool_plan.wrapped:
        answer = read_answer(result.text, tool_plan, result.task_id, finish)
        message["content"], finish = answer.content, answer.finish_reason
        if answer.tool_calls:
            message["tool_calls"] = answer.tool_calls
    return {
        "id": f"chatcmpl-{result.task_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": result.model or model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": finish,
                "logprobs": None,
            }
        ],
        "usage": _usage(result),
        "mesh": _mesh_info(result),
    }


async def sse_events(
    items: AsyncIterator[AgentItem],
    task: TaskSpec,
    model: str,
    include_usage: bool,
    tool_plan: ToolPlan | None = None,
) -> AsyncIterator[str]:
    """OpenAI's chunks. With tools the answer arrives whole (runs.TaskRun takes JSON answers
    whole) and goes out as one content delta or one tool-call delta."""
    base = {
        "id": f"chatcmpl-{task.task_id}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
    }

    def event(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        chunk = {
            **base,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            **extra,
        }
        return f"data: {json.dumps(chunk)}\n\n"

    yield event({"role": "assistant", "content": ""})
    tools = tool_plan is not None and tool_plan.wrapped
    held: list[str] = []
    try:
        async for item in items:
            if isinstance(item, str) and tools:
                held.append(item)
            elif isinstance(item, str):
                yield event({"content": item})
            elif isinstance(item, TaskResult):  # agent steps are not part of the OpenAI stream
                finish = item.finish_reason or "stop"
                if tools:
                    assert tool_plan is not None
                    answer = read_answer("".join(held), tool_plan, item.task_id, finish)
                    finish = answer.finish_reason
                    for index, call in enumerate(answer.tool_calls):
                        yield event({"tool_calls": [{"index": index, **call}]})
                    if answer.content is not None:
                        yield event({"content": answer.content})
                yield event({}, finish, mesh=_mesh_info(item))
                if include_usage:
                    yield f"data: {json.dumps({**base, 'choices': [], 'usage': _usage(item)})}\n\n"
    except MeshError as error:
        _status, body = error_body(error)
        yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"


async def _prepend(first: AgentItem, rest: AsyncIterator[AgentItem]) -> AsyncIterator[AgentItem]:
    yield first
    async for item in rest:
        yield item


class _Login(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str


def add_dashboard_login(app: FastAPI, access: AccessControl | None) -> None:
    """`POST /dashboard/login {"key": KEY}`: the dashboard's browser signs in with an API key,
    kept in an HttpOnly, SameSite=Strict cookie (mesh/coordinator/http_access.py takes it for
    reads only); `POST /dashboard/logout` forgets it. An open mesh needs neither: 204."""
    from mesh.coordinator.http_access import KEY_COOKIE

    @app.post("/dashboard/login", response_model=None)
    async def login(body: _Login) -> Response:
        if access is None:
            return Response(status_code=204)
        try:
            access.authenticate(f"Bearer {body.key}")
        except MeshError as error:
            return error_response(error)
        reply = Response(status_code=204)
        reply.set_cookie(
            KEY_COOKIE, body.key, httponly=True, samesite="strict", path="/", max_age=12 * 3600
        )
        return reply

    @app.post("/dashboard/logout", response_model=None)
    async def logout() -> Response:
        reply = Response(status_code=204)
        reply.delete_cookie(KEY_COOKIE, path="/")
        return reply


def build_openai_app(
    dispatcher: Dispatcher,
    *,
    stream_window_s: float = 0.0,
    info: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    access: AccessControl | None = None,
    refusals: Callable[[], Awaitable[list[dict[str, Any]]]] | None = None,
) -> FastAPI:
    """The FastAPI app; `info` answers `GET /v1/mesh/info` (e.g. the fast-path addresses);
    `access` requires API keys (None: an open mesh, no check at all); `refusals` answers
    `GET /v1/mesh/refusals` (nodes the registry refused, with why)."""
    app = FastAPI(title="Edge Agent Mesh", docs_url=None, redoc_url=None)

    @app.get("/v1/mesh/refusals")
    async def mesh_refusals() -> dict[str, Any]:
        return {"refusals": await refusals() if refusals is not None else []}

    @app.get("/v1/mesh/info")
    async def mesh_info() -> dict[str, Any]:
        return await info() if info is not None else {}

    @app.get("/metrics", response_model=None)
    async def metrics() -> Response:
        return Response(dispatcher.metrics.text(), media_type=CONTENT_TYPE)

    @app.get("/v1/mesh/traces/{task_id}", response_model=None)
    async def task_trace(task_id: str) -> JSONResponse:
        """The task's span tree as flat spans (parent ids link them), oldest first; 404 for
        another API key's task."""
        try:
            trace_id, spans = await dispatcher.trace(task_id, reader=reader_of(current_caller()))
        except MeshError as error:
            return error_response(error)
        return JSONResponse(
            {
                "task_id": task_id,
                "trace_id": trace_id,
                "spans": [span.to_json() for span in spans],
            }
        )

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        """Models, then agents as `agent:NAME` (and `agent:auto` while there are agents):
        choosing one as the model runs that agent."""
        agents = dispatcher.agents()
        models, agents = dispatcher.models(), [*agents, *(["auto"] if agents else [])]
        if access is not None:  # only what the key may use
            from mesh.coordinator.access import allowed

            models, agents = allowed(current_caller(), models, agents)
        ids = models + [f"{AGENT_MODEL_PREFIX}{name}" for name in agents]
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "edge-agent-mesh"}
                for name in ids
            ],
        }

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> JSONResponse | StreamingResponse:
        settings = dispatcher.settings
        try:
            body = parse_body(await read_body(request, settings.http_body_limit_bytes))
            task, tool_plan = task_from_chat(body, request.headers, settings.max_messages)
            if access is not None:
                task = await access.admit_current(task)
        except BodyTooLarge as error:
            return error_response(InvalidRequestError(f"{error}; shorten the prompt"), 413)
        except MeshError as error:
            return error_response(error)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            items = coalesce(stream_of(dispatcher, task, access), stream_window_s)
            try:  # an error before the first token is an HTTP error, not an event
                first = await anext(items)
            except MeshError as error:
                return error_response(error)
            return StreamingResponse(
                sse_events(_prepend(first, items), task, body.model, include_usage, tool_plan),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        try:
            result = await submit_as_caller(dispatcher, task, access)
        except MeshError as error:
            return error_response(error)
        return JSONResponse(completion_body(result, body.model, tool_plan))

    add_dashboard(app, dispatcher)  # /dashboard (mesh/observe/dashboard_api.py)
    add_dashboard_login(app, access)
    # /v1/responses: a module of its own over this one's chat path (imported here: it imports
    # this module)
    from mesh.coordinator.openai_responses import add_responses

    add_responses(app, dispatcher, stream_window_s=stream_window_s, access=access)
    if access is not None:  # API keys (imported here: it imports this module)
        from mesh.coordinator.http_access import RequireApiKey

        app.add_middleware(RequireApiKey, access=access)
    return app


def stream_of(
    dispatcher: Dispatcher, task: TaskSpec, access: AccessControl | None
) -> AsyncGenerator[AgentItem, None]:
    """The task's stream; with API keys, run as the caller the middleware set, the tokens it
    produced counted however it ends (answered, failed, or cut by the client)."""
    caller = current_caller() if access is not None else None
    if access is None or caller is None:
        return dispatcher.stream(task)
    usage = TaskUsage()
    return access.as_caller(caller, dispatcher.stream(task, usage=usage), usage)


async def submit_as_caller(
    dispatcher: Dispatcher, task: TaskSpec, access: AccessControl | None
) -> TaskResult:
    """The task's answer; with API keys, the tokens it produced counted against the caller's
    key, whether it answered, failed or was cancelled."""
    caller = current_caller() if access is not None else None
    if access is None or caller is None:
        return await dispatcher.submit(task)
    usage = TaskUsage()
    try:
        return await dispatcher.submit(task, usage=usage)
    finally:
        access.spend(caller, usage.total_tokens)
