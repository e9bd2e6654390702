"""Run an agent on one node and print each step as it completes: `mesh.agent_client.run_agent`.

A node started with no configuration offers three demo agents (`customer-service`,
`technical-support`, `scheduling`) over demo data it seeds on first start:

    .venv/bin/mesh node start --host 127.0.0.1 --port 50051 --no-advertise
    .venv/bin/python examples/node_agent.py 127.0.0.1:50051
    .venv/bin/python examples/node_agent.py 127.0.0.1:50051 --agent scheduling "Free slots on Monday?"

With the agent of `examples/shop_agents.py` loaded (see `examples/node.yaml`):

    .venv/bin/python examples/node_agent.py 127.0.0.1:50051 --agent retail-kiosk "Do you have SKU-7 in stock?"
"""

from __future__ import annotations

import argparse
import asyncio

from mesh.agent_client import run_agent
from mesh.client import NodeClient


async def main(address: str, agent: str, request: str) -> None:
    async with NodeClient(address) as node:
        async for event in run_agent(node, agent, request, timeout_s=120):
            if event.HasField("step"):
                step = event.step
                print(
                    f"step {step.index} {step.kind} {step.call.tool} "
                    f"{step.call.arguments_json} -> {step.result_json}"
                )
            elif event.HasField("result"):
                result = event.result
                print(f"answer: {result.answer}")
                print(f"({result.finish_reason}, {len(result.steps)} steps, model {result.model})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", nargs="?", default="127.0.0.1:50051", help="node host:port")
    parser.add_argument(
        "request", nargs="?", default="What is the status of order 1042?", help="the request"
    )
    parser.add_argument("--agent", default="customer-service", help="an agent the node offers")
    args = parser.parse_intermixed_args()
    asyncio.run(main(args.address, args.agent, args.request))
