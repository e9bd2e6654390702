"""What traces cost on the fast path: added latency with tracing off, sampled and always on.

    python -m bench.bench_tracing [--requests 400] [--sampled 0.1] [--no-write]

Behind every coordinator: one *instant* fake-model node (a real NodeDaemon whose backend
answers at once, `bench.fake_node`), so that what is measured is the coordinator and the node's
own bookkeeping, not a model. Three coordinators without Ray (a Dispatcher and its gRPC fast
path, each in a process of its own: `--serve RATIO NODE`), with `trace_sample_ratio` 0 (off),
`--sampled` and 1 (always). The node follows the coordinator's decision (the traceparent's
sampled flag). Metrics are on in every row (they have no switch). Requests alternate between
the direct node and the three coordinators, so drift hits all of them alike; one run, medians.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time

from bench._processes import processes
from bench._report import machine_line, median, percentile, write_section
from bench.bench_coordinator import MESSAGES, latencies
from mesh.local_processes import python_command


def serve(ratio: float, node: str) -> int:
    """A coordinator without Ray at `ratio`: prints `ready GRPC_ADDRESS`, serves until killed."""
    from mesh.coordinator.dispatch import Dispatcher
    from mesh.coordinator.service import MeshHandlers, start_fast_path
    from mesh.coordinator.settings import DispatcherSettings
    from mesh.health import ready_view

    async def run() -> None:
        dispatcher = Dispatcher(DispatcherSettings(trace_sample_ratio=ratio))
        view = await ready_view(node)
        dispatcher.update_nodes([view])
        server, port = await start_fast_path(MeshHandlers(dispatcher), "127.0.0.1:0")
        print(f"ready 127.0.0.1:{port}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop(0)
            await dispatcher.close()

    asyncio.run(run())
    return 0


async def measure(node: str, coordinators: dict[str, str], requests: int) -> dict[str, list[float]]:
    from mesh.client import NodeClient
    from mesh.coordinator_client import MeshClient

    clients = {name: MeshClient(address) for name, address in coordinators.items()}
    async with NodeClient(node) as direct:

        def mesh(client: MeshClient):  # noqa: ANN202 - a zero-argument coroutine factory
            return lambda: client.submit(messages=MESSAGES, model="smollm2", max_tokens=20)

        targets = {
            "direct node (gRPC)": lambda: direct.generate(
                messages=MESSAGES, model="smollm2", max_tokens=20
            ),
            **{name: mesh(client) for name, client in clients.items()},
        }
        try:
            return await latencies(targets, requests)
        finally:
            for client in clients.values():
                await client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=400, help="per path (default 400)")
    parser.add_argument("--sampled", type=float, default=0.1, help="the sampled ratio (0.1)")
    parser.add_argument("--no-write", action="store_true", help="print, do not update the doc")
    parser.add_argument("--serve", nargs=2, metavar=("RATIO", "NODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve(float(args.serve[0]), args.serve[1])

    ratios = {
        "fast path, tracing off (ratio 0)": 0.0,
        f"fast path, sampled (ratio {args.sampled:g})": args.sampled,
        "fast path, always on (ratio 1)": 1.0,
    }
    with processes() as started, tempfile.TemporaryDirectory():
        node = started.node(
            python_command("-m", "bench.fake_node", "--name", "instant", "--max-concurrent", "64"),
            "instant",
        )
        children: list[subprocess.Popen[str]] = []
        try:
            coordinators = {}
            for name, ratio in ratios.items():
                child = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "bench.bench_tracing",
                        "--serve",
                        str(ratio),
                        node.address,
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                children.append(child)
                assert child.stdout is not None
                line = child.stdout.readline().split()
                if len(line) != 2 or line[0] != "ready":
                    raise RuntimeError(f"the coordinator at ratio {ratio} did not start")
                coordinators[name] = line[1]
            began = time.monotonic()
            samples = asyncio.run(measure(node.address, coordinators, args.requests))
            elapsed_s = time.monotonic() - began
        finally:
            for child in children:
                child.kill()
                child.wait(10)

    direct = samples["direct node (gRPC)"]
    rows = [
        "| path | p50 ms | p99 ms | added p50 ms | added p99 ms |",
        "|---|---|---|---|---|",
    ]
    for name, values in samples.items():
        p50, p99 = median(values), percentile(values, 99)
        added = (
            ""
            if values is direct
            else f" +{p50 - median(direct):.2f} | +{p99 - percentile(direct, 99):.2f} |"
        )
        rows.append(f"| {name} | {p50:.2f} | {p99:.2f} |" + (added or "  |  |"))
    body = (
        f"Command: `python -m bench.bench_tracing --requests {args.requests} "
        f"--sampled {args.sampled:g}`\n"
        f"({machine_line()}; {args.requests} sequential requests per path, alternating, "
        f"max_tokens 20 from an instant fake-model node; {elapsed_s:.0f} s)\n\n" + "\n".join(rows)
    )
    print(body)
    if not args.no_write:
        write_section("Tracing on the fast path", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
