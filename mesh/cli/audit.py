"""`mesh audit`: read the audit logs, the coordinator's summary (a line per agent task) or a
node's (a line per agent step), filtered by time, agent, key or subject.

    $ mesh audit --since 1h --agent customer-service
    TIME                     TASK                   KEY          SUBJECT              AGENT              OUTCOME          STEPS TOOLS                    NODES
    2026-01-05T10:12:04.101Z task-9da079f103374869  kiosk-7      ana@example.com      customer-service   ok                   2 order_status             node-a
    2026-01-05T10:14:40.533Z task-1c2e44aa01b2c3d4  kiosk-7      ana@example.com      customer-service   failed unavailable     2 create_ticket*           node-a,node-b
    * has side effects

    $ mesh audit --state-dir ~/.local/state/edge-agent-mesh/nodes/node-a --json

The files are 0600: run it as the user the coordinator (or node) runs as. A line cut short
by a writer that died mid-line is skipped. Everything shown is escaped: the logs hold names
that callers and nodes chose.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import pathlib
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from mesh.cli._common import EXIT_ERROR, EXIT_USAGE
from mesh.cluster import AUDIT, default_cluster_dir
from mesh.core.audit import AUDIT_FILE, read_records
from mesh.core.untrusted import printable

DEFAULT_LIMIT = 50
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "audit", help="read the audit log: who ran which agent and tools, and how it ended"
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--cluster-dir",
        metavar="DIR",
        help=f"the coordinator's cluster directory, whose {AUDIT} is read "
        f"(default {default_cluster_dir()})",
    )
    source.add_argument(
        "--state-dir", metavar="DIR", help=f"a node's state directory: read its {AUDIT_FILE}"
    )
    source.add_argument(
        "--node-log", metavar="PATH", help="a node's audit log file (a line per agent step)"
    )
    source.add_argument(
        "--log",
        metavar="PATH",
        help="the coordinator's audit log file, where it is not the default",
    )
    parser.add_argument(
        "--since", metavar="WHEN", help="only lines from this on: 30m, 1h, 2d, or an ISO time"
    )
    parser.add_argument("--agent", metavar="NAME", help="only this agent's tasks")
    parser.add_argument("--key", metavar="NAME", help="only tasks asked with this API key's name")
    parser.add_argument("--subject", metavar="WHO", help="only tasks asked for this subject")
    parser.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_LIMIT,
        metavar="N",
        help=f"the N most recent matching lines (default {DEFAULT_LIMIT}; 0: all)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON lines as stored")
    parser.set_defaults(func=_audit)


# ---------------------------------------------------------------------- filters (pure)


def parse_since(text: str, now: datetime.datetime) -> datetime.datetime:
    """`30m`, `1h`, `2d` before `now`, or an ISO 8601 time (UTC when it names no zone);
    ValueError otherwise."""
    match = _DURATION.match(text.strip())
    if match:
        return now - datetime.timedelta(seconds=float(match[1]) * _UNIT_S[match[2]])
    when = datetime.datetime.fromisoformat(text.strip())
    return when if when.tzinfo is not None else when.replace(tzinfo=datetime.UTC)


def _time_of(record: Mapping[str, Any]) -> datetime.datetime | None:
    value = record.get("time")
    if not isinstance(value, str):
        return None
    try:
        when = datetime.datetime.fromisoformat(value)
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=datetime.UTC)


def select(
    records: Iterable[Mapping[str, Any]],
    *,
    since: datetime.datetime | None = None,
    agent: str | None = None,
    key: str | None = None,
    subject: str | None = None,
    limit: int = 0,
) -> list[Mapping[str, Any]]:
    """The records that match every filter given, oldest first; the last `limit` (0: all)."""
    kept: collections.deque[Mapping[str, Any]] = collections.deque(maxlen=limit or None)
    for record in records:
        if since is not None:
            when = _time_of(record)
            if when is None or when < since:
                continue
        if agent is not None and record.get("agent") != agent:
            continue
        if key is not None and record.get("key_name") != key:
            continue
        if subject is not None and str(record.get("subject", "")).lower() != subject.lower():
            continue
        kept.append(record)
    return list(kept)


# ---------------------------------------------------------------------- tables


def _text(record: Mapping[str, Any], field: str, limit: int) -> str:
    value = record.get(field, "")
    return printable(str(value) if value not in (None, "") else "-", limit)


def _names(value: object, marked: Iterable[str] = ()) -> str:
    """A list of names, those in `marked` (side-effecting tools) with a `*`."""
    if not isinstance(value, list) or not value:
        return "-"
    starred = set(marked)
    return ",".join(printable(str(v), 40) + ("*" if v in starred else "") for v in value)


def task_lines(records: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    """The coordinator's summary, one row per task."""
    yield (
        f"{'TIME':<24} {'TASK':<22} {'KEY':<12} {'SUBJECT':<20} {'AGENT':<18} "
        f"{'OUTCOME':<16} {'STEPS':>5} {'TOOLS':<24} NODES"
    )
    for r in records:
        outcome = _text(r, "outcome", 9) + (f" {_text(r, 'error', 16)}" if r.get("error") else "")
        marked = r.get("side_effecting_tools")
        tools = _names(r.get("tools"), marked if isinstance(marked, list) else ())
        yield (
            f"{_text(r, 'time', 24):<24} {_text(r, 'task_id', 22):<22} "
            f"{_text(r, 'key_name', 12):<12} {_text(r, 'subject', 20):<20} "
            f"{_text(r, 'agent', 18):<18} {outcome:<16} {_text(r, 'steps', 5):>5} "
            f"{tools:<24} {_names(r.get('nodes'))}"
        )


def step_lines(records: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    """A node's log, one row per step."""
    yield (
        f"{'TIME':<24} {'TASK':<22} {'STEP':>4} {'KIND':<9} {'TOOL':<20} {'OUTCOME':<12} "
        f"{'KEY':<12} {'SUBJECT':<20} AGENT"
    )
    for r in records:
        tool = _text(r, "tool", 19) + ("*" if r.get("side_effecting") else "")
        yield (
            f"{_text(r, 'time', 24):<24} {_text(r, 'task_id', 22):<22} {_text(r, 'step', 4):>4} "
            f"{_text(r, 'kind', 9):<9} {tool:<20} {_text(r, 'outcome', 12):<12} "
            f"{_text(r, 'key_name', 12):<12} {_text(r, 'subject', 20):<20} {_text(r, 'agent', 32)}"
        )


# ---------------------------------------------------------------------- the command


def log_path(args: argparse.Namespace) -> tuple[pathlib.Path, bool]:
    """(the file to read, whether it is a node's per-step log)."""
    if args.node_log:
        return pathlib.Path(args.node_log), True
    if args.state_dir:
        return pathlib.Path(args.state_dir) / AUDIT_FILE, True
    if args.log:
        return pathlib.Path(args.log), False
    directory = pathlib.Path(args.cluster_dir) if args.cluster_dir else default_cluster_dir()
    return directory / AUDIT, False


def _audit(args: argparse.Namespace) -> int:
    if args.limit < 0:
        print("mesh audit: --limit must be 0 (all) or more", file=sys.stderr)
        return EXIT_USAGE
    since = None
    if args.since:
        try:
            since = parse_since(args.since, datetime.datetime.now(datetime.UTC))
        except ValueError:
            print(
                f"mesh audit: --since {printable(args.since, 64)}: give 30m, 1h, 2d or an "
                "ISO time such as 2026-01-05T10:00:00Z",
                file=sys.stderr,
            )
            return EXIT_USAGE
    path, per_step = log_path(args)
    try:
        records = select(
            read_records(path),
            since=since,
            agent=args.agent,
            key=args.key,
            subject=args.subject,
            limit=args.limit,
        )
    except FileNotFoundError:
        print(
            f"mesh audit: no audit log at {path} (a coordinator with a cluster directory or "
            "audit_log writes one; a node writes its own in its state directory)",
            file=sys.stderr,
        )
        return EXIT_ERROR
    except OSError as error:
        print(f"mesh audit: cannot read {path}: {error.strerror}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        for record in records:
            print(json.dumps(record))
        return 0
    for line in (step_lines if per_step else task_lines)(records):
        print(line)
    if any(r.get("side_effecting") or r.get("side_effecting_tools") for r in records):
        print("* has side effects")
    return 0
