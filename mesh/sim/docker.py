"""The Docker backend of `mesh sim`: a topology as a docker-compose project.

`up` makes sure an engine answers (mesh/sim/engine.py), builds the images that are missing
(mesh/sim/images.py), writes the compose file (mesh/sim/compose.py) into the project's state
directory, starts the project and waits until the coordinator lists every node ready. The
nodes find the coordinator, and it them, by mDNS inside the compose networks; the host reaches
the coordinator and each node through ports published on 127.0.0.1.

Faults act on the containers: `docker kill|stop|pause|start`, `docker network disconnect` (and
`connect` with the same address to heal), and delay and loss set by `nsenter` in the
container's network namespace (so containers need no NET_ADMIN): `tc netem`, or on a kernel
without netem iptables rules and an NFQUEUE delayer, a host process in that namespace
(mesh/sim/shaping.py). Faults in force, with the delayers' pids, are kept in
`<state>/docker/<project>/faults.json`, so `status`, `heal` and `down` work from a later command.

Every docker and compose command goes through one injected `run` (argv, env) so the logic is
unit-tested without an engine (tests/unit/test_sim_docker.py); the real thing is
tests/e2e/test_sim_failover.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import pathlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from mesh.sim import shaping
from mesh.sim.backend import (
    DEFAULT_SITE,
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
from mesh.sim.commands import NOT_INSTALLED, TIMED_OUT, Completed, Runner, run_command
from mesh.sim.engine import INSTALL_HINT

PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


class DockerBackend:
    """`mesh sim --backend docker`. Everything it runs goes through `run`."""

    name = "docker"

    def __init__(
        self,
        *,
        run: Runner = run_command,
        root: pathlib.Path | None = None,
        prepare: Callable[[Progress], dict[str, str]] | None = None,
        compose: Sequence[str] | None = None,
        docker_env: Callable[[], dict[str, str]] | None = None,
        wait_ready: Callable[..., dict[str, str]] = wait_until_ready,
    ) -> None:
        self._run = run
        self._root = root
        self._prepare = prepare  # engine + images -> env naming the images (None: the real ones)
        self._compose = list(compose) if compose is not None else None
        self._docker_env = docker_env
        self._wait_ready = wait_ready

    # ------------------------------------------------------------------ plumbing

    def _env(self) -> dict[str, str]:
        if self._docker_env is not None:
            return self._docker_env()
        from mesh.sim.engine import docker_env

        return docker_env()

    def _compose_argv(self) -> list[str]:
        if self._compose is None:
            from mesh.sim.engine import compose_command

            self._compose = compose_command()
        return list(self._compose)

    def _call(self, argv: Sequence[str], env: dict[str, str], timeout_s: float) -> Completed:
        """Run docker or the compose command. Neither exits 127 or 124 itself: those say it is
        not installed or hung, an error whatever the caller checks."""
        done = self._run(argv, env, timeout_s)
        if done.returncode == NOT_INSTALLED:
            raise SimError(f"{argv[0]} is not installed ({INSTALL_HINT})")
        if done.returncode == TIMED_OUT:
            raise SimError(done.stderr.strip())
        return done

    def _docker(self, *args: str, timeout_s: float = 60.0, check: bool = True) -> Completed:
        done = self._call(["docker", *args], self._env(), timeout_s)
        if check and "Cannot connect to the Docker daemon" in done.stderr:
            raise SimError(
                "no Docker engine answers (`mesh sim up` or `mesh sim engine start` starts one; "
                f"DOCKER_HOST={self._env().get('DOCKER_HOST', 'unix:///var/run/docker.sock')})"
            )
        if check and done.returncode != 0:
            raise SimError(f"docker {' '.join(args[:3])}: {_tail(done.stderr) or 'failed'}")
        return done

    def _project_dir(self, project: str) -> pathlib.Path:
        return (self._root or state_root()) / "docker" / project

    def _load(self, topology: pathlib.Path) -> tuple[Any, str]:
        from mesh.sim.compose import project_name
        from mesh.topology import load_topology

        loaded = load_topology(topology)
        return loaded, project_name(loaded)

    def _write_compose(self, topology: pathlib.Path, project: str) -> pathlib.Path:
        from mesh.sim.compose import render_compose

        directory = self._project_dir(project)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "compose.yml"
        path.write_text(render_compose(topology.resolve(), directory), encoding="utf-8")
        return path

    def _compose_run(
        self,
        project: str,
        file: pathlib.Path,
        *args: str,
        env: dict[str, str] | None = None,
        timeout_s: float = 600.0,
    ) -> Completed:
        argv = [*self._compose_argv(), "-p", project, "-f", str(file), *args]
        done = self._call(argv, {**self._env(), **(env or {})}, timeout_s)
        if done.returncode != 0:
            raise SimError(
                f"{' '.join(argv[:2])} {' '.join(args[:2])} failed:\n{_tail(done.stderr or done.stdout)}"
            )
        return done

    def _containers(self, project: str) -> list[dict[str, Any]]:
        """`docker inspect` of every container of the project (running or not)."""
        ids = self._docker(
            "ps", "-a", "-q", "--no-trunc", "--filter", f"label={PROJECT_LABEL}={project}"
        ).stdout.split()
        if not ids:
            return []
        return list(json.loads(self._docker("inspect", *ids).stdout or "[]"))

    def _container(self, project: str, service: str) -> dict[str, Any]:
        for container in self._containers(project):
            if container["Config"]["Labels"].get(SERVICE_LABEL) == service:
                return container
        raise SimError(f"{project}: no container for {service!r}; is the simulation up?")

    def _faults_path(self, project: str) -> pathlib.Path:
        return self._project_dir(project) / "faults.json"

    def _faults(self, project: str) -> dict[str, dict[str, Any]]:
        with contextlib.suppress(FileNotFoundError, ValueError):
            data = json.loads(self._faults_path(project).read_text(encoding="utf-8"))
            if isinstance(data, dict):
                return data
        return {}

    def _save_faults(self, project: str, faults: dict[str, dict[str, Any]]) -> None:
        path = self._faults_path(project)
        path.parent.mkdir(parents=True, exist_ok=True)
        faults = {name: entry for name, entry in faults.items() if entry}
        path.write_text(json.dumps(faults, indent=2, sort_keys=True), encoding="utf-8")

    # ------------------------------------------------------------------ the interface

    def up(self, topology: pathlib.Path, *, progress: Progress, timeout_s: float) -> SimStatus:
        loaded, project = self._load(topology)
        # The engine first (started when none answers), and the images of this tree (built
        # when missing; a second or so when they are there).
        env = self._prepare(progress) if self._prepare else _prepare_real(progress)
        current = self.status(topology)
        running = [n.name for n in current.nodes if n.state == "running"]
        if current.up and len(running) == len(loaded.nodes):
            progress(f"{project} is already up")
        else:
            file = self._write_compose(topology, project)
            progress(f"starting {project} ({len(loaded.nodes)} nodes and a coordinator)")
            done = self._compose_run(project, file, "up", "-d", "--no-build", env=env)
            for line in (done.stderr + done.stdout).splitlines():
                if line.strip():
                    progress("  " + line.strip())
            current = self.status(topology)
        if not current.coordinator_grpc:
            raise SimError(f"{project}: the coordinator publishes no gRPC port; see `docker logs`")
        progress(f"waiting for the coordinator at {current.coordinator_grpc} to list every node")
        self._wait_ready(
            current.coordinator_grpc,
            [node.name for node in loaded.nodes],
            progress=progress,
            timeout_s=timeout_s,
        )
        return self.status(topology)

    def status(self, topology: pathlib.Path) -> SimStatus:
        from mesh.sim.compose import (
            COORDINATOR_GRPC_PORT,
            COORDINATOR_HTTP_PORT,
            COORDINATOR_SERVICE,
            service_name,
        )
        from mesh.topology.model import DEFAULT_NODE_PORT

        loaded, project = self._load(topology)
        by_service = {
            c["Config"]["Labels"].get(SERVICE_LABEL, ""): c for c in self._containers(project)
        }
        faults = self._faults(project)
        grpc = http = ""
        coordinator = by_service.get(COORDINATOR_SERVICE)
        if coordinator is not None and _state(coordinator) == "running":
            grpc = _published(coordinator, COORDINATOR_GRPC_PORT)
            http = _published(coordinator, COORDINATOR_HTTP_PORT)
        nodes = []
        for spec in loaded.nodes:
            container = by_service.get(service_name(spec.name))
            port = spec.port or DEFAULT_NODE_PORT
            state = _state(container) if container is not None else "missing"
            address = _published(container, port) if state in ("running", "paused") else ""
            nodes.append(
                SimNode(
                    name=spec.name,
                    site=spec.labels.get("site", DEFAULT_SITE),
                    address=address,
                    state=state,
                    faults=_describe_faults(faults.get(spec.name, {}), state),
                )
            )
        return SimStatus(
            backend=self.name,
            project=project,
            topology=str(topology),
            coordinator_grpc=grpc,
            coordinator_http=http,
            nodes=tuple(nodes),
        )

    def down(self, topology: pathlib.Path, *, progress: Progress) -> list[str]:
        _loaded, project = self._load(topology)
        label = f"label={PROJECT_LABEL}={project}"
        faults = self._faults(project)
        stopped = [line for entry in faults.values() for line in self._stop_shaping(entry)]
        self._save_faults(project, faults)
        before = {
            "container": self._names("ps", "-a", "--filter", label, "--format", "{{.Names}}"),
            "network": self._names("network", "ls", "--filter", label, "--format", "{{.Name}}"),
            "volume": self._names("volume", "ls", "--filter", label, "--format", "{{.Name}}"),
        }
        if any(before.values()):
            # Unpause first: a paused container cannot be stopped gracefully.
            for container in self._containers(project):
                if _state(container) == "paused":
                    self._docker("unpause", container["Id"], check=False)
            file = self._write_compose(topology, project)
            progress(f"removing {project}: containers, networks and volumes")
            self._compose_run(project, file, "down", "-v", "--remove-orphans", "--timeout", "10")
        left = {
            "container": self._names("ps", "-a", "--filter", label, "--format", "{{.Names}}"),
            "network": self._names("network", "ls", "--filter", label, "--format", "{{.Name}}"),
            "volume": self._names("volume", "ls", "--filter", label, "--format", "{{.Name}}"),
        }
        remaining = [f"{kind} {name}" for kind, names in left.items() for name in names]
        if remaining:
            raise SimError(f"{project}: `down` left {', '.join(remaining)}")
        with contextlib.suppress(FileNotFoundError):
            self._faults_path(project).unlink()
        removed = [f"removed {kind} {name}" for kind, names in before.items() for name in names]
        removed += [f"stopped {line}" for line in stopped]
        return removed or [f"{project}: nothing to remove"]

    def _names(self, *args: str) -> list[str]:
        return sorted(line for line in self._docker(*args).stdout.split() if line)

    def fault(
        self, topology: pathlib.Path, target: str, action: FaultAction, value: float | None = None
    ) -> str:
        from mesh.sim.compose import service_name

        action = check_fault(action, value)
        loaded, project = self._load(topology)
        kind, name = parse_target(target)
        if kind == "site":
            names = [n.name for n in loaded.nodes if n.labels.get("site", DEFAULT_SITE) == name]
            if not names:
                raise SimError(f"no node has site {name!r}")
            if action not in ("partition", "heal", "delay", "loss"):
                raise SimError(f"fault {action}: a site takes partition, heal, delay or loss")
        else:
            if name not in {n.name for n in loaded.nodes}:
                known = ", ".join(n.name for n in loaded.nodes)
                raise SimError(f"no node {name!r} in {project} (nodes: {known})")
            names = [name]
        said = []
        # One fault at a time per project (the runner's recovery may overlap a late fault, or
        # two commands run at once): faults.json is read, changed and written under a lock.
        with self._locked(project):
            faults = self._faults(project)
            try:
                for node in names:
                    container = self._container(project, service_name(node))
                    entry = faults.setdefault(node, {})
                    said.append(self._apply(container, node, action, value, entry))
            finally:  # a failure half-way still records what is in force (a delayer's pid)
                self._save_faults(project, faults)
        return "; ".join(said)

    @contextlib.contextmanager
    def _locked(self, project: str) -> Iterator[None]:
        path = self._project_dir(project) / "faults.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _apply(
        self,
        container: dict[str, Any],
        node: str,
        action: str,
        value: float | None,
        entry: dict[str, Any],
    ) -> str:
        ident = container["Id"]
        state = _state(container)
        if action == "kill":
            self._docker("kill", ident)
            return f"{node}: killed (SIGKILL)"
        if action == "stop":
            self._docker("stop", "-t", "10", ident, timeout_s=60)
            return f"{node}: stopped"
        if action == "pause":
            self._docker("pause", ident)
            return f"{node}: paused"
        if action == "restart":
            if state == "paused":
                self._docker("unpause", ident)
            if state == "running" or state == "paused":
                self._docker("restart", "-t", "10", ident, timeout_s=60)
            else:
                self._docker("start", ident, timeout_s=60)
            entry.pop("netem", None)  # a new namespace has no qdisc and no rules
            self._stop_shaping(entry)  # the old one's delayer has nothing left to delay
            return f"{node}: started again"
        if action == "partition":
            networks = container["NetworkSettings"]["Networks"]
            if not networks:
                return f"{node}: already partitioned"
            saved = entry.setdefault("partitioned", {})
            for network, settings in networks.items():
                address = (settings.get("IPAMConfig") or {}).get("IPv4Address") or settings.get(
                    "IPAddress", ""
                )
                saved[network] = address
                self._docker("network", "disconnect", "--force", network, ident)
            return f"{node}: partitioned (disconnected from {', '.join(sorted(networks))})"
        if action in ("delay", "loss"):
            assert value is not None
            netem = dict(entry.get("netem") or {})
            netem[action] = value
            try:
                self._netem(container, netem, entry=entry)
            except SimError:
                before = entry.pop("netem", None)  # the failed apply took it back: set it again
                if before:
                    with contextlib.suppress(SimError):
                        self._netem(container, before, entry=entry)
                        entry["netem"] = before
                raise
            entry["netem"] = netem
            unit = "ms" if action == "delay" else "%"
            how = shaping.describe(entry.get("shaping") or {})
            return f"{node}: {action} {value:g}{unit}" + (f" ({how})" if how else "")
        # heal: undo everything heal can undo
        done = []
        if state == "paused":
            self._docker("unpause", ident)
            done.append("unpaused")
        for network, address in sorted((entry.pop("partitioned", None) or {}).items()):
            args = ["network", "connect"]
            if address:
                args += ["--ip", address]
            self._docker(*args, network, ident)
            done.append(f"reconnected to {network}")
        if entry.pop("netem", None) or entry.get("shaping"):
            self._netem(container, {}, entry=entry)
            done.append("delay/loss removed")
        return f"{node}: healed ({', '.join(done) or 'nothing to undo'})"

    def _netem(
        self,
        container: dict[str, Any],
        netem: dict[str, float],
        *,
        entry: dict[str, Any] | None = None,
    ) -> None:
        """Set (or with {} clear) the container's delay and loss in its network namespace
        (mesh/sim/shaping.py: netem on every interface, or where the kernel has no netem
        iptables rules and an NFQUEUE delayer entered with nsenter). What was done is kept in
        `entry["shaping"]` (faults.json), so heal and down undo it from a later command."""
        entry = entry if entry is not None else {}
        previous = entry.pop("shaping", None) or {}
        pid = str(container["State"].get("Pid") or "")
        if not pid or pid == "0":
            shaping.clear(None, previous, run=self._shaping_run)  # stops a delayer it had
            if netem:
                raise SimError("the container is not running: delay and loss need its namespace")
            return
        labels = container["Config"]["Labels"]
        project = labels.get(PROJECT_LABEL, "")
        service = labels.get(SERVICE_LABEL) or container["Id"][:12]
        log = self._project_dir(project) / f"delayer-{service}.log" if project else None
        state = shaping.apply(
            ["nsenter", "-t", pid, "-n"],
            delay_ms=netem.get("delay"),
            loss_pct=netem.get("loss"),
            tag=shaping.shaping_tag(project or "docker", service),
            previous=previous,
            run=self._shaping_run,
            log=str(log) if log else None,
        )
        if state:
            entry["shaping"] = state

    def _shaping_run(self, argv: Sequence[str]) -> Completed:
        return self._run(argv, {}, 30)

    def _stop_shaping(self, entry: dict[str, Any]) -> list[str]:
        """Stop the delayer `entry` records (its container gone or renewed); what was done."""
        return shaping.clear(None, entry.pop("shaping", None) or {}, run=self._shaping_run)


def _state(container: dict[str, Any] | None) -> str:
    if container is None:
        return "missing"
    state = container.get("State", {})
    if state.get("Paused"):
        return "paused"
    status = str(state.get("Status", "unknown"))
    return "stopped" if status == "created" else status


def _published(container: dict[str, Any] | None, port: int) -> str:
    """The host address a container port is published on ("" if none)."""
    if container is None:
        return ""
    bindings = (container.get("NetworkSettings", {}).get("Ports") or {}).get(f"{port}/tcp") or []
    for binding in bindings:
        host_port = binding.get("HostPort")
        if host_port:
            return f"{binding.get('HostIp') or '127.0.0.1'}:{host_port}"
    return ""


def _describe_faults(entry: dict[str, Any], state: str) -> tuple[str, ...]:
    said = []
    if state == "paused":
        said.append("paused")
    if entry.get("partitioned"):
        said.append("partition")
    netem = entry.get("netem") or {}
    if "delay" in netem:
        said.append(f"delay {netem['delay']:g}ms")
    if "loss" in netem:
        said.append(f"loss {netem['loss']:g}%")
    return tuple(said)


def _prepare_real(progress: Progress) -> dict[str, str]:
    """Engine up, images built: the environment that makes the compose file use them."""
    from mesh.sim.engine import ensure_engine
    from mesh.sim.images import ensure_images

    ensure_engine(progress)
    images = ensure_images(progress=progress)
    return {"EDGEMESH_NODE_IMAGE": images.node, "EDGEMESH_COORDINATOR_IMAGE": images.coordinator}
