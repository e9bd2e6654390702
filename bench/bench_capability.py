"""The capability figures a node measures and advertises (nodes/capability.py), per thread count.

    python -m bench.bench_capability [--threads 1 2] [--runs 3]

The bundled SmolLM2-135M, loaded with each thread count in turn; the node's own measurement
(a fixed prompt of about a hundred tokens, 16 out) `--runs` times; medians. These are the
figures `Describe` and `mesh nodes` show and latency-aware routing starts from.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from bench._report import machine_line, median, write_section
from nodes.backends.llama import LlamaBackend
from nodes.capability import hardware_key, measure


async def run(threads: list[int], runs: int) -> list[tuple[int, float, float]]:
    rows = []
    for count in threads:
        backend = LlamaBackend("smollm2", "bundled:smollm2", n_threads=count, prefix_cache_mb=0)
        await backend.load()
        try:
            figures = [await measure(backend) for _ in range(runs)]
        finally:
            await backend.close()
        rows.append(
            (
                count,
                median([f.prompt_tokens_per_s for f in figures]),
                median([f.decode_tokens_per_s for f in figures]),
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print, do not update the doc")
    args = parser.parse_args(argv)
    rows = asyncio.run(run(args.threads, args.runs))
    table = "\n".join(f"| {t} | {p:.0f} | {d:.0f} |" for t, p, d in rows)
    threads = " ".join(str(t) for t in args.threads)
    body = f"""Command: `python -m bench.bench_capability --threads {threads} --runs {args.runs}`
({machine_line()}; SmolLM2-135M-Instruct Q4_1, the node's own measurement, medians of
{args.runs}; hardware key `{hardware_key(0).rsplit("|", 1)[0]}`)

| threads | prompt tokens/s | decode tokens/s |
|---|---|---|
{table}
"""
    print(body)
    if not args.no_write:
        write_section("Capability figures", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
