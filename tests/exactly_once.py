"""Exactly-once, judged from the nodes' own counts, for tests: the judgement itself lives in the
product (mesh/sim/counts.py, which a simulation's report uses and whose docstring gives the
argument that the check is complete and can fail); this asserts on its verdict.

    counts = [await node_counts(name, address) for name, address in every_node]
    check_exactly_once(task_ids, counts, lost=[LostWindow("node-c", killed_at, killed_at)])
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from mesh.sim.counts import (
    SEND_WINDOW_S,
    LostWindow,
    NodeCounts,
    Verdict,
    judge_exactly_once,
    node_counts,
)

__all__ = [
    "SEND_WINDOW_S",
    "LostWindow",
    "NodeCounts",
    "Verdict",
    "check_exactly_once",
    "node_counts",
]


def check_exactly_once(
    task_ids: Iterable[str],
    nodes: Sequence[NodeCounts],
    *,
    lost: Sequence[LostWindow] = (),
    kind: str = "generation",
    may_be_unfinished: Iterable[str] = (),
) -> Verdict:
    """Assert, from the nodes' counts, that each task ran to completion exactly once (`kind`:
    "generation" or "agent"), and that no side-effecting tool ran twice for a task.

    `may_be_unfinished`: tasks whose answer was assembled from a stream that broke after its
    last token (no node sent the end): zero completions is right for them, one is allowed."""
    verdict = judge_exactly_once(
        task_ids, nodes, lost=lost, kind=kind, may_be_unfinished=may_be_unfinished
    )
    assert not verdict.cannot_judge, f"cannot judge: {verdict.cannot_judge}"
    assert not verdict.problems, "not exactly once, by the nodes' own counts:\n" + "\n".join(
        verdict.problems
    )
    return verdict
