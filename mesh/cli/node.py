"""`mesh node start` and `mesh node describe`."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import TYPE_CHECKING

from mesh.cli._common import EXIT_ERROR, message_to_dict, print_json, run_async
from mesh.core.channels import PLAINTEXT, ChannelSecurity
from mesh.core.errors import ConfigError, MeshError

if TYPE_CHECKING:
    from nodes.config import NodeConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    node = subparsers.add_parser("node", help="run or inspect a node daemon")
    actions = node.add_subparsers(dest="node_command", metavar="ACTION")

    start = actions.add_parser("start", help="start a node daemon in the foreground")
    start.add_argument("--config", help="node config YAML file")
    start.add_argument(
        "--topology",
        metavar="FILE",
        help="run the node as this topology declares it (with --node): name, cluster, port, "
        "labels, capacity, threads, models, agents; other flags override it",
    )
    start.add_argument("--node", metavar="NAME", help="which node of --topology this one is")
    start.add_argument(
        "--stand-ins",
        action="store_true",
        default=None,
        help="with a topology: serve the bundled smollm2 for a model whose file is missing, "
        "and leave out an agent's tool this node does not have (each logged as `stand-in:`); "
        "without it those are errors",
    )
    start.add_argument("--name", help="node name (default: host name)")
    start.add_argument("--cluster", help="mesh the node joins (default: 'default')")
    start.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    start.add_argument("--port", type=int, help="port to listen on (default 50051; 0: any free)")
    start.add_argument("--model", help="model alias (e.g. smollm2) or path to a .gguf file")
    start.add_argument("--n-threads", type=int, help="inference threads per model")
    start.add_argument("--max-concurrent", type=int, help="requests run at once")
    start.add_argument("--max-queued", type=int, help="requests waiting beyond that")
    start.add_argument("--state-dir", help="where the node keeps its id")
    start.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a label for routing constraints (repeatable)",
    )
    start.add_argument(
        "--router",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="serve the bundled ONNX intent router for Classify and `--agent auto` "
        "(on unless the config says `router: null`; --no-router saves ~40 MB)",
    )
    start.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus /metrics on this port of 127.0.0.1 (0: any free port; logged)",
    )
    start.add_argument(
        "--trace-sample-ratio",
        type=float,
        help="share of traces that begin here to record, 0..1 (default 1; a sampled "
        "traceparent from the coordinator is always followed)",
    )
    start.add_argument(
        "--otlp-endpoint", help="also export spans over OTLP/gRPC, e.g. http://127.0.0.1:4317"
    )
    start.add_argument("--no-advertise", action="store_true", help="do not announce on mDNS")
    start.add_argument("--interface", help="IP of the interface to advertise on")
    start.add_argument(
        "--join",
        metavar="TOKEN",
        default=os.environ.get("MESH_JOIN_TOKEN") or None,
        help="join a cluster with this token from `mesh cluster token` (also $MESH_JOIN_TOKEN; "
        "once: the certificate is kept in the state dir)",
    )
    start.add_argument(
        "--join-file", metavar="FILE", help="read the join token from FILE (mode 600)"
    )
    start.add_argument(
        "--coordinator",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="the coordinator's join port (default: found on mDNS; port 9100 by default)",
    )
    start.add_argument(
        "--insecure",
        action="store_true",
        help="acknowledge that a node listening beyond loopback without a cluster can be "
        "used by anyone on the network (silences the warning)",
    )
    start.set_defaults(func=_start)

    describe = actions.add_parser("describe", help="show a node's identity, hardware, models, load")
    describe.add_argument("address", help="host:port of the node")
    describe.add_argument("--json", action="store_true", help="print JSON")
    describe.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    describe.add_argument(
        "--task-counts",
        action="store_true",
        help="also show what the node did per recent task id (runs started and completed, "
        "side-effecting tool executions)",
    )
    describe.add_argument(
        "--cluster-dir",
        metavar="DIR",
        help="reach a cluster's node over mTLS with the operator's certificate from DIR "
        "(default: the default cluster dir, if `mesh cluster init` made one)",
    )
    describe.set_defaults(func=_describe)
    node.set_defaults(func=lambda _args: node.print_help() or 2)


def _labels(pairs: list[str]) -> dict[str, str] | None:
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--label {pair!r}: expected KEY=VALUE")
        labels[key] = value
    return labels or None


def _start(args: argparse.Namespace) -> int:
    from nodes.daemon import NodeDaemon, run_daemon

    try:
        config = node_config_from_args(args)
        daemon = NodeDaemon(config, announcer_factory=_announcer_factory())
        return asyncio.run(run_daemon(daemon))
    except MeshError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR


def node_config_from_args(args: argparse.Namespace) -> NodeConfig:
    """The node's config: a topology's node entry (--topology/--node, or the config file's
    `topology`/`topology_node`), then the config file, then the flags; ConfigError if wrong."""
    from mesh.topology.node_config import node_config_values
    from nodes.config import default_router_config, load_node_config, model_config_from_flag

    models = None
    if args.model:
        models = (model_config_from_flag(args.model, n_threads=args.n_threads),)
    config = load_node_config(
        args.config,
        from_topology=node_config_values,
        topology=args.topology,
        topology_node=args.node,
        stand_ins=args.stand_ins,
        name=args.name,
        cluster=args.cluster,
        host=args.host,
        port=args.port,
        models=models,
        max_concurrent=args.max_concurrent,
        max_queued=args.max_queued,
        state_dir=args.state_dir,
        labels=_labels(args.label),
        advertise=False if args.no_advertise else None,
        interface=args.interface,
        metrics_port=args.metrics_port,
        trace_sample_ratio=args.trace_sample_ratio,
        otlp_endpoint=args.otlp_endpoint,
        router=default_router_config() if args.router else None,
        join_token=args.join,
        join_token_file=args.join_file,
        coordinator=tuple(args.coordinator) or None,
        insecure=True if args.insecure else None,
    )
    if args.router is False:
        config = config.model_copy(update={"router": None})
    if args.n_threads and not args.model:
        config = config.model_copy(
            update={
                "models": tuple(
                    m.model_copy(update={"n_threads": args.n_threads}) for m in config.models
                )
            }
        )
    return config


def _announcer_factory():  # type: ignore[no-untyped-def]
    try:
        from nodes.announcer import daemon_announcer
    except ImportError:  # the announcer needs zeroconf; without it the node runs unannounced
        return None
    return daemon_announcer


def _operator_security(cluster_dir: str | None) -> ChannelSecurity:
    """The operator's (admin) credentials of the cluster in `cluster_dir` (or the default
    cluster dir when it holds one); plaintext without a cluster."""
    import pathlib

    from mesh.cluster import default_cluster_dir, is_initialized
    from mesh.core.pki import MEMBER_NAME, ROLE_ADMIN

    directory = pathlib.Path(cluster_dir) if cluster_dir else default_cluster_dir()
    if not is_initialized(directory):
        if cluster_dir:
            raise ConfigError(f"{directory} holds no cluster (`mesh cluster init`)")
        return PLAINTEXT
    from mesh.cluster.authority import ClusterAuthority

    return ClusterAuthority(directory).security(ROLE_ADMIN).expecting(MEMBER_NAME)


def _describe(args: argparse.Namespace) -> int:
    from mesh.client import NodeClient

    try:
        security = _operator_security(args.cluster_dir)
    except MeshError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR

    async def describe():  # type: ignore[no-untyped-def]
        async with NodeClient(args.address, security=security) as client:
            return await client.describe(timeout_s=args.timeout, task_counts=args.task_counts)

    result = run_async(describe)
    if isinstance(result, int):
        return result
    if args.json:
        print_json(result)
        return 0
    print(format_description(message_to_dict(result)))
    return 0


def format_description(d: dict) -> str:  # type: ignore[type-arg]
    node, load, cap = d["node"], d["load"], d["capacity"]
    hw = d.get("hardware")
    gib = 1024**3
    lines = [
        f"node      {node['name']} ({node['node_id']}), cluster {node['cluster']}, "
        f"version {node['version']}",
    ]
    if hw is None:  # the node is still starting
        lines.append("hardware  (still probing)")
    else:
        lines += [
            f"hardware  {hw['cpu_model']}, {hw['physical_cores']} cores "
            f"({hw['logical_cores']} threads), {hw['architecture']}, "
            f"{int(hw['memory_total_bytes']) / gib:.1f} GiB RAM "
            f"({int(hw['memory_available_bytes']) / gib:.1f} free), {hw['os']}",
            f"gpus      {', '.join(g['name'] for g in hw['gpus']) or 'none'}",
            f"onnx      {', '.join(hw['onnx_providers']) or 'not installed'}",
        ]
    lines += [
        f"load      {load['in_flight']} running, {load['queued']} queued "
        f"(capacity {cap['max_concurrent']} + {cap['max_queued']} queued), "
        f"cpu {load['cpu_percent']:.0f}%, memory {load['memory_percent']:.0f}%, "
        f"{load['completed']} done, {load['rejected']} refused",
        "models",
    ]
    for m in d["models"]:
        state = m["state"].removeprefix("MODEL_STATE_").lower()
        default = " (default)" if m["is_default"] else ""
        lines.append(
            f"  {m['model_id']}{default}: {state}, {m['backend']}, {m['family']} "
            f"{m['quantization']}, {int(m['size_bytes']) / 1e6:.1f} MB, "
            f"context {m['context_length']}" + (f", error: {m['error']}" if m["error"] else "")
        )
    counts = d.get("task_counts", [])
    if counts or int(d.get("task_counts_evicted", 0)):
        lines.append(
            f"tasks     {len(counts)} kept, {d['task_counts_evicted']} older ones dropped "
            "(generations / agent runs started-completed, side-effecting tools)"
        )
    for c in counts:
        tools = ", ".join(f"{name} x{n}" for name, n in sorted(c["side_effect_tool_runs"].items()))
        lines.append(
            f"  {c['task_id']}: {c['generations_started']}-{c['generations_completed']} / "
            f"{c['agent_runs_started']}-{c['agent_runs_completed']}"
            + (f", {tools}" if tools else "")
        )
    return "\n".join(lines)
