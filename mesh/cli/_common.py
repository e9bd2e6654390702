"""Helpers shared by the CLI subcommands: error reporting and JSON output."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

from mesh.core.errors import MeshError
from mesh.core.untrusted import printable

T = TypeVar("T")

EXIT_ERROR = 1
EXIT_USAGE = 2


def run_async(make: Callable[[], Awaitable[T]]) -> T | int:
    """Run a coroutine; a MeshError becomes one line on stderr and exit code 1."""
    try:
        return asyncio.run(make())  # type: ignore[arg-type]
    except MeshError as error:
        # The message may quote a peer's text: escaped, line by line.
        lines = [printable(line) for line in str(error).split("\n")]
        print("error: " + "\n".join(lines), file=sys.stderr)
        return EXIT_ERROR


def message_to_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def print_json(value: Any) -> None:
    if isinstance(value, Message):
        value = message_to_dict(value)
    print(json.dumps(value, indent=2, sort_keys=False))
