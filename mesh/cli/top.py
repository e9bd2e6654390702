"""`mesh top`: the coordinator's nodes and recent tasks, live in the terminal (rich).

Reads the dashboard feed of the coordinator's HTTP app (mesh/observe/dashboard_api.py):
`/dashboard/events` (server-sent events) live, `/dashboard/api/state` once with `--once`.
Every value in the feed that a node or a caller chose (names, labels, models, errors) is
escaped with `printable` and drawn as plain text, never as rich markup.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

from mesh.cli._common import (
    EXIT_ERROR,
    EXIT_USAGE,
    add_api_key_argument,
    api_key_of,
    auth_headers,
    print_json,
)
from mesh.core.errors import UnavailableError
from mesh.core.untrusted import printable

if TYPE_CHECKING:
    import httpx
    from rich.console import Console, RenderableType
    from rich.table import Table
    from rich.text import Text

DEFAULT_HTTP = "127.0.0.1:8000"
STATE_PATH = "/dashboard/api/state"
EVENTS_PATH = "/dashboard/events"
REQUEST_TIMEOUT_S = 5.0  # each step of a request: connect, write, read (--once), pool
STREAM_READ_TIMEOUT_S = 10.0  # the feed sends every 0.5 s: silence this long is a lost stream
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 5.0
_CELL_CHARS = 40
_ERROR_CHARS = 60
_NODE_STYLES = {"ready": "green", "joining": "yellow", "suspect": "yellow", "gone": "red"}
_TASK_STYLES = {"done": "green", "running": "yellow", "failed": "red"}


class FeedError(UnavailableError):
    """The address answered, but not with a coordinator's dashboard feed."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "top", help="the coordinator's nodes and recent tasks, live in the terminal"
    )
    parser.add_argument(
        "--http",
        default=DEFAULT_HTTP,
        type=base_url,
        metavar="HOST:PORT|URL",
        help=f"the coordinator's HTTP address (default {DEFAULT_HTTP})",
    )
    parser.add_argument(
        "--interval-s",
        type=_positive_seconds,
        default=1.0,
        metavar="SECONDS",
        help="redraw at most this often (default 1.0)",
    )
    parser.add_argument("--once", action="store_true", help="print one frame and exit")
    parser.add_argument("--json", action="store_true", help="with --once: print the state JSON")
    add_api_key_argument(parser)
    parser.set_defaults(func=_top)


def base_url(text: str) -> str:
    """`host:port` or a URL as the base URL of the coordinator's HTTP app, without a final /."""
    text = text.strip()
    if not text:
        raise argparse.ArgumentTypeError("empty address")
    url = text if "://" in text else f"http://{text}"
    if not url.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"not an http(s) address: {text!r}")
    return url.rstrip("/")


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < seconds <= 3600:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 3600, got {seconds}")
    return seconds


def backoff_s(failures: int) -> float:
    """The wait before reconnecting after `failures` failures in a row (1, 2, ...)."""
    return min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** max(0, min(failures - 1, 16)))


# --- the feed -----------------------------------------------------------------------------------


def checked_state(value: object) -> dict[str, Any]:
    """`value` if it has the feed's shape ({"nodes": [...], "tasks": [...]} of objects)."""
    if not isinstance(value, dict):
        raise FeedError("the answer is not a JSON object")
    for key in ("nodes", "tasks"):
        items = value.get(key)
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            raise FeedError(f"the answer has no list of {key}")
    return value


def parse_state(text: str) -> dict[str, Any]:
    try:
        return checked_state(json.loads(text))
    except json.JSONDecodeError as error:
        raise FeedError(f"the answer is not JSON ({error.msg})") from None


def sse_data(lines: Iterable[str]) -> Iterator[str]:
    """The data of each server-sent event in `lines` (data lines joined by newlines)."""
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
            data = []
        elif line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
        # Comments (":...") and the other fields (event, id, retry) carry nothing for us.


def _reason(error: BaseException) -> str:
    return printable(" ".join(str(error).split()) or type(error).__name__, 200)


def refused(path: str, response: httpx.Response) -> FeedError:
    """The error for an answer other than 200: its status, and the coordinator's reason when
    it gives one (an API key missing, wrong or over its limit; when to retry)."""
    try:
        response.read()
        message = response.json().get("error", {}).get("message", "")
    except (ValueError, AttributeError):  # not JSON, or not OpenAI's error shape
        message = ""
    retry = response.headers.get("retry-after", "")
    reason = f": {printable(str(message), 200)}" if message else ""
    if retry.isdigit():
        reason += f" (retry after {retry} s)"
    return FeedError(f"{path} answered HTTP {response.status_code}{reason}")


def fetch_state(url: str, api_key: str | None = None) -> dict[str, Any]:
    """The state once. httpx.HTTPError when the address cannot be reached, FeedError when it
    answers with something else than the feed."""
    import httpx

    response = httpx.get(url + STATE_PATH, timeout=REQUEST_TIMEOUT_S, headers=auth_headers(api_key))
    if response.status_code != 200:
        raise refused(STATE_PATH, response)
    return parse_state(response.text)


def stream_states(client: httpx.Client, url: str) -> Iterator[dict[str, Any]]:
    """Each state the coordinator sends on `/dashboard/events`, until the stream ends."""
    with client.stream("GET", url + EVENTS_PATH) as response:
        if response.status_code != 200:
            raise refused(EVENTS_PATH, response)
        for data in sse_data(response.iter_lines()):
            yield parse_state(data)


# --- drawing ------------------------------------------------------------------------------------


def _text(value: object, limit: int = _CELL_CHARS, style: str = "") -> Text:
    """A table cell: the value escaped and cut, as plain Text (brackets are not markup)."""
    from rich.text import Text

    return Text(printable("" if value is None else str(value), limit), style=style)


def _joined(values: object) -> Text:
    items = values if isinstance(values, list) else []
    return _text(", ".join(str(item) for item in items))


def _label(node: dict[str, Any], key: str) -> Text:
    labels = node.get("labels")
    return _text(labels.get(key, "") if isinstance(labels, dict) else "")


def _nodes_table(nodes: list[dict[str, Any]]) -> Table:
    from rich.table import Table

    table = Table(title="Nodes", title_justify="left", expand=False)
    for column in ("NAME", "STATE", "SITE", "TIER", "MODELS", "AGENTS"):
        table.add_column(column)
    for column in ("IN FLIGHT", "TOK/S"):
        table.add_column(column, justify="right")
    table.add_column("COOLING")
    for node in nodes:
        state = str(node.get("state", ""))
        speed = node.get("tokens_per_s")
        table.add_row(
            _text(node.get("name")),
            _text(state, 16, _NODE_STYLES.get(state, "")),
            _label(node, "site"),
            _label(node, "tier"),
            _joined(node.get("models")),
            _joined(node.get("agents")),
            _text(f"{node.get('in_flight', 0)}/{node.get('max_concurrent', 0)}"),
            _text("-" if speed is None else speed),
            _text("yes" if node.get("cooling_down") else "", style="yellow"),
        )
    return table


def _tasks_table(tasks: list[dict[str, Any]]) -> Table:
    from rich.table import Table

    table = Table(title="Recent tasks", title_justify="left", expand=False)
    for column in ("TASK", "STATE", "AGENT", "NODE"):
        table.add_column(column)
    for column in ("ATTEMPTS", "FAILOVERS", "STEPS"):
        table.add_column(column, justify="right")
    table.add_column("TIER")
    table.add_column("TOKENS", justify="right")
    table.add_column("ERROR", max_width=_ERROR_CHARS)
    for task in tasks:
        state = str(task.get("state", ""))
        table.add_row(
            _text(task.get("task_id"), 64),
            _text(state, 16, _TASK_STYLES.get(state, "")),
            _text(task.get("agent")),
            _text(task.get("node")),
            _text(task.get("attempts", 0)),
            _text(task.get("failovers", 0)),
            _text(task.get("steps", 0)),
            _text(task.get("tier")),
            _text(task.get("tokens", 0)),
            _text(task.get("error"), _ERROR_CHARS, "red"),
        )
    return table


def _header(
    nodes: list[dict[str, Any]], *, url: str, now: datetime | float, notice: str | None
) -> Text:
    from rich.text import Text

    counts: dict[str, int] = {}
    for node in nodes:
        state = printable(str(node.get("state", "")), 16)
        counts[state] = counts.get(state, 0) + 1
    when = now if isinstance(now, datetime) else datetime.fromtimestamp(now)
    header = Text()
    header.append("mesh top ", style="bold")
    header.append(printable(url, 200))
    header.append(f"  {len(nodes)} node{'' if len(nodes) == 1 else 's'}")
    for index, (state, count) in enumerate(sorted(counts.items())):
        header.append(f"{', ' if index else ': '}{count} ")
        header.append(state, style=_NODE_STYLES.get(state, ""))
    header.append(f"  updated {when:%H:%M:%S}")
    if notice:
        header.append(f"\n{printable(notice, 300)}", style="bold red")
    return header


def render(
    state: dict[str, Any],
    *,
    url: str,
    now: datetime | float,
    notice: str | None = None,
    task_rows: int | None = None,
) -> RenderableType:
    """One frame: a header (URL, nodes by state, time of the last update, `notice` such as a
    lost connection), the nodes and the newest `task_rows` tasks (None: all)."""
    from rich.console import Group

    nodes = [n for n in state.get("nodes", []) if isinstance(n, dict)]
    tasks = [t for t in state.get("tasks", []) if isinstance(t, dict)]
    if task_rows is not None:
        tasks = tasks[: max(0, task_rows)]
    return Group(
        _header(nodes, url=url, now=now, notice=notice),
        _nodes_table(nodes),
        _tasks_table(tasks),
    )


# --- the command --------------------------------------------------------------------------------


def _console() -> Console:
    from rich.console import Console

    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=160)  # a pipe or a file: wide enough for both tables
    return console


def _top(args: argparse.Namespace) -> int:
    if args.json and not args.once:
        print("mesh top: --json needs --once", file=sys.stderr)
        return EXIT_USAGE
    if args.once:
        return _once(args.http, as_json=args.json, api_key=api_key_of(args))
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how one leaves `top`
        _watch(args.http, args.interval_s, _console(), api_key=api_key_of(args))
    return 0


def _once(url: str, *, as_json: bool, api_key: str | None = None) -> int:
    import httpx

    try:
        state = fetch_state(url, api_key)
    except httpx.HTTPError as error:
        print(f"mesh top: cannot reach {printable(url, 200)}: {_reason(error)}", file=sys.stderr)
        return EXIT_ERROR
    except FeedError as error:
        print(f"mesh top: {printable(url, 200)}: {_reason(error)}", file=sys.stderr)
        return EXIT_ERROR
    if as_json:
        print_json(state)
    else:
        _console().print(render(state, url=url, now=time.time()))
    return 0


def _watch(url: str, interval_s: float, console: Console, *, api_key: str | None = None) -> None:
    """Draw each state from the event stream, at most every `interval_s`; on a lost stream
    keep the last state, say so and reconnect after a growing wait. Ends on Ctrl-C only."""
    import httpx
    from rich.live import Live

    state: dict[str, Any] = {"nodes": [], "tasks": []}
    updated = time.time()
    failures = 0

    def draw(live: Live, notice: str | None = None) -> None:
        rows = console.size.height - len(state["nodes"]) - 14  # header and two tables: 14 lines
        frame = render(state, url=url, now=updated, notice=notice, task_rows=max(3, rows))
        live.update(frame, refresh=True)

    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, read=STREAM_READ_TIMEOUT_S)
    headers = auth_headers(api_key)
    with (
        httpx.Client(timeout=timeout, headers=headers) as client,
        Live(console=console, auto_refresh=False) as live,
    ):
        draw(live, f"connecting to {url}")
        while True:
            drawn = -math.inf  # the first state after (re)connecting: at once
            try:
                for received in stream_states(client, url):
                    state, updated, failures = received, time.time(), 0
                    if time.monotonic() - drawn >= interval_s:
                        draw(live)
                        drawn = time.monotonic()
                problem = "connection lost: the coordinator ended the stream"
            except (httpx.ConnectError, httpx.ConnectTimeout) as error:
                problem = f"cannot reach {url}: {_reason(error)}"
            except httpx.HTTPError as error:  # a read timeout, a broken stream
                problem = f"connection lost: {_reason(error)}"
            except FeedError as error:
                problem = f"{url}: {_reason(error)}"
            failures += 1
            wait_s = backoff_s(failures)
            draw(live, f"{problem}; retrying in {wait_s:.1f} s")
            time.sleep(wait_s)
            draw(live, f"reconnecting to {url}")
