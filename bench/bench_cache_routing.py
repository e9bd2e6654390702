"""Cache-aware against latency-aware routing: agent tasks over two nodes with small prefix caches.

    python -m bench.bench_cache_routing [--rounds 3] [--cache-mb 8]

Two real nodes in this process (gRPC on 127.0.0.1, the bundled SmolLM2-135M, one thread each,
warm prefixes limited to `--cache-mb` each: room for about two agent prefixes, as on a device
short of memory: `--cache-mb`) behind a Dispatcher, for each policy in turn on fresh nodes. The agent
scenarios of bench.bench_agents, in an order that switches agent at every task, `--concurrency`
at a time (1: one kiosk's stream of requests);
`--rounds` times, the first as warm-up. Reported: the nodes' own first steps, the tasks as
the client sees them, and how the agents spread over the nodes.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
import tempfile
import time
from collections import Counter

from bench._report import machine_line, median, percentile, write_section
from bench.bench_warm_prefixes import mixed_order
from mesh.coordinator.dispatch import Dispatcher
from mesh.coordinator.settings import DispatcherSettings
from mesh.coordinator.tasks import build_task
from mesh.health import ready_view
from nodes.config import ModelConfig, NodeConfig
from nodes.daemon import NodeDaemon

POLICIES = ("latency_aware", "cache_aware")


async def one_policy(
    policy: str, rounds: int, cache_mb: int, concurrency: int
) -> dict[str, object]:
    first_steps: list[float] = []
    tasks: list[float] = []
    spread: Counter[tuple[str, str]] = Counter()
    with tempfile.TemporaryDirectory() as state:
        daemons = [
            NodeDaemon(
                NodeConfig(
                    name=f"node-{index}",
                    host="127.0.0.1",
                    port=0,
                    advertise=False,
                    router=None,
                    state_dir=f"{state}/{index}",
                    grace_s=1.0,
                    models=(
                        ModelConfig(
                            id="smollm2",
                            source="bundled:smollm2",
                            n_ctx=2048,
                            n_threads=1,
                            prefix_cache_mb=cache_mb,
                        ),
                    ),
                ),
                progress=io.StringIO(),
            )
            for index in (1, 2)
        ]
        for daemon in daemons:
            await daemon.start()
        dispatcher = Dispatcher(DispatcherSettings(policy=policy, deadline_s=300))
        dispatcher.update_nodes([await ready_view(d.address) for d in daemons])
        gate = asyncio.Semaphore(concurrency)

        async def run(scenario, measured: bool) -> None:
            async with gate:
                began = time.perf_counter()
                result = await dispatcher.submit(build_task(scenario.request, agent=scenario.agent))
                if measured and result.steps:
                    tasks.append((time.perf_counter() - began) * 1000)
                    first_steps.append(result.steps[0].duration_ms)
                    spread[(scenario.agent, result.node_name)] += 1

        try:
            for round_index in range(rounds):
                await asyncio.gather(*(run(s, round_index > 0) for s in mixed_order()))
        finally:
            await dispatcher.close()
            for daemon in daemons:
                await daemon.stop()
    return {"first": first_steps, "task": tasks, "spread": spread}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="the first is warm-up (3)")
    parser.add_argument("--cache-mb", type=int, default=12, help="about two agent prefixes")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="print, do not update the doc")
    args = parser.parse_args(argv)
    results = {
        p: asyncio.run(one_policy(p, args.rounds, args.cache_mb, args.concurrency))
        for p in POLICIES
    }
    rows, spreads = [], []
    for policy, measured in results.items():
        first, task = measured["first"], measured["task"]
        assert isinstance(first, list) and isinstance(task, list)
        rows.append(
            f"| {policy} | {median(first):.0f} ms | {percentile(first, 90):.0f} ms | "
            f"{median(task):.0f} ms | {percentile(task, 90):.0f} ms | {len(task)} |"
        )
        spread = measured["spread"]
        assert isinstance(spread, Counter)
        spreads.append(
            f"- {policy}: "
            + ", ".join(f"{agent} on {node} ×{n}" for (agent, node), n in sorted(spread.items()))
        )
    body = f"""Command: `python -m bench.bench_cache_routing --rounds {args.rounds} --cache-mb {args.cache_mb} --concurrency {args.concurrency}`
({machine_line()}; two nodes in one process, SmolLM2-135M-Instruct Q4_1, one thread each,
warm prefixes capped at {args.cache_mb} MB a node; the agent scenarios switching agent at every
task, {args.concurrency} at a time, the first round as warm-up; each policy on fresh nodes, one
after the other)

| policy | first step p50 | p90 | agent task p50 | p90 | tasks |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Where the agents ran (measured rounds):
{chr(10).join(spreads)}
"""
    print(body)
    if not args.no_write:
        write_section("Cache-aware routing", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
