"""A topology as a mesh of network namespaces on this machine: `mesh sim ... --backend netns`.

For a laptop or a device with no Docker engine: the same mesh as the compose backend, made of
the pieces the e2e tests' lab uses (mesh/sim/lab.py), but living on after the command that
built it, so that `status`, `fault` and `down` work from later commands:

- one Linux bridge per site (the nodes' `site` label), one namespace per topology node with a
  cable into its site's bridge, and one namespace for the coordinator with a cable into every
  site's bridge (as a gateway would: a site can be cut off without cutting the others);
- addresses: a free /24 of 198.18.128.0/17 per site (the test labs keep to 198.18.0.0/17,
  compose networks to 198.19.0.0/17, our dockerd's pool is 198.19.128.0/17); the root
  namespace takes .1 on every bridge, like Docker's gateway, so `mesh sim` and its user reach
  the coordinator (.2 on every site) and the nodes (.10, .11, ...) at their own addresses;
- nodes run `mesh node start --topology FILE --node NAME --stand-ins`, found by the coordinator
  (`mesh coordinator start --mdns-only`, its own Ray) by real mDNS across the bridges;
- a node's `device: {cpus, memory_mb}` becomes a cgroup v1 CPU quota and memory limit where
  /sys/fs/cgroup/cpu and /sys/fs/cgroup/memory can be written (otherwise a note says so);
- where the host's firewall filters bridged traffic (a Docker engine's), accept rules for the
  lab's own bridges (mesh/sim/firewall.py), removed by `down`.

What `up` made is recorded in `state_root()/netns/<project>/state.json` (with the processes'
logs and the nodes' state directories next to it); every name starts with a prefix derived from
the project and that directory, so `down` also finds what a crashed `up` made before it could
write it down. Needs root and iproute2. Delay and loss (mesh/sim/shaping.py) use netem where the
kernel has it, and otherwise iptables in the node's namespace: a `statistic` drop rule, and an
NFQUEUE rule served by a delayer process (mesh/sim/nfqueue.py) that holds each packet MS ms.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mesh.core.errors import ConfigError
from mesh.sim import shaping
from mesh.sim.backend import (
    FaultAction,
    Progress,
    SimError,
    SimNode,
    SimStatus,
    check_fault,
    parse_target,
    state_root,
    wait_until_ready,
)
from mesh.sim.compose import (
    COORDINATOR_GRPC_PORT,
    COORDINATOR_HOST,
    COORDINATOR_HTTP_PORT,
    FIRST_NODE_HOST,
    LAST_NODE_HOST,
    coordinator_args,
    node_args,
    node_site,
    project_name,
    topology_sites,
)
from mesh.sim.firewall import Firewall, lab_tag
from mesh.sim.lab import (
    IFACE,
    add_bridge,
    add_namespace,
    ip_command,
    kill_namespace_processes,
    links_named,
    namespaces_named,
    plug_namespace,
    skip_reason,
)
from mesh.topology import Topology, load_topology

NETNS_POOL = ipaddress.IPv4Network("198.18.128.0/17")
GATEWAY_HOST = 1  # the root namespace's address on every site bridge
COORDINATOR_NUM_CPUS = 2
SIGNAL_WAIT_S = 10.0  # SIGKILL or SIGSTOP sent -> the process's state shows it
STOP_WAIT_S = 30.0  # SIGTERM -> gone: a node drains for 10 s, the coordinator stops Serve and Ray
CGROUP_ROOT = pathlib.Path("/sys/fs/cgroup")
CPU_PERIOD_US = 100_000
_PACKAGE_ROOT = pathlib.Path(__file__).resolve().parents[2]  # the folder holding `mesh`


@dataclass
class Proc:
    """A process `up` started: its pid and process group (the group outlives the launcher)."""

    pid: int = 0
    pgid: int = 0
    log: str = ""
    ended_by: str = ""  # "kill" or "stop" when a fault ended it
    # When it started (/proc/PID/stat field 22, clock ticks since boot): a pid whose start time
    # differs was reused by another process after ours ended, and is never signalled.
    start_ticks: int = 0


@dataclass
class NodeEntry:
    name: str
    site: str
    namespace: str
    veth: str  # the cable's end on the bridge, in the root namespace
    ip: str
    port: int
    state_dir: str
    cgroups: list[str] = field(default_factory=list)
    proc: Proc = field(default_factory=Proc)
    partition: bool = False
    delay_ms: float | None = None
    loss_pct: float | None = None
    shaping: dict[str, Any] = field(default_factory=dict)  # mesh/sim/shaping.py's state

    def faults(self) -> tuple[str, ...]:
        found = ["partition"] if self.partition else []
        if self.delay_ms is not None:
            found.append(f"delay {self.delay_ms:g}ms")
        if self.loss_pct is not None:
            found.append(f"loss {self.loss_pct:g}%")
        return tuple(found)


@dataclass
class LabState:
    """Everything `down` needs, written after every step of `up`."""

    project: str
    topology: str
    prefix: str
    directory: str
    bridges: dict[str, dict[str, str]] = field(default_factory=dict)  # site -> name, subnet
    coordinator_namespace: str = ""
    coordinator_ips: dict[str, str] = field(default_factory=dict)  # site -> its address there
    coordinator: Proc = field(default_factory=Proc)
    nodes: dict[str, NodeEntry] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LabState:
        nodes = {
            name: NodeEntry(**{**entry, "proc": Proc(**entry["proc"])})
            for name, entry in data.pop("nodes").items()
        }
        return cls(**{**data, "coordinator": Proc(**data.pop("coordinator")), "nodes": nodes})


# ---------------------------------------------------------------------------- processes


def _environment() -> dict[str, str]:
    """This command's code in every process it starts, output unbuffered into the logs."""
    path = os.environ.get("PYTHONPATH", "")
    python_path = os.pathsep.join(p for p in (str(_PACKAGE_ROOT), path) if p)
    return {**os.environ, "PYTHONPATH": python_path, "PYTHONUNBUFFERED": "1"}


def launch(namespace: str, argv: list[str], log: pathlib.Path, cgroups: list[str]) -> Proc:
    """Start `argv` in `namespace`, detached (it outlives this command): its own session, stdin
    /dev/null, output appended to `log`, in `cgroups` from its first instruction on."""
    joins = "".join(f"echo $$ > {shlex.quote(c + '/cgroup.procs')} || exit 1; " for c in cgroups)
    command = shlex.join(["ip", "netns", "exec", namespace, *argv])
    script = f"{joins}{command} </dev/null >>{shlex.quote(str(log))} 2>&1 & echo $!"
    launcher = subprocess.Popen(
        ["sh", "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_environment(),
        cwd=_PACKAGE_ROOT,
        start_new_session=True,  # the launcher leads a new group; the process stays in it
    )
    out, err = launcher.communicate(timeout=30)
    if launcher.returncode != 0 or not out.strip().isdigit():
        raise SimError(f"cannot start `{shlex.join(argv[1:5])}` in {namespace}: {err.strip()}")
    pid = int(out.strip())
    return Proc(pid=pid, pgid=launcher.pid, log=str(log), start_ticks=_start_ticks(pid))


def _start_ticks(pid: int) -> int:
    """A process's start time (field 22 of /proc/PID/stat); 0 when it is gone."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rpartition(")")[2].split()[19])


def process_state(proc: Proc) -> str:
    """running, paused (SIGSTOP), stopped (ended by a `stop` fault), exited, or missing."""
    if not proc.pid:
        return "missing"
    try:
        stat = pathlib.Path(f"/proc/{proc.pid}/stat").read_text()
        command = pathlib.Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    except OSError:  # gone
        return "stopped" if proc.ended_by == "stop" else "exited"
    fields = stat.rpartition(")")[2].split()
    state = fields[0]
    # A zombie, or the pid reused by another process (another start time; or, for a state file
    # of an older version, another program). An empty command line is not a sign of either:
    # the kernel shows one while a process is inside execve (`ip netns exec` becoming python).
    reused = (
        int(fields[19]) != proc.start_ticks
        if proc.start_ticks
        else bool(command) and b"mesh.cli" not in command
    )
    if state == "Z" or reused:
        return "stopped" if proc.ended_by == "stop" else "exited"
    return "paused" if state in ("T", "t") else "running"


def _alive(proc: Proc) -> bool:
    return process_state(proc) in ("running", "paused")


def _signal(proc: Proc, number: signal.Signals, *, group: bool = True) -> None:
    if not _alive(proc):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(proc.pgid, number)
        else:
            os.kill(proc.pid, number)


def _wait_gone(proc: Proc, timeout_s: float) -> bool:
    return _wait_until(proc, lambda state: state not in ("running", "paused"), timeout_s)


def _wait_until(proc: Proc, done: Callable[[str], bool], timeout_s: float) -> bool:
    """Signals are delivered asynchronously (a process in uninterruptible sleep, e.g. paging
    in a memory-mapped model, takes a SIGKILL or SIGSTOP only when it wakes): wait until the
    process's state shows the signal acted, up to `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not done(process_state(proc)):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def _log_tail(path: str, chars: int = 2000) -> str:
    try:
        return pathlib.Path(path).read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------------------- cgroups


def _own_cgroup(controller: str) -> pathlib.Path | None:
    """This process's cgroup v1 folder for `controller`, if that hierarchy can be written."""
    base = CGROUP_ROOT / controller
    if not (base / "cgroup.procs").exists() or not os.access(base, os.W_OK):
        return None
    for line in pathlib.Path("/proc/self/cgroup").read_text().splitlines():
        _id, _sep, rest = line.partition(":")
        controllers, _sep, path = rest.partition(":")
        if controller in controllers.split(","):
            folder = base / path.lstrip("/")
            return folder if os.access(folder, os.W_OK) else None
    return base


def make_cgroups(name: str, cpus: float | None, memory_mb: int | None) -> tuple[list[str], str]:
    """A CPU quota and a memory limit for one node (cgroup v1): the folders, and a note."""
    made: list[str] = []
    applied: list[str] = []
    wanted = [("cpu", cpus), ("memory", memory_mb)]
    for controller, value in wanted:
        if value is None:
            continue
        parent = _own_cgroup(controller)
        if parent is None:
            continue
        folder = parent / name
        folder.mkdir(exist_ok=True)
        made.append(str(folder))
        if controller == "cpu":
            (folder / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
            (folder / "cpu.cfs_quota_us").write_text(str(int(float(value) * CPU_PERIOD_US)))
            applied.append(f"cpus {value:g}")
        else:
            (folder / "memory.limit_in_bytes").write_text(str(int(value) * 1024 * 1024))
            applied.append(f"memory {value} MB")
    missing = [c for c, v in wanted if v is not None and not any(c in a for a in applied)]
    note = ""
    if missing:
        note = f"limits not applied ({', '.join(missing)}): no writable cgroup v1 hierarchy"
    return made, note


def remove_cgroup(folder: str, timeout_s: float = 10.0) -> bool:
    """rmdir a cgroup once its processes are gone; False if it does not go."""
    path = pathlib.Path(folder)
    deadline = time.monotonic() + timeout_s
    while path.exists():
        try:
            path.rmdir()
        except OSError:  # still has tasks (a killed process not yet reaped)
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)
    return True


# ---------------------------------------------------------------------------- addresses


def free_subnets(count: int) -> list[ipaddress.IPv4Network]:
    """`count` /24s of NETNS_POOL that no address or route of this namespace overlaps."""
    used: list[ipaddress.IPv4Network] = []
    routes = ip_command("-4", "route", "show", "table", "all", check=False).stdout
    addresses = ip_command("-o", "-4", "addr", "show", check=False).stdout
    for word in (routes + " " + addresses).split():
        with contextlib.suppress(ValueError):
            used.append(ipaddress.IPv4Network(word, strict=False))
    free = [
        subnet
        for subnet in NETNS_POOL.subnets(new_prefix=24)
        if not any(subnet.overlaps(u) for u in used if u.prefixlen > 0)
    ]
    if len(free) < count:
        raise SimError(
            f"{count} sites need {count} free /24s of {NETNS_POOL}; only {len(free)} are free "
            "(other simulations running? `mesh sim down` them)"
        )
    return free[:count]


def host_address(subnet: str, host: int) -> str:
    return str(ipaddress.IPv4Network(subnet)[host])


# ---------------------------------------------------------------------------- the backend


class NetnsBackend:
    """`SimBackend` on network namespaces (see the module's docstring)."""

    name = "netns"

    def __init__(
        self,
        *,
        firewall: Firewall | None = None,
        root: Callable[[], pathlib.Path] = state_root,
    ) -> None:
        self._firewall = firewall if firewall is not None else Firewall()
        self._root = root

    # -- where things are

    def _topology(self, topology: pathlib.Path) -> Topology:
        try:
            return load_topology(topology)
        except ConfigError as error:
            raise SimError(str(error)) from None

    def _directory(self, project: str) -> pathlib.Path:
        return self._root() / "netns" / project

    def _prefix(self, project: str, directory: pathlib.Path) -> str:
        digest = hashlib.sha256(f"{project}\0{directory}".encode()).hexdigest()
        return f"ems{digest[:5]}"  # + up to 7 more characters: interface names hold 15

    def _load(self, project: str) -> LabState | None:
        path = self._directory(project) / "state.json"
        try:
            return LabState.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise SimError(
                f"cannot read {path}: {error}; `mesh sim down` removes what it can find"
            ) from None

    def _save(self, state: LabState) -> None:
        path = pathlib.Path(state.directory) / "state.json"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(dataclasses.asdict(state), indent=1))
        temporary.replace(path)

    # -- up

    def up(self, topology: pathlib.Path, *, progress: Progress, timeout_s: float) -> SimStatus:
        deadline = time.monotonic() + timeout_s
        reason = skip_reason()
        if reason is not None:
            raise SimError(f"the netns backend cannot run here: {reason}")
        spec = self._topology(topology)
        project = project_name(spec)
        existing = self._load(project)
        if existing is not None:
            if _alive(existing.coordinator):
                progress(f"{project} is already up (netns); `mesh sim down` it to start afresh")
                return self.status(topology)
            progress(f"{project}: removing what an earlier run left behind")
            self.down(topology, progress=progress)
        directory = self._directory(project)
        (directory / "logs").mkdir(parents=True, exist_ok=True)
        state = LabState(
            project=project,
            topology=str(topology.resolve()),
            prefix=self._prefix(project, directory),
            directory=str(directory),
        )
        self._save(state)
        progress(f"{project}: building namespaces and bridges ({state.prefix}*)")
        self._build_network(spec, state, progress)
        self._start_coordinator(state, progress)
        for node in state.nodes.values():
            self._start_node(state, node)
            progress(f"  node {node.name}: started at {node.ip}:{node.port}")
        self._save(state)
        self._wait_started(state, progress, deadline)
        status = self.status(topology)
        progress(f"waiting until the coordinator lists {len(state.nodes)} nodes ready")
        wait_until_ready(
            status.coordinator_grpc,
            list(state.nodes),
            progress=progress,
            timeout_s=max(1.0, deadline - time.monotonic()),
        )
        progress(
            f"{project} is up: coordinator gRPC {status.coordinator_grpc}, "
            f"OpenAI API http://{status.coordinator_http}/v1"
        )
        return self.status(topology)

    def _build_network(self, spec: Topology, state: LabState, progress: Progress) -> None:
        sites = topology_sites(spec)
        tag = lab_tag(state.prefix)
        for index, (site, subnet) in enumerate(zip(sites, free_subnets(len(sites)), strict=True)):
            bridge = f"{state.prefix}b{index}"
            state.bridges[site] = {"name": bridge, "subnet": str(subnet)}
            self._save(state)
            add_bridge(bridge)
            gateway = host_address(str(subnet), GATEWAY_HOST)
            ip_command("addr", "add", f"{gateway}/24", "dev", bridge)
            added = self._firewall.allow_bridge(bridge, tag)
            progress(f"  site {site}: bridge {bridge}, {subnet}" + (f"; {added}" if added else ""))
        state.coordinator_namespace = f"{state.prefix}-coordinator"
        self._save(state)
        add_namespace(state.coordinator_namespace)
        for index, site in enumerate(sites):
            address = host_address(state.bridges[site]["subnet"], COORDINATOR_HOST)
            plug_namespace(
                state.coordinator_namespace,
                state.bridges[site]["name"],
                outside=f"{state.prefix}c{index}",
                inside=f"{state.prefix}d{index}",
                address=f"{address}/24",
                iface=IFACE if index == 0 else f"eth{index}",
            )
            state.coordinator_ips[site] = address
        self._add_nodes(spec, state)

    def _add_nodes(self, spec: Topology, state: LabState) -> None:
        hosts: dict[str, int] = {}
        for index, node in enumerate(spec.nodes):
            site = node_site(node)
            host = FIRST_NODE_HOST + hosts.get(site, 0)
            if host > LAST_NODE_HOST:
                raise SimError(f"site {site!r} has more than {LAST_NODE_HOST - 9} nodes")
            hosts[site] = hosts.get(site, 0) + 1
            entry = NodeEntry(
                name=node.name,
                site=site,
                namespace=f"{state.prefix}-n-{node.name}",
                veth=f"{state.prefix}v{index}",
                ip=host_address(state.bridges[site]["subnet"], host),
                port=node.effective_port,
                state_dir=str(pathlib.Path(state.directory) / "nodes" / node.name),
            )
            state.nodes[node.name] = entry
            self._save(state)
            add_namespace(entry.namespace)
            plug_namespace(
                entry.namespace,
                state.bridges[site]["name"],
                outside=entry.veth,
                inside=f"{state.prefix}p{index}",
                address=f"{entry.ip}/24",
            )
            device = node.device
            if device is not None and (device.cpus is not None or device.memory_mb is not None):
                entry.cgroups, note = make_cgroups(
                    f"{state.prefix}-{node.name}", device.cpus, device.memory_mb
                )
                if note:
                    state.notes.append(f"{node.name}: {note}")
            self._save(state)

    def _start_coordinator(self, state: LabState, progress: Progress) -> None:
        argv = [
            sys.executable,
            "-m",
            "mesh.cli",
            *coordinator_args(state.topology, str(COORDINATOR_NUM_CPUS)),
        ]
        log = pathlib.Path(state.directory) / "logs" / "coordinator.log"
        state.coordinator = launch(state.coordinator_namespace, argv, log, [])
        self._save(state)
        progress(f"  coordinator: starting (Ray and Serve; log {log})")

    def _start_node(self, state: LabState, node: NodeEntry) -> None:
        argv = [
            sys.executable,
            "-m",
            "mesh.cli",
            *node_args(state.topology, node.name, node.state_dir),
            "--interface",
            node.ip,
        ]
        pathlib.Path(node.state_dir).mkdir(parents=True, exist_ok=True)
        log = pathlib.Path(state.directory) / "logs" / f"{node.name}.log"
        node.proc = launch(node.namespace, argv, log, node.cgroups)
        self._save(state)

    def _wait_started(self, state: LabState, progress: Progress, deadline: float) -> None:
        """Until the coordinator says `coordinator ready`; a process that ends first is an
        error with its log's tail."""
        log = pathlib.Path(state.coordinator.log)
        while "coordinator ready" not in _log_tail(str(log), 1_000_000):
            for name, proc in [("coordinator", state.coordinator)] + [
                (n.name, n.proc) for n in state.nodes.values()
            ]:
                if not _alive(proc):
                    raise SimError(
                        f"{name} ended while starting ({process_state(proc)}); its log "
                        f"{proc.log} ends:\n{_log_tail(proc.log)}\n`mesh sim down` cleans up"
                    )
            if time.monotonic() >= deadline:
                raise SimError(
                    f"the coordinator did not get ready in time; {log} ends:\n"
                    f"{_log_tail(str(log))}\n`mesh sim down` cleans up"
                )
            time.sleep(0.5)
        progress("  coordinator: ready")

    # -- status

    def status(self, topology: pathlib.Path) -> SimStatus:
        spec = self._topology(topology)
        project = project_name(spec)
        state = self._load(project)
        if state is None:
            missing = tuple(SimNode(n.name, node_site(n), "", "missing") for n in spec.nodes)
            return SimStatus(self.name, project, str(topology), "", "", missing)
        coordinator_up = _alive(state.coordinator)
        first = next(iter(state.coordinator_ips.values()), "")
        nodes = []
        for node in state.nodes.values():
            process = process_state(node.proc)
            address = f"{node.ip}:{node.port}" if process in ("running", "paused") else ""
            nodes.append(SimNode(node.name, node.site, address, process, node.faults()))
        notes = [*state.notes, *self._stand_ins(state)]
        return SimStatus(
            backend=self.name,
            project=project,
            topology=state.topology,
            coordinator_grpc=f"{first}:{COORDINATOR_GRPC_PORT}" if coordinator_up else "",
            coordinator_http=f"{first}:{COORDINATOR_HTTP_PORT}" if coordinator_up else "",
            nodes=tuple(nodes),
            notes=tuple(notes),
        )

    def _stand_ins(self, state: LabState) -> list[str]:
        """What the nodes stood in for (their `stand-in:` log lines), once each."""
        found: list[str] = []
        for node in state.nodes.values():
            for line in _log_tail(node.proc.log, 200_000).splitlines():
                text = line[line.find("stand-in:") :] if "stand-in:" in line else ""
                if text and f"{node.name}: {text}" not in found:
                    found.append(f"{node.name}: {text}")
        return found

    # -- faults

    def fault(
        self, topology: pathlib.Path, target: str, action: FaultAction, value: float | None = None
    ) -> str:
        action = check_fault(action, value)
        spec = self._topology(topology)
        state = self._load(project_name(spec))
        if state is None:
            raise SimError(
                f"{project_name(spec)} is not up (netns): `mesh sim up {topology} --backend netns`"
            )
        kind, name = parse_target(target)
        if kind == "site":
            if action not in ("partition", "heal", "delay", "loss"):
                raise SimError(
                    f"fault {action} takes a node; site:NAME only for partition, "
                    "heal, delay and loss"
                )
            nodes = [n for n in state.nodes.values() if n.site == name]
            if not nodes:
                sites = ", ".join(sorted({n.site for n in state.nodes.values()}))
                raise SimError(f"no site {name!r} in {state.project} (sites: {sites})")
        else:
            if name not in state.nodes:
                raise SimError(
                    f"no node {name!r} in {state.project} (nodes: {', '.join(state.nodes)})"
                )
            nodes = [state.nodes[name]]
        lines = [self._apply(state, node, action, value) for node in nodes]
        self._save(state)
        return "; ".join(lines)

    def _apply(
        self, state: LabState, node: NodeEntry, action: FaultAction, value: float | None
    ) -> str:
        proc = node.proc
        if action == "kill":
            _signal(proc, signal.SIGKILL)
            proc.ended_by = "kill"
            # Like `docker kill`: the fault has acted when it returns.
            if not _wait_gone(proc, SIGNAL_WAIT_S):
                raise SimError(
                    f"{node.name} (pid {proc.pid}) still runs {SIGNAL_WAIT_S:g} s after SIGKILL"
                )
            return f"killed {node.name} (SIGKILL, pid {proc.pid})"
        if action == "stop":
            _signal(proc, signal.SIGTERM)
            _signal(proc, signal.SIGCONT)  # a paused node must run to handle it
            if not _wait_gone(proc, STOP_WAIT_S):
                _signal(proc, signal.SIGKILL)
                _wait_gone(proc, SIGNAL_WAIT_S)
            proc.ended_by = "stop"
            return f"stopped {node.name} (SIGTERM, pid {proc.pid})"
        if action == "pause":
            _signal(proc, signal.SIGSTOP)
            if not _wait_until(proc, lambda state: state != "running", SIGNAL_WAIT_S):
                raise SimError(
                    f"{node.name} (pid {proc.pid}) still runs {SIGNAL_WAIT_S:g} s after SIGSTOP"
                )
            return f"paused {node.name} (SIGSTOP, pid {proc.pid})"
        if action == "restart":
            if _alive(proc):
                self._apply(state, node, "stop", None)
            self._start_node(state, node)
            return f"restarted {node.name} (pid {node.proc.pid}, same state {node.state_dir})"
        if action == "partition":
            ip_command("link", "set", node.veth, "down")
            node.partition = True
            return f"partitioned {node.name} (cable {node.veth} down)"
        if action == "heal":
            return self._heal(node)
        before = (node.delay_ms, node.loss_pct)
        if action == "delay":
            node.delay_ms = value
        else:
            node.loss_pct = value
        try:
            self._netem(node)
        except SimError:
            node.delay_ms, node.loss_pct = before
            self._netem(node)  # back to what was in force
            raise
        said = " ".join(f for f in node.faults() if f != "partition")
        how = shaping.describe(node.shaping)
        return f"{node.name}: {said or 'no delay or loss'}" + (f" ({how})" if how else "")

    def _heal(self, node: NodeEntry) -> str:
        undone = []
        if node.partition:
            ip_command("link", "set", node.veth, "up")
            node.partition = False
            undone.append("partition")
        if node.delay_ms is not None or node.loss_pct is not None:
            node.delay_ms = node.loss_pct = None
            self._netem(node)
            undone.append("delay/loss")
        if process_state(node.proc) == "paused":
            _signal(node.proc, signal.SIGCONT)
            _wait_until(node.proc, lambda state: state != "paused", SIGNAL_WAIT_S)
            undone.append("pause")
        return f"healed {node.name} ({', '.join(undone) or 'nothing to undo'})"

    def _netem(self, node: NodeEntry) -> None:
        """The node's outgoing traffic with its delay and loss (mesh/sim/shaping.py: netem, or
        on a kernel without it iptables rules and an NFQUEUE delayer in the node's namespace);
        neither: whatever was set is removed. The delayer's pid is kept in `node.shaping`."""
        logs = pathlib.Path(node.proc.log).parent if node.proc.log else None
        try:
            node.shaping = shaping.apply(
                ["ip", "netns", "exec", node.namespace],
                delay_ms=node.delay_ms,
                loss_pct=node.loss_pct,
                tag=shaping.shaping_tag(node.namespace),
                previous=node.shaping,
                log=str(logs / f"{node.name}-delayer.log") if logs else None,
            )
        except SimError as error:
            node.shaping = {}  # apply took back what it had set
            raise SimError(f"{node.name}: {error}") from None

    # -- down

    def down(self, topology: pathlib.Path, *, progress: Progress) -> list[str]:
        spec = self._topology(topology)
        project = project_name(spec)
        directory = self._directory(project)
        prefix = self._prefix(project, directory)
        try:
            state = self._load(project)
        except SimError as error:  # unreadable: sweep by prefix
            progress(str(error))
            state = None
        removed: list[str] = []
        if state is not None:
            for node in state.nodes.values():  # delayers, before their namespaces go
                removed += shaping.clear(["ip", "netns", "exec", node.namespace], node.shaping)
            removed += self._stop_processes(state, progress)
        for namespace in namespaces_named(f"{prefix}-"):
            for pid in kill_namespace_processes(namespace):
                removed.append(f"process {pid} in {namespace}")
            ip_command("netns", "del", namespace, check=False)
            removed.append(f"namespace {namespace}")
        for link in links_named(prefix):
            if ip_command("link", "del", link, check=False).returncode == 0:
                removed.append(f"link {link}")
        removed += self._firewall.remove(lab_tag(prefix))
        for folder in self._cgroup_folders(prefix, state):
            if remove_cgroup(folder):
                removed.append(f"cgroup {folder}")
        if directory.exists():
            shutil.rmtree(directory)
            removed.append(f"state and logs {directory}")
        left = self.leftovers(prefix)
        if left:
            raise SimError(f"{project}: could not remove {', '.join(left)}")
        for line in removed:
            progress(f"  removed {line}")
        return removed

    def _stop_processes(self, state: LabState, progress: Progress) -> list[str]:
        """Nodes: SIGKILL (a simulation's nodes need no drain). The coordinator: SIGTERM, so
        that Serve and Ray shut down, SIGKILL after STOP_WAIT_S."""
        removed = []
        for node in state.nodes.values():
            if _alive(node.proc):
                _signal(node.proc, signal.SIGKILL)
                removed.append(f"node {node.name} (pid {node.proc.pid})")
        if _alive(state.coordinator):
            progress("stopping the coordinator (Serve, then Ray)")
            _signal(state.coordinator, signal.SIGCONT)
            _signal(state.coordinator, signal.SIGTERM, group=False)
            if not _wait_gone(state.coordinator, STOP_WAIT_S):
                _signal(state.coordinator, signal.SIGKILL)
            removed.append(f"coordinator (pid {state.coordinator.pid})")
        return removed

    def _cgroup_folders(self, prefix: str, state: LabState | None) -> list[str]:
        folders = {c for n in (state.nodes.values() if state else ()) for c in n.cgroups}
        for controller in ("cpu", "memory"):
            parent = _own_cgroup(controller)
            if parent is not None:
                folders.update(str(p) for p in parent.glob(f"{prefix}-*") if p.is_dir())
        return sorted(folders)

    def leftovers(self, prefix: str) -> list[str]:
        """What of a lab with this prefix still exists (nothing, after `down`)."""
        found = [f"namespace {n}" for n in namespaces_named(f"{prefix}-")]
        found += [f"link {n}" for n in links_named(prefix)]
        found += [f"iptables rule {' '.join(r)}" for r in self._firewall.rules(lab_tag(prefix))]
        found += [f"cgroup {c}" for c in self._cgroup_folders(prefix, None)]
        return found

    def prefix(self, topology: pathlib.Path) -> str:
        """The name prefix of this topology's lab (for `leftovers`)."""
        project = project_name(self._topology(topology))
        return self._prefix(project, self._directory(project))
