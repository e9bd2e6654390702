"""Writing results: each benchmark owns one `## Section` of docs/BENCHMARKS.md and replaces only it."""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
import re
import statistics
from collections.abc import Sequence

ROOT = pathlib.Path(__file__).resolve().parent.parent
REPORT = ROOT / "docs" / "BENCHMARKS.md"
HEADER = (
    "# Benchmarks\n\n"
    "Measured on the project's development machines (2 cores, 24 GiB, no GPU; shared and noisy).\n"
    "Each section names the command that produced it; ratios are measured side by side in one run,\n"
    "and figures are medians unless said otherwise.\n"
)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def machine_line() -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{datetime.date.today().isoformat()}"
    )


def write_section(title: str, body: str) -> None:
    """Replace (or append) `## title` in docs/BENCHMARKS.md with `body`."""
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    text = REPORT.read_text(encoding="utf-8") if REPORT.exists() else HEADER
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _m: section + "\n", text, count=1)
    else:
        text = text.rstrip() + "\n\n" + section
    REPORT.write_text(text.rstrip() + "\n", encoding="utf-8")
