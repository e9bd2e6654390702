"""`mesh demo`: the embedded default, end to end on this machine.

Starts a local mesh as child processes, exactly as a user would by hand: a node daemon with the
bundled model (`mesh node start`) and a coordinator on Ray Serve (`mesh coordinator start`)
that knows it. Then it streams the answer to a question through the coordinator, shows which
node answered, and stops both.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from collections.abc import Iterator

from mesh.cli._common import EXIT_ERROR, run_async
from mesh.local_processes import (
    LocalCoordinator,
    LocalNode,
    ProcessStartError,
    coordinator_command,
    local_node_command,
)

DEFAULT_QUESTION = "What is the capital city of France?"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="start a local mesh (node + coordinator) with the bundled model and ask it"
    )
    parser.add_argument("question", nargs="?", default=DEFAULT_QUESTION)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument(
        "--node-only",
        action="store_true",
        help="skip the coordinator: ask the node directly (no Ray)",
    )
    parser.add_argument(
        "--start-timeout",
        type=float,
        default=240.0,
        help="seconds to wait for each process to be ready",
    )
    parser.set_defaults(func=_demo)


@contextlib.contextmanager
def local_mesh(state_dir: str, *, coordinator: bool, timeout_s: float) -> Iterator[dict[str, str]]:
    """A node (and a coordinator) on 127.0.0.1; yields their addresses; always stops them.

    Their stderr is ours: the user sees them load and stop."""
    say("starting a node with the bundled model (SmolLM2-135M-Instruct) ...")
    command = local_node_command(state_dir, name="demo-node")
    with LocalNode.start(
        command, name="`mesh node start`", timeout_s=timeout_s, stop_timeout_s=60.0
    ) as node:
        addresses = {"node": node.address}
        say(f"node serving on {addresses['node']}")
        if not coordinator:
            yield addresses
            return
        say("starting the coordinator on Ray Serve (about 10-30 s) ...")
        with LocalCoordinator.start(
            coordinator_command([node.address]),
            name="`mesh coordinator start`",
            timeout_s=timeout_s,
            stop_timeout_s=60.0,
        ) as coord:
            addresses.update(coord.addresses)
            say(f"coordinator ready: gRPC {addresses['grpc']}, OpenAI API {addresses['http']}")
            try:
                yield addresses
            finally:
                say("stopping the coordinator ...")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def _ask_node(address: str, question: str, max_tokens: int) -> int:
    from mesh.client import NodeClient

    async with NodeClient(address) as client:
        async for chunk in client.generate_stream(question, max_tokens=max_tokens, temperature=0):
            if chunk.HasField("final"):
                f = chunk.final
                say(
                    f"\n[{f.usage.completion_tokens} tokens in {f.timing.total_ms / 1000:.2f} s, "
                    f"first token after {f.timing.time_to_first_token_ms:.0f} ms]"
                )
            else:
                print(chunk.text, end="", flush=True)
    return 0


async def _ask_mesh(address: str, question: str, max_tokens: int) -> int:
    from mesh.coordinator_client import MeshClient

    async with MeshClient(address) as client:
        async for chunk in client.submit_stream(
            question, model="smollm2", max_tokens=max_tokens, temperature=0
        ):
            if chunk.HasField("result"):
                r = chunk.result
                say(
                    f"\n[task {r.task_id}: answered by node {r.node_name or r.node_id}, "
                    f"{r.usage.completion_tokens} tokens in {r.total_ms / 1000:.2f} s, "
                    f"{len(r.attempts)} attempt(s)]"
                )
            else:
                print(chunk.text, end="", flush=True)
    return 0


def _demo(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="mesh-demo-") as state_dir:
        try:
            with local_mesh(
                state_dir, coordinator=not args.node_only, timeout_s=args.start_timeout
            ) as addresses:
                say(f"> {args.question}")
                if args.node_only:
                    return int(
                        run_async(
                            lambda: _ask_node(addresses["node"], args.question, args.max_tokens)
                        )
                    )
                return int(
                    run_async(lambda: _ask_mesh(addresses["grpc"], args.question, args.max_tokens))
                )
        except ProcessStartError as error:
            say(f"error: {error}")
            return EXIT_ERROR
