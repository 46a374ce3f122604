"""Progress display (an observer): a live rich display on a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any

from harness import hookimpl
from harness.summary import TRACEBACK, cell_files


def _fmt_metrics(metrics: dict[str, float]) -> str:
    keys = [("train_loss", "loss {:.4f}"), ("train_top1", "train {:.2%}"), ("test_top1", "test {:.2%}"), ("epoch_time_s", "{:.1f}s")]
    return ", ".join(fmt.format(metrics[k]) for k, fmt in keys if k in metrics)


def _why(result: Any) -> str:
    """A failed cell's reason as a line says it; a killed cell's: that it was interrupted."""
    if result.status == "killed":
        return "interrupted (its checkpoint is kept: the next run resumes it)"
    return result.error_message or result.error_type or "no reason recorded"


class ProgressDisplay:
    """Cells overall, and the epochs and batches of every running cell (several run at once under
    a parallel executor: then each line names its cell)."""

    def __init__(self, stream: Any = None, live: bool | None = None) -> None:
        from rich.console import Console

        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.console = Console(file=self.stream, force_terminal=self.live, highlight=False, soft_wrap=True)
        self.progress: Any = None
        self.tasks: dict[str, Any] = {}  # "cells", and "<cell id> epochs" / "<cell id> batches" per running cell
        self.total = 0
        self.done = 0
        self.numbers: dict[str, int] = {}  # cell id -> its number, in the order cells started
        self.running: set[str] = set()
        self.overlapped = False  # cells ran at the same time: lines name their cell
        self.t0 = 0.0

    # -- matrix -----------------------------------------------------------------------------
    @hookimpl
    def on_matrix_start(self, run: Any) -> None:
        m = run.matrix
        self.total, self.done, self.t0 = len(m.cells), 0, time.perf_counter()
        self.console.print(
            f"matrix {m.name}: {len(m.cells)} cell(s) to run, {len(m.skipped)} skipped, {m.excluded} excluded"
            f" -> {run.output_dir}  (tracking: {run.tracking_uri})"
        )
        for c in m.skipped:
            self.console.print(f"  skipped [{c.label}]: {c.skip_reason}", markup=False)
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("{task.description}", markup=False),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self.progress.start()
            self.tasks["cells"] = self.progress.add_task("cells", total=self.total)

    @hookimpl
    def on_matrix_end(self, run: Any, results: list[Any]) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        counts: dict[str, int] = {}
        for r in results:
            counts[r.status] = counts.get(r.status, 0) + 1
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no cell ran"
        self.console.print(f"matrix {run.matrix.name}: {summary} in {time.perf_counter() - self.t0:.1f}s"
                           + ("  (interrupted)" if run.interrupted else ""))
        for r in results:
            if r.status != "finished":
                self.console.print(f"  {r.status} [{r.label}]: {_why(r)}", markup=False)
                trace = cell_files(run.output_dir, r.cell_id) / TRACEBACK
                if r.error and trace.exists():
                    self.console.print(f"    traceback: {trace}", markup=False)
        self.console.print(f"summary: {run.output_dir / 'summary.md'}")

    # -- cell -------------------------------------------------------------------------------
    def _print(self, line: str) -> None:
        (self.progress.console if self.progress is not None else self.console).print(line, markup=False)

    def _drop_tasks(self, cell_id: str) -> None:
        for name in (f"{cell_id} epochs", f"{cell_id} batches"):
            if name in self.tasks and self.progress is not None:
                self.progress.remove_task(self.tasks.pop(name))

    @hookimpl
    def on_cell_start(self, cell: Any, info: dict[str, Any]) -> None:
        number = self.numbers.setdefault(cell.id, len(self.numbers) + 1)
        self.running.add(cell.id)
        self.overlapped = self.overlapped or len(self.running) > 1
        head = f"[cell {number}/{self.total}] {cell.label} ({cell.id})"
        if info.get("resumed_from_epoch"):
            head += f" resumed after epoch {info['resumed_from_epoch']}"
        if info.get("checkpoint_discarded"):
            self._print(f"  warning: {info['checkpoint_discarded']}")
        for warning in info.get("warnings") or ():
            self._print(f"  warning: {warning}")
        if self.progress is not None:
            self._print(f"{head} on {info.get('device')}")
            self._drop_tasks(cell.id)
            short = f"  [{cell.label}] " if self.overlapped else "  "
            self.tasks[f"{cell.id} epochs"] = self.progress.add_task(f"{short}epochs", total=cell.config.epochs)
            self.tasks[f"{cell.id} batches"] = self.progress.add_task(f"{short}train", total=1)
        else:
            self._print(f"{head} started on {info.get('device')}, {info.get('num_parameters')} parameters")

    @hookimpl
    def on_cell_end(self, cell: Any, result: Any) -> None:
        self.done += 1
        self.running.discard(cell.id)
        number = self.numbers.setdefault(cell.id, len(self.numbers) + 1)
        acc = result.metrics.get("test_top1")
        if result.status == "failed":
            tail = _why(result)
        else:
            tail = f"test top-1 {acc:.2%}" if acc is not None else (result.error_type or "")
        line = f"[cell {number}/{self.total}] {cell.label}: {result.status}, {tail} ({result.duration_s:.1f}s)"
        if self.progress is not None:
            self._drop_tasks(cell.id)
            self.progress.advance(self.tasks["cells"])
        self._print(line)

    # -- epoch and batch ---------------------------------------------------------------------
    @hookimpl
    def on_batch_end(self, cell: Any, phase: str, batch: int, num_batches: int) -> None:
        task = self.tasks.get(f"{cell.id} batches")
        if self.progress is not None and task is not None:
            short = f"  [{cell.label}] " if self.overlapped else "  "
            self.progress.update(task, description=f"{short}{phase}", completed=batch, total=num_batches)

    @hookimpl
    def on_epoch_end(self, cell: Any, epoch: int, metrics: dict[str, float]) -> None:
        who = f"[{cell.label}] " if self.overlapped else ""
        line = f"  {who}epoch {epoch}/{cell.config.epochs}: {_fmt_metrics(metrics)}"
        task = self.tasks.get(f"{cell.id} epochs")
        if self.progress is not None and task is not None:
            self.progress.update(task, completed=epoch)
        self._print(line)


@hookimpl
def register_observers(observers: Any) -> None:
    observers.add(ProgressDisplay(), "display")
