"""Which Docker engine `mesh sim` uses, and how it starts its own: the decisions, with a fake
runner standing in for `docker`, `iptables` and `dockerd` (no engine is touched here)."""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence

import pytest

from mesh.sim import engine as engine_module
from mesh.sim.backend import SimError
from mesh.sim.commands import Completed
from mesh.sim.engine import SYSTEM_SOCKET, Engine, engine_paths

SYSTEM = f"unix://{SYSTEM_SOCKET}"


class FakeDocker:
    """Answers `docker version` for the hosts that are up, `iptables -S FORWARD` with a policy,
    and brings our socket up when the fake dockerd is spawned."""

    def __init__(self, up: set[str], policy: str = "ACCEPT") -> None:
        self.up = set(up)
        self.policy = policy
        self.calls: list[tuple[str, ...]] = []
        self.spawned: list[list[str]] = []
        self.pid: int | None = None

    def run(self, command: Sequence[str], env: Mapping[str, str], timeout_s: float) -> Completed:
        self.calls.append(tuple(command))
        if command[:2] == ["docker", "version"]:
            if env["DOCKER_HOST"] in self.up:
                return Completed(0, "20.10.24", "")
            return Completed(1, f"Cannot connect to the Docker daemon at {env['DOCKER_HOST']}", "")
        if command[0] == "iptables":
            return Completed(0, f"-P FORWARD {self.policy}\n-A FORWARD -j ACCEPT", "")
        if command[:3] == ["docker", "compose", "version"]:
            return Completed(1, "docker: unknown command: docker compose", "")
        if command[:2] == ["docker-compose", "version"]:
            return Completed(0, "docker-compose version 1.29.2", "")
        raise AssertionError(f"unexpected command {command}")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def make_engine(
    tmp_path: pathlib.Path,
    fake: FakeDocker,
    *,
    environ: dict[str, str] | None = None,
    root: bool = True,
    installed: tuple[str, ...] = ("docker", "dockerd"),
    comes_up: bool = True,
    changes_policy: bool = False,
) -> Engine:
    paths = engine_paths(tmp_path / "engine")
    clock = FakeClock()

    def spawn(command: list[str], log: pathlib.Path) -> None:
        fake.spawned.append(command)
        log.write_text('level=info msg="starting"\nlevel=fatal msg="no overlay"\n')
        if comes_up:
            fake.up.add(paths.host)
            fake.pid = 4242
            if changes_policy:
                fake.policy = "DROP"

    def netfilter(runner: engine_module.Runner) -> dict[str, str]:
        answer = runner(["iptables", "-S", "FORWARD"], {}, 10.0)
        return {"iptables FORWARD policy": answer.output.split()[2]}

    return Engine(
        runner=fake.run,
        environ=environ or {},
        paths=paths,
        is_root=lambda: root,
        which=lambda name: f"/usr/bin/{name}" if name in installed else None,
        spawn=spawn,
        our_pid=lambda _paths: fake.pid,
        netfilter=netfilter,
        clock=clock,
        sleep=clock.sleep,
        start_timeout_s=5.0,
    )


def test_an_explicit_docker_host_that_answers_is_used(tmp_path: pathlib.Path) -> None:
    fake = FakeDocker(up={"tcp://127.0.0.1:2375", SYSTEM})
    engine = make_engine(tmp_path, fake, environ={"DOCKER_HOST": "tcp://127.0.0.1:2375"})
    said: list[str] = []
    assert engine.ensure(said.append) == "tcp://127.0.0.1:2375"
    assert engine.skip_reason() is None
    assert not fake.spawned
    assert "DOCKER_HOST=tcp://127.0.0.1:2375" in said[0]


def test_an_explicit_docker_host_that_does_not_answer_is_an_error_not_a_fallback(
    tmp_path: pathlib.Path,
) -> None:
    fake = FakeDocker(up={SYSTEM})
    engine = make_engine(tmp_path, fake, environ={"DOCKER_HOST": "tcp://127.0.0.1:2375"})
    with pytest.raises(SimError, match="DOCKER_HOST=tcp://127.0.0.1:2375 does not answer"):
        engine.ensure(lambda _line: None)
    assert "does not answer" in (engine.skip_reason() or "")
    assert not fake.spawned


def test_docker_host_naming_our_own_socket_starts_ours(tmp_path: pathlib.Path) -> None:
    fake = FakeDocker(up=set())
    paths = engine_paths(tmp_path / "engine")
    engine = make_engine(tmp_path, fake, environ={"DOCKER_HOST": paths.host})
    assert engine.skip_reason() is None
    assert engine.ensure(lambda _line: None) == paths.host
    assert len(fake.spawned) == 1


def test_the_system_engine_is_used_when_it_answers(tmp_path: pathlib.Path) -> None:
    fake = FakeDocker(up={SYSTEM})
    engine = make_engine(tmp_path, fake, root=False)
    assert engine.ensure(lambda _line: None) == SYSTEM
    assert engine.skip_reason() is None  # not root, but an engine answers
    assert not fake.spawned


def test_our_running_engine_comes_before_the_system_one(tmp_path: pathlib.Path) -> None:
    fake = FakeDocker(up={SYSTEM})
    engine = make_engine(tmp_path, fake)
    fake.pid = 4242
    fake.up.add(engine.paths.host)
    assert engine.ensure(lambda _line: None) == engine.paths.host
    assert not fake.spawned


def test_ours_is_started_with_the_flags_that_leave_the_firewall_alone(
    tmp_path: pathlib.Path,
) -> None:
    fake = FakeDocker(up=set())
    engine = make_engine(tmp_path, fake)
    said: list[str] = []
    assert engine.ensure(said.append) == engine.paths.host
    (command,) = fake.spawned
    assert command[0] == "dockerd"
    for flag in ("--iptables=false", "--ip-masq=false", "--bridge=none"):
        assert flag in command
    pool = command[command.index("--default-address-pool") + 1]
    assert pool == "base=198.19.128.0/17,size=24"
    directory = engine.paths.directory
    assert f"--data-root={directory / 'data'}" in command
    assert f"--pidfile={directory / 'dockerd.pid'}" in command
    assert f"--host={engine.paths.host}" in command
    assert any("unchanged" in line for line in said)
    assert not any("WARNING" in line for line in said)


def test_a_changed_forward_policy_is_said_loudly(tmp_path: pathlib.Path) -> None:
    fake = FakeDocker(up=set())
    engine = make_engine(tmp_path, fake, changes_policy=True)
    said: list[str] = []
    engine.ensure(said.append)
    warning = next(line for line in said if line.startswith("WARNING"))
    assert "iptables FORWARD policy: ACCEPT -> DROP" in warning
    assert "iptables -P FORWARD ACCEPT" in warning


def test_a_dockerd_that_never_answers_is_an_error_quoting_its_log(
    tmp_path: pathlib.Path,
) -> None:
    fake = FakeDocker(up=set())
    engine = make_engine(tmp_path, fake, comes_up=False)
    with pytest.raises(SimError) as raised:
        engine.ensure(lambda _line: None)
    message = str(raised.value)
    assert "did not answer within 5 s" in message
    assert 'msg="no overlay"' in message  # the log's tail
    assert str(engine.paths.log) in message


@pytest.mark.parametrize(
    ("root", "installed", "reason"),
    [
        (False, ("docker", "dockerd"), "not root: cannot start a Docker engine"),
        (True, ("docker",), "dockerd is not installed (apt-get install docker.io docker-compose)"),
        (True, (), "the docker client is not installed"),
    ],
)
def test_why_no_engine_can_be_had(
    tmp_path: pathlib.Path, root: bool, installed: tuple[str, ...], reason: str
) -> None:
    fake = FakeDocker(up=set())
    engine = make_engine(tmp_path, fake, root=root, installed=installed)
    assert (engine.skip_reason() or "").startswith(reason)
    with pytest.raises(SimError, match="no Docker engine"):
        engine.ensure(lambda _line: None)
    assert not fake.spawned


def test_stop_leaves_an_engine_that_is_not_ours_alone(tmp_path: pathlib.Path) -> None:
    fake = FakeDocker(up={SYSTEM})
    engine = make_engine(tmp_path, fake)
    said: list[str] = []
    assert engine.stop(said.append) is False
    assert "no dockerd of ours runs" in said[0]


def test_a_long_engine_directory_keeps_its_sockets_short(tmp_path: pathlib.Path) -> None:
    long_dir = tmp_path / ("x" * 80) / "engine"
    paths = engine_paths(long_dir)
    assert paths.data_root == long_dir / "data"
    assert len(str(paths.socket)) < 60
    assert paths == engine_paths(long_dir)  # the same every time: docker_env finds it again
    short = engine_paths(pathlib.Path("/b/engine"))
    assert short.socket == pathlib.Path("/b/engine/docker.sock")


def test_compose_v1_is_used_when_v2_is_missing(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", SYSTEM)
    fake = FakeDocker(up=set())
    assert engine_module.compose_command(fake.run) == ["docker-compose"]

    def nothing(command: Sequence[str], env: Mapping[str, str], timeout_s: float) -> Completed:
        return Completed(127, f"{command[0]}: not installed", "")

    with pytest.raises(SimError, match="neither `docker compose` nor `docker-compose`"):
        engine_module.compose_command(nothing)


def test_docker_env_names_the_engine_in_use(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESH_SIM_ENGINE_DIR", str(tmp_path / "engine"))
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    assert engine_module.docker_env()["DOCKER_HOST"] == SYSTEM  # ours does not run
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:2375")
    assert engine_module.docker_env()["DOCKER_HOST"] == "tcp://127.0.0.1:2375"


def test_a_pidfile_of_another_process_is_not_our_dockerd(tmp_path: pathlib.Path) -> None:
    import os

    paths = engine_paths(tmp_path / "engine")
    paths.directory.mkdir(parents=True)
    paths.pidfile.write_text(str(os.getpid()))  # this pytest process: alive, not dockerd
    assert engine_module.our_dockerd_pid(paths) is None
    paths.pidfile.write_text("not a pid")
    assert engine_module.our_dockerd_pid(paths) is None


def test_ours_running_but_out_of_reach_is_no_engine_for_a_user(tmp_path: pathlib.Path) -> None:
    fake = FakeDocker(up=set())  # e.g. a root-owned socket: `docker version` is refused
    engine = make_engine(tmp_path, fake, root=False)
    fake.pid = 4242
    assert engine.skip_reason() == "not root: cannot start a Docker engine"
