"""The Docker engine a simulation talks to: find one that answers, or start our own.

    ensure_engine(progress=print)          # DOCKER_HOST, our dockerd, the system one, or start ours
    subprocess.run(["docker", "ps"], env=docker_env())
    stop_engine(progress=print)            # stops only a dockerd this module started

    python -m mesh.sim.engine start|stop|status     # the same for make and CI

Which engine, in order: `DOCKER_HOST` when it is set (an error when it does not answer, unless
it is our own socket, which is then started); our own dockerd when it runs; the system socket
(/var/run/docker.sock) when it answers; else, as root with dockerd installed, our own dockerd.

Ours runs with the flags that leave the host's firewall alone (../shared/MEASURED.md, Docker):
a dockerd with default flags sets the iptables FORWARD policy to DROP and
`net.bridge.bridge-nf-call-iptables=1`, which silently breaks bridged network namespaces (the
netns backend, the e2e lab) and outlives dockerd. With `--iptables=false --ip-masq=false
--bridge=none` it changes none of that; containers then reach only each other, which is what a
simulation wants. Its data, sockets and log live in one directory: `state_root()/engine`, or
`MESH_SIM_ENGINE_DIR` (CI puts it under its build directory).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence

from mesh.sim.backend import Progress, SimError, state_root
from mesh.sim.commands import Completed, Runner, run_command

logger = logging.getLogger(__name__)

SYSTEM_SOCKET = "/var/run/docker.sock"
ENGINE_DIR_ENV = "MESH_SIM_ENGINE_DIR"
# The flags that change no iptables rule and no sysctl (MEASURED.md); networks Docker picks
# itself come from 198.19.128.0/17, inside the 198.18.0.0/15 benchmarking range.
SAFE_FLAGS = (
    "--iptables=false",
    "--ip-masq=false",
    "--bridge=none",
    "--default-address-pool",
    "base=198.19.128.0/17,size=24",
)
BRIDGE_NF_SYSCTL = "/proc/sys/net/bridge/bridge-nf-call-iptables"
INSTALL_HINT = "apt-get install docker.io docker-compose"
_SOCKET_PATH_MAX = 60  # sun_path is 108 bytes; containerd's sockets go under the exec root
_START_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 60.0
_PROBE_TIMEOUT_S = 10.0


@dataclasses.dataclass(frozen=True)
class EnginePaths:
    """Where our own dockerd keeps its data, sockets, pidfile and log."""

    directory: pathlib.Path
    data_root: pathlib.Path
    exec_root: pathlib.Path
    socket: pathlib.Path
    pidfile: pathlib.Path
    log: pathlib.Path

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"


def engine_dir() -> pathlib.Path:
    """Our dockerd's directory: `MESH_SIM_ENGINE_DIR`, else `state_root()/engine`."""
    override = os.environ.get(ENGINE_DIR_ENV)
    return pathlib.Path(override).resolve() if override else state_root() / "engine"


def engine_paths(directory: pathlib.Path | None = None) -> EnginePaths:
    """The paths of our dockerd under `directory`. A unix socket path has at most 108 bytes and
    containerd nests its sockets under the exec root, so a long directory keeps its exec root
    and socket in /run under a name derived from the directory (the same every time)."""
    directory = directory or engine_dir()
    short = directory
    if len(str(directory)) > _SOCKET_PATH_MAX:
        digest = hashlib.sha256(str(directory).encode()).hexdigest()[:12]
        short = pathlib.Path("/run") / f"edgemesh-engine-{digest}"
    return EnginePaths(
        directory=directory,
        data_root=directory / "data",
        exec_root=short / "exec",
        socket=short / "docker.sock",
        pidfile=directory / "dockerd.pid",
        log=directory / "dockerd.log",
    )


def dockerd_command(paths: EnginePaths) -> list[str]:
    """The command line of our dockerd."""
    return [
        "dockerd",
        f"--data-root={paths.data_root}",
        f"--exec-root={paths.exec_root}",
        f"--host={paths.host}",
        f"--pidfile={paths.pidfile}",
        *SAFE_FLAGS,
    ]


def _pid_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie has ended)."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def our_dockerd_pid(paths: EnginePaths) -> int | None:
    """The pid of our dockerd when it runs: the pidfile's pid, alive, and a dockerd started
    with that pidfile (a pid reused by another process is not ours)."""
    try:
        pid = int(paths.pidfile.read_text().strip())
        cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):  # no pidfile, garbage in it, or no such process
        return None
    if not cmdline or os.path.basename(cmdline[0]) != b"dockerd":
        return None
    if f"--pidfile={paths.pidfile}".encode() not in cmdline:
        return None
    return pid if _pid_alive(pid) else None


def docker_host() -> str:
    """The DOCKER_HOST of the engine in use (see the module docstring), without asking it."""
    explicit = os.environ.get("DOCKER_HOST")
    if explicit:
        return explicit
    paths = engine_paths()
    if our_dockerd_pid(paths) is not None:
        return paths.host
    return f"unix://{SYSTEM_SOCKET}"


def docker_env() -> dict[str, str]:
    """The environment for every docker and docker-compose subprocess: ours, with DOCKER_HOST
    naming the engine in use, and the classic builder (Debian's client has no buildx)."""
    env = dict(os.environ)
    env["DOCKER_HOST"] = docker_host()
    env.setdefault("DOCKER_BUILDKIT", "0")
    return env


@dataclasses.dataclass
class Engine:
    """The decisions, with what they touch injected (unit tests pass fakes)."""

    runner: Runner = run_command
    environ: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(os.environ))
    paths: EnginePaths = dataclasses.field(default_factory=engine_paths)
    is_root: Callable[[], bool] = lambda: os.geteuid() == 0
    which: Callable[[str], str | None] = shutil.which
    spawn: Callable[[list[str], pathlib.Path], None] = lambda c, log: _spawn_detached(c, log)
    our_pid: Callable[[EnginePaths], int | None] = our_dockerd_pid
    netfilter: Callable[[Runner], dict[str, str]] = lambda r: netfilter_state(r)
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    start_timeout_s: float = _START_TIMEOUT_S

    def answers(self, host: str) -> Completed:
        """`docker version` against `host`."""
        env = {**self.environ, "DOCKER_HOST": host}
        command = ["docker", "version", "--format", "{{.Server.Version}}"]
        return self.runner(command, env, _PROBE_TIMEOUT_S)

    def skip_reason(self) -> str | None:
        """None when an engine answers or we can start one; else why not."""
        if self.which("docker") is None:
            return f"the docker client is not installed ({INSTALL_HINT})"
        host = self.environ.get("DOCKER_HOST")
        if host:
            answer = self.answers(host)
            if answer.returncode == 0:
                return None
            if host != self.paths.host:
                return f"DOCKER_HOST={host} does not answer: {_last_line(answer.output)}"
        else:
            ours = self.our_pid(self.paths) is not None
            for candidate in ([self.paths.host] if ours else []) + [f"unix://{SYSTEM_SOCKET}"]:
                if self.answers(candidate).returncode == 0:
                    return None
        if not self.is_root():
            return "not root: cannot start a Docker engine"
        if self.which("dockerd") is None:
            return f"dockerd is not installed ({INSTALL_HINT})"
        return None

    def ensure(self, progress: Progress) -> str:
        """Make sure an engine answers; returns its DOCKER_HOST."""
        host = self.environ.get("DOCKER_HOST")
        if host and host != self.paths.host:
            answer = self.answers(host)
            if answer.returncode != 0:
                raise SimError(
                    f"DOCKER_HOST={host} does not answer ({_last_line(answer.output)}): start "
                    "that engine, or unset DOCKER_HOST to use the system's or our own"
                )
            progress(f"docker engine: DOCKER_HOST={host} (dockerd {answer.output})")
            return host
        if self.our_pid(self.paths) is not None:
            answer = self.answers(self.paths.host)
            if answer.returncode == 0:
                progress(f"docker engine: ours at {self.paths.host} (dockerd {answer.output})")
                return self.paths.host
            raise SimError(
                f"our dockerd runs but does not answer at {self.paths.host}: "
                f"{_last_line(answer.output)}; stop it (python -m mesh.sim.engine stop) and "
                f"retry; its log: {self.paths.log}"
            )
        if not host:
            answer = self.answers(f"unix://{SYSTEM_SOCKET}")
            if answer.returncode == 0:
                progress(
                    f"docker engine: the system's at {SYSTEM_SOCKET} (dockerd {answer.output})"
                )
                return f"unix://{SYSTEM_SOCKET}"
        reason = self.skip_reason()
        if reason is not None:
            raise SimError(f"no Docker engine: {reason}")
        return self.start(progress)

    def start(self, progress: Progress) -> str:
        """Start our dockerd with the safe flags and wait until it answers."""
        paths = self.paths
        for folder in (paths.directory, paths.data_root, paths.exec_root):
            folder.mkdir(parents=True, exist_ok=True)
        before = self.netfilter(self.runner)
        command = dockerd_command(paths)
        progress(f"starting our dockerd (log: {paths.log}): {' '.join(command)}")
        started = self.clock()
        self.spawn(command, paths.log)
        deadline = started + self.start_timeout_s
        while True:
            answer = self.answers(paths.host)
            if answer.returncode == 0:
                break
            if self.clock() >= deadline:
                raise SimError(
                    f"our dockerd did not answer within {self.start_timeout_s:.0f} s "
                    f"({_last_line(answer.output)}); the end of {paths.log}:\n"
                    f"{log_tail(paths.log)}"
                )
            self.sleep(0.5)
        progress(
            f"our dockerd {answer.output} answers at {paths.host} "
            f"after {self.clock() - started:.1f} s"
        )
        after = self.netfilter(self.runner)
        changed = {k: (before[k], after.get(k, "")) for k in before if before[k] != after.get(k)}
        if changed:
            lines = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in changed.items())
            message = (
                f"WARNING: starting dockerd changed the host's packet filtering ({lines}); "
                "bridged network namespaces may drop traffic until it is restored "
                "(iptables -P FORWARD ACCEPT; sysctl net.bridge.bridge-nf-call-iptables=0)"
            )
            logger.warning("%s", message)
            progress(message)
        else:
            progress(f"host packet filtering unchanged ({_describe(before)})")
        return paths.host

    def stop(self, progress: Progress, timeout_s: float = _STOP_TIMEOUT_S) -> bool:
        """Stop our dockerd (never another); True when one was stopped."""
        pid = self.our_pid(self.paths)
        if pid is None:
            progress(f"no dockerd of ours runs (pidfile {self.paths.pidfile})")
            return False
        progress(f"stopping our dockerd (pid {pid})")
        started = self.clock()
        _signal(pid, signal.SIGTERM)
        while self.our_pid(self.paths) == pid and _pid_alive(pid):
            if self.clock() - started >= timeout_s:
                progress(f"our dockerd did not stop within {timeout_s:.0f} s: killing it")
                _signal(pid, signal.SIGKILL)
                _kill_pidfile(self.paths.exec_root / "containerd" / "containerd.pid")
                break
            self.sleep(0.5)
        progress(f"our dockerd stopped after {self.clock() - started:.1f} s")
        return True


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # ended meanwhile: what we wanted
        os.kill(pid, signum)


def _kill_pidfile(pidfile: pathlib.Path) -> None:
    """Kill the process a pidfile names (dockerd's containerd, when dockerd had to be killed)."""
    with contextlib.suppress(OSError, ValueError):  # no such pidfile: nothing to kill
        _signal(int(pidfile.read_text().strip()), signal.SIGKILL)


def _spawn_detached(command: list[str], log: pathlib.Path) -> None:
    """Start `command` in its own session, orphaned (`setsid -f`), so that it outlives the
    command that started it and is nobody's child, with its output appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        subprocess.run(
            ["setsid", "-f", *command],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=True,
        )


def netfilter_state(runner: Runner) -> dict[str, str]:
    """What a careless dockerd changes: the iptables FORWARD policy and bridge-nf-call-iptables
    ("absent" when br_netfilter is not loaded, "unknown" when iptables cannot tell)."""
    answer = runner(["iptables", "-S", "FORWARD"], dict(os.environ), 10.0)
    policy = "unknown"
    if answer.returncode == 0:
        for line in answer.output.splitlines():
            if line.startswith("-P FORWARD "):
                policy = line.split()[2]
    try:
        bridge = pathlib.Path(BRIDGE_NF_SYSCTL).read_text().strip()
    except OSError:  # br_netfilter not loaded: bridged traffic skips iptables
        bridge = "absent"
    return {"iptables FORWARD policy": policy, "bridge-nf-call-iptables": bridge}


def _describe(state: Mapping[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in state.items())


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def log_tail(log: pathlib.Path, lines: int = 20) -> str:
    """The last lines of a log file (or why there are none)."""
    try:
        text = log.read_text(errors="replace")
    except OSError as error:
        return f"(cannot read {log}: {error.strerror})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


def engine_skip_reason() -> str | None:
    """None when a Docker engine answers or we can start one (root, dockerd installed); else
    the reason, for tests to skip with."""
    return Engine().skip_reason()


def ensure_engine(progress: Progress) -> None:
    """Make sure a Docker engine answers (see the module docstring); SimError if none can."""
    Engine().ensure(progress)


def stop_engine(progress: Progress) -> None:
    """Stop the dockerd this module started, if it runs, and wait until it has exited."""
    Engine().stop(progress)


def compose_command(runner: Runner = run_command) -> list[str]:
    """How to run Compose: `docker compose` (v2) when it works, else `docker-compose` (1.29)."""
    env = docker_env()
    if runner(["docker", "compose", "version"], env, _PROBE_TIMEOUT_S).returncode == 0:
        return ["docker", "compose"]
    if runner(["docker-compose", "version"], env, _PROBE_TIMEOUT_S).returncode == 0:
        return ["docker-compose"]
    raise SimError(f"neither `docker compose` nor `docker-compose` works ({INSTALL_HINT})")


def status_lines(engine: Engine | None = None) -> list[str]:
    """What `python -m mesh.sim.engine status` prints."""
    engine = engine or Engine()
    host = docker_host()
    answer = engine.answers(host)
    pid = engine.our_pid(engine.paths)
    lines = [
        f"DOCKER_HOST={host}",
        f"answers: {'yes, dockerd ' + answer.output if answer.returncode == 0 else 'no'}",
        f"our dockerd: {f'pid {pid}' if pid else 'not running'} ({engine.paths.directory})",
    ]
    if answer.returncode != 0:
        lines.append(f"why not: {_last_line(answer.output)}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mesh.sim.engine", description="The Docker engine of `mesh sim`."
    )
    parser.add_argument("action", choices=["start", "stop", "status"])
    args = parser.parse_args(argv)

    def progress(line: str) -> None:
        print(line, flush=True)

    try:
        if args.action == "start":
            ensure_engine(progress)
            print(f"DOCKER_HOST={docker_host()}")
        elif args.action == "stop":
            stop_engine(progress)
        else:
            for line in status_lines():
                print(line)
    except SimError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
