"""``summary.csv`` and ``summary.md``: one row per cell with its final metrics. No torch, no MLflow."""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from harness.atomic import atomic_write, write_text

LEAD = ["cell_id", "label", "status"]
METRICS = [
    "test_top1", "best_test_top1", "ema_test_top1", "best_ema_test_top1", "train_top1", "train_loss", "test_loss",
    "test_firing_rate", "test_firing_rate_cv", "train_firing_rate",
    "train_saved_bytes_peak", "train_cuda_peak_bytes", "peak_rss_bytes",
    "train_samples_per_s", "test_samples_per_s", "train_data_time_s",
    "synops", "synops_ac", "synops_mac", "num_parameters", "model_size_bytes",
    "epochs_completed", "duration_s",
]  # fmt: skip
# Kept in summary.csv (the per-step plots read them) but not in the markdown table.
CSV_ONLY = re.compile(r"^test_firing_rate_t\d+$")
MARKDOWN_SKIP = {"error_type", "label", "run_id", "config_id", "peak_rss_bytes", "train_data_time_s", "synops_ac", "model_size_bytes", "train_firing_rate"}
TRAIL = ["error_type", "error", "config_id", "run_id"]
PERCENT = {"test_top1", "best_test_top1", "ema_test_top1", "best_ema_test_top1", "train_top1"}
TRACEBACK = "traceback.txt"  # a failed cell's whole traceback, among its files


def cell_files(out_dir: Path, cell_id: str) -> Path:
    """``<results>/<matrix>/cells/<cell id>/``: the files of one cell (its traceback if it failed)."""
    return out_dir / "cells" / cell_id


def row_for(cell_id: str, label: str, status: str, axes: dict[str, Any], metrics: dict[str, Any], **extra: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"cell_id": cell_id, "label": label, "status": status}
    row.update({k: _plain(v) for k, v in axes.items()})
    row.update({k: metrics.get(k, "") for k in METRICS if k in metrics})
    row.update({k: v for k, v in metrics.items() if CSV_ONLY.match(k)})
    row.update(extra)
    return row


def columns(rows: Iterable[dict[str, Any]]) -> list[str]:
    seen: list[str] = []
    for row in rows:
        for k in row:
            if k not in seen:
                seen.append(k)
    middle = [k for k in seen if k not in LEAD + METRICS + TRAIL and not CSV_ONLY.match(k)]
    steps = sorted((k for k in seen if CSV_ONLY.match(k)), key=lambda k: int(k.rsplit("t", 1)[1]))
    return LEAD + middle + [k for k in METRICS if k in seen] + steps + [k for k in TRAIL if k in seen]


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def merge(existing: Sequence[dict[str, Any]], new: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows by cell id, in first-seen order. A newer row replaces an older one of the same cell,
    except that a failed or killed row never replaces a finished one."""
    merged: dict[str, dict[str, Any]] = {r["cell_id"]: dict(r) for r in existing}
    for row in new:
        old = merged.get(row["cell_id"])
        if old is not None and old.get("status") == "finished" and row.get("status") != "finished":
            continue
        merged[row["cell_id"]] = dict(row)
    return list(merged.values())


def write_summary(out_dir: Path, rows: Sequence[dict[str, Any]], *, merge_existing: bool = True, title: str = "") -> list[dict[str, Any]]:
    """Write ``summary.csv`` and ``summary.md`` under ``out_dir`` (atomically); returns the rows written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "summary.csv"
    if merge_existing:
        rows = merge(read_rows(csv_path), rows)
    cols = columns(rows)
    with atomic_write(csv_path, newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in cols})
    write_text(out_dir / "summary.md", markdown_document(rows, title))
    return list(rows)


def markdown_document(rows: Sequence[dict[str, Any]], title: str = "") -> str:
    """``summary.md``: the comparison over seeds (finished cells), then every cell."""
    from harness.report import compare, format_comparison

    parts = [f"# {title}\n"] if title else []
    entries = compare(rows)
    if entries:
        parts += ["## Comparison (finished cells; mean ± std over seeds)\n", format_comparison(entries, "markdown") + "\n", "## Cells\n"]
    parts.append(markdown_table(rows) + "\n")
    return "\n".join(parts)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    cols = [c for c in columns(rows) if c not in MARKDOWN_SKIP and not CSV_ONLY.match(c)
            and (c != "error" or any(r.get(c) for r in rows))]  # the reason column only where a cell failed
    header = [_title(c) for c in cols]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(format_value(c, row.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def format_value(column: str, value: Any) -> str:
    if value in ("", None):
        return ""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if column in PERCENT:
        return f"{100 * number:.2f}%"
    if column == "epochs_completed":
        return str(int(number))
    if column.endswith("_bytes") or column.endswith("_bytes_peak"):
        return f"{number / 2**20:.2f} MiB"
    if column.startswith("synops"):
        return f"{number:.3g}"
    if "firing_rate" in column:
        return f"{number:.4f}"
    if column.endswith("_s") or column.endswith("_per_s"):
        return f"{number:.1f}"
    if column == "num_parameters":
        return str(int(number))
    if column.endswith("loss"):
        return f"{number:.4f}"
    return str(value)


def _title(column: str) -> str:
    return {
        "cell_id": "cell",
        "test_top1": "test top-1",
        "best_test_top1": "best test top-1",
        "ema_test_top1": "EMA test top-1",
        "best_ema_test_top1": "best EMA test top-1",
        "train_top1": "train top-1",
        "train_loss": "train loss",
        "test_loss": "test loss",
        "duration_s": "time (s)",
        "epochs_completed": "epochs done",
        "error": "why it failed",
        "test_firing_rate": "test firing rate",
        "test_firing_rate_cv": "rate CV over t",
        "train_saved_bytes_peak": "saved for backward",
        "train_cuda_peak_bytes": "CUDA peak",
        "train_samples_per_s": "train samples/s",
        "test_samples_per_s": "test samples/s",
        "synops": "SynOps/sample",
        "synops_mac": "MACs/sample",
        "num_parameters": "parameters",
    }.get(column, column)


def _plain(value: Any) -> Any:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
