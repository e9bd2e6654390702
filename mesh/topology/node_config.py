"""A node as the topology declares it: a topology's node entry turned into NodeConfig values.

    mesh node start --topology topologies/distributed-edge.yaml --node edge-a [--stand-ins]

The topology stays the one source of truth for real devices and for simulations: the node's
name (the coordinator matches nodes by it) and cluster, port, labels, capacity, threads, its
models (`package:` -> the installed package's file, `path:` -> that file, `upstream:` -> an
OpenAI-compatible server the node fronts) and its agents (model, system prompt, tools, steps).

A simulation has not everything a device has. With `stand_ins`, a `path:` (or `package:`) model
whose file is missing is served by the bundled smollm2 under the same alias, and an agent's tool
this node does not have is left out of that agent; each is logged as a warning starting
`stand-in:`. Without it, those are a ConfigError naming what is missing and how to provide it.
A topology's `n_threads` above the CPUs this process may use (affinity, cgroup quota) is capped
to them, with a warning: more inference threads than cores is a cliff.

Only `mesh node start` imports this module (it reads nodes' tools and model files); the
coordinator reads topologies without it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pathlib
import socket
import urllib.parse
from collections.abc import Callable, Collection, Mapping
from typing import Any

from pydantic import ValidationError

from mesh.core.errors import ConfigError
from mesh.topology.loader import load_topology
from mesh.topology.model import AgentSpec, ModelSpec, Topology, UpstreamSpec
from nodes.agents.spec import AgentSpec as NodeAgentSpec
from nodes.config import ModelConfig
from nodes.cpu_limits import usable_cpu_count
from nodes.model_files import BUNDLED
from nodes.router import ROUTER_ALIAS
from nodes.tools import builtin_registry, load_module_objects

logger = logging.getLogger(__name__)

STAND_IN_MODEL = "smollm2"  # the bundled GGUF that serves a missing model's alias
STAND_IN = "stand-in:"  # every stand-in's warning starts so (simulations grep for it)
UPSTREAM_CONNECT_TIMEOUT_S = 1.0  # stand-ins only: is an upstream server there at all?

Reachable = Callable[[str, int], bool]  # (host, port) -> whether a TCP connection opens


def tcp_reachable(host: str, port: int) -> bool:
    """Whether a TCP connection to host:port opens within UPSTREAM_CONNECT_TIMEOUT_S."""
    try:
        with socket.create_connection((host, port), timeout=UPSTREAM_CONNECT_TIMEOUT_S):
            return True
    except OSError:  # refused, unreachable, timed out, unknown name: not there
        return False


def upstream_problem(upstream: UpstreamSpec, reachable: Reachable) -> str | None:
    """Why the node could not use this upstream server now (its key's variable unset, or
    nothing listening), or None. Asked only with stand-ins: a simulated network reaches no
    server outside it, and a node whose upstream fails to load never serves."""
    if upstream.api_key_env and not os.environ.get(upstream.api_key_env):
        return f"${upstream.api_key_env} (its API key) is not set"
    url = urllib.parse.urlsplit(upstream.base_url)
    port = url.port or (443 if url.scheme == "https" else 80)
    if not url.hostname or not reachable(url.hostname, port):
        return f"upstream {upstream.base_url} is not reachable"
    return None


class _Findings:
    """What building one node found: problems (a ConfigError) and stand-ins (warnings)."""

    def __init__(self, stand_ins: bool, reachable: Reachable) -> None:
        self.stand_ins = stand_ins
        self.reachable = reachable
        self.problems: list[str] = []
        self.notes: list[str] = []


def node_config_values(
    topology_path: str,
    node_name: str,
    stand_ins: bool,
    config: Mapping[str, Any],
    *,
    usable_cpus: Callable[[], int] = usable_cpu_count,
    reachable: Reachable = tcp_reachable,
) -> dict[str, Any]:
    """NodeConfig values of `node_name` in the topology file (nodes.config.TopologyValues).

    The tools its agents may use are the node's built-ins plus those of the config's
    `agent_modules`."""
    topology = load_topology(topology_path)
    return values_for_node(
        topology,
        node_name,
        stand_ins=stand_ins,
        tools=node_tool_names(config.get("agent_modules")),
        usable_cpus=usable_cpus(),
        base_dir=pathlib.Path(topology_path).parent,
        source=topology_path,
        reachable=reachable,
    )


def node_tool_names(agent_modules: object) -> frozenset[str]:
    """The tools a node has: its built-ins and the `@tool`s of `agent_modules` (imported)."""
    names = set(builtin_registry().names())
    modules = agent_modules if isinstance(agent_modules, list | tuple) else ()
    for module in modules:
        if isinstance(module, str):  # anything else: NodeConfig's validation says so
            tools, _agents = load_module_objects(module, NodeAgentSpec)
            names.update(item.name for item in tools)
    return frozenset(names)


def values_for_node(
    topology: Topology,
    node_name: str,
    *,
    stand_ins: bool,
    tools: Collection[str],
    usable_cpus: int,
    base_dir: pathlib.Path,
    source: str,
    reachable: Reachable = tcp_reachable,
) -> dict[str, Any]:
    """NodeConfig values of the topology's node `node_name`; ConfigError naming every problem.

    Stand-ins and a capped thread count are logged as warnings (only once nothing is wrong)."""
    node = topology.node_named(node_name)
    if node is None:
        names = ", ".join(n.name for n in topology.nodes) or "none"
        raise ConfigError(
            f"{source}: no node named {node_name!r} in this topology; its nodes: {names}"
        )
    found = _Findings(stand_ins, reachable)
    threads = node.n_threads
    if threads is not None and threads > usable_cpus:
        found.notes.append(
            f"node {node.name}: n_threads {threads} is more than the {usable_cpus} CPU(s) this "
            f"process may use; using {usable_cpus} (more inference threads than cores is a "
            "cliff, not a slope)"
        )
        threads = usable_cpus
    models = [
        _model_config(alias, topology.models[alias], threads, base_dir, found)
        for alias in node.models
    ]
    agents = [_agent_spec(name, topology.agents[name], tools, found) for name in node.agents]
    if found.problems:
        prefix = f"{source}: node {node.name}: "
        raise ConfigError("\n".join(prefix + problem for problem in found.problems))
    for note in found.notes:
        logger.warning("%s", note)
    values: dict[str, Any] = {
        "name": node.name,
        "cluster": topology.cluster.name,
        "port": node.effective_port,
        "labels": dict(node.labels),
        "agents": tuple(agents),
    }
    if models:  # none listed: the node's default (the bundled smollm2)
        values["models"] = tuple(models)
    if node.max_concurrent is not None:
        values["max_concurrent"] = node.max_concurrent
    if node.max_queued is not None:
        values["max_queued"] = node.max_queued
    return values


def _model_config(
    alias: str, spec: ModelSpec, threads: int | None, base_dir: pathlib.Path, found: _Findings
) -> ModelConfig:
    """The ModelConfig of a topology model alias (a placeholder when it has problems)."""
    if alias == ROUTER_ALIAS:
        found.problems.append(
            f"model {alias!r}: that is the id of the node's bundled ONNX intent router; "
            "give the model another alias (the shipped topologies call theirs 'router')"
        )
    upstream = spec.upstream
    missing = upstream_problem(upstream, found.reachable) if upstream and found.stand_ins else None
    if upstream is not None and missing is None:
        values: dict[str, Any] = {
            "id": alias,
            "kind": "openai",
            "base_url": upstream.base_url,
            "remote_model": upstream.model,
            "api_key_env": upstream.api_key_env,
            "request_timeout_s": upstream.timeout_s,
        }
    else:
        source = f"bundled:{STAND_IN_MODEL}"
        if upstream is None:
            source, missing = model_source(spec, base_dir)
        if missing is not None and not found.stand_ins:
            found.problems.append(
                f"model {alias!r}: {missing}; put the file there, or start with --stand-ins "
                f"to serve the bundled {STAND_IN_MODEL} in its place"
            )
        elif missing is not None:
            found.notes.append(
                f"{STAND_IN} model {alias}: {missing}; serving the bundled {STAND_IN_MODEL} "
                "in its place"
            )
            source = f"bundled:{STAND_IN_MODEL}"
        values = {"id": alias, "source": source}
        if not source.lower().endswith(".onnx"):  # threads and context are llama.cpp's
            if threads is not None:
                values["n_threads"] = threads
            if spec.context_length is not None:
                values["n_ctx"] = spec.context_length
    try:
        return ModelConfig.model_validate(values)
    except ValidationError as error:
        found.problems.append(f"model {alias!r}: {_one_line(error)}")
        return ModelConfig(id=alias, source=f"bundled:{STAND_IN_MODEL}")


def model_source(spec: ModelSpec, base_dir: pathlib.Path) -> tuple[str, str | None]:
    """(ModelConfig source, why the file is missing or None) of a `package:` or `path:` model.

    The bundled package resource is named by its alias (`bundled:smollm2`), so that the node
    resolves it, and names the package to install when it is missing; another package's
    resource is that file of the installed package; a relative `path` is relative to the
    topology file's folder."""
    resource = spec.package_resource()
    if resource is not None:
        for bundled_alias, bundled in BUNDLED.items():
            if (bundled.package, bundled.resource) == resource:
                return f"bundled:{bundled_alias}", None
        package, name = resource
        try:
            found = importlib.util.find_spec(package)
        except (ImportError, ValueError):  # a parent package is missing or broken
            found = None
        if found is None or not found.submodule_search_locations:
            return "", f"package {package} is not installed"
        path = pathlib.Path(next(iter(found.submodule_search_locations))) / name
    else:
        path = pathlib.Path(os.path.expanduser(spec.path or ""))
        if not path.is_absolute():
            path = base_dir / path
    if not path.is_file():
        return str(path), f"{path} not found"
    return str(path), None


def _agent_spec(
    name: str, spec: AgentSpec, tools: Collection[str], found: _Findings
) -> NodeAgentSpec:
    """The node's AgentSpec of a topology agent (a placeholder when it has problems)."""
    missing = [tool for tool in spec.tools if tool not in tools]
    if missing and not found.stand_ins:
        found.problems.append(
            f"agent {name!r} names tool(s) this node does not have: {', '.join(missing)}. "
            "Provide them as @tool functions of a Python module named in a node config's "
            "`agent_modules: [MODULE]` (--config FILE), or start with --stand-ins to leave "
            f"them out (this node's tools: {', '.join(sorted(tools))})"
        )
    found.notes.extend(
        f"{STAND_IN} agent {name}: tool {tool} is not on this node; left out"
        for tool in (missing if found.stand_ins else ())
    )
    values: dict[str, Any] = {
        "name": name,
        "model": spec.model,
        "description": spec.description,
        "tools": tuple(tool for tool in spec.tools if tool in tools),
        "max_steps": spec.max_steps,
    }
    if spec.system_prompt.strip():  # none: the node's default system prompt
        values["system_prompt"] = spec.system_prompt
    try:
        return NodeAgentSpec.model_validate(values)
    except ValidationError as error:
        found.problems.append(f"agent {name!r}: {_one_line(error)}")
        return NodeAgentSpec(name="placeholder")


def _one_line(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in item['loc']) or 'value'}: {item['msg']}"
        for item in error.errors(include_url=False)
    )
