"""API keys for the coordinator's ingress, kept hashed in `<cluster dir>/keys.json`.

    store = KeyStore(cluster_dir)
    record, secret = store.create("kiosk-12", rpm=60, agents=("customer-service",))
    print(secret)                    # emk_<id>_<secret>: shown this once, never stored
    store.revoke("kiosk-12")

    ring = KeyRing(cluster_dir / KEYS)   # the ingress's view, reloaded when the file changes
    key = ring.verify(secret)            # the key's record, or UnauthenticatedError

A key is `emk_` + a 12-hex-digit id + `_` + 64 hex digits (32 random bytes). The file holds its
id, name and the SHA-256 of the whole key (a fast hash is enough for a secret of 256 random
bits; compared with `hmac.compare_digest`), never the key. Names are unique for good, revoked
keys included, so that a name in a log or an audit line always means one key.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import pathlib
import re
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Annotated

from pydantic import Field, ValidationError

from mesh.cluster import KEYS, write_private
from mesh.core.errors import ConfigError, InvalidRequestError, NotFoundError, UnauthenticatedError
from mesh.core.model import FrozenModel

logger = logging.getLogger("mesh.cluster")

KEY_PREFIX = "emk_"
_ID_HEX = 12
_SECRET_BYTES = 32
_KEY_PATTERN = re.compile(rf"{KEY_PREFIX}([0-9a-f]{{{_ID_HEX}}})_([0-9a-f]{{{2 * _SECRET_BYTES}}})")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_SUBJECT_CHARS = 256
MAX_SCOPE_ITEMS = 256
CHECK_EVERY_S = 0.5  # how often the ring looks whether the file changed
_LOCK = ".keys.lock"


class ApiKey(FrozenModel):
    """One key as keys.json keeps it: everything but the key itself."""

    id: Annotated[str, Field(pattern=rf"^[0-9a-f]{{{_ID_HEX}}}$")]
    name: Annotated[str, Field(pattern=NAME_PATTERN.pattern)]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    rpm: Annotated[int, Field(ge=1)] | None = None  # requests per minute; None: no limit
    tpm: Annotated[int, Field(ge=1)] | None = None  # tokens per minute; None: no limit
    agents: tuple[str, ...] = ()  # the only agents it may run; (): any
    models: tuple[str, ...] = ()  # the only models it may use; (): any
    subject: Annotated[str, Field(max_length=MAX_SUBJECT_CHARS)] = ""
    created_unix: float
    revoked_unix: float | None = None  # when it was revoked; None: it is valid

    @property
    def revoked(self) -> bool:
        return self.revoked_unix is not None


class KeyFile(FrozenModel):
    version: int = 1
    keys: tuple[ApiKey, ...] = ()


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id_of(key: str) -> str | None:
    """The id part of a well-formed key, None for anything else."""
    match = _KEY_PATTERN.fullmatch(key)
    return match.group(1) if match else None


def read_key_file(path: pathlib.Path) -> KeyFile:
    """The keys in `path`; none when it does not exist; ConfigError when it is not a key file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return KeyFile()
    try:
        return KeyFile.model_validate(json.loads(data))
    except (ValueError, ValidationError) as error:  # JSONDecodeError is a ValueError
        first = error.errors()[0] if isinstance(error, ValidationError) else None
        where = ".".join(str(part) for part in first["loc"]) + ": " if first else ""
        what = first["msg"] if first else str(error)
        raise ConfigError(f"{path}: {where}{what}") from None


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidRequestError(
            f"a key's name is 1 to 64 letters, digits, '.', '_' or '-' (starting with a letter "
            f"or digit), got {name[:80]!r}"
        )
    return name


def _scope(kind: str, names: Sequence[str]) -> tuple[str, ...]:
    cleaned = tuple(dict.fromkeys(name.strip() for name in names if name.strip()))
    if len(cleaned) > MAX_SCOPE_ITEMS:
        raise InvalidRequestError(f"at most {MAX_SCOPE_ITEMS} {kind} per key")
    return cleaned


class KeyStore:
    """keys.json in a cluster directory: create, list and revoke (the CLI's side)."""

    def __init__(self, directory: pathlib.Path, *, clock: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self.path = directory / KEYS
        self._clock = clock

    @contextlib.contextmanager
    def _locked(self) -> Iterator[KeyFile]:
        """The file's keys, with the directory's key lock held: one writer at a time."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        descriptor = os.open(self.directory / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield read_key_file(self.path)
        finally:
            os.close(descriptor)  # releases the lock

    def _write(self, keys: Sequence[ApiKey]) -> None:
        body = KeyFile(keys=tuple(keys)).model_dump_json(indent=2) + "\n"
        write_private(self.path, body.encode())

    def create(
        self,
        name: str,
        *,
        rpm: int | None = None,
        tpm: int | None = None,
        agents: Sequence[str] = (),
        models: Sequence[str] = (),
        subject: str = "",
    ) -> tuple[ApiKey, str]:
        """A new key: its record, and the key itself, which nothing keeps (show it once)."""
        check_name(name)
        with self._locked() as current:
            if any(key.name == name for key in current.keys):
                raise InvalidRequestError(
                    f"a key named {name!r} exists (or existed: names are never reused)"
                )
            taken = {key.id for key in current.keys}
            while (key_id := secrets.token_hex(_ID_HEX // 2)) in taken:
                continue
            secret = f"{KEY_PREFIX}{key_id}_{secrets.token_hex(_SECRET_BYTES)}"
            try:
                record = ApiKey(
                    id=key_id,
                    name=name,
                    sha256=hash_key(secret),
                    rpm=rpm,
                    tpm=tpm,
                    agents=_scope("agents", agents),
                    models=_scope("models", models),
                    subject=subject,
                    created_unix=self._clock(),
                )
            except ValidationError as error:
                first = error.errors()[0]
                where = ".".join(str(part) for part in first["loc"])
                raise InvalidRequestError(f"{where}: {first['msg']}") from None
            self._write([*current.keys, record])
        return record, secret

    def list(self) -> list[ApiKey]:
        return list(read_key_file(self.path).keys)

    def revoke(self, name: str) -> ApiKey:
        """Revoke the key named `name` (NotFoundError: none); revoking twice changes nothing."""
        with self._locked() as current:
            found = [key for key in current.keys if key.name == name]
            if not found:
                raise NotFoundError(f"no key named {name[:80]!r} in {self.path}")
            if found[0].revoked:
                return found[0]
            revoked = found[0].model_copy(update={"revoked_unix": self._clock()})
            self._write([revoked if key.name == name else key for key in current.keys])
        return revoked


class KeyRing:
    """The ingress's view of keys.json: verifies presented keys, and reads the file again when
    it changed (looked at most every `check_every_s`), so a revocation holds within a second
    on a running coordinator. A file that turns unreadable keeps the last good keys."""

    def __init__(
        self,
        path: pathlib.Path,
        *,
        check_every_s: float = CHECK_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._check_every_s = check_every_s
        self._clock = clock
        self._checked_at = -float("inf")
        self._stamp: tuple[int, int, int] | None = None
        self._by_id: dict[str, ApiKey] = {}
        self._by_name: dict[str, ApiKey] = {}
        self._refresh()

    def __len__(self) -> int:
        return sum(not key.revoked for key in self._by_id.values())

    def _refresh(self) -> None:
        """Read the file again if its inode, size or mtime changed since the last read. A stat
        and, rarely, a read of a small local file: cheap enough for the event loop."""
        now = self._clock()
        if now - self._checked_at < self._check_every_s:
            return
        self._checked_at = now
        try:
            info = self.path.stat()
            stamp: tuple[int, int, int] | None = (info.st_ino, info.st_size, info.st_mtime_ns)
        except FileNotFoundError:
            stamp = None
        if stamp == self._stamp:
            return
        try:
            keys = read_key_file(self.path).keys
        except (ConfigError, OSError) as error:
            logger.warning("keeping the API keys read before: %s", error)
            return
        self._stamp = stamp
        self._by_id = {key.id: key for key in keys}
        self._by_name = {key.name: key for key in keys}

    def verify(self, presented: str) -> ApiKey:
        """The valid key `presented` is; UnauthenticatedError for a key that is malformed,
        unknown, wrong or revoked. The error never quotes what was presented."""
        self._refresh()
        key_id = key_id_of(presented)
        known = self._by_id.get(key_id) if key_id is not None else None
        if known is None or not hmac.compare_digest(hash_key(presented), known.sha256):
            raise UnauthenticatedError("the API key is not valid")
        if known.revoked:
            raise UnauthenticatedError(f"the API key {known.name!r} was revoked")
        return known

    def get(self, name: str) -> ApiKey | None:
        """The key named `name` as last read (revoked ones included), None when unknown."""
        self._refresh()
        return self._by_name.get(name)
