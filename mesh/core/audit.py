"""Audit logs as files: JSON lines appended by nodes (a line per agent step, `nodes/audit.py`)
and by the coordinator (a line per agent task, `mesh/coordinator/audit.py`), read by
`mesh audit`.

They name people (a key's subject is often an email), so a log is created readable by its
owner only (0600). Each line is one `os.write` to a file opened for appending: on POSIX a
write under 4 KiB to such a file lands whole, even with several writers (dispatcher replicas
sharing one file), and the file is opened per line, so one rotated away is created again.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
from collections.abc import Iterator, Mapping

AUDIT_FILE = "audit.jsonl"  # its name in a node's state dir and in the cluster dir
MAX_LINE_BYTES = 4096  # a line at most this long is appended whole (PIPE_BUF on Linux)
MAX_FIELD_CHARS = 256  # bytes of each text field's JSON form: a line stays under the limit
_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)


def utc_now() -> str:
    """ISO 8601 UTC with milliseconds: `2026-01-05T10:12:03.512Z`."""
    now = datetime.datetime.now(datetime.UTC)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def clip(text: str, limit: int = MAX_FIELD_CHARS) -> str:
    """`text` cut so that its JSON form (escapes included, quotes not) is at most `limit`
    bytes: a line of a few clipped fields stays well under MAX_LINE_BYTES."""
    text = text[:limit]
    while (excess := len(json.dumps(text)) - 2 - limit) > 0:
        text = text[: len(text) - 1 - excess // 12]  # an escape is at most 12 bytes a char
    return text


def encode_line(record: Mapping[str, object]) -> bytes:
    """`record` as one JSON line; ValueError if it is MAX_LINE_BYTES or longer."""
    line = (json.dumps(record, separators=(", ", ": ")) + "\n").encode()
    if len(line) >= MAX_LINE_BYTES:
        raise ValueError(f"an audit line of {len(line)} bytes is over {MAX_LINE_BYTES}")
    return line


def append_line(path: pathlib.Path, line: bytes) -> None:
    """Append `line` (from `encode_line`) to `path`, created 0600, in one write. Blocking."""
    descriptor = os.open(path, _FLAGS, 0o600)
    try:
        os.write(descriptor, line)
    finally:
        os.close(descriptor)


def make_private(path: pathlib.Path) -> None:
    """Create `path` (and its directory) if missing, and make it readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, _FLAGS, 0o600))
    os.chmod(path, 0o600)  # an older file, or one made under a looser umask


def read_records(path: pathlib.Path) -> Iterator[dict[str, object]]:
    """The JSON objects of the log at `path`, oldest first. A line that is not a JSON object
    (a writer killed mid-line leaves a truncated last line) is skipped."""
    with open(path, "rb") as handle:
        for raw in handle:
            try:
                record = json.loads(raw)
            except ValueError:  # JSONDecodeError and UnicodeDecodeError: a torn line
                continue
            if isinstance(record, dict):
                yield record
