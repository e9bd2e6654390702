"""`mesh top`'s drawing, feed parsing and backoff, without sockets: frames rendered to text."""

from __future__ import annotations

import argparse
import io
from datetime import datetime

import pytest
from rich.console import Console

from mesh.cli.top import (
    MAX_BACKOFF_S,
    FeedError,
    backoff_s,
    base_url,
    parse_state,
    render,
    sse_data,
)

URL = "http://127.0.0.1:8000"
NOW = datetime(2026, 12, 2, 14, 5, 9)


def node(name: str, state: str, **fields: object) -> dict[str, object]:
    return {
        "name": name,
        "node_id": f"id-{name}",
        "address": "127.0.0.1:50051",
        "state": state,
        "labels": {"site": "store-042", "tier": "kiosk"},
        "models": ["smollm2"],
        "agents": ["support"],
        "in_flight": 1,
        "max_concurrent": 2,
        "cooling_down": False,
        "tokens_per_s": 42.5,
        **fields,
    }


def task(task_id: str, state: str, error: str = "") -> dict[str, object]:
    return {
        "task_id": task_id,
        "state": state,
        "agent": "support",
        "node": "kiosk-1",
        "attempts": 2 if error else 1,
        "failovers": 1 if error else 0,
        "steps": 3,
        "tier": "1",
        "tokens": 17,
        "error": error,
    }


STATE = {
    "nodes": [node("kiosk-1", "ready"), node("kiosk-2", "gone", tokens_per_s=None)],
    "tasks": [
        task("task-0001", "done"),
        task("task-0002", "failed", "every node failed: kiosk-2 unreachable after 3 s"),
    ],
}


def as_text(frame: object) -> str:
    console = Console(record=True, width=160, color_system=None)
    console.print(frame)
    return console.export_text()


def test_a_frame_lists_the_nodes_their_states_and_the_tasks_with_their_errors():
    text = as_text(render(STATE, url=URL, now=NOW))
    for expected in ("kiosk-1", "kiosk-2", "ready", "gone", "store-042", "smollm2", "1/2"):
        assert expected in text
    assert "task-0001" in text and "task-0002" in text and "failed" in text
    assert "every node failed" in text
    header = text.splitlines()[0]
    assert URL in header and "2 nodes: 1 gone, 1 ready" in header and "14:05:09" in header


def test_a_long_error_is_cut_and_a_task_limit_keeps_the_newest():
    long = dict(STATE, tasks=[task("task-0003", "failed", "x" * 500), *STATE["tasks"]])
    text = as_text(render(long, url=URL, now=NOW, task_rows=1))
    assert "task-0003" in text and "task-0001" not in text
    assert "x" * 200 not in text


def test_a_lost_connection_is_said_in_the_header():
    text = as_text(render(STATE, url=URL, now=NOW.timestamp(), notice="connection lost (refused)"))
    assert "connection lost (refused)" in text.splitlines()[1]
    assert "kiosk-1" in text  # the last state stays on screen


def test_hostile_names_are_shown_escaped_never_interpreted():
    hostile = {
        "nodes": [node("\x1b[31mevil[bold]x[/bold]\u202e", "[red]ready")],
        "tasks": [task("[link=http://x]t[/link]", "failed", "\x1b[2Jcleared")],
    }
    screen = io.StringIO()  # what a colour terminal would receive, escapes and all
    Console(file=screen, width=160, force_terminal=True).print(render(hostile, url=URL, now=NOW))
    raw = screen.getvalue()
    assert "\\x1b[31mevil[bold]x[/bold]\\u202e" in raw
    assert "[red]ready" in raw and "[link=http://x]t[/link]" in raw
    assert "\\x1b[2Jcleared" in raw
    assert "\x1b[31mevil" not in raw and "\x1b[2J" not in raw and "\u202e" not in raw
    assert "\x1b]8;" not in raw  # no hyperlink from [link=...]


def test_the_feed_is_read_from_server_sent_events():
    lines = [": comment", 'data: {"nodes": [], ', 'data: "tasks": []}', "", "data:{}", ""]
    events = list(sse_data(lines))
    assert events == ['{"nodes": [], \n"tasks": []}', "{}"]
    assert parse_state(events[0]) == {"nodes": [], "tasks": []}


@pytest.mark.parametrize(
    "text", ["<html>", "[]", '{"nodes": []}', '{"nodes": [1], "tasks": []}', "{}"]
)
def test_an_answer_that_is_not_the_feed_is_a_feed_error(text):
    with pytest.raises(FeedError):
        parse_state(text)


def test_reconnecting_backs_off_up_to_a_bound():
    waits = [backoff_s(n) for n in range(1, 40)]
    assert waits[0] == 0.5 and waits == sorted(waits)
    assert max(waits) == MAX_BACKOFF_S


@pytest.mark.parametrize(
    ("given", "url"),
    [
        ("127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("http://coord:8000/", "http://coord:8000"),
        ("https://coord", "https://coord"),
    ],
)
def test_an_address_becomes_a_base_url(given, url):
    assert base_url(given) == url


@pytest.mark.parametrize("given", ["", "ftp://coord:21"])
def test_a_bad_address_is_a_usage_error(given):
    with pytest.raises(argparse.ArgumentTypeError):
        base_url(given)
