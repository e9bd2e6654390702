"""Simulations (`mesh sim`): time to `up` per shipped topology, memory per container, and each
shipped scenario's figures.

    python -m bench.bench_sim --write                 # everything; docs/BENCHMARKS.md section
    python -m bench.bench_sim --topologies distributed-edge --warm 1 --no-scenarios

- `up`, cold: no image of this tree in the engine (node and coordinator images removed, with
  their build cache), so `up` builds them from the cached wheelhouse and base image, then starts
  the project and waits until the coordinator lists every node ready. (A machine's very first
  build also makes the base image (debootstrap, ~1 min) and the wheelhouse: in `make sim-base`.)
- `up`, warm: images present, nothing running (after `down`: no container, network or volume,
  so every node starts from an empty state volume and loads its model).
- netns: the same topology as processes in network namespaces (no images, so warm only).
- memory: `docker stats` of each container once the mesh is ready and idle.
- scenarios: `topologies/scenarios/*.yaml` on the Docker backend (and distributed-edge on
  netns too), each from a fresh `up`; the report's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any

from bench._report import machine_line, median, write_section

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOPOLOGIES = ("single-device", "distributed-edge", "retail-store")
TITLE = "Simulation: `mesh sim` up, memory and scenarios"


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _quiet(_line: str) -> None:
    pass


def _docker(*args: str) -> str:
    from mesh.sim.engine import docker_env

    done = subprocess.run(
        ["docker", *args],
        env={**os.environ, **docker_env()},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _remove_images() -> None:
    """Every node and coordinator image, and the build cache they leave (dangling layers)."""
    for repository in ("edgemesh-node", "edgemesh-coordinator"):
        ids = sorted(set(_docker("images", "-q", repository).split()))
        if ids:
            _docker("rmi", "-f", *ids)
    _docker("image", "prune", "-f")


def _memory(project: str) -> dict[str, float]:
    """Container -> MiB in use (`docker stats`), for the project's containers."""
    out = _docker("stats", "--no-stream", "--format", "{{.Name}}\t{{.MemUsage}}")
    found = {}
    for line in out.splitlines():
        name, _, usage = line.partition("\t")
        if not name.startswith(project + "_"):
            continue
        used = usage.split("/")[0].strip()
        number = float("".join(c for c in used if c.isdigit() or c == "."))
        unit = used.lstrip("0123456789.").strip()
        factor = {"B": 1 / 2**20, "KiB": 1 / 1024, "MiB": 1.0, "GiB": 1024.0}.get(unit, 1.0)
        service = name[len(project) + 1 :].rsplit("_", 1)[0]
        found[service] = round(number * factor, 1)
    return found


def _timed_up(backend: Any, topology: pathlib.Path) -> float:
    started = time.monotonic()
    backend.up(topology, progress=_quiet, timeout_s=900)
    return time.monotonic() - started


def measure_up(names: list[str], warm_runs: int, cold: bool) -> dict[str, Any]:
    from mesh.sim.compose import project_name
    from mesh.sim.docker import DockerBackend
    from mesh.sim.netns import NetnsBackend
    from mesh.topology import load_topology

    results: dict[str, Any] = {}
    for name in names:
        topology = ROOT / "topologies" / f"{name}.yaml"
        project = project_name(load_topology(topology))
        docker, netns = DockerBackend(), NetnsBackend()
        row: dict[str, Any] = {"nodes": len(load_topology(topology).nodes)}
        docker.down(topology, progress=_quiet)
        if cold:
            _remove_images()
            row["docker_cold_s"] = round(_timed_up(docker, topology), 1)
            _say(f"{name}: docker cold up {row['docker_cold_s']} s")
            docker.down(topology, progress=_quiet)
        warm = []
        for run in range(warm_runs):
            warm.append(_timed_up(docker, topology))
            if run == 0:
                time.sleep(5)  # idle: model loaded, Ray settled
                row["memory_mib"] = _memory(project)
            docker.down(topology, progress=_quiet)
        row["docker_warm_s"] = [round(s, 1) for s in warm]
        _say(f"{name}: docker warm up {row['docker_warm_s']} s, memory {row.get('memory_mib')}")
        runs = []
        for _ in range(warm_runs):
            runs.append(_timed_up(netns, topology))
            netns.down(topology, progress=_quiet)
        row["netns_s"] = [round(s, 1) for s in runs]
        _say(f"{name}: netns up {row['netns_s']} s")
        results[name] = row
    return results


def run_scenarios(names: list[str]) -> dict[str, Any]:
    from mesh.sim.backend import backend_for
    from mesh.sim.report import to_json
    from mesh.sim.runner import run_scenario
    from mesh.sim.scenario import load_scenario

    results: dict[str, Any] = {}
    plan = [(name, "docker") for name in names]
    if "distributed-edge" in names:
        plan.append(("distributed-edge", "netns"))
    for name, backend_name in plan:
        scenario = load_scenario(ROOT / "topologies" / "scenarios" / f"{name}.yaml")
        backend = backend_for(backend_name)
        topology = pathlib.Path(scenario.topology_path)
        backend.down(topology, progress=_quiet)
        try:
            backend.up(topology, progress=_quiet, timeout_s=900)
            report = to_json(run_scenario(scenario, backend, progress=_quiet))
        finally:
            backend.down(topology, progress=_quiet)
        results[f"{name} ({backend_name})"] = report
        tasks = report["tasks"]
        _say(f"scenario {name} on {backend_name}: {tasks['ok']}/{tasks['total']} ok")
    return results


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def render(ups: dict[str, Any], scenarios: dict[str, Any], command: str) -> str:
    lines = [f"Command: `{command}`", f"({machine_line()}; dockerd 20.10, Compose 1.29)", ""]
    if ups:
        lines += [
            "Time from `mesh sim up` to every node listed ready by the coordinator (medians of "
            "the warm runs; cold: the node and coordinator images of this tree built first, "
            "from the cached wheelhouse and base image).",
            "",
            "| topology | nodes | docker cold | docker warm | netns |",
            "|---|---|---|---|---|",
        ]
        for name, row in ups.items():
            cold = f"{row['docker_cold_s']} s" if "docker_cold_s" in row else "-"
            lines.append(
                f"| {name} | {row['nodes']} | {cold} | {median(row['docker_warm_s']):.1f} s "
                f"| {median(row['netns_s']):.1f} s |"
            )
        lines += ["", "Memory per container once ready and idle (`docker stats`):", ""]
        lines += ["| topology | container | MiB |", "|---|---|---|"]
        for name, row in ups.items():
            for service, mib in sorted(row.get("memory_mib", {}).items()):
                lines.append(f"| {name} | {service} | {mib} |")
    for title, report in scenarios.items():
        tasks, once = report["tasks"], report["exactly_once"]
        lines += [
            "",
            f"### Scenario {title}",
            "",
            f"`mesh sim run topologies/scenarios/{title.split()[0]}.yaml"
            f"{' --backend netns' if 'netns' in title else ''}`: {tasks['total']} tasks, "
            f"{tasks['ok']} ok, {tasks['failed']} failed; answered twice by the nodes' counts "
            f"{once['answered_twice']}, excused {len(once['excused'])}; run "
            f"{report['duration_s']:.1f} s.",
            "",
            "| fault | command | not ready | rerouted | ready again | tasks hit |",
            "|---|---|---|---|---|---|",
        ]
        for fault in report["faults"]:
            lines.append(
                f"| {fault['label']} | {_seconds(fault['command_s'])} "
                f"| {_seconds(fault['not_ready_s'])} | {_seconds(fault['reroute_s'])} "
                f"| {_seconds(fault['ready_s'])} | {fault['tasks_hit']} |"
            )
        lines += ["", "| phase | tasks | ok | p50 | p99 |", "|---|---|---|---|---|"]
        for phase in report["phases"]:
            p50 = "-" if phase["p50_s"] is None else f"{phase['p50_s'] * 1000:.0f} ms"
            p99 = "-" if phase["p99_s"] is None else f"{phase['p99_s'] * 1000:.0f} ms"
            lines.append(f"| {phase['name']} | {phase['tasks']} | {phase['ok']} | {p50} | {p99} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--topologies", nargs="+", default=list(TOPOLOGIES), choices=TOPOLOGIES)
    parser.add_argument("--warm", type=int, default=3, help="warm `up`s per topology")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold (image build) up")
    parser.add_argument("--no-ups", action="store_true", help="skip the `up` timings")
    parser.add_argument("--no-scenarios", action="store_true", help="skip the scenarios")
    parser.add_argument(
        "--scenarios",
        nargs="+",
        choices=TOPOLOGIES,
        help="the topologies whose scenarios to run (default: those of --topologies)",
    )
    parser.add_argument(
        "--reuse",
        metavar="FILE",
        help="an earlier run's --json: its figures are kept for what this run does not measure",
    )
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--write", action="store_true", help="write docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    from mesh.sim.engine import ensure_engine

    ensure_engine(_say)
    earlier = json.loads(pathlib.Path(args.reuse).read_text()) if args.reuse else {}
    ups = dict(earlier.get("up", {}))
    if not args.no_ups:
        ups.update(measure_up(args.topologies, args.warm, not args.no_cold))
    scenarios = dict(earlier.get("scenarios", {}))
    if not args.no_scenarios:
        scenarios.update(run_scenarios(args.scenarios or args.topologies))
    command = "python -m bench.bench_sim " + " ".join(argv if argv is not None else sys.argv[1:])
    text = render(ups, scenarios, command.strip())
    print(text)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"up": ups, "scenarios": scenarios}))
    if args.write:
        write_section(TITLE, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
