"""`mesh demo`: the embedded default, end to end on this machine.

Starts a local mesh as child processes, exactly as a user would by hand: a node daemon with the
bundled model (`mesh node start`) and a coordinator on Ray Serve (`mesh coordinator start`)
that knows it. Then it streams the answer to a question through the coordinator, shows which
node answered, and stops both.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

from mesh.cli._common import EXIT_ERROR, run_async

DEFAULT_QUESTION = "What is the capital city of France?"
_SERVING = re.compile(r"serving .* on (\S+)$")
_COORDINATOR = re.compile(r"coordinator ready: grpc (\S+) .* fast path (\S+) http (\S+)")


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


class ChildProcess:
    """A child `mesh` process whose ready line is awaited with a timeout."""

    def __init__(self, args: list[str], ready: re.Pattern[str], timeout_s: float) -> None:
        self.args = args
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mesh.cli", *args], stdout=subprocess.PIPE, text=True
        )
        self.match = self._await_line(ready, timeout_s)

    def _await_line(self, ready: re.Pattern[str], timeout_s: float) -> re.Match[str]:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout_s
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            while (left := deadline - time.monotonic()) > 0:
                if not selector.select(timeout=left):
                    break
                line = self.process.stdout.readline()
                if not line:  # it exited; its error is already on stderr
                    break
                match = ready.search(line.strip())
                if match:
                    return match
        self.stop()
        raise RuntimeError(
            f"`mesh {' '.join(self.args[:2])}` did not get ready "
            f"(exit code {self.process.returncode})"
        )

    def stop(self, timeout_s: float = 60.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextlib.contextmanager
def local_mesh(state_dir: str, *, coordinator: bool, timeout_s: float) -> Iterator[dict[str, str]]:
    """A node (and a coordinator) on 127.0.0.1; yields their addresses; always stops them."""
    say("starting a node with the bundled model (SmolLM2-135M-Instruct) ...")
    node = ChildProcess(
        [
            "node",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-advertise",
            "--state-dir",
            state_dir,
            "--name",
            "demo-node",
        ],
        _SERVING,
        timeout_s,
    )
    try:
        addresses = {"node": node.match.group(1)}
        say(f"node serving on {addresses['node']}")
        if coordinator:
            say("starting the coordinator on Ray Serve (about 10-30 s) ...")
            coord = ChildProcess(
                [
                    "coordinator",
                    "start",
                    "--no-mdns",
                    "--grpc-port",
                    "0",
                    "--http-port",
                    "0",
                    "--num-cpus",
                    "2",
                    "--node",
                    addresses["node"],
                ],
                _COORDINATOR,
                timeout_s,
            )
            addresses.update(
                grpc=coord.match.group(1), fast=coord.match.group(2), http=coord.match.group(3)
            )
            say(f"coordinator ready: gRPC {addresses['grpc']}, OpenAI API {addresses['http']}")
            try:
                yield addresses
            finally:
                say("stopping the coordinator ...")
                coord.stop()
        else:
            yield addresses
    finally:
        node.stop()


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
        except RuntimeError as error:
            say(f"error: {error}")
            return EXIT_ERROR
