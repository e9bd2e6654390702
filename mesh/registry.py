"""The node registry: one table of nodes fed by mDNS and static addresses, verified over gRPC.

Usable without Ray:

    async with NodeRegistry(cluster="home", browser=MdnsBrowser()) as registry:
        async for event in registry.events():
            print(event.kind, event.view.name, event.view.address)

The rules live in `mesh.node_table.NodeTable` (pure, clock-injected); this module carries out
its actions: probes, health watches, channel clean-up, and fan-out of events to subscribers.

How fast a node that stops working is noticed depends on how it stops (defaults of
`RegistryTimings`; measured numbers in docs/BENCHMARKS.md):

- Graceful leave (SIGTERM): the health Watch turns NOT_SERVING and the mDNS goodbye arrives:
  suspect, then gone, in milliseconds.
- Process death (crash, kill -9, OOM) on a host that stays up: the host's kernel resets the
  connection, the health Watch stream breaks at once and one confirming probe is refused:
  gone well under a second (tens of milliseconds on a LAN): the "about a second" promise.
- Host vanishes (power loss, cable pulled, Wi-Fi gone, kernel panic): nothing resets the
  connection and no goodbye comes, so the Watch stream just goes quiet. The periodic load
  refresh (a Describe every `health_interval_s`) times out after `probe_timeout_s` and makes
  the node suspect; suspect for `suspect_timeout_s` without an answer makes it gone. Worst
  case 1 + 1 + 1.5 s + one 0.1 s tick = 3.6 s (`RegistryTimings.vanished_host_bound_s`);
  measured 3.6 s when the cable is pulled right after a refresh. gRPC keepalive (10 s on our
  channels) is slower still, and mDNS TTLs never help here.
- A slow node (probe timeouts while it still answers now and then) is suspect, not gone:
  retries keep probing it and the first answer makes it ready again.

A multi-homed node advertises every address it has; joining (and gone) nodes are probed at
each in turn (`address_timeout_s` each) and followed at the first that answers with the
advertised node id. A subscriber callback or a prober that raises is logged and never stops
the registry: each probe and watch always reports a result to the table, so no node is left
unwatched or unprobed.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from typing import Any

from mesh.core.records import NodeRecord
from mesh.discovery.browser import DiscoveryEvent, DiscoveryKind, MdnsBrowser
from mesh.health import GrpcProber, Prober, probe_in_order
from mesh.node_table import (
    Discard,
    NodeEvent,
    NodeTable,
    Probe,
    ProbeResult,
    ProbeStatus,
    RegistryTimings,
    StartWatch,
    Step,
    StopWatch,
)
from mesh.nodes_view import NodeSource, NodeState, NodeView

logger = logging.getLogger("mesh.registry")

EventCallback = Callable[[NodeEvent], None]
_REFUSALS_REMEMBERED = 2_000


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
        admit: Callable[[NodeRecord], str | None] | None = None,
    ) -> None:
        """`admit`: in a cluster, why an mDNS record may not even be probed (None: it may);
        a refused record is logged once and never enters the table."""
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
        self._admit = admit
        self._refused: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()
        # What was refused, newest last (each key and reason once): for the operator
        # (`GET /v1/mesh/refusals`), as a security event log.
        self.refusals: collections.deque[dict[str, object]] = collections.deque(maxlen=200)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start browsing and probing; on failure (e.g. ConfigError for a bad interface)
        everything started so far is stopped again before the error propagates."""
        self._running = True
        try:
            if self._browser is not None:
                await self._browser.start()
            for address in self._static:
                self.add_static(address)
            self._spawn(self._tick_loop(), "tick")
            if self._browser is not None:
                self._spawn(self._browse_loop(self._browser), "browse")
        except BaseException:
            await self.stop()
            raise

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
        refusal = self._admit(event.record) if self._admit is not None else None
        if refusal is not None:
            self._refuse(event.name, event.record.address, event.record.node_id, refusal)
            self._apply(self._table.withdraw(event.name, f"refused: {refusal}"))
            return
        self._apply(
            self._table.advertise(
                event.name,
                address=event.record.address,
                source=NodeSource.MDNS,
                record=event.record,
            )
        )
        if self._admit is not None:  # in a cluster, the table's refusals are security events
            why = self._table.rejection_of(event.name)
            record = event.record
            same_node = any(
                v.node_id == record.node_id and v.address == record.address
                for v in self._table.snapshot()
            )
            if why is not None and not same_node:
                self._refuse(event.name, record.address, record.node_id, f"rejected: {why}")

    def _refuse(self, key: str, address: str, node_id: str | None, reason: str) -> None:
        if (key, reason) in self._refused:
            self._refused.move_to_end((key, reason))
            return
        self._refused[(key, reason)] = None
        if len(self._refused) > _REFUSALS_REMEMBERED:  # random names must not grow it forever
            self._refused.popitem(last=False)
        logger.warning("ignoring %s at %s: %s", key, address, reason)
        self.refusals.append(
            {
                "at_unix_s": time.time(),
                "key": key,
                "address": address,
                "node_id": node_id or "",
                "reason": reason,
            }
        )

    def evict(self, node_ids: Iterable[str], reason: str) -> int:
        """Drop every entry of these node ids now (a revoked member); returns how many."""
        wanted = set(node_ids)
        dropped = 0
        for key in self._table.keys():  # noqa: SIM118 (a NodeTable, not a dict)
            view = self._table.view(key)
            if view is not None and view.node_id in wanted and view.state is not NodeState.GONE:
                self._refuse(key, view.address, view.node_id, f"dropped: {reason}")
                self._apply(self._table.withdraw(key, reason))
                dropped += 1
        return dropped

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
                task.add_done_callback(functools.partial(self._watch_done, action.key))
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
            try:
                callback(event)
            except Exception:  # subscriber code: its bug must not stop the tick/browse/watch
                logger.exception("registry subscriber %r failed on %s", callback, event.kind)

    async def _run_probe(self, action: Probe) -> None:
        try:
            if len(action.candidates) > 1:
                result = await probe_in_order(
                    self._prober,
                    action.key,
                    action.candidates,
                    node_id=action.node_id,
                    timeout_s=min(self.timings.probe_timeout_s, self.timings.address_timeout_s),
                )
            else:
                result = await self._prober.probe(
                    action.key,
                    action.address,
                    timeout_s=self.timings.probe_timeout_s,
                    refresh=action.refresh,
                    node_id=action.node_id,
                )
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the registry is stopping
            # grpc.aio raises CancelledError in a call whose channel was closed under it: the
            # entry went gone (Discard) while this probe was in flight. That is a probe with no
            # answer; reporting nothing would leave the entry "probing" for good, and a gone
            # node that comes back (its cable plugged in again) would never be probed again.
            result = ProbeResult(status=ProbeStatus.TIMEOUT, reason="probe cut: channel closed")
        except Exception as error:  # a prober bug: report a failed probe so the node is retried
            logger.exception("probing %s failed", action.address)
            result = ProbeResult(status=ProbeStatus.TIMEOUT, reason=f"probe failed: {error!r}")
        if result.status is ProbeStatus.INVALID:
            self._refuse(action.key, action.address, action.node_id, result.reason)
        if self._running:
            self._apply(self._table.probe_done(action.key, action.epoch, result))

    async def _run_watch(self, action: StartWatch) -> None:
        def on_status(serving: bool) -> None:
            self._apply(self._table.watch_status(action.key, action.epoch, serving=serving))

        reason: str | None = "watch ended"
        try:
            reason = await self._prober.watch(action.key, action.address, on_status)
        except asyncio.CancelledError:
            reason = None  # stopped on purpose (StopWatch, or the registry stopping)
            raise
        except Exception as error:  # a prober bug: the table must still hear the watch ended
            logger.exception("health watch of %s failed", action.address)
            reason = f"watch failed: {error!r}"
        finally:
            if self._watches.get(action.key) is asyncio.current_task():
                del self._watches[action.key]
            if reason is not None and self._running:
                self._apply(self._table.watch_broken(action.key, action.epoch, reason))

    def _watch_done(self, key: str, task: asyncio.Task[None]) -> None:
        if self._watches.get(key) is task:
            del self._watches[key]
        if not task.cancelled() and task.exception() is not None:
            logger.error("health watch task of %s failed", key, exc_info=task.exception())

    def _cancel_watch(self, key: str) -> None:
        task = self._watches.pop(key, None)
        if task is not None:
            task.cancel()

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.timings.tick_interval_s)
            try:
                self._apply(self._table.tick())
            except Exception:  # a bug in one tick must not stop timeouts and refreshes for good
                logger.exception("registry tick failed")

    async def _browse_loop(self, browser: MdnsBrowser) -> None:
        async for event in browser.events():
            try:
                self.handle_discovery(event)
            except Exception:  # one bad event must not stop discovery
                logger.exception(
                    "handling discovery event %s for %s failed", event.kind, event.name
                )

    def _spawn(self, coroutine: Coroutine[Any, Any, None], what: str) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
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
