"""`mesh audit`: the coordinator's summary or a node's per-step log, filtered by time, agent,
key and subject, as a table or JSON lines; a torn last line is skipped, a missing log said."""

from __future__ import annotations

import datetime
import json

import pytest

from mesh.cli import main
from mesh.cli.audit import parse_since, select
from mesh.cluster import AUDIT

pytestmark = pytest.mark.unit

NOW = datetime.datetime(2026, 1, 5, 12, 0, tzinfo=datetime.UTC)


def summary(task_id: str, time: str, agent: str = "customer-service", **fields) -> dict:
    record = {
        "time": time,
        "task_id": task_id,
        "key_name": "kiosk-7",
        "subject": "ana@example.com",
        "agent": agent,
        "outcome": "ok",
        "finish_reason": "answer",
        "error": "",
        "steps": 2,
        "tools": ["create_ticket"],
        "side_effecting_tools": ["create_ticket"],
        "nodes": ["node-a"],
        "attempts": 1,
        "tier": "smollm2",
        "duration_ms": 812.4,
    }
    return record | fields


@pytest.fixture
def cluster_dir(tmp_path):
    records = [
        summary("t-old", "2026-01-04T09:00:00.000Z"),
        summary("t-sched", "2026-01-05T11:00:00.000Z", agent="scheduling", key_name="shop-2"),
        summary(
            "t-bob",
            "2026-01-05T11:30:00.000Z",
            subject="bob@example.com",
            outcome="failed",
            error="unavailable",
        ),
        summary("t-new", "2026-01-05T11:50:00.000Z", subject="\x1b[31mred"),
    ]
    text = "".join(json.dumps(r) + "\n" for r in records) + '{"time": "2026-01-05T11:5'
    (tmp_path / AUDIT).write_text(text)  # the last line torn: its writer died mid-line
    return tmp_path


def lines_of(capsys) -> list[str]:
    return capsys.readouterr().out.splitlines()


def test_since_takes_a_duration_or_an_iso_time():
    assert parse_since("1h", NOW) == NOW - datetime.timedelta(hours=1)
    assert parse_since("30m", NOW) == NOW - datetime.timedelta(minutes=30)
    assert parse_since("2d", NOW) == NOW - datetime.timedelta(days=2)
    assert parse_since("2026-01-05T10:00:00Z", NOW) == NOW - datetime.timedelta(hours=2)
    assert parse_since("2026-01-05T10:00:00", NOW).tzinfo == datetime.UTC
    with pytest.raises(ValueError):
        parse_since("yesterday", NOW)


def test_filters_keep_matching_lines_oldest_first_and_the_last_n():
    records = [
        summary("a", "2026-01-05T10:00:00Z"),
        summary("b", "2026-01-05T11:00:00Z", agent="scheduling"),
        summary("c", "2026-01-05T11:30:00Z", subject="Bob@Example.com"),
        {"time": "not a time", "task_id": "d"},
    ]
    since = NOW - datetime.timedelta(hours=1, minutes=30)

    def ids(**filters):
        return [r["task_id"] for r in select(records, **filters)]

    assert ids() == ["a", "b", "c", "d"]
    assert ids(since=since) == ["b", "c"]  # a line without a readable time is not "since"
    assert ids(agent="customer-service") == ["a", "c"]
    assert ids(subject="bob@example.com") == ["c"]
    assert ids(key="kiosk-7", limit=2) == ["b", "c"]


def test_the_summary_table_from_the_cluster_dir_skips_a_torn_line(cluster_dir, capsys):
    assert main(["audit", "--cluster-dir", str(cluster_dir)]) == 0
    header, *rows, footnote = lines_of(capsys)
    assert footnote == "* has side effects"
    assert header.split()[:6] == ["TIME", "TASK", "KEY", "SUBJECT", "AGENT", "OUTCOME"]
    assert [row.split()[1] for row in rows] == ["t-old", "t-sched", "t-bob", "t-new"]
    assert "failed unavailable" in rows[2]
    assert "create_ticket*" in rows[0] and "node-a" in rows[0]  # * : side effects
    assert "\x1b" not in "".join(rows) and "\\x1b[31mred" in rows[3]  # escaped, never raw


def test_filters_on_the_command_line_and_json_lines(cluster_dir, capsys):
    assert (
        main(
            [
                "audit",
                "--cluster-dir",
                str(cluster_dir),
                "--since",
                "2026-01-05T10:00:00Z",
                "--agent",
                "customer-service",
                "--json",
            ]
        )
        == 0
    )
    printed = [json.loads(line) for line in lines_of(capsys)]
    assert [r["task_id"] for r in printed] == ["t-bob", "t-new"]
    assert printed[0] == summary(
        "t-bob",
        "2026-01-05T11:30:00.000Z",
        subject="bob@example.com",
        outcome="failed",
        error="unavailable",
    )
    assert main(["audit", "--log", str(cluster_dir / AUDIT), "--limit", "1", "--json"]) == 0
    assert [json.loads(line)["task_id"] for line in lines_of(capsys)] == ["t-new"]
    assert main(["audit", "--cluster-dir", str(cluster_dir), "--key", "shop-2", "--json"]) == 0
    assert [json.loads(line)["task_id"] for line in lines_of(capsys)] == ["t-sched"]


def test_a_nodes_per_step_log_by_its_state_dir(tmp_path, capsys):
    steps = [
        {
            "time": "2026-01-05T11:00:00.000Z",
            "task_id": "t-1",
            "attempt": 1,
            "node_id": "n1",
            "agent": "customer-service",
            "step": 0,
            "kind": "tool_call",
            "tool": "create_ticket",
            "side_effecting": True,
            "outcome": "ok",
            "key_name": "kiosk-7",
            "subject": "ana@example.com",
            "model": "smollm2",
        },
        {
            "time": "2026-01-05T11:00:01.000Z",
            "task_id": "t-1",
            "attempt": 1,
            "node_id": "n1",
            "agent": "customer-service",
            "step": 1,
            "kind": "final",
            "tool": "",
            "side_effecting": False,
            "outcome": "ok",
            "key_name": "kiosk-7",
            "subject": "ana@example.com",
            "model": "smollm2",
        },
    ]
    (tmp_path / "audit.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    assert main(["audit", "--state-dir", str(tmp_path)]) == 0
    header, first, second, _footnote = lines_of(capsys)
    assert header.split()[:6] == ["TIME", "TASK", "STEP", "KIND", "TOOL", "OUTCOME"]
    assert first.split()[1:6] == ["t-1", "0", "tool_call", "create_ticket*", "ok"]
    assert second.split()[2:5] == ["1", "final", "-"]
    assert main(["audit", "--node-log", str(tmp_path / "audit.jsonl"), "--json"]) == 0
    assert [json.loads(line) for line in lines_of(capsys)] == steps


def test_a_missing_log_or_a_bad_since_is_said_plainly(tmp_path, capsys):
    assert main(["audit", "--cluster-dir", str(tmp_path / "none")]) == 1
    assert "no audit log at" in capsys.readouterr().err
    assert main(["audit", "--cluster-dir", str(tmp_path), "--since", "soon"]) == 2
    assert "give 30m, 1h, 2d or an ISO time" in capsys.readouterr().err
