"""`mesh discover`: the nodes on the LAN (mDNS), verified over gRPC, with hardware, models, load."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from typing import Any

from mesh.cli._common import run_async
from mesh.core.untrusted import printable
from mesh.nodes_view import NodeState, NodeView

_STATE_ORDER = {NodeState.READY: 0, NodeState.JOINING: 1, NodeState.SUSPECT: 2, NodeState.GONE: 3}
_DEFAULT_HEALTH_INTERVAL_S = 1.0  # mesh.node_table.RegistryTimings.health_interval_s
_CELL_CHARS = 80  # longest cell printed (names, ids, model lists)


def positive_seconds(text: str) -> float:
    """argparse type: a finite number of seconds greater than zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "discover", help="list the nodes seen on the LAN (mDNS), or watch them come and go"
    )
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        default=None,
        help="seconds to listen (default 3; with --watch: until interrupted)",
    )
    parser.add_argument(
        "--watch", action="store_true", help="print join/leave events as they happen"
    )
    parser.add_argument(
        "--json", action="store_true", help="print JSON (one object per line with --watch)"
    )
    parser.add_argument(
        "--interface", metavar="IP", help="listen on the interface with this address only"
    )
    parser.add_argument("--cluster", help="only nodes of this cluster (default: every cluster)")
    parser.add_argument(
        "--node",
        action="append",
        default=[],
        metavar="ADDRESS",
        help="also check a node at this host:port (repeatable)",
    )
    parser.add_argument(
        "--health-interval",
        type=positive_seconds,
        default=_DEFAULT_HEALTH_INTERVAL_S,
        metavar="S",
        help=f"seconds between load refreshes of ready nodes (default {_DEFAULT_HEALTH_INTERVAL_S:g})",
    )
    parser.set_defaults(func=_discover)


def _discover(args: argparse.Namespace) -> int:
    result = run_async(lambda: _run(args))
    return result if isinstance(result, int) else 0


async def _run(args: argparse.Namespace) -> int:
    from mesh.discovery.browser import MdnsBrowser
    from mesh.node_table import RegistryTimings
    from mesh.registry import NodeRegistry

    registry = NodeRegistry(
        cluster=args.cluster,
        timings=RegistryTimings(health_interval_s=args.health_interval),
        static_addresses=args.node,
        browser=MdnsBrowser(interface_ip=args.interface),
    )
    timeout_s = args.timeout if args.timeout is not None else (None if args.watch else 3.0)
    async with registry:
        if args.watch:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    async for event in registry.events():
                        _print_event(event.kind, event.reason, event.view, as_json=args.json)
            return 0
        await asyncio.sleep(timeout_s or 3.0)
        views = sorted(registry.snapshot(), key=lambda v: (_STATE_ORDER[v.state], v.name))
    if args.json:
        print(json.dumps([_view_dict(v) for v in views], indent=2))
    else:
        print(format_table(views) if views else "no nodes found")
    return 0


def _view_dict(view: NodeView) -> dict[str, Any]:
    return view.model_dump(mode="json", exclude={"state_since_s", "last_seen_s"})


def _print_event(kind: str, reason: str, view: NodeView, *, as_json: bool) -> None:
    if as_json:
        line = json.dumps({"event": str(kind), "reason": reason, "node": _view_dict(view)})
    else:
        line = (
            f"{kind:<8} {printable(view.name, _CELL_CHARS)} ({printable(view.node_id, _CELL_CHARS)}) "
            f"at {printable(view.address, _CELL_CHARS)}: {printable(reason, 200)}"
        )
    print(line, flush=True)


def format_table(views: list[NodeView]) -> str:
    header = ("NAME", "NODE ID", "ADDRESS", "STATE", "LOAD", "CORES", "RAM", "ACCEL", "MODELS")
    rows: list[tuple[str, ...]] = [header]
    for v in views:
        load = f"{v.in_flight}/{v.max_concurrent}" + (f"+{v.queued}q" if v.queued else "")
        rows.append(
            (
                v.name,
                v.node_id,
                v.address,
                str(v.state),
                load,
                str(v.cores or "?"),
                f"{v.memory_total_bytes / 1e9:.1f}G" if v.memory_total_bytes else "?",
                ",".join(v.accelerators) or "-",
                ",".join(v.models) or "-",
            )
        )
    # Every cell comes from a node (TXT record or Describe): control and bidi characters escaped.
    rows = [tuple(printable(cell, _CELL_CHARS) for cell in row) for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )
