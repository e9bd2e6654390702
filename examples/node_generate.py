"""Ask one node for an answer, then stream another: `mesh.client.NodeClient`.

Start a node, then run this script with its address:

    .venv/bin/mesh node start --host 127.0.0.1 --port 50051 --no-advertise
    .venv/bin/python examples/node_generate.py 127.0.0.1:50051

Errors arrive as the project's own exceptions (`mesh.core.errors`), never as grpc ones: the
last request asks for a model the node does not serve and prints the NotFoundError.
"""

from __future__ import annotations

import argparse
import asyncio

from mesh.client import NodeClient
from mesh.core.errors import NotFoundError


async def main(address: str) -> None:
    async with NodeClient(address, timeout_s=60) as node:
        reply = await node.generate(
            "What is the capital city of France?", temperature=0, max_tokens=24
        )
        print(f"answer: {reply.text.strip()} ({reply.usage.completion_tokens} tokens)")

        print("stream: ", end="", flush=True)
        async for chunk in node.generate_stream(
            "Name three French cities.", temperature=0, max_tokens=48
        ):
            print(chunk.text, end="", flush=True)  # the last chunk has `final` (usage, timing)
        print()

        try:
            await node.generate("Hello!", model="no-such-model")
        except NotFoundError as error:
            print(f"error: {error}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", nargs="?", default="127.0.0.1:50051", help="node host:port")
    asyncio.run(main(parser.parse_args().address))
