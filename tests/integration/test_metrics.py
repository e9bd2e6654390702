"""Both `/metrics` endpoints, read with Prometheus's own text parser after real tasks.

A real node daemon (real gRPC, its model a word-a-millisecond fake: the bundled llama.cpp
model segfaulted on this machine on 2026-12-02, on main as well) serves `/metrics` on its own
HTTP port; the
coordinator's dispatcher (in process, no Ray) serves its `/metrics` on the OpenAI HTTP app.
A second node in the table is dead (nothing listens on its address), so round-robin routing
sends the second task there: that attempt fails over to the live node.
"""

from __future__ import annotations

import asyncio
import io
import socket
import urllib.request

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh.coordinator.dispatch import Dispatcher
from mesh.coordinator.openai_api import build_openai_app
from mesh.coordinator.settings import DispatcherSettings
from mesh.core.ids import NodeId
from mesh.nodes_view import NodeSource, NodeState, NodeView
from nodes.config import NodeConfig
from nodes.daemon import NodeDaemon
from tests.fakes import FakeBackend

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

QUESTION = "What is the capital city of France?"


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} of a Prometheus text exposition."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(scraped: dict, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in scraped.items() if n == name and wanted <= ls)


def dead_address() -> str:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def view(node_id: str, name: str, address: str) -> NodeView:
    return NodeView(
        node_id=NodeId(node_id),
        name=name,
        address=address,
        state=NodeState.READY,
        source=NodeSource.STATIC,
        models=("smollm2",),
        max_concurrent=1,
        max_queued=8,
    )


def chat(model: str = "smollm2") -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 8,
        "temperature": 0,
    }


def test_counters_move_after_tasks_a_refusal_and_a_failover(tmp_path):
    async def scenario():
        config = NodeConfig(
            host="127.0.0.1",
            port=0,
            advertise=False,
            state_dir=str(tmp_path),
            router=None,
            metrics_port=0,
        )
        backend = FakeBackend("smollm2", delay_s=0.001)
        daemon = NodeDaemon(config, backends={"smollm2": backend}, progress=io.StringIO())
        await daemon.start()
        try:
            node_url = f"http://127.0.0.1:{daemon.metrics_port}/metrics"

            def scrape_node() -> dict:
                with urllib.request.urlopen(node_url, timeout=5) as reply:
                    return samples(reply.read().decode())

            dispatcher = Dispatcher(
                DispatcherSettings(policy="round_robin", attempt_timeout_s=20, deadline_s=60)
            )
            dispatcher.update_nodes(
                # Round robin goes in node-id order: "zz-dead" sorts after any hex id, so the
                # first task goes to the live node and the second fails over from the dead one
                # (a random id sorting after "dead" once made the dead node take both).
                [
                    view("zz-dead", "dead", dead_address()),
                    view(daemon.node_id, "live", daemon.address),
                ]
            )
            app = build_openai_app(dispatcher)
            transport = httpx.ASGITransport(app=app)
            try:
                async with httpx.AsyncClient(transport=transport, base_url="http://mesh") as http:
                    before = await asyncio.to_thread(scrape_node)
                    answers = [
                        await http.post("/v1/chat/completions", json=chat()) for _ in range(2)
                    ]
                    refused = await http.post("/v1/chat/completions", json=chat("no-such-model"))
                    coordinator = samples((await http.get("/metrics")).text)
                after = await asyncio.to_thread(scrape_node)
            finally:
                await dispatcher.close()
        finally:
            await daemon.stop()
        return answers, refused, before, after, coordinator

    answers, refused, before, after, coordinator = asyncio.run(asyncio.wait_for(scenario(), 150))
    assert [a.status_code for a in answers] == [200, 200]
    assert "Paris" in answers[0].json()["choices"][0]["message"]["content"]
    assert refused.status_code == 404

    # The node: two generations, their tokens and timings.
    ok = {"model": "smollm2", "outcome": "ok"}
    assert (
        value(after, "mesh_node_requests_total", **ok)
        - value(before, "mesh_node_requests_total", **ok)
        == 2
    )
    out = value(after, "mesh_node_tokens_total", direction="out")
    assert 2 <= out <= 16
    assert value(after, "mesh_node_time_to_first_token_seconds_count", model="smollm2") == 2
    assert value(after, "mesh_node_model_state", model="smollm2", state="ready") == 1
    assert value(after, "mesh_node_model_memory_bytes", model="smollm2") == 1  # the fake's size
    assert value(after, "mesh_node_in_flight") == 0

    # The coordinator: two tasks answered, one refused, one failover off the dead node.
    assert value(coordinator, "mesh_coordinator_tasks_total", outcome="ok") == 2
    assert value(coordinator, "mesh_coordinator_tasks_total", outcome="not_found") == 1
    assert value(coordinator, "mesh_coordinator_refusals_total", reason="none") == 1
    assert value(coordinator, "mesh_coordinator_attempts_total", outcome="ok") == 2
    assert value(coordinator, "mesh_coordinator_attempts_total", outcome="unavailable") == 1
    assert value(coordinator, "mesh_coordinator_failovers_total", reason="unavailable") == 1
    assert value(coordinator, "mesh_coordinator_reroute_seconds_count") == 1
    assert value(coordinator, "mesh_coordinator_routing_decisions_total", policy="round_robin") == 3
    assert value(coordinator, "mesh_coordinator_nodes", state="ready") == 2
