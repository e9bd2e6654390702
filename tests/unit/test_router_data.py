"""The intent data set, the metrics and the report writer of the router build."""

from __future__ import annotations

import collections

import pytest

from nodes.router import DATA_PATH, LABELS, MODEL_PATH
from nodes.router._markdown import replace_section, update_file_section
from nodes.router.metrics import (
    accuracy,
    confusion,
    confusion_table,
    coverage_at,
    load_examples,
    percentile,
)

pytestmark = pytest.mark.unit


def test_data_set_is_balanced_split_and_free_of_leaks():
    examples = load_examples(DATA_PATH)
    assert len(examples) >= 300
    by_split = collections.Counter((e.split, e.label) for e in examples)
    for label in LABELS:
        assert by_split[("train", label)] >= 90 and by_split[("test", label)] >= 30
    texts = [e.text.lower() for e in examples]
    assert len(set(texts)) == len(texts), "a request appears twice"
    assert sum(e.difficulty == "hard" for e in examples if e.split == "test") >= 10
    assert MODEL_PATH.exists() and MODEL_PATH.stat().st_size < 2 * 1024 * 1024


def test_bad_rows_are_named_by_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text(
        "text,label,split,difficulty\nhello,customer-service,train,normal\nhi,sales,train,normal\n",
        encoding="utf-8",
    )
    with pytest.raises(ValueError, match="bad.csv:3: label 'sales'"):
        load_examples(path)


def test_metrics():
    gold = ["a", "a", "b", "b"]
    predicted = ["a", "b", "b", "x"]
    assert accuracy(predicted, gold) == 0.5
    counts = confusion(predicted, gold, ["a", "b"])
    assert counts["a"] == {"a": 1, "b": 1, "other": 0} and counts["b"]["other"] == 1
    assert "| b | 0 | 1 | 1 |" in confusion_table(counts, ["a", "b"])
    rows = coverage_at([0.9, 0.4, 0.8, 0.6], [True, False, True, False], [0.5, 0.85])
    assert (rows[0].covered, rows[0].accuracy) == (0.75, pytest.approx(2 / 3))
    assert (rows[1].covered, rows[1].accuracy) == (0.25, 1.0)
    assert percentile([5, 1, 3, 2, 4], 50) == 3 and percentile([1, 2], 99) == 2
    assert percentile([], 50) == 0.0


def test_replace_section_keeps_the_others(tmp_path):
    text = "# Benchmarks\n\n## Node\n\nnode text\n\n## Intent router\n\n### A\n\nold\n\n## Agents\n\nx\n"
    out = replace_section(text, "### A", "new")
    assert "old" not in out and "new" in out and "node text" in out and "## Agents\n\nx" in out
    path = tmp_path / "B.md"
    path.write_text(text, encoding="utf-8")
    update_file_section(path, ["## Intent router"], "### B", "bench")
    written = path.read_text(encoding="utf-8")
    assert written.index("### A") < written.index("### B") < written.index("## Agents")
    update_file_section(tmp_path / "new.md", ["## Intent router"], "### A", "first")
    assert (tmp_path / "new.md").read_text(encoding="utf-8").startswith("# Benchmarks")
