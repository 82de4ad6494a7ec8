"""Typed validation of TOML values against dataclass fields.

A manifest section is a plain dataclass whose fields carry a `help` string in their
metadata. This module checks one TOML value against a field's annotation and explains
mismatches in words a user understands ("expected an integer, got a string").
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin


class FieldValueError(ValueError):
    """A section's value is out of range; ``key`` names the field, so the error points at its line."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


class SchemaTypeError(ValueError):
    """A value does not match the annotation; the message says what was expected."""


def describe_type(annotation: Any) -> str:
    """Human wording for an annotation, e.g. `an integer`, `one of "all", "cls"`."""
    origin = get_origin(annotation)
    if annotation is str:
        return "a string"
    if annotation is bool:
        return "true or false"
    if annotation is int:
        return "an integer"
    if annotation is float:
        return "a number"
    if annotation is type(None):
        return "nothing"
    if origin is Literal:
        return "one of " + ", ".join(_toml_repr(v) for v in get_args(annotation))
    if origin in (list, tuple):
        (item,) = get_args(annotation)[:1] or (Any,)
        return f"a list of {_plural(describe_type(item))}"
    if origin is dict:
        return f"a table of {_plural(describe_type(get_args(annotation)[1]))}" if get_args(annotation) else "a table"
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(annotation) if a is not type(None)]
        return " or ".join(describe_type(a) for a in options)
    return getattr(annotation, "__name__", str(annotation))


def _plural(text: str) -> str:
    for article in ("a ", "an "):
        if text.startswith(article):
            return text[len(article):] + "s"
    return text


def _toml_repr(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def coerce(value: Any, annotation: Any) -> Any:
    """Return `value` checked (and lightly converted) against `annotation`.

    Integers are accepted where a number is expected; nothing else is converted.
    Raises `SchemaTypeError` with a message naming the expected type.
    """
    origin = get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for option in get_args(annotation):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return coerce(value, option)
            except SchemaTypeError as exc:
                errors.append(exc)
        raise SchemaTypeError(f"expected {describe_type(annotation)}, got {_value_kind(value)}")
    if origin is Literal:
        if value in get_args(annotation) and type(value) in {type(a) for a in get_args(annotation)}:
            return value
        raise SchemaTypeError(f"expected {describe_type(annotation)}, got {_toml_repr(value)}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif origin in (list, tuple):
        if isinstance(value, list):
            (item,) = get_args(annotation)[:1] or (Any,)
            out = []
            for i, element in enumerate(value):
                try:
                    out.append(coerce(element, item))
                except SchemaTypeError as exc:
                    raise SchemaTypeError(f"item {i}: {exc}") from None
            return out
    elif origin is dict:
        if isinstance(value, dict):
            _, value_type = get_args(annotation) or (str, Any)
            out_table = {}
            for key, element in value.items():
                try:
                    out_table[key] = coerce(element, value_type)
                except SchemaTypeError as exc:
                    raise SchemaTypeError(f"key {key!r}: {exc}") from None
            return out_table
    else:
        raise TypeError(f"unsupported annotation in a manifest section: {annotation!r}")
    raise SchemaTypeError(f"expected {describe_type(annotation)}, got {_value_kind(value)}")


def _value_kind(value: Any) -> str:
    if isinstance(value, bool):
        return f"a boolean ({_toml_repr(value)})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a number ({value})"
    if isinstance(value, str):
        return f'a string ("{value}")'
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass (works with `from __future__ import annotations`)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def is_required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def suggest(name: str, candidates: typing.Iterable[str]) -> str | None:
    """The closest valid name to a misspelt one, if any is close enough."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None
