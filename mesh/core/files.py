"""Files that hold secrets (keys, tokens, certificates): written whole, durably, owner only."""

from __future__ import annotations

import os
import pathlib


def write_private(path: pathlib.Path, data: bytes) -> None:
    """Write `data` to `path` readable by its owner only (0600; a new directory 0700),
    atomically and durably: a temporary file, fsync, then a rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(descriptor, data)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.chmod(temporary, 0o600)
    os.replace(temporary, path)
