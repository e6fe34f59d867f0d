"""Validation of TOML tables into dataclasses, shared by every config reader."""

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any

from mailpush.errors import ConfigError


def parse_table(cls: type, table: Any, section: str) -> Any:
    """Build dataclass ``cls`` from ``table``, or raise a one-line :class:`ConfigError`."""
    if not isinstance(table, Mapping):
        msg = f"{section}: expected a table ([{section}]), got {table!r}"
        raise ConfigError(msg)
    return parse_dataclass(cls, table, section)


def parse_dataclass(cls: type, table: Mapping[str, Any], section: str) -> Any:
    """Build dataclass ``cls`` from a TOML table, checking keys and value types.

    Supports fields typed ``bool``, ``int``, ``float``, ``str``, ``list[str]``,
    ``list[int]``, ``Literal[...]`` and any of these ``| None``.

    Raises:
        ConfigError: for an unknown key or a value of the wrong type.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in table.items():
        if key not in fields:
            allowed = ", ".join(sorted(fields)) or "none"
            msg = f"{section}.{key}: unknown key; allowed keys: {allowed}"
            raise ConfigError(msg)
        values[key] = _check_type(value, hints[key], f"{section}.{key}")
    return cls(**values)


def _check_type(value: Any, hint: Any, key: str) -> Any:
    if _matches(value, hint):
        if hint is float and isinstance(value, int):
            return float(value)
        return value
    msg = f"{key}: invalid value {value!r}; expected {_describe(hint)}"
    raise ConfigError(msg)


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        # TOML allows nan and inf, and every comparison with nan is false, so a
        # nan threshold would pass any range check later; only finite numbers do.
        number = isinstance(value, int | float) and not isinstance(value, bool)
        return number and math.isfinite(value)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(arg) for arg in typing.get_args(hint) if arg is not type(None)]
        return " or ".join(parts)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(hint))
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))
