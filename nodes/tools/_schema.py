"""JSON schemas derived from Python signatures, and a validator for the subset we produce.

`parameters_schema(fn)` turns type hints and a Google- or Sphinx-style docstring into
the JSON schema of a tool's arguments; `validate(value, schema)` checks a value
against such a schema and returns readable error messages (empty: valid). Both
are pure functions.
"""

from __future__ import annotations

import enum
import inspect
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, get_args, get_origin

from mesh.core.untrusted import quoted

_SCALARS: dict[type, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}
_ARGS_HEADERS = ("args:", "arguments:", "parameters:", "params:")
_SECTION_HEADER = re.compile(r"^(returns?|raises|yields|examples?|notes?|see also):\s*$", re.I)
_SPHINX_PARAM = re.compile(r"^:param\s+(?:\w+\s+)?(\w+):\s*(.*)$")
_GOOGLE_PARAM = re.compile(r"^(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


class SchemaError(TypeError):
    """A parameter's type hint cannot be expressed as a JSON schema."""


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """(description, {parameter: description}) from a Google- or Sphinx-style docstring."""
    lines = inspect.cleandoc(doc or "").splitlines()
    summary: list[str] = []
    params: dict[str, str] = {}
    current: str | None = None
    in_args = False
    for raw in lines:
        line = raw.strip()
        sphinx = _SPHINX_PARAM.match(line)
        if sphinx:
            current, in_args = sphinx.group(1), False
            params[current] = sphinx.group(2).strip()
            continue
        if line.lower() in _ARGS_HEADERS:
            in_args, current = True, None
            continue
        if _SECTION_HEADER.match(line) or line.startswith(":"):
            in_args, current = False, None
            continue
        if in_args and line:
            google = _GOOGLE_PARAM.match(line)
            indented = raw.startswith((" " * 8, "\t\t"))
            if google and not indented:
                current = google.group(1).lstrip("*")
                params[current] = google.group(2).strip()
                continue
            if current is not None:
                params[current] = f"{params[current]} {line}".strip()
            continue
        if current is not None and line and not in_args:
            params[current] = f"{params[current]} {line}".strip()
            continue
        if not params and not in_args:
            summary.append(line)
    description = " ".join(_first_paragraph(summary))
    return description, params


def _first_paragraph(lines: Sequence[str]) -> list[str]:
    paragraph: list[str] = []
    for line in lines:
        if not line:
            if paragraph:
                break
            continue
        paragraph.append(line)
    return paragraph


def type_schema(hint: Any) -> dict[str, Any]:
    """The JSON schema of one type hint (str, int, float, bool, Literal, Enum, list, dict, X | None)."""
    origin = get_origin(hint)
    if origin is typing.Annotated:
        base, *extra = get_args(hint)
        schema = type_schema(base)
        notes = [e for e in extra if isinstance(e, str)]
        if notes:
            schema["description"] = " ".join(notes)
        return schema
    if hint in _SCALARS:
        return {"type": _SCALARS[hint]}
    if origin is Literal:
        values = list(get_args(hint))
        kinds = {_SCALARS.get(type(v)) for v in values}
        if None in kinds or len(kinds) != 1:
            raise SchemaError(f"Literal values must all be str, int, float or bool, got {values!r}")
        return {"type": kinds.pop(), "enum": values}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        values = [member.value for member in hint]
        return type_schema(Literal[tuple(values)])  # type: ignore[valid-type]
    if origin in (list, tuple, Sequence, set, frozenset) or hint in (list, tuple):
        args = [a for a in get_args(hint) if a is not Ellipsis]
        schema = {"type": "array"}
        if args:
            schema["items"] = type_schema(args[0])
        return schema
    if origin in (dict, Mapping) or hint is dict:
        return {"type": "object"}
    if origin in (typing.Union, types.UnionType):
        members = [a for a in get_args(hint) if a is not type(None)]
        if len(members) == 1:
            return type_schema(members[0])
        return {"anyOf": [type_schema(m) for m in members]}
    raise SchemaError(f"cannot derive a JSON schema from the type hint {hint!r}")


def _is_optional(hint: Any) -> bool:
    if get_origin(hint) is typing.Annotated:
        hint = get_args(hint)[0]
    return get_origin(hint) in (typing.Union, types.UnionType) and type(None) in get_args(hint)


def parameters_schema(
    fn: Callable[..., Any], *, skip: Sequence[str] = ()
) -> tuple[str, dict[str, Any]]:
    """(description, JSON schema of the arguments) of `fn`; parameters in `skip` are left out.

    A parameter is required unless it has a default or is `X | None`; every
    parameter must have a type hint, since the schema constrains what the model writes.
    """
    description, docs = parse_docstring(fn.__doc__)
    hints = typing.get_type_hints(fn, include_extras=True)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for name, parameter in inspect.signature(fn).parameters.items():
        if name in skip:
            continue
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise SchemaError(f"{fn.__name__}: *args and **kwargs cannot be tool parameters")
        if name not in hints:
            raise SchemaError(f"{fn.__name__}: parameter {name!r} needs a type hint")
        schema = type_schema(hints[name])
        if name in docs and "description" not in schema:
            schema["description"] = docs[name]
        if parameter.default is not inspect.Parameter.empty:
            if parameter.default is not None:
                default = parameter.default
                schema["default"] = default.value if isinstance(default, enum.Enum) else default
        elif not _is_optional(hints[name]):
            required.append(name)
        properties[name] = schema
    return description, {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


# ---------------------------------------------------------------- validation

_TYPE_CHECKS: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}


def validate(value: Any, schema: Mapping[str, Any], path: str = "$") -> list[str]:
    """Errors of `value` against `schema` (the subset this package produces); empty when valid."""
    if "oneOf" in schema or "anyOf" in schema:
        options = schema.get("oneOf") or schema["anyOf"]
        results = [validate(value, option, path) for option in options]
        if any(not errors for errors in results):
            return []
        best = min(results, key=len)
        return best if len(options) == 1 else [f"{path}: matches none of the allowed forms"] + best
    if "const" in schema and value != schema["const"]:
        return [f"{path}: must be {schema['const']!r}"]
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(repr(v) for v in schema["enum"])
        return [f"{path}: {quoted(value)} is not one of {allowed}"]
    kind = schema.get("type")
    if kind is not None:
        kinds = [kind] if isinstance(kind, str) else list(kind)
        if not any(_TYPE_CHECKS[k](value) for k in kinds):
            return [f"{path}: expected {' or '.join(kinds)}, got {type(value).__name__}"]
    errors: list[str] = []
    if isinstance(value, str):
        errors += _string_errors(value, schema, path)
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{path}: must be at least {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{path}: must be at most {schema['maximum']}")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            errors += validate(item, schema["items"], f"{path}[{index}]")
    if isinstance(value, dict):
        errors += _object_errors(value, schema, path)
    return errors


def _string_errors(value: str, schema: Mapping[str, Any], path: str) -> list[str]:
    errors = []
    if "minLength" in schema and len(value) < schema["minLength"]:
        errors.append(f"{path}: must have at least {schema['minLength']} characters")
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        errors.append(f"{path}: must have at most {schema['maxLength']} characters")
    if "pattern" in schema and not re.search(schema["pattern"], value):
        errors.append(f"{path}: does not match the pattern {schema['pattern']}")
    return errors


def _object_errors(value: dict[str, Any], schema: Mapping[str, Any], path: str) -> list[str]:
    errors = []
    properties = schema.get("properties", {})
    for name in schema.get("required", ()):
        if name not in value:
            errors.append(f"{path}: missing required property {name!r}")
    for name, item in value.items():
        if name in properties:
            errors += validate(item, properties[name], f"{path}.{name}")
        elif schema.get("additionalProperties", True) is False:
            errors.append(f"{path}: unexpected property {quoted(name)}")
    return errors
