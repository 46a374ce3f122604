"""Type checks for values read from TOML, against type hints. Pure Python, no torch.

``check(value, hint)`` returns the (possibly converted) value or raises ``TypeError`` with
what was expected; callers add the file and the key to the message.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import types
import typing
from typing import Any, Literal, Union

from harness.errors import ConfigError, close_matches


def describe(hint: Any) -> str:
    """A short human name for a type hint: ``int``, ``float``, ``'soft' or 'hard'``, ``list of int``."""
    if hint is inspect.Parameter.empty or hint is Any:
        return "any value"
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join("none (omit the key)" if a is type(None) else describe(a) for a in typing.get_args(hint))
    if origin in (list, tuple, collections.abc.Sequence):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return f"a list of {describe(args[0])}" if args else "a list"
    if origin in (dict, collections.abc.Mapping):
        return "a table"
    if isinstance(hint, type):
        if dataclasses.is_dataclass(hint):
            return "a table"
        return {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}.get(
            hint.__name__, hint.__name__
        )
    return str(hint)


def check(value: Any, hint: Any) -> Any:
    """Return ``value`` converted to ``hint`` where lossless (int -> float, list -> tuple)."""
    if hint is inspect.Parameter.empty or hint is Any:
        return value
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise TypeError(f"expected {describe(hint)}, got {value!r}")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return check(value, a)
            except TypeError:
                pass
        raise TypeError(f"expected {describe(hint)}, got {value!r}")
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected {describe(hint)}, got {value!r}")
        if origin is tuple and args and Ellipsis not in args:  # fixed length: tuple[float, float]
            if len(value) != len(args):
                raise TypeError(f"expected a list of {len(args)} values ({', '.join(describe(a) for a in args)}), got {value!r}")
            return tuple(check(v, a) for v, a in zip(value, args))
        item = [a for a in args if a is not Ellipsis]
        items = [check(v, item[0]) for v in value] if item else list(value)
        return tuple(items) if origin is tuple else items
    if origin in (dict, collections.abc.Mapping):
        if not isinstance(value, dict):
            raise TypeError(f"expected a table, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"expected an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise TypeError(f"expected true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {value!r}")
        return value
    if isinstance(hint, type) and not isinstance(value, hint):
        raise TypeError(f"expected {describe(hint)}, got {value!r}")
    return value


def build_dataclass(cls: type, data: dict[str, Any], where: str, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a TOML table, rejecting unknown keys and wrong types.

    :param where: the file (and section) for error messages, e.g. ``"bench.toml [defaults]"``.
    :param prefix: dotted key prefix for nested tables.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: key {prefix.rstrip('.') or '(top)'!r} must be a table, got {data!r}")
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        hint = close_matches(k, fields)
        raise ConfigError(
            f"{where}: unknown key {prefix + k!r}"
            + (f" (did you mean {prefix + hint[0]!r}?)" if hint else "")
            + f"; expected one of: {', '.join(prefix + f for f in fields)}"
        )
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
                raise ConfigError(f"{where}: missing required key {prefix + name!r} ({describe(hints[name])})")
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build_dataclass(hint, data[name], where, prefix + name + ".")
            continue
        try:
            kwargs[name] = check(data[name], hint)
        except TypeError as exc:
            raise ConfigError(f"{where}: key {prefix + name!r}: {exc}") from None
    return cls(**kwargs)
