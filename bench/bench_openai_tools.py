"""Tool-call accuracy through the OpenAI API: the agent scenarios, as an agent framework sends them.

    python -m bench.bench_openai_tools [--runs 2] [--threads 2]

The scenarios of bench.bench_agents (request, the tool and arguments a correct agent calls).
Each is sent to `/v1/chat/completions` with the scenario agent's tools declared as OpenAI
function tools (names, descriptions and parameter schemas of the node's own tools), the way
an agent framework sends its tools, once with `tool_choice: "auto"` and once with
`"required"`. A real node (the bundled SmolLM2-135M) behind a Dispatcher and the OpenAI app
(uvicorn on 127.0.0.1, no Ray), the official `openai` client. Only the first reply is judged:
did it call the right function with the right arguments. The tools are not run.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import tempfile
import time
from collections import Counter
from typing import Any

from bench._report import machine_line, median, percentile, write_section
from bench.bench_agents import SCENARIOS, Scenario
from nodes.agents import DEMO_AGENTS
from nodes.tools import builtin_registry

CHOICES = ("auto", "required")


def openai_tools(agent: str) -> list[dict[str, Any]]:
    """The agent's tools as OpenAI function tools."""
    spec = next(a for a in DEMO_AGENTS if a.name == agent)
    registry = builtin_registry()
    return [
        {
            "type": "function",
            "function": {
                "name": t.name,
                "description": t.description,
                "parameters": dict(t.parameters),
            },
        }
        for t in (registry.get(name) for name in spec.tools)
    ]


def judged(scenario: Scenario, message: Any) -> tuple[bool, bool, str]:
    """(right tool, right arguments, what it did instead)."""
    calls = message.tool_calls or []
    if not calls:
        return False, False, f"answered: {(message.content or '')[:60]!r}"
    call = calls[0].function
    arguments = json.loads(call.arguments)
    tool_ok = call.name == scenario.tool
    arguments_ok = tool_ok and all(arguments.get(k) == v for k, v in scenario.arguments.items())
    return tool_ok, arguments_ok, f"{call.name}({call.arguments})"


async def run(
    runs: int, threads: int
) -> tuple[dict[str, Counter[str]], dict[str, list[float]], list[str]]:
    import openai
    import uvicorn

    from mesh.coordinator.dispatch import Dispatcher
    from mesh.coordinator.openai_api import build_openai_app
    from mesh.coordinator.settings import DispatcherSettings
    from mesh.registry import NodeRegistry
    from nodes.config import ModelConfig, NodeConfig
    from nodes.daemon import NodeDaemon

    tallies = {choice: Counter[str]() for choice in CHOICES}
    latencies: dict[str, list[float]] = {choice: [] for choice in CHOICES}
    misses: list[str] = []
    with tempfile.TemporaryDirectory() as state_dir:
        config = NodeConfig(
            host="127.0.0.1",
            port=0,
            advertise=False,
            state_dir=state_dir,
            grace_s=1.0,
            models=(
                ModelConfig(id="smollm2", source="bundled:smollm2", n_ctx=2048, n_threads=threads),
            ),
        )
        daemon = NodeDaemon(config, progress=io.StringIO())
        await daemon.start()
        registry = NodeRegistry(static_addresses=[daemon.address])
        dispatcher = Dispatcher(DispatcherSettings(deadline_s=300, attempt_timeout_s=120))
        registry.subscribe(lambda _event: dispatcher.update_nodes(registry.snapshot()))
        await registry.start()
        server = uvicorn.Server(
            uvicorn.Config(
                build_openai_app(dispatcher), host="127.0.0.1", port=0, log_level="warning"
            )
        )
        serving = asyncio.create_task(server.serve())
        try:
            while not server.started or not dispatcher.models():  # noqa: ASYNC110 - uvicorn has no ready event
                await asyncio.sleep(0.05)
            port = server.servers[0].sockets[0].getsockname()[1]
            client = openai.AsyncOpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0
            )
            for _ in range(runs):
                for scenario in SCENARIOS:
                    for choice in CHOICES:
                        began = time.perf_counter()
                        reply = await client.chat.completions.create(
                            model="smollm2",
                            messages=[{"role": "user", "content": scenario.request}],
                            tools=openai_tools(scenario.agent),  # type: ignore[arg-type]
                            tool_choice=choice,  # type: ignore[arg-type]
                            temperature=0,
                            max_tokens=96,
                            timeout=300,
                        )
                        latencies[choice].append((time.perf_counter() - began) * 1000)
                        tool_ok, arguments_ok, did = judged(scenario, reply.choices[0].message)
                        tallies[choice].update(tasks=1, tool=tool_ok, arguments=arguments_ok)
                        if not arguments_ok:
                            misses.append(f"{choice}: {scenario.request!r} -> {did}")
        finally:
            server.should_exit = True
            await asyncio.wait_for(serving, 10)
            await dispatcher.close()
            await registry.stop()
            await daemon.stop()
    return tallies, latencies, misses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print, do not update the doc")
    args = parser.parse_args(argv)
    tallies, latencies, misses = asyncio.run(run(args.runs, args.threads))
    rows = []
    for choice in CHOICES:
        t, ms = tallies[choice], latencies[choice]
        rows.append(
            f"| {choice} | {t['tool']}/{t['tasks']} | {t['arguments']}/{t['tasks']} | "
            f"{median(ms):.0f} ms (p90 {percentile(ms, 90):.0f}) |"
        )
    listed = "\n".join(f"- {m}" for m in dict.fromkeys(misses)) or "- none"
    body = f"""Command: `python -m bench.bench_openai_tools --runs {args.runs} --threads {args.threads}`
({machine_line()}; SmolLM2-135M-Instruct Q4_1, {args.threads} threads, temperature 0; one node
behind a Dispatcher and the OpenAI app, the official `openai` client)

The {len(SCENARIOS)} agent scenarios of the Agents section × {args.runs} runs, each sent to
`/v1/chat/completions` with the agent's tools as OpenAI function tools (2 or 3 per request)
and no worked example, as an agent framework sends them; the first reply is judged.

| tool_choice | right function | right arguments | reply |
|---|---|---|---|
{chr(10).join(rows)}

Misses:
{listed}
"""
    print(body)
    if not args.no_write:
        write_section("Tool calls through the OpenAI API", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
