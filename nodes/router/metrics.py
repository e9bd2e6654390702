"""Classification metrics for the router's build report and benchmark: pure functions, no numpy."""

from __future__ import annotations

import csv
import math
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass

from nodes.router import LABELS


@dataclass(frozen=True)
class Example:
    text: str
    label: str
    split: str  # "train" or "test" (held out)
    difficulty: str  # "normal" or "hard" (ambiguous wording, misleading keywords)


def load_examples(path: pathlib.Path) -> list[Example]:
    """The labelled requests in `path`; ValueError naming the line on a bad row."""
    examples = []
    with open(path, encoding="utf-8", newline="") as handle:
        for line_number, row in enumerate(csv.DictReader(handle), start=2):
            example = Example(
                text=(row.get("text") or "").strip(),
                label=row.get("label") or "",
                split=row.get("split") or "",
                difficulty=row.get("difficulty") or "",
            )
            if not example.text:
                raise ValueError(f"{path}:{line_number}: empty text")
            if example.label not in LABELS:
                raise ValueError(
                    f"{path}:{line_number}: label {example.label!r} is not one of "
                    f"{', '.join(LABELS)}"
                )
            if example.split not in ("train", "test"):
                raise ValueError(f"{path}:{line_number}: split must be train or test")
            if example.difficulty not in ("normal", "hard"):
                raise ValueError(f"{path}:{line_number}: difficulty must be normal or hard")
            examples.append(example)
    return examples


def accuracy(predicted: Sequence[str], gold: Sequence[str]) -> float:
    if len(predicted) != len(gold):
        raise ValueError("predicted and gold differ in length")
    return sum(p == g for p, g in zip(predicted, gold, strict=True)) / len(gold) if gold else 0.0


def confusion(
    predicted: Sequence[str], gold: Sequence[str], labels: Sequence[str]
) -> dict[str, dict[str, int]]:
    """counts[gold][predicted]; a prediction outside `labels` is counted under "other"."""
    counts = {g: dict.fromkeys([*labels, "other"], 0) for g in labels}
    for p, g in zip(predicted, gold, strict=True):
        counts[g][p if p in labels else "other"] += 1
    return counts


@dataclass(frozen=True)
class Coverage:
    threshold: float
    covered: float  # share of requests with confidence >= threshold
    accuracy: float  # accuracy among those


def coverage_at(
    confidences: Sequence[float], correct: Sequence[bool], thresholds: Sequence[float]
) -> list[Coverage]:
    """How many requests clear each confidence threshold, and how often those are right."""
    rows = []
    for threshold in thresholds:
        kept = [c for conf, c in zip(confidences, correct, strict=True) if conf >= threshold]
        rows.append(
            Coverage(
                threshold,
                len(kept) / len(correct) if correct else 0.0,
                sum(kept) / len(kept) if kept else 0.0,
            )
        )
    return rows


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), nearest-rank; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def confusion_table(counts: dict[str, dict[str, int]], labels: Sequence[str]) -> str:
    """A Markdown table: rows are the true labels, columns the predicted ones."""
    columns = [*labels, "other"] if any(r["other"] for r in counts.values()) else list(labels)
    lines = [
        "| true \\ predicted | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    lines += [f"| {g} | " + " | ".join(str(counts[g][p]) for p in columns) + " |" for g in labels]
    return "\n".join(lines)
