"""Agents on a real node (gRPC on 127.0.0.1, port 0) with the real bundled SmolLM2-135M model."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json

import pytest

from edgemesh.v1 import node_pb2
from mesh.agent_client import run_agent, run_agent_to_result
from mesh.client import NodeClient
from mesh.core.errors import InvalidRequestError, NotFoundError
from nodes.config import ModelConfig, NodeConfig
from nodes.daemon import NodeDaemon

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def agent_node(tmp_path):
    config = NodeConfig(
        host="127.0.0.1",
        port=0,
        advertise=False,
        state_dir=str(tmp_path),
        grace_s=1.0,
        models=(ModelConfig(id="smollm2", source="bundled:smollm2", n_ctx=2048, n_threads=2),),
    )
    daemon = NodeDaemon(config, progress=io.StringIO())
    await daemon.start()
    try:
        async with NodeClient(daemon.address) as client:
            yield daemon, client
    finally:
        await daemon.stop()


def run(coro, timeout=180):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_order_status_agent_calls_the_tool_and_answers_with_the_stored_status(tmp_path):
    async def scenario():
        async with agent_node(tmp_path) as (daemon, client):
            info = await client.describe()
            assert [a.name for a in info.agents] == [
                "customer-service",
                "technical-support",
                "scheduling",
            ]
            assert info.agents[0].model_id == "smollm2"
            events = [
                e
                async for e in run_agent(
                    client,
                    "customer-service",
                    "What is the status of order 1042?",
                    task=node_pb2.TaskContext(task_id="task-1042"),
                    timeout_s=120,
                )
            ]
            return daemon.node_id, events

    node_id, events = run(scenario())
    streamed = [e.step for e in events if e.HasField("step")]
    assert streamed[0].kind == "tool_call" and streamed[0].call.tool == "order_status"
    assert json.loads(streamed[0].call.arguments_json) == {"order_id": 1042}
    assert json.loads(streamed[0].result_json)["status"] == "shipped"
    assert streamed[0].idempotent and streamed[0].node_id == node_id
    assert streamed[0].tokens > 0 and streamed[0].duration_ms > 0
    assert [e.text for e in events if e.text] == [events[-1].result.answer]
    result = events[-1].result
    assert result.finish_reason == "answer"
    assert "shipped" in result.answer.lower()
    assert [s.kind for s in result.steps] == ["tool_call", "final"]
    assert result.model == "smollm2" and result.node_id == node_id
    assert result.usage.completion_tokens > 0 and result.total_ms > 0


def test_failover_replay_does_not_run_the_side_effecting_tool_again(tmp_path):
    """Steps done on a dead node come back with the task; the ticket is not created twice."""
    ticket_step = node_pb2.AgentStep(
        index=0,
        kind="tool_call",
        call=node_pb2.ToolCall(
            tool="create_ticket",
            arguments_json=json.dumps(
                {"customer_email": "bob@example.com", "subject": "Printer broken"}
            ),
        ),
        result_json=json.dumps({"ticket_id": 2, "status": "open", "created_now": True}),
        idempotent=False,
        node_id="node-that-died",
        model="smollm2",
    )

    async def scenario():
        async with agent_node(tmp_path) as (daemon, client):
            store = daemon.servicer.agents.store
            before = store.count_tickets()
            result = await run_agent_to_result(
                client,
                "customer-service",
                "Please open a ticket for bob@example.com: printer broken",
                task=node_pb2.TaskContext(task_id="task-ticket", attempt=1),
                completed_steps=[ticket_step],
                timeout_s=120,
            )
            return result, before, store.count_tickets()

    result, before, after = run(scenario())
    assert after == before  # the replayed ticket was not created again
    assert [(s.index, s.kind) for s in result.steps] == [(0, "tool_call"), (1, "final")]
    assert result.steps[0].node_id == "node-that-died"
    assert result.finish_reason == "answer" and result.answer


def test_agent_errors_reach_the_client_as_mesh_errors(tmp_path):
    async def scenario():
        async with agent_node(tmp_path) as (_daemon, client):
            with pytest.raises(NotFoundError, match="offers: customer-service"):
                await run_agent_to_result(client, "no-such-agent", "hello", timeout_s=30)
            with pytest.raises(InvalidRequestError, match="input is empty"):
                await run_agent_to_result(client, "scheduling", "  ", timeout_s=30)

    run(scenario())
