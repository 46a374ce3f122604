"""One ``harness run``: fire the matrix hooks around an executor running the cells."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.executor import Executor, SerialExecutor
from harness.matrix import Matrix
from harness.registry import Registry

DEFAULT_EXPERIMENT = "snn-harness"


@dataclass
class MatrixRun:
    """What observers get in ``on_matrix_start``/``on_matrix_end``."""

    matrix: Matrix
    results_dir: Path  # results/ (the matrix writes into results_dir / matrix.name)
    tracking_uri: str
    experiment: str
    argv: list[str] = field(default_factory=list)
    interrupted: bool = False

    @property
    def output_dir(self) -> Path:
        return self.results_dir / self.matrix.name


def resolve_tracking_uri(results_dir: Path, *, cli: str | None = None, matrix: Matrix | None = None) -> str:
    """``--tracking-uri`` > ``[tracking] uri`` > ``$MLFLOW_TRACKING_URI`` > ``sqlite:///<results>/mlflow.db``.

    Always explicit: MLflow 3 silently falls back to a ``./mlruns`` file store otherwise.
    """
    uri = cli or (matrix.tracking.uri if matrix else None) or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
        return uri
    return "sqlite:///" + str((results_dir / "mlflow.db").resolve())


def run_matrix(run: MatrixRun, registry: Registry, hook: Any, executor: Executor | None = None) -> list[Any]:
    """Run every runnable cell of ``run.matrix``; returns one result per cell that started.

    ``KeyboardInterrupt`` ends the matrix: ``run.interrupted`` is set, ``on_matrix_end`` still
    fires (with the results so far), and the interrupt propagates.
    """
    from harness.runner import run_cell  # torch is imported only when cells really run

    run.output_dir.mkdir(parents=True, exist_ok=True)
    executor = executor or SerialExecutor()
    results: list[Any] = []
    hook.on_matrix_start(run=run)
    try:
        for result in executor.map(functools.partial(run_cell, registry=registry, hook=hook), run.matrix.cells):
            results.append(result)
    except KeyboardInterrupt as exc:
        run.interrupted = True
        killed = getattr(exc, "result", None)  # runner.CellInterrupted carries the killed cell
        if killed is not None:
            results.append(killed)
        raise
    finally:
        hook.on_matrix_end(run=run, results=results)
    return results
