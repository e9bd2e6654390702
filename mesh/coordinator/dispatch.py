"""The dispatch mechanism: pick a node, call it, retry elsewhere, keep the ledger. No Ray here.

    dispatcher = Dispatcher(DispatcherSettings(policy="least_loaded"))
    dispatcher.update_nodes(registry.snapshot())      # whenever the node table changes
    result = await dispatcher.submit(task)            # one answer, or one MeshError
    async for item in dispatcher.stream(task):        # str pieces, then the TaskResult
        ...

Routing *policy* is `mesh.routing` (pure functions); this module is the mechanism around it:
per-node channels (one per node, closed when the node is gone), local in-flight counts so a node
never gets more than it advertised, per-attempt timeouts within the task's deadline, cool-downs
of nodes that keep failing, the EWMA of ms/token that latency-aware routing reads, and the
bounded task ledger behind DescribeTask and idempotency. One task's retry loop is in `_run.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from edgemesh.v1 import node_pb2
from mesh.agent_client import run_agent_request
from mesh.client import NodeClient
from mesh.coordinator._agent_run import AgentItem, AgentRun
from mesh.coordinator._run import TaskRun
from mesh.coordinator.intent import ClassifierIndex
from mesh.coordinator.settings import DispatcherSettings
from mesh.coordinator.shared_tasks import DirectoryClient, SharedTasks
from mesh.coordinator.tasks import (
    LedgerEntry,
    TaskLedger,
    TaskRecord,
    TaskResult,
    TaskSpec,
    TaskState,
    check_deadline_s,
    check_max_tokens,
)
from mesh.errors import MeshError, NotFoundError, OverloadedError, UnavailableError
from mesh.ids import NodeId
from mesh.nodes_view import NodeState, NodeView
from mesh.routing import (
    CooldownTracker,
    Ewma,
    PolicyState,
    capacity_share,
    filter_candidates,
    policy_by_name,
    serves,
)

logger = logging.getLogger("mesh.coordinator")

_POLL_S = 0.1  # re-check while waiting for capacity or a node (cool-downs end silently)
_RETRY_PAUSE_S = 0.05  # per attempt made, before trying nodes that already failed this task


class NodeLink(Protocol):
    """What the dispatcher needs from a node; `mesh.client.NodeClient` is the real one."""

    async def generate_request(
        self, request: node_pb2.GenerateRequest, *, timeout_s: float | None = None
    ) -> node_pb2.GenerateResponse: ...

    def stream_request(
        self, request: node_pb2.GenerateRequest, *, timeout_s: float | None = None
    ) -> AsyncIterator[node_pb2.GenerateChunk]: ...

    async def close(self) -> None: ...


NodeConnector = Callable[[NodeView], NodeLink]


class GrpcNodeLink(NodeClient):
    """A NodeClient plus the agent RPC (`mesh.agent_client`): the real NodeLink and AgentLink."""

    def run_agent(
        self, request: node_pb2.AgentRequest, *, timeout_s: float | None = None
    ) -> AsyncIterator[node_pb2.AgentEvent]:
        return run_agent_request(self, request, timeout_s=timeout_s)


def connect_grpc(view: NodeView) -> NodeLink:
    """A GrpcNodeLink on one channel (from `mesh.channels.create_channel`) to the node."""
    return GrpcNodeLink(view.address)


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


class Dispatcher:
    def __init__(
        self,
        settings: DispatcherSettings | None = None,
        *,
        connect: NodeConnector = connect_grpc,
        clock: Callable[[], float] = time.monotonic,
        directory: DirectoryClient | None = None,
    ) -> None:
        """`directory`: the task directory shared with other replicas (none with one replica)."""
        self.settings = settings = settings or DispatcherSettings()
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
        self.ledger = TaskLedger(settings.ledger_size, clock=clock)
        self.shared: SharedTasks | None = None
        if directory is not None:
            self.shared = SharedTasks(
                directory, self.ledger, default_deadline_s=settings.deadline_s
            )
        self.classifiers = ClassifierIndex(clock=clock)  # `--agent auto`: who can Classify
        self._raw_views: list[NodeView] = []
        self._views: list[NodeView] = []
        self._by_id: dict[NodeId, NodeView] = {}
        self._links: dict[NodeId, tuple[str, NodeLink]] = {}
        self.outstanding: dict[NodeId, int] = {}
        self._closed = False
        self._changed = asyncio.Event()
        self._closing: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ node table

    def update_nodes(self, views: Sequence[NodeView]) -> None:
        """Adopt a registry snapshot; channels of nodes that are gone or moved are closed, and
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

    def node_rows(self) -> list[NodeRow]:
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

    def views(self) -> list[NodeView]:
        """The node table this dispatcher routes on (capacity already shared among replicas)."""
        return self._views

    def agents(self) -> list[str]:
        """Agents offered by at least one ready node."""
        return sorted(
            {
                agent
                for view in self._views
                if view.state is NodeState.READY
                for agent in view.agents
            }
        )

    def models(self) -> list[str]:
        """Model aliases served by at least one ready node."""
        return sorted(
            {
                model
                for view in self._views
                if view.state is NodeState.READY
                for model in view.models
            }
        )

    def link(self, view: NodeView) -> NodeLink:
        known = self._links.get(view.node_id)
        if known is not None and known[0] == view.address:
            return known[1]
        if known is not None:
            self._close_later(known[1])
        link = self._connect(view)
        self._links[view.node_id] = (view.address, link)
        return link

    def _close_later(self, link: NodeLink) -> None:
        task = asyncio.get_running_loop().create_task(link.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    # ------------------------------------------------------------------ in-flight accounting

    def acquire(self, node_id: NodeId) -> None:
        self.outstanding[node_id] = self.outstanding.get(node_id, 0) + 1

    def release(self, node_id: NodeId) -> None:
        left = self.outstanding.get(node_id, 0) - 1
        if left > 0:
            self.outstanding[node_id] = left
        else:
            self.outstanding.pop(node_id, None)
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_for_change(self, timeout_s: float) -> None:
        try:
            async with asyncio.timeout(max(0.0, timeout_s)):
                await self._changed.wait()
        except TimeoutError:
            pass  # nothing changed; the caller re-checks (a cool-down may have ended)

    # ------------------------------------------------------------------ choosing

    async def choose(self, run: TaskRun) -> NodeView:
        """The node for the next attempt of `run`; waits briefly for capacity or a ready node."""
        waited_from = self.clock()
        while True:
            # The whole nodes (their load and slots rank them), each kept to our share.
            candidates = filter_candidates(
                self._raw_views,
                run.shape,
                exclude=run.tried,
                cooling=self.cooldowns,
                ewma=self.ewma,
                outstanding=self.outstanding,
                share=self.settings.capacity_share,
            )
            if candidates:
                node_id = self._policy(candidates, run.shape, self._policy_state)
                if node_id is not None:
                    return self._by_id[node_id]
            reason, limit_s = self._why_none(run)
            if reason == "tried":  # every usable node failed once: they may be tried again,
                run.tried.clear()  # after a pause that grows with the attempts made
                await self._wait_for_change(
                    min(run.remaining_s(), _RETRY_PAUSE_S * len(run.attempts))
                )
                continue
            now = self.clock()
            remaining = run.deadline_at - now
            waited = now - waited_from
            if remaining <= 0 or waited >= limit_s:
                raise self._no_node_error(run, reason, remaining)
            await self._wait_for_change(min(remaining, limit_s - waited, _POLL_S))

    def _why_none(self, run: TaskRun) -> tuple[str, float]:
        settings = self.settings
        serving = [view for view in self._views if serves(view, run.shape)]
        ready = [view for view in serving if view.state is NodeState.READY]
        if not ready:
            joining = any(view.state is NodeState.JOINING for view in self._views)
            if not serving and not joining:
                return "none", 0.0
            return "not_ready", settings.node_wait_s
        usable = [view for view in ready if view.node_id not in self.cooldowns]
        if not usable:
            return "cooling", settings.node_wait_s
        if all(view.node_id in run.tried for view in usable):
            return "tried", 0.0
        return "full", settings.queue_timeout_s

    def _no_node_error(self, run: TaskRun, reason: str, remaining_s: float) -> MeshError:
        shape = run.shape
        what = repr(shape.model) if shape.model else "the default model"
        if shape.agent:
            what = f"agent {shape.agent!r}" + (f" on model {shape.model!r}" if shape.model else "")
        if remaining_s <= 0:
            return run.deadline_exceeded()
        if run.attempts:
            return run.failure(f"no other node can take it ({reason.replace('_', ' ')})")
        if reason == "none":
            if shape.agent:
                known = ", ".join(self.agents()) or "none"
                return NotFoundError(f"no node runs {what}; agents offered: {known}")
            known = ", ".join(self.models()) or "none"
            return NotFoundError(f"no node serves model {what}; ready models: {known}")
        if reason == "full":
            capacity = sum(
                view.max_concurrent + view.max_queued
                for view in self._views
                if serves(view, run.shape) and view.state is NodeState.READY
            )
            if capacity == 0:  # see _share
                return OverloadedError(
                    f"the nodes serving {what} have fewer slots than the "
                    f"{self.settings.capacity_share} dispatcher replicas sharing them, so "
                    "none is sent any; run fewer replicas or give the nodes more "
                    "max_concurrent/max_queued",
                    task_id=run.task.task_id,
                )
            return OverloadedError(
                f"the mesh is at capacity for {what}: {capacity} requests at once across the "
                "nodes serving it are taken; retry later",
                task_id=run.task.task_id,
            )
        return UnavailableError(
            f"no ready node serves {what} ({reason.replace('_', ' ')}); check `mesh nodes`",
            task_id=run.task.task_id,
        )

    # ------------------------------------------------------------------ tasks

    async def _begin(self, task: TaskSpec) -> tuple[LedgerEntry, TaskRun | None]:
        """The task's ledger entry and the run that will answer it. No run when another replica
        ran or runs the same key: the entry then holds that run's outcome."""
        entry = self.ledger.begin(task)
        if self.shared is not None:
            runnable = await self.shared.claim_or_wait(task, entry)
            if runnable is None:
                return entry, None
            task = runnable  # its deadline less the time spent waiting for another replica
        try:
            run = AgentRun(self, task, entry) if task.agent else TaskRun(self, task, entry)
        except MeshError as error:  # e.g. an agent task with no user message
            self.ledger.fail(entry, error, ())
            raise
        return entry, run

    async def submit(self, task: TaskSpec) -> TaskResult:
        """Run `task` to one answer, retrying elsewhere on failure; raises one MeshError."""
        _check(task)
        while (existing := self.ledger.find(task.dedup_key)) is not None:
            try:
                return await self._replay(existing)
            except asyncio.CancelledError:
                if not self._run_again(existing):
                    raise
        entry, run = await self._begin(task)
        if run is None:
            return await self._replay(entry)
        try:
            result = await run.unary()
        except MeshError as error:
            self.ledger.fail(entry, error, tuple(run.attempts))
            raise
        except asyncio.CancelledError:
            self.ledger.abandon(entry, tuple(run.attempts))
            raise
        self.ledger.succeed(entry, result)
        return result

    async def stream(self, task: TaskSpec) -> AsyncIterator[AgentItem]:
        """Text pieces as they come, then the TaskResult; a broken stream continues elsewhere.
        Agent tasks also yield each step (`node_pb2.AgentStep`) as the node completes it."""
        _check(task)
        while (existing := self.ledger.find(task.dedup_key)) is not None:
            try:
                result = await self._replay(existing)
            except asyncio.CancelledError:
                if not self._run_again(existing):
                    raise
                continue
            if result.text:
                yield result.text
            yield result
            return
        entry, run = await self._begin(task)
        if run is None:
            result = await self._replay(entry)
            if result.text:
                yield result.text
            yield result
            return
        try:
            # Closed as soon as this generator is: the attempt is cancelled and its slot freed
            # at once (not when the garbage collector finds it), and recorded as CANCELLED.
            async with contextlib.aclosing(run.stream()) as items:
                async for item in items:
                    if isinstance(item, TaskResult):
                        self.ledger.succeed(entry, item)
                    yield item
        except MeshError as error:
            self.ledger.fail(entry, error, tuple(run.attempts))
            raise
        except (asyncio.CancelledError, GeneratorExit):
            if entry.state is TaskState.RUNNING:
                self.ledger.abandon(entry, tuple(run.attempts))
            raise

    async def _replay(self, entry: LedgerEntry) -> TaskResult:
        if entry.state is TaskState.DONE and entry.result is not None:
            return entry.result
        if entry.state is TaskState.FAILED and entry.error is not None:
            raise entry.error
        return await asyncio.shield(entry.future)

    def _run_again(self, entry: LedgerEntry) -> bool:
        """After a wait on `entry` ended in CancelledError: whether the task should run afresh
        for this caller because the caller that ran it went away (not this caller)."""
        current = asyncio.current_task()
        if not entry.future.cancelled() or (current is not None and current.cancelling()):
            return False
        if self._closed:
            raise UnavailableError("the coordinator is shutting down")
        return True

    async def describe_task(self, task_id: str) -> TaskRecord:
        """The task's record, from this replica's ledger or, with several replicas, any's."""
        if self.shared is not None:
            return await self.shared.record(task_id)
        return self.ledger.record(task_id)

    async def close(self) -> None:
        self._closed = True
        links = [link for _address, link in self._links.values()]
        self._links.clear()
        await asyncio.gather(
            *(link.close() for link in links), *self._closing, return_exceptions=True
        )
        if self.shared is not None:
            await self.shared.close()
        self.ledger.close()


def _check(task: TaskSpec) -> None:
    """InvalidRequestError for limits no node could honour (the ingresses check them first)."""
    check_deadline_s(task.deadline_s)
    sampling = task.request.sampling
    check_max_tokens(sampling.max_tokens if sampling.HasField("max_tokens") else None)
