"""Rewrite one section of a Markdown file, leaving every other section as it was."""

from __future__ import annotations

import pathlib


def _level(line: str) -> int:
    """The heading level of `line` (1 for '# x'), or 0 when it is not a heading."""
    stripped = line.rstrip()
    hashes = len(stripped) - len(stripped.lstrip("#"))
    if 0 < hashes <= 6 and stripped[hashes : hashes + 1] == " ":
        return hashes
    return 0


def replace_section(text: str, heading: str, body: str) -> str:
    """`text` with the section under `heading` (e.g. "### Accuracy") replaced by `body`.

    The section runs to the next heading of the same or a higher level. A missing
    section is appended at the end. `body` excludes the heading line itself.
    """
    level = _level(heading)
    if not level:
        raise ValueError(f"not a Markdown heading: {heading!r}")
    lines = text.splitlines()
    new_section = [heading, "", *body.strip("\n").splitlines(), ""]
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    if start is None:
        kept = lines[:]
        while kept and not kept[-1].strip():
            kept.pop()
        return (
            "\n".join([*kept, "", *new_section]).lstrip("\n") + "\n"
            if kept
            else "\n".join(new_section) + "\n"
        )
    end = next(
        (i for i in range(start + 1, len(lines)) if 0 < _level(lines[i]) <= level), len(lines)
    )
    return "\n".join([*lines[:start], *new_section, *lines[end:]]).rstrip("\n") + "\n"


def update_file_section(path: pathlib.Path, parents: list[str], heading: str, body: str) -> None:
    """Replace `heading`'s section in `path`, creating the file and any `parents` headings."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    for parent in parents:
        if not any(line.rstrip() == parent for line in text.splitlines()):
            text = replace_section(text, parent, "")
    # Insert a missing subsection right after its parent's own lines, not at the file's end.
    if parents and not any(line.rstrip() == heading for line in text.splitlines()):
        text = _insert_subsection(text, parents[-1], heading)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(replace_section(text, heading, body), encoding="utf-8")


def _insert_subsection(text: str, parent: str, heading: str) -> str:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.rstrip() == parent)
    level = _level(parent)
    end = next(
        (i for i in range(start + 1, len(lines)) if 0 < _level(lines[i]) <= level), len(lines)
    )
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    return "\n".join([*lines[:end], "", heading, "", *lines[end:]]) + "\n"
