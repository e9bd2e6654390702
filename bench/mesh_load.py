"""A load driver for the mesh, meant to run next to the coordinator (in a network namespace in
tests/netns_mesh.py): submits tasks and reports each answer, and what the coordinator says of
its nodes, as JSON lines stamped with CLOCK_MONOTONIC (the same clock in every namespace).

    python -m bench.mesh_load --coordinator 198.18.0.2:40123 --tasks 60 --concurrency 8 \\
        --prefix cut --wait-ready 3

Lines: {"event": "ready", ...} once --wait-ready nodes are ready; {"event": "node", "name",
"state", "at"} whenever the coordinator's view of a node changes; {"event": "answered",
"index", "task_id", "node", "submitted", "answered", "attempts": [[node, outcome, ms,
detail], ...]} or {"event": "failed", ..., "error"} per task; {"event": "done"} at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time

from mesh.coordinator_client import MeshClient
from mesh.core.errors import MeshError

QUESTIONS = (
    "What is the capital city of France?",
    "Name a primary colour.",
    "What do bees make?",
    "How many days are in a week?",
)


def _say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


async def _watch_nodes(client: MeshClient, interval_s: float) -> None:
    """Report every change of a node's state in the coordinator's table."""
    known: dict[str, str] = {}
    while True:
        try:
            nodes = await client.list_nodes(timeout_s=5)
        except MeshError as error:  # the coordinator is busy or restarting: try again
            _say(event="watch_error", error=str(error), at=time.monotonic())
            await asyncio.sleep(interval_s)
            continue
        at = time.monotonic()
        for node in nodes:
            if known.get(node.name) != node.state:
                known[node.name] = node.state
                _say(event="node", name=node.name, state=node.state, at=at)
        await asyncio.sleep(interval_s)


async def _wait_ready(client: MeshClient, count: int, timeout_s: float) -> None:
    give_up = time.monotonic() + timeout_s
    while True:
        ready = sorted(n.name for n in await client.list_nodes() if n.state == "ready")
        if len(ready) >= count:
            _say(event="ready", nodes=ready, at=time.monotonic())
            return
        if time.monotonic() > give_up:
            raise TimeoutError(f"only {ready} ready after {timeout_s:g} s")
        await asyncio.sleep(0.1)


async def _one(client: MeshClient, index: int, args: argparse.Namespace) -> None:
    task_id = f"{args.prefix}-{index}-{time.monotonic_ns()}"
    submitted = time.monotonic()
    try:
        result = await client.submit(
            QUESTIONS[index % len(QUESTIONS)],
            model=args.model,
            temperature=0,
            max_tokens=args.max_tokens,
            deadline_s=args.deadline_s,
            task_id=task_id,
        )
    except MeshError as error:
        _say(event="failed", index=index, task_id=task_id, error=str(error))
        return
    _say(
        event="answered",
        index=index,
        task_id=task_id,
        node=result.node_name,
        submitted=submitted,
        answered=time.monotonic(),
        attempts=[[a.node_name, a.outcome, a.duration_ms, a.detail[:200]] for a in result.attempts],
        text=result.text,
    )


async def main_async(args: argparse.Namespace) -> None:
    # A coordinator with a cluster wants an API key: $MESH_API_KEY (never a flag: argv is public).
    async with MeshClient(args.coordinator, api_key=os.environ.get("MESH_API_KEY")) as client:
        if args.wait_ready:
            await _wait_ready(client, args.wait_ready, args.ready_timeout_s)
        watcher = asyncio.create_task(_watch_nodes(client, 0.1))
        gate = asyncio.Semaphore(args.concurrency)

        async def gated(index: int) -> None:
            async with gate:
                await _one(client, index, args)

        try:
            await asyncio.gather(*(gated(i) for i in range(args.tasks)))
            await asyncio.sleep(args.linger_s)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
    _say(event="done", at=time.monotonic())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coordinator", required=True, help="host:port of MeshService")
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--prefix", default="load", help="task ids start with PREFIX-INDEX-")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--deadline-s", type=float, default=120.0)
    parser.add_argument("--wait-ready", type=int, default=0, help="first wait for N ready nodes")
    parser.add_argument("--ready-timeout-s", type=float, default=60.0)
    parser.add_argument("--linger-s", type=float, default=0.0, help="keep watching nodes after")
    args = parser.parse_args(argv)
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
