"""Node daemon benchmark: gRPC streaming vs in-process llama-cpp-python, start time, memory.

    python -m bench.bench_node [--runs 7] [--tokens 256] [--threads 2] [--starts 5]

Side by side in one run, alternating: 256 tokens streamed through the gRPC daemon (a separate
`mesh node start` process, client in this process) and 256 tokens from llama-cpp-python
in-process, same model, same prompt, same thread count, temperature 0. Also: time from
`mesh node start` to SERVING, the daemon's RSS beyond the model file's size, and time to first
token both ways.
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import re
import sys
import tempfile
import time

import psutil

from bench._report import machine_line, median, write_section
from mesh.client import NodeClient
from mesh.local_processes import LocalNode, local_node_command
from nodes.model_files import resolve_gguf

PROMPT = (
    "Write a long, detailed story about a lighthouse keeper who finds a map in a bottle. "
    "Describe every day of the journey."
)
SYSTEM = "You are a helpful assistant."
LOADED = re.compile(r"ready .* in ([0-9.]+) s")
START_TIMEOUT_S = 120.0


def start_node(directory: str, threads: int) -> tuple[LocalNode, float, float]:
    """Start a node; return (it, seconds to the serving line, model load seconds)."""
    node = LocalNode.start(
        local_node_command(f"{directory}/state", n_threads=threads),
        name="node",
        log=pathlib.Path(directory) / "node.log",
        timeout_s=START_TIMEOUT_S,
    )
    found = LOADED.search(node.log_text())  # the load line is printed before the serving line
    return node, node.ready_at - node.started_at, float(found.group(1)) if found else 0.0


async def grpc_run(client: NodeClient, tokens: int) -> tuple[int, float, float]:
    """(tokens, seconds from request to last token, seconds to first token) through gRPC."""
    began = time.perf_counter()
    first = 0.0
    count = 0
    async for chunk in client.generate_stream(
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}],
        max_tokens=tokens,
        temperature=0,
    ):
        if chunk.HasField("final"):
            count = chunk.final.usage.completion_tokens
        elif not first:
            first = time.perf_counter() - began
    return count, time.perf_counter() - began, first


def in_process_run(llama, prompt_tokens: list[int], tokens: int) -> tuple[int, float, float]:  # type: ignore[no-untyped-def]
    began = time.perf_counter()
    first = 0.0
    count = 0
    for chunk in llama.create_completion(
        prompt_tokens, max_tokens=tokens, temperature=0, stream=True, stop=["<|im_end|>"]
    ):
        if chunk["choices"][0]["text"]:
            count += 1
            first = first or time.perf_counter() - began
    return count, time.perf_counter() - began, first


async def alternate(address: str, llama, prompt_tokens: list[int], args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """Alternate gRPC and in-process runs over one persistent channel, as a real client would."""
    grpc_rates, local_rates, grpc_ttft, local_ttft, counts = [], [], [], [], set()
    async with NodeClient(address) as client:
        await grpc_run(client, 16)  # warm both
        in_process_run(llama, prompt_tokens, 16)
        for _ in range(args.runs):
            n, total, first = await grpc_run(client, args.tokens)
            grpc_rates.append(n / total)
            grpc_ttft.append(first)
            counts.add(n)
            n, total, first = in_process_run(llama, prompt_tokens, args.tokens)
            local_rates.append(n / total)
            local_ttft.append(first)
            counts.add(n)
    return grpc_rates, local_rates, grpc_ttft, local_ttft, counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--starts", type=int, default=5)
    args = parser.parse_args(argv)

    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    model = resolve_gguf("bundled:smollm2")
    with tempfile.TemporaryDirectory() as state_dir:
        starts, loads = [], []
        for _ in range(args.starts):
            node, elapsed, load_s = start_node(state_dir, args.threads)
            starts.append(elapsed)
            loads.append(load_s)
            node.stop()

        node, _elapsed, _load = start_node(state_dir, args.threads)
        try:
            # The same settings the node uses by default (nodes/config.py ModelConfig).
            llama = llama_cpp.Llama(
                model_path=str(model.path),
                n_ctx=2048,
                n_threads=args.threads,
                n_threads_batch=args.threads,
                n_batch=256,
                verbose=False,
                flash_attn=True,
                type_k=llama_cpp.GGML_TYPE_Q8_0,
                type_v=llama_cpp.GGML_TYPE_Q8_0,
            )
            formatter = Jinja2ChatFormatter(
                template=llama.metadata["tokenizer.chat_template"],
                eos_token=llama._model.token_get_text(llama.token_eos()),
                bos_token=llama._model.token_get_text(llama.token_bos()),
            )
            prompt = formatter(
                messages=[
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": PROMPT},
                ]
            ).prompt
            prompt_tokens = llama.tokenize(prompt.encode(), add_bos=True, special=True)
            samples = asyncio.run(alternate(node.address, llama, prompt_tokens, args))
            grpc_rates, local_rates, grpc_ttft, local_ttft, counts = samples
            rss = psutil.Process(node.process.pid).memory_info().rss
        finally:
            node.stop()

    ratio = median(grpc_rates) / median(local_rates)
    beyond_mb = (rss - model.size_bytes) / 1e6
    body = f"""Command: `python -m bench.bench_node --runs {args.runs} --tokens {args.tokens} --threads {args.threads} --starts {args.starts}`
({machine_line()}; SmolLM2-135M-Instruct Q4_1, n_ctx 2048, {args.threads} inference threads, temperature 0)

| measure | gRPC daemon | in-process llama-cpp-python | ratio / target |
|---|---|---|---|
| streamed tokens/s, request to last token ({sorted(counts)} tokens), median of {args.runs} alternating runs | {median(grpc_rates):.1f} | {median(local_rates):.1f} | **{ratio:.3f}** (target ≥ 0.97) |
| time to first token, median | {median(grpc_ttft) * 1000:.1f} ms | {median(local_ttft) * 1000:.1f} ms | +{(median(grpc_ttft) - median(local_ttft)) * 1000:.1f} ms |

| measure | value | target |
|---|---|---|
| `mesh node start` to SERVING line, median of {args.starts} starts | {median(starts):.2f} s (of which model load {median(loads):.2f} s) | |
| daemon RSS after serving ({rss / 1e6:.0f} MB) beyond the model file ({model.size_bytes / 1e6:.0f} MB) | {beyond_mb:.0f} MB | ≤ 80 MB |

The RSS target is missed. Where it goes (smaps of a serving daemon, same day): the Python
runtime with gRPC, pydantic, numpy, SQLite and the daemon's modules is ~65 MB before any model
is loaded; llama.cpp adds ~25 MB of KV cache at n_ctx 2048 (q8_0; f16 would be ~50 MB), its
compute buffers and its libraries. `n_ctx: 1024` in the node config saves ~12 MB; the rest would
need a leaner runtime (no pydantic/numpy in the serving process), left for later.

Per-run tokens/s, gRPC: {", ".join(f"{r:.1f}" for r in grpc_rates)}; in-process: {", ".join(f"{r:.1f}" for r in local_rates)}.
"""
    write_section("Node daemon", body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
