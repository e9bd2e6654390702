"""Who is asking, on a real node process with the real bundled model: a TaskContext subject
scopes the demo tools (asked about another customer, customer-service's lookup is refused and
reveals nothing), and the node appends one audit line per step it ran to its state dir's
audit.jsonl (0600), naming the key and the subject but not what was asked or found."""

from __future__ import annotations

import asyncio
import json
import os
import stat

import pytest

from edgemesh.v1 import node_pb2
from mesh.agent_client import run_agent_to_result
from mesh.client import NodeClient
from mesh.core.audit import AUDIT_FILE, read_records
from tests.mesh_processes import running_nodes

pytestmark = pytest.mark.integration

ANA = "ana@example.com"  # the demo store's customer with orders 1042 and 1044
REFUSAL = {"error": "you can only see your own customer record"}


def asked_by_ana(task_id: str) -> node_pb2.TaskContext:
    return node_pb2.TaskContext(task_id=task_id, attempt=1, key_name="kiosk-7", subject=ANA)


def test_a_subject_sees_only_their_own_data_and_each_step_is_audited(tmp_path):
    async def scenario(address: str) -> tuple[node_pb2.AgentResult, node_pb2.AgentResult]:
        async with NodeClient(address) as client:
            other = await run_agent_to_result(
                client,
                "customer-service",
                "Who is bob@example.com?",
                task=asked_by_ana("task-who-is-bob"),
                timeout_s=120,
            )
            own = await run_agent_to_result(
                client,
                "customer-service",
                "What is the status of order 1042?",
                task=asked_by_ana("task-my-order"),
                timeout_s=120,
            )
        return other, own

    with running_nodes(tmp_path, ["audited"]) as [node]:
        other, own = asyncio.run(asyncio.wait_for(scenario(node.address), 300))
        node_id = node.node_id
    log = tmp_path / "audited" / AUDIT_FILE

    # Asked about Bob, the lookup ran as Ana and was refused: nothing of Bob's record came back.
    lookup = other.steps[0]
    assert (lookup.kind, lookup.call.tool) == ("tool_call", "customer_lookup")
    assert json.loads(lookup.result_json) == REFUSAL
    for step in other.steps:
        assert "Bob Stone" not in step.result_json and "silver" not in step.result_json
    # Her own order she sees.
    order = own.steps[0]
    assert (order.call.tool, json.loads(order.call.arguments_json)) == (
        "order_status",
        {"order_id": 1042},
    )
    assert json.loads(order.result_json)["status"] == "shipped"

    lines = list(read_records(log))
    by_task = {
        task: [line for line in lines if line["task_id"] == task]
        for task in ("task-who-is-bob", "task-my-order")
    }
    for task, result in (("task-who-is-bob", other), ("task-my-order", own)):
        audited = by_task[task]
        assert [(line["step"], line["kind"], line["tool"]) for line in audited] == [
            (s.index, s.kind, s.call.tool) for s in result.steps
        ]
        for line in audited:
            assert (line["key_name"], line["subject"], line["node_id"]) == ("kiosk-7", ANA, node_id)
            assert (line["agent"], line["attempt"], line["model"]) == (
                "customer-service",
                1,
                "smollm2",
            )
            assert line["side_effecting"] is False
    assert by_task["task-my-order"][0]["outcome"] == "ok"
    assert by_task["task-who-is-bob"][0]["outcome"] == "denied"
    text = log.read_text()
    for private in ("bob@", "Who is", "order 1042", "shipped", "Wireless headset"):
        assert private not in text  # never the request, the arguments or the results
    assert stat.S_IMODE(os.stat(log).st_mode) == 0o600
