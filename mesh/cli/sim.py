"""`mesh sim`: a topology as a mesh on this machine, in docker-compose or network namespaces.

mesh sim compose TOPOLOGY [-o FILE]        the docker-compose file for a topology
mesh sim up TOPOLOGY [--backend netns]     build what is missing, start, wait for every node
mesh sim status TOPOLOGY                   addresses, node states, faults in force
mesh sim fault TOPOLOGY NODE ACTION [VALUE]  kill|stop|pause|restart|partition|heal|delay MS|loss PCT
mesh sim run SCENARIO [--json FILE]        a timed script of load and faults, then a report
mesh sim down TOPOLOGY                     remove containers, networks and volumes
mesh sim images | engine start|stop|status  Docker plumbing (also done by `up` when needed)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import subprocess
import sys

from mesh.cli._common import EXIT_ERROR, error_line, print_json
from mesh.core.errors import MeshError

DEFAULT_UP_TIMEOUT_S = 600.0


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def register(subparsers: argparse._SubParsersAction) -> None:
    sim = subparsers.add_parser(
        "sim", help="simulate a topology on this machine (docker-compose or network namespaces)"
    )
    actions = sim.add_subparsers(dest="sim_command", metavar="ACTION")

    def with_backend(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--backend",
            choices=("docker", "netns"),
            default="docker",
            help="docker: a compose project (default); netns: network namespaces, no Docker",
        )

    compose = actions.add_parser("compose", help="write the docker-compose file for a topology")
    compose.add_argument("topology", help="topology YAML")
    compose.add_argument("-o", "--output", help="file to write (default: stdout)")
    compose.set_defaults(func=_compose)

    up = actions.add_parser("up", help="start a topology and wait until every node is ready")
    up.add_argument("topology", help="topology YAML")
    with_backend(up)
    up.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_UP_TIMEOUT_S,
        help=f"seconds to wait for every node to be ready (default {DEFAULT_UP_TIMEOUT_S:.0f})",
    )
    up.add_argument("--json", action="store_true", help="print the status as JSON")
    up.set_defaults(func=_up)

    status = actions.add_parser("status", help="what runs: addresses, node states, faults")
    status.add_argument("topology", help="topology YAML")
    with_backend(status)
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=_status)

    down = actions.add_parser("down", help="remove everything `up` made")
    down.add_argument("topology", help="topology YAML")
    with_backend(down)
    down.set_defaults(func=_down)

    fault = actions.add_parser(
        "fault",
        help="throw a fault at a node (or site:NAME): kill, stop, pause, restart, partition, "
        "heal, delay MS, loss PCT",
    )
    fault.add_argument("topology", help="topology YAML")
    fault.add_argument("target", help="a node's name, or site:NAME for every node of a site")
    fault.add_argument(
        "action",
        choices=("kill", "stop", "pause", "restart", "partition", "heal", "delay", "loss"),
    )
    fault.add_argument("value", nargs="?", type=float, help="delay: milliseconds; loss: percent")
    with_backend(fault)
    fault.set_defaults(func=_fault)

    run = actions.add_parser("run", help="run a scenario (load and timed faults); print a report")
    run.add_argument("scenario", help="scenario YAML (e.g. topologies/scenarios/*.yaml)")
    with_backend(run)
    run.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    run.add_argument(
        "--keep", action="store_true", help="leave the mesh up afterwards (default: `down`)"
    )
    run.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_UP_TIMEOUT_S,
        help="seconds `up` may take when the mesh is not up yet",
    )
    run.set_defaults(func=_run)

    images = actions.add_parser("images", help="build the node and coordinator images")
    images.add_argument("--rebuild", action="store_true", help="rebuild even if up to date")
    images.set_defaults(func=_images)

    engine = actions.add_parser("engine", help="the Docker engine `mesh sim` uses")
    engine.add_argument("engine_action", choices=("start", "stop", "status"))
    engine.set_defaults(func=_engine)

    sim.set_defaults(func=lambda _args: sim.print_help() or 2)


def _fails(function):  # type: ignore[no-untyped-def]
    """A MeshError becomes `error: ...` on stderr and exit code 1."""

    def wrapped(args: argparse.Namespace) -> int:
        try:
            return int(function(args) or 0)
        except MeshError as error:
            print(error_line(error), file=sys.stderr)
        except subprocess.CalledProcessError as error:  # a system tool the backend ran
            said = (error.stderr or "").strip() if isinstance(error.stderr, str) else ""
            print(f"error: {shlex.join(map(str, error.cmd))}: {said or error}", file=sys.stderr)
        except OSError as error:  # a file we were asked to write, a cgroup, a namespace
            where = f"{error.filename}: " if error.filename else ""
            print(f"error: {where}{error.strerror or error}", file=sys.stderr)
        return EXIT_ERROR

    return wrapped


def _backend(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from mesh.sim.backend import backend_for

    return backend_for(args.backend)


def _print_status(status, *, as_json: bool) -> None:  # type: ignore[no-untyped-def]
    if as_json:
        print_json(status.to_json())
        return
    if not status.up:
        print(f"{status.project} ({status.backend}): not running")
        return
    print(f"{status.project} ({status.backend})")
    print(
        f"  coordinator  gRPC {status.coordinator_grpc}   OpenAI http://{status.coordinator_http}/v1"
    )
    width = max((len(node.name) for node in status.nodes), default=4)
    for node in status.nodes:
        faults = f"  [{', '.join(node.faults)}]" if node.faults else ""
        print(
            f"  {node.name:<{width}}  {node.state:<8} {node.address or '-':<21} "
            f"site {node.site}{faults}"
        )
    for note in status.notes:
        print(f"  note: {note}")


@_fails
def _compose(args: argparse.Namespace) -> int:
    from mesh.sim.compose import render_compose

    topology = pathlib.Path(args.topology).absolute()
    if args.output:
        output = pathlib.Path(args.output)
        text = render_compose(topology, output.absolute().parent)
        output.write_text(text, encoding="utf-8")
        print(f"wrote {output}", file=sys.stderr)
    else:
        sys.stdout.write(render_compose(topology, pathlib.Path.cwd()))
    return 0


@_fails
def _up(args: argparse.Namespace) -> int:
    status = _backend(args).up(
        pathlib.Path(args.topology), progress=_progress, timeout_s=args.timeout
    )
    _print_status(status, as_json=args.json)
    return 0


@_fails
def _status(args: argparse.Namespace) -> int:
    _print_status(_backend(args).status(pathlib.Path(args.topology)), as_json=args.json)
    return 0


@_fails
def _down(args: argparse.Namespace) -> int:
    for line in _backend(args).down(pathlib.Path(args.topology), progress=_progress):
        print(line)
    return 0


@_fails
def _fault(args: argparse.Namespace) -> int:
    print(_backend(args).fault(pathlib.Path(args.topology), args.target, args.action, args.value))
    return 0


@_fails
def _run(args: argparse.Namespace) -> int:
    from mesh.sim.report import render_text, to_json
    from mesh.sim.runner import run_scenario
    from mesh.sim.scenario import load_scenario

    scenario = load_scenario(pathlib.Path(args.scenario))
    backend = _backend(args)
    topology = pathlib.Path(scenario.topology_path)
    try:
        # `up` of a mesh that is up already says so and returns.
        backend.up(topology, progress=_progress, timeout_s=args.timeout)
        report = run_scenario(scenario, backend, progress=_progress)
        # The report first: a `down` that fails afterwards must not lose it.
        print(render_text(report), flush=True)
        if args.json:
            text = json.dumps(to_json(report), indent=2)
            pathlib.Path(args.json).write_text(text, encoding="utf-8")
            print(f"report written to {args.json}", file=sys.stderr)
    finally:
        if not args.keep:
            _down_quietly(backend, topology)
    return 0


def _down_quietly(backend, topology: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    """`down` after a run; its own failure is reported without hiding the run's."""
    try:
        for line in backend.down(topology, progress=_progress):
            _progress(line)
    except MeshError as error:
        _progress(error_line(error) + f"\n(then: mesh sim down {topology})")


@_fails
def _images(args: argparse.Namespace) -> int:
    from mesh.sim.engine import ensure_engine
    from mesh.sim.images import ensure_images

    ensure_engine(_progress)
    images = ensure_images(progress=_progress, rebuild=args.rebuild)
    print(f"node image        {images.node}")
    print(f"coordinator image {images.coordinator}")
    return 0


@_fails
def _engine(args: argparse.Namespace) -> int:
    from mesh.sim import engine

    if args.engine_action == "start":
        engine.ensure_engine(_progress)
    elif args.engine_action == "stop":
        engine.stop_engine(_progress)
    reason = engine.engine_skip_reason()
    env = engine.docker_env()
    print(f"DOCKER_HOST={env.get('DOCKER_HOST', '(default)')}" if reason is None else reason)
    return 0
