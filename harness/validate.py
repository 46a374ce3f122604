"""Type checks for values read from TOML, against type hints. Pure Python, no torch.

``check(value, hint)`` returns the (possibly converted) value or raises ``TypeError`` (wrong
type) or :class:`ConstraintError` (a ``ValueError``: the right type, a value out of its range)
with what was expected; callers add the file and the key to the message.

Constraints beyond the type are declared where the option is, with ``typing.Annotated``, by the
harness's own settings and by plugin factories alike::

    def __init__(self, num_features: int, momentum: Annotated[float, Range(0, 1, low_open=True)] = 0.1): ...
    def my_model(..., channels: Annotated[list[int], Length(min=1), Range(1)] = [32, 64]): ...

so a bad value is reported when the matrix is loaded (``--dry-run`` included), with the file and
the key, instead of failing the cell when it is built.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from harness.errors import ConfigError, close_matches


class ConstraintError(ValueError):
    """A value of the right type that a :class:`Constraint` refuses."""


class Constraint:
    """A condition on a value beyond its type, for ``typing.Annotated`` metadata."""

    def check(self, value: Any) -> None:  # pragma: no cover - the interface
        """:raises ConstraintError: ``value`` does not satisfy the condition."""
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - the interface
        raise NotImplementedError


@dataclass(frozen=True)
class Range(Constraint):
    """A number in ``[low, high]`` (an end is open with ``low_open`` / ``high_open``; ``None``:
    unbounded). On a list, every item must be in range; ``None`` (an omitted optional) passes."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __post_init__(self) -> None:
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(f"Range: low {self.low} is above high {self.high}")

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'more than' if self.low_open else 'at least'} {self.low:g}"
        if self.high is not None:
            return f"{'less than' if self.high_open else 'at most'} {self.high:g}"
        return "any number"

    def holds(self, v: float) -> bool:
        if v != v:  # NaN
            return False
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        return not (self.high is not None and (v >= self.high if self.high_open else v > self.high))

    def check(self, value: Any) -> None:
        items = value if isinstance(value, (list, tuple)) else [value]
        for v in items:
            if v is not None and isinstance(v, (int, float)) and not isinstance(v, bool) and not self.holds(v):
                what = "every item must be" if isinstance(value, (list, tuple)) else "must be"
                raise ConstraintError(f"{what} {self.describe()}, got {value!r}")


@dataclass(frozen=True)
class Length(Constraint):
    """A list of at least ``min`` (and at most ``max``) items."""

    min: int = 0
    max: int | None = None

    def describe(self) -> str:
        if self.max is None:
            return f"at least {self.min} item{'s' if self.min != 1 else ''}"
        return f"{self.min} to {self.max} items" if self.min != self.max else f"exactly {self.min} items"

    def check(self, value: Any) -> None:
        if value is None or not isinstance(value, (list, tuple)):
            return
        if len(value) < self.min or (self.max is not None and len(value) > self.max):
            raise ConstraintError(f"must have {self.describe()}, got {list(value)!r}")


@dataclass(frozen=True)
class AddedLater:
    """Marks an option added to a plugin after cells without it were run: ``original`` is the
    behaviour every one of those cells had. A cell whose option has that value leaves it out of
    its cell id, so adding the option keeps the ids of the cells that do not use it (and so
    their finished runs and checkpoints); any other value is hashed as usual::

        def __init__(self, num_features: int, warmup: Annotated[int, Range(0), AddedLater(0)] = 0): ...

    Not a constraint: it checks nothing. ``original`` is normally the new default; a default
    that differs from it changes behaviour, and the ids of the cells that take it, on purpose."""

    original: Any


def later_original(hint: Any) -> tuple[bool, Any]:
    """``(True, original)`` if ``hint`` is ``Annotated`` with :class:`AddedLater`, else ``(False, None)``."""
    if typing.get_origin(hint) is Annotated:
        for meta in typing.get_args(hint)[1:]:
            if isinstance(meta, AddedLater):
                return True, meta.original
    return False, None


def _annotated(hint: Any) -> tuple[Any, list[Constraint]]:
    """``(base type, constraints)`` of an ``Annotated`` hint; ``(hint, [])`` otherwise."""
    if typing.get_origin(hint) is Annotated:
        base, *meta = typing.get_args(hint)
        return base, [m for m in meta if isinstance(m, Constraint)]
    return hint, []


def describe(hint: Any) -> str:
    """A short human name for a type hint: ``int``, ``float``, ``'soft' or 'hard'``, ``list of int``."""
    if hint is inspect.Parameter.empty or hint is Any:
        return "any value"
    base, constraints = _annotated(hint)
    if base is not hint:
        return f"{describe(base)} ({', '.join(c.describe() for c in constraints)})" if constraints else describe(base)
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
    """Return ``value`` converted to ``hint`` where lossless (int -> float, list -> tuple).

    :raises TypeError: not of the hint's type. :raises ConstraintError: of the type, but refused
        by a constraint of an ``Annotated`` hint.
    """
    if hint is inspect.Parameter.empty or hint is Any:
        return value
    base, constraints = _annotated(hint)
    if base is not hint:
        value = check(value, base)
        for constraint in constraints:
            constraint.check(value)
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
    hints = typing.get_type_hints(cls, include_extras=True)
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
        except (TypeError, ConstraintError) as exc:
            raise ConfigError(f"{where}: key {prefix + name!r}: {exc}") from None
    return cls(**kwargs)


def same_value(value: Any, wanted: Any) -> bool:
    """``value`` (a cell's typed value, or text: a command line's ``--only``, a CSV's or MLflow's
    column) names the same thing as ``wanted``. Text is read as the other side's type: ``"0.1"``
    is ``0.1``, ``"true"`` is ``True``, ``"none"`` or ``""`` is ``None``, ``"16,32"`` or
    ``"[16, 32]"`` is ``[16, 32]``; a bool is never a number; a tuple equals the same list."""
    if isinstance(value, str) and not isinstance(wanted, str):
        value, wanted = wanted, value
    if isinstance(wanted, str) and not isinstance(value, str):
        if isinstance(value, bool):
            return wanted.lower() == str(value).lower()
        if value is None:
            return wanted.lower() in ("none", "")
        if isinstance(value, (list, tuple)):
            return wanted.replace(" ", "") in (",".join(map(str, value)), str(list(value)).replace(" ", ""))
        try:
            return type(value)(wanted) == value
        except (TypeError, ValueError):
            return False
    if isinstance(value, bool) or isinstance(wanted, bool):
        return value is wanted
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(wanted, tuple):
        wanted = list(wanted)
    return value == wanted
