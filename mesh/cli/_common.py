"""Helpers shared by the CLI subcommands: error reporting, JSON output, the API key."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

from mesh.core.errors import MeshError, RateLimitedError
from mesh.core.untrusted import printable

T = TypeVar("T")

EXIT_ERROR = 1
EXIT_USAGE = 2
API_KEY_ENV = "MESH_API_KEY"


def add_api_key_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        help=f"the coordinator's API key, when it requires one (default ${API_KEY_ENV}; the "
        "variable keeps the key out of the process list)",
    )


def api_key_of(args: argparse.Namespace) -> str | None:
    """--api-key, else $MESH_API_KEY, else None (an open mesh)."""
    return getattr(args, "api_key", None) or os.environ.get(API_KEY_ENV) or None


def auth_headers(api_key: str | None) -> dict[str, str]:
    """HTTP headers that carry `api_key` (none without one)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def retry_hint(seconds: float) -> str:
    return f" (retry after {max(1, math.ceil(seconds))} s)" if seconds > 0 else ""


def error_line(error: MeshError) -> str:
    """`error: ...` for a MeshError: the message escaped line by line (it may quote a peer's
    text), with when to retry for a rate limit."""
    lines = [printable(line) for line in str(error).split("\n")]
    text = "\n".join(lines)
    if isinstance(error, RateLimitedError) and "retry after" not in text:
        text += retry_hint(error.retry_after_s)
    return "error: " + text


def run_async(make: Callable[[], Awaitable[T]]) -> T | int:
    """Run a coroutine; a MeshError becomes one line on stderr and exit code 1."""
    try:
        return asyncio.run(make())  # type: ignore[arg-type]
    except MeshError as error:
        print(error_line(error), file=sys.stderr)
        return EXIT_ERROR


def message_to_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def print_json(value: Any) -> None:
    if isinstance(value, Message):
        value = message_to_dict(value)
    print(json.dumps(value, indent=2, sort_keys=False))
