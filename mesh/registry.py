"""The node registry: one table of nodes fed by mDNS and static addresses, verified over gRPC.

Usable without Ray:

    async with NodeRegistry(cluster="home", browser=MdnsBrowser()) as registry:
        async for event in registry.events():
            print(event.kind, event.view.name, event.view.address)

The rules live in `mesh.node_table.NodeTable` (pure, clock-injected); this module carries out
its actions: probes, health watches, channel clean-up, and fan-out of events to subscribers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable

from mesh.discovery.browser import DiscoveryEvent, DiscoveryKind, MdnsBrowser
from mesh.health import GrpcProber, Prober
from mesh.node_table import (
    Discard,
    NodeEvent,
    NodeTable,
    Probe,
    RegistryTimings,
    StartWatch,
    Step,
    StopWatch,
)
from mesh.nodes_view import NodeSource, NodeState, NodeView

logger = logging.getLogger("mesh.registry")

EventCallback = Callable[[NodeEvent], None]


class NodeRegistry:
    """Tracks nodes through joining -> ready -> suspect -> gone and tells subscribers."""

    def __init__(
        self,
        *,
        cluster: str | None = None,
        timings: RegistryTimings | None = None,
        static_addresses: Iterable[str] = (),
        browser: MdnsBrowser | None = None,
        prober: Prober | None = None,
        clock: Callable[[], float] = time.monotonic,
        event_queue_size: int = 10_000,
    ) -> None:
        self.timings = timings or RegistryTimings()
        self._table = NodeTable(clock=clock, timings=self.timings, cluster=cluster)
        self._static = list(static_addresses)
        self._browser = browser
        self._prober: Prober = prober or GrpcProber()
        self._tasks: set[asyncio.Task[None]] = set()
        self._watches: dict[str, asyncio.Task[None]] = {}
        self._queues: list[asyncio.Queue[NodeEvent]] = []
        self._callbacks: list[EventCallback] = []
        self._event_queue_size = event_queue_size
        self._changed = asyncio.Event()
        self._running = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._running = True
        for address in self._static:
            self.add_static(address)
        self._spawn(self._tick_loop(), "tick")
        if self._browser is not None:
            await self._browser.start()
            self._spawn(self._browse_loop(self._browser), "browse")

    async def stop(self) -> None:
        self._running = False
        tasks = [*self._tasks, *self._watches.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._watches.clear()
        if self._browser is not None:
            await self._browser.stop()
        await self._prober.close()

    async def __aenter__(self) -> NodeRegistry:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ inputs

    def add_static(self, address: str) -> None:
        """Track a node at a fixed `host:port` (from a topology or `--node`)."""
        if address not in self._static:
            self._static.append(address)
        self._apply(
            self._table.advertise(f"static:{address}", address=address, source=NodeSource.STATIC)
        )

    def handle_discovery(self, event: DiscoveryEvent) -> None:
        """Feed one mDNS event (the browse loop does this; tests and benchmarks may too)."""
        if event.kind is DiscoveryKind.REMOVED or event.record is None:
            self._apply(self._table.withdraw(event.name))
            return
        self._apply(
            self._table.advertise(
                event.name,
                address=event.record.address,
                source=NodeSource.MDNS,
                record=event.record,
            )
        )

    # ------------------------------------------------------------------ outputs

    def snapshot(self) -> list[NodeView]:
        """Every known node (all states); routing should keep only `NodeState.READY` ones."""
        return self._table.snapshot()

    def ready_nodes(self) -> list[NodeView]:
        return [view for view in self._table.snapshot() if view.state is NodeState.READY]

    def subscribe(self, callback: EventCallback) -> Callable[[], None]:
        """Call `callback(event)` on the event loop for each event; returns an unsubscribe."""
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback)

    async def events(self) -> AsyncIterator[NodeEvent]:
        """Events from now on, for as long as the caller iterates."""
        queue: asyncio.Queue[NodeEvent] = asyncio.Queue(self._event_queue_size)
        self._queues.append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._queues.remove(queue)

    async def wait_until(
        self, predicate: Callable[[list[NodeView]], bool], *, timeout_s: float
    ) -> list[NodeView]:
        """Wait until `predicate(snapshot)` holds; raises TimeoutError after `timeout_s`."""
        async with asyncio.timeout(timeout_s):
            while True:
                views = self._table.snapshot()
                if predicate(views):
                    return views
                self._changed.clear()
                await self._changed.wait()

    # ------------------------------------------------------------------ mechanism

    def _apply(self, step: Step) -> None:
        for action in step.actions:
            if isinstance(action, Probe):
                self._spawn(self._run_probe(action), f"probe {action.address}")
            elif isinstance(action, StartWatch):
                self._cancel_watch(action.key)
                task = asyncio.get_running_loop().create_task(self._run_watch(action))
                self._watches[action.key] = task
            elif isinstance(action, StopWatch):
                self._cancel_watch(action.key)
            elif isinstance(action, Discard):
                self._spawn(self._prober.discard(action.key), "discard")
        for event in step.events:
            self._publish(event)
        if step.events:
            self._changed.set()

    def _publish(self, event: NodeEvent) -> None:
        for queue in self._queues:
            if queue.full():  # a stalled subscriber loses its oldest event, not the registry
                queue.get_nowait()
            queue.put_nowait(event)
        for callback in list(self._callbacks):
            callback(event)

    async def _run_probe(self, action: Probe) -> None:
        result = await self._prober.probe(
            action.key, action.address, timeout_s=self.timings.probe_timeout_s
        )
        if self._running:
            self._apply(self._table.probe_done(action.key, action.epoch, result))

    async def _run_watch(self, action: StartWatch) -> None:
        def on_status(serving: bool) -> None:
            self._apply(self._table.watch_status(action.key, action.epoch, serving=serving))

        reason = await self._prober.watch(action.key, action.address, on_status)
        if self._watches.get(action.key) is asyncio.current_task():
            del self._watches[action.key]
        if self._running:
            self._apply(self._table.watch_broken(action.key, action.epoch, reason))

    def _cancel_watch(self, key: str) -> None:
        task = self._watches.pop(key, None)
        if task is not None:
            task.cancel()

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.timings.tick_interval_s)
            self._apply(self._table.tick())

    async def _browse_loop(self, browser: MdnsBrowser) -> None:
        async for event in browser.events():
            self.handle_discovery(event)

    def _spawn(self, coroutine: object, what: str) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._task_done(t, what))

    def _task_done(self, task: asyncio.Task[None], what: str) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            logger.error("registry task %s failed", what, exc_info=error)


async def wait_for_state(
    registry: NodeRegistry, node_id: str, state: NodeState, *, timeout_s: float
) -> NodeView:
    """Wait until node `node_id` is in `state`; raises TimeoutError."""
    views = await registry.wait_until(
        lambda vs: any(v.node_id == node_id and v.state is state for v in vs),
        timeout_s=timeout_s,
    )
    return next(v for v in views if v.node_id == node_id)
