"""`mesh sim compose`: the compose file a topology gives, and the files kept in deploy/compose/.

Structure is read back from the YAML the generator writes; `docker-compose config -q` (Debian's
1.29, which validates without an engine) says whether Compose accepts it.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import pathlib
import shutil
import subprocess
import sys
from typing import Any

import pytest
import yaml

from mesh.sim.backend import DEFAULT_SITE, SimError
from mesh.sim.compose import (
    COORDINATOR_GRPC_PORT,
    COORDINATOR_HTTP_PORT,
    COORDINATOR_SERVICE,
    SHIPPED_COMPOSE_DIR,
    STATE_MOUNT,
    TOPOLOGY_MOUNT,
    node_site,
    project_name,
    render_compose,
    service_name,
    shipped_compose_path,
    site_subnets,
)
from mesh.topology.loader import load_topology

pytestmark = pytest.mark.unit

ROOT = pathlib.Path(__file__).resolve().parents[2]
_SCRIPT = ROOT / "scripts" / "gen_compose.py"
_spec = importlib.util.spec_from_file_location("gen_compose", _SCRIPT)
assert _spec is not None and _spec.loader is not None
gen_compose = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen_compose)

SHIPPED = sorted((ROOT / "topologies").glob("*.yaml"))
BENCHMARK_RANGE = ipaddress.IPv4Network("198.18.0.0/15")
DOCKERD_POOL = ipaddress.IPv4Network("198.19.128.0/17")  # our dockerd's default address pool
NETNS_LAB = ipaddress.IPv4Network("198.18.0.0/16")  # mesh/sim/lab.py
DOCKER_COMPOSE = shutil.which("docker-compose")
NO_COMPOSE = "docker-compose is not installed (apt-get install docker-compose)"

MULTI_SITE = """\
version: 1
cluster: {name: Chain_7.east}
nodes:
  - name: till-1
    labels: {site: Store 1}
    device: {cpus: 0.25, memory_mb: 512}
  - name: till-2
    port: 50061
    labels: {site: store-1}
  - name: hq
    address: 10.0.0.5:50051
    device: {memory_mb: 4096}
  - name: depot
    labels: {site: depot}
    device: {cpus: 64.0}
coordinator: {num_cpus: 1.5}
"""


def _document(topology: pathlib.Path, output_dir: pathlib.Path) -> dict[str, Any]:
    loaded = yaml.safe_load(render_compose(topology, output_dir))
    assert isinstance(loaded, dict)
    return loaded


def _multi_site(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "topologies" / "chain.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(MULTI_SITE, encoding="utf-8")
    return path


@pytest.mark.parametrize("topology_path", SHIPPED, ids=lambda p: p.stem)
def test_one_service_per_node_started_from_the_topology(topology_path: pathlib.Path) -> None:
    topology = load_topology(topology_path)
    document = _document(topology_path, SHIPPED_COMPOSE_DIR)
    services = document["services"]

    assert "version" not in document  # Compose v2 and 1.29 both read a file without one
    assert list(services) == [service_name(n.name) for n in topology.nodes] + [COORDINATOR_SERVICE]
    for node in topology.nodes:
        service = services[service_name(node.name)]
        assert service["hostname"] == node.name  # mDNS host names differ per node
        assert service["image"] == "${EDGEMESH_NODE_IMAGE:-edgemesh-node:latest}"
        command = service["command"]
        assert command[:3] == ["mesh", "node", "start"]
        assert command[command.index("--topology") + 1] == TOPOLOGY_MOUNT
        assert command[command.index("--node") + 1] == node.name
        assert command[command.index("--state-dir") + 1] == STATE_MOUNT
        assert "--stand-ins" in command and "--insecure" in command
        bind, state = service["volumes"]
        assert bind["type"] == "bind" and bind["read_only"] is True
        assert bind["target"] == TOPOLOGY_MOUNT
        assert (SHIPPED_COMPOSE_DIR / bind["source"]).resolve() == topology_path.resolve()
        assert state == {"type": "volume", "source": f"{node.name}-state", "target": STATE_MOUNT}
        assert f"{node.name}-state" in document["volumes"]
    assert len(document["volumes"]) == len(topology.nodes)


@pytest.mark.parametrize("topology_path", SHIPPED, ids=lambda p: p.stem)
def test_networks_subnets_and_addresses(topology_path: pathlib.Path) -> None:
    topology = load_topology(topology_path)
    document = _document(topology_path, SHIPPED_COMPOSE_DIR)
    services, networks = document["services"], document["networks"]

    subnets = {}
    for name, network in networks.items():
        assert network["driver"] == "bridge"
        (config,) = network["ipam"]["config"]
        subnets[name] = subnet = ipaddress.IPv4Network(config["subnet"])
        assert subnet.prefixlen == 24 and subnet.subnet_of(BENCHMARK_RANGE)
        assert not subnet.overlaps(DOCKERD_POOL) and not subnet.overlaps(NETNS_LAB)
    assert len(set(subnets.values())) == len(subnets)
    assert len(networks) == len({node_site(n) for n in topology.nodes})

    coordinator = services[COORDINATOR_SERVICE]
    assert set(coordinator["networks"]) == set(networks)  # the coordinator is on every site
    addresses = []
    for name, attachment in coordinator["networks"].items():
        address = ipaddress.IPv4Address(attachment["ipv4_address"])
        assert address == subnets[name].network_address + 2
        addresses.append(address)
    for node in topology.nodes:
        ((name, attachment),) = services[node.name]["networks"].items()
        assert networks[name]["labels"] == {"edgemesh.site": node_site(node)}
        address = ipaddress.IPv4Address(attachment["ipv4_address"])
        assert address in subnets[name]
        addresses.append(address)
    assert len(set(addresses)) == len(addresses)


@pytest.mark.parametrize("topology_path", SHIPPED, ids=lambda p: p.stem)
def test_ports_bound_to_loopback_limits_and_health_checks(topology_path: pathlib.Path) -> None:
    topology = load_topology(topology_path)
    services = _document(topology_path, SHIPPED_COMPOSE_DIR)["services"]

    for service in services.values():
        assert service["ports"] and all(p.startswith("127.0.0.1::") for p in service["ports"])
        assert service["init"] is True
        health = service["healthcheck"]
        assert health["test"][:4] == ["CMD", "python3", "-m", "mesh.sim.healthcheck"]
        assert health["retries"] >= 3 and health["start_period"]
    for node in topology.nodes:
        service = services[node.name]
        port = node.effective_port
        assert service["ports"] == [f"127.0.0.1::{port}"]
        assert service["healthcheck"]["test"][4:] == [f"127.0.0.1:{port}"]
        device = node.device
        assert device is not None and device.cpus is not None and device.memory_mb is not None
        assert service["cpu_quota"] / service["cpu_period"] == pytest.approx(device.cpus)
        assert service["mem_limit"] == f"{device.memory_mb}m"
        assert "cpus" not in service  # refused by dockerd above the host's core count

    coordinator = services[COORDINATOR_SERVICE]
    assert coordinator["image"] == "${EDGEMESH_COORDINATOR_IMAGE:-edgemesh-coordinator:latest}"
    assert coordinator["ports"] == [
        f"127.0.0.1::{COORDINATOR_GRPC_PORT}",
        f"127.0.0.1::{COORDINATOR_HTTP_PORT}",
    ]
    assert coordinator["healthcheck"]["test"][4:] == [
        "--http",
        "/v1/mesh/info",
        f"127.0.0.1:{COORDINATOR_HTTP_PORT}",
    ]
    command = coordinator["command"]
    assert command[:3] == ["mesh", "coordinator", "start"]
    for flag in ("--mdns-only", "--no-cluster"):
        assert flag in command
    assert command[command.index("--grpc-port") + 1] == str(COORDINATOR_GRPC_PORT)
    assert command[command.index("--http-port") + 1] == str(COORDINATOR_HTTP_PORT)
    assert float(command[command.index("--num-cpus") + 1]) == (topology.coordinator.num_cpus or 2)
    assert coordinator["shm_size"] and coordinator["mem_limit"]


@pytest.mark.parametrize("topology_path", SHIPPED, ids=lambda p: p.stem)
def test_every_command_is_one_the_mesh_cli_accepts(topology_path: pathlib.Path) -> None:
    from mesh.cli import build_parser

    services = _document(topology_path, SHIPPED_COMPOSE_DIR)["services"]
    for name, service in services.items():
        command = service["command"]
        assert command[0] == "mesh"
        args = build_parser().parse_args(command[1:])  # SystemExit on an unknown flag
        assert args.topology == TOPOLOGY_MOUNT and args.host == "0.0.0.0"
        if name != COORDINATOR_SERVICE:
            assert args.node == name and args.stand_ins and args.state_dir == STATE_MOUNT
        else:
            assert args.mdns_only and args.grpc_port == COORDINATOR_GRPC_PORT


def test_sites_devices_and_names_of_a_multi_site_topology(tmp_path: pathlib.Path) -> None:
    topology_path = _multi_site(tmp_path)
    output_dir = tmp_path / "out"
    document = _document(topology_path, output_dir)
    services, networks = document["services"], document["networks"]

    # "Store 1" and "store-1" both make the name store-1: the second gets a suffix.
    assert list(networks) == ["store-1", "default", "depot", "store-1-2"]
    assert {n["labels"]["edgemesh.site"] for n in networks.values()} == {
        "Store 1",
        "store-1",
        "depot",
        DEFAULT_SITE,
    }
    assert list(services["hq"]["networks"]) == ["default"]  # no site label
    assert set(services[COORDINATOR_SERVICE]["networks"]) == set(networks)
    assert services["till-2"]["ports"] == ["127.0.0.1::50061"]
    assert services["till-2"]["healthcheck"]["test"][-1] == "127.0.0.1:50061"
    assert "cpu_quota" not in services["till-2"] and "mem_limit" not in services["till-2"]
    assert services["till-1"]["cpu_quota"] == 25_000 and services["till-1"]["mem_limit"] == "512m"
    assert "cpu_quota" not in services["hq"] and services["hq"]["mem_limit"] == "4096m"
    assert services["depot"]["cpu_quota"] == 6_400_000  # 64 cores: starts on a 2-core host too
    command = services[COORDINATOR_SERVICE]["command"]
    assert command[command.index("--num-cpus") + 1] == "1.5"
    source = services["hq"]["volumes"][0]["source"]
    assert source == "../topologies/chain.yaml"
    assert (output_dir / source).resolve() == topology_path.resolve()
    # The static address of hq means nothing here, and the file says so.
    assert "ignored here (hq)" in render_compose(topology_path, output_dir)


def test_topology_next_to_the_output_is_mounted_from_dot(tmp_path: pathlib.Path) -> None:
    topology_path = _multi_site(tmp_path)
    source = _document(topology_path, topology_path.parent)["services"]["hq"]["volumes"][0]
    assert source["source"] == "./chain.yaml"  # "chain.yaml" alone would name a volume


def test_subnets_are_fixed_by_cluster_and_distinct_per_site(tmp_path: pathlib.Path) -> None:
    topology = load_topology(_multi_site(tmp_path))
    subnets = site_subnets(topology)
    assert subnets == site_subnets(load_topology(_multi_site(tmp_path / "again")))
    assert sorted(subnets) == sorted(["Store 1", "store-1", "depot", DEFAULT_SITE])
    nets = [ipaddress.IPv4Network(s) for s in subnets.values()]
    assert len(set(nets)) == 4
    assert all(n.subnet_of(ipaddress.IPv4Network("198.19.0.0/17")) for n in nets)
    # Another cluster starts elsewhere in the pool, so two simulations rarely collide.
    other = topology.model_copy(
        update={"cluster": topology.cluster.model_copy(update={"name": "x"})}
    )
    assert site_subnets(other) != subnets


def test_project_name_is_lowercase_letters_digits_and_dashes(tmp_path: pathlib.Path) -> None:
    assert project_name(load_topology(_multi_site(tmp_path))) == "em-chain-7-east"
    assert project_name(load_topology(SHIPPED[0])) == f"em-{load_topology(SHIPPED[0]).cluster.name}"


def test_topologies_a_simulation_cannot_run_are_refused(tmp_path: pathlib.Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("cluster: lonely\n", encoding="utf-8")
    with pytest.raises(SimError, match="no nodes"):
        render_compose(empty, tmp_path)
    clash = tmp_path / "clash.yaml"
    clash.write_text("cluster: c\nnodes: [{name: coordinator}]\n", encoding="utf-8")
    with pytest.raises(SimError, match="rename the node"):
        render_compose(clash, tmp_path)


def test_output_is_deterministic(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    topology_path = _multi_site(tmp_path)
    first = render_compose(topology_path, tmp_path / "out")
    monkeypatch.chdir(tmp_path)  # the working directory plays no part
    assert render_compose(pathlib.Path("topologies/chain.yaml"), pathlib.Path("out")) == first
    for path in SHIPPED:
        assert render_compose(path, SHIPPED_COMPOSE_DIR) == render_compose(
            path, SHIPPED_COMPOSE_DIR
        )


def test_header_says_where_it_comes_from_and_how_to_run_it() -> None:
    text = render_compose(SHIPPED[0], SHIPPED_COMPOSE_DIR)
    header = text[: text.index("services:")]
    assert all(line.startswith("#") or not line for line in header.splitlines())
    assert f"../../topologies/{SHIPPED[0].name}" in header and "Do not edit" in header
    assert "mesh sim up TOPOLOGY" in header
    assert f"-p {project_name(load_topology(SHIPPED[0]))} up -d" in header
    assert "--mdns-only" in header and "make sim-images" in header


def test_shipped_compose_path() -> None:
    assert shipped_compose_path(ROOT / "topologies" / "retail-store.yaml") == (
        ROOT / "deploy" / "compose" / "retail-store.yml"
    )


def test_checked_in_compose_files_match_the_topologies() -> None:
    problems = gen_compose.drift(gen_compose.expected_files(), gen_compose.checked_in_files())
    assert not problems, (
        "deploy/compose/ is out of date with topologies/: "
        + "; ".join(problems)
        + " — run python scripts/gen_compose.py and commit deploy/compose/"
    )
    assert len(gen_compose.checked_in_files()) == len(SHIPPED)


def test_drift_names_changed_missing_and_stale_files() -> None:
    expected = gen_compose.expected_files()
    name = shipped_compose_path(SHIPPED[0]).name
    edited = dict(expected)
    edited[name] = expected[name].replace("mem_limit: ", "mem_limit: 1", 1)  # a hand edit
    assert gen_compose.drift(expected, edited) == [
        f"{name}: differs from what its topology generates"
    ]
    assert gen_compose.drift(expected, {**expected, "old.yml": "x"}) == [
        "old.yml: stale (no topology in topologies/ generates it)"
    ]
    fewer = {k: v for k, v in expected.items() if k != name}
    assert gen_compose.drift(expected, fewer) == [
        f"{name}: missing (topologies/ has a topology for it)"
    ]


def test_an_edited_topology_changes_its_compose_file(tmp_path: pathlib.Path) -> None:
    """What keeps the drift test honest: any change a topology makes reaches the file."""
    original = SHIPPED[0].read_text(encoding="utf-8")
    copy = tmp_path / SHIPPED[0].name
    copy.write_text(original, encoding="utf-8")
    before = render_compose(copy, tmp_path)
    node = load_topology(copy).nodes[0]
    assert node.device is not None and node.device.memory_mb is not None
    copy.write_text(
        original.replace(f"memory_mb: {node.device.memory_mb}", "memory_mb: 4321", 1),
        encoding="utf-8",
    )
    after = render_compose(copy, tmp_path)
    assert after != before and "mem_limit: 4321m" in after


def test_gen_compose_check_passes_on_the_tree() -> None:
    result = subprocess.run(
        [sys.executable, str(_SCRIPT), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def _compose_config(path: pathlib.Path) -> subprocess.CompletedProcess[str]:
    assert DOCKER_COMPOSE is not None
    return subprocess.run(
        [DOCKER_COMPOSE, "-f", str(path), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=path.parent,
    )


@pytest.mark.skipif(DOCKER_COMPOSE is None, reason=NO_COMPOSE)
@pytest.mark.parametrize("topology_path", SHIPPED, ids=lambda p: p.stem)
def test_docker_compose_accepts_each_shipped_file(topology_path: pathlib.Path) -> None:
    result = _compose_config(shipped_compose_path(topology_path))
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(DOCKER_COMPOSE is None, reason=NO_COMPOSE)
def test_docker_compose_accepts_a_multi_site_file(tmp_path: pathlib.Path) -> None:
    topology_path = _multi_site(tmp_path)
    output = tmp_path / "out" / "compose.yml"
    output.parent.mkdir()
    output.write_text(render_compose(topology_path, output.parent), encoding="utf-8")
    result = _compose_config(output)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(DOCKER_COMPOSE is None, reason=NO_COMPOSE)
def test_docker_compose_refuses_a_broken_file(tmp_path: pathlib.Path) -> None:
    """The check above can fail: a key Compose does not know is refused."""
    topology_path = _multi_site(tmp_path)
    output = tmp_path / "compose.yml"
    text = render_compose(topology_path, tmp_path).replace("    hostname:", "    hostnam:", 1)
    output.write_text(text, encoding="utf-8")
    assert _compose_config(output).returncode != 0
