"""A multi-host lab on one machine: N network namespaces on a Linux bridge, real multicast.

    with NetnsLab.create(3) as lab:          # or the `netns_lab_factory` fixture in tests/e2e
        watcher = lab.hosts[1].popen([sys.executable, "-m", "mesh.cli", "discover", ...])
        node = LocalNode.start(mesh_command("node", "start", ...), popen=lab.hosts[0].popen,
                               name="n1", log=..., timeout_s=90)  # mesh.local_processes
        ...
    # every process is killed and every namespace, veth, the bridge and the lab's firewall
    # rules are deleted, even when the block raises; `assert_clean()` checks nothing is left.

Names start with `em<pid><lab>` (interface names are limited to 15 bytes), so parallel sessions
never collide, and addresses come from 198.18.0.0/17 (a /24 per lab, part of the benchmark range
198.18.0.0/15), used only inside the namespaces created here (the bridge itself has no address
in the root namespace). The rest of the range is the simulations': the netns backend takes
198.18.128.0/17, compose networks 198.19.0.0/17 and our own dockerd's pool 198.19.128.0/17. Where a Docker engine (or anything else) made the host's
firewall filter bridged traffic, the lab adds accept rules for its own bridge and removes them
again (mesh/sim/firewall.py). The netns simulation backend (mesh/sim/netns.py) builds its
namespaces and cables with the same functions (`add_bridge`, `plug_namespace`).
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

from mesh.sim.firewall import Firewall, lab_tag

_LAB_COUNTER = itertools.count()
_SUBNET_PREFIX = "198.18"  # 198.18.0.0/15: reserved for benchmarking (RFC 2544)
_IFACE = "eth0"
IFACE = _IFACE  # a host's interface inside its namespace


def ip_command(
    *args: str, check: bool = True, netns: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`ip [-n NETNS] ARGS`; CalledProcessError (with stderr) on failure when `check`."""
    argv = ["ip", *(("-n", netns) if netns else ()), *args]
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=20)


def add_bridge(name: str) -> None:
    """A bridge that passes multicast (mDNS) between its ports, up."""
    ip_command("link", "add", name, "type", "bridge")
    # No IGMP snooping: with no querier on the bridge, snooping can drop mDNS traffic.
    ip_command("link", "set", name, "type", "bridge", "mcast_snooping", "0")
    ip_command("link", "set", name, "up")


def add_namespace(name: str) -> None:
    """A network namespace with its loopback up."""
    ip_command("netns", "add", name)
    ip_command("link", "set", "lo", "up", netns=name)


def plug_namespace(
    namespace: str, bridge: str, *, outside: str, inside: str, address: str, iface: str = _IFACE
) -> None:
    """A cable from `bridge` into `namespace`: the veth `outside` on the bridge, its peer
    renamed `iface` inside with `address` (CIDR) and a multicast route (mDNS goes out on it)."""
    ip_command("link", "add", outside, "type", "veth", "peer", "name", inside)
    ip_command("link", "set", inside, "netns", namespace)
    ip_command("link", "set", outside, "master", bridge)
    ip_command("link", "set", outside, "up")
    ip_command("link", "set", inside, "name", iface, netns=namespace)
    ip_command("addr", "add", address, "dev", iface, netns=namespace)
    ip_command("link", "set", iface, "multicast", "on", "up", netns=namespace)
    if iface == _IFACE:  # the first cable carries multicast; others reach their subnets only
        ip_command("route", "add", "224.0.0.0/4", "dev", iface, netns=namespace)


def kill_namespace_processes(namespace: str) -> list[int]:
    """SIGKILL whatever still runs in `namespace` (children that left their group); the pids."""
    killed = []
    for pid in ip_command("netns", "pids", namespace, check=False).stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
            killed.append(int(pid))
    return killed


def namespaces_named(prefix: str) -> list[str]:
    """Namespaces whose names start with `prefix`."""
    listed = ip_command("netns", "list", check=False).stdout.splitlines()
    return [line.split()[0] for line in listed if line.startswith(prefix)]


def links_named(prefix: str) -> list[str]:
    """Links of this namespace whose names start with `prefix`."""
    found = []
    for line in ip_command("-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if name.startswith(prefix):
            found.append(name)
    return found


def skip_reason() -> str | None:
    """Why a lab cannot be built here, or None if it can."""
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"em{os.getpid()}probe"
    try:
        ip_command("netns", "add", probe)
    except subprocess.CalledProcessError as error:
        return f"cannot create a network namespace: {error.stderr.strip()}"
    finally:
        ip_command("netns", "del", probe, check=False)
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
        ip_command("link", "set", self.veth, "up" if up else "down")

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

    def __init__(self, *, firewall: Firewall | None = None) -> None:
        index = next(_LAB_COUNTER)
        self.prefix = f"em{os.getpid()}{index:x}"
        if len(self.prefix) > 11:
            raise RuntimeError(f"lab prefix {self.prefix!r} too long for interface names")
        self.bridge = f"{self.prefix}b"
        self.subnet = f"{_SUBNET_PREFIX}.{index % 128}"  # 198.18.0.0/17: see the docstring
        self.hosts: list[NetnsHost] = []
        self._veths: list[str] = []
        self._closed = False
        self.firewall = firewall if firewall is not None else Firewall()
        self.firewall_tag = lab_tag(self.prefix)
        self.firewall_rules: list[str] = []  # what `_add_bridge` added, one line each

    @classmethod
    @contextlib.contextmanager
    def create(cls, hosts: int, *, firewall: Firewall | None = None) -> Iterator[NetnsLab]:
        lab = cls(firewall=firewall)
        try:
            lab._add_bridge()
            for _ in range(hosts):
                lab.add_host()
            yield lab
        finally:
            lab.close()

    def _add_bridge(self) -> None:
        add_bridge(self.bridge)
        added = self.firewall.allow_bridge(self.bridge, self.firewall_tag)
        if added is not None:
            self.firewall_rules.append(added)

    def add_host(self) -> NetnsHost:
        index = len(self.hosts) + 1
        if index > 250:
            raise RuntimeError("a lab holds at most 250 hosts")
        namespace = f"{self.prefix}-h{index}"
        outside, inside = f"{self.prefix}v{index}", f"{self.prefix}p{index}"
        ip = f"{self.subnet}.{index + 1}"
        add_namespace(namespace)
        host = NetnsHost(name=namespace, ip=ip, lab=self, veth=outside)
        self.hosts.append(host)
        self._veths.append(outside)
        plug_namespace(namespace, self.bridge, outside=outside, inside=inside, address=f"{ip}/24")
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
            kill_namespace_processes(host.name)
            ip_command("netns", "del", host.name, check=False)
        for veth in self._veths:
            ip_command("link", "del", veth, check=False)  # usually gone with its namespace
        ip_command("link", "del", self.bridge, check=False)
        self.firewall.remove(self.firewall_tag)
        self.assert_clean()

    def leftovers(self) -> list[str]:
        found = [f"netns {name}" for name in namespaces_named(f"{self.prefix}-")]
        found.extend(f"link {name}" for name in links_named(self.prefix))
        found.extend(
            f"iptables rule {' '.join(rule)}" for rule in self.firewall.rules(self.firewall_tag)
        )
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
