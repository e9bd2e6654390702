"""A node's Prometheus metrics, served on `/metrics` of its own HTTP port (`metrics_port`).

Each daemon has its own registry (several nodes in one test process never share series).
Counters and histograms are fed from the servicer (nodes/service.py); queue depth, in flight
and the models' state and memory are read at scrape time. Label values are bounded
(mesh.core.metric_labels): model ids come from the node's config, tool names are capped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from mesh.core.metric_labels import BoundedLabels

logger = logging.getLogger("nodes.metrics")

_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_PER_TOKEN_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)


# (in flight, queued, refused so far, {model: (state, bytes of weights)})
LiveRead = Callable[[], tuple[int, int, int, Mapping[str, tuple[str, int]]]]


class _LiveState(Collector):
    """Gauges read when scraped: admission's counts and each model's state and size."""

    def __init__(self, read: LiveRead) -> None:
        self._read = read

    def collect(self) -> Any:
        in_flight, queued, refused, models = self._read()
        yield GaugeMetricFamily("mesh_node_in_flight", "Requests running now", value=in_flight)
        yield GaugeMetricFamily("mesh_node_queue_depth", "Requests waiting now", value=queued)
        yield CounterMetricFamily(
            "mesh_node_refusals", "Requests refused as over capacity", value=refused
        )
        state = GaugeMetricFamily(
            "mesh_node_model_state", "1 for the model's current state", labels=["model", "state"]
        )
        size = GaugeMetricFamily(
            "mesh_node_model_memory_bytes", "Bytes of the model's weights", labels=["model"]
        )
        for model, (status, size_bytes) in models.items():
            state.add_metric([model, status], 1)
            size.add_metric([model], size_bytes)
        yield state
        yield size


class NodeMetrics:
    """The node's metric families; `serve` exposes them over HTTP."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "mesh_node_requests",
            "Generations by model and outcome",
            ["model", "outcome"],
            registry=r,
        )
        self.tokens = Counter(
            "mesh_node_tokens",
            "Tokens by model and direction (in, out)",
            ["model", "direction"],
            registry=r,
        )
        self.ttft = Histogram(
            "mesh_node_time_to_first_token_seconds",
            "Arrival to first token",
            ["model"],
            buckets=_SECONDS,
            registry=r,
        )
        self.per_token = Histogram(
            "mesh_node_time_per_output_token_seconds",
            "Decode time per output token after the first",
            ["model"],
            buckets=_PER_TOKEN_SECONDS,
            registry=r,
        )
        self.agent_steps = Counter(
            "mesh_node_agent_steps", "Agent steps by agent and kind", ["agent", "kind"], registry=r
        )
        self.tool_calls = Counter(
            "mesh_node_tool_calls",
            "Tool calls by tool and outcome",
            ["tool", "outcome"],
            registry=r,
        )
        self._tools = BoundedLabels()
        self._agents = BoundedLabels()
        self.models = BoundedLabels()  # the caller names the model of a refused request
        self._server: Any = None

    def watch(self, read: LiveRead) -> None:
        """Call `read` at every scrape for the gauges of the node's current state."""
        self.registry.register(_LiveState(read))

    def generation(
        self,
        model: str,
        outcome: str,
        *,
        prompt: int,
        completion: int,
        ttft_s: float,
        decode_s: float,
    ) -> None:
        self.requests.labels(model, outcome).inc()
        self.tokens.labels(model, "in").inc(prompt)
        self.tokens.labels(model, "out").inc(completion)
        if completion > 0:
            self.ttft.labels(model).observe(ttft_s)
        if completion > 1 and decode_s > 0:
            self.per_token.labels(model).observe(decode_s / (completion - 1))

    def agent_step(self, agent: str, kind: str, tool: str, error: str) -> None:
        self.agent_steps.labels(self._agents(agent), kind or "none").inc()
        if kind == "tool_call":
            self.tool_calls.labels(self._tools(tool), "error" if error else "ok").inc()

    def serve(self, host: str, port: int) -> int:
        """Serve `/metrics` on host:port (0: any free port) in a thread; the bound port."""
        self._server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
