"""Streams cut at random moments by killing the real-model node that serves them.

    python -m bench.bench_stream_cuts [--cuts 16] [--tokens 40] [--seed 7]

Three real nodes (`mesh node start`, the bundled SmolLM2 file, n_threads=1 each) and the
coordinator's Dispatcher in this process (no Ray). Each stream (temperature 0, one of four
prompts) is cut by SIGKILLing the node serving it once the coordinator has received k tokens of
the answer, k drawn uniformly from 1..L-1 for an answer of L tokens (seeded); the Dispatcher
continues the answer on another node, and the killed node is restarted (same state directory,
new port) in the background. Over all cut streams: the share whose final text equals the
uninterrupted answer, whose continuation repeated text already sent (duplicated), skipped text
(missing), or went on in other words (drift); and whether usage says exactly the tokens of the
answer. Each cut point runs in both continuation modes, side by side: from the text sent
(`resume_from_token_ids=False`: the next node tokenizes it again, with token healing) and from
the token ids sent (the default where the next node has the same model file).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import random
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass

from bench._report import machine_line, median, write_section
from bench.cut_streams import RecordingConnector, Verdict, judge, node_view
from mesh.client import NodeClient
from mesh.coordinator.dispatch import Dispatcher
from mesh.coordinator.settings import DispatcherSettings
from mesh.coordinator.tasks import TaskResult, build_task
from mesh.nodes_view import NodeState, NodeView

PROMPTS = (  # prose, a list, JSON and code: the last three retokenize less cleanly
    "Write a long story about a dragon.",
    "Describe a day in the life of a robot who works in a bakery.",
    "Write a JSON object describing three fruits with their colors and prices.",
    "Write a Python function that checks whether a number is prime, with comments.",
)


class NodeProcess:
    """`mesh node start` on port 0 with its stderr in a log; SIGKILL and restart it."""

    def __init__(self, name: str, directory: pathlib.Path) -> None:
        self.name = name
        self.directory = directory
        self.process: subprocess.Popen[str] | None = None
        self.address = ""

    def start(self, timeout_s: float = 120.0) -> None:
        log = open(self.directory / f"{self.name}.log", "a")  # noqa: SIM115 - the child keeps it
        args = [
            sys.executable,
            "-m",
            "mesh.cli",
            "node",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-advertise",
            "--state-dir",
            str(self.directory / self.name),
            "--name",
            self.name,
            "--n-threads",
            "1",
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=log, text=True, env=env
        )
        log.close()
        self.address = _serving_address(self.process, timeout_s)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def _serving_address(process: subprocess.Popen[str], timeout_s: float) -> str:
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    give_up = time.monotonic() + timeout_s
    try:
        while time.monotonic() < give_up:
            if selector.select(timeout=0.2):
                line = process.stdout.readline()
                if " serving " in line:
                    return line.strip().rsplit(" ", 1)[1]
                if not line and process.poll() is not None:
                    break
    finally:
        selector.close()
    process.kill()
    raise RuntimeError("the node did not start (see its log)")


@dataclass
class Cut:
    mode: str
    prompt: int
    cut_at: int  # tokens the coordinator had when the kill was sent
    verdict: Verdict
    usage_exact: bool  # completion_tokens == the tokens of the uninterrupted answer
    resumed_after_ms: float  # from the kill to the next text


async def _describe(address: str) -> NodeView:
    async with NodeClient(address) as client:
        return node_view(address, await client.describe(timeout_s=10))


async def _reference(address: str, prompt: str, tokens: int) -> tuple[str, int]:
    """The uninterrupted temperature-0 answer and its token count, from one node."""
    text, count = "", 0
    async with NodeClient(address) as client:
        async for chunk in client.generate_stream(prompt, temperature=0, max_tokens=tokens):
            text += chunk.text
            if chunk.HasField("final"):
                count = chunk.final.usage.completion_tokens
    return text, count


class CutMesh:
    """Three real nodes and one in-process Dispatcher per continuation mode. A killed node is
    SUSPECT at once (its health watch breaks), restarted in the background, warmed up with one
    short answer and READY again at its new address; a stream starts with at most one node down."""

    def __init__(self, directory: pathlib.Path, modes: dict[str, DispatcherSettings]) -> None:
        self.nodes = [NodeProcess(f"cut-node-{i}", directory) for i in (1, 2, 3)]
        self.views: dict[str, NodeView] = {}  # node name -> view
        self.recorder = RecordingConnector()
        self.dispatchers = {
            mode: Dispatcher(settings, connect=self.recorder) for mode, settings in modes.items()
        }
        self._restarts: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await asyncio.gather(*(asyncio.to_thread(node.start) for node in self.nodes))
        for node in self.nodes:
            self.views[node.name] = await _describe(node.address)
        self._publish()

    def node(self, node_id: str) -> NodeProcess:
        return next(n for n in self.nodes if self.views[n.name].node_id == node_id)

    def _publish(self) -> None:
        for dispatcher in self.dispatchers.values():
            dispatcher.update_nodes(list(self.views.values()))

    def kill(self, node: NodeProcess) -> None:
        node.kill()
        self.views[node.name] = self.views[node.name].model_copy(
            update={"state": NodeState.SUSPECT}
        )
        self._publish()
        self._restarts.append(asyncio.create_task(self._bring_back(node)))

    async def _bring_back(self, node: NodeProcess) -> None:
        await asyncio.to_thread(node.start)
        await _reference(node.address, PROMPTS[0], 1)  # first eval after a load is slow
        self.views[node.name] = await _describe(node.address)
        self._publish()

    async def settle(self, down: int = 0) -> None:
        """Wait until at most `down` killed nodes are still coming back."""
        while len(self._restarts) > down:
            await self._restarts.pop(0)

    async def close(self) -> None:
        try:
            await self.settle()
            for dispatcher in self.dispatchers.values():
                await dispatcher.close()
        finally:
            for node in self.nodes:
                node.stop()


async def _one_cut(mesh: CutMesh, mode: str, prompt: str, tokens: int, cut_at: int):  # type: ignore[no-untyped-def]
    """Run one stream, SIGKILL its node at `cut_at` tokens: (result, killed call, ms to resume)."""
    task = build_task(prompt, model="smollm2", temperature=0, max_tokens=tokens)
    killed_call = -1
    killed_at = resumed_ms = 0.0
    result: TaskResult | None = None
    async for item in mesh.dispatchers[mode].stream(task):
        if isinstance(item, TaskResult):
            result = item
            continue
        calls = mesh.recorder.of_task(task.task_id)
        if killed_call < 0 and calls[-1].tokens >= cut_at:
            killed_call = len(calls) - 1
            mesh.kill(mesh.node(calls[-1].node_id))
            killed_at = time.perf_counter()
        elif killed_call >= 0 and not resumed_ms and len(calls) > killed_call + 1:
            resumed_ms = (time.perf_counter() - killed_at) * 1000
    assert result is not None
    return result, killed_call, resumed_ms


async def run_cuts(args: argparse.Namespace, directory: pathlib.Path) -> tuple[list[Cut], dict]:
    common = dict(policy="round_robin", cooldown_s=0.0, node_wait_s=10.0)
    modes = {
        "text": DispatcherSettings(**common, resume_from_token_ids=False),
        "token ids": DispatcherSettings(**common, resume_from_token_ids=True),
    }
    mesh = CutMesh(directory, modes)
    await mesh.start()
    try:
        references = {}
        for index, prompt in enumerate(PROMPTS):
            answers = await asyncio.gather(
                *(_reference(node.address, prompt, args.tokens) for node in mesh.nodes)
            )
            assert len(set(answers)) == 1, f"the nodes answer prompt {index} differently"
            references[index] = answers[0]
        rng = random.Random(args.seed)
        cuts: list[Cut] = []
        uncut = 0
        for index in range(args.cuts):
            prompt_index = index % len(PROMPTS)
            reference, reference_tokens = references[prompt_index]
            cut_at = rng.randint(1, reference_tokens - 1)
            for mode in modes:  # the same prompt and cut point in each mode, side by side
                await mesh.settle(down=1)  # the other two serve and continue the stream
                result, killed_call, resumed_ms = await _one_cut(
                    mesh, mode, PROMPTS[prompt_index], args.tokens, cut_at
                )
                if killed_call < 0:
                    uncut += 1
                    continue
                calls = mesh.recorder.of_task(result.task_id)
                assert any(c.used_token_ids for c in calls) is (mode == "token ids"), mode
                before = "".join(call.text for call in calls[: killed_call + 1])
                after = "".join(call.text for call in calls[killed_call + 1 :])
                cuts.append(
                    Cut(
                        mode=mode,
                        prompt=prompt_index,
                        cut_at=cut_at,
                        verdict=judge(reference, before, after),
                        usage_exact=result.completion_tokens == reference_tokens,
                        resumed_after_ms=resumed_ms,
                    )
                )
    finally:
        await mesh.close()
    return cuts, {"uncut": uncut, "reference_tokens": [references[i][1] for i in references]}


def _row(label: str, cuts: list[Cut]) -> str:
    n = len(cuts)
    kinds = Counter(cut.verdict.kind for cut in cuts)

    def share(count: int) -> str:
        return f"{count}/{n} ({100 * count / n:.0f} %)" if n else "-"

    dup = [c.verdict.duplicated_chars for c in cuts if c.verdict.duplicated_chars]
    miss = [c.verdict.missing_chars for c in cuts if c.verdict.missing_chars]
    return (
        f"| {label} | {n} | {share(kinds['equal'])} | {share(kinds['duplicated'])}"
        f"{f' (median {median(dup):.0f} chars)' if dup else ''} | {share(kinds['missing'])}"
        f"{f' (median {median(miss):.0f} chars)' if miss else ''} | {share(kinds['drift'])} | "
        f"{share(sum(c.usage_exact for c in cuts))} | "
        f"{median([c.resumed_after_ms for c in cuts]):.0f} |"
    )


HEADER_ROW = (
    "| continuation | cut streams | text = uninterrupted answer | duplicated text | "
    "missing text | other drift | usage exact | kill → next text, ms (median) |\n"
    "|---|---|---|---|---|---|---|---|"
)


MODE_LABELS = {
    "text": "from the text sent (tokenized again, healed)",
    "token ids": "from the token ids sent (same model file)",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cuts", type=int, default=16, help="cut points (each in every mode)")
    parser.add_argument("--tokens", type=int, default=40, help="max_tokens of each stream")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-cuts-") as directory:
        cuts, info = asyncio.run(run_cuts(args, pathlib.Path(directory)))
    elapsed = time.perf_counter() - began
    rows = [_row(label, [c for c in cuts if c.mode == mode]) for mode, label in MODE_LABELS.items()]
    table = HEADER_ROW + "\n" + "\n".join(rows)
    print(table)
    for cut in cuts:
        if not cut.verdict.equal:
            print(f"  {cut.mode}: prompt {cut.prompt}, cut at {cut.cut_at}: {cut.verdict}")
    body = f"""`python -m bench.bench_stream_cuts --cuts {args.cuts} --tokens {args.tokens} \
--seed {args.seed}` ({machine_line()}; {elapsed:.0f} s)

Three real nodes (`mesh node start`, bundled SmolLM2-135M Q4_1, n_threads=1 each) and the
coordinator's Dispatcher in-process (no Ray). Each stream (temperature 0, max_tokens {args.tokens},
{len(PROMPTS)} prompts in turn: prose, JSON, code; the uninterrupted answers have {info["reference_tokens"]}
tokens, the same on every node) is cut by SIGKILLing the node serving it once the coordinator
holds k tokens of the answer (k uniform in 1..L-1, seed {args.seed}; the node may have produced
a few more that never arrived); another node continues it, and the killed one is restarted in
the background. Each cut point runs once per continuation mode. {info["uncut"]} streams ended
before their cut point and are not counted. "Duplicated": the continuation repeats text already
sent; "missing": it skips text of the answer; "other drift": the seam is clean but the words part
later. "Usage exact": completion_tokens equals the uninterrupted answer's.

{table}
"""
    write_section("Streams cut at random moments (real model)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
