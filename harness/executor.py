"""Executors run cells. They know nothing of training: a callable and cells in, results out.

The serial executor runs cells one after another in this process. A distributed executor
(a process pool, Ray) implements the same :class:`Executor` protocol; cell configs are plain
picklable values for that reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Protocol, TypeVar

C = TypeVar("C")
R = TypeVar("R")


class Executor(Protocol):
    def map(self, fn: Callable[[C], R], cells: Iterable[C]) -> Iterator[R]:
        """Apply ``fn`` to each cell, yielding results as they finish. ``fn`` never raises for a
        failing cell (it returns a failed result); ``KeyboardInterrupt`` stops the executor."""
        ...


class SerialExecutor:
    """Runs the cells one by one, in order, in the calling process."""

    in_process = True  # cells may use what this process already loaded (the preflight's data)

    def map(self, fn: Callable[[C], R], cells: Iterable[C]) -> Iterator[R]:
        for cell in cells:
            yield fn(cell)


EXECUTORS: Mapping[str, Callable[[], Executor]] = MappingProxyType({"serial": SerialExecutor})
