"""The NodeService servicer: request validation, admission, generation, Describe.

gRPC methods are CamelCase only because gRPC demands it; each delegates at once
to snake_case code, and MeshError becomes a status code here, at the edge.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass

import grpc

from edgemesh.v1 import node_pb2, node_pb2_grpc
from mesh.core.bounds import check_message_count, check_prompt_bytes
from mesh.core.errors import InvalidRequestError, MeshError, NotFoundError, NotReadyError
from mesh.core.grpc_status import abort_with_error
from mesh.core.tracing import (
    Tracing,
    fail_with,
    incoming_traceparent,
    spans_to_proto,
    valid_trace_id,
)
from mesh.core.untrusted import quoted
from nodes import inference
from nodes.admission import AdmissionController, Ticket
from nodes.agents import AgentHost
from nodes.backends import ROLES, Backend, Completion, GenerationInput, Message, ModelStatus
from nodes.capability import battery_slots, on_battery
from nodes.config import NodeConfig
from nodes.hardware import HardwareInfo, system_load
from nodes.metrics import NodeMetrics
from nodes.model_manager import ModelManager
from nodes.task_counts import TaskCounts, TaskEvent
from nodes.traces import step_spans

logger = logging.getLogger(__name__)

_MODEL_STATES = {
    ModelStatus.LOADING: node_pb2.MODEL_STATE_LOADING,
    ModelStatus.READY: node_pb2.MODEL_STATE_READY,
    ModelStatus.FAILED: node_pb2.MODEL_STATE_FAILED,
    ModelStatus.UNLOADED: node_pb2.MODEL_STATE_UNLOADED,
}


@dataclass(frozen=True)
class NodeIdentity:
    node_id: str
    name: str
    cluster: str
    version: str
    protocol_version: int
    started_at_unix_s: float


def _check_range(name: str, value: float, low: float, high: float, hint: str) -> None:
    if not low <= value <= high:
        raise InvalidRequestError(
            f"{name} must be between {low:g} and {high:g}, got {value:g}; {hint}"
        )


def _checked_schema(text: str) -> str:
    """The request's JSON schema (JSON text naming a JSON object's schema), or ""; what is
    wrong with it, in an InvalidRequestError."""
    if not text:
        return ""
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidRequestError(f"json_schema is not valid JSON: {error.msg}") from None
    if not isinstance(schema, dict):
        raise InvalidRequestError("json_schema must be a JSON object (a JSON schema)")
    return text


def to_generation_input(
    request: node_pb2.GenerateRequest,
    config: NodeConfig,
    backends: Mapping[str, Backend],
    *,
    on_demand: Callable[[str], bool] = lambda _model_id: False,
) -> tuple[Backend, GenerationInput]:
    """Validate a request against the node's limits; InvalidRequestError/NotFoundError say
    what to change. A model that is not loaded is fine where `on_demand` says the node loads
    it when asked (nodes/model_manager.py)."""
    model_id = request.model or config.default_model_id
    backend = backends.get(model_id)
    if backend is None:
        known = ", ".join(sorted(backends))
        raise NotFoundError(
            f"model {quoted(model_id)} is not served by this node; it serves: {known}"
        )
    if backend.status is not ModelStatus.READY and not on_demand(model_id):
        raise NotReadyError(f"model {model_id!r} is {backend.status.value}; retry when it is ready")

    check_message_count(len(request.messages), config.max_messages, "this node's")
    size = len(request.prompt.encode()) + sum(len(m.content.encode()) for m in request.messages)
    size += len(request.continuation.encode()) + len(request.json_schema.encode())
    check_prompt_bytes(size, config.max_prompt_bytes, "this node's")
    messages = [Message(m.role, m.content) for m in request.messages]
    for index, message in enumerate(messages):
        if message.role not in ROLES:
            raise InvalidRequestError(
                f"messages[{index}].role {quoted(message.role)} is not one of {', '.join(sorted(ROLES))}"
            )
    if not messages and request.prompt.strip():
        messages = [Message("user", request.prompt)]
    if not request.raw and not any(m.content.strip() for m in messages):
        raise InvalidRequestError("the prompt is empty; give a prompt or at least one message")
    if request.raw and not request.prompt.strip():
        raise InvalidRequestError("the prompt is empty; a raw request needs a prompt")

    sampling = request.sampling
    context = backend.descriptor.context_length
    if context and len(request.continuation_token_ids) >= context:
        raise InvalidRequestError(
            f"continuation_token_ids has {len(request.continuation_token_ids)} ids, which do "
            f"not fit the model's context window of {context} tokens"
        )
    max_tokens = (
        sampling.max_tokens if sampling.HasField("max_tokens") else config.default_max_tokens
    )
    if max_tokens < 1:
        raise InvalidRequestError(f"max_tokens must be at least 1, got {max_tokens}")
    if context and max_tokens > context:
        raise InvalidRequestError(
            f"max_tokens {max_tokens} is larger than the model's context window of {context} tokens; "
            f"ask for at most {context}"
        )
    temperature = (
        sampling.temperature if sampling.HasField("temperature") else config.default_temperature
    )
    _check_range("temperature", temperature, 0.0, 2.0, "use 0 for deterministic output")
    top_p = sampling.top_p if sampling.HasField("top_p") else 0.95
    if not 0.0 < top_p <= 1.0:
        raise InvalidRequestError(f"top_p must be in (0, 1], got {top_p:g}")
    top_k = sampling.top_k if sampling.HasField("top_k") else 40
    if top_k < 0:
        raise InvalidRequestError(f"top_k must be 0 (off) or more, got {top_k}")
    if len(sampling.stop) > 8 or any(not s or len(s) > 64 for s in sampling.stop):
        raise InvalidRequestError("stop takes at most 8 non-empty strings of at most 64 characters")
    return backend, GenerationInput(
        messages=messages,
        prompt=request.prompt,
        raw=request.raw,
        continuation=request.continuation,
        continuation_token_ids=tuple(request.continuation_token_ids),
        json_schema=_checked_schema(request.json_schema),
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=sampling.seed if sampling.HasField("seed") else None,
        stop=tuple(sampling.stop),
    )


MIN_WAITING_REPORT_S = 0.05  # the most often a queued request says it still waits


async def _wait_reporting(ticket: Ticket, report_ms: int) -> AsyncIterator[None]:
    """Until `ticket` runs: one item on arrival and then every `report_ms` (0: none)."""
    if not report_ms:
        await ticket.wait()
        return
    every_s = max(MIN_WAITING_REPORT_S, report_ms / 1000)
    while not ticket.running:
        yield None
        await ticket.wait(every_s)


class NodeServicer(node_pb2_grpc.NodeServiceServicer):
    def __init__(
        self,
        identity: NodeIdentity,
        config: NodeConfig,
        backends: Mapping[str, Backend],
        hardware: HardwareInfo | None,
        admission: AdmissionController,
        agents: AgentHost | None = None,
        counts: TaskCounts | None = None,
        metrics: NodeMetrics | None = None,
        tracing: Tracing | None = None,
        models: ModelManager | None = None,
    ) -> None:
        self.identity = identity
        self.metrics = metrics if metrics is not None else NodeMetrics()
        # Spans of this node's part of each task (mesh/core/tracing.py), kept for GetTrace.
        self.tracing = tracing or Tracing(
            f"node {identity.name}",
            sample_ratio=config.trace_sample_ratio,
            otlp_endpoint=config.otlp_endpoint,
        )
        self.config = config
        self.backends = backends
        # What is resident, and loading on demand (no caps unless the daemon's config says).
        self.models = models or ModelManager(backends)
        self.hardware = hardware
        self.admission = admission
        # What this node did per task id (nodes/task_counts.py); Describe shows it on request.
        self.counts = counts if counts is not None else TaskCounts(kept=config.task_counts_kept)
        # Agents (nodes/agents): the ones offered, their tools and the data store.
        self.agents = (
            agents
            if agents is not None
            else AgentHost.from_config(config, backends, identity.node_id, counts=self.counts)
        )
        self.agents.runtime.on_demand = self.models.on_demand
        self.on_battery: Callable[[], bool] = on_battery  # replaced in tests
        self.metrics.watch(self._live_state)

    # ------------------------------------------------------------------ gRPC edge

    async def Describe(
        self, request: node_pb2.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.DescribeResponse:
        return self.describe(task_counts=request.task_counts)

    async def Generate(
        self, request: node_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.GenerateResponse:
        try:
            text: list[str] = []
            final = None
            parent = incoming_traceparent(context)
            async with contextlib.aclosing(self.generate(request, traceparent=parent)) as chunks:
                async for chunk in chunks:
                    if chunk.HasField("final"):
                        final = chunk.final
                    else:
                        text.append(chunk.text)
            assert final is not None  # generate() always ends with a final chunk
            final.text = "".join(text)
            return final
        except MeshError as error:
            await abort_with_error(context, error)

    async def GenerateStream(
        self, request: node_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[node_pb2.GenerateChunk]:
        try:
            parent = incoming_traceparent(context)
            async with contextlib.aclosing(self.generate(request, traceparent=parent)) as chunks:
                async for chunk in chunks:
                    yield chunk
        except MeshError as error:
            await abort_with_error(context, error)

    async def RunAgent(
        self, request: node_pb2.AgentRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[node_pb2.AgentEvent]:
        # Agents (nodes/agents): a whole agent task holds one admission slot. A request that
        # cannot run (forged steps, a raised step limit) is refused before it waits for one.
        task_id = request.task.task_id
        span = self.tracing.start(
            "node.agent",
            parent=incoming_traceparent(context),
            attributes={"attempt": request.task.attempt},
        )
        outcome = "cancelled"
        try:
            self.agents.check(request)
            span.set_attribute("agent", request.agent)  # one this node offers: checked
            async with self.admission.ticket() as ticket:
                async for _ in _wait_reporting(ticket, request.report_waiting_ms):
                    yield node_pb2.AgentEvent(waiting=True)
                async with self.models.use(self.agents.model_for(request)):
                    self.counts.record(task_id, TaskEvent.AGENT_RUN_STARTED)
                    async for event in self.agents.run(request):
                        if event.HasField("step"):
                            step = event.step
                            self.metrics.agent_step(
                                request.agent, step.kind, step.call.tool, step.error
                            )
                            step_spans(self.tracing, span, step)
                        if event.HasField("result"):
                            self.counts.record(task_id, TaskEvent.AGENT_RUN_COMPLETED)
                            outcome = "ok"
                        yield event
        except MeshError as error:
            outcome = error.grpc_code_name.lower()
            await abort_with_error(context, error)
        finally:
            fail_with(span, outcome)
            span.end()

    # Classifiers and tensor models (nodes/inference.py): no admission slot, the
    # ONNX backend bounds its own runs (a sub-millisecond route must not queue
    # behind a long generation).
    async def Classify(
        self, request: node_pb2.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.ClassifyResponse:
        try:
            router = self.config.router.id if self.config.router is not None else None
            return await inference.classify(request, self.backends, router)
        except MeshError as error:
            await abort_with_error(context, error)

    async def Infer(
        self, request: node_pb2.InferRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.InferResponse:
        try:
            return await inference.infer(request, self.backends)
        except MeshError as error:
            await abort_with_error(context, error)

    async def GetTrace(
        self, request: node_pb2.GetTraceRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.GetTraceResponse:
        if not valid_trace_id(request.trace_id):
            await abort_with_error(
                context, InvalidRequestError("trace_id must be 32 hex digits, not all zero")
            )
        spans = self.tracing.spans(request.trace_id)
        return node_pb2.GetTraceResponse(spans=spans_to_proto(spans))

    async def Heartbeat(
        self, request: node_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[node_pb2.HeartbeatBeat]:
        # Data on a coordinator's link while its calls run (see node.proto): no slot, no end
        # but the caller's cancel or deadline.
        interval_s = min(max(request.interval_ms, 50), 10_000) / 1000
        sequence = 0
        while True:
            yield node_pb2.HeartbeatBeat(sequence=sequence)
            sequence += 1
            await asyncio.sleep(interval_s)

    # ------------------------------------------------------------------ behaviour

    def load(self) -> node_pb2.Load:
        cpu, memory, _available = system_load()
        return node_pb2.Load(
            in_flight=self.admission.in_flight,
            queued=self.admission.queued,
            cpu_percent=cpu,
            memory_percent=memory,
            completed=self.admission.completed,
            rejected=self.admission.rejected,
        )

    def describe(self, *, task_counts: bool = False) -> node_pb2.DescribeResponse:
        reply = node_pb2.DescribeResponse(
            node=self._node_info(),
            hardware=self._hardware(),
            models=self._models(),
            load=self.load(),
            capacity=self._capacity(),
            agents=self.agents.agent_infos(),
        )
        if task_counts:
            reply.task_counts.extend(self.counts.to_proto())
            reply.task_counts_evicted = self.counts.evicted
        return reply

    def _node_info(self) -> node_pb2.NodeInfo:
        ident = self.identity
        return node_pb2.NodeInfo(
            node_id=ident.node_id,
            name=ident.name,
            cluster=ident.cluster,
            version=ident.version,
            protocol_version=ident.protocol_version,
            labels=dict(self.config.labels),
            started_at_unix_s=ident.started_at_unix_s,
        )

    def _hardware(self) -> node_pb2.Hardware | None:
        hw = self.hardware
        if hw is None:  # still probing at start
            return None
        _cpu, _memory, available = system_load()
        return node_pb2.Hardware(
            cpu_model=hw.cpu_model,
            physical_cores=hw.physical_cores,
            logical_cores=hw.logical_cores,
            cpu_max_mhz=hw.cpu_max_mhz,
            architecture=hw.architecture,
            memory_total_bytes=hw.memory_total_bytes,
            memory_available_bytes=available,
            os=hw.os,
            gpus=[
                node_pb2.Gpu(
                    vendor=g.vendor,
                    name=g.name,
                    memory_total_bytes=g.memory_total_bytes,
                    memory_used_bytes=g.memory_used_bytes,
                )
                for g in hw.gpus
            ],
            onnx_providers=list(hw.onnx_providers),
        )

    def _models(self) -> list[node_pb2.ModelInfo]:
        models = []
        for model_id, backend in self.backends.items():
            d = backend.descriptor
            info = node_pb2.ModelInfo(
                model_id=model_id,
                backend=d.backend,
                source=d.source,
                state=_MODEL_STATES[backend.status],
                size_bytes=d.size_bytes,
                context_length=d.context_length,
                is_default=model_id == self.config.default_model_id,
                error=backend.error,
                family=d.family,
                quantization=d.quantization,
                sha256=d.sha256,
                on_demand=self.models.on_demand(model_id),
            )
            measured = self.models.capability.get(model_id)
            if measured is not None:
                info.prompt_tokens_per_s = measured.prompt_tokens_per_s
                info.decode_tokens_per_s = measured.decode_tokens_per_s
            inference.describe_tensor_model(backend, info)  # task, inputs, outputs, labels
            models.append(info)
        return models

    def _capacity(self) -> node_pb2.Capacity:
        """What the node advertises: half its slots while on battery (nodes/capability.py)."""
        slots = battery_slots(self.admission.max_concurrent, self.on_battery())
        return node_pb2.Capacity(max_concurrent=slots, max_queued=self.admission.max_queued)

    def _live_state(self) -> tuple[int, int, int, dict[str, tuple[str, int]]]:
        models = {
            model_id: (backend.status.value, backend.descriptor.size_bytes)
            for model_id, backend in self.backends.items()
        }
        a = self.admission
        return a.in_flight, a.queued, a.rejected, models

    async def generate(
        self, request: node_pb2.GenerateRequest, *, traceparent: str = ""
    ) -> AsyncGenerator[node_pb2.GenerateChunk, None]:
        """Chunks of new text, then one chunk whose `final` carries usage and timing; each
        generation is counted in the node's metrics by model and outcome, and traced as a
        `node.generate` span (a child of `traceparent`, the caller's span, if any)."""
        model = self.metrics.models(request.model or self.config.default_model_id)
        span = self.tracing.start(
            "node.generate",
            parent=traceparent,
            attributes={"model": model, "attempt": request.task.attempt},
        )
        outcome = "cancelled"
        try:
            async with contextlib.aclosing(self._generate(request)) as chunks:
                async for chunk in chunks:
                    if chunk.HasField("final"):
                        outcome = "ok"
                        self._measured(chunk.final)
                        span.set_attributes(
                            {
                                "prompt_tokens": chunk.final.usage.prompt_tokens,
                                "completion_tokens": chunk.final.usage.completion_tokens,
                                "ttft_ms": round(chunk.final.timing.time_to_first_token_ms, 3),
                            }
                        )
                    yield chunk
        except MeshError as error:
            outcome = error.grpc_code_name.lower()
            raise
        finally:
            if outcome != "ok":
                self.metrics.requests.labels(model, outcome).inc()
            fail_with(span, outcome)
            span.end()

    def _measured(self, final: node_pb2.GenerateResponse) -> None:
        timing, usage = final.timing, final.usage
        rate = timing.tokens_per_second
        decode_s = (usage.completion_tokens - 1) / rate if rate > 0 else 0.0
        self.metrics.generation(
            self.metrics.models(final.model),
            "ok",
            prompt=usage.prompt_tokens,
            completion=usage.completion_tokens,
            ttft_s=timing.time_to_first_token_ms / 1000,
            decode_s=decode_s,
        )

    async def _generate(
        self, request: node_pb2.GenerateRequest
    ) -> AsyncGenerator[node_pb2.GenerateChunk, None]:
        backend, generation = to_generation_input(
            request, self.config, self.backends, on_demand=self.models.on_demand
        )
        arrived = time.perf_counter()
        index = 0
        async with self.admission.ticket() as ticket:
            async for _ in _wait_reporting(ticket, request.report_waiting_ms):
                yield node_pb2.GenerateChunk(waiting=True)
            async with self.models.use(backend.descriptor.model_id) as backend:
                self.counts.record(request.task.task_id, TaskEvent.GENERATION_STARTED)
                started = time.perf_counter()
                first_token_at = 0.0
                completion = Completion()
                leftover_tokens = 0
                try:
                    async with contextlib.aclosing(backend.stream(generation)) as pieces:
                        async for piece in pieces:
                            if piece.text:
                                first_token_at = first_token_at or time.perf_counter()
                                yield node_pb2.GenerateChunk(
                                    text=piece.text,
                                    index=index,
                                    tokens=piece.tokens,
                                    token_ids=piece.token_ids,
                                )
                                index += 1
                            if piece.completion is not None:
                                completion = piece.completion
                                leftover_tokens = piece.tokens  # sampled, but no text came of them
                finally:
                    if request.task.task_id:
                        logger.debug(
                            "task %s attempt %d on %s: %s",
                            request.task.task_id,
                            request.task.attempt,
                            backend.descriptor.model_id,
                            completion.finish_reason,
                        )
        done = time.perf_counter()
        decode_rate = (
            (completion.completion_tokens - 1) / completion.decode_s
            if completion.decode_s > 0 and completion.completion_tokens > 1
            else 0.0
        )
        final = node_pb2.GenerateResponse(
            finish_reason=completion.finish_reason,
            usage=node_pb2.Usage(
                prompt_tokens=completion.prompt_tokens,
                completion_tokens=completion.completion_tokens,
                total_tokens=completion.prompt_tokens + completion.completion_tokens,
            ),
            timing=node_pb2.Timing(
                queue_ms=(started - arrived) * 1000,
                time_to_first_token_ms=((first_token_at or done) - arrived) * 1000,
                total_ms=(done - arrived) * 1000,
                tokens_per_second=decode_rate,
            ),
            model=backend.descriptor.model_id,
            node_id=self.identity.node_id,
            task=request.task,
        )
        self.counts.record(
            request.task.task_id, TaskEvent.GENERATION_COMPLETED
        )  # before it is sent
        yield node_pb2.GenerateChunk(index=index, final=final, tokens=leftover_tokens)
