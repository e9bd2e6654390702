"""MeshService over a Dispatcher: proto conversion, chunked streaming, and the grpc.aio servicer.

`MeshHandlers` turns protos into tasks and results into protos; it is shared by the Ray Serve
ingress (whose gRPC proxy calls the deployment's methods) and by `MeshServicer`, the direct
grpc.aio fast path each dispatcher replica can serve on its own port.

With an `AccessControl` (a coordinator with a cluster directory) every method needs the
metadata `authorization: Bearer KEY`: UNAUTHENTICATED without a valid one, PERMISSION_DENIED
for an agent or model out of the key's scope, RESOURCE_EXHAUSTED (with RetryInfo and a
`retry-after` trailer) over its limits. The servicers ask `caller_of(context)` first and hand
the caller to each method, which runs the task with `CALLER` set.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc

from edgemesh.v1 import mesh_pb2, mesh_pb2_grpc, node_pb2
from mesh.coordinator.agent_run import AgentItem
from mesh.coordinator.dispatch import Dispatcher
from mesh.coordinator.pool import NodeRow
from mesh.coordinator.tasks import (
    AttemptRecord,
    TaskRecord,
    TaskResult,
    TaskSpec,
    TaskUsage,
    check_caller_ids,
    check_deadline_s,
    check_max_tokens,
)
from mesh.core.bounds import (
    DEFAULT_MAX_MESSAGES,
    MAX_TASK_ID_CHARS,
    check_caller_id,
    check_message_count,
)
from mesh.core.caller import CALLER, Caller, reader_of
from mesh.core.channels import add_server_port, create_server
from mesh.core.decoding import undecodable_error
from mesh.core.errors import (
    InvalidRequestError,
    MeshError,
    UnauthenticatedError,
    UnavailableError,
)
from mesh.core.grpc_status import abort_with_error
from mesh.core.ids import TaskId, new_task_id
from mesh.core.tracing import incoming_traceparent

if TYPE_CHECKING:
    from mesh.coordinator.access import AccessControl

logger = logging.getLogger("mesh.coordinator")

_OUTCOMES = {
    "ok": mesh_pb2.ATTEMPT_OUTCOME_OK,
    "unavailable": mesh_pb2.ATTEMPT_OUTCOME_UNAVAILABLE,
    "timeout": mesh_pb2.ATTEMPT_OUTCOME_TIMEOUT,
    "overloaded": mesh_pb2.ATTEMPT_OUTCOME_OVERLOADED,
    "error": mesh_pb2.ATTEMPT_OUTCOME_ERROR,
    "cancelled": mesh_pb2.ATTEMPT_OUTCOME_CANCELLED,
    "running": mesh_pb2.ATTEMPT_OUTCOME_UNSPECIFIED,  # in progress (a running task)
}
_END = object()
FAST_PATH_MAX_RPCS = 1000  # calls at once on a fast path (CoordinatorConfig.max_ongoing_requests)


# ---------------------------------------------------------------------- conversion


def task_from_submit(
    request: mesh_pb2.SubmitRequest, max_messages: int = DEFAULT_MAX_MESSAGES
) -> TaskSpec:
    """A TaskSpec from a SubmitRequest; InvalidRequestError says what to change. Ids and the
    message count are checked before anything is copied (the dispatcher checks the rest)."""
    check_caller_ids(request.task_id, request.idempotency_key)
    check_message_count(len(request.messages), max_messages, "the coordinator's")
    check_deadline_s(request.deadline_s)  # 0: the default; NaN, infinite or negative: refused
    sampling = request.sampling
    check_max_tokens(sampling.max_tokens if sampling.HasField("max_tokens") else None)
    if not request.prompt.strip() and not request.messages:
        raise InvalidRequestError("the task is empty; give a prompt or at least one message")
    if request.tier and not request.agent:
        raise InvalidRequestError('tier applies to agent tasks; give an agent (or "auto")')
    generate = node_pb2.GenerateRequest(
        model=request.model,
        prompt=request.prompt,
        messages=request.messages,
        sampling=request.sampling,
    )
    return TaskSpec(
        task_id=TaskId(request.task_id) if request.task_id else new_task_id(),
        request=generate,
        idempotency_key=request.idempotency_key,
        model=request.model or None,
        agent=request.agent or None,
        deadline_s=request.deadline_s or None,
        labels=dict(request.labels),
        caller_task_id=bool(request.task_id),
        tier=request.tier or None,
    )


def attempt_to_proto(attempt: AttemptRecord) -> mesh_pb2.Attempt:
    return mesh_pb2.Attempt(
        node_id=attempt.node_id,
        node_name=attempt.node_name,
        outcome=_OUTCOMES[attempt.outcome.value],
        duration_ms=attempt.duration_ms,
        detail=attempt.detail,
        completion_tokens=attempt.completion_tokens,
    )


def result_to_proto(result: TaskResult, *, with_text: bool = True) -> mesh_pb2.SubmitResponse:
    return mesh_pb2.SubmitResponse(
        task_id=result.task_id,
        text=result.text if with_text else "",
        finish_reason=result.finish_reason,
        node_id=result.node_id,
        node_name=result.node_name,
        model=result.model,
        agent=result.agent,
        usage=node_pb2.Usage(
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            total_tokens=result.total_tokens,
        ),
        attempts=[attempt_to_proto(a) for a in result.attempts],
        failed_over=result.failed_over,
        total_ms=result.total_ms,
        time_to_first_token_ms=result.time_to_first_token_ms,
        steps=result.steps,
        tier=result.tier,
        escalation_reason=result.escalation_reason,
        routed_by=result.routed_by,
    )


def record_to_proto(record: TaskRecord) -> mesh_pb2.TaskRecord:
    reply = mesh_pb2.TaskRecord(
        task_id=record.task_id,
        state=record.state.value,
        error=record.error,
        attempts=[attempt_to_proto(a) for a in record.attempts],
    )
    if record.result is not None:
        reply.result.CopyFrom(result_to_proto(record.result))
    return reply


def row_to_proto(row: NodeRow) -> mesh_pb2.NodeEntry:
    view = row.view
    return mesh_pb2.NodeEntry(
        node_id=view.node_id,
        name=view.name,
        address=view.address,
        state=view.state.value,
        source=view.source.value,
        models=list(view.models),
        agents=list(view.agents),
        load=node_pb2.Load(
            in_flight=max(view.in_flight, row.outstanding),
            queued=view.queued,
            cpu_percent=view.cpu_percent,
            memory_percent=view.memory_percent,
        ),
        capacity=node_pb2.Capacity(max_concurrent=view.max_concurrent, max_queued=view.max_queued),
        labels=dict(view.labels),
        ewma_ms_per_token=row.ewma_ms_per_token or 0.0,
        decode_tokens_per_s=dict(view.decode_tokens_per_s),
        cooling_down=row.cooling_down,
        hardware=node_pb2.Hardware(
            logical_cores=view.cores,
            memory_total_bytes=view.memory_total_bytes,
            gpus=[node_pb2.Gpu(name=a) for a in view.accelerators],
        ),
    )


# ---------------------------------------------------------------------- chunking


async def coalesce(
    items: AsyncGenerator[AgentItem, None], window_s: float
) -> AsyncGenerator[AgentItem, None]:
    """Merge text pieces that arrive within `window_s` into one piece (other items pass as they are).

    The first piece goes out at once (time to first token is what users feel); later pieces are
    batched, so a stream through Ray Serve costs one hop per window, not one per token.
    """
    if window_s <= 0:
        async with contextlib.aclosing(items):  # closed with us: its slot freed at once
            async for passed in items:
                yield passed
        return
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for item in items:
                queue.put_nowait(item)
        except Exception as error:  # handed to the consumer, who raises it in its own frame
            queue.put_nowait(_Failure(error))
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the consumer stopped us
            # Raised from inside `items` (e.g. a gRPC call cut under it): never end the stream
            # as if it were complete.
            queue.put_nowait(_Failure(UnavailableError("the task's stream was cut")))
        finally:
            queue.put_nowait(_END)

    pumping = loop.create_task(pump())
    pending: list[object] = []
    first = True
    try:
        while True:
            item = pending.pop() if pending else await queue.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            if not isinstance(item, str) or first:
                first = False
                yield item  # type: ignore[misc]
                continue
            pieces = [item]
            flush_at = loop.time() + window_s
            while (left := flush_at - loop.time()) > 0:
                try:
                    async with asyncio.timeout(left):
                        following = await queue.get()
                except TimeoutError:
                    break
                if not isinstance(following, str):
                    pending.append(following)
                    break
                pieces.append(following)
            yield "".join(pieces)
    finally:
        pumping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pumping


class _Failure:
    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


# ---------------------------------------------------------------------- handlers


class MeshHandlers:
    """The MeshService methods as plain coroutines over protos; they raise MeshError.
    `access`: API keys required (None: an open mesh)."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        stream_window_s: float = 0.0,
        access: AccessControl | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.stream_window_s = stream_window_s
        self.access = access

    def caller_of(self, context: Any) -> Caller | None:
        """Who calls, from the call's metadata (grpc.aio's or Ray Serve's context): None on an
        open mesh; UnauthenticatedError without a valid key."""
        if self.access is None:
            return None
        metadata = context.invocation_metadata() if context is not None else None
        return self.access.authenticate_metadata(metadata)

    def _check_caller(self, caller: Caller | None) -> None:
        if self.access is not None and caller is None:
            raise UnauthenticatedError("an API key is required")

    def _task(
        self, request: mesh_pb2.SubmitRequest, traceparent: str, caller: Caller | None
    ) -> TaskSpec:
        self._check_caller(caller)
        _raise_if_undecodable(request)
        task = task_from_submit(request, self.dispatcher.settings.max_messages)
        return dataclasses.replace(task, traceparent=traceparent) if traceparent else task

    async def submit(
        self,
        request: mesh_pb2.SubmitRequest,
        *,
        traceparent: str = "",
        caller: Caller | None = None,
    ) -> mesh_pb2.SubmitResponse:
        """`traceparent`: the caller's W3C trace context (gRPC metadata), if any; `caller`:
        who asks (`caller_of`), when the mesh requires keys."""
        task = self._task(request, traceparent, caller)
        if self.access is None or caller is None:  # an open mesh: nothing more per call
            return result_to_proto(await self.dispatcher.submit(task))
        task = await self.access.admit(caller, task)
        usage = TaskUsage()
        token = CALLER.set(caller)
        try:
            result = await self.dispatcher.submit(task, usage=usage)
        finally:  # answered, failed or cancelled: the tokens it produced count
            CALLER.reset(token)
            self.access.spend(caller, usage.total_tokens)
        return result_to_proto(result)

    async def submit_stream(
        self,
        request: mesh_pb2.SubmitRequest,
        *,
        traceparent: str = "",
        caller: Caller | None = None,
    ) -> AsyncGenerator[mesh_pb2.SubmitChunk, None]:
        task = self._task(request, traceparent, caller)
        if self.access is None or caller is None:  # an open mesh
            stream = self.dispatcher.stream(task)
        else:
            task = await self.access.admit(caller, task)
            usage = TaskUsage()
            stream = self.access.as_caller(caller, self.dispatcher.stream(task, usage=usage), usage)
        index = 0
        async with contextlib.aclosing(coalesce(stream, self.stream_window_s)) as items:
            async for item in items:
                if isinstance(item, str):
                    yield mesh_pb2.SubmitChunk(text=item, index=index)
                elif isinstance(item, node_pb2.AgentStep):
                    yield mesh_pb2.SubmitChunk(step=item, index=index)
                else:
                    yield mesh_pb2.SubmitChunk(
                        index=index, result=result_to_proto(item, with_text=False)
                    )
                index += 1

    def list_nodes(self, *, caller: Caller | None = None) -> mesh_pb2.ListNodesResponse:
        self._check_caller(caller)
        return mesh_pb2.ListNodesResponse(
            nodes=[row_to_proto(row) for row in self.dispatcher.node_rows()]
        )

    async def describe_task(
        self, request: mesh_pb2.DescribeTaskRequest, *, caller: Caller | None = None
    ) -> mesh_pb2.TaskRecord:
        """The task's record; NOT_FOUND for another API key's task (its existence is not the
        caller's to learn)."""
        self._check_caller(caller)
        _raise_if_undecodable(request)
        check_caller_id("task_id", request.task_id, MAX_TASK_ID_CHARS)
        record = await self.dispatcher.describe_task(request.task_id, reader=reader_of(caller))
        return record_to_proto(record)


def _raise_if_undecodable(request: object) -> None:
    """Serve's proxy hands over a request that did not decode as an Undecodable (`decoding`)."""
    error = undecodable_error(request)
    if error is not None:
        raise error


class MeshServicer(mesh_pb2_grpc.MeshServiceServicer):
    """The fast path: MeshService straight on grpc.aio, no Ray hop. CamelCase for gRPC only."""

    def __init__(self, handlers: MeshHandlers) -> None:
        self.handlers = handlers

    async def Submit(
        self, request: mesh_pb2.SubmitRequest, context: grpc.aio.ServicerContext
    ) -> mesh_pb2.SubmitResponse:
        try:
            caller = self.handlers.caller_of(context)
            parent = incoming_traceparent(context)
            return await self.handlers.submit(request, traceparent=parent, caller=caller)
        except MeshError as error:
            await abort_with_error(context, error)

    async def SubmitStream(
        self, request: mesh_pb2.SubmitRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[mesh_pb2.SubmitChunk]:
        try:
            caller = self.handlers.caller_of(context)
            parent = incoming_traceparent(context)
            chunks = self.handlers.submit_stream(request, traceparent=parent, caller=caller)
            # Closed with this generator, however the call ends: the task's node freed and
            # the tokens it produced counted at once.
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    yield chunk
        except MeshError as error:
            await abort_with_error(context, error)

    async def ListNodes(
        self, request: mesh_pb2.ListNodesRequest, context: grpc.aio.ServicerContext
    ) -> mesh_pb2.ListNodesResponse:
        try:
            return self.handlers.list_nodes(caller=self.handlers.caller_of(context))
        except MeshError as error:
            await abort_with_error(context, error)

    async def DescribeTask(
        self, request: mesh_pb2.DescribeTaskRequest, context: grpc.aio.ServicerContext
    ) -> mesh_pb2.TaskRecord:
        try:
            caller = self.handlers.caller_of(context)
            return await self.handlers.describe_task(request, caller=caller)
        except MeshError as error:
            await abort_with_error(context, error)


async def start_fast_path(
    handlers: MeshHandlers, address: str, *, max_concurrent_rpcs: int = FAST_PATH_MAX_RPCS
) -> tuple[grpc.aio.Server, int]:
    """Serve MeshService directly on `address` ("host:port", port 0: any); returns (server, port).
    Messages over the dispatcher's `receive_limit_bytes` are refused unread, and calls beyond
    `max_concurrent_rpcs` at once (the replica's max_ongoing_requests) are refused."""
    server = create_server(
        max_receive_bytes=handlers.dispatcher.settings.receive_limit_bytes,
        max_concurrent_rpcs=max_concurrent_rpcs,
    )
    mesh_pb2_grpc.add_MeshServiceServicer_to_server(MeshServicer(handlers), server)
    port = add_server_port(server, address)
    await server.start()
    return server, port
