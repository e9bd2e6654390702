"""`mesh coordinator start`: the coordinator (Ray Serve app) in the foreground."""

from __future__ import annotations

import argparse
import pathlib
import signal
import sys
import threading
from typing import TYPE_CHECKING

from mesh.cli._common import EXIT_ERROR
from mesh.core.channels import format_address
from mesh.core.errors import MeshError

if TYPE_CHECKING:
    from mesh.coordinator.runner import RunningCoordinator
    from mesh.topology import Topology

DEFAULT_ENDPOINT = "127.0.0.1:9000"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("coordinator", help="run the coordinator (Ray Serve)")
    actions = parser.add_subparsers(dest="coordinator_command", metavar="ACTION")
    start = actions.add_parser(
        "start", help="start or join Ray, deploy the coordinator, serve until SIGINT/SIGTERM"
    )
    start.add_argument("--topology", metavar="FILE", help="topology YAML (default: one device)")
    start.add_argument(
        "--node",
        action="append",
        default=[],
        metavar="ADDRESS",
        help="a node's host:port, added to the topology's and mDNS's (repeatable)",
    )
    start.add_argument(
        "--host",
        help="address the HTTP proxy and the fast path listen on (default 127.0.0.1; "
        "a local Ray then binds loopback too). Ray Serve's gRPC proxy (and each Serve "
        "replica's internal gRPC port) listens on ALL interfaces whatever --host says (Serve "
        "2.60 has no host setting for it): firewall --grpc-port, or use the fast path",
    )
    start.add_argument(
        "--grpc-port",
        type=_port,
        help="Ray Serve gRPC proxy port, on all interfaces (default 9000)",
    )
    start.add_argument("--http-port", type=_port, help="OpenAI-compatible HTTP port (default 8000)")
    start.add_argument(
        "--fast-port",
        type=_port,
        help="direct MeshService port of the dispatcher (default: any free)",
    )
    start.add_argument(
        "--no-fast-path",
        action="store_true",
        help="serve MeshService only through Ray Serve's proxy",
    )
    start.add_argument(
        "--http-fast-port",
        type=_port,
        help="direct OpenAI API port of the dispatcher, no Ray hop (default: any free)",
    )
    start.add_argument(
        "--no-http-fast-path",
        action="store_true",
        help="serve the OpenAI API only through Ray Serve's HTTP proxy",
    )
    start.add_argument("--replicas", type=int, help="dispatcher replicas (default: topology's)")
    discovery = start.add_mutually_exclusive_group()
    discovery.add_argument("--no-mdns", action="store_true", help="static nodes only")
    discovery.add_argument(
        "--mdns-only",
        action="store_true",
        help="ignore the topology's node addresses and find every node by mDNS, even if the "
        "topology says `mdns: false` (simulations, where nodes get addresses of their own; "
        "--node addresses are still added)",
    )
    start.add_argument("--ray-address", help="join this Ray cluster instead of starting one")
    start.add_argument("--num-cpus", type=float, help="CPUs of a locally started Ray")
    start.add_argument(
        "--trace-sample-ratio",
        type=float,
        help="share of tasks traced when the caller sends no sampled traceparent, 0..1 "
        "(default 1: every task; `mesh trace TASK_ID` shows one)",
    )
    start.add_argument(
        "--otlp-endpoint", help="also export spans over OTLP/gRPC, e.g. http://127.0.0.1:4317"
    )
    start.add_argument(
        "--cluster-dir",
        metavar="DIR",
        help="the cluster's directory (mesh/cluster): the ingress then requires an API key "
        "from its keys.json (`mesh keys create`) on every request",
    )
    start.add_argument(
        "--no-cluster",
        action="store_true",
        help="an open mesh even if the default cluster dir holds a cluster (as `mesh demo`)",
    )
    start.add_argument(
        "--join-port",
        type=_port,
        help="the port nodes join and renew their certificates on, with a cluster "
        "(default 9100; on --host)",
    )
    start.add_argument(
        "--insecure",
        action="store_true",
        help="acknowledge that a coordinator listening beyond loopback without a cluster "
        "can be used by anyone on the network (silences the warning)",
    )
    start.set_defaults(func=_start)
    parser.set_defaults(func=lambda _args: parser.print_help() or 2)


def _port(text: str) -> int:
    """A TCP port for argparse: 0 (any free one) to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0..65535 (0: any free port), got {port}")
    return port


def _one_line(error: BaseException) -> str:
    """An error as one line for `error: ...` (a pydantic error lists each field)."""
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        return "; ".join(
            f"{'.'.join(str(part) for part in e['loc']) or 'settings'}: {e['msg']}"
            for e in error.errors()
        )
    return " ".join(str(error).split()) or type(error).__name__


def _start_errors() -> tuple[type[BaseException], ...]:
    """What starting can raise that is the user's or the machine's problem, not a bug: bad
    settings, Ray or Serve failing to start (ports taken, no cluster at --ray-address), or the
    app not answering in time."""
    from pydantic import ValidationError
    from ray.exceptions import RayError
    from ray.serve.exceptions import RayServeException

    return (
        MeshError,
        ValidationError,
        RayError,
        RayServeException,
        OSError,
        RuntimeError,
        ValueError,
        TimeoutError,
    )


def _config(args: argparse.Namespace) -> object:
    from mesh.coordinator.settings import CoordinatorConfig
    from mesh.topology import default_topology, load_topology

    if args.topology:
        topology = load_topology(args.topology)
        if args.mdns_only:
            topology = without_static_addresses(topology)
    else:
        topology = default_topology()
        if args.node:  # nodes named on the command line replace the default local one
            topology = topology.model_copy(update={"nodes": ()})
    config = CoordinatorConfig.from_topology(
        topology,
        nodes=tuple(args.node),
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        fast_port=args.fast_port,
        replicas=args.replicas,
        ray_address=args.ray_address,
        num_cpus=args.num_cpus,
        mdns=False if args.no_mdns else True if args.mdns_only else None,
        fast_path=False if args.no_fast_path else None,
        http_fast_port=args.http_fast_port,
        http_fast_path=False if args.no_http_fast_path else None,
        # Absolute: the dispatcher replicas read it from Ray's worker processes.
        cluster_dir=_cluster_dir(args),
        join_port=args.join_port,
    )
    tracing = {
        key: value
        for key, value in (
            ("trace_sample_ratio", args.trace_sample_ratio),
            ("otlp_endpoint", args.otlp_endpoint),
        )
        if value is not None
    }
    if not tracing:
        return config
    dispatcher = config.dispatcher.model_validate({**config.dispatcher.model_dump(), **tracing})
    return config.model_copy(update={"dispatcher": dispatcher})


def without_static_addresses(topology: Topology) -> Topology:
    """`topology` with no node's static `address`: every node is then found by mDNS (under
    the topology's cluster name), as `--mdns-only` asks."""
    nodes = tuple(node.model_copy(update={"address": None}) for node in topology.nodes)
    return topology.model_copy(update={"nodes": nodes})


def _cluster_dir(args: argparse.Namespace) -> str | None:
    """--cluster-dir, else the default cluster dir once `mesh cluster init` made it; None
    with --no-cluster. Absolute: the dispatcher replicas read it from Ray's workers."""
    from mesh.cluster import default_cluster_dir, is_initialized

    if args.no_cluster:
        return None
    if args.cluster_dir:
        return str(pathlib.Path(args.cluster_dir).resolve())
    default = default_cluster_dir()
    return str(default.resolve()) if is_initialized(default) else None


def security_lines(config: object, insecure: bool) -> list[str]:
    """What the coordinator says about its trust at start (stderr)."""
    from mesh.coordinator.runner import is_loopback
    from mesh.coordinator.settings import CoordinatorConfig

    assert isinstance(config, CoordinatorConfig)
    if config.cluster_dir:
        return [
            f"cluster dir {config.cluster_dir}: nodes over mTLS only, API keys required at the "
            f"ingress; nodes join at {format_address(config.host, config.join_port)}"
        ]
    if insecure or is_loopback(config.host):
        return []
    return [
        f"WARNING: the coordinator listens on {config.host} without a cluster: anyone on the "
        "network can submit tasks and its nodes take anyone's. Secure it (`mesh cluster "
        "init`, then start again), listen on 127.0.0.1, or pass --insecure to acknowledge this."
    ]


def ready_line(running: RunningCoordinator) -> str:
    """The one line printed once the coordinator serves (mesh.local_processes parses it)."""
    fast = ", ".join(running.fast_paths) or "off"
    http_fast = ", ".join(running.http_fast_paths) or "off"
    return (
        f"coordinator ready: grpc {running.grpc_address} (Ray Serve, all interfaces) "
        f"fast path {fast} http {running.openai_base_url} (OpenAI API) "
        f"http fast path {http_fast}"
    )


def _start(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from mesh.coordinator.runner import (
        prepare_ray_environment,
        start_coordinator,
        stop_coordinator,
    )

    stop = threading.Event()

    def on_signal(_signum: int, _frame: object) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        config = _config(args)
    except (MeshError, ValidationError, OSError) as error:  # bad flags or topology file
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return EXIT_ERROR
    for line in security_lines(config, args.insecure):
        print(line, file=sys.stderr, flush=True)
    prepare_ray_environment(config)  # type: ignore[arg-type]  # before Ray is imported
    errors = _start_errors()
    try:
        running = start_coordinator(config)  # type: ignore[arg-type]
        for sig in (signal.SIGINT, signal.SIGTERM):  # ray.init installed its own: ours again
            signal.signal(sig, on_signal)
        print(ready_line(running), flush=True)
        while not stop.wait(0.5):
            pass
        print("coordinator stopping: shutting down Serve and Ray", file=sys.stderr, flush=True)
    except errors as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        try:
            stop_coordinator()
        except errors as error:  # a half-started Ray: say so, do not hide the first error
            print(f"error: while stopping: {_one_line(error)}", file=sys.stderr)
    return 0
