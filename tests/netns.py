"""A multi-host lab on one machine: N network namespaces on a Linux bridge, real multicast.

    with NetnsLab.create(3) as lab:          # or the `netns_lab_factory` fixture in tests/e2e
        watcher = lab.hosts[1].popen([sys.executable, "-m", "mesh.cli", "discover", ...])
        node = LocalNode.start(mesh_command("node", "start", ...), popen=lab.hosts[0].popen,
                               name="n1", log=..., timeout_s=90)  # mesh.local_processes
        ...
    # every process is killed and every namespace, veth and the bridge are deleted,
    # even when the block raises; `assert_clean()` checks that nothing is left.

Names start with `em<pid><lab>` (interface names are limited to 15 bytes), so parallel sessions
never collide, and addresses come from the benchmark range 198.18.0.0/15, used only inside the
namespaces created here (the bridge itself has no address in the root namespace).
Needs root and iproute2; `skip_reason()` says why a lab cannot be built.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

_LAB_COUNTER = itertools.count()
_SUBNET_PREFIX = "198.18"  # 198.18.0.0/15: reserved for benchmarking (RFC 2544)
_IFACE = "eth0"


def _ip(
    *args: str, check: bool = True, netns: str | None = None
) -> subprocess.CompletedProcess[str]:
    argv = ["ip", *(("-n", netns) if netns else ()), *args]
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=20)


def skip_reason() -> str | None:
    """Why a lab cannot be built here, or None if it can."""
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"em{os.getpid()}probe"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as error:
        return f"cannot create a network namespace: {error.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


@dataclass
class NetnsHost:
    """One 'machine': a namespace with `eth0` on the lab bridge and an address."""

    name: str  # namespace name
    ip: str
    lab: NetnsLab
    processes: list[subprocess.Popen[Any]] = field(default_factory=list)
    veth: str = ""  # the bridge-side end of this host's cable, in the root namespace

    def set_link(self, *, up: bool) -> None:
        """Plug or pull this host's cable: no reset, no goodbye, packets just stop."""
        _ip("link", "set", self.veth, "up" if up else "down")

    def command(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def popen(
        self,
        argv: Sequence[str],
        *,
        stdout: int | IO[Any] | None = subprocess.PIPE,
        stderr: int | IO[Any] | None = subprocess.PIPE,
        env: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> subprocess.Popen[Any]:
        """Start `argv` inside this host (its own session, so it can be killed as a group).

        `ip netns exec` execs the command, so `.pid` is the command's own pid (kill -9 works).
        """
        process = subprocess.Popen(
            self.command(argv),
            stdout=stdout,
            stderr=stderr,
            env=env,
            start_new_session=True,
            text=True,
            bufsize=1,
            **kwargs,
        )
        self.processes.append(process)
        return process

    def run(
        self, argv: Sequence[str], *, timeout_s: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(argv), capture_output=True, text=True, timeout=timeout_s, check=False
        )


class NetnsLab:
    """A bridge and namespaces; use `NetnsLab.create(n)` as a context manager."""

    def __init__(self) -> None:
        index = next(_LAB_COUNTER)
        self.prefix = f"em{os.getpid()}{index:x}"
        if len(self.prefix) > 11:
            raise RuntimeError(f"lab prefix {self.prefix!r} too long for interface names")
        self.bridge = f"{self.prefix}b"
        self.subnet = f"{_SUBNET_PREFIX}.{index % 256}"
        self.hosts: list[NetnsHost] = []
        self._veths: list[str] = []
        self._closed = False

    @classmethod
    @contextlib.contextmanager
    def create(cls, hosts: int) -> Iterator[NetnsLab]:
        lab = cls()
        try:
            lab._add_bridge()
            for _ in range(hosts):
                lab.add_host()
            yield lab
        finally:
            lab.close()

    def _add_bridge(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        # No IGMP snooping: with no querier on the bridge, snooping can drop mDNS traffic.
        _ip("link", "set", self.bridge, "type", "bridge", "mcast_snooping", "0")
        _ip("link", "set", self.bridge, "up")

    def add_host(self) -> NetnsHost:
        index = len(self.hosts) + 1
        if index > 250:
            raise RuntimeError("a lab holds at most 250 hosts")
        namespace = f"{self.prefix}-h{index}"
        outside, inside = f"{self.prefix}v{index}", f"{self.prefix}p{index}"
        ip = f"{self.subnet}.{index + 1}"
        _ip("netns", "add", namespace)
        host = NetnsHost(name=namespace, ip=ip, lab=self, veth=outside)
        self.hosts.append(host)
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        self._veths.append(outside)
        _ip("link", "set", inside, "netns", namespace)
        _ip("link", "set", outside, "master", self.bridge)
        _ip("link", "set", outside, "up")
        _ip("link", "set", "lo", "up", netns=namespace)
        _ip("link", "set", inside, "name", _IFACE, netns=namespace)
        _ip("addr", "add", f"{ip}/24", "dev", _IFACE, netns=namespace)
        _ip("link", "set", _IFACE, "multicast", "on", "up", netns=namespace)
        _ip("route", "add", "224.0.0.0/4", "dev", _IFACE, netns=namespace)
        return host

    def close(self) -> None:
        """Kill every process started here, then delete namespaces, veths and the bridge."""
        if self._closed:
            return
        self._closed = True
        for host in self.hosts:
            for process in host.processes:
                _kill_group(process)
        for host in self.hosts:
            # Anything else still running in the namespace (children that left the group).
            pids = _ip("netns", "pids", host.name, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _ip("netns", "del", host.name, check=False)
        for veth in self._veths:
            _ip("link", "del", veth, check=False)  # usually gone with its namespace
        _ip("link", "del", self.bridge, check=False)
        self.assert_clean()

    def leftovers(self) -> list[str]:
        found = [
            f"netns {line.split()[0]}"
            for line in _ip("netns", "list", check=False).stdout.splitlines()
            if line.startswith(f"{self.prefix}-")
        ]
        for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
            name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
            if name.startswith(self.prefix):
                found.append(f"link {name}")
        for host in self.hosts:
            found.extend(f"process {p.pid}" for p in host.processes if p.poll() is None)
        return found

    def assert_clean(self) -> None:
        left = self.leftovers()
        if left:
            raise AssertionError(f"netns lab left things behind: {', '.join(left)}")

    def __enter__(self) -> NetnsLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _kill_group(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)
    for stream in (process.stdout, process.stderr, process.stdin):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


class LineReader:
    """Reads a process's text stream on a thread, stamping each line with `time.monotonic()`.

    Stamping on arrival (not parsing timestamps out of the line) keeps the measurement honest
    across processes; the pipe adds microseconds.
    """

    def __init__(self, stream: IO[str], *, name: str = "reader") -> None:
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()
        self.history: list[tuple[float, str]] = []
        self._thread = threading.Thread(target=self._run, args=(stream,), name=name, daemon=True)
        self._thread.start()

    def _run(self, stream: IO[str]) -> None:
        with contextlib.suppress(ValueError, OSError):  # the stream was closed under us
            for line in stream:
                self.lines.put((time.monotonic(), line.rstrip("\n")))

    def wait_for(self, predicate: Callable[[str], bool], *, timeout_s: float) -> tuple[float, str]:
        """The first new line matching `predicate`, with its arrival time; TimeoutError if none."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                tail = "\n".join(line for _, line in self.history[-15:])
                raise TimeoutError(f"no matching line within {timeout_s} s; last lines:\n{tail}")
            try:
                stamped = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            self.history.append(stamped)
            if predicate(stamped[1]):
                return stamped

    def join(self, timeout_s: float = 5.0) -> None:
        self._thread.join(timeout_s)


try:
    import pytest
except ImportError:  # the harness also works outside pytest (benchmarks)
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture
    def netns_lab_factory() -> Iterator[Callable[[int], NetnsLab]]:
        """`make(n)` builds a lab of n hosts; all labs are torn down (and checked) after the test.

        Skips the test, with the reason, where namespaces cannot be built (not root, no `ip`).
        """
        reason = skip_reason()
        if reason is not None:
            pytest.skip(reason)
        with contextlib.ExitStack() as stack:

            def make(hosts: int) -> NetnsLab:
                return stack.enter_context(NetnsLab.create(hosts))

            yield make
