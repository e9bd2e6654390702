"""The one runner of the short commands `mesh sim` starts: docker, docker-compose, iptables,
tc, nsenter. Output captured, stdin closed, a time limit, and it never raises: a program that
is not installed answers 127 and one that does not finish answers 124, the reason in stderr.
Callers decide what a failure means; every caller takes the runner injected, so unit tests
pass a fake that returns a `Completed`."""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

NOT_INSTALLED = 127
TIMED_OUT = 124


@dataclass(frozen=True)
class Completed:
    """What one command did."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        """stdout and stderr together, stripped."""
        return (self.stdout + self.stderr).strip()


# (argv, variables added to our environment, seconds) -> Completed
Runner = Callable[[Sequence[str], Mapping[str, str], float], Completed]


def run_command(
    argv: Sequence[str], env: Mapping[str, str] | None = None, timeout_s: float = 30.0
) -> Completed:
    """Run `argv` with `env` added to ours, for up to `timeout_s`; never raises."""
    try:
        done = subprocess.run(
            list(argv),
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout_s,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except FileNotFoundError:
        return Completed(NOT_INSTALLED, "", f"{argv[0]}: not installed")
    except subprocess.TimeoutExpired:
        shown = shlex.join(argv[:4]) + (" ..." if len(argv) > 4 else "")
        return Completed(TIMED_OUT, "", f"`{shown}` did not finish within {timeout_s:g} s")
    return Completed(done.returncode, done.stdout, done.stderr)
