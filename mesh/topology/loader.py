"""Reading a topology file: every problem at once, each with its file, key path and line.

    load_topology("topologies/distributed-edge.yaml") -> Topology     # or raises ConfigError
    check_topology_text(text, source="x.yaml") -> (Topology | None, [TopologyProblem, ...])

A problem prints as `FILE: key.path[1].sub: message (line N)`. The YAML is composed into a node
tree first (PyYAML `compose`), which gives each key's line and lets duplicate keys be reported
(PyYAML itself keeps the last one silently); the data is then validated by the pydantic models
in `mesh.topology.model`, and cross-section references (`reference_problems`) are checked on the
raw data, so type errors and reference errors come out together. `ConfigError.fields["problems"]`
holds the problems as `TopologyProblem` models for callers that want structure (`--json`).
"""

from __future__ import annotations

import difflib
import os
import types
import typing
from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from mesh.core.errors import ConfigError
from mesh.core.model import FrozenModel
from mesh.topology.model import DEFAULT_MODEL_ALIAS, Topology
from mesh.topology.references import format_path, reference_problems

_Path = tuple[str | int, ...]
_LineIndex = dict[tuple[str, ...], tuple[int, int]]  # str(path parts) -> (line, column), 1-based


class TopologyProblem(FrozenModel):
    """One thing wrong with a topology file."""

    file: str
    path: str = ""  # e.g. "nodes[1].port"; "" for the file as a whole
    message: str
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        if self.line is None:
            at = ""
        elif self.column is None:
            at = f" (line {self.line})"
        else:
            at = f" (line {self.line}, column {self.column})"
        return f"{self.file}: {where}{self.message}{at}"


def load_topology(path: str | os.PathLike[str]) -> Topology:
    """Read and validate a topology file; ConfigError listing every problem otherwise."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        problem = TopologyProblem(file=source, message=f"cannot read: {reason}")
        raise ConfigError(str(problem), file=source, problems=(problem,)) from None
    return parse_topology(text, source=source)


def parse_topology(text: str, *, source: str = "<topology>") -> Topology:
    """Validate topology YAML given as text; `source` names it in messages."""
    topology, problems = check_topology_text(text, source=source)
    if topology is None:
        message = "\n".join(str(problem) for problem in problems)
        raise ConfigError(message, file=source, problems=tuple(problems))
    return topology


def check_topology_text(text: str, *, source: str) -> tuple[Topology | None, list[TopologyProblem]]:
    """(topology, []) when valid, else (None, every problem sorted by line)."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            message = "the file is empty; a topology needs at least `cluster: NAME`"
            return None, [TopologyProblem(file=source, message=message, line=1)]
        duplicates = duplicate_keys(root, ())
        data = loader.construct_document(root)
    except yaml.MarkedYAMLError as error:
        return None, [yaml_problem(source, error)]
    except yaml.YAMLError as error:  # unmarked: PyYAML gives no position
        return None, [TopologyProblem(file=source, message=f"YAML error: {error}")]
    finally:
        loader.dispose()
    lines = line_index(root)
    problems = [
        TopologyProblem(file=source, path=format_path(path), message=message, line=line)
        for path, message, line in duplicates
    ]
    if not isinstance(data, Mapping):
        message = f"the top level must be a mapping of keys to values (got {_describe(data)})"
        problems.append(_problem(source, (), message, lines))
        return None, problems
    problems.extend(
        _problem(source, p, m, lines)
        for p, m in reference_problems(data, default_models=(DEFAULT_MODEL_ALIAS,))
    )
    topology: Topology | None = None
    try:
        topology = Topology.model_validate(data)
    except ValidationError as error:
        problems.extend(_validation_problems(source, error, lines))
    if problems:
        unique = {(p.line or 0, p.path, p.message): p for p in problems}
        return None, [unique[key] for key in sorted(unique)]
    return topology, []


def yaml_problem(source: str, error: yaml.MarkedYAMLError) -> TopologyProblem:
    mark = error.problem_mark or error.context_mark
    problem = error.problem or "not valid YAML"
    if error.context and error.problem:
        problem = f"{error.context}: {error.problem}"
    return TopologyProblem(
        file=source,
        message=f"YAML syntax error: {problem}",
        line=mark.line + 1 if mark else None,
        column=mark.column + 1 if mark else None,
    )


def _problem(source: str, path: _Path, message: str, lines: _LineIndex) -> TopologyProblem:
    return TopologyProblem(
        file=source, path=format_path(path), message=message, line=line_of(path, lines)
    )


def duplicate_keys(node: yaml.Node, path: _Path) -> list[tuple[_Path, str, int]]:
    """(path, message, line) of keys repeated in one mapping, anywhere (merge keys `<<` excepted)."""
    found: list[tuple[_Path, str, int]] = []
    stack: list[tuple[yaml.Node, _Path, int]] = [(node, path, 0)]
    seen_nodes: set[int] = set()
    while stack:
        current, where, depth = stack.pop()
        if id(current) in seen_nodes or depth > 64:  # aliases share nodes; cycles are possible
            continue
        seen_nodes.add(id(current))
        if isinstance(current, yaml.MappingNode):
            first_line: dict[str, int] = {}
            for key_node, value_node in current.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(
                    key_node, yaml.ScalarNode
                ):
                    continue
                key, line = key_node.value, key_node.start_mark.line + 1
                if key in first_line:
                    message = f"duplicate key (first at line {first_line[key]})"
                    found.append(((*where, key), message, line))
                first_line.setdefault(key, line)
                stack.append((value_node, (*where, key), depth + 1))
        elif isinstance(current, yaml.SequenceNode):
            for index, item in enumerate(current.value):
                stack.append((item, (*where, index), depth + 1))
    return found


def line_index(root: yaml.Node) -> _LineIndex:
    """Every key path in the document -> the (line, column) of its key (or sequence item)."""
    index: _LineIndex = {(): (root.start_mark.line + 1, root.start_mark.column + 1)}
    stack: list[tuple[yaml.Node, tuple[str, ...], int]] = [(root, (), 0)]
    while stack:
        current, where, depth = stack.pop()
        if depth > 64:
            continue
        if isinstance(current, yaml.MappingNode):
            for key_node, value_node in current.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue
                child = (*where, str(key_node.value))
                mark = key_node.start_mark
                index[child] = (mark.line + 1, mark.column + 1)  # the last of duplicates wins
                stack.append((value_node, child, depth + 1))
        elif isinstance(current, yaml.SequenceNode):
            for position, item in enumerate(current.value):
                child = (*where, str(position))
                index[child] = (item.start_mark.line + 1, item.start_mark.column + 1)
                stack.append((item, child, depth + 1))
    return index


def line_of(path: _Path, lines: _LineIndex) -> int | None:
    """The line of the longest prefix of `path` present in the file (a missing key: its parent)."""
    parts = tuple(str(part) for part in path)
    for length in range(len(parts), -1, -1):
        if parts[:length] in lines:
            return lines[parts[:length]][0]
    return None


def _validation_problems(
    source: str, error: ValidationError, lines: _LineIndex
) -> list[TopologyProblem]:
    problems = []
    for item in error.errors(include_url=False):
        if item["type"] == "topology_references":
            continue  # reported with exact paths by reference_problems on the raw data
        loc: list[str | int] = [part for part in item["loc"] if part != "[key]"]
        in_key = len(loc) != len(item["loc"])
        ctx = item.get("ctx") or {}
        if item["type"] == "mesh_field":
            loc.append(ctx["field"])
        message = problem_message(item, tuple(loc))
        if in_key:
            message = f"bad key: {message}"
        problems.append(_problem(source, tuple(loc), message, lines))
    return problems


def problem_message(item: Mapping[str, Any], loc: _Path) -> str:
    kind, value, ctx = item["type"], item.get("input"), item.get("ctx") or {}
    got = f" (got {_describe(value)})"
    if kind == "missing":
        return "required key missing"
    if kind == "extra_forbidden":
        return _unknown_key_message(loc)
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return "must be an integer" + got
    if kind in ("float_type", "float_parsing"):
        return "must be a number" + got
    if kind in ("bool_type", "bool_parsing"):
        return "must be true or false" + got
    if kind == "string_type":
        hint = "; quote it" if isinstance(value, int | float | bool) else ""
        return "must be a string" + got + hint
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return "must be a mapping of keys to values" + got
    if kind in ("list_type", "tuple_type", "iterable_type"):
        return "must be a list" + got
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected', '?')}{got}"
    if kind == "string_pattern_mismatch":
        return f"must match {ctx.get('pattern', '?')}{got}"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "string_too_long":
        return f"must be at most {ctx.get('max_length')} characters"
    bounds = {
        "greater_than_equal": ">=",
        "greater_than": ">",
        "less_than_equal": "<=",
        "less_than": "<",
    }
    if kind in bounds:
        bound = next(iter(ctx.values()), "?")
        return f"must be {bounds[kind]} {bound}{got}"
    return str(item["msg"])


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else repr(value[:37] + "...")
    return repr(value)


def _unknown_key_message(loc: _Path) -> str:
    key = str(loc[-1]) if loc else ""
    if key in ("api_key", "key", "token", "secret"):
        return "unknown key; never put a secret in a topology: name an environment variable in api_key_env"
    return unknown_key_message(Topology, loc)


def unknown_key_message(root: type[BaseModel], loc: _Path) -> str:
    """ "unknown key", with the closest known key or the known ones, for a key at `loc` of a
    file read into `root` (shared by every YAML file the project checks: topology, scenario)."""
    model = model_at(root, loc[:-1])
    if model is None:
        return "unknown key"
    fields = [field.alias or name for name, field in model.model_fields.items()]
    close = difflib.get_close_matches(str(loc[-1]) if loc else "", fields, n=1, cutoff=0.6)
    if close:
        return f"unknown key (did you mean {close[0]!r}?)"
    return f"unknown key (expected one of: {', '.join(fields)})"


def model_at(root: type[BaseModel], loc: _Path) -> type[BaseModel] | None:
    """The model class whose fields live at `loc` under `root` (None if not a model)."""
    current: Any = root
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            by_alias = {f.alias or n: f for n, f in current.model_fields.items()}
            field = by_alias.get(str(part))
            if field is None:
                return None
            current = field.annotation
        elif typing.get_origin(current) in (tuple, list):
            current = typing.get_args(current)[0]
        elif typing.get_origin(current) is dict:
            current = typing.get_args(current)[1]
        else:
            return None
    current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    """Strip Annotated[...] and `X | None` down to X."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            options = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
            annotation = options[0] if len(options) == 1 else annotation
            if len(options) != 1:
                return annotation
        else:
            return annotation
