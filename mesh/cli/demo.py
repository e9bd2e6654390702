"""`mesh demo`: the embedded default, end to end on this machine.

Starts a node daemon with the bundled model as a child process, waits until it
serves, streams the answer to a question through gRPC, and stops the node.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

from mesh.cli._common import EXIT_ERROR, run_async

DEFAULT_QUESTION = "What is the capital of France?"
_SERVING = re.compile(r"serving .* on (\S+)$")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="start a local node with the bundled model and ask it"
    )
    parser.add_argument("question", nargs="?", default=DEFAULT_QUESTION)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--start-timeout", type=float, default=120.0, help="seconds to wait for the node"
    )
    parser.set_defaults(func=_demo)


def start_local_node(
    state_dir: str, *, extra: list[str] | None = None, timeout_s: float = 120.0
) -> tuple[subprocess.Popen[str], str]:
    """Start `mesh node start` on 127.0.0.1, any free port; return the process and its address."""
    command = [
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
        state_dir,
        "--name",
        "demo-node",
        *(extra or []),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout_s
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break  # the node exited; its error is already on stderr
        match = _SERVING.search(line.strip())
        if match:
            return process, match.group(1)
    process.kill()
    process.wait()
    raise RuntimeError(f"the node did not start (exit code {process.returncode})")


def _demo(args: argparse.Namespace) -> int:
    from mesh.client import NodeClient

    with tempfile.TemporaryDirectory(prefix="mesh-demo-") as state_dir:
        print(
            "starting a local node with the bundled model (SmolLM2-135M-Instruct) ...",
            file=sys.stderr,
            flush=True,
        )
        try:
            process, address = start_local_node(state_dir, timeout_s=args.start_timeout)
        except RuntimeError as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_ERROR
        try:
            print(f"node serving on {address}\n> {args.question}", file=sys.stderr, flush=True)

            async def ask() -> int:
                async with NodeClient(address) as client:
                    async for chunk in client.generate_stream(
                        args.question, max_tokens=args.max_tokens, temperature=0
                    ):
                        if chunk.HasField("final"):
                            f = chunk.final
                            print(
                                f"\n[{f.usage.completion_tokens} tokens in "
                                f"{f.timing.total_ms / 1000:.2f} s, first token after "
                                f"{f.timing.time_to_first_token_ms:.0f} ms, "
                                f"{f.timing.tokens_per_second:.0f} tokens/s]",
                                file=sys.stderr,
                            )
                        else:
                            print(chunk.text, end="", flush=True)
                return 0

            return int(run_async(ask))
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if os.environ.get("MESH_DEMO_VERBOSE"):
                print(f"node exited with {process.returncode}", file=sys.stderr)
