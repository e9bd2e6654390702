"""Dispatcher replicas benchmark: what sharing tasks between replicas costs, and that it holds.

    python -m bench.bench_replicas [--replicas 2] [--requests 300] [--runs 3]
                                   [--throughput 1000] [--keys 50]

One Ray start: a coordinator with N dispatcher replicas in front of one *instant* fake-model
node (`bench.fake_node`), so the coordinator is what is measured. Side by side in one run,
alternating: minimal requests without an idempotency key (no claim: the one-replica cost) and
with a fresh key each (a claim at the owner, and its outcome reported back), on a replica's fast
path and through Ray Serve's gRPC proxy. Then retries: every key submitted four times at once,
spread over every replica's fast path, and the node's own counter says how often it really ran.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time

from bench._processes import processes
from bench._report import machine_line, median, percentile, write_section
from bench.bench_coordinator import MESSAGES, Call, latencies, throughput
from mesh.local_processes import python_command


def _calls(client: object, counter: itertools.count) -> dict[str, Call]:
    def plain() -> object:
        return client.submit(messages=MESSAGES, model="instant", max_tokens=1)  # type: ignore[attr-defined]

    def keyed() -> object:
        key = f"bench-{next(counter)}"
        return client.submit(  # type: ignore[attr-defined]
            messages=MESSAGES, model="instant", max_tokens=1, idempotency_key=key
        )

    return {"no key": plain, "idempotency key": keyed}


async def measure(running: object, node_address: str, args: argparse.Namespace) -> dict:
    from mesh.client import NodeClient
    from mesh.coordinator_client import MeshClient

    counter = itertools.count()
    fast = [MeshClient(address) for address in running.fast_paths]  # type: ignore[attr-defined]
    proxy = MeshClient(running.grpc_address)  # type: ignore[attr-defined]
    targets: dict[str, Call] = {}
    for path, client in (("fast path", fast[0]), ("Serve gRPC proxy", proxy)):
        for kind, call in _calls(client, counter).items():
            targets[f"{path}, {kind}"] = call
    runs = [await latencies(targets, args.requests) for _ in range(args.runs)]
    rates = {
        name: await throughput(targets[name], args.throughput, 64)
        for name in ("fast path, no key", "fast path, idempotency key")
    }

    async with NodeClient(node_address) as node:
        before = (await node.describe()).load.completed
        began = time.perf_counter()
        submissions = [
            fast[i % len(fast)].submit(
                messages=MESSAGES, model="instant", max_tokens=1, idempotency_key=f"retry-{k}"
            )
            for k in range(args.keys)
            for i in range(4)
        ]
        replies = await asyncio.gather(*submissions)
        retry_s = time.perf_counter() - began
        runs_seen = (await node.describe()).load.completed - before
    answers_per_key = {
        key: {r.task_id for r in replies[key * 4 : key * 4 + 4]} for key in range(args.keys)
    }
    for client in (*fast, proxy):
        await client.close()
    return {
        "runs": runs,
        "rates": rates,
        "retry": (len(submissions), args.keys, runs_seen, retry_s, answers_per_key),
    }


def report(results: dict, args: argparse.Namespace) -> str:
    rows = []
    names = list(results["runs"][0])
    p50 = {n: median([median(r[n]) for r in results["runs"]]) for n in names}
    p99 = {n: median([percentile(r[n], 99) for r in results["runs"]]) for n in names}
    for name in names:
        path = name.split(",")[0]
        base = f"{path}, no key"
        added = (
            "" if name == base else f"+{p50[name] - p50[base]:.2f} / +{p99[name] - p99[base]:.2f}"
        )
        rate = results["rates"].get(name)
        rows.append(
            f"| {name} | {p50[name]:.2f} | {p99[name]:.2f} | {added} | "
            f"{f'{rate:.0f}' if rate else ''} |"
        )
    submitted, keys, ran, retry_s, per_key = results["retry"]
    one_answer = sum(len(ids) == 1 for ids in per_key.values())
    command = " ".join(["python -m bench.bench_replicas", *args.argv])
    return f"""Command: `{command}`
({machine_line()}; {args.replicas} dispatcher replicas, one instant fake-model node)

What sharing tasks between replicas costs (mesh/coordinator/shared_tasks.py): a task with an
idempotency key is claimed at the node-table owner before it runs (one Ray call) and its outcome
reported after (off the caller's path); without a key nothing is called. {args.runs} runs of
{args.requests} sequential minimal requests per target, alternating; the medians of the runs'
p50 and p99. Throughput: {args.throughput} requests with 64 in flight.

| path | p50 ms | p99 ms | added by the key, p50 / p99 ms | req/s at 64 |
|---|---|---|---|---|
{chr(10).join(rows)}

Retries across replicas: {keys} keys, each submitted 4 times at once over the {args.replicas}
replicas' fast paths ({submitted} submissions, {retry_s:.2f} s in all): the node ran **{ran}**
tasks; {one_answer} of {keys} keys got one task id for all four submissions.

At 64 in flight, keyed tasks are bound by the one owner replica: each is two calls through a
Serve deployment handle (the claim before it runs, its outcome after), so a workload where every task carries a
key runs at a fraction of the unkeyed rate; tasks without a key are not slowed. With one
replica (the default) no call is made at all.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--requests", type=int, default=300, help="sequential, per target")
    parser.add_argument("--runs", type=int, default=3, help="latency runs; medians reported")
    parser.add_argument("--throughput", type=int, default=1000, help="requests at 64 in flight")
    parser.add_argument("--keys", type=int, default=50, help="keys in the retry test")
    parser.add_argument(
        "--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone"
    )
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.argv = [a for a in argv if a != "--no-write"]
    from mesh.coordinator.runner import start_coordinator, stop_coordinator
    from mesh.coordinator.settings import CoordinatorConfig, DispatcherSettings

    with processes() as started:
        node_address = started.node(
            python_command("-m", "bench.fake_node", "--name", "instant", "--model", "instant"),
            "instant",
        ).address
        config = CoordinatorConfig(
            static_nodes=(node_address,),
            mdns=False,
            grpc_port=0,
            http_port=0,
            num_cpus=2,
            replicas=args.replicas,
            dispatcher=DispatcherSettings(policy="least_loaded", deadline_s=30),
        )
        try:
            running = start_coordinator(config)
            time.sleep(2.0)  # the node probed and ready on every replica
            results = asyncio.run(measure(running, node_address, args))
        finally:
            stop_coordinator()
    body = report(results, args)
    print(body)
    if not args.no_write:
        write_section("Coordinator replicas", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
