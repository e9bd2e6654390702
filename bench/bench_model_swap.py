"""What a model swap costs: a request for a resident model against one that must load first.

    python -m bench.bench_model_swap [--rounds 10] [--threads 2]

One node (real daemon over gRPC on 127.0.0.1) with two model ids on the bundled SmolLM2 file
and `max_loaded_models: 1`. Each round asks the resident model once (warm), then the other
one (a swap: the resident one unloads, the other loads, then answers). Time to first token
and total, max_tokens 8, temperature 0; medians side by side in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
import tempfile

from bench._report import machine_line, median, percentile, write_section
from mesh.client import NodeClient
from nodes.config import ModelConfig, NodeConfig
from nodes.daemon import NodeDaemon

QUESTION = "What is the capital city of France?"


async def run(rounds: int, threads: int) -> dict[str, list[tuple[float, float]]]:
    samples: dict[str, list[tuple[float, float]]] = {"resident": [], "swap": []}
    with tempfile.TemporaryDirectory() as state_dir:
        config = NodeConfig(
            host="127.0.0.1",
            port=0,
            advertise=False,
            router=None,
            state_dir=state_dir,
            grace_s=1.0,
            max_loaded_models=1,
            models=tuple(
                ModelConfig(id=m, source="bundled:smollm2", n_ctx=1024, n_threads=threads)
                for m in ("alpha", "beta")
            ),
        )
        daemon = NodeDaemon(config, progress=io.StringIO())
        await daemon.start()
        try:
            async with NodeClient(daemon.address, timeout_s=120) as client:
                resident, other = "alpha", "beta"
                for _ in range(rounds):
                    for kind, model in (("resident", resident), ("swap", other)):
                        reply = await client.generate(
                            QUESTION, model=model, max_tokens=8, temperature=0
                        )
                        timing = reply.timing
                        samples[kind].append((timing.time_to_first_token_ms, timing.total_ms))
                    resident, other = other, resident
        finally:
            await daemon.stop()
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print, do not update the doc")
    args = parser.parse_args(argv)
    samples = asyncio.run(run(args.rounds, args.threads))
    rows = []
    for kind, values in samples.items():
        ttft, total = [v[0] for v in values], [v[1] for v in values]
        rows.append(
            f"| {kind} | {median(ttft):.0f} ms | {percentile(ttft, 90):.0f} ms | "
            f"{median(total):.0f} ms | {percentile(total, 90):.0f} ms |"
        )
    added = median([v[0] for v in samples["swap"]]) - median([v[0] for v in samples["resident"]])
    body = f"""Command: `python -m bench.bench_model_swap --rounds {args.rounds} --threads {args.threads}`
({machine_line()}; SmolLM2-135M-Instruct Q4_1 (98 MB) under two model ids, `max_loaded_models: 1`,
{args.threads} threads, max_tokens 8, temperature 0; {args.rounds} rounds, each a request for the
resident model then one that swaps)

| request | time to first token p50 | p90 | total p50 | p90 |
|---|---|---|---|---|
{chr(10).join(rows)}

A swap (unload the least recently used model, load the other, answer) adds {added:.0f} ms to the
first token at the median on this model; the node's load time scales with the file (mmap) and
the KV cache it allocates. The resident model answers the same question each round, so its
context still holds the prompt (llama.cpp reuses it): the swap also loses that.
"""
    print(body)
    if not args.no_write:
        write_section("Model swap", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
