"""Executors run cells. They know nothing of training: cells and a :class:`CellJob` in, one
:class:`harness.runner.CellResult` per cell out, as the cells finish.

* ``serial`` (:class:`SerialExecutor`) runs the cells one after another in this process and
  hands the cell the hook relay itself;
* ``ray`` (:class:`harness.ray_executor.RayExecutor`) runs each cell as a Ray task; the cell's
  lifecycle events stream back and the observers are called in this process only.

A cell's config is a plain picklable value, and so is everything a worker needs to rebuild the
registry (:class:`harness.registry.PluginSettings`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from harness.matrix import ExecutionConfig


@dataclass
class CellJob:
    """What every cell of one ``harness run`` shares."""

    registry: Any  # harness.registry.Registry (its ``plugins`` say how to rebuild it elsewhere)
    hook: Any  # the observers' hook relay (pm.hook): called in this process only
    checkpoint_dir: Path | None  # cells checkpoint into checkpoint_dir / cell.id
    preloaded: Any = None  # harness.session.PreloadedData: the preflight's data, for in-process cells


class CellsInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM while cells ran; carries their (killed) results."""

    def __init__(self, results: Sequence[Any]) -> None:
        super().__init__(f"interrupted during {len(results)} cell(s)")
        self.results = list(results)


class Executor(Protocol):
    in_process: bool  # cells run in this process (they may use what it already loaded)

    def run(self, cells: Sequence[Any], job: CellJob) -> Iterator[Any]:
        """Run ``cells``, yielding each one's result as it finishes; every cell's lifecycle
        reaches ``job.hook`` in this process. A failing cell yields a failed result; Ctrl-C
        ends the run with :class:`CellsInterrupted` (a ``KeyboardInterrupt``) carrying the
        killed cells' results, after their ``on_cell_end``."""
        ...


class SerialExecutor:
    """Runs the cells one by one, in order, in the calling process; with ``threads`` (the
    ``cpus_per_cell`` of ``[execution]``), at that many torch threads."""

    in_process = True

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads

    def run(self, cells: Sequence[Any], job: CellJob) -> Iterator[Any]:
        from harness.runner import CellInterrupted, run_cell

        previous = None
        if self.threads is not None:
            import torch

            previous = torch.get_num_threads()
            torch.set_num_threads(self.threads)
        try:
            for cell in cells:
                try:
                    yield run_cell(cell, job.registry, job.hook, checkpoint_dir=job.checkpoint_dir, preloaded=job.preloaded)
                except CellInterrupted as exc:
                    raise CellsInterrupted([exc.result]) from exc
        finally:
            if previous is not None:
                torch.set_num_threads(previous)


def make_executor(config: ExecutionConfig, *, verbose: bool = False) -> Executor:
    """The executor ``config.executor`` names (:class:`harness.matrix.ExecutionConfig` checked the name)."""
    if config.executor == "ray":
        from harness.ray_executor import RayExecutor

        return RayExecutor(config, verbose=verbose)
    return SerialExecutor(threads=config.cpus_per_cell)
