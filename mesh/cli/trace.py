"""`mesh trace TASK_ID`: one task's spans as a tree with timings, from the coordinator's HTTP API.

    task  812.4 ms  [coordinator]  outcome=ok
      attempt  811.9 ms  [coordinator]  node=node-a outcome=ok
        node.agent  809.0 ms  [node node-a]  agent=customer-service outcome=ok
          agent.step  602.1 ms  [node node-a]  index=0 kind=tool_call
            tool.call  1.2 ms  [node node-a]  tool=order_status outcome=ok

The coordinator joins its own spans to those the task's nodes still keep (GET
/v1/mesh/traces/TASK_ID); `--json` prints that answer as it is.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import quote

from mesh.cli._common import (
    EXIT_ERROR,
    add_api_key_argument,
    api_key_of,
    auth_headers,
    print_json,
)
from mesh.cli.top import DEFAULT_HTTP, base_url
from mesh.core.untrusted import printable

_TIMEOUT_S = 10.0
_SHOWN_ATTRIBUTES = ("node", "agent", "model", "index", "kind", "tool", "attempt", "outcome")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("trace", help="show one task's trace: its spans with timings")
    parser.add_argument("task_id", help="the task's id (mesh submit --json shows it)")
    parser.add_argument(
        "--http",
        default=DEFAULT_HTTP,
        metavar="ADDRESS",
        help=f"the coordinator's HTTP address (default {DEFAULT_HTTP})",
    )
    parser.add_argument("--json", action="store_true", help="print the spans as JSON")
    add_api_key_argument(parser)
    parser.set_defaults(func=_trace)


def tree_lines(spans: Sequence[Mapping[str, Any]]) -> Iterator[str]:
    """One line per span, indented under its parent; spans whose parent is not among them
    (the caller's, or one a gone node took with it) start at the left."""
    ids = {span["span_id"] for span in spans}
    children: dict[str, list[Mapping[str, Any]]] = {}
    for span in sorted(spans, key=lambda s: s.get("start_unix_ns", 0)):
        parent = span["parent_id"] if span.get("parent_id") in ids else ""
        children.setdefault(parent, []).append(span)

    def walk(span: Mapping[str, Any], depth: int) -> Iterator[str]:
        attributes = span.get("attributes", {})
        shown = " ".join(
            f"{key}={printable(str(attributes[key]), 64)}"
            for key in _SHOWN_ATTRIBUTES
            if key in attributes
        )
        yield (
            f"{'  ' * depth}{printable(span['name'], 64)}  {span['duration_ms']:.1f} ms  "
            f"[{printable(span['process'], 64)}]" + (f"  {shown}" if shown else "")
        )
        for child in children.get(span["span_id"], ()):
            yield from walk(child, depth + 1)

    for root in children.get("", ()):
        yield from walk(root, 0)


def _trace(args: argparse.Namespace) -> int:
    import httpx

    url = f"{base_url(args.http)}/v1/mesh/traces/{quote(args.task_id, safe='')}"
    try:
        reply = httpx.get(url, timeout=_TIMEOUT_S, headers=auth_headers(api_key_of(args)))
    except httpx.HTTPError as error:
        print(f"mesh trace: cannot reach {url}: {printable(str(error), 200)}", file=sys.stderr)
        return EXIT_ERROR
    try:
        body = reply.json()
    except json.JSONDecodeError:
        body = {}
    if reply.status_code != 200:
        message = body.get("error", {}).get("message", "") if isinstance(body, dict) else ""
        retry = reply.headers.get("retry-after", "")
        print(
            f"mesh trace: {reply.status_code}: {printable(message or reply.text, 300)}"
            + (f" (retry after {retry} s)" if retry.isdigit() else ""),
            file=sys.stderr,
        )
        return EXIT_ERROR
    if args.json:
        print_json(body)
        return 0
    print(f"trace {printable(body['trace_id'], 32)} of task {printable(body['task_id'], 128)}")
    for line in tree_lines(body["spans"]):
        print(line)
    return 0
