"""Tasks through the coordinator: `mesh.coordinator_client.MeshClient`.

A model task, an agent task with its steps, and an agent task streamed with `agent="auto"`
(the coordinator asks a node's intent router which agent to run). Start a node (it serves the
intent router unless started with `--no-router`) and a coordinator that knows it, then run this script
with either of the coordinator's gRPC addresses (Ray Serve's proxy, default port 9000, or the
direct fast path; `mesh coordinator start` prints both):

    .venv/bin/mesh node start --host 127.0.0.1 --port 50051 --no-advertise
    .venv/bin/mesh coordinator start --node 127.0.0.1:50051 --no-mdns
    .venv/bin/python examples/mesh_submit.py 127.0.0.1:9000
"""

from __future__ import annotations

import argparse
import asyncio

from mesh.coordinator_client import MeshClient


async def main(address: str) -> None:
    async with MeshClient(address, timeout_s=120) as mesh:
        reply = await mesh.submit(
            "What is the capital city of France?", model="smollm2", temperature=0, max_tokens=24
        )
        print(
            f"answer: {reply.text.strip()} (node {reply.node_name}, "
            f"{len(reply.attempts)} attempt(s), failed over: {reply.failed_over})"
        )

        reply = await mesh.submit("What is the status of order 1042?", agent="customer-service")
        print(f"agent answer: {reply.text} (node {reply.node_name}, tier {reply.tier})")
        for step in reply.steps:
            print(
                f"  step {step.index} {step.kind} {step.call.tool} "
                f"{step.call.arguments_json} -> {step.result_json}"
            )

        question = "My printer shows error E-04, how do I fix it?"
        async for chunk in mesh.submit_stream(question, agent="auto", deadline_s=120):
            if chunk.HasField("step"):  # as soon as the node completed it
                print(
                    f"  streamed step {chunk.step.index} {chunk.step.kind} {chunk.step.call.tool}"
                )
            elif chunk.HasField("result"):  # the last chunk
                result = chunk.result
                print(f"\nagent {result.agent}, routed by {result.routed_by}, tier {result.tier}")
            else:
                print(chunk.text, end="", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "address", nargs="?", default="127.0.0.1:9000", help="coordinator gRPC host:port"
    )
    asyncio.run(main(parser.parse_args().address))
