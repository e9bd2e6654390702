"""`mesh nodes`: the nodes the coordinator knows, with state, load and measured speed."""

from __future__ import annotations

import argparse

from mesh.cli._common import (
    add_api_key_argument,
    api_key_of,
    message_to_dict,
    print_json,
    run_async,
)
from mesh.cli.coordinator import DEFAULT_ENDPOINT
from mesh.core.untrusted import printable

_NAME_CHARS = 64


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("nodes", help="list the nodes the coordinator knows")
    parser.add_argument(
        "--coordinator",
        default=DEFAULT_ENDPOINT,
        metavar="ADDRESS",
        help=f"coordinator gRPC address (default {DEFAULT_ENDPOINT})",
    )
    add_api_key_argument(parser)
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=_nodes)


def _nodes(args: argparse.Namespace) -> int:
    from mesh.coordinator_client import MeshClient

    async def show() -> int:
        async with MeshClient(args.coordinator, api_key=api_key_of(args)) as client:
            nodes = await client.list_nodes()
        if args.json:
            print_json([message_to_dict(node) for node in nodes])
            return 0
        print(
            f"{'NAME':<16} {'STATE':<8} {'ADDRESS':<22} {'MODELS':<18} {'LOAD':>7} "
            f"{'MS/TOK':>7} {'TOK/S':>6} SOURCE"
        )
        for node in nodes:
            load = (
                f"{node.load.in_flight + node.load.queued}/"
                f"{node.capacity.max_concurrent + node.capacity.max_queued}"
            )
            speed = f"{node.ewma_ms_per_token:.1f}" if node.ewma_ms_per_token else "-"
            # What the node measured itself decoding its first model (nodes/capability.py).
            rates = [
                node.decode_tokens_per_s[m] for m in node.models if m in node.decode_tokens_per_s
            ]
            measured = f"{rates[0]:.0f}" if rates else "-"
            state = printable(node.state, 16) + ("*" if node.cooling_down else "")
            # Names, addresses and models come from the nodes: escaped, never raw escapes.
            name, address = printable(node.name, _NAME_CHARS), printable(node.address, 64)
            models = printable(",".join(node.models), 80)
            print(
                f"{name:<16} {state:<8} {address:<22} "
                f"{models:<18} {load:>7} {speed:>7} {measured:>6} {printable(node.source, 16)}"
            )
        if any(node.cooling_down for node in nodes):
            print("* cooling down after repeated failures")
        return 0

    return int(run_async(show))
