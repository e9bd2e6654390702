"""The official `openai` client, unmodified, against the coordinator's OpenAI-compatible API.

Start a node and a coordinator that knows it, then run this script with the HTTP API's base
URL (`mesh coordinator start` prints it; default http://127.0.0.1:8000/v1):

    .venv/bin/mesh node start --host 127.0.0.1 --port 50051 --no-advertise
    .venv/bin/mesh coordinator start --node 127.0.0.1:50051 --no-mdns
    .venv/bin/python examples/openai_chat.py http://127.0.0.1:8000/v1

The mesh's extensions are optional: an `X-Mesh-Agent` header runs an agent instead of a bare
model, and unary answers carry a `mesh` object (task id, node, attempts; for agents also the
tier, how the agent was chosen and every step). See docs/coordinator.md.
"""

from __future__ import annotations

import argparse

from openai import OpenAI


def main(base_url: str) -> None:
    client = OpenAI(base_url=base_url, api_key="unused", timeout=120, max_retries=0)
    question = [{"role": "user", "content": "What is the capital city of France?"}]

    reply = client.chat.completions.create(
        model="smollm2", messages=question, temperature=0, max_tokens=24
    )
    mesh = (reply.model_extra or {}).get("mesh", {})
    print(f"answer: {reply.choices[0].message.content.strip()} (node {mesh.get('node_name')})")

    print("stream: ", end="", flush=True)
    for chunk in client.chat.completions.create(
        model="smollm2",
        stream=True,
        max_tokens=48,
        messages=[{"role": "user", "content": "Name three French cities."}],
    ):
        for choice in chunk.choices:
            print(choice.delta.content or "", end="", flush=True)
    print()

    reply = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the status of order 1042?"}],
        extra_headers={"X-Mesh-Agent": "customer-service"},
    )
    mesh = (reply.model_extra or {}).get("mesh", {})
    print(f"agent answer: {reply.choices[0].message.content} (agent {mesh.get('agent')})")
    for step in mesh.get("steps", []):
        print(f"  step {step['index']} {step['kind']} {step['tool']} {step['arguments']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "base_url", nargs="?", default="http://127.0.0.1:8000/v1", help="the API's base URL"
    )
    main(parser.parse_args().base_url)
