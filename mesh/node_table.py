"""The node registry's state machine: pure, clock-injected, no sockets.

Inputs are facts (a node was advertised or withdrawn, a probe or the health watch reported
something, time passed); outputs are `Step`s: actions for the mechanism to carry out (probe,
watch, discard a channel) and events for subscribers. `mesh.registry.NodeRegistry` wires this
to mDNS and gRPC; tests drive it directly with a fake clock.

    joining --probe ok--> ready --watch broken / not serving / refresh failed--> suspect
    suspect --probe ok--> ready      suspect --unreachable or suspect_timeout_s--> gone
    joining --join_timeout_s--> gone     any --mDNS goodbye--> gone
    gone --re-advertised (new address or incarnation), or a periodic re-probe ok--> ready
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypedDict

from mesh.core.ids import NodeId
from mesh.core.records import PROTOCOL_VERSION, NodeRecord
from mesh.nodes_view import NodeSource, NodeState, NodeView
from mesh.registry_types import (
    Action,
    Discard,
    EventKind,
    NodeDetails,
    NodeEvent,
    Probe,
    ProbeResult,
    ProbeStatus,
    RegistryTimings,
    Rejection,
    StartWatch,
    Step,
    StopWatch,
)

__all__ = [
    "Action",
    "Discard",
    "EventKind",
    "NodeDetails",
    "NodeEvent",
    "NodeTable",
    "Probe",
    "ProbeResult",
    "ProbeStatus",
    "RegistryTimings",
    "Rejection",
    "StartWatch",
    "Step",
    "StopWatch",
]

logger = logging.getLogger("mesh.registry")


@dataclass
class _Entry:
    key: str  # mDNS service name, or "static:<address>"
    source: NodeSource
    address: str  # the address in use: the first advertised one, or the one that answered
    since_s: float
    record: NodeRecord | None = None
    node_id: NodeId | None = None
    candidates: tuple[str, ...] = ()  # every advertised address (host:port), in order
    duplicate_of: NodeId | None = None  # quietly or loudly rejected as a copy of this node id
    details: NodeDetails | None = None
    state: NodeState = NodeState.JOINING
    last_seen_s: float = 0.0
    epoch: int = 0
    advertised: bool = True
    probing_epoch: int | None = None
    watching: bool = False
    next_probe_s: float | None = None
    failures: int = 0
    next_refresh_s: float = 0.0
    rejected: Rejection | None = None
    announced: bool = False  # subscribers have heard of it (so a rejection must say gone)


class NodeTable:
    """Every node the registry knows of, and the rules that move them between states."""

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        timings: RegistryTimings | None = None,
        cluster: str | None = None,
    ) -> None:
        self._clock = clock
        self.timings = timings or RegistryTimings()
        self.cluster = cluster  # None accepts every cluster (e.g. `mesh discover`)
        self._entries: dict[str, _Entry] = {}
        self._warned: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------ inputs

    def advertise(
        self, key: str, *, address: str, source: NodeSource, record: NodeRecord | None = None
    ) -> Step:
        """A node is advertised (mDNS added/updated) or listed statically at `address`.

        A record may name several addresses (a multi-homed node); `address` is the first to try.
        """
        now = self._clock()
        step = Step()
        candidates = _candidates(address, record)
        entry = self._entries.get(key)
        is_new = entry is None
        if entry is None:
            entry = _Entry(
                key=key,
                source=source,
                address=address,
                since_s=now,
                record=record,
                candidates=candidates,
            )
            entry.node_id = record.node_id if record else None
            self._entries[key] = entry
        else:
            old = entry.record
            readdressed = set(candidates) != set(entry.candidates)
            moved = (
                readdressed
                or not entry.advertised
                or (
                    record is not None and old is not None and record.incarnation != old.incarnation
                )
                or (record is not None and old is not None and record.node_id != old.node_id)
            )
            entry.record = record or entry.record
            entry.advertised = True
            entry.candidates = candidates
            if not moved:
                return step
            entry.epoch += 1
            if entry.address not in candidates:  # keep the address that answered if still listed
                entry.address = address
            entry.node_id = record.node_id if record else entry.node_id
            entry.rejected = None
            entry.duplicate_of = None
            entry.failures = 0
            self._stop_watch(entry, step)
            if readdressed:
                step.actions.append(Discard(key))  # close channels to addresses no longer listed
            if entry.state is not NodeState.JOINING:
                self._move(entry, NodeState.JOINING, "re-advertised", step)
        if record is not None and self.cluster is not None and record.cluster != self.cluster:
            self._reject(entry, Rejection.CLUSTER, f"cluster {record.cluster!r}", step)
            return step
        if entry.node_id is not None and self._duplicate_check(entry, step):
            return step
        if is_new and self._visible(entry):
            step.events.append(self._event(entry, EventKind.JOINING, "advertised"))
        self._probe(entry, step)
        return step

    def withdraw(self, key: str, reason: str = "left") -> Step:
        """The node said goodbye (mDNS removal)."""
        step = Step()
        entry = self._entries.get(key)
        if entry is None:
            return step
        entry.advertised = False
        entry.epoch += 1  # results of probes in flight no longer count
        self._stop_watch(entry, step)
        if entry.state is not NodeState.GONE:
            self._move(entry, NodeState.GONE, reason, step)
        step.actions.append(Discard(key))
        return step

    def probe_done(self, key: str, epoch: int, result: ProbeResult) -> Step:
        """A probe (Describe + health check) issued for `epoch` finished."""
        step = Step()
        entry = self._entries.get(key)
        if entry is None:
            return step
        if entry.probing_epoch == epoch:
            entry.probing_epoch = None
        if epoch != entry.epoch or entry.rejected is not None:
            return step
        now = self._clock()
        if result.status is ProbeStatus.OK and result.details is not None:
            self._probe_ok(entry, result.details, step, answered_at=result.address)
        elif result.status is ProbeStatus.INVALID:
            self._reject(entry, Rejection.INVALID, result.reason, step)
        elif result.status is ProbeStatus.NOT_SERVING:
            entry.last_seen_s = now
            if entry.state is NodeState.READY:
                self._move(entry, NodeState.SUSPECT, "not serving", step)
            self._retry_later(entry)
        elif result.status is ProbeStatus.UNREACHABLE and entry.state is NodeState.READY:
            self._move(entry, NodeState.SUSPECT, result.reason or "unreachable", step)
            self._probe(entry, step)  # confirm at once: a crash must be gone within a second
        elif result.status is ProbeStatus.UNREACHABLE and entry.state is NodeState.SUSPECT:
            self._go(entry, result.reason or "unreachable", step)
        elif entry.state is NodeState.READY:  # TIMEOUT: slow, not proven dead
            self._move(entry, NodeState.SUSPECT, result.reason or "probe timed out", step)
            self._retry_later(entry)
        else:
            self._retry_later(entry)
            self._log_once(entry, "probe", "%s at %s does not answer: %s", result.reason)
        return step

    def watch_status(self, key: str, epoch: int, *, serving: bool) -> Step:
        """The node's health Watch stream reported SERVING or something else."""
        step = Step()
        entry = self._entries.get(key)
        if entry is None or epoch != entry.epoch or entry.rejected is not None:
            return step
        entry.last_seen_s = self._clock()
        if serving and entry.state is NodeState.SUSPECT:
            self._probe(entry, step)
        elif not serving and entry.state is NodeState.READY:
            self._move(entry, NodeState.SUSPECT, "not serving", step)
            self._retry_later(entry)
        return step

    def watch_broken(self, key: str, epoch: int, reason: str) -> Step:
        """The node's health Watch stream ended or failed: suspect at once, then probe."""
        step = Step()
        entry = self._entries.get(key)
        if entry is None or epoch != entry.epoch:
            return step
        entry.watching = False
        if entry.state is NodeState.READY:
            self._move(entry, NodeState.SUSPECT, f"health watch broke: {reason}", step)
        if entry.state is NodeState.SUSPECT:
            self._probe(entry, step)
        return step

    def tick(self) -> Step:
        """Time passed: refresh ready nodes, retry probes, time out joining/suspect, forget."""
        now = self._clock()
        step = Step()
        t = self.timings
        for entry in list(self._entries.values()):
            if entry.rejected is Rejection.DUPLICATE:
                self._readmit_duplicate(entry, now, step)
            if entry.rejected is not None:
                continue
            age = now - entry.since_s
            due = entry.next_probe_s is not None and now >= entry.next_probe_s
            if entry.state is NodeState.READY:
                if now >= entry.next_refresh_s and entry.probing_epoch is None:
                    entry.next_refresh_s = now + t.health_interval_s
                    entry.probing_epoch = entry.epoch
                    step.actions.append(Probe(entry.key, entry.address, entry.epoch, refresh=True))
            elif entry.state is NodeState.JOINING and age > t.join_timeout_s:
                self._go(entry, f"no answer for {t.join_timeout_s:g} s", step)
            elif entry.state is NodeState.SUSPECT and age > t.suspect_timeout_s:
                self._go(entry, f"suspect for {t.suspect_timeout_s:g} s", step)
            elif entry.state is NodeState.GONE and not entry.advertised:
                if entry.source is NodeSource.MDNS and age > t.forget_after_s:
                    del self._entries[entry.key]
            elif due:
                self._probe(entry, step)
        return step

    # ------------------------------------------------------------------ outputs

    def snapshot(self) -> list[NodeView]:
        """Every node with a known identity that was not rejected, in a stable order."""
        views = [self._view(e) for e in self._entries.values() if self._visible(e)]
        return sorted(views, key=lambda v: (v.name, v.node_id))

    def view(self, key: str) -> NodeView | None:
        entry = self._entries.get(key)
        return self._view(entry) if entry is not None and self._visible(entry) else None

    def state_of(self, key: str) -> NodeState | None:
        entry = self._entries.get(key)
        return None if entry is None else entry.state

    def rejection_of(self, key: str) -> Rejection | None:
        entry = self._entries.get(key)
        return None if entry is None else entry.rejected

    def keys(self) -> list[str]:
        return list(self._entries)

    # ------------------------------------------------------------------ rules

    def _probe_ok(
        self, entry: _Entry, details: NodeDetails, step: Step, *, answered_at: str = ""
    ) -> None:
        now = self._clock()
        if entry.record is not None and details.node_id != entry.record.node_id:
            self._reject(entry, Rejection.IDENTITY, f"answers as {details.node_id}", step)
            return
        if details.protocol_version not in (0, PROTOCOL_VERSION):
            self._reject(entry, Rejection.PROTOCOL, f"protocol {details.protocol_version}", step)
            return
        if self.cluster is not None and details.cluster and details.cluster != self.cluster:
            self._reject(entry, Rejection.CLUSTER, f"cluster {details.cluster!r}", step)
            return
        first_identity = entry.node_id is None
        entry.node_id = details.node_id
        if (first_identity or entry.state is not NodeState.READY) and self._duplicate_check(
            entry, step
        ):
            if first_identity:
                entry.node_id = None  # stays invisible; `duplicate_of` keeps the id
            return
        if answered_at and answered_at != entry.address and answered_at in entry.candidates:
            logger.info(
                "node %s answers at %s, not %s", details.node_id, answered_at, entry.address
            )
            self._stop_watch(entry, step)  # follow the node on the address that answers
            entry.address = answered_at
        before = self._view(entry) if entry.details is not None else None
        entry.details = details
        entry.last_seen_s = now
        entry.failures = 0
        entry.next_probe_s = None
        entry.next_refresh_s = now + self.timings.health_interval_s
        if entry.state is not NodeState.READY:
            self._move(entry, NodeState.READY, "describe and health ok", step)
        elif before is not None and _load_key(before) != _load_key(self._view(entry)):
            step.events.append(self._event(entry, EventKind.UPDATED, "load"))
        if not entry.watching:
            entry.watching = True
            step.actions.append(StartWatch(entry.key, entry.address, entry.epoch))

    def _duplicate_check(self, entry: _Entry, step: Step) -> bool:
        """Reject `entry` if another live entry already holds its node id; True if rejected.

        The entry is looked at again once the holder is gone (see `_readmit_duplicate`), after
        a backoff, so a node listed twice is never probed on every tick.
        """
        assert entry.node_id is not None
        holder = self._holder(entry.node_id, besides=entry)
        if holder is None:
            return False
        entry.duplicate_of = entry.node_id
        self._retry_later(entry)
        if holder.address == entry.address or entry.address in holder.candidates:
            # The same node reached two ways (static list and mDNS): keep the first, quietly.
            self._stop_watch(entry, step)
            if entry.announced and entry.state is not NodeState.GONE:
                self._move(entry, NodeState.GONE, f"same node as {holder.key}", step)
            entry.rejected = Rejection.DUPLICATE
            return True
        self._reject(
            entry, Rejection.DUPLICATE, f"{entry.node_id} is already at {holder.address}", step
        )
        return True

    def _readmit_duplicate(self, entry: _Entry, now: float, step: Step) -> None:
        """A duplicate whose holder is gone is probed again (when its backoff allows)."""
        held = entry.duplicate_of or entry.node_id
        if held is not None and self._holder(held, besides=entry) is not None:
            return
        if entry.next_probe_s is not None and now < entry.next_probe_s:
            return
        entry.rejected = None
        entry.duplicate_of = None
        if entry.state is NodeState.JOINING:
            entry.since_s = now  # a fresh join: its join timeout starts now
            if self._visible(entry):
                step.events.append(self._event(entry, EventKind.JOINING, "holder gone"))
        self._probe(entry, step)

    def _holder(self, node_id: NodeId, *, besides: _Entry) -> _Entry | None:
        for other in self._entries.values():
            if (
                other is not besides
                and other.node_id == node_id
                and other.rejected is None
                and other.state is not NodeState.GONE
            ):
                return other
        return None

    def _reject(self, entry: _Entry, why: Rejection, detail: str, step: Step) -> None:
        if entry.announced and entry.state is not NodeState.GONE:
            self._move(entry, NodeState.GONE, f"rejected: {why}", step)
        entry.rejected = why
        self._stop_watch(entry, step)
        self._log_once(entry, str(why), "ignoring %s at %s: " + str(why) + ": %s", detail)

    def _probe(self, entry: _Entry, step: Step) -> None:
        entry.next_probe_s = None
        if entry.probing_epoch == entry.epoch:
            return
        entry.probing_epoch = entry.epoch
        others = tuple(c for c in entry.candidates if c != entry.address)
        if entry.state is NodeState.SUSPECT and entry.details is not None:
            # It answered at `address` before: a refusal there proves the process is gone, so
            # confirm there alone (other addresses could only time out and delay the verdict).
            others = ()
        step.actions.append(
            Probe(
                entry.key,
                entry.address,
                entry.epoch,
                candidates=(entry.address, *others) if others else (),
                node_id=entry.record.node_id if entry.record is not None else None,
            )
        )

    def _retry_later(self, entry: _Entry) -> None:
        entry.failures += 1
        t = self.timings
        delay = min(t.retry_max_s, t.retry_initial_s * 2 ** (entry.failures - 1))
        entry.next_probe_s = self._clock() + delay

    def _go(self, entry: _Entry, reason: str, step: Step) -> None:
        self._stop_watch(entry, step)
        self._move(entry, NodeState.GONE, reason, step)
        step.actions.append(Discard(entry.key))
        if entry.advertised:  # still advertised: try again now and then (a restart comes back)
            entry.failures = 0
            self._retry_later(entry)

    def _stop_watch(self, entry: _Entry, step: Step) -> None:
        if entry.watching:
            entry.watching = False
            step.actions.append(StopWatch(entry.key))

    def _move(self, entry: _Entry, state: NodeState, reason: str, step: Step) -> None:
        if entry.state is state:
            return
        entry.state = state
        entry.since_s = self._clock()
        if self._visible(entry):
            step.events.append(self._event(entry, EventKind(state.value), reason))
        logger.info("node %s at %s: %s (%s)", entry.node_id or "?", entry.address, state, reason)

    def _log_once(self, entry: _Entry, topic: str, message: str, detail: str) -> None:
        if (entry.key, topic) in self._warned:
            return
        self._warned.add((entry.key, topic))
        logger.warning(message, entry.key, entry.address, detail)

    # ------------------------------------------------------------------ views

    @staticmethod
    def _visible(entry: _Entry) -> bool:
        return entry.node_id is not None and entry.rejected is None

    def _event(self, entry: _Entry, kind: EventKind, reason: str) -> NodeEvent:
        entry.announced = True
        return NodeEvent(kind=kind, view=self._view(entry), reason=reason)

    def _view(self, entry: _Entry) -> NodeView:
        d, r = entry.details, entry.record
        common: _CommonView = {
            "node_id": entry.node_id or NodeId(""),
            "address": entry.address,
            "state": entry.state,
            "source": entry.source,
            "state_since_s": entry.since_s,
            "last_seen_s": entry.last_seen_s,
        }
        if d is not None:
            return NodeView(
                **common,
                name=d.name,
                cluster=d.cluster,
                models=d.models,
                loaded_models=d.loaded_models,
                agents=d.agents,
                labels=d.labels,
                in_flight=d.in_flight,
                queued=d.queued,
                max_concurrent=d.max_concurrent,
                max_queued=d.max_queued,
                cpu_percent=d.cpu_percent,
                memory_percent=d.memory_percent,
                cores=d.cores,
                memory_total_bytes=d.memory_total_bytes,
                accelerators=d.accelerators,
                model_hashes=d.model_hashes,
                default_model=d.default_model,
                decode_tokens_per_s=d.decode_tokens_per_s,
            )
        if r is not None:
            return NodeView(
                **common,
                name=r.name,
                cluster=r.cluster,
                models=r.models,
                loaded_models=r.loaded_models,
                agents=r.agents,
                max_concurrent=max(1, r.capacity),
                cores=r.cores,
                memory_total_bytes=int(r.ram_gb * 1e9),
                accelerators=r.accelerators,
            )
        return NodeView(**common, name=entry.address)


class _CommonView(TypedDict):
    """The NodeView fields every view has, whatever the registry knows of the node."""

    node_id: NodeId
    address: str
    state: NodeState
    source: NodeSource
    state_since_s: float
    last_seen_s: float


def _candidates(address: str, record: NodeRecord | None) -> tuple[str, ...]:
    """Every address to try for a node: the record's, in its order, with `address` among them."""
    endpoints = record.endpoints if record is not None else ()
    return endpoints if address in endpoints else (address, *endpoints)


def _load_key(view: NodeView) -> tuple[object, ...]:
    return (view.in_flight, view.queued, view.models, view.agents, view.max_concurrent)
