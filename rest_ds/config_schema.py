"""YAML mappings to typed dataclass configs: the one parsing rule of every
rest_ds config (model, training).

A field's type hint is its schema: ``int``, ``float``, ``str``, ``bool``,
``Any``, ``Literal[...]``, ``list[T]``, ``dict[str, T]``, ``T | None`` and
nested dataclasses. Unknown keys (with a did-you-mean), missing required keys,
wrong types and values outside a ``Literal`` raise :class:`ConfigError`, whose
message names the file and the dotted key. Fields with ``metadata={"internal":
True}`` are not read from the mapping.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key."""

    def __init__(self, where: str | None, key: str, message: str):
        self.where, self.key = where, key
        super().__init__(f"{where + ': ' if where else ''}{key}: {message}")


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
        data = dataclasses.asdict(data)
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
            values[name] = convert(hints[name], data[name], where, f"{prefix}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(where, f"{prefix}{name}", "missing required key")
    return cls(**values)
