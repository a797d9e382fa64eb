"""Typed dataclasses from raw mappings: each value converted to its annotated type (bool, int,
float, str, Literal, Optional, fixed-size tuples of positive ints, nested dataclasses) and checked
against its range, or a ConfigError that names the dotted key, the value and what is allowed.

Hand-written rather than pydantic: the messages are the interface (tested), the classes stay plain
dataclasses that pickle across Ray boundaries, and the whole is about a hundred lines.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import field
from typing import Any, Literal, Union

from sisray.errors import ConfigError


def bounded(default: Any, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False, hi_open: bool = False) -> Any:
    """A dataclass field whose numeric value must lie in [lo, hi] (or open at either end)."""
    return field(default=default, metadata={"range": (lo, hi, lo_open, hi_open)})


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {len(typing.get_args(tp))} positive integers"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """`value` as type `tp`, or a ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key)
            except ConfigError:
                pass
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin is tuple:
        n = len(typing.get_args(tp))
        if isinstance(value, (list, tuple)) and len(value) == n and all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
            return tuple(value)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" as a string
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                if math.isfinite(number):
                    return number
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key} = {value!r}: expected {_type_name(tp)}")


def _check_range(value: Any, spec: tuple, key: str) -> None:
    lo, hi, lo_open, hi_open = spec
    if value is None:
        return
    too_low = lo is not None and (value <= lo if lo_open else value < lo)
    too_high = hi is not None and (value >= hi if hi_open else value > hi)
    if too_low or too_high:
        left = "" if lo is None else f"{lo} {'<' if lo_open else '<='} "
        right = "" if hi is None else f" {'<' if hi_open else '<='} {hi}"
        raise ConfigError(f"{key} = {value!r} is out of range: expected {left}value{right}")


def build_dataclass(cls: type, raw: Any, prefix: str) -> Any:
    """An instance of dataclass `cls` from a raw mapping (e.g. parsed YAML), every value checked against
    its type and its `bounded` range; an unknown key or a bad value is a ConfigError naming the dotted
    key (`prefix` + name)."""
    where = prefix or "the configuration"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"unknown key {dotted!r}; {where} allows: {', '.join(fields)}")
    values = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        dotted = f"{prefix}.{name}" if prefix else name
        values[name] = _convert(raw[name], hints[name], dotted)
        if "range" in f.metadata:
            _check_range(values[name], f.metadata["range"], dotted)
    return cls(**values)
