"""Values that come from callers and peers: echoed short in errors, escaped for a terminal.

Anyone on the LAN can send a node or the coordinator a request, and announce a node over mDNS,
so names, labels and TXT values are attacker-chosen text:

    quoted(name)         a name as an error message echoes it: its repr, cut at `MAX_ECHO_CHARS`
                         ("'aaaa'... (10240 characters)"), never the whole 10 KB
    printable(text)      text as the CLI prints it: control, format (bidi overrides, zero-width)
                         and separator characters escaped (`\\u202e`), so a node name cannot
                         rewrite the terminal or reorder a table
    check_seed(seed)     a sampling seed within the wire type's range, or a clear error
"""

from __future__ import annotations

import unicodedata

from mesh.core.errors import InvalidRequestError

MAX_ECHO_CHARS = 64
SEED_MIN = 0
SEED_MAX = 2**32 - 1  # Sampling.seed is a uint32 on the wire
# Cc control, Cf format (bidi overrides and isolates, zero-width joiners, BOM), Cs surrogates,
# Co private use, Zl/Zp line and paragraph separators.
_UNPRINTABLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Zl", "Zp"})


def quoted(value: object, limit: int = MAX_ECHO_CHARS) -> str:
    """`value` as an error message names it: its repr when that is short, else the repr of its
    first `limit` characters and how long it really is."""
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}... ({len(value)} characters)"
    if isinstance(value, int) and value.bit_length() > 4 * limit:  # repr() of a huge int raises
        return f"a {value.bit_length()}-bit integer"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def printable(text: str, limit: int | None = None) -> str:
    """`text` with every unprintable character escaped (`\\x1b`, `\\u202e`); cut at `limit`
    characters (None: whole) with "..." after."""
    if limit is not None and len(text) > limit:
        text = text[: max(0, limit - 3)] + "..."
    if text.isprintable():  # the common case: nothing to escape
        return text
    return "".join(_escape(ch) for ch in text)


def _escape(ch: str) -> str:
    if unicodedata.category(ch) not in _UNPRINTABLE_CATEGORIES:
        return ch
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def check_seed(seed: object, name: str = "seed") -> None:
    """InvalidRequestError unless `seed` is None (random) or an integer SEED_MIN..SEED_MAX."""
    if seed is None:
        return
    if isinstance(seed, int) and not isinstance(seed, bool) and SEED_MIN <= seed <= SEED_MAX:
        return
    got = (
        f"a {seed.bit_length()}-bit integer"
        if isinstance(seed, int) and seed.bit_length() > 64
        else quoted(seed)
    )
    raise InvalidRequestError(f"{name} must be an integer from {SEED_MIN} to {SEED_MAX}, got {got}")
