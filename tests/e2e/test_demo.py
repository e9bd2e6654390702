"""`make run`'s job, for real: `mesh demo` starts a node and a coordinator, asks, and cleans up."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.ray]


def test_demo_answers_through_a_local_mesh_and_leaves_nothing_running():
    result = subprocess.run(
        [sys.executable, "-m", "mesh.cli", "demo", "--max-tokens", "24"],
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Paris" in result.stdout
    assert "answered by node demo-node" in result.stderr
    assert "Traceback" not in result.stderr
    leftovers = subprocess.run(["pgrep", "-f", "demo-node"], capture_output=True, text=True)
    assert leftovers.stdout.strip() == ""


def test_demo_node_only_needs_no_ray():
    result = subprocess.run(
        [sys.executable, "-m", "mesh.cli", "demo", "--node-only", "--max-tokens", "24"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Paris" in result.stdout
