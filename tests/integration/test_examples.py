"""The scripts under examples/ run as a user would run them, against a real node and coordinator.

One node for the module (`mesh node start --config examples/node.yaml`: the bundled model, the
demo agents, the shop agent of examples/shop_agents.py and the ONNX intent router); the
coordinator examples also get one `mesh coordinator start` (Ray, about 10 s on 2 cores), shut
down at the module's end. Each example is a subprocess with a timeout, asserted on its output.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator

import pytest

from mesh.coordinator_client import MeshClient
from mesh.local_processes import LocalNode
from tests.mesh_processes import running_nodes, start_coordinator_cli

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

REPO = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
EXAMPLE_TIMEOUT_S = 240.0


def run_example(script: str, *args: str) -> str:
    """`python examples/SCRIPT ARGS`; its stdout, after checking it exited 0."""
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=EXAMPLE_TIMEOUT_S,
        cwd=REPO,
    )
    assert completed.returncode == 0, (
        f"{script} exited {completed.returncode}\nstdout:\n{completed.stdout[-3000:]}"
        f"\nstderr:\n{completed.stderr[-3000:]}"
    )
    assert "Traceback" not in completed.stderr, completed.stderr[-3000:]
    return completed.stdout


def lines_starting(output: str, prefix: str) -> list[str]:
    return [line.strip() for line in output.splitlines() if line.strip().startswith(prefix)]


def between(output: str, start: str, end: str) -> str:
    """The text after `start` and before `end` (a streamed answer may span several lines)."""
    assert start in output and end in output, output
    return output.split(start, 1)[1].split(end, 1)[0]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNode]:
    directory = tmp_path_factory.mktemp("examples-node")
    path = os.pathsep.join(p for p in (str(EXAMPLES), os.environ.get("PYTHONPATH", "")) if p)
    with running_nodes(
        directory,
        ["example-node"],
        config=EXAMPLES / "node.yaml",
        env={"PYTHONPATH": path},
    ) as (started,):
        yield started


async def _wait_ready(address: str, timeout_s: float = 60.0) -> None:
    async with MeshClient(address) as client, asyncio.timeout(timeout_s):
        while not any(n.state == "ready" for n in await client.list_nodes()):
            await asyncio.sleep(0.2)


@pytest.fixture(scope="module")
def coordinator(
    node: LocalNode, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """{"grpc", "fast", "http"} addresses of a coordinator whose node table has the node ready."""
    directory = tmp_path_factory.mktemp("examples-coordinator")
    process = start_coordinator_cli(directory, [node.address])
    try:
        addresses = process.addresses
        asyncio.run(_wait_ready(addresses["grpc"]))
        yield addresses
    finally:
        process.stop()


# ---------------------------------------------------------------------- a node alone


def test_node_generate_answers_streams_and_reports_an_unknown_model(node: LocalNode) -> None:
    output = run_example("node_generate.py", node.address)
    (answer,) = lines_starting(output, "answer:")
    assert "Paris" in answer and "tokens)" in answer
    assert between(output, "stream:", "\nerror:").strip()
    (error,) = lines_starting(output, "error:")
    assert "no-such-model" in error and "smollm2" in error  # the models the node does serve


def test_node_agent_calls_the_order_tool_and_answers(node: LocalNode) -> None:
    output = run_example("node_agent.py", node.address)
    (tool_step,) = lines_starting(output, "step 0 tool_call order_status")
    arguments, result = tool_step.removeprefix("step 0 tool_call order_status").split(" -> ")
    assert json.loads(arguments) == {"order_id": 1042}
    assert json.loads(result)["status"] == "shipped"  # from the node's demo store
    (answer,) = lines_starting(output, "answer:")
    assert len(answer) > len("answer: ")
    assert lines_starting(output, "(answer,")


def test_node_runs_the_agent_defined_in_shop_agents(node: LocalNode) -> None:
    output = run_example(
        "node_agent.py", node.address, "--agent", "retail-kiosk", "Do you have SKU-7 in stock?"
    )
    (tool_step,) = lines_starting(output, "step 0 tool_call stock_level")
    _arguments, result = tool_step.split(" -> ")
    assert json.loads(result)["units"] == 3  # what examples/shop_agents.py's tool returns
    assert lines_starting(output, "answer:")


# ---------------------------------------------------------------------- through the coordinator


@pytest.mark.ray
def test_mesh_client_runs_a_model_task_an_agent_task_and_an_auto_routed_stream(
    node: LocalNode, coordinator: dict[str, str]
) -> None:
    output = run_example("mesh_submit.py", coordinator["grpc"])
    (answer,) = lines_starting(output, "answer:")
    assert "Paris" in answer and "(node example-node, 1 attempt(s), failed over: False)" in answer
    (agent_answer,) = lines_starting(output, "agent answer:")
    assert "node example-node" in agent_answer and "tier smollm2" in agent_answer
    (tool_step,) = lines_starting(output, "step 0 tool_call order_status")
    assert json.loads(tool_step.split(" -> ")[1])["status"] == "shipped"
    assert lines_starting(output, "streamed step 0 tool_call")
    (routed,) = lines_starting(output, "agent technical-support, routed by intent-router")
    assert "(confidence " in routed


@pytest.mark.ray
def test_openai_client_works_unmodified_against_the_coordinator(
    node: LocalNode, coordinator: dict[str, str]
) -> None:
    output = run_example("openai_chat.py", coordinator["http"])
    (answer,) = lines_starting(output, "answer:")
    assert "Paris" in answer and "(node example-node)" in answer
    assert between(output, "stream:", "\nagent answer:").strip()
    (agent_answer,) = lines_starting(output, "agent answer:")
    assert "(agent customer-service)" in agent_answer
    assert lines_starting(output, "step 0 tool_call order_status")
