"""Link loss under load: a node's cable pulled while the mesh runs tasks, across network
namespaces with mDNS discovery (needs root and iproute2; starts Ray).

    python -m bench.bench_link_loss --rounds 3 --tasks 60 --concurrency 8

Three real nodes (bundled SmolLM2, one thread each, 1 running + 8 queued) and `mesh coordinator
start` (its own Ray, 2 CPUs) in network namespaces on one bridge; the coordinator finds the
nodes by mDNS alone. Per round: the load driver (bench/mesh_load.py) runs `--tasks` unary tasks
(`--max-tokens` each, temperature 0) at `--concurrency` next to the coordinator; after
`--cut-after` answers the cable of the node that gave the last one is pulled (its veth down: no
reset, no goodbye). The cable goes back in once the coordinator has declared the node gone and
the node is idle; the next round waits until it is ready again. Reported per task that was in
flight on the cut node: cable pulled -> its attempt there ended (the task moved on) and -> its
answer; and per round: -> the node declared gone, cable back -> ready. Every task's answer is
checked once by the nodes' own counts (tests/exactly_once.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench._report import machine_line, median, write_section

TITLE = "Link loss under load"


def _fmt(values: Sequence[float]) -> str:
    if not values:
        return "none"
    return f"{median(values):.2f} s | {max(values):.2f} s | {len(values)}"


def _inline(values: Sequence[float]) -> str:
    if not values:
        return "none"
    return f"p50 {median(values):.2f} s, max {max(values):.2f} s ({len(values)})"


def run_rounds(rounds: int, tasks: int, concurrency: int, cut_after: int, max_tokens: int) -> dict:
    from tests.exactly_once import LostWindow, check_exactly_once
    from tests.netns_mesh import NetnsMesh, cut_under_load

    found: dict = {
        "rerouted": [],
        "answered": [],
        "gone": [],
        "back": [],
        "sent_after": 0,
        "used_again": 0,
        "orphans": 0,
        "tasks": 0,
        "failed": 0,
    }
    with tempfile.TemporaryDirectory() as directory, NetnsMesh.create(Path(directory)) as mesh:
        for index in range(rounds):
            node = mesh.nodes[index % len(mesh.nodes)].name
            report = cut_under_load(
                mesh,
                tasks=tasks,
                concurrency=concurrency,
                cut_after=cut_after,
                prefix=f"round{index}",
                node=node,
                max_tokens=max_tokens,
            )
            print(report.summary(), flush=True)
            lost = [LostWindow(report.node, report.cut_unix_s, report.back_unix_s)]
            verdict = check_exactly_once(
                [e["task_id"] for e in report.answered],
                [n.counts() for n in mesh.nodes],
                lost=lost,
            )
            found["rerouted"] += report.rerouted_s
            found["answered"] += report.answered_after_s
            found["gone"].append(report.gone_after_s)
            found["back"].append(report.ready_after_s)
            found["used_again"] += report.answered_after_back
            found["sent_after"] += report.sent_after_cut
            found["orphans"] += len(verdict.excused)
            found["tasks"] += len(report.answered)
            found["failed"] += len(report.failed)
    return found


def render(argv: Sequence[str], found: dict, args: argparse.Namespace) -> str:
    command = "python -m bench.bench_link_loss " + " ".join(argv)
    from mesh.core.channels import NODE_LINK_HEARTBEAT_MS, NODE_LINK_OPTIONS

    options = dict(NODE_LINK_OPTIONS)
    return "\n".join(
        [
            f"Command: `{command.strip()}`",
            f"({machine_line()})",
            "",
            "Three real nodes (bundled SmolLM2, 1 thread, 1 running + 8 queued each) and the "
            "coordinator (own Ray, 2 CPUs) in network namespaces on one bridge, nodes found by "
            f"mDNS only; {args.rounds} rounds of {args.tasks} unary tasks ({args.max_tokens} "
            f"tokens) at {args.concurrency} in flight; after {args.cut_after} answers one "
            "node's cable is pulled (veth down: no reset, no goodbye). Clocks: CLOCK_MONOTONIC, "
            "shared by all namespaces; a task's attempt spans are laid end to end from its "
            "submission (the driver's clock) using the coordinator's attempt durations.",
            "",
            "| from the cable pulled to | p50 | max | n (tasks; those on one node move together) |",
            "|---|---|---|---|",
            f"| a task in flight on the cut node moved on (its attempt there failed) | {_fmt(found['rerouted'])} |",
            f"| that task's answer (from another node) | {_fmt(found['answered'])} |",
            f"| the node declared gone by the registry (before: when in-flight tasks moved) | {_fmt(found['gone'])} |",
            "",
            "| also | value |",
            "|---|---|",
            f"| cable back in -> the node ready again | {_inline(found['back'])} |",
            f"| tasks the node answered after its cable was back in, same run | {found['used_again']} |",
            f"| tasks answered / failed | {found['tasks']} / {found['failed']} |",
            f"| tasks sent to the cut node after the cut (before it was noticed), moved on too | {found['sent_after']} |",
            f"| tasks the cut node finished with no one left to receive them (work lost, answered elsewhere) | {found['orphans']} |",
            "",
            "Every task ran to completion once by the nodes' own counts, apart from those the cut "
            "node finished behind its pulled cable (tests/exactly_once.py). In-flight tasks move "
            "on the coordinator->node link's keepalive (`NODE_LINK_OPTIONS`: ping after "
            f"{options['grpc.keepalive_time_ms']} ms without reads, give up "
            f"{options['grpc.keepalive_timeout_ms']} ms later; the link holds a Heartbeat "
            f"stream, a beat every {NODE_LINK_HEARTBEAT_MS} ms, while it has calls in flight, "
            "because a gRPC client pings at most once a second on a link that receives no data "
            "and a unary call receives nothing until its answer), not on the registry's "
            "verdict: before this, they waited for the node to be declared gone (that row). "
            "The tasks in flight on one node share its link, so they move at the same moment. "
            "Their answers then wait their turn on the remaining nodes (1 running each).",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_link_loss")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=60)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--cut-after", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument(
        "--no-write", action="store_true", help="print, do not edit docs/BENCHMARKS.md"
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    from tests.netns import skip_reason

    skipped = skip_reason()
    if skipped is not None:
        print(f"{TITLE}: skipped ({skipped})")
        return 0
    found = run_rounds(args.rounds, args.tasks, args.concurrency, args.cut_after, args.max_tokens)
    body = render(argv, found, args)
    print(body)
    if not args.no_write:
        write_section(TITLE, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
