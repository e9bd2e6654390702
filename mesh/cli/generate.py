"""`mesh generate ADDRESS PROMPT`: ask one node directly."""

from __future__ import annotations

import argparse
import sys

from mesh.cli._common import message_to_dict, print_json, run_async


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="ask a node for a completion")
    parser.add_argument("address", help="host:port of the node")
    parser.add_argument("prompt", help="the question or instruction")
    parser.add_argument("--model", default="", help="model alias (default: the node's default)")
    parser.add_argument("--max-tokens", type=int, help="most tokens to generate")
    parser.add_argument("--temperature", type=float, help="0 for deterministic output")
    parser.add_argument("--system", help="a system message")
    parser.add_argument("--stream", action="store_true", help="print text as it is generated")
    parser.add_argument(
        "--json", action="store_true", help="print JSON (with --stream: one per line)"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds (default 120)")
    parser.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    from mesh.client import NodeClient

    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": args.prompt})
    options = dict(
        messages=messages,
        model=args.model,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
    )

    async def unary() -> int:
        async with NodeClient(args.address, timeout_s=args.timeout) as client:
            reply = await client.generate(**options)
        if args.json:
            print_json(reply)
        else:
            print(reply.text)
        return 0

    async def stream() -> int:
        async with NodeClient(args.address, timeout_s=args.timeout) as client:
            async for chunk in client.generate_stream(**options):
                if args.json:
                    import json

                    print(json.dumps(message_to_dict(chunk)), flush=True)
                elif chunk.HasField("final"):
                    f = chunk.final
                    print(
                        f"\n[{f.usage.completion_tokens} tokens, {f.finish_reason}, "
                        f"first token {f.timing.time_to_first_token_ms:.0f} ms, "
                        f"{f.timing.tokens_per_second:.1f} tokens/s]",
                        file=sys.stderr,
                    )
                else:
                    print(chunk.text, end="", flush=True)
        return 0

    result = run_async(stream if args.stream else unary)
    return int(result)
