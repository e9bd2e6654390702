"""Coordinator benchmark: added latency, throughput and failover, side by side with LiteLLM.

    python -m bench.bench_coordinator [--requests 300] [--throughput 1000] [--real 40]
                                      [--failover-tasks 300] [--no-litellm]

One run, one Ray start. Behind the coordinator: an *instant* fake-model node (a real NodeDaemon
whose backend answers at once, `bench.fake_node`) to measure the router itself; a real node
(bundled SmolLM2) for max_tokens=1 requests; three *slow* fake nodes (10 ms per token, 20
tokens) for failover. LiteLLM's Router gets the same: an instant OpenAI-compatible server
(`bench.fake_openai`), `python -m llama_cpp.server` on the same GGUF, and three slow fake
servers. Requests alternate between targets, so drift hits all of them alike.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable

from bench._processes import BenchProcesses, processes
from bench._report import machine_line, median, percentile, write_section
from bench.fake_openai import REPLY as LONG_REPLY  # 20+ words: both sides generate 20 tokens
from mesh.coordinator.runner import RunningCoordinator
from mesh.local_processes import LocalNode, local_node_command, python_command

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital city of France?"},
]
Call = Callable[[], Awaitable[object]]


# ---------------------------------------------------------------------- processes


def _llama_server(started: BenchProcesses, model_path: str) -> str:
    """`python -m llama_cpp.server` on the same GGUF, for LiteLLM; its address."""
    from mesh.coordinator.runner import free_port

    port = free_port()
    started.http_server(
        python_command(
            "-m",
            "llama_cpp.server",
            "--model",
            model_path,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_threads",
            "2",
            "--n_ctx",
            "2048",
            "--model_alias",
            "smollm2",
            "--verbose",
            "False",
        ),
        "llama-server",
        f"http://127.0.0.1:{port}/v1/models",
    )
    return f"127.0.0.1:{port}"


# ---------------------------------------------------------------------- measuring


async def latencies(
    targets: dict[str, Call], rounds: int, warmup: int = 20
) -> dict[str, list[float]]:
    """Sequential requests, alternating targets; milliseconds per request."""
    for _ in range(warmup):
        for call in targets.values():
            await call()
    samples: dict[str, list[float]] = {name: [] for name in targets}
    for _ in range(rounds):
        for name, call in targets.items():
            began = time.perf_counter()
            await call()
            samples[name].append((time.perf_counter() - began) * 1000)
    return samples


async def warm(call: Call, times: int = 3) -> None:
    """A few calls before a phase, their errors ignored: a keep-alive connection that the
    server closed while this client sat idle (uvicorn closes them after 5 s; LiteLLM's aiohttp
    transport then fails its next request with "Server disconnected") fails once here, and
    the client opens another."""
    for _ in range(times):
        try:
            await call()
        except Exception:  # whatever the client calls that closed connection
            continue


async def throughput(call: Call, total: int, concurrency: int) -> float:
    """Requests per second with `concurrency` requests always in flight."""
    await warm(call)
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total / (time.perf_counter() - began)


async def failover(
    call: Call, kill: Callable[[], None], tasks: int, concurrency: int
) -> dict[str, float]:
    """`tasks` at `concurrency`; `kill` a backend after a third are done.

    Returns: tasks lost (failed); seconds from the kill to the last answer of a task in flight
    at the kill (the last one rerouted); the worst latency of any task answered after the kill,
    over the median before it (tasks sent to the dead backend before it was noticed count)."""
    records: list[tuple[float, float, bool]] = []  # (start, end, ok)
    killed_at = 0.0
    next_index = 0

    async def worker() -> None:
        nonlocal next_index, killed_at
        while next_index < tasks:
            next_index += 1
            began = time.perf_counter()
            try:
                await call()
                ok = True
            except Exception:  # any failure counts as a lost task; the kind does not matter here
                ok = False
            records.append((began, time.perf_counter(), ok))
            if len(records) == tasks // 3 and not killed_at:
                kill()
                killed_at = time.perf_counter()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    typical = median([end - start for start, end, _ok in records if end < killed_at])
    hit = [end for start, end, ok in records if start < killed_at < end and ok]
    after = [end - start for start, end, ok in records if end > killed_at and ok]
    return {
        "lost": sum(1 for *_x, ok in records if not ok),
        "in_flight_at_kill": len(hit),
        "last_rerouted_s": max((end - killed_at for end in hit), default=0.0),
        "worst_extra_ms": max((latency - typical for latency in after), default=0.0) * 1000,
        "typical_ms": typical * 1000,
    }


# ---------------------------------------------------------------------- targets


HTTP_FAST_PATH = "coordinator HTTP fast path (OpenAI API)"


def ours(running: RunningCoordinator, node_address: str) -> dict[str, Callable[[str, int], Call]]:
    """Callables per path: direct node, fast paths (gRPC, HTTP), Serve's gRPC and HTTP proxies."""
    import openai

    from mesh.client import NodeClient
    from mesh.coordinator_client import MeshClient

    node = NodeClient(node_address)
    fast = MeshClient(running.fast_paths[0])
    proxy = MeshClient(running.grpc_address)
    http = openai.AsyncOpenAI(base_url=running.openai_base_url, api_key="x", max_retries=0)
    http_fast = openai.AsyncOpenAI(base_url=running.http_fast_paths[0], api_key="x", max_retries=0)

    def direct(model: str, tokens: int) -> Call:
        return lambda: node.generate(
            messages=MESSAGES, model=model, max_tokens=tokens, temperature=0
        )

    def mesh(client: MeshClient) -> Callable[[str, int], Call]:
        return lambda model, tokens: (
            lambda: client.submit(messages=MESSAGES, model=model, max_tokens=tokens, temperature=0)
        )

    def openai_http(client: openai.AsyncOpenAI) -> Callable[[str, int], Call]:
        return lambda model, tokens: (
            lambda: client.chat.completions.create(
                model=model, messages=MESSAGES, max_tokens=tokens, temperature=0
            )
        )

    return {
        "direct node (gRPC)": direct,
        "coordinator fast path (gRPC)": mesh(fast),
        HTTP_FAST_PATH: openai_http(http_fast),
        "coordinator via Ray Serve gRPC proxy": mesh(proxy),
        "coordinator via Ray Serve HTTP (OpenAI API)": openai_http(http),
    }


def litellm_side(
    model_name: str, bases: list[str], **router_options: object
) -> tuple[Callable[[int], Call], Callable[[int], Call]]:
    """(direct OpenAI-client call to the first base, LiteLLM Router call over all bases)."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm
    import openai
    from litellm import Router

    litellm.telemetry = False
    litellm.suppress_debug_info = True
    router = Router(
        model_list=[
            {
                "model_name": model_name,
                "litellm_params": {
                    "model": f"openai/{model_name}",
                    "api_base": f"http://{base}/v1",
                    "api_key": "x",
                },
            }
            for base in bases
        ],
        **router_options,
    )  # type: ignore[arg-type]
    direct = openai.AsyncOpenAI(base_url=f"http://{bases[0]}/v1", api_key="x", max_retries=0)

    def plain(tokens: int) -> Call:
        return lambda: direct.chat.completions.create(
            model=model_name, messages=MESSAGES, max_tokens=tokens, temperature=0
        )

    def routed(tokens: int) -> Call:
        return lambda: router.acompletion(
            model=model_name, messages=MESSAGES, max_tokens=tokens, temperature=0
        )

    return plain, routed


# ---------------------------------------------------------------------- the run


def _stats(samples: list[float]) -> tuple[float, float]:
    return median(samples), percentile(samples, 99)


async def measure(
    running: RunningCoordinator,
    addresses: dict[str, str],
    args: argparse.Namespace,
    kills: dict[str, Callable[[], None]],
) -> dict[str, object]:
    paths = ours(running, addresses["instant"])
    results: dict[str, object] = {}
    instant = {name: make("instant", 1) for name, make in paths.items()}
    real = {name: make("smollm2", 1) for name, make in ours(running, addresses["real"]).items()}
    if args.litellm:
        plain, routed = litellm_side("instant", [addresses["openai"]], num_retries=0)
        instant["direct OpenAI server (HTTP)"] = plain(1)
        instant["LiteLLM Router (HTTP)"] = routed(1)
        plain, routed = litellm_side("smollm2", [addresses["llama_server"]], num_retries=0)
        real["direct llama_cpp.server (HTTP)"] = plain(1)
        real["LiteLLM Router -> llama_cpp.server"] = routed(1)
    runs = [await latencies(instant, args.requests) for _ in range(args.runs)]
    per_run = {name: [_stats(run[name]) for run in runs] for name in instant}
    results["instant"] = {
        name: (median([p50 for p50, _ in stats]), median([p99 for _, p99 in stats]))
        for name, stats in per_run.items()
    }
    results["instant_runs"] = per_run
    results["throughput"] = {
        name: await throughput(call, args.throughput, 64) for name, call in instant.items()
    }
    results["real"] = {
        k: _stats(v) for k, v in (await latencies(real, args.real, warmup=3)).items()
    }
    slow = ours(running, addresses["instant"])["coordinator fast path (gRPC)"]("slow", 20)
    results["failover_ours"] = await failover(slow, kills["slow"], args.failover_tasks, 16)
    if args.litellm:
        _plain, routed = litellm_side(
            "slow",
            addresses["slow_openai"].split(","),
            num_retries=3,
            allowed_fails=1,
            cooldown_time=30,
            timeout=10,
        )
        results["failover_litellm"] = await failover(
            routed(20), kills["slow_openai"], args.failover_tasks, 16
        )
    return results


DIRECT_NODE = "direct node (gRPC)"
DIRECT_OPENAI = "direct OpenAI server (HTTP)"
DIRECT_LLAMA = "direct llama_cpp.server (HTTP)"
LITELLM = "LiteLLM Router (HTTP)"
LITELLM_LLAMA = "LiteLLM Router -> llama_cpp.server"
Table = dict[str, tuple[float, float]]  # path: (p50 ms, p99 ms)


def _reference(name: str, table: Table, *, same_protocol: bool) -> str | None:
    """The direct call a path's added latency is measured against: None for a direct call;
    LiteLLM's rows against their HTTP server; ours against the direct node, or, with
    `same_protocol`, our HTTP rows against the direct HTTP server (same client, same protocol)."""
    if name.startswith("direct"):
        return None
    http_server = next((n for n in (DIRECT_OPENAI, DIRECT_LLAMA) if n in table), None)
    if name.startswith("LiteLLM"):
        return http_server
    if same_protocol and "HTTP" in name and http_server is not None:
        return http_server
    return DIRECT_NODE


def _added(name: str, table: Table, *, same_protocol: bool) -> tuple[float, float] | None:
    reference = _reference(name, table, same_protocol=same_protocol)
    if reference is None:
        return None
    return table[name][0] - table[reference][0], table[name][1] - table[reference][1]


def report(results: dict[str, object], args: argparse.Namespace) -> str:
    command = " ".join(["python -m bench.bench_coordinator", *args.argv])
    lines = [
        f"Command: `{command}`",
        f"({machine_line()}; Ray {_ray_version()}, "
        f"RAY_SERVE_THROUGHPUT_OPTIMIZED={os.environ.get('RAY_SERVE_THROUGHPUT_OPTIMIZED')})",
        "",
    ]
    lines += _instant_section(results, args)
    lines += _real_section(results, args)
    lines += _http_fast_path_reading(results)
    lines += _failover_section(results, args)
    return "\n".join(lines)


def _instant_section(results: dict[str, object], args: argparse.Namespace) -> list[str]:
    instant: Table = results["instant"]  # type: ignore[assignment]
    rates: dict[str, float] = results["throughput"]  # type: ignore[assignment]
    lines = [
        "### Router overhead: minimal request (max_tokens=1) to an instant fake model",
        "",
        f"Behind each router: a backend that answers at once (our side: a real NodeDaemon with "
        f"an instant backend, `bench.fake_node`; LiteLLM's side: an instant OpenAI-compatible "
        f"server, `bench.fake_openai`), so the router is what is measured. {args.runs} runs of "
        f"{args.requests} sequential requests per target, alternating; the table shows the "
        f"median of the runs' p50 and p99. Throughput: {args.throughput} requests with 64 in "
        "flight. Added = this path minus the direct call of the same protocol and client: the "
        "gRPC rows minus the direct node; the HTTP rows (the `openai` client) minus the direct "
        "OpenAI server (FastAPI on uvicorn), or minus the direct node when LiteLLM's side is "
        "not run.",
        "",
        "| path | p50 ms | p99 ms | added p50 ms | added p99 ms | req/s at 64 |",
        "|---|---|---|---|---|---|",
    ]
    for name, (p50, p99) in instant.items():
        added = _added(name, instant, same_protocol=True)
        cells = f"{added[0]:+.2f} | {added[1]:+.2f}" if added else " | "
        lines.append(f"| {name} | {p50:.2f} | {p99:.2f} | {cells} | {rates[name]:.0f} |")
    verdicts = []
    runs: dict[str, list[tuple[float, float]]] = results["instant_runs"]  # type: ignore[assignment]
    for name in (
        "coordinator fast path (gRPC)",
        HTTP_FAST_PATH,
        "coordinator via Ray Serve gRPC proxy",
    ):
        reference = _reference(name, instant, same_protocol=True)
        assert reference is not None
        p50, p99 = (
            instant[name][0] - instant[reference][0],
            instant[name][1] - instant[reference][1],
        )
        met = p50 <= 2.0 and p99 <= 10.0
        per_run = [
            (a50 - b50, a99 - b99)
            for (a50, a99), (b50, b99) in zip(runs[name], runs[reference], strict=True)
        ]
        spread = (
            f"runs: p50 {min(a for a, _ in per_run):+.2f}..{max(a for a, _ in per_run):+.2f}, "
            f"p99 {min(b for _, b in per_run):+.2f}..{max(b for _, b in per_run):+.2f}"
        )
        verdicts.append(
            f"{name}: added {p50:+.2f} ms p50 / {p99:+.2f} ms p99 ({spread}), "
            f"**{'meets' if met else 'misses'}** the target"
        )
    return lines + [
        "",
        "Targets: added <= 2 ms p50, <= 10 ms p99. " + "; ".join(verdicts) + ". "
        "Ray Serve's proxies cost several milliseconds by themselves (a bare echo "
        "deployment through the gRPC one: ~7 ms p50 on the same machine, "
        "`RAY_SERVE_THROUGHPUT_OPTIMIZED=1`), so only the fast paths can meet the targets: "
        "each dispatcher replica serving MeshService on its own grpc.aio port and the OpenAI "
        "API on its own uvicorn port.",
        "",
    ]


def _real_section(results: dict[str, object], args: argparse.Namespace) -> list[str]:
    real: Table = results["real"]  # type: ignore[assignment]
    lines = [
        "### Real model (bundled SmolLM2, max_tokens=1, 2 threads)",
        "",
        f"{args.real} sequential requests per target, alternating; the same prompt each "
        "time, so llama.cpp reuses its prompt cache on both sides. Added: our paths minus the "
        "direct node (whatever their protocol), LiteLLM's Router minus the llama_cpp.server "
        "behind it.",
        "",
        "| path | p50 ms | p99 ms | added p50 ms | added p99 ms |",
        "|---|---|---|---|---|",
    ]
    for name, (p50, p99) in real.items():
        added = _added(name, real, same_protocol=False)
        cells = f"{added[0]:+.1f} | {added[1]:+.1f}" if added else " | "
        lines.append(f"| {name} | {p50:.1f} | {p99:.1f} | {cells} |")
    return lines


def _http_fast_path_reading(results: dict[str, object]) -> list[str]:
    """Issue 14's targets for the HTTP fast path: <= 2 ms p50 added, <= half of LiteLLM's."""
    instant: Table = results["instant"]  # type: ignore[assignment]
    real: Table = results["real"]  # type: ignore[assignment]
    if LITELLM not in instant or LITELLM_LLAMA not in real:
        return []
    ours_http = instant[HTTP_FAST_PATH][0] - instant[DIRECT_OPENAI][0]
    ours_node = instant[HTTP_FAST_PATH][0] - instant[DIRECT_NODE][0]
    serve_http = (
        instant["coordinator via Ray Serve HTTP (OpenAI API)"][0] - instant[DIRECT_OPENAI][0]
    )
    litellm = instant[LITELLM][0] - instant[DIRECT_OPENAI][0]
    ours_real = real[HTTP_FAST_PATH][0] - real[DIRECT_NODE][0]
    litellm_real = real[LITELLM_LLAMA][0] - real[DIRECT_LLAMA][0]

    def verdict(met: bool) -> str:
        return "**met**" if met else "**missed**"

    return [
        "",
        f"Reading it (the HTTP fast path): to the instant model it adds {ours_http:+.2f} ms p50 "
        f"over the direct OpenAI server, same client and protocol (Serve's HTTP proxy: "
        f"{serve_http:+.2f} ms; LiteLLM's Router: {litellm:+.2f} ms), and {ours_node:+.2f} ms "
        f"over the direct gRPC node, which includes what HTTP and the `openai` client cost "
        f"themselves ({instant[DIRECT_OPENAI][0] - instant[DIRECT_NODE][0]:+.2f} ms, direct HTTP "
        f"server against direct gRPC node). To the real model it adds {ours_real:+.1f} ms p50 over "
        f"the direct node; LiteLLM's Router adds {litellm_real:+.1f} ms over llama_cpp.server. "
        f"Target <= 2 ms p50 added: {verdict(ours_http <= 2.0)} against the direct HTTP server, "
        f"{verdict(ours_node <= 2.0)} against the direct gRPC node, "
        f"{verdict(ours_real <= 2.0)} on the real model. Target <= half of LiteLLM's added "
        f"latency: {verdict(ours_http <= litellm / 2)} on the instant model "
        f"({ours_http:+.2f} against {litellm / 2:+.2f}), {verdict(ours_real <= litellm_real / 2)} "
        f"on the real model ({ours_real:+.1f} against {litellm_real / 2:+.1f}).",
    ]


def _failover_section(results: dict[str, object], args: argparse.Namespace) -> list[str]:
    lines = [
        "",
        "### Failover: `kill -9` of one of three backends under load",
        "",
        f"{args.failover_tasks} tasks (20 tokens, 10 ms each: ~200 ms) at 16 in flight; "
        "one backend killed after a third. Our side: three slow fake nodes behind the "
        "coordinator's fast path; LiteLLM: three slow fake OpenAI servers behind its Router "
        "(num_retries=3, allowed_fails=1, cooldown_time=30 s).",
        "",
        "| router | tasks lost | in flight at kill | kill to last rerouted answer | "
        "worst extra latency | typical latency |",
        "|---|---|---|---|---|---|",
    ]
    for name, key in (("coordinator", "failover_ours"), ("LiteLLM Router", "failover_litellm")):
        found: dict[str, float] | None = results.get(key)  # type: ignore[assignment]
        if found:
            lines.append(
                f"| {name} | {found['lost']:.0f} | {found['in_flight_at_kill']:.0f} | "
                f"{found['last_rerouted_s'] * 1000:.0f} ms | "
                f"{found['worst_extra_ms']:.0f} ms | {found['typical_ms']:.0f} ms |"
            )
    return lines


def _ray_version() -> str:
    import ray

    return str(ray.__version__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="sequential, per target")
    parser.add_argument("--runs", type=int, default=3, help="latency runs; medians reported")
    parser.add_argument("--throughput", type=int, default=1000, help="requests at 64 in flight")
    parser.add_argument("--real", type=int, default=40, help="real-model requests per target")
    parser.add_argument("--failover-tasks", type=int, default=300)
    parser.add_argument("--no-litellm", dest="litellm", action="store_false")
    parser.add_argument(
        "--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone"
    )
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.argv = [a for a in argv if a != "--no-write"]
    from mesh.coordinator.runner import start_coordinator, stop_coordinator
    from mesh.coordinator.settings import CoordinatorConfig, DispatcherSettings
    from nodes.model_files import resolve_gguf

    state = tempfile.mkdtemp(prefix="bench-coordinator-")
    with processes() as started:

        def node(name: str, *extra: str) -> LocalNode:
            return started.node(
                python_command("-m", "bench.fake_node", "--name", name, *extra), name
            )

        addresses = {"instant": node("instant", "--model", "instant").address}
        slow_nodes = [
            node(f"slow-{i}", "--model", "slow", "--delay-ms", "10", "--reply", LONG_REPLY)
            for i in range(3)
        ]
        slow = [n.address for n in slow_nodes]
        real = started.node(local_node_command(state, name="real", n_threads=2), "real")
        addresses["real"] = real.address
        # SIGKILL without waiting for the exit: the failover clock starts at once.
        kills = {"slow": lambda: slow_nodes[0].process.kill()}
        if args.litellm:
            _fake, addresses["openai"] = started.fake_openai(
                python_command("-m", "bench.fake_openai"), "fake-openai"
            )
            slow_openai = [
                started.fake_openai(
                    python_command("-m", "bench.fake_openai", "--delay-ms", "10", "--tokens", "20"),
                    f"slow-openai-{i}",
                )
                for i in range(3)
            ]
            addresses["slow_openai"] = ",".join(address for _p, address in slow_openai)
            kills["slow_openai"] = lambda: slow_openai[0][0].process.kill()
            addresses["llama_server"] = _llama_server(
                started, str(resolve_gguf("bundled:smollm2").path)
            )
        config = CoordinatorConfig(
            static_nodes=(addresses["instant"], addresses["real"], *slow),
            mdns=False,
            grpc_port=0,
            http_port=0,
            num_cpus=2,
            dispatcher=DispatcherSettings(
                policy="least_loaded", attempt_timeout_s=10, deadline_s=30
            ),
        )
        try:
            running = start_coordinator(config)
            time.sleep(2.0)  # every node probed and ready
            results = asyncio.run(measure(running, addresses, args, kills))
        finally:
            stop_coordinator()
    body = report(results, args)
    print(body)
    if not args.no_write:
        write_section("Coordinator", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
