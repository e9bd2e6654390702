"""Scenario files (mesh/sim/scenario.py): every problem with its key path, faults in order with
their `for` heals, default phases, and every shipped scenario valid against its topology."""

from __future__ import annotations

import math
import pathlib
import textwrap

import pytest

from mesh.core.errors import ConfigError
from mesh.sim.scenario import DEFAULT_PROMPTS, Phase, load_scenario

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOPOLOGIES = ROOT / "topologies"
SHIPPED = sorted((TOPOLOGIES / "scenarios").glob("*.yaml"))


def _write(tmp_path: pathlib.Path, body: str, topology: str = "distributed-edge") -> pathlib.Path:
    path = tmp_path / "scenario.yaml"
    head = f"name: test\ntopology: {TOPOLOGIES / (topology + '.yaml')}\n"
    path.write_text(head + textwrap.dedent(body), encoding="utf-8")
    return path


def _problems(path: pathlib.Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_scenario(path)
    return [f"{p.path}: {p.message}" for p in caught.value.fields["problems"]]


def test_every_shipped_topology_has_a_scenario_and_each_loads_against_it():
    stems = {p.stem for p in TOPOLOGIES.glob("*.yaml")}
    assert {p.stem for p in SHIPPED} == stems
    for path in SHIPPED:
        scenario = load_scenario(path)
        assert scenario.topology_path == (TOPOLOGIES / f"{path.stem}.yaml").resolve()
        assert scenario.schedule(), path  # each throws at least one fault
        assert all(event.at < scenario.deadline_s for event in scenario.schedule())


def test_the_distributed_edge_scenario_is_the_one_the_issue_asks_for():
    scenario = load_scenario(TOPOLOGIES / "scenarios" / "distributed-edge.yaml")
    load = scenario.load
    assert (load.tasks, load.concurrency, load.max_tokens) == (50, 4, 48)
    assert load.via == {"grpc": 0.6, "openai": 0.3, "cli": 0.1}
    assert [e.busy for e in scenario.schedule()] == [True, False, False, False]  # mid-task
    assert [e.label for e in scenario.schedule()] == [
        "3s kill edge-a",
        "8s restart edge-a",
        "14s pause edge-b",
        "18s heal edge-b",
    ]


def test_a_minimal_scenario_takes_the_defaults(tmp_path):
    scenario = load_scenario(_write(tmp_path, "load: {tasks: 3}\n"))
    assert scenario.load.prompts == DEFAULT_PROMPTS and scenario.load.via == {"grpc": 1.0}
    assert scenario.schedule() == [] and scenario.phases() == [Phase("whole run", 0.0)]


def test_faults_fire_in_order_of_time_with_each_for_healed_after_it(tmp_path):
    path = _write(
        tmp_path,
        """\
        load: {tasks: 3}
        faults:
          - {at: 20, target: edge-a, action: restart}
          - {at: 5, target: edge-a, action: kill}
          - {at: 10, target: site:lab, action: partition, for: 2.5}
          - {at: 11, target: edge-b, action: delay, value: 200}
        """,
    )
    scenario = load_scenario(path)
    assert [(e.at, e.action, e.target, e.healing) for e in scenario.schedule()] == [
        (5, "kill", "edge-a", False),
        (10, "partition", "site:lab", False),
        (11, "delay", "edge-b", False),
        (12.5, "heal", "site:lab", True),
        (20, "restart", "edge-a", False),
    ]
    phases = scenario.phases()
    assert [p.name for p in phases] == [
        "before",
        "5s kill edge-a",
        "10s partition site:lab",
        "11s delay edge-b 200ms",
        "12.5s heal site:lab",
        "after",  # the last event restores the mesh
    ]
    assert (phases[0].start_s, phases[0].end_s) == (0, 5)
    assert phases[-1].start_s == 20 and math.isinf(phases[-1].end_s)
    assert phases[1].holds(5) and not phases[1].holds(10)


def test_phases_given_in_the_file_replace_the_default(tmp_path):
    path = _write(
        tmp_path,
        """\
        load: {tasks: 3}
        faults: [{at: 5, target: edge-a, action: kill}]
        phases:
          - {name: warm, from: 0, to: 5}
          - {name: hurt, from: 5, to: 60}
        """,
    )
    assert load_scenario(path).phases() == [Phase("warm", 0, 5), Phase("hurt", 5, 60)]


def test_every_problem_is_reported_at_once_with_its_key_path(tmp_path):
    path = _write(
        tmp_path,
        """\
        load:
          tasks: 10
          concurency: 2
          via: {grpc: 0.5, openai: 0.2}
        faults:
          - {at: 5, target: edge-c, action: kill}
          - {at: 6, target: edge-a, action: kill, for: 3}
          - {at: 7, target: edge-b, action: delay}
          - {at: "8", target: edge-b, action: pause}
          - {at: 9, target: edge-b, action: explode}
          - {at: 10, target: site:lab, action: kill}
          - {at: 11, target: edge-b, action: loss, value: 150}
        phases:
          - {name: x, from: 5, to: 2}
        """,
    )
    problems = _problems(path)
    expected = [
        "load.concurency: unknown key (did you mean 'concurrency'?)",
        "load.via: shares must add up to 1 (they add up to 0.7)",
        "faults[1].for: only pause, partition, delay, loss can be healed after a while",
        "faults[2].value: fault delay: needs a value (delay MS)",
        "faults[3].at: must be a number (got '8')",
        "faults[4].action: fault 'explode': expected one of",
        "faults[5].target: a site takes partition, heal, delay, loss; kill acts on one node",
        "faults[6].value: fault loss: PCT must be 0..100",
        "phases[0].to: must be after from (2 <= 5)",
    ]
    for line in expected:
        assert any(problem.startswith(line) for problem in problems), (line, problems)
    assert len(problems) == len(expected), problems


def test_targets_agents_and_models_are_checked_against_the_topology(tmp_path):
    path = _write(
        tmp_path,
        """\
        load:
          tasks: 10
          model: smollm3
          agents: {kiosk-assistant: 0.5, customer-service: 0.1}
        faults:
          - {at: 5, target: edge-c, action: kill}
          - {at: 6, target: site:store-2, action: partition}
          - {at: 400, target: edge-a, action: restart}
        deadline_s: 300
        """,
    )
    problems = _problems(path)
    assert problems == [
        "load.model: no model 'smollm3' in the topology (did you mean 'smollm2'?)",
        "load.agents.kiosk-assistant: no agent 'kiosk-assistant' in the topology "
        "(known: intent-router, customer-service, scheduling, technical-support, escalation)",
        "faults[0].target: no node 'edge-c' in the topology (did you mean 'edge-b'?)",
        "faults[1].target: no node has site 'store-2' (sites: site:lab)",
        "faults[2].at: is at or after deadline_s (300)",
    ]


def test_problems_name_their_line_and_yaml_errors_are_problems_too(tmp_path):
    path = _write(tmp_path, "load: {tasks: 3}\nfaults:\n  - {at: 5, target: nope, action: kill}\n")
    with pytest.raises(ConfigError) as caught:
        load_scenario(path)
    assert str(caught.value).endswith("faults[0].target: no node 'nope' in the topology "
                                      "(known: edge-a, edge-b) (line 5)")  # fmt: skip
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n", encoding="utf-8")
    assert "YAML syntax error" in str(pytest.raises(ConfigError, load_scenario, bad).value)
    duplicate = _write(tmp_path, "load: {tasks: 3}\nload: {tasks: 4}\n")
    assert any("duplicate key" in p for p in _problems(duplicate))
    assert "cannot read" in str(
        pytest.raises(ConfigError, load_scenario, tmp_path / "no.yaml").value
    )


def test_a_broken_topology_is_named_as_the_scenario_s_problem(tmp_path):
    topology = tmp_path / "topo.yaml"
    topology.write_text("cluster: x\nnodes: [{name: a, port: nope}]\n", encoding="utf-8")
    path = tmp_path / "s.yaml"
    path.write_text("name: t\ntopology: topo.yaml\nload: {tasks: 1}\n", encoding="utf-8")
    (problem,) = _problems(path)
    assert problem.startswith("topology: the topology is not valid") and "port" in problem


def test_busy_takes_a_node_and_a_boolean(tmp_path):
    path = _write(
        tmp_path,
        """\
        load: {tasks: 10}
        faults:
          - {at: 5, target: site:lab, action: partition, busy: true}
          - {at: 6, target: edge-a, action: kill, busy: "yes"}
          - {at: 7, target: edge-b, action: pause, for: 2, busy: true}
        """,
    )
    problems = _problems(path)
    assert problems[0] == "faults[0].busy: a site has no tasks of its own: name one of its nodes"
    assert problems[1].startswith("faults[1].busy: ")
    assert len(problems) == 2
    good = tmp_path / "good.yaml"
    good.write_text(
        path.read_text()
        .replace("site:lab, action: partition, busy: true", "edge-a, action: stop")
        .replace('busy: "yes"', "busy: false")
    )
    busy = [(e.label, e.busy) for e in load_scenario(good).schedule()]
    assert busy == [
        ("5s stop edge-a", False),
        ("6s kill edge-a", False),
        ("7s pause edge-b", True),
        ("9s heal edge-b", False),
    ]
