"""The Docker backend's logic against a fake `docker` (tests/e2e/test_sim_docker.py runs it for
real): which containers a fault touches and how, faults kept between commands, heal undoing
exactly what was done, `down` refusing to call leftovers clean."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from typing import Any

import pytest

from mesh.sim.backend import SimError
from mesh.sim.commands import Completed
from mesh.sim.docker import DockerBackend

pytestmark = pytest.mark.unit

REPO = pathlib.Path(__file__).resolve().parents[2]
TOPOLOGY = REPO / "topologies" / "distributed-edge.yaml"
PROJECT = "em-distributed-edge"
LABEL = f"label=com.docker.compose.project={PROJECT}"


class FakeDocker:
    """Containers of one compose project, and every command run against them."""

    def __init__(self) -> None:
        self.commands: list[list[str]] = []
        self.containers: dict[str, dict[str, Any]] = {}
        self.networks = {f"{PROJECT}_site-lab"}
        self.volumes = {f"{PROJECT}_edge-a-state", f"{PROJECT}_edge-b-state"}
        self.leave_behind = False
        for index, service in enumerate(("coordinator", "edge-a", "edge-b")):
            self._add(service, index)

    def _add(self, service: str, index: int) -> None:
        ident = f"id-{service}"
        ports = (
            {
                "9000/tcp": [{"HostIp": "127.0.0.1", "HostPort": "49000"}],
                "8000/tcp": [{"HostIp": "127.0.0.1", "HostPort": "48000"}],
            }
            if service == "coordinator"
            else {"50051/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(50100 + index)}]}
        )
        self.containers[ident] = {
            "Id": ident,
            "Name": f"/{PROJECT}_{service}_1",
            "Config": {"Labels": {"com.docker.compose.service": service}},
            "State": {"Status": "running", "Paused": False, "Pid": 1000 + index},
            "NetworkSettings": {
                "Ports": ports,
                "Networks": {
                    f"{PROJECT}_site-lab": {
                        "IPAMConfig": {"IPv4Address": f"198.18.200.{10 + index}"},
                        "IPAddress": f"198.18.200.{10 + index}",
                    }
                },
            },
        }

    def __call__(self, argv: Sequence[str], env: dict[str, str], timeout_s: float) -> Completed:
        argv = list(argv)
        self.commands.append(argv)
        ok = Completed(0, "", "")
        if argv[0] == "nsenter":
            if argv[4:] == ["ip", "-o", "link", "show"]:
                return Completed(0, "1: lo: <LOOPBACK>\n2: eth0@if9: <BROADCAST>\n", "")
            return ok
        if argv[0] == "compose":
            if "down" in argv and not self.leave_behind:
                self.containers.clear()
                self.networks.clear()
                self.volumes.clear()
            return ok
        assert argv[0] == "docker", argv
        verb = argv[1:3]
        if argv[1] == "ps" and "-q" in argv:
            return Completed(0, "\n".join(self.containers), "")
        if argv[1] == "ps":
            return Completed(0, "\n".join(c["Name"][1:] for c in self.containers.values()), "")
        if verb == ["network", "ls"]:
            return Completed(0, "\n".join(sorted(self.networks)), "")
        if verb == ["volume", "ls"]:
            return Completed(0, "\n".join(sorted(self.volumes)), "")
        if argv[1] == "inspect":
            return Completed(0, json.dumps([self.containers[i] for i in argv[2:]]), "")
        container = self.containers[argv[-1]]
        state = container["State"]
        if argv[1] == "kill":
            state.update(Status="exited", Pid=0)
        elif argv[1] == "pause":
            state["Paused"] = True
        elif argv[1] == "unpause":
            state["Paused"] = False
        elif argv[1] in ("start", "restart"):
            state.update(Status="running", Pid=4242)
        elif verb == ["network", "disconnect"]:
            del container["NetworkSettings"]["Networks"][argv[-2]]
        elif verb == ["network", "connect"]:
            address = argv[argv.index("--ip") + 1] if "--ip" in argv else ""
            container["NetworkSettings"]["Networks"][argv[-2]] = {
                "IPAMConfig": {"IPv4Address": address},
                "IPAddress": address,
            }
        return ok


def _backend(fake: FakeDocker, root: pathlib.Path, **kwargs: Any) -> DockerBackend:
    return DockerBackend(
        run=fake,
        root=root,
        compose=["compose"],
        docker_env=lambda: {},
        prepare=lambda _p: {},
        **kwargs,
    )


def test_status_reads_published_addresses_and_states(tmp_path: pathlib.Path) -> None:
    fake = FakeDocker()
    status = _backend(fake, tmp_path).status(TOPOLOGY)
    assert status.project == PROJECT
    assert status.coordinator_grpc == "127.0.0.1:49000"
    assert status.coordinator_http == "127.0.0.1:48000"
    assert [(n.name, n.state, n.address, n.site) for n in status.nodes] == [
        ("edge-a", "running", "127.0.0.1:50101", "lab"),
        ("edge-b", "running", "127.0.0.1:50102", "lab"),
    ]


def test_kill_then_restart_touch_only_that_container(tmp_path: pathlib.Path) -> None:
    fake = FakeDocker()
    backend = _backend(fake, tmp_path)
    assert "killed" in backend.fault(TOPOLOGY, "edge-b", "kill")
    assert ["docker", "kill", "id-edge-b"] in fake.commands
    edge_b = backend.status(TOPOLOGY).node("edge-b")
    assert (edge_b.state, edge_b.address) == ("exited", "")
    assert backend.status(TOPOLOGY).node("edge-a").state == "running"
    backend.fault(TOPOLOGY, "edge-b", "restart")
    assert ["docker", "start", "id-edge-b"] in fake.commands
    assert backend.status(TOPOLOGY).node("edge-b").state == "running"


def test_partition_and_heal_reconnect_with_the_same_address(tmp_path: pathlib.Path) -> None:
    fake = FakeDocker()
    backend = _backend(fake, tmp_path)
    backend.fault(TOPOLOGY, "edge-a", "partition")
    network = f"{PROJECT}_site-lab"
    assert ["docker", "network", "disconnect", "--force", network, "id-edge-a"] in fake.commands
    # A later command (a new backend) still knows the fault, and heals it.
    later = _backend(fake, tmp_path)
    assert later.status(TOPOLOGY).node("edge-a").faults == ("partition",)
    assert "reconnected" in later.fault(TOPOLOGY, "edge-a", "heal")
    assert [
        "docker",
        "network",
        "connect",
        "--ip",
        "198.18.200.11",
        network,
        "id-edge-a",
    ] in fake.commands
    assert later.status(TOPOLOGY).node("edge-a").faults == ()


def test_netem_combines_delay_and_loss_in_the_container_namespace(tmp_path: pathlib.Path) -> None:
    fake = FakeDocker()
    backend = _backend(fake, tmp_path)
    backend.fault(TOPOLOGY, "edge-a", "delay", 200)
    backend.fault(TOPOLOGY, "edge-a", "loss", 5)
    tc = [c for c in fake.commands if c[0] == "nsenter" and "tc" in c]
    assert tc[0] == [
        "nsenter",
        "-t",
        "1001",
        "-n",
        "tc",
        "qdisc",
        "replace",
        "dev",
        "eth0",
        "root",
        "netem",
        "delay",
        "200ms",
    ]
    assert tc[1][-4:] == ["delay", "200ms", "loss", "5%"]
    assert backend.status(TOPOLOGY).node("edge-a").faults == ("delay 200ms", "loss 5%")
    backend.fault(TOPOLOGY, "edge-a", "heal")
    assert fake.commands[-1] == [
        "nsenter",
        "-t",
        "1001",
        "-n",
        "tc",
        "qdisc",
        "del",
        "dev",
        "eth0",
        "root",
    ]
    assert backend.status(TOPOLOGY).node("edge-a").faults == ()


def test_pause_shows_and_heal_unpauses(tmp_path: pathlib.Path) -> None:
    fake = FakeDocker()
    backend = _backend(fake, tmp_path)
    backend.fault(TOPOLOGY, "edge-b", "pause")
    node = backend.status(TOPOLOGY).node("edge-b")
    assert (node.state, node.faults) == ("paused", ("paused",))
    backend.fault(TOPOLOGY, "edge-b", "heal")
    assert ["docker", "unpause", "id-edge-b"] in fake.commands
    assert backend.status(TOPOLOGY).node("edge-b").state == "running"


def test_a_site_target_reaches_every_node_of_the_site(tmp_path: pathlib.Path) -> None:
    fake = FakeDocker()
    said = _backend(fake, tmp_path).fault(TOPOLOGY, "site:lab", "partition")
    assert "edge-a: partitioned" in said and "edge-b: partitioned" in said
    disconnected = [c[-1] for c in fake.commands if c[1:3] == ["network", "disconnect"]]
    assert disconnected == ["id-edge-a", "id-edge-b"]


@pytest.mark.parametrize(
    ("target", "action", "value", "message"),
    [
        ("edge-z", "kill", None, "no node 'edge-z'"),
        ("site:mars", "partition", None, "no node has site 'mars'"),
        ("site:lab", "kill", None, "a site takes partition"),
        ("edge-a", "delay", None, "needs a value"),
        ("edge-a", "kill", 3.0, "takes no value"),
        ("edge-a", "explode", None, "expected one of"),
    ],
)
def test_bad_faults_are_refused_before_anything_runs(
    tmp_path: pathlib.Path, target: str, action: str, value: float | None, message: str
) -> None:
    fake = FakeDocker()
    with pytest.raises(SimError, match=message):
        _backend(fake, tmp_path).fault(TOPOLOGY, target, action, value)  # type: ignore[arg-type]
    assert not [c for c in fake.commands if c[1] in ("kill", "network", "pause")]


def test_down_removes_everything_and_says_what(tmp_path: pathlib.Path) -> None:
    fake = FakeDocker()
    fake.containers["id-edge-b"]["State"]["Paused"] = True
    backend = _backend(fake, tmp_path)
    removed = backend.down(TOPOLOGY, progress=lambda line: None)
    assert ["docker", "unpause", "id-edge-b"] in fake.commands  # else it cannot stop cleanly
    assert any(c[0] == "compose" and "down" in c and "-v" in c for c in fake.commands)
    assert f"removed volume {PROJECT}_edge-a-state" in removed
    assert f"removed network {PROJECT}_site-lab" in removed
    assert sum(line.startswith("removed container") for line in removed) == 3
    assert backend.down(TOPOLOGY, progress=lambda line: None) == [f"{PROJECT}: nothing to remove"]


def test_down_that_leaves_something_fails(tmp_path: pathlib.Path) -> None:
    fake = FakeDocker()
    fake.leave_behind = True
    with pytest.raises(SimError, match="left container"):
        _backend(fake, tmp_path).down(TOPOLOGY, progress=lambda line: None)


def test_up_of_a_running_project_waits_for_its_nodes(tmp_path: pathlib.Path) -> None:
    fake = FakeDocker()
    waited: list[tuple[str, list[str]]] = []

    def wait_ready(address: str, names: list[str], **_: Any) -> dict[str, str]:
        waited.append((address, list(names)))
        return dict.fromkeys(names, "ready")

    lines: list[str] = []
    status = _backend(fake, tmp_path, wait_ready=wait_ready).up(
        TOPOLOGY, progress=lines.append, timeout_s=5
    )
    assert waited == [("127.0.0.1:49000", ["edge-a", "edge-b"])]
    assert f"{PROJECT} is already up" in lines
    assert not [c for c in fake.commands if c[0] == "compose"]  # nothing started twice
    assert status.up


class NoNetemDocker(FakeDocker):
    """A host whose kernel has no netem: `tc ... netem` fails, iptables and the NFQUEUE delayer
    (started with nsenter in the container's namespace, stopped by pid) work."""

    def __init__(self) -> None:
        super().__init__()
        self.delayers: set[int] = set()
        self.started = 0

    def __call__(self, argv: Sequence[str], env: dict[str, str], timeout_s: float) -> Completed:
        argv = list(argv)
        if "--stop" in argv:
            self.commands.append(argv)
            self.delayers.discard(int(argv[-1]))
            return Completed(0, f"delayer {argv[-1]}: stopped\n", "")
        if argv[0] == "nsenter" and "netem" in argv:
            self.commands.append(argv)
            return Completed(2, "", "Error: Specified qdisc kind is unknown.\n")
        if argv[0] == "nsenter" and "--background" in argv:
            self.commands.append(argv)
            pid = 900 + self.started
            self.started += 1
            self.delayers.add(pid)
            return Completed(0, f"{pid}\n", "")
        return super().__call__(argv, env, timeout_s)


def test_without_netem_delay_is_an_nfqueue_delayer_that_heal_stops(tmp_path: pathlib.Path) -> None:
    fake = NoNetemDocker()
    backend = _backend(fake, tmp_path)
    said = backend.fault(TOPOLOGY, "edge-a", "delay", 200)
    assert "NFQUEUE delayer pid 900" in said
    [started] = [c for c in fake.commands if "--background" in c]
    assert started[:4] == ["nsenter", "-t", "1001", "-n"]
    assert started[started.index("--delay-ms") + 1] == "200"
    inserted = [c for c in fake.commands if c[:4] == started[:4] and "-I" in c and "OUTPUT" in c]
    assert [c[c.index("-j") + 1] for c in inserted] == ["NFQUEUE"]
    assert inserted[0][inserted[0].index("--comment") + 1] == "edgemesh-shape:docker/edge-a"
    saved = json.loads((tmp_path / "docker" / PROJECT / "faults.json").read_text())
    assert saved["edge-a"]["shaping"]["delayer_pid"] == 900
    assert saved["edge-a"]["netem"] == {"delay": 200}
    # A later command heals it: the rule deleted in the container, the delayer stopped.
    later = _backend(fake, tmp_path)
    assert later.status(TOPOLOGY).node("edge-a").faults == ("delay 200ms",)
    assert "delay/loss removed" in later.fault(TOPOLOGY, "edge-a", "heal")
    deleted = [c for c in fake.commands if "-D" in c and "OUTPUT" in c]
    assert [c[c.index("-D") + 2 :] for c in deleted] == [inserted[0][inserted[0].index("-I") + 2 :]]
    assert fake.delayers == set()
    assert later.status(TOPOLOGY).node("edge-a").faults == ()


def test_down_and_restart_stop_the_delayers_they_recorded(tmp_path: pathlib.Path) -> None:
    fake = NoNetemDocker()
    backend = _backend(fake, tmp_path)
    backend.fault(TOPOLOGY, "edge-a", "delay", 50)
    backend.fault(TOPOLOGY, "edge-b", "delay", 50)
    backend.fault(TOPOLOGY, "edge-b", "restart")  # a new namespace: the old delayer goes
    assert fake.delayers == {900}
    assert backend.status(TOPOLOGY).node("edge-b").faults == ()
    removed = backend.down(TOPOLOGY, progress=lambda line: None)
    assert "stopped delayer 900: stopped" in removed
    assert fake.delayers == set()


def test_no_engine_is_a_clear_error_and_up_starts_one_first(tmp_path: pathlib.Path) -> None:
    fake = FakeDocker()
    engine = {"up": False}

    def run(argv: Sequence[str], env: dict[str, str], timeout_s: float) -> Completed:
        if not engine["up"]:
            return Completed(1, "", "Cannot connect to the Docker daemon at unix:///x.sock.")
        return fake(argv, env, timeout_s)

    def prepare(progress: Any) -> dict[str, str]:
        engine["up"] = True  # what ensure_engine does
        return {}

    backend = DockerBackend(run=run, root=tmp_path, compose=["compose"], docker_env=lambda: {})
    with pytest.raises(SimError, match="no Docker engine answers .*mesh sim engine start"):
        backend.status(TOPOLOGY)
    starting = DockerBackend(
        run=run,
        root=tmp_path,
        compose=["compose"],
        docker_env=lambda: {},
        prepare=prepare,
        wait_ready=lambda *a, **k: {},
    )
    assert starting.up(TOPOLOGY, progress=lambda line: None, timeout_s=5).up


def test_docker_missing_or_hung_is_a_clear_error_even_where_failures_are_tolerated(
    tmp_path: pathlib.Path,
) -> None:
    from mesh.sim.commands import run_command

    missing = DockerBackend(
        run=lambda argv, env, timeout_s: run_command(["no-such-docker-here", *argv[1:]], env),
        root=tmp_path,
        compose=["compose"],
        docker_env=lambda: {},
    )
    with pytest.raises(SimError, match=r"docker is not installed \(apt-get install docker.io"):
        missing._docker("unpause", "id-edge-a", check=False)
    hung = DockerBackend(
        run=lambda argv, env, timeout_s: run_command(["sleep", "5"], env, 0.2),
        root=tmp_path,
        compose=["compose"],
        docker_env=lambda: {},
    )
    with pytest.raises(SimError, match=r"`sleep 5` did not finish within 0.2 s"):
        hung.status(TOPOLOGY)
