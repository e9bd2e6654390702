"""Warm agent prefixes: agent task and first-step latency with kept KV states, against today's.

    python -m bench.bench_warm_prefixes [--rounds 2] [--threads 2]

Two real nodes in one process (gRPC on 127.0.0.1), the bundled SmolLM2-135M, the demo agents:
one keeps warm prefixes (`prefix_cache_mb: 64`), the other does not (`0`: what llama.cpp's
own prompt reuse gives, which only keeps the last prompt). The agent scenarios of
bench.bench_agents, in an order that switches agent at every task (a mixed workload: the
context of a node never holds the agent that comes next), `--rounds` times; each task goes to
both nodes in turn, never at once. The first round is warm-up (each agent's prefix, with
each tool its requests select, is evaluated a first time on both nodes) and is left out. Reported: the node's own first step
(the tool-call decision, which reads the whole prefix), and the task as the client sees it.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
import tempfile
import time

from bench._report import machine_line, median, percentile, write_section
from bench.bench_agents import SCENARIOS
from edgemesh.v1 import node_pb2
from mesh.agent_client import run_agent_to_result
from mesh.client import NodeClient
from nodes.config import ModelConfig, NodeConfig
from nodes.daemon import NodeDaemon

SETUPS = {"warm prefixes (prefix_cache_mb 64)": 64, "today (prefix_cache_mb 0)": 0}


def mixed_order() -> list:
    """The scenarios interleaved by agent: no two tasks in a row share an agent."""
    by_agent: dict[str, list] = {}
    for scenario in SCENARIOS:
        by_agent.setdefault(scenario.agent, []).append(scenario)
    order = []
    while any(by_agent.values()):
        for tasks in by_agent.values():
            if tasks:
                order.append(tasks.pop(0))
    return order


async def run(rounds: int, threads: int) -> dict[str, dict[str, list[float]]]:
    results = {name: {"first_step": [], "task": []} for name in SETUPS}
    with tempfile.TemporaryDirectory() as state:
        daemons = {}
        for name, size in SETUPS.items():
            config = NodeConfig(
                host="127.0.0.1",
                port=0,
                advertise=False,
                router=None,
                state_dir=f"{state}/{size}",
                grace_s=1.0,
                models=(
                    ModelConfig(
                        id="smollm2",
                        source="bundled:smollm2",
                        n_ctx=2048,
                        n_threads=threads,
                        prefix_cache_mb=size,
                    ),
                ),
            )
            daemons[name] = NodeDaemon(config, progress=io.StringIO())
            await daemons[name].start()
        try:
            for round_index in range(rounds):
                for scenario in mixed_order():
                    warmup = round_index == 0
                    for name, daemon in daemons.items():
                        async with NodeClient(daemon.address, timeout_s=300) as client:
                            began = time.perf_counter()
                            result = await run_agent_to_result(
                                client,
                                scenario.agent,
                                scenario.request,
                                timeout_s=300,
                                task=node_pb2.TaskContext(task_id=f"warm-{time.time_ns()}"),
                            )
                            task_ms = (time.perf_counter() - began) * 1000
                        if not warmup and result.steps:
                            results[name]["first_step"].append(result.steps[0].duration_ms)
                            results[name]["task"].append(task_ms)
        finally:
            for daemon in daemons.values():
                await daemon.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="the first is warm-up (3)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print, do not update the doc")
    args = parser.parse_args(argv)
    results = asyncio.run(run(args.rounds, args.threads))
    rows = []
    for name, measured in results.items():
        first, task = measured["first_step"], measured["task"]
        rows.append(
            f"| {name} | {median(first):.0f} ms | {percentile(first, 90):.0f} ms | "
            f"{median(task):.0f} ms | {percentile(task, 90):.0f} ms | {len(task)} |"
        )
    warm, cold = (results[name] for name in SETUPS)
    speedup = median(cold["first_step"]) / median(warm["first_step"])
    task_speedup = median(cold["task"]) / median(warm["task"])
    body = f"""Command: `python -m bench.bench_warm_prefixes --rounds {args.rounds} --threads {args.threads}`
({machine_line()}; SmolLM2-135M-Instruct Q4_1, n_ctx 2048, {args.threads} threads, temperature 0;
the demo agents' scenarios in an order that switches agent at every task, each task on both
nodes in turn; the first round left out as warm-up)

| node | first step p50 | p90 | agent task p50 | p90 | tasks |
|---|---|---|---|---|---|
{chr(10).join(rows)}

The first step (the tool-call decision, which reads the agent's whole prefix) is
{speedup:.1f}× faster with warm prefixes at the median, the whole task {task_speedup:.1f}×.
"""
    print(body)
    if not args.no_write:
        write_section("Warm agent prefixes", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
