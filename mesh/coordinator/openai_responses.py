"""OpenAI's Responses API (`POST /v1/responses`): the subset agent SDKs use, over the chat path.

    input          text, or items: messages (`input_text` / `output_text` parts), `function_call`
                   and `function_call_output`
    instructions   a system message first
    tools          function tools (`{"type": "function", "name", "parameters"}`), tool_choice,
                   parallel_tool_calls; text.format json_object / json_schema
    stream         response.created, response.in_progress, response.output_item.added,
                   response.content_part.added, response.output_text.delta / .done,
                   response.function_call_arguments.delta / .done, response.content_part.done,
                   response.output_item.done, response.completed (each with sequence_number)
    previous_response_id, store
                   a stored response's whole conversation (its input and output) goes before
                   this input; kept in this dispatcher replica's memory for `KEPT_S`, the last
                   `KEPT` responses (`store: false` keeps nothing)

A request becomes a chat completion request (openai_tools turns its tools into the grammar the
node enforces), so failover, idempotency and traces work as on the chat path.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, StrictBool, ValidationError

from mesh.coordinator.dispatch import Dispatcher
from mesh.coordinator.openai_api import (
    BodyTooLarge,
    ChatCompletionRequest,
    error_body,
    error_response,
    read_body,
    stream_of,
    submit_as_caller,
    task_from_chat,
)
from mesh.coordinator.openai_tools import Answer, ToolPlan, read_answer
from mesh.coordinator.service import coalesce
from mesh.coordinator.tasks import TaskResult
from mesh.core.caller import current_caller
from mesh.core.errors import InvalidRequestError, MeshError, NotFoundError
from mesh.core.untrusted import quoted

if TYPE_CHECKING:
    from mesh.coordinator.access import AccessControl

KEPT = 1000
KEPT_S = 3600.0


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    text: dict[str, Any] | None = None
    stream: StrictBool = False
    store: StrictBool = True
    previous_response_id: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and part.get("type") in ("input_text", "output_text", "text")
        )
    return ""


def chat_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses input items as chat messages: function calls become an assistant's
    tool_calls, their outputs tool messages."""
    messages: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise InvalidRequestError(f"input[{index}].role {quoted(str(role), 32)} is unknown")
            messages.append({"role": role, "content": _text_of(item.get("content"))})
        elif kind == "function_call":
            call = {
                "id": str(item.get("call_id", "")),
                "type": "function",
                "function": {
                    "name": str(item.get("name", "")),
                    "arguments": str(item.get("arguments", "{}")),
                },
            }
            if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls"):
                messages[-1]["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output", "")
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": str(item.get("call_id", "")),
                    "content": output if isinstance(output, str) else json.dumps(output),
                }
            )
        elif kind == "reasoning":
            continue  # a model's reasoning summary: nothing for ours to read
        else:
            raise InvalidRequestError(
                f"input[{index}].type {quoted(str(kind), 32)} is not supported"
            )
    return messages


def _chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    chat = []
    for index, tool in enumerate(tools):
        if tool.get("type") != "function":
            raise InvalidRequestError(
                f"tools[{index}].type {quoted(str(tool.get('type')), 32)}: only function tools"
            )
        chat.append(
            {
                "type": "function",
                "function": {
                    "name": tool.get("name", ""),
                    "description": tool.get("description") or "",
                    "parameters": tool.get("parameters"),
                },
            }
        )
    return chat


def _chat_choice(choice: str | dict[str, Any] | None) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name", "")}}
    return choice


def _chat_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    fmt = (text or {}).get("format")
    if not isinstance(fmt, dict) or fmt.get("type") in (None, "text"):
        return None
    if fmt.get("type") == "json_schema":
        return {
            "type": "json_schema",
            "json_schema": {
                "name": fmt.get("name", "answer"),
                "schema": fmt.get("schema"),
                "strict": fmt.get("strict"),
            },
        }
    return {"type": fmt.get("type")}


@dataclass
class _Stored:
    messages: list[dict[str, Any]]  # the whole conversation, as chat messages
    at: float
    owner: str = ""  # the API key that made it: no other key reads it


class StoredResponses:
    """Conversations of recent responses, for `previous_response_id` (bounded, timed)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._kept: OrderedDict[str, _Stored] = OrderedDict()
        self._clock = clock

    def get(self, response_id: str, owner: str = "") -> list[dict[str, Any]]:
        stored = self._kept.get(response_id)
        if stored is None or self._clock() - stored.at > KEPT_S or stored.owner != owner:
            raise NotFoundError(
                f"previous_response_id {quoted(response_id, 64)} is not known here (responses "
                f"are kept {KEPT_S / 60:g} minutes, on the coordinator replica that made them)"
            )
        return list(stored.messages)

    def put(self, response_id: str, messages: list[dict[str, Any]], owner: str = "") -> None:
        self._kept[response_id] = _Stored(messages, self._clock(), owner)
        while len(self._kept) > KEPT:
            self._kept.popitem(last=False)


def _output(result: TaskResult, tool_plan: ToolPlan | None) -> tuple[list[dict[str, Any]], Answer]:
    finish = result.finish_reason or "stop"
    if tool_plan is not None and tool_plan.wrapped:
        answer = read_answer(result.text, tool_plan, result.task_id, finish)
    else:
        answer = Answer(result.text, [], finish)
    items: list[dict[str, Any]] = []
    for call in answer.tool_calls:
        items.append(
            {
                "type": "function_call",
                "id": f"fc_{call['id'].removeprefix('call_')}",
                "call_id": call["id"],
                "name": call["function"]["name"],
                "arguments": call["function"]["arguments"],
                "status": "completed",
            }
        )
    if answer.content is not None:
        items.append(
            {
                "type": "message",
                "id": f"msg_{result.task_id}",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": answer.content, "annotations": []}],
            }
        )
    return items, answer


def _response(
    response_id: str,
    body: ResponsesRequest,
    output: list[dict[str, Any]],
    status: str,
    result: TaskResult | None,
) -> dict[str, Any]:
    usage = None
    if result is not None:
        usage = {
            "input_tokens": result.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": result.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": result.total_tokens,
        }
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "model": (result.model if result is not None else "") or body.model,
        "output": output,
        "instructions": body.instructions,
        "previous_response_id": body.previous_response_id,
        "tools": body.tools or [],
        "tool_choice": body.tool_choice or "auto",
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "max_output_tokens": body.max_output_tokens,
        "text": body.text or {"format": {"type": "text"}},
        "store": body.store,
        "error": None,
        "incomplete_details": None,
        "metadata": {},
        "usage": usage,
    }


def _conversation(
    body: ResponsesRequest, stored: StoredResponses, owner: str
) -> list[dict[str, Any]]:
    earlier = stored.get(body.previous_response_id, owner) if body.previous_response_id else []
    items = [{"role": "user", "content": body.input}] if isinstance(body.input, str) else body.input
    messages = [*earlier, *chat_messages(items)]
    if body.instructions:  # instructions are not carried over from a previous response
        messages = [m for m in messages if m.get("role") != "system"]
        messages.insert(0, {"role": "system", "content": body.instructions})
    return messages


def _as_chat(body: ResponsesRequest, messages: list[dict[str, Any]]) -> ChatCompletionRequest:
    try:
        return ChatCompletionRequest.model_validate(
            {
                "model": body.model,
                "messages": messages,
                "max_tokens": body.max_output_tokens,
                "temperature": body.temperature,
                "top_p": body.top_p,
                "tools": _chat_tools(body.tools),
                "tool_choice": _chat_choice(body.tool_choice),
                "parallel_tool_calls": body.parallel_tool_calls,
                "response_format": _chat_format(body.text),
                "user": body.user,
            }
        )
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidRequestError(f"invalid request: {where}: {first['msg']}") from None


def _parse(raw: bytes) -> ResponsesRequest:
    try:
        return ResponsesRequest.model_validate(json.loads(raw))
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidRequestError(f"invalid request body: {where}: {first['msg']}") from None
    except (ValueError, RecursionError) as error:
        raise InvalidRequestError(f"invalid request body: {error}") from None


async def _events(
    response_id: str,
    body: ResponsesRequest,
    items: AsyncIterator[Any],
    tool_plan: ToolPlan | None,
    finished: Callable[[list[dict[str, Any]]], None],
) -> AsyncIterator[str]:
    sequence = 0

    def event(kind: str, **fields: Any) -> str:
        nonlocal sequence
        sequence += 1
        data = {"type": kind, "sequence_number": sequence - 1, **fields}
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n"

    start = _response(response_id, body, [], "in_progress", None)
    yield event("response.created", response=start)
    yield event("response.in_progress", response=start)
    wrapped = tool_plan is not None and tool_plan.wrapped
    message_id, text = f"msg_{response_id.removeprefix('resp_')}", []
    opened = False
    try:
        async for item in items:
            if isinstance(item, str) and not wrapped:
                if not opened:  # plain text streams as it comes
                    opened = True
                    yield event(
                        "response.output_item.added",
                        output_index=0,
                        item={"type": "message", "id": message_id, "status": "in_progress",
                              "role": "assistant", "content": []},
                    )  # fmt: skip
                    yield event(
                        "response.content_part.added",
                        item_id=message_id, output_index=0, content_index=0,
                        part={"type": "output_text", "text": "", "annotations": []},
                    )  # fmt: skip
                text.append(item)
                yield event(
                    "response.output_text.delta",
                    item_id=message_id, output_index=0, content_index=0, delta=item,
                )  # fmt: skip
            elif isinstance(item, TaskResult):
                output, _answer = _output(item, tool_plan)
                for index, out in enumerate(output):
                    async for line in _item_events(event, index, out, opened and not wrapped):
                        yield line
                finished(output)
                done = _response(response_id, body, output, "completed", item)
                yield event("response.completed", response=done)
    except MeshError as error:
        _status, payload = error_body(error)
        yield event("error", code=payload["error"]["code"], message=payload["error"]["message"])


async def _item_events(
    event: Callable[..., str], index: int, item: dict[str, Any], opened: bool
) -> AsyncIterator[str]:
    """The events that finish output item `index` (and open it, unless its text streamed)."""
    if item["type"] == "function_call":
        yield event(
            "response.output_item.added",
            output_index=index,
            item={**item, "arguments": "", "status": "in_progress"},
        )
        yield event(
            "response.function_call_arguments.delta",
            item_id=item["id"],
            output_index=index,
            delta=item["arguments"],
        )
        yield event(
            "response.function_call_arguments.done",
            item_id=item["id"],
            output_index=index,
            arguments=item["arguments"],
        )
        yield event("response.output_item.done", output_index=index, item=item)
        return
    part = item["content"][0]
    if not opened:
        yield event(
            "response.output_item.added",
            output_index=index,
            item={**item, "status": "in_progress", "content": []},
        )
        yield event(
            "response.content_part.added",
            item_id=item["id"],
            output_index=index,
            content_index=0,
            part={**part, "text": ""},
        )
        yield event(
            "response.output_text.delta",
            item_id=item["id"],
            output_index=index,
            content_index=0,
            delta=part["text"],
        )
    yield event(
        "response.output_text.done",
        item_id=item["id"],
        output_index=index,
        content_index=0,
        text=part["text"],
    )
    yield event(
        "response.content_part.done",
        item_id=item["id"],
        output_index=index,
        content_index=0,
        part=part,
    )
    yield event("response.output_item.done", output_index=index, item=item)  # fmt: skip


def add_responses(
    app: FastAPI,
    dispatcher: Dispatcher,
    *,
    stream_window_s: float = 0.0,
    access: AccessControl | None = None,
) -> None:
    """Mount `POST /v1/responses` on the OpenAI app (`access`: API keys, as openai_api's)."""
    stored = StoredResponses()

    @app.post("/v1/responses", response_model=None)
    async def responses(request: Request) -> JSONResponse | StreamingResponse:
        settings = dispatcher.settings
        try:
            body = _parse(await read_body(request, settings.http_body_limit_bytes))
            caller = current_caller() if access is not None else None
            owner = caller.key_name if caller is not None else ""
            messages = _conversation(body, stored, owner)
            task, tool_plan = task_from_chat(
                _as_chat(body, messages), request.headers, settings.max_messages
            )
            if access is not None:
                task = await access.admit_current(task)
        except BodyTooLarge as error:
            return error_response(InvalidRequestError(f"{error}; shorten the input"), 413)
        except MeshError as error:
            return error_response(error)
        response_id = f"resp_{task.task_id.removeprefix('task-')}"

        def finished(output: list[dict[str, Any]]) -> None:
            if body.store:
                stored.put(response_id, messages + chat_messages(output_as_input(output)), owner)

        if body.stream:
            items = coalesce(stream_of(dispatcher, task, access), stream_window_s)
            return StreamingResponse(
                _events(response_id, body, items, tool_plan, finished),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        try:
            result = await submit_as_caller(dispatcher, task, access)
        except MeshError as error:
            return error_response(error)
        output, _answer = _output(result, tool_plan)
        finished(output)
        return JSONResponse(_response(response_id, body, output, "completed", result))


def output_as_input(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A response's output items as the input items that replay it."""
    items = []
    for item in output:
        if item["type"] == "function_call":
            items.append({k: item[k] for k in ("type", "call_id", "name", "arguments")})
        else:
            items.append({"type": "message", "role": "assistant", "content": item["content"]})
    return items
