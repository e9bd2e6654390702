"""End to end: `mesh coordinator start` (its own Ray) with three real `mesh node start` processes.

100 tasks at concurrency 8 while one node is `kill -9`ed: every task answered exactly once,
none lost. Then 100 streams while a second node is killed: every stream completes, and its
text is exactly the temperature-0 answer, continued (not restarted) where a node died
mid-answer.

"Exactly once" is judged twice: from the coordinator's attempt records, and from the nodes' own
counts (tests/exactly_once.py says why those are complete: each node still up answers Describe,
a killed one is started again from its state directory, whose journal holds every count it made
before the kill).
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import subprocess
import sys
import time

import pytest

from mesh.coordinator_client import MeshClient
from mesh.core.errors import NotFoundError
from mesh.local_processes import LocalNode
from tests.exactly_once import LostWindow, NodeCounts, check_exactly_once, node_counts
from tests.mesh_processes import restarted, running_nodes, start_coordinator_cli

HERE = pathlib.Path(__file__).resolve().parent  # stream_pause_hook

pytestmark = [pytest.mark.e2e, pytest.mark.ray, pytest.mark.timeout(420)]

QUESTIONS = [
    "What is the capital city of France?",
    "Name a primary colour.",
    "What do bees make?",
    "How many days are in a week?",
]
# Streams get questions with long answers, so that a stream cut "early" at the client (which
# lags the node by a chunk window and a Ray hop) is still being generated on the node.
STORY_QUESTIONS = [
    "Describe the city of Paris in detail.",
    "Explain step by step how bees make honey.",
    "Write a long story about a dragon and a knight.",
    "Describe the planets of the solar system one by one.",
]
TOKENS = 20
STREAM_TOKENS = 40
TASKS = 100
CONCURRENCY = 8
KILL_AFTER = 25  # tasks answered before the kill


def run(coro, timeout=300):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    directory = tmp_path_factory.mktemp("e2e-coordinator")
    config = directory / "node.yaml"
    config.write_text("agent_modules: [stream_pause_hook]\n")  # cut- tasks pause mid-answer
    with running_nodes(
        directory,
        ["node-a", "node-b", "node-c"],
        config=config,
        env={"PYTHONPATH": str(HERE)},
    ) as nodes:
        coordinator = start_coordinator_cli(directory, [n.address for n in nodes])
        try:
            addresses = coordinator.addresses
            run(_wait_ready(addresses["grpc"], 3), timeout=60)
            yield addresses, {n.name: n for n in nodes}, coordinator
        finally:
            code = coordinator.stop(timeout_s=60)
            log = coordinator.log_text()
            assert code == 0, f"exit code {code}: {log[-3000:]}"
            assert "Traceback" not in log, log[-3000:]


async def _wait_ready(address: str, count: int) -> None:
    async with MeshClient(address) as client:
        while sum(n.state == "ready" for n in await client.list_nodes()) < count:
            await asyncio.sleep(0.1)


async def _references(address: str, questions: list[str], tokens: int) -> dict[str, str]:
    async with MeshClient(address) as client:
        return {
            q: (await client.submit(q, model="smollm2", temperature=0, max_tokens=tokens)).text
            for q in questions
        }


async def _drive(
    addresses: dict[str, str], node, *, stream: bool, references: dict[str, str]
) -> tuple[list, float, list[float]]:
    """Run TASKS tasks at CONCURRENCY; kill `node` after KILL_AFTER answers.

    Tasks from the KILL_AFTER-th on are marked `cut-NODE-`, so that `node` pauses a marked
    task's first attempt after two chunks of text (tests/e2e/stream_pause_hook.py; unary tasks
    are streamed from their node too): on 2 busy cores the coordinator may lag its nodes by a
    whole answer, and a kill right after the KILL_AFTER-th answer once found nothing in flight
    on `node`, so only a node held mid-answer makes the kill land there for sure. DescribeTask
    shows when the coordinator has the first tokens of such a task from `node`; the kill comes
    then.
    Returns (results, kill time, latencies, kill time as unix time)."""
    done = 0
    killed_at = killed_unix_s = 0.0
    latencies: list[float] = []
    gate = asyncio.Semaphore(CONCURRENCY)
    running: set[str] = set()
    prefix = "s" if stream else "u"
    cut: list[str] = []

    def kill() -> None:
        nonlocal killed_at, killed_unix_s
        node.kill_hard()
        killed_at, killed_unix_s = time.monotonic(), time.time()

    async def one(client: MeshClient, index: int):
        nonlocal done
        questions = list(references)
        question = questions[index % len(questions)]
        # From the KILL_AFTER-th stream on: held mid-answer if it runs on `node` first.
        label = f"cut-{node.name}" if index >= KILL_AFTER else prefix
        task_id = f"{label}-{index}-{time.monotonic_ns()}"
        async with gate:
            began = time.monotonic()
            running.add(task_id)
            options = dict(
                model="smollm2",
                temperature=0,
                deadline_s=120,
                task_id=task_id,
                max_tokens=STREAM_TOKENS if stream else TOKENS,
            )
            if stream:
                chunks = [c async for c in client.submit_stream(question, **options)]
                assert chunks[-1].HasField("result"), [
                    (c.index, c.text, c.HasField("result")) for c in chunks[-3:]
                ]
                result = chunks[-1].result
                text = "".join(c.text for c in chunks)
            else:
                result = await client.submit(question, **options)
                text = result.text
            running.discard(task_id)
            latencies.append(time.monotonic() - began)
            done += 1
            return question, text, result, time.monotonic()

    async def killer(watch: MeshClient) -> None:
        while done < KILL_AFTER:
            await asyncio.sleep(0.02)
        while not killed_at:
            for task_id in list(running):
                try:
                    record = await watch.describe_task(task_id)
                except NotFoundError:
                    continue  # not started on the coordinator yet
                current = record.attempts[-1] if record.attempts else None
                if (
                    task_id.startswith(f"cut-{node.name}-")
                    and current is not None
                    and current.outcome == 0
                    and current.node_name == node.name
                    and current.completion_tokens >= 1
                ):
                    cut.append(task_id)
                    kill()
                    return
            await asyncio.sleep(0.01)

    async with MeshClient(addresses["grpc"]) as client, MeshClient(addresses["fast"]) as watch:
        watching = asyncio.create_task(killer(watch))
        results = await asyncio.gather(*(one(client, i) for i in range(TASKS)))
        watching.cancel()
    assert killed_at, "the node was never killed"
    cut_result = next(r for _q, _t, r, _at in results if r.task_id in cut)
    print(
        "\ncut mid-answer:",
        [(a.node_name, a.outcome, a.completion_tokens) for a in cut_result.attempts],
    )
    return results, killed_at, latencies, killed_unix_s


def _nodes_own_counts(nodes: dict[str, LocalNode]) -> list[NodeCounts]:
    """What every node says it did: Describe of each one still up; a killed one is started
    again from its state directory first (its journal survived the kill)."""
    counts = []
    for name, node in nodes.items():
        if node.alive():
            counts.append(run(node_counts(name, node.address)))
            continue
        with restarted(node) as again:
            counts.append(run(node_counts(name, again.address)))
    return counts


def _check_exactly_once(results, nodes, killed_name: str, killed_unix_s: float) -> list:
    task_ids = [result.task_id for _q, _t, result, _at in results]
    assert len(set(task_ids)) == TASKS  # one answer per task, none lost
    unfinished = []  # answers whole before their node died: it never sent their end
    for _question, text, result, _at in results:
        outcomes = [a.outcome for a in result.attempts]
        if outcomes[-1] != 1:
            # The killed node had sent every token asked for, then died before the end of its
            # stream: the answer is whole and no other node is needed (runs.TaskRun).
            assert outcomes == [2] and result.node_name == killed_name, outcomes
            assert result.usage.completion_tokens in (TOKENS, STREAM_TOKENS), result
            unfinished.append(result.task_id)
        else:
            assert outcomes.count(1) == 1  # exactly one OK, and it is last
        assert result.node_name != killed_name or len(result.attempts) == 1
        assert text
    # The nodes' side: each task ran to its end once, on the node the coordinator says answered
    # (a result the killed node finished as it died, never sent, is the one thing excused).
    lost = [LostWindow(killed_name, killed_unix_s, killed_unix_s)]
    verdict = check_exactly_once(
        task_ids, _nodes_own_counts(nodes), lost=lost, may_be_unfinished=unfinished
    )
    for _question, _text, result, _at in results:
        if result.task_id in unfinished and not verdict.completed_on[result.task_id]:
            continue
        assert result.node_name in verdict.completed_on[result.task_id], (
            result.task_id,
            result.node_name,
            verdict.completed_on[result.task_id],
        )
    print(
        f"\nnodes' own counts: {len(task_ids)} tasks completed once, {verdict.started} "
        f"generations started, excused (finished as the node died): {verdict.excused}"
    )
    return [r for _q, _t, r, _at in results if r.failed_over]


def test_kill_a_node_during_100_unary_tasks(mesh):
    addresses, nodes, _coordinator = mesh
    references = run(_references(addresses["grpc"], QUESTIONS, TOKENS))
    assert "Paris" in references[QUESTIONS[0]]
    results, killed_at, latencies, killed_unix_s = run(
        _drive(addresses, nodes["node-c"], stream=False, references=references)
    )
    failed_over = _check_exactly_once(results, nodes, "node-c", killed_unix_s)
    for question, text, _result, _at in results:
        assert text == references[question]  # continued from what it had, or afresh
    assert failed_over, "the kill hit no task in flight"
    assert all(a.node_name == "node-c" for r in failed_over for a in r.attempts[:-1]), [
        [(a.node_name, a.outcome, a.detail[:120]) for a in r.attempts] for r in failed_over
    ]
    rerouted = max(at for _q, _t, r, at in results if r.failed_over)
    print(
        f"\nunary: {len(failed_over)} tasks failed over; last rerouted answer "
        f"{rerouted - killed_at:.2f} s after the kill; latency max {max(latencies):.2f} s"
    )


def test_kill_a_node_during_100_streams(mesh):
    addresses, nodes, _coordinator = mesh
    references = run(_references(addresses["grpc"], STORY_QUESTIONS, STREAM_TOKENS))
    results, _killed_at, _latencies, killed_unix_s = run(
        _drive(addresses, nodes["node-b"], stream=True, references=references)
    )
    failed_over = _check_exactly_once(results, nodes, "node-b", killed_unix_s)
    mid_stream = [r for r in failed_over if any(a.completion_tokens for a in r.attempts[:-1])]
    for question, text, result, _at in results:
        reference = references[question]
        if result not in mid_stream:
            assert text == reference
            continue
        # Continued from the text already sent, for exactly the tokens still missing (chunks
        # say how many tokens they carry): at temperature 0 the continuation rejoins the
        # reference answer, so nothing is repeated, dropped or added.
        assert text == reference, (
            text,
            reference,
            [(a.node_name, a.completion_tokens) for a in result.attempts],
        )
    assert mid_stream, "no stream was cut mid-answer: " + repr(
        [
            [(a.node_name, a.outcome, a.completion_tokens, a.detail[:80]) for a in r.attempts]
            for r in failed_over
        ]
    )
    print(f"\nstreams: {len(failed_over)} failed over, {len(mid_stream)} continued mid-answer")


def test_cli_nodes_and_submit_json(mesh):
    addresses, _nodes, _coordinator = mesh
    listed = subprocess.run(
        [sys.executable, "-m", "mesh.cli", "nodes", "--coordinator", addresses["grpc"], "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    states = {n["name"]: n["state"] for n in json.loads(listed.stdout)}
    assert set(states) == {"node-a", "node-b", "node-c"} and states["node-a"] == "ready"
    ready = {name for name, state in states.items() if state == "ready"}
    submitted = subprocess.run(
        [
            sys.executable,
            "-m",
            "mesh.cli",
            "submit",
            "--coordinator",
            addresses["grpc"],
            "--model",
            "smollm2",
            QUESTIONS[0],
            "--max-tokens",
            "12",
            "--temperature",
            "0",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert submitted.returncode == 0, submitted.stderr
    answer = json.loads(submitted.stdout)
    assert "Paris" in answer["text"] and answer["node"]["name"] in ready
    assert answer["attempts"][-1]["outcome"] == "ok" and answer["usage"]["completion_tokens"] > 0
    agent = subprocess.run(
        [
            sys.executable,
            "-m",
            "mesh.cli",
            "submit",
            "--coordinator",
            addresses["fast"],
            "--agent",
            "customer-service",
            "Hello",
            "--max-tokens",
            "4",
            "--stream",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert agent.returncode == 0 and "attempt(s)" in agent.stderr, agent.stderr
