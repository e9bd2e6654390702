"""The one runner of `mesh sim`'s short commands, run for real: it never raises."""

from __future__ import annotations

import sys

from mesh.sim.commands import NOT_INSTALLED, TIMED_OUT, run_command


def test_output_code_and_added_environment() -> None:
    code = "import os, sys; print(os.environ['EM_X'], os.environ['PATH'] != ''); sys.exit(3)"
    done = run_command([sys.executable, "-c", code], {"EM_X": "added"})
    assert (done.returncode, done.stdout, done.stderr) == (3, "added True\n", "")
    assert done.output == "added True"


def test_a_missing_program_answers_127_and_a_hung_one_124() -> None:
    missing = run_command(["no-such-program-here", "x"])
    assert (missing.returncode, missing.stderr) == (
        NOT_INSTALLED,
        "no-such-program-here: not installed",
    )
    hung = run_command([sys.executable, "-c", "import time; time.sleep(5)", "a", "b"], None, 0.2)
    assert hung.returncode == TIMED_OUT
    assert hung.stderr.endswith(" ...` did not finish within 0.2 s")
