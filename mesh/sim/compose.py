"""A docker-compose file from a topology (`mesh sim compose TOPOLOGY`).

    text = render_compose(pathlib.Path("topologies/retail-store.yaml"), output_dir)
    project_name(load_topology(path))                 # "em-store-042"

One service per topology node (service, container host name and mDNS host name: the node's
name), started from the topology itself (`mesh node start --topology ... --node NAME`), and a
coordinator that finds every node by mDNS (`--mdns-only`): static addresses in the topology
name real devices and mean nothing in a simulation. Each `site` label gets its own bridge
network; the coordinator sits on all of them, as a gateway would, so a site can be cut off
(`mesh sim fault site:NAME partition`) without cutting the others.

Addresses: every subnet is a /24 of 198.19.0.0/17, inside the benchmark range 198.18.0.0/15
(RFC 2544) and clear of the namespace lab (mesh/sim/lab.py: 198.18.0.0/16) and of the pool
our own dockerd hands out (198.19.128.0/17, ../shared/MEASURED.md). Which /24 a site gets is
fixed by the cluster name and the site's place in sorted order, so a file is the same wherever
it is generated, and two simulations of different clusters rarely overlap (docker refuses the
second one's network with "Pool overlaps" when they do).

The file uses only what Compose v2 (`docker compose`) and Debian's docker-compose 1.29 both
understand: no `version:` key, short port syntax, long volume syntax, `cpu_quota`. A node's
`device.cpus` becomes `cpu_quota` over a 100 ms `cpu_period` — the limit `cpus:` sets, but
`cpus:` above the host's core count is refused at start ("Range of CPUs is from 0.01 to
2.00"), and a 4-core back office must still start on a 2-core laptop.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import pathlib
import re
import textwrap
from typing import Any

import yaml

from mesh.sim.backend import DEFAULT_SITE, SimError
from mesh.topology.model import NodeSpec, Topology

COORDINATOR_SERVICE = "coordinator"
COORDINATOR_GRPC_PORT = 9000
COORDINATOR_HTTP_PORT = 8000
TOPOLOGY_MOUNT = "/etc/edgemesh/topology.yaml"
STATE_MOUNT = "/var/lib/edgemesh"
NODE_IMAGE = "${EDGEMESH_NODE_IMAGE:-edgemesh-node:latest}"
COORDINATOR_IMAGE = "${EDGEMESH_COORDINATOR_IMAGE:-edgemesh-coordinator:latest}"
PROJECT_PREFIX = "em-"
SITE_LABEL = "site"

# Site subnets: /24s of this pool, the first chosen by the cluster name.
SUBNET_POOL = ipaddress.IPv4Network("198.19.0.0/17")
_SUBNETS = SUBNET_POOL.num_addresses // 256  # 128 /24s
COORDINATOR_HOST = 2  # the coordinator's address in every site network (.1 is the gateway)
FIRST_NODE_HOST = 10  # nodes get .10, .11, ... in topology order within their site
LAST_NODE_HOST = 254

COORDINATOR_NUM_CPUS = 2.0  # Ray's CPUs when the topology does not say
COORDINATOR_MEMORY = "2048m"  # Ray and Serve need about 1.5 GB
COORDINATOR_SHM = "1gb"  # Ray's object store lives in /dev/shm (64 MB by default in Docker)
CPU_PERIOD_US = 100_000
# Health checks: a node turns SERVING when its models are loaded, which on half a core takes a
# while; the coordinator starts Ray and Serve first. The check itself takes about 40 ms.
NODE_HEALTH = {"interval": "5s", "timeout": "3s", "retries": 3, "start_period": "120s"}
COORDINATOR_HEALTH = {"interval": "5s", "timeout": "3s", "retries": 3, "start_period": "180s"}
NODE_STOP_GRACE = "15s"  # the node drains in-flight requests for 10 s (nodes/config.py grace_s)
COORDINATOR_STOP_GRACE = "30s"  # Serve, then Ray
HEALTH_PATH = "/v1/mesh/info"  # answered by a dispatcher replica, no API key needed

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SHIPPED_COMPOSE_DIR = _REPO_ROOT / "deploy" / "compose"


class _FlowList(list[str]):
    """A short list written on one line (`[a, b]`); everything else is written as blocks."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(
    _FlowList,
    lambda dumper, data: dumper.represent_sequence(
        "tag:yaml.org,2002:seq", list(data), flow_style=True
    ),
)


def service_name(node_name: str) -> str:
    """The node's compose service; also its container's host name and its mDNS host name."""
    return node_name


def project_name(topology: Topology) -> str:
    """`em-<cluster>`: the compose project (container, network and volume name prefix)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", topology.cluster.name.lower()).strip("-")
    return PROJECT_PREFIX + (slug or "mesh")


def shipped_compose_path(topology_path: pathlib.Path) -> pathlib.Path:
    """Where the compose file of a shipped topology is kept: deploy/compose/<stem>.yml."""
    return SHIPPED_COMPOSE_DIR / f"{pathlib.Path(topology_path).stem}.yml"


def node_site(node: NodeSpec) -> str:
    return node.labels.get(SITE_LABEL, DEFAULT_SITE)


def topology_sites(topology: Topology) -> list[str]:
    """The distinct sites of the topology's nodes, sorted."""
    return sorted({node_site(node) for node in topology.nodes})


def site_subnets(topology: Topology) -> dict[str, str]:
    """Site -> its network's subnet, `198.19.X.0/24`, distinct within the topology."""
    sites = topology_sites(topology)
    if len(sites) > _SUBNETS:
        raise SimError(
            f"{len(sites)} sites: a simulation has room for {_SUBNETS} (one /24 each); "
            "give several nodes the same site label"
        )
    digest = hashlib.sha256(topology.cluster.name.encode()).digest()
    first = int.from_bytes(digest[:4], "big") % _SUBNETS
    base = int(SUBNET_POOL.network_address)
    return {
        site: str(ipaddress.IPv4Network((base + ((first + index) % _SUBNETS) * 256, 24)))
        for index, site in enumerate(sites)
    }


def network_names(sites: list[str]) -> dict[str, str]:
    """Site -> compose network name: the site label made safe (`[a-z0-9-]`), unique."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for site in sites:
        slug = re.sub(r"[^a-z0-9-]+", "-", site.lower()).strip("-") or "site"
        name, suffix = slug, 2
        while name in taken:
            name, suffix = f"{slug}-{suffix}", suffix + 1
        taken.add(name)
        names[site] = name
    return names


def node_addresses(topology: Topology) -> dict[str, str]:
    """Node name -> its fixed address in its site's network."""
    subnets = site_subnets(topology)
    counts: dict[str, int] = {}
    addresses = {}
    for node in topology.nodes:
        site = node_site(node)
        host = FIRST_NODE_HOST + counts.get(site, 0)
        if host > LAST_NODE_HOST:
            raise SimError(
                f"site {site!r} has more than {LAST_NODE_HOST - FIRST_NODE_HOST + 1} nodes: "
                "split it into several sites"
            )
        counts[site] = counts.get(site, 0) + 1
        addresses[node.name] = _host(subnets[site], host)
    return addresses


def _host(subnet: str, host: int) -> str:
    return str(ipaddress.IPv4Network(subnet).network_address + host)


def _mount_source(topology_path: pathlib.Path, output_dir: pathlib.Path) -> str:
    """The topology's path relative to the compose file's directory (where Compose resolves
    it), so the file works from any checkout; absolute where no relative path exists."""
    try:
        relative = os.path.relpath(topology_path.resolve(), output_dir.resolve())
    except ValueError:  # another drive (Windows)
        return topology_path.resolve().as_posix()
    relative = pathlib.Path(relative).as_posix()
    return relative if relative.startswith("../") else f"./{relative}"


def _number(value: float) -> str:
    return f"{value:g}"


def _health_test(*arguments: str) -> _FlowList:
    return _FlowList(["CMD", "python3", "-m", "mesh.sim.healthcheck", *arguments])


def _topology_volume(source: str) -> dict[str, Any]:
    return {"type": "bind", "source": source, "target": TOPOLOGY_MOUNT, "read_only": True}


def _node_service(
    node: NodeSpec, *, source: str, network: str, address: str, site: str
) -> dict[str, Any]:
    name = service_name(node.name)
    port = node.effective_port
    service: dict[str, Any] = {
        "image": NODE_IMAGE,
        "hostname": name,
        "command": ["mesh", *node_args(TOPOLOGY_MOUNT, node.name, STATE_MOUNT)],
        "init": True,  # signals reach the node; zombies are reaped
        "volumes": [
            _topology_volume(source),
            {"type": "volume", "source": f"{name}-state", "target": STATE_MOUNT},
        ],
        "networks": {network: {"ipv4_address": address}},
        "ports": _FlowList([f"127.0.0.1::{port}"]),
        "labels": {"edgemesh.role": "node", "edgemesh.node": node.name, "edgemesh.site": site},
    }
    device = node.device
    if device is not None and device.cpus is not None:
        service["cpu_period"] = CPU_PERIOD_US
        service["cpu_quota"] = max(1000, round(device.cpus * CPU_PERIOD_US))
    if device is not None and device.memory_mb is not None:
        service["mem_limit"] = f"{device.memory_mb}m"
        service["memswap_limit"] = f"{device.memory_mb}m"  # no swap beyond the device's memory
    service["healthcheck"] = {
        "test": _health_test(f"127.0.0.1:{port}"),
        **NODE_HEALTH,
    }
    service["stop_grace_period"] = NODE_STOP_GRACE
    return service


def node_args(topology: str, node: str, state_dir: str) -> list[str]:
    """`mesh` arguments of a simulated node, on every backend: the node as its topology entry
    declares it, with stand-ins for what a simulation lacks (a model file, a tool), listening
    on every address of its own network without cluster credentials (a lab, not a site)."""
    return [
        "node", "start", "--topology", topology, "--node", node, "--stand-ins", "--insecure",
        "--state-dir", state_dir, "--host", "0.0.0.0",
    ]  # fmt: skip


def coordinator_args(topology: str, num_cpus: str) -> list[str]:
    """`mesh` arguments of a simulated coordinator, on every backend: nodes found by mDNS only
    (the topology's static addresses are a real site's), no cluster credentials."""
    return [
        "coordinator", "start", "--topology", topology, "--mdns-only", "--no-cluster",
        "--insecure", "--host", "0.0.0.0", "--grpc-port", str(COORDINATOR_GRPC_PORT),
        "--http-port", str(COORDINATOR_HTTP_PORT), "--num-cpus", num_cpus,
    ]  # fmt: skip


def _coordinator_service(
    topology: Topology, *, source: str, networks: dict[str, str], subnets: dict[str, str]
) -> dict[str, Any]:
    num_cpus = topology.coordinator.num_cpus or COORDINATOR_NUM_CPUS
    return {
        "image": COORDINATOR_IMAGE,
        "hostname": COORDINATOR_SERVICE,
        "command": ["mesh", *coordinator_args(TOPOLOGY_MOUNT, _number(num_cpus))],
        "init": True,  # Ray starts many processes: tini reaps them and forwards signals
        "volumes": [_topology_volume(source)],
        "networks": {
            networks[site]: {"ipv4_address": _host(subnets[site], COORDINATOR_HOST)}
            for site in sorted(networks)
        },
        "ports": _FlowList(
            [f"127.0.0.1::{COORDINATOR_GRPC_PORT}", f"127.0.0.1::{COORDINATOR_HTTP_PORT}"]
        ),
        "labels": {"edgemesh.role": "coordinator"},
        "shm_size": COORDINATOR_SHM,
        "mem_limit": COORDINATOR_MEMORY,
        "healthcheck": {
            "test": _health_test("--http", HEALTH_PATH, f"127.0.0.1:{COORDINATOR_HTTP_PORT}"),
            **COORDINATOR_HEALTH,
        },
        "stop_grace_period": COORDINATOR_STOP_GRACE,
    }


def compose_document(topology: Topology, mount_source: str) -> dict[str, Any]:
    """The compose file as data (what `render_compose` writes out)."""
    if not topology.nodes:
        raise SimError(
            f"topology {topology.cluster.name!r} has no nodes: a simulation needs at least one "
            "entry under `nodes:`"
        )
    subnets = site_subnets(topology)
    networks = network_names(sorted(subnets))
    addresses = node_addresses(topology)
    services: dict[str, Any] = {}
    for node in topology.nodes:
        site = node_site(node)
        services[service_name(node.name)] = _node_service(
            node,
            source=mount_source,
            network=networks[site],
            address=addresses[node.name],
            site=site,
        )
    if COORDINATOR_SERVICE in services:
        raise SimError(
            f"a node is called {COORDINATOR_SERVICE!r}, the simulation's coordinator service: "
            "rename the node"
        )
    services[COORDINATOR_SERVICE] = _coordinator_service(
        topology, source=mount_source, networks=networks, subnets=subnets
    )
    return {
        "services": services,
        "networks": {
            networks[site]: {
                "driver": "bridge",
                "labels": {"edgemesh.site": site},
                "ipam": {"config": [{"subnet": subnets[site]}]},
            }
            for site in sorted(subnets)
        },
        "volumes": {f"{service_name(node.name)}-state": {} for node in topology.nodes},
    }


def _header(topology: Topology, mount_source: str) -> str:
    """The comment that opens the file: where it comes from, how to use it, what it ignores."""
    project = project_name(topology)
    static = ", ".join(sorted(topology.static_addresses()))
    paragraphs = [
        f"Generated by `mesh sim compose TOPOLOGY` from {mount_source} (relative to this file; "
        f"cluster {topology.cluster.name}). Do not edit: change the topology and generate it "
        "again (`python scripts/gen_compose.py` for the files in deploy/compose/).",
        "",
        "Start it with `mesh sim up TOPOLOGY`, which builds the images it needs and waits until "
        "the coordinator lists every node ready; or by hand, once `make sim-images` has built "
        "the images (with Compose v2, `docker compose` for `docker-compose`):",
        f"  docker-compose -f THIS_FILE -p {project} up -d",
        f"  docker-compose -f THIS_FILE -p {project} port {COORDINATOR_SERVICE} "
        f"{COORDINATOR_GRPC_PORT}",
        f"  docker-compose -f THIS_FILE -p {project} down -v",
        "Ports are published on 127.0.0.1 only, each on a free host port (`port` says which).",
        "",
        "The coordinator finds the nodes by mDNS in the site networks (--mdns-only): static "
        "node addresses in the topology are ignored here"
        + (f" ({static})." if static else ".")
        + " A node's `device: {cpus, memory_mb}` becomes cpu_quota/cpu_period (the limit that "
        "`cpus:` sets, without its refusal on a host with fewer cores) and mem_limit.",
    ]
    lines: list[str] = []
    for paragraph in paragraphs:
        if paragraph.startswith("  ") or not paragraph:
            lines.append(paragraph)
        else:
            lines.extend(textwrap.wrap(paragraph, width=96, break_on_hyphens=False))
    return "".join(f"# {line}".rstrip() + "\n" for line in lines) + "\n"


def render_compose(topology_path: pathlib.Path, output_dir: pathlib.Path) -> str:
    """The compose file for the topology at `topology_path`, to be written into `output_dir`
    (the topology is mounted by its path relative to there). Deterministic: the same topology
    gives the same text. ConfigError for an invalid topology, SimError for one that cannot be
    simulated."""
    from mesh.topology.loader import load_topology

    topology = load_topology(topology_path)
    source = _mount_source(pathlib.Path(topology_path), pathlib.Path(output_dir))
    document = compose_document(topology, source)
    body = yaml.dump(document, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)
    return _header(topology, source) + body
