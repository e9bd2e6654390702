"""Intent router benchmark: the ONNX classifier against asking the SLM, on the held-out split.

    python -m bench.bench_router [--threads 2] [--limit N] [--no-write]

Both classify every held-out request of `nodes/router/data/intents.csv` into
customer-service, technical-support or scheduling, one request at a time:

- the ONNX router (`intent_router.onnx`) in ONNX Runtime, 1 thread: in process
  (the backend a node uses) and through a real node's Classify RPC on 127.0.0.1;
- SmolLM2-135M-Instruct through a LlamaBackend, temperature 0, a prompt that
  describes the three labels, and a JSON-schema grammar that allows only the three
  label strings (so every answer is a valid label).

Writes `### ONNX router vs asking the SLM` under `## Intent router` of
docs/BENCHMARKS.md (the build writes the section's accuracy part).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench._report import REPORT, machine_line
from edgemesh.v1 import node_pb2, node_pb2_grpc
from mesh.core.channels import create_channel
from nodes.backends import GenerationInput, Message
from nodes.backends.llama import LlamaBackend
from nodes.backends.onnx import OnnxBackend
from nodes.config import NodeConfig, default_router_config
from nodes.daemon import NodeDaemon
from nodes.router import DATA_PATH, LABELS, ROUTER_ALIAS
from nodes.router._markdown import update_file_section
from nodes.router.metrics import Example, accuracy, load_examples, percentile

SECTION = "## Intent router"
SUBSECTION = "### ONNX router vs asking the SLM"
SLM_SYSTEM = (
    "You route requests sent to a help desk. Reply with the one team that should handle it:\n"
    "customer-service: orders, deliveries, returns, refunds, billing, accounts, complaints.\n"
    "technical-support: devices, software, errors, crashes, connectivity, passwords.\n"
    "scheduling: appointments, bookings, meetings, calendars, time slots."
)
SLM_SCHEMA = json.dumps({"enum": list(LABELS)})


@dataclass
class Run:
    name: str
    predicted: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)

    def row(self, gold: Sequence[str], hard: Sequence[int]) -> str:
        lat = self.latencies_ms
        hard_acc = accuracy([self.predicted[i] for i in hard], [gold[i] for i in hard])
        return (
            f"| {self.name} | {accuracy(self.predicted, gold):.1%} | {hard_acc:.1%} | "
            f"{percentile(lat, 50):.2f} ms | {percentile(lat, 99):.2f} ms |"
        )


async def onnx_in_process(examples: Sequence[Example]) -> Run:
    backend = OnnxBackend(ROUTER_ALIAS, f"bundled:{ROUTER_ALIAS}")
    await backend.load()
    run = Run("ONNX router, in process (backend)")
    try:
        for example in examples[:10]:  # warm-up
            await backend.classify(example.text)
        for example in examples:
            began = time.perf_counter()
            result = await backend.classify(example.text)
            run.latencies_ms.append((time.perf_counter() - began) * 1000)
            run.predicted.append(result.label)
    finally:
        await backend.close()
    return run


async def onnx_over_grpc(examples: Sequence[Example]) -> Run:
    """Classify RPCs to a real node on 127.0.0.1 that serves only the router."""
    run = Run("ONNX router, Classify RPC to a local node")
    with tempfile.TemporaryDirectory() as state:
        config = NodeConfig(
            host="127.0.0.1",
            port=0,
            advertise=False,
            state_dir=state,
            router=default_router_config(),
            grace_s=1.0,
            agents=(),
        )
        backends = {ROUTER_ALIAS: OnnxBackend(ROUTER_ALIAS, f"bundled:{ROUTER_ALIAS}")}
        daemon = NodeDaemon(config, backends=backends, progress=io.StringIO())  # type: ignore[arg-type]
        await daemon.start()
        channel = create_channel(daemon.address)
        try:
            stub = node_pb2_grpc.NodeServiceStub(channel)
            for example in examples[:10]:
                await stub.Classify(node_pb2.ClassifyRequest(text=example.text), timeout=10)
            for example in examples:
                began = time.perf_counter()
                reply = await stub.Classify(node_pb2.ClassifyRequest(text=example.text), timeout=10)
                run.latencies_ms.append((time.perf_counter() - began) * 1000)
                run.predicted.append(reply.label)
        finally:
            await channel.close()
            await daemon.stop()
    return run


def few_shot(train: Sequence[Example], per_label: int = 2) -> list[Message]:
    """Example turns from the training split: the first `per_label` plain requests of each label."""
    turns = []
    for label in LABELS:
        chosen = [e for e in train if e.label == label and e.difficulty == "normal"][:per_label]
        for example in chosen:
            turns += [
                Message("user", f"Request: {example.text}\nTeam:"),
                Message("assistant", json.dumps(label)),
            ]
    return turns


async def slm(examples: Sequence[Example], train: Sequence[Example], threads: int) -> Run:
    backend = LlamaBackend("smollm2", "bundled:smollm2", n_ctx=2048, n_threads=threads)
    await backend.load()
    run = Run(f"SmolLM2-135M, few-shot + grammar ({threads} threads)")
    shots = few_shot(train)
    try:
        for example in examples:
            request = GenerationInput(
                messages=[
                    Message("system", SLM_SYSTEM),
                    *shots,
                    Message("user", f"Request: {example.text}\nTeam:"),
                ],
                max_tokens=12,
                temperature=0.0,
                json_schema=SLM_SCHEMA,
            )
            began = time.perf_counter()
            text = ""
            async with contextlib.aclosing(backend.stream(request)) as pieces:
                async for piece in pieces:
                    text += piece.text
            run.latencies_ms.append((time.perf_counter() - began) * 1000)
            try:
                label = json.loads(text)
            except json.JSONDecodeError:
                label = "unparsed"
            run.predicted.append(label if label in LABELS else "unparsed")
    finally:
        await backend.close()
    return run


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_router",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--threads", type=int, default=2, help="SmolLM2 inference threads")
    parser.add_argument("--limit", type=int, default=0, help="only the first N held-out requests")
    parser.add_argument("--no-write", action="store_true", help="print, do not touch the report")
    args = parser.parse_args(argv)

    every = load_examples(DATA_PATH)
    examples = [e for e in every if e.split == "test"]
    if args.limit:
        examples = examples[: args.limit]
    gold = [e.label for e in examples]
    hard = [i for i, e in enumerate(examples) if e.difficulty == "hard"]
    runs = [
        asyncio.run(asyncio.wait_for(onnx_in_process(examples), 300)),
        asyncio.run(asyncio.wait_for(onnx_over_grpc(examples), 300)),
        asyncio.run(
            asyncio.wait_for(
                slm(examples, [e for e in every if e.split == "train"], args.threads), 3600
            )
        ),
    ]
    onnx, slm_run = runs[0], runs[-1]
    speedup = percentile(slm_run.latencies_ms, 50) / max(percentile(onnx.latencies_ms, 50), 1e-9)
    unparsed = slm_run.predicted.count("unparsed")
    answers = ", ".join(f"{label} {slm_run.predicted.count(label)}" for label in LABELS)
    limit = f" --limit {args.limit}" if args.limit else ""
    body = "\n".join(
        [
            f"Command: `python -m bench.bench_router --threads {args.threads}{limit}`",
            f"({machine_line()}; {len(examples)} held-out requests, {len(hard)} of them hard, one at a "
            f"time; ONNX Runtime 1 thread, CPU; 1-minute load average {os.getloadavg()[0]:.1f} at the "
            "end: other work on the machine inflates the SLM's times most)",
            "",
            "| classifier | accuracy | on hard requests | latency p50 | latency p99 |",
            "|---|---|---|---|---|",
            *[run.row(gold, hard) for run in runs],
            "",
            f"The ONNX router is {speedup:,.0f}x faster than asking the SLM (p50, in process) and "
            f"{'more' if accuracy(onnx.predicted, gold) > accuracy(slm_run.predicted, gold) else 'not more'}"
            " accurate. The SLM sees a system prompt describing the three teams and two example "
            "requests per team from the training split, and may only answer one of the three label "
            "strings (JSON-schema grammar)"
            f"{'' if not unparsed else f'; {unparsed} answers were unparsable'}. Latency is the whole "
            "request (prompt processing included); the RPC row adds gRPC on 127.0.0.1. The SLM's "
            f"answers: {answers} (true: "
            + ", ".join(f"{label} {gold.count(label)}" for label in LABELS)
            + ").",
        ]
    )
    print(body)
    if not args.no_write:
        update_file_section(REPORT, [SECTION], SUBSECTION, body)
        print(f"\nupdated {REPORT}: {SECTION} / {SUBSECTION}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
