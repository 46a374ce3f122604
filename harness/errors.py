"""Exceptions whose messages are part of the API (tests assert them)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class HarnessError(Exception):
    """Base class of every error the harness raises on purpose."""


class ConfigError(HarnessError):
    """A matrix file or an option is invalid; raised before anything trains."""


class PluginError(HarnessError):
    """A plugin could not be loaded or registered (duplicate names, bad factories)."""


class UnknownNameError(HarnessError, KeyError):
    """A plugin name that no installed plugin registered.

    Subclasses :class:`KeyError` so ``registry.normalizers["x"]`` behaves like a mapping,
    but prints a readable message (``KeyError`` would quote it).
    """

    def __init__(self, kind: str, name: str, known: Iterable[str]) -> None:
        self.kind, self.name, self.known = kind, name, sorted(known)
        super().__init__(unknown_name_message(kind, name, self.known))

    def __str__(self) -> str:
        return self.args[0]


class DatasetNotFoundError(HarnessError):
    """The files of a data set are not where the loader looked. The message names the expected
    files or layout, where the loader looked, and how to get them (a data set's factory raises
    it instead of ``FileNotFoundError`` or a download attempt; the dataset contract checks it)."""


class IncompatibleCellError(HarnessError):
    """Every requested cell of a matrix is impossible (e.g. a whole-sequence normalizer online)."""


def close_matches(name: str, known: Iterable[str]) -> list[str]:
    return difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)


def unknown_name_message(kind: str, name: str, known: Iterable[str]) -> str:
    known = sorted(known)
    msg = f"unknown {kind} {name!r}; known {kind}s: {', '.join(known) if known else '(none registered)'}"
    hints = close_matches(name, known)
    if hints:
        msg += f" (did you mean {' or '.join(repr(h) for h in hints)}?)"
    return msg
