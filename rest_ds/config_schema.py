"""YAML mappings to typed dataclass configs: the one parsing rule of every
rest_ds YAML file (training configs, model configs, scene descriptions).

A field's type hint is its schema: ``int``, ``float``, ``str``, ``bool``,
``Any``, ``Literal[...]``, ``list[T]``, ``dict[str, T]``, ``T | None`` and
nested dataclasses. Unknown keys (with a did-you-mean), missing required keys,
wrong types, values outside a ``Literal`` and values outside a field's range
raise :class:`ConfigError`, whose one-line message names the file and the
dotted key (``scene.yaml: classes[1].value: expected a number, got 'x'``).

Field metadata (``dataclasses.field(metadata=...)``, or :func:`bounded`):

* ``internal: True``: not read from the mapping (set by the loader);
* ``range``: ``(lo, lo_open, hi, hi_open)``, checked on a number, on every
  item of a list and every value of a mapping (``None`` is not checked);
* ``parse``: ``fn(value) -> value`` run instead of the type conversion (a
  ValueError or TypeError becomes a :class:`ConfigError` naming the key).

A dataclass with a ``config_shorthand(value) -> dict`` static method also
accepts that shorthand where a mapping is expected (a scene's ``image:
img.tif`` for ``image: {path: img.tif}``).

:func:`load_yaml` reads a file (one-line errors for a missing file or bad
YAML); every YAML file the project reads goes through it.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from typing import Any, Literal, Union

from .cli_args import one_line

# a whole number in scientific notation, as YAML 1.1 leaves it when it has no dot (5e8)
_SCIENTIFIC = re.compile(r"[+-]?\d+(\.\d*)?[eE][+-]?\d+$")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key."""

    def __init__(self, where: str | None, key: str, message: str):
        self.where, self.key, self.message = where, key, message
        super().__init__(f"{where + ': ' if where else ''}{key}: {message}")


def bounded(default: Any = dataclasses.MISSING, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None, **field_kwargs) -> Any:
    """A dataclass field whose value (each item of a list) must lie in the range
    given by ``ge``/``gt`` (lower bound) and ``le``/``lt`` (upper bound)."""
    if ge is not None and gt is not None or le is not None and lt is not None:
        raise TypeError("bounded: give at most one of ge/gt and one of le/lt")
    lo, hi = (ge if gt is None else gt), (le if lt is None else lt)
    metadata = {**field_kwargs.pop("metadata", {}), "range": (lo, gt is not None, hi, lt is not None)}
    return dataclasses.field(default=default, metadata=metadata, **field_kwargs)


def range_text(rng: tuple) -> str:
    lo, lo_open, hi, hi_open = rng
    if hi is None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if lo is None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def check_range(rng: tuple, value: Any, where: str | None, key: str) -> None:
    """:class:`ConfigError` unless ``value`` (each item of a list / mapping) lies in ``rng``."""
    if value is None:
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_range(rng, v, where, f"{key}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            check_range(rng, v, where, f"{key}.{k}")
        return
    lo, lo_open, hi, hi_open = rng
    # NaN and +-inf are refused too: no ranged setting means anything at infinity (lr=inf trained to NaN)
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and not (
        lo is not None and (value <= lo if lo_open else value < lo)) and not (
        hi is not None and (value >= hi if hi_open else value > hi))
    if not ok:
        finite = "a finite number " if isinstance(value, float) and math.isinf(value) else ""
        raise ConfigError(where, key, f"must be {finite}{range_text(rng)}, got {value!r}")


def check_ranges(obj: Any, where: str | None, key: str) -> None:
    """The field ranges of dataclass instance ``obj`` and of its nested dataclasses
    (for instances built in code; parsing checks them already)."""
    prefix = f"{key}." if key else ""
    for name, f in public_fields(type(obj)).items():
        value = getattr(obj, name)
        if "range" in f.metadata:
            check_range(f.metadata["range"], value, where, f"{prefix}{name}")
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_ranges(value, where, f"{prefix}{name}")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                if dataclasses.is_dataclass(v) and not isinstance(v, type):
                    check_ranges(v, where, f"{prefix}{name}[{i}]")
        elif isinstance(value, dict):
            for k, v in value.items():
                if dataclasses.is_dataclass(v) and not isinstance(v, type):
                    check_ranges(v, where, f"{prefix}{name}.{k}")


def load_yaml(path: "str | os.PathLike", key: str = "config") -> Any:
    """The parsed content of YAML file ``path``; :class:`ConfigError` (naming the
    file and ``key``) when it is missing or not valid YAML."""
    import yaml

    where = os.fspath(path)
    if not os.path.isfile(where):
        raise ConfigError(where, key, "file not found")
    try:
        with open(where) as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(where, key, f"not valid YAML ({one_line(e)})") from None


def type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def convert(tp, value: Any, where: str | None, key: str) -> Any:
    """``value`` (as YAML loads it) as type ``tp``, or :class:`ConfigError`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if value is None:
            raise ConfigError(where, key, f"must not be null (expected {' or '.join(map(type_name, non_none))})")
        for a in non_none:  # an alternative of the value's own type wins over conversions (str | float)
            if a in (str, int, float, bool) and type(value) is a:
                return value
        errors = []
        for a in non_none:  # else the first alternative that accepts the value
            try:
                return convert(a, value, where, key)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(where, key, f"expected {' or '.join(map(type_name, non_none))}, got {value!r}")
    if origin is Literal:
        options = typing.get_args(tp)
        if value not in options:
            close = difflib.get_close_matches(str(value), [str(o) for o in options], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(where, key, f"{value!r} is not one of {', '.join(map(str, options))}{hint}")
        return value
    if tp is Any:
        return value
    if value is None:
        raise ConfigError(where, key, f"must not be null (expected {type_name(tp)})")
    if dataclasses.is_dataclass(tp):
        return parse_dataclass(tp, value, where, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(where, key, f"expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [convert(item, v, where, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(where, key, f"expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp)
        return {str(k): convert(vt, v, where, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(where, key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        # YAML 1.1 reads 5e8 (no dot) as a string and 5.0e+8 as a float: whole numbers in
        # scientific notation are integers
        if isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
            value = float(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(where, key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads '1e-3' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(where, key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(where, key, f"expected a string, got {value!r}")
        return str(value)
    raise ConfigError(where, key, f"unsupported type {tp}")  # pragma: no cover


def public_fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def parse_dataclass(cls, data: Any, where: str | None, key: str):
    """An instance of dataclass ``cls`` from a mapping (or an instance of it);
    ``key`` is the mapping's dotted path in the file ("" for the top level)."""
    if isinstance(data, cls):
        data = {k: v for k, v in dataclasses.asdict(data).items() if k in public_fields(cls)}
    shorthand = getattr(cls, "config_shorthand", None)
    if shorthand is not None and not isinstance(data, dict):
        data = shorthand(data)
    prefix = f"{key}." if key else ""
    fields = public_fields(cls)
    if not isinstance(data, dict):
        raise ConfigError(where, key or "config", f"expected a mapping with keys {', '.join(fields)}, got {data!r}")
    hints = typing.get_type_hints(cls)
    for k in data:
        if k not in fields:
            close = difflib.get_close_matches(str(k), list(fields), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(where, f"{prefix}{k}",
                              f"unknown key ({hint}known keys{' of ' + key if key else ''}: {', '.join(fields)})")
    values = {}
    for name, f in fields.items():
        if name in data:
            k = f"{prefix}{name}"
            parse = f.metadata.get("parse")
            if parse is not None and data[name] is not None:
                try:
                    values[name] = parse(data[name])
                except (ValueError, TypeError) as e:
                    raise ConfigError(where, k, str(e)) from None
            else:
                values[name] = convert(hints[name], data[name], where, k)
            if "range" in f.metadata:
                check_range(f.metadata["range"], values[name], where, k)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(where, f"{prefix}{name}", "missing required key")
    return cls(**values)
