"""Writes ``results/<matrix>/summary.csv`` and ``summary.md`` after every cell (an observer)."""

from __future__ import annotations

from typing import Any

from harness import hookimpl
from harness.summary import row_for, write_summary


class SummaryWriter:
    """Keeps the summary files current: a crash later in the matrix loses no finished row."""

    def __init__(self) -> None:
        self.run: Any = None
        self.rows: list[dict[str, Any]] = []

    @hookimpl
    def on_matrix_start(self, run: Any) -> None:
        self.run = run

    @hookimpl
    def on_cell_end(self, cell: Any, result: Any) -> None:
        metrics = dict(result.metrics)
        metrics["epochs_completed"] = result.epochs_completed
        metrics["duration_s"] = round(result.duration_s, 2)
        self.rows.append(row_for(cell.id, cell.label, result.status, cell.axes, metrics, error_type=result.error_type or ""))
        write_summary(self.run.output_dir, self.rows, title=f"Matrix {self.run.matrix.name}")

    @hookimpl(tryfirst=True)  # before the tracker, which uploads summary.csv
    def on_matrix_end(self, run: Any, results: list[Any]) -> None:
        if self.rows:
            write_summary(run.output_dir, self.rows, title=f"Matrix {run.matrix.name}")


@hookimpl
def register_observers(observers: Any) -> None:
    observers.add(SummaryWriter(), "writer")
