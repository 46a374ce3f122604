"""Writes the result files of a matrix under ``results/<matrix>/`` (an observer):

* ``summary.csv`` / ``summary.md`` -- one row per cell, rewritten after every cell (a crash later
  in the matrix loses no finished row), with the comparison over seeds at the top of the ``.md``;
* ``history.csv`` -- every metric of every epoch (appended, never rewritten);
* ``cells/<cell id>/`` -- files a cell produced (e.g. membrane-potential histograms), and the
  ``traceback.txt`` of a cell that failed;
* ``plots/`` -- accuracy per epoch, firing rate per step, memory against T (at the matrix end).
"""

from __future__ import annotations

import logging
from typing import Any

from harness import hookimpl
from harness.report import append_history, history_rows, read_history, write_plots
from harness.config import config_id
from harness.summary import TRACEBACK, cell_files, row_for, write_summary

log = logging.getLogger(__name__)


class SummaryWriter:
    def __init__(self) -> None:
        self.run: Any = None
        self.rows: list[dict[str, Any]] = []
        self.merged: list[dict[str, Any]] = []

    @hookimpl
    def on_matrix_start(self, run: Any) -> None:
        self.run = run

    @hookimpl
    def on_epoch_end(self, cell: Any, epoch: int, metrics: dict[str, float]) -> None:
        append_history(self.run.output_dir / "history.csv", history_rows(cell.id, cell.label, epoch, metrics))

    @hookimpl
    def on_cell_end(self, cell: Any, result: Any) -> None:
        metrics = dict(result.metrics)
        metrics["epochs_completed"] = result.epochs_completed
        metrics["duration_s"] = round(result.duration_s, 2)
        self.rows.append(row_for(cell.id, cell.label, result.status, cell.axes, metrics, error_type=result.error_type or "",
                                 error=result.error_message or "", config_id=config_id(cell.config)))
        self.merged = write_summary(self.run.output_dir, self.rows, title=f"Matrix {self.run.matrix.name}")
        files = dict(result.artifacts)
        if result.error:
            files[TRACEBACK] = result.error.encode()
        if files:
            cell_dir = cell_files(self.run.output_dir, cell.id)
            cell_dir.mkdir(parents=True, exist_ok=True)
            for name, content in files.items():
                (cell_dir / name).write_bytes(content)

    @hookimpl(tryfirst=True)  # before the tracker, which uploads these files
    def on_matrix_end(self, run: Any, results: list[Any]) -> None:
        if not self.rows:
            return
        self.merged = write_summary(run.output_dir, self.rows, title=f"Matrix {run.matrix.name}")
        try:
            write_plots(run.output_dir, self.merged, read_history(run.output_dir / "history.csv"), list(run.matrix.axes))
        except Exception as exc:  # a plot must never cost the results
            log.warning("could not draw the plots of %s: %s", run.matrix.name, exc)


@hookimpl
def register_observers(observers: Any) -> None:
    observers.add(SummaryWriter(), "writer")
