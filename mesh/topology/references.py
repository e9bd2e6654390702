"""Checks that span sections of a topology, as a pure function over the raw mapping.

They run on the data as read from YAML (before or without the schema), so the loader reports them
with exact key paths alongside type errors; `Topology` runs them again on itself so a topology
built in code is held to the same rules.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

PathPart = str | int
Problem = tuple[tuple[PathPart, ...], str]


def format_path(path: tuple[PathPart, ...]) -> str:
    """('nodes', 1, 'port') -> 'nodes[1].port'."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _named_items(value: Any) -> list[tuple[int, Any]]:
    return list(enumerate(value)) if isinstance(value, list | tuple) else []


def reference_problems(
    data: Mapping[str, Any], *, default_models: Collection[str] = ()
) -> list[Problem]:
    """Problems that span sections, on raw (possibly invalid) topology data; each with its path.

    Duplicate node names and addresses, agents naming missing models, nodes listing missing models
    or agents, nodes running an agent without serving its model, and escalation tiers naming
    missing models. Values of the wrong type are skipped here (the schema reports them).
    """
    problems: list[Problem] = []
    raw_models = data.get("models", dict.fromkeys(default_models))
    models = set(raw_models) if isinstance(raw_models, Mapping) else None
    raw_agents = data.get("agents", {})
    agents = raw_agents if isinstance(raw_agents, Mapping) else {}
    if models is not None:
        for agent_name, agent in agents.items():
            model = agent.get("model") if isinstance(agent, Mapping) else None
            if isinstance(model, str) and model not in models:
                problems.append(
                    (
                        (("agents", agent_name, "model")),
                        f"names model {model!r}, which is not under models "
                        f"(known: {', '.join(sorted(models)) or 'none'})",
                    )
                )
    problems.extend(_escalation_problems(data.get("escalation"), models))
    first_name: dict[str, int] = {}
    first_address: dict[str, int] = {}
    for index, node in _named_items(data.get("nodes", ())):
        if not isinstance(node, Mapping):
            continue
        name, address = node.get("name"), node.get("address")
        if isinstance(name, str):
            if name in first_name:
                problems.append(
                    (
                        ("nodes", index, "name"),
                        f"duplicate node name {name!r} (first at nodes[{first_name[name]}])",
                    )
                )
            first_name.setdefault(name, index)
        if isinstance(address, str):
            if address in first_address:
                problems.append(
                    (
                        ("nodes", index, "address"),
                        f"duplicate address {address!r} (first at nodes[{first_address[address]}])",
                    )
                )
            first_address.setdefault(address, index)
        problems.extend(_node_reference_problems(index, node, models, agents))
    return problems


def _node_reference_problems(
    index: int, node: Mapping[str, Any], models: set[str] | None, agents: Mapping[str, Any]
) -> list[Problem]:
    problems: list[Problem] = []
    node_models = node.get("models", ())
    node_model_set = {m for _, m in _named_items(node_models) if isinstance(m, str)}
    if models is not None:
        for position, model in _named_items(node_models):
            if isinstance(model, str) and model not in models:
                problems.append(
                    (
                        ("nodes", index, "models", position),
                        f"model {model!r} is not under models "
                        f"(known: {', '.join(sorted(models)) or 'none'})",
                    )
                )
    for position, agent_name in _named_items(node.get("agents", ())):
        if not isinstance(agent_name, str):
            continue
        agent = agents.get(agent_name)
        if agent is None:
            problems.append(
                (
                    ("nodes", index, "agents", position),
                    f"agent {agent_name!r} is not under agents "
                    f"(known: {', '.join(sorted(map(str, agents))) or 'none'})",
                )
            )
            continue
        if not isinstance(agent, Mapping):
            continue
        model = agent.get("model")
        if isinstance(model, str) and node_model_set and model not in node_model_set:
            problems.append(
                (
                    ("nodes", index, "agents", position),
                    f"agent {agent_name!r} uses model {model!r}, which this node does "
                    f"not list under its models",
                )
            )
        wanted, labels = agent.get("node_labels"), node.get("labels", {})
        if isinstance(wanted, Mapping) and isinstance(labels, Mapping):
            missing = {k: v for k, v in wanted.items() if labels.get(k) != v}
            if missing:
                needed = ", ".join(f"{k}={v}" for k, v in missing.items())
                problems.append(
                    (
                        ("nodes", index, "agents", position),
                        f"agent {agent_name!r} runs only on nodes labelled {needed}",
                    )
                )
    return problems


def _escalation_problems(escalation: Any, models: set[str] | None) -> list[Problem]:
    """Tiers and the router model must name models under `models`."""
    if not isinstance(escalation, Mapping) or models is None:
        return []
    known = ", ".join(sorted(models)) or "none"
    problems: list[Problem] = []
    for position, tier in _named_items(escalation.get("tiers", ())):
        if isinstance(tier, str) and tier not in models:
            problems.append(
                (
                    ("escalation", "tiers", position),
                    f"tier {tier!r} is not under models (known: {known})",
                )
            )
    router = escalation.get("router_model")
    if isinstance(router, str) and router not in models:
        problems.append(
            (
                ("escalation", "router_model"),
                f"model {router!r} is not under models (known: {known})",
            )
        )
    return problems
