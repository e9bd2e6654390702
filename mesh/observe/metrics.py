"""The coordinator's Prometheus metrics: one registry per dispatcher (per Serve replica).

Fed from a few places: the attempt loop (attempts, failovers and why, reroute latency), the
pool (routing decisions by policy, refusals by reason), the ledger (tasks by outcome); the
node table's states are read at scrape time. Label values are bounded: outcomes, reasons and
states are enums, the policy comes from settings; no task or node ids.

With several dispatcher replicas each keeps its own registry, and `/metrics` on Serve's HTTP
proxy answers for the replica that took the scrape: series carry a `replica` label, so sum
them in Prometheus over several scrapes, or run one replica when exact totals matter.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_REROUTE_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _NodeStates(Collector):
    def __init__(self, states: Callable[[], Iterable[str]], replica: str) -> None:
        self._states = states
        self._replica = replica

    def collect(self) -> Any:
        family = GaugeMetricFamily(
            "mesh_coordinator_nodes", "Nodes in the table by state", labels=["replica", "state"]
        )
        tally = Tally(self._states())
        for state in ("joining", "ready", "suspect", "gone"):
            family.add_metric([self._replica, state], tally.get(state, 0))
        yield family


class CoordinatorMetrics:
    """The metric families of one dispatcher; `text()` is what `/metrics` answers."""

    def __init__(self, replica: str = "0") -> None:
        self.replica = replica
        self.registry = CollectorRegistry(auto_describe=True)
        r, labels = self.registry, ["replica"]
        self.tasks = Counter(
            "mesh_coordinator_tasks", "Tasks ended, by outcome", [*labels, "outcome"], registry=r
        )
        self.attempts = Counter(
            "mesh_coordinator_attempts", "Attempts by outcome", [*labels, "outcome"], registry=r
        )
        self.failovers = Counter(
            "mesh_coordinator_failovers",
            "Tasks moved to another attempt, by the failed attempt's outcome",
            [*labels, "reason"],
            registry=r,
        )
        self.reroute = Histogram(
            "mesh_coordinator_reroute_seconds",
            "From a failed attempt to the next attempt's start",
            labels,
            buckets=_REROUTE_S,
            registry=r,
        )
        self.routing = Counter(
            "mesh_coordinator_routing_decisions",
            "Nodes chosen, by routing policy",
            [*labels, "policy"],
            registry=r,
        )
        self.refusals = Counter(
            "mesh_coordinator_refusals",
            "Times no node could take a task, by reason",
            [*labels, "reason"],
            registry=r,
        )

    def watch_nodes(self, states: Callable[[], Iterable[str]]) -> None:
        self.registry.register(_NodeStates(states, self.replica))

    def task_ended(self, outcome: str) -> None:
        self.tasks.labels(self.replica, outcome).inc()

    def attempt(self, outcome: str) -> None:
        self.attempts.labels(self.replica, outcome).inc()

    def failover(self, reason: str, reroute_s: float) -> None:
        self.failovers.labels(self.replica, reason).inc()
        self.reroute.labels(self.replica).observe(reroute_s)

    def routed(self, policy: str) -> None:
        self.routing.labels(self.replica, policy).inc()

    def refused(self, reason: str) -> None:
        self.refusals.labels(self.replica, reason).inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)
