"""Benchmarks. Each module measures side by side in one run and writes its section of docs/BENCHMARKS.md."""
