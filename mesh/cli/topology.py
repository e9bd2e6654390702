"""`mesh topology check FILE...` and `mesh topology show [FILE]`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from mesh.cli._common import EXIT_ERROR, print_json
from mesh.core.errors import ConfigError
from mesh.topology import (
    Topology,
    TopologyProblem,
    default_topology,
    load_topology,
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("topology", help="validate and inspect topology files")
    commands = parser.add_subparsers(dest="topology_command", metavar="ACTION", required=True)

    check = commands.add_parser(
        "check", help="validate topology files; every problem with its key path and line"
    )
    check.add_argument("files", nargs="+", metavar="FILE")
    check.add_argument("--json", action="store_true", help="machine-readable results")
    check.set_defaults(func=_check)

    show = commands.add_parser(
        "show", help="print a topology with every default filled in (no FILE: the defaults)"
    )
    show.add_argument("file", nargs="?", metavar="FILE")
    show.set_defaults(func=_show)


def _check_one(path: str) -> tuple[Topology | None, list[TopologyProblem]]:
    try:
        return load_topology(path), []
    except ConfigError as error:
        problems = error.fields.get("problems") or (TopologyProblem(file=path, message=str(error)),)
        return None, list(problems)


def _summary(topology: Topology) -> dict[str, Any]:
    return {
        "cluster": topology.cluster.name,
        "nodes": len(topology.nodes),
        "models": len(topology.models),
        "agents": len(topology.agents),
        "policy": topology.routing.policy,
    }


def _check(args: argparse.Namespace) -> int:
    results = []
    for path in args.files:
        topology, problems = _check_one(path)
        results.append(
            {
                "file": path,
                "ok": topology is not None,
                "summary": _summary(topology) if topology is not None else None,
                "problems": [p.model_dump() for p in problems],
            }
        )
        if args.json:
            continue
        if topology is not None:
            print(f"{path}: ok ({topology.summary()})")
        for problem in problems:
            print(problem)
    if args.json:
        print_json(results)
    return EXIT_ERROR if any(not result["ok"] for result in results) else 0


def _show(args: argparse.Namespace) -> int:
    topology: Topology | None
    if args.file is None:
        topology = default_topology()
    else:
        topology, problems = _check_one(args.file)
        if topology is None:
            for problem in problems:
                print(problem)
            return EXIT_ERROR
    print(json.dumps(topology.model_dump(mode="json"), indent=2))
    return 0
