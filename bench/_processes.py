"""The child processes a benchmark starts, through `mesh.local_processes`.

    with processes() as started:
        node = started.node(python_command("-m", "bench.fake_node", "--name", "a"), "a")
        ... node.address ...
    # all stopped (SIGTERM, then SIGKILL), their logs (one temporary folder) removed

A start that fails raises ProcessStartError with the tail of that process's log.
"""

from __future__ import annotations

import contextlib
import pathlib
import re
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence

from mesh.local_processes import LocalNode, LocalProcess, ProcessStartError, stop_all

FAKE_OPENAI_READY = re.compile(r"serving on (?P<address>\S+)$")  # bench/fake_openai.py
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0


class BenchProcesses:
    """Starts processes with their stderr in `directory`/NAME.log and remembers them."""

    def __init__(self, directory: pathlib.Path) -> None:
        self.directory = directory
        self.all: list[LocalProcess] = []

    def node(self, argv: Sequence[str], name: str) -> LocalNode:
        """A node (`mesh node start` or bench/fake_node.py), once it prints its serving line."""
        node = LocalNode.start(argv, name=name, log=self._log(name), timeout_s=START_TIMEOUT_S)
        self.all.append(node)
        return node

    def fake_openai(self, argv: Sequence[str], name: str) -> tuple[LocalProcess, str]:
        """bench/fake_openai.py, once it prints its serving line; and its address."""
        server = LocalProcess.start(
            argv,
            name=name,
            log=self._log(name),
            ready=FAKE_OPENAI_READY,
            timeout_s=START_TIMEOUT_S,
        )
        self.all.append(server)
        return server, server.ready_line.split()[-1]

    def http_server(self, argv: Sequence[str], name: str, ready_url: str) -> LocalProcess:
        """A server with no ready line (llama_cpp.server): ready once `ready_url` answers."""
        server = LocalProcess(argv, name=name, log=self._log(name))
        self.all.append(server)
        give_up = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < give_up and server.alive():
            try:
                with urllib.request.urlopen(ready_url, timeout=2):
                    return server
            except OSError:  # not listening yet
                time.sleep(0.3)
        code = server.stop(timeout_s=STOP_TIMEOUT_S)
        raise ProcessStartError(
            f"{name} did not answer {ready_url} within {START_TIMEOUT_S:g} s (exit code "
            f"{code}); the end of {server.log}:\n{server.log_tail()}",
            name=name,
            exit_code=code,
        )

    def _log(self, name: str) -> pathlib.Path:
        return self.directory / f"{name}.log"


@contextlib.contextmanager
def processes() -> Iterator[BenchProcesses]:
    """Every process started through the yielded object is stopped when the block ends."""
    with tempfile.TemporaryDirectory(prefix="bench-processes-") as directory:
        started = BenchProcesses(pathlib.Path(directory))
        try:
            yield started
        finally:
            stop_all(started.all, timeout_s=STOP_TIMEOUT_S)
