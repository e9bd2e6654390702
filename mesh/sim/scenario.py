"""A scenario: a timed script of load and faults against one topology (`mesh sim run FILE`).

    scenario = load_scenario("topologies/scenarios/distributed-edge.yaml")   # or ConfigError
    report = run_scenario(scenario, backend_for("netns"), progress=print)     # mesh/sim/runner.py

The file:

    name: distributed-edge-failover
    topology: ../distributed-edge.yaml        # relative to the scenario file
    description: what it shows
    load:
      tasks: 50                # in all
      concurrency: 4           # at most this many in flight
      max_tokens: 16
      model: smollm2           # what plain (non-agent) tasks ask for
      duration_s: 35           # task i starts no earlier than i * duration_s / tasks (0: at once)
      prompts: [...]           # optional; default DEFAULT_PROMPTS, used in turn
      via: {grpc: 0.7, openai: 0.2, cli: 0.1}  # share of tasks per ingress (cli: `mesh submit`)
      agents: {customer-service: 0.1}   # optional share run as agent tasks; sums to <= 1
    faults:
      - {at: 5, target: edge-b, action: kill}
      - {at: 12, target: edge-b, action: restart}
      - {at: 10, target: site:store-2, action: partition, for: 5}   # healed 5 s later
      - {at: 20, target: kiosk-1, action: delay, value: 200}
      - {at: 30, target: edge-a, action: kill, busy: true}   # at 30 s, or once it has a task
    phases:                    # optional; default: see `Scenario.phases`
      - {name: warm, from: 0, to: 5}
    deadline_s: 300            # load and faults give up after this

Everything is checked when the file is read, every problem at once with its key path and line
(`FILE: faults[2].target: ... (line N)`): the spec's types (strict: `at: "5"` is an error), the
fault actions and values (`mesh.sim.backend.check_fault`, the same rules `mesh sim fault` has),
targets against the topology (a node's name, or `site:NAME` of a `site` label; a site only for
partition/heal/delay/loss), `for` only on what `heal` undoes (pause, partition, delay, loss),
`busy` only on a node (a fault that waits for it puts its own `for` heal off as long),
and the load's model and agents against what the topology's nodes serve. Faults may be listed
in any order; they fire in order of `at` (ties: in file order).
"""

from __future__ import annotations

import difflib
import math
import os
import pathlib
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Literal

import yaml
from pydantic import (
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from mesh.core.errors import ConfigError
from mesh.core.model import FrozenModel
from mesh.sim.backend import (
    DEFAULT_SITE,
    FAULT_ACTIONS,
    SITE_PREFIX,
    FaultAction,
    SimError,
    check_fault,
    parse_target,
)
from mesh.topology.loader import (
    TopologyProblem,
    duplicate_keys,
    line_index,
    line_of,
    load_topology,
    problem_message,
    unknown_key_message,
    yaml_problem,
)
from mesh.topology.model import Topology, field_error
from mesh.topology.references import format_path

# Asked in turn when a scenario names no prompts: short, with short answers.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "What is the capital city of France?",
    "Name a primary colour.",
    "What do bees make?",
    "How many days are in a week?",
    "Is the store open on Sunday?",
    "Do you have AA batteries in stock?",
)
HEALABLE: tuple[FaultAction, ...] = ("pause", "partition", "delay", "loss")  # what `heal` undoes
SITE_ACTIONS: tuple[FaultAction, ...] = ("partition", "heal", "delay", "loss")
RESTORING: tuple[FaultAction, ...] = ("restart", "heal")  # bring the mesh back, not break it
VIAS = ("grpc", "openai")
_SHARE_TOLERANCE = 1e-6

Via = Literal["grpc", "openai", "cli"]
Share = Annotated[float, Strict(), Field(ge=0, le=1)]
Seconds = Annotated[float, Strict(), Field(ge=0, le=86_400)]
PositiveSeconds = Annotated[float, Strict(), Field(gt=0, le=86_400)]
Name = Annotated[str, Strict(), Field(min_length=1, max_length=63)]
Text = Annotated[str, Strict()]
Prompt = Annotated[str, Strict(), Field(min_length=1, max_length=4000)]


def _all_grpc() -> dict[Via, float]:
    return {"grpc": 1.0}


class LoadSpec(FrozenModel):
    """The tasks a scenario submits, and how."""

    tasks: Annotated[int, Strict(), Field(ge=1, le=100_000)]
    concurrency: Annotated[int, Strict(), Field(ge=1, le=1024)] = 4
    max_tokens: Annotated[int, Strict(), Field(ge=1, le=4096)] = 16
    model: Name = "smollm2"
    temperature: Annotated[float, Strict(), Field(ge=0, le=2)] = 0.0
    duration_s: Seconds = 0.0  # spread task starts over this long (0: as fast as allowed)
    task_deadline_s: PositiveSeconds | None = None  # per task; None: the coordinator's
    prompts: Annotated[tuple[Prompt, ...], Field(min_length=1)] = DEFAULT_PROMPTS
    via: dict[Via, Share] = Field(default_factory=_all_grpc)
    agents: dict[Name, Share] = Field(default_factory=dict)

    @field_validator("via")
    @classmethod
    def _via_shares(cls, value: dict[Via, float]) -> dict[Via, float]:
        total = sum(value.values())
        if abs(total - 1.0) > _SHARE_TOLERANCE:
            raise PydanticCustomError(
                "mesh", "shares must add up to 1 (they add up to {total})", {"total": f"{total:g}"}
            )
        return value

    @field_validator("agents")
    @classmethod
    def _agent_shares(cls, value: dict[str, float]) -> dict[str, float]:
        total = sum(value.values())
        if total > 1.0 + _SHARE_TOLERANCE:
            raise PydanticCustomError(
                "mesh",
                "shares must add up to at most 1 (they add up to {total})",
                {"total": f"{total:g}"},
            )
        return value


class FaultSpec(FrozenModel):
    """One fault: at `at` seconds into the run, `action` on `target` (healed `for` s later)."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    at: Seconds
    target: Annotated[str, Strict(), Field(min_length=1)]
    action: Annotated[str, Strict()]
    value: Annotated[float, Strict()] | None = None
    for_s: PositiveSeconds | None = Field(default=None, alias="for")
    # Fire at `at` only if the node has a task in flight then, else as soon as it has one
    # (up to the runner's BUSY_WAIT_S): a kill that must land mid-task.
    busy: Annotated[bool, Strict()] = False

    @model_validator(mode="after")
    def _checked(self) -> FaultSpec:
        try:
            check_fault(self.action, self.value)
        except SimError as error:
            field = "value" if self.action in FAULT_ACTIONS else "action"
            raise field_error(field, str(error)) from None
        try:
            kind, _name = parse_target(self.target)
        except SimError as error:
            raise field_error("target", str(error)) from None
        if kind == "site" and self.action not in SITE_ACTIONS:
            raise field_error(
                "target",
                f"a site takes {', '.join(SITE_ACTIONS)}; {self.action} acts on one node",
            )
        if self.busy and kind == "site":
            raise field_error("busy", "a site has no tasks of its own: name one of its nodes")
        if self.for_s is not None and self.action not in HEALABLE:
            raise field_error(
                "for",
                f"only {', '.join(HEALABLE)} can be healed after a while; "
                f"{self.action} cannot (schedule a restart instead)",
            )
        return self


class PhaseSpec(FrozenModel):
    """A named time range of the run, for latency figures: [from, to) seconds."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    name: Name
    start_s: Seconds = Field(alias="from")
    end_s: PositiveSeconds = Field(alias="to")

    @model_validator(mode="after")
    def _ordered(self) -> PhaseSpec:
        if self.end_s <= self.start_s:
            raise field_error("to", f"must be after from ({self.end_s:g} <= {self.start_s:g})")
        return self


class ScenarioSpec(FrozenModel):
    """A scenario file as written."""

    name: Name
    topology: Annotated[str, Strict(), Field(min_length=1)]
    description: Text = ""
    load: LoadSpec
    faults: tuple[FaultSpec, ...] = ()
    phases: tuple[PhaseSpec, ...] | None = None
    deadline_s: PositiveSeconds = 600.0


@dataclass(frozen=True)
class ScheduledFault:
    """A fault as the runner fires it: the file's faults, and the heal each `for` implies."""

    at: float
    target: str
    action: FaultAction
    value: float | None = None
    index: int = 0  # the fault in the file (faults[index]) this comes from
    healing: bool = False  # the heal a `for` scheduled
    busy: bool = False  # fire once the target has a task in flight (FaultSpec.busy)

    @property
    def label(self) -> str:
        value = ""
        if self.value is not None:
            value = f" {self.value:g}{'ms' if self.action == 'delay' else '%'}"
        return f"{self.at:g}s {self.action} {self.target}{value}"


@dataclass(frozen=True)
class Phase:
    """A time range of the run, [start_s, end_s) seconds from its start."""

    name: str
    start_s: float
    end_s: float = math.inf

    def holds(self, at_s: float) -> bool:
        return self.start_s <= at_s < self.end_s


@dataclass(frozen=True)
class Scenario:
    """A checked scenario, with its topology read."""

    spec: ScenarioSpec
    path: pathlib.Path
    topology_path: pathlib.Path
    topology: Topology

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def load(self) -> LoadSpec:
        return self.spec.load

    @property
    def deadline_s(self) -> float:
        return self.spec.deadline_s

    def schedule(self) -> list[ScheduledFault]:
        """Every fault to fire, in order of time: the file's (ties in file order), and a heal
        `for` seconds after each fault that has one."""
        events = []
        for index, fault in enumerate(self.spec.faults):
            action = check_fault(fault.action, fault.value)
            events.append(
                ScheduledFault(fault.at, fault.target, action, fault.value, index, busy=fault.busy)
            )
            if fault.for_s is not None:
                events.append(
                    ScheduledFault(fault.at + fault.for_s, fault.target, "heal", None, index, True)
                )
        return sorted(events, key=lambda e: (e.at, e.index, e.healing))

    def phases(self) -> list[Phase]:
        """The file's phases; by default "before" (until the first fault), then one phase per
        scheduled fault (heals included) from it until the next, the last until the end. The
        last is called "after" when its fault restores (restart, heal): the time after all
        faults. No faults: one phase, "whole run"."""
        if self.spec.phases is not None:
            return [Phase(p.name, p.start_s, p.end_s) for p in self.spec.phases]
        events = self.schedule()
        if not events:
            return [Phase("whole run", 0.0)]
        phases = [Phase("before", 0.0, events[0].at)] if events[0].at > 0 else []
        for position, event in enumerate(events):
            last = position == len(events) - 1
            end = math.inf if last else events[position + 1].at
            name = "after" if last and event.action in RESTORING else event.label
            if end > event.at:
                phases.append(Phase(name, event.at, end))
        return phases


def load_scenario(path: str | os.PathLike[str]) -> Scenario:
    """Read and check a scenario file and its topology; ConfigError listing every problem."""
    source = os.fspath(path)
    try:
        text = pathlib.Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        problem = TopologyProblem(file=source, message=f"cannot read: {reason}")
        raise ConfigError(str(problem), file=source, problems=(problem,)) from None
    return parse_scenario(text, source=source)


def parse_scenario(text: str, *, source: str) -> Scenario:
    """Check scenario YAML given as text; `source` is its path (the topology is relative to
    its folder)."""
    problems: list[TopologyProblem] = []
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            message = "the file is empty; a scenario needs name, topology and load"
            _fail(source, [TopologyProblem(file=source, message=message, line=1)])
        duplicates = duplicate_keys(root, ())
        data = loader.construct_document(root)
    except yaml.MarkedYAMLError as error:
        _fail(source, [yaml_problem(source, error)])
    except yaml.YAMLError as error:
        _fail(source, [TopologyProblem(file=source, message=f"YAML error: {error}")])
    finally:
        loader.dispose()
    lines = line_index(root)

    def problem(where: tuple[str | int, ...], message: str) -> TopologyProblem:
        return TopologyProblem(
            file=source, path=format_path(where), message=message, line=line_of(where, lines)
        )

    problems += [problem(where, message) for where, message, _line in duplicates]
    if not isinstance(data, Mapping):
        _fail(source, [*problems, problem((), "the top level must be a mapping of keys to values")])
    spec: ScenarioSpec | None = None
    try:
        spec = ScenarioSpec.model_validate(data)
    except ValidationError as error:
        problems += [problem(where, message) for where, message in _validation_problems(error)]
    if spec is None:
        _fail(source, problems)
    assert spec is not None
    topology_path = (pathlib.Path(source).parent / spec.topology).resolve()
    try:
        topology = load_topology(topology_path)
    except ConfigError as error:
        problems.append(problem(("topology",), f"the topology is not valid:\n{error}"))
        _fail(source, problems)
    problems += [problem(where, message) for where, message in topology_problems(spec, topology)]
    if problems:
        _fail(source, problems)
    return Scenario(spec, pathlib.Path(source), topology_path, topology)


def topology_problems(
    spec: ScenarioSpec, topology: Topology
) -> list[tuple[tuple[str | int, ...], str]]:
    """What the scenario names that its topology lacks; each with its key path."""
    problems: list[tuple[tuple[str | int, ...], str]] = []
    nodes = [node.name for node in topology.nodes]
    sites = sorted({node.labels.get("site", DEFAULT_SITE) for node in topology.nodes})
    for index, fault in enumerate(spec.faults):
        kind, name = parse_target(fault.target)
        if kind == "node" and name not in nodes:
            problems.append(
                (
                    ("faults", index, "target"),
                    f"no node {name!r} in the topology{_hint(name, nodes)}",
                )
            )
        elif kind == "site" and name not in sites:
            known = ", ".join(SITE_PREFIX + s for s in sites)
            problems.append(
                (("faults", index, "target"), f"no node has site {name!r} (sites: {known})")
            )
        if fault.at >= spec.deadline_s:
            problems.append(
                (("faults", index, "at"), f"is at or after deadline_s ({spec.deadline_s:g})")
            )
    load = spec.load
    plain = 1.0 - sum(load.agents.values())
    if plain > _SHARE_TOLERANCE:
        if load.model not in topology.models:
            problems.append(
                (
                    ("load", "model"),
                    f"no model {load.model!r} in the topology{_hint(load.model, list(topology.models))}",
                )
            )
        elif not any(load.model in node.models for node in topology.nodes):
            problems.append((("load", "model"), f"no node serves model {load.model!r}"))
    for agent in load.agents:
        if agent not in topology.agents:
            problems.append(
                (
                    ("load", "agents", agent),
                    f"no agent {agent!r} in the topology{_hint(agent, list(topology.agents))}",
                )
            )
        elif not any(agent in node.agents for node in topology.nodes):
            problems.append((("load", "agents", agent), f"no node runs agent {agent!r}"))
    names = [phase.name for phase in spec.phases or ()]
    for index, name in enumerate(names):
        if name in names[:index]:
            problems.append((("phases", index, "name"), f"phase {name!r} is named twice"))
    return problems


def _hint(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (known: {', '.join(known) or 'none'})"


def _fail(source: str, problems: list[TopologyProblem]) -> typing.NoReturn:
    unique = {(p.line or 0, p.path, p.message): p for p in problems}
    ordered = [unique[key] for key in sorted(unique)]
    raise ConfigError("\n".join(str(p) for p in ordered), file=source, problems=tuple(ordered))


_ALIASES = {"for_s": "for", "start_s": "from", "end_s": "to"}


def _validation_problems(error: ValidationError) -> list[tuple[tuple[str | int, ...], str]]:
    found = []
    for item in error.errors(include_url=False):
        loc: list[str | int] = [
            _ALIASES.get(str(p), p) if isinstance(p, str) else p
            for p in item["loc"]
            if p != "[key]"
        ]
        in_key = len(loc) != len(item["loc"])
        ctx = item.get("ctx") or {}
        if item["type"] == "mesh_field":
            loc.append(ctx["field"])
        if item["type"] == "extra_forbidden":
            message = unknown_key_message(ScenarioSpec, tuple(loc))
        else:
            message = problem_message(item, tuple(loc))
        found.append((tuple(loc), f"bad key: {message}" if in_key else message))
    return found
