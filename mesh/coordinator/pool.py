"""The node pool: the node table a dispatcher routes on, and everything measured about it.

    pool = NodePool(settings)
    pool.update(registry.snapshot())                   # whenever the node table changes
    view = await pool.choose(shape, exclude=tried, deadline_at=...)   # or NoNodeError
    async with pool.slot(view) as link:                # counted in flight while inside
        reply = await link.generate_request(request)
    pool.succeeded(view, duration_s, tokens)           # or pool.failed(view)

The pool owns the mechanism around routing: per-node links (one channel per node, closed when
the node is gone or moves), this dispatcher's in-flight counts so a node never gets more than it
advertised, cool-downs of nodes that keep failing, and the EWMA of ms/token that latency-aware
routing reads. Routing *policy* is `mesh.routing` (pure functions); `choose` applies it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from edgemesh.v1 import node_pb2
from mesh.coordinator.grpc_link import GrpcNodeLink
from mesh.coordinator.intent import ClassifierIndex
from mesh.coordinator.settings import DispatcherSettings
from mesh.core.channels import ChannelSecurity
from mesh.core.errors import MeshError, NotFoundError, OverloadedError, UnavailableError
from mesh.core.ids import NodeId
from mesh.core.pki import node_name
from mesh.core.tracing import SpanRecord, Tracing, spans_from_proto
from mesh.core.untrusted import printable, quoted
from mesh.nodes_view import NodeState, NodeView
from mesh.observe.metrics import CoordinatorMetrics
from mesh.routing import (
    CooldownTracker,
    Ewma,
    PolicyState,
    TaskShape,
    capacity_share,
    filter_candidates,
    ms_per_token,
    policy_by_name,
    prefer_warm,
    serves,
)

_POLL_S = 0.1  # re-check while waiting for capacity or a node (cool-downs end silently)
_MAX_NAMED = 4  # nodes or labels an error message names
_LABEL_CHARS = 32


class NodeLink(Protocol):
    """What the coordinator needs from a node; `GrpcNodeLink` is the real one."""

    async def generate_request(
        self, request: node_pb2.GenerateRequest, *, timeout_s: float | None = None
    ) -> node_pb2.GenerateResponse: ...

    def stream_request(
        self, request: node_pb2.GenerateRequest, *, timeout_s: float | None = None
    ) -> AsyncIterator[node_pb2.GenerateChunk]: ...

    def run_agent(
        self, request: node_pb2.AgentRequest, *, timeout_s: float | None = None
    ) -> AsyncIterator[node_pb2.AgentEvent]: ...

    async def classify(
        self, text: str, *, model: str = "", timeout_s: float | None = None
    ) -> node_pb2.ClassifyResponse: ...

    async def describe(self, *, timeout_s: float | None = None) -> node_pb2.DescribeResponse: ...

    async def get_trace(
        self, trace_id: str, *, timeout_s: float | None = None
    ) -> node_pb2.GetTraceResponse: ...

    async def close(self) -> None: ...


NodeConnector = Callable[[NodeView], NodeLink]


def connect_grpc(view: NodeView) -> NodeLink:
    """A GrpcNodeLink (`mesh.coordinator.grpc_link`) on one channel to the node."""
    return GrpcNodeLink(view.address)


def grpc_connector(security: ChannelSecurity) -> NodeConnector:
    """`connect_grpc` over mTLS (in a cluster): each link expects the certificate of the node
    id it was chosen as, so a link reaches that node or fails (UNAVAILABLE: another node)."""
    if not security.enabled:
        return connect_grpc

    def connect(view: NodeView) -> NodeLink:
        return GrpcNodeLink(view.address, security.expecting(node_name(view.node_id)))

    return connect


class _MeasuredFirst:
    """The EWMA of what a node took, or before its first answer what it measured itself
    (nodes/capability.py): latency-aware routing then starts without exploring."""

    def __init__(self, ewma: Ewma, measured: Mapping[NodeId, float]) -> None:
        self._ewma = ewma
        self._measured = measured

    def get(self, node_id: NodeId) -> float | None:
        known = self._ewma.get(node_id)
        return known if known is not None else self._measured.get(node_id)


class NoNodeReason(StrEnum):
    """Why `NodePool.choose` found no node for a task."""

    NONE = "none"  # no node serves it, and none is joining
    NOT_READY = "not ready"  # nodes serve it but none is ready yet
    COOLING = "cooling"  # every ready node is cooling down after failures
    TRIED = "tried"  # every usable node already failed this task once (never waited for)
    FULL = "full"  # every usable node is at its capacity


class NoNodeError(MeshError):
    """No node can take the task now; `reason` says why, `public()` is what a caller sees."""

    def __init__(self, message: str, *, reason: NoNodeReason, public: type[MeshError]) -> None:
        super().__init__(message, reason=reason)
        self.reason = reason
        self._public = public
        self.grpc_code_name = public.grpc_code_name

    def public(self, task_id: str) -> MeshError:
        """The error a caller gets when this ends a task before any attempt."""
        return self._public(self.message, task_id=task_id)


@dataclass(frozen=True, slots=True)
class NodeRow:
    """A node as ListNodes shows it: the registry's view plus what this dispatcher measured."""

    view: NodeView
    ewma_ms_per_token: float | None
    cooling_down: bool
    outstanding: int


def _share(view: NodeView, share: int) -> NodeView:
    """This dispatcher's part of a node's capacity (`mesh.routing.capacity_share`): rounded
    down, so a node with fewer slots than dispatchers is refused (RESOURCE_EXHAUSTED, the error
    says why) rather than overfilled; give it more `max_concurrent`/`max_queued`, or run fewer
    replicas."""
    if share <= 1:
        return view
    running, waiting = capacity_share(view.max_concurrent, view.max_queued, share)
    return view.model_copy(update={"max_concurrent": running, "max_queued": waiting})


def describe_shape(shape: TaskShape) -> str:
    """What a task asks for, as an error message names it."""
    what = quoted(shape.model) if shape.model else "the default model"
    if shape.agent:
        what = f"agent {quoted(shape.agent)}" + (
            f" on model {quoted(shape.model)}" if shape.model else ""
        )
    return what


def describe_labels(labels: Mapping[str, str], only: Collection[str] | None = None) -> str:
    """`site='shop', zone='a'`: caller-chosen text, each key and value cut short; `only` keeps
    the keys a task asks for."""
    items = [(k, v) for k, v in sorted(labels.items()) if only is None or k in only]
    shown = [f"{printable(k, _LABEL_CHARS)}={quoted(v, _LABEL_CHARS)}" for k, v in items]
    return ", ".join(shown[:_MAX_NAMED]) + (" ..." if len(shown) > _MAX_NAMED else "")


class NodePool:
    def __init__(
        self,
        settings: DispatcherSettings,
        *,
        connect: NodeConnector = connect_grpc,
        clock: Callable[[], float] = time.monotonic,
        metrics: CoordinatorMetrics | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings
        self.tracing = tracing or Tracing(
            "coordinator",
            sample_ratio=settings.trace_sample_ratio,
            otlp_endpoint=settings.otlp_endpoint,
            keep_traces=settings.traces_kept,
        )
        self.clock = clock
        self._connect = connect
        self._policy = policy_by_name(settings.policy)
        self._policy_state = PolicyState(seed=settings.seed)
        self.ewma = Ewma(settings.ewma_alpha)
        self.cooldowns = CooldownTracker(
            failures_before_cooldown=settings.failures_before_cooldown,
            cooldown_s=settings.cooldown_s,
            clock=clock,
        )
        self.classifiers = ClassifierIndex(clock=clock)  # `--agent auto`: who can Classify
        self._raw_views: list[NodeView] = []
        self._views: list[NodeView] = []
        self._by_id: dict[NodeId, NodeView] = {}
        self._links: dict[NodeId, tuple[str, NodeLink]] = {}
        self.outstanding: dict[NodeId, int] = {}
        self._changed = asyncio.Event()
        self._closing: set[asyncio.Task[None]] = set()
        self.metrics = metrics if metrics is not None else CoordinatorMetrics()
        self.metrics.watch_nodes(lambda: [view.state.value for view in self._raw_views])

    # ------------------------------------------------------------------ node table

    def update(self, views: Sequence[NodeView]) -> None:
        """Adopt a registry snapshot; links of nodes that are gone or moved are closed, and
        what was measured about nodes that are gone (EWMA, cool-downs) is forgotten."""
        known = set(self._by_id) | set(self.ewma.snapshot())
        self._raw_views = list(views)
        self._views = [_share(view, self.settings.capacity_share) for view in views]
        self._by_id = {view.node_id: view for view in self._views}
        for node_id in known:
            view = self._by_id.get(node_id)
            if view is None or view.state is NodeState.GONE:
                self.ewma.forget(node_id)
                self.cooldowns.forget(node_id)
        for node_id, (address, link) in list(self._links.items()):
            view = self._by_id.get(node_id)
            if view is None or view.state is NodeState.GONE or view.address != address:
                del self._links[node_id]
                self._close_later(link)
        self._wake()

    def views(self) -> list[NodeView]:
        """The node table this dispatcher routes on (capacity already shared among replicas)."""
        return self._views

    def rows(self) -> list[NodeRow]:
        cooling = self.cooldowns.cooling()
        return [
            NodeRow(
                view=view,
                ewma_ms_per_token=self.ewma.get(view.node_id),
                cooling_down=view.node_id in cooling,
                outstanding=self.outstanding.get(view.node_id, 0),
            )
            for view in self._raw_views
        ]

    def _ready(self) -> list[NodeView]:
        return [view for view in self._views if view.state is NodeState.READY]

    def agents(self) -> list[str]:
        """Agents offered by at least one ready node."""
        return sorted({agent for view in self._ready() for agent in view.agents})

    def models(self) -> list[str]:
        """Model aliases served by at least one ready node."""
        return sorted({model for view in self._ready() for model in view.models})

    def serves_ready(self, shape: TaskShape) -> bool:
        """Whether a ready node serves `shape` (capacity and cool-downs aside)."""
        return any(serves(view, shape) for view in self._ready())

    # ------------------------------------------------------------------ links and slots

    def link(self, view: NodeView) -> NodeLink:
        known = self._links.get(view.node_id)
        if known is not None and known[0] == view.address:
            return known[1]
        if known is not None:
            self._close_later(known[1])
        link = self._connect(view)
        self._links[view.node_id] = (view.address, link)
        return link

    async def node_spans(
        self, node_ids: Collection[NodeId], trace_id: str, *, timeout_s: float = 2.0
    ) -> list[SpanRecord]:
        """The spans that the nodes `node_ids` kept of one trace, asked all at once; a node
        that is gone, too old to say (UNIMPLEMENTED) or slow adds none."""

        async def ask(view: NodeView) -> list[SpanRecord]:
            try:
                reply = await self.link(view).get_trace(trace_id, timeout_s=timeout_s)
            except MeshError:  # gone, unreachable, older: its part is missing
                return []
            return spans_from_proto(reply.spans)

        views = [v for v in (self._by_id.get(n) for n in node_ids) if v is not None]
        found = await asyncio.gather(*(ask(view) for view in views))
        return [span for spans in found for span in spans]

    @contextlib.asynccontextmanager
    async def slot(self, view: NodeView) -> AsyncIterator[NodeLink]:
        """The node's link, with one request counted in flight on it while inside."""
        self.outstanding[view.node_id] = self.outstanding.get(view.node_id, 0) + 1
        try:
            yield self.link(view)
        finally:
            left = self.outstanding.get(view.node_id, 0) - 1
            if left > 0:
                self.outstanding[view.node_id] = left
            else:
                self.outstanding.pop(view.node_id, None)
            self._wake()

    def _close_later(self, link: NodeLink) -> None:
        task = asyncio.get_running_loop().create_task(link.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    # ------------------------------------------------------------------ what attempts teach

    def succeeded(
        self, node_id: NodeId, duration_s: float, tokens: int, shape: TaskShape | None = None
    ) -> None:
        """`node_id` answered a task (of `shape`: its caches are now warm for such tasks)."""
        self.cooldowns.record_success(node_id)
        if shape is not None:
            self._policy_state.remember(shape, node_id)
        sample = ms_per_token(duration_s, tokens)
        if sample is not None:
            self.ewma.update(node_id, sample)

    def failed(self, node_id: NodeId) -> None:
        """The node was at fault (not the request, not a busy node): it may cool down."""
        self.cooldowns.record_failure(node_id)

    # ------------------------------------------------------------------ choosing

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for_change(self, timeout_s: float) -> None:
        """Until the table or an in-flight count changes, or `timeout_s` passes."""
        try:
            async with asyncio.timeout(max(0.0, timeout_s)):
                await self._changed.wait()
        except TimeoutError:
            pass  # nothing changed; the caller re-checks (a cool-down may have ended)

    async def choose(
        self, shape: TaskShape, *, exclude: Collection[NodeId], deadline_at: float
    ) -> NodeView:
        """The node for the next attempt at a task of `shape`, never one in `exclude`; waits
        (within `deadline_at`) a while for capacity or a ready node, then raises NoNodeError."""
        waited_from = self.clock()
        while True:
            # The whole nodes (their load and slots rank them), each kept to our share.
            candidates = filter_candidates(
                self._raw_views,
                shape,
                exclude=exclude,
                cooling=self.cooldowns,
                ewma=_MeasuredFirst(self.ewma, self._measured_ms_per_token(shape)),
                outstanding=self.outstanding,
                share=self.settings.capacity_share,
            )
            if candidates and shape.model is not None:  # where the model is resident first
                loaded = {v.node_id for v in self._views if shape.model in v.loaded_models}
                candidates = prefer_warm(candidates, loaded)
            if candidates:
                node_id = self._policy(candidates, shape, self._policy_state)
                if node_id is not None:
                    self.metrics.routed(self.settings.policy)
                    return self._by_id[node_id]
            reason, limit_s = self._why_none(shape, exclude)
            now = self.clock()
            remaining, waited = deadline_at - now, now - waited_from
            if reason is NoNodeReason.TRIED or remaining <= 0 or waited >= limit_s:
                if reason is not NoNodeReason.TRIED:  # TRIED: the attempt loop waits, not a refusal
                    self.metrics.refused(reason.value)
                raise self._no_node(shape, reason)
            await self.wait_for_change(min(remaining, limit_s - waited, _POLL_S))

    def _measured_ms_per_token(self, shape: TaskShape) -> dict[NodeId, float]:
        """What nodes measured themselves (ms per token of the task's model, or of their
        default), for the nodes this dispatcher has no EWMA of yet."""
        priors = {}
        for view in self._raw_views:
            rate = view.decode_tokens_per_s.get(shape.model or view.default_model, 0.0)
            if rate > 0:
                priors[view.node_id] = 1000.0 / rate
        return priors

    def _why_none(
        self, shape: TaskShape, exclude: Collection[NodeId]
    ) -> tuple[NoNodeReason, float]:
        settings = self.settings
        serving = [view for view in self._views if serves(view, shape)]
        ready = [view for view in serving if view.state is NodeState.READY]
        if not ready:
            joining = any(view.state is NodeState.JOINING for view in self._views)
            if not serving and not joining:
                return NoNodeReason.NONE, 0.0
            return NoNodeReason.NOT_READY, settings.node_wait_s
        usable = [view for view in ready if view.node_id not in self.cooldowns]
        if not usable:
            return NoNodeReason.COOLING, settings.node_wait_s
        if all(view.node_id in exclude for view in usable):
            return NoNodeReason.TRIED, 0.0
        return NoNodeReason.FULL, settings.queue_timeout_s

    def _no_node(self, shape: TaskShape, reason: NoNodeReason) -> NoNodeError:
        what = describe_shape(shape)
        if reason is NoNodeReason.NONE:
            excluded = self._excluded_by_labels(shape)
            if excluded:
                subject = what if shape.agent else f"model {what}"
                message = (
                    f"no node with labels {describe_labels(shape.labels)} serves {subject}; "
                    f"the labels excluded {excluded}"
                )
            elif shape.agent:
                known = ", ".join(self.agents()) or "none"
                message = f"no node runs {what}; agents offered: {known}"
            else:
                known = ", ".join(self.models()) or "none"
                message = f"no node serves model {what}; ready models: {known}"
            return NoNodeError(message, reason=reason, public=NotFoundError)
        if reason is NoNodeReason.FULL:
            capacity = sum(
                view.max_concurrent + view.max_queued
                for view in self._ready()
                if serves(view, shape)
            )
            if capacity == 0:  # see _share
                message = (
                    f"the nodes serving {what} have fewer slots than the "
                    f"{self.settings.capacity_share} dispatcher replicas sharing them, so "
                    "none is sent any; run fewer replicas or give the nodes more "
                    "max_concurrent/max_queued"
                )
            else:
                message = (
                    f"the mesh is at capacity for {what}: {capacity} requests at once across "
                    "the nodes serving it are taken; retry later"
                )
            return NoNodeError(message, reason=reason, public=OverloadedError)
        message = f"no ready node serves {what} ({reason.value}); check `mesh nodes`"
        return NoNodeError(message, reason=reason, public=UnavailableError)

    def _excluded_by_labels(self, shape: TaskShape) -> str:
        """The ready nodes that serve `shape` but lack its labels, with the labels they have
        ("" when the labels exclude none, or the task asks for none)."""
        if not shape.labels:
            return ""
        unlabelled = TaskShape(model=shape.model, agent=shape.agent)
        views = [view for view in self._ready() if serves(view, unlabelled)]
        if not views:
            return ""
        shown = [
            f"{quoted(view.name)} ({describe_labels(view.labels, shape.labels) or 'none of them'})"
            for view in views[:_MAX_NAMED]
        ]
        more = f" and {len(views) - _MAX_NAMED} more" if len(views) > _MAX_NAMED else ""
        return f"{len(views)} ready node(s) serving it: {', '.join(shown)}{more}"

    async def close(self) -> None:
        links = [link for _address, link in self._links.values()]
        self._links.clear()
        await asyncio.gather(
            *(link.close() for link in links), *self._closing, return_exceptions=True
        )
        self.tracing.shutdown()
