"""The comparison across a matrix: aggregate cells over seeds, format the table, draw the plots.

Input is plain data -- summary rows (one per cell, as in ``summary.csv``) and an epoch history
(``history.csv``: cell id, label, epoch, metric, value) -- so the same code serves a matrix that
just ended and ``harness report``, which rebuilds both from MLflow. No torch, no MLflow here.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

HISTORY_COLUMNS = ("cell_id", "label", "epoch", "metric", "value")
STEP_RATE = re.compile(r"^test_firing_rate_t(\d+)$")

# (column, summary metric, how to aggregate over seeds)
COMPARISON = (
    ("test_top1", "test_top1", "mean_std"),
    ("best_test_top1", "best_test_top1", "mean_std"),
    ("test_firing_rate", "test_firing_rate", "mean"),
    ("test_firing_rate_cv", "test_firing_rate_cv", "mean"),
    ("train_saved_mib", "train_saved_bytes_peak", "mib"),
    ("train_cuda_peak_mib", "train_cuda_peak_bytes", "mib"),
    ("train_samples_per_s", "train_samples_per_s", "mean"),
    ("test_samples_per_s", "test_samples_per_s", "mean"),
    ("synops", "synops", "mean"),
    ("synops_mac", "synops_mac", "mean"),
    ("num_parameters", "num_parameters", "mean"),
)
TITLES = {
    "configuration": "configuration",
    "seeds": "seeds",
    "test_top1": "test top-1 (%)",
    "best_test_top1": "best test top-1 (%)",
    "test_firing_rate": "firing rate",
    "test_firing_rate_cv": "rate CV over t",
    "train_saved_mib": "saved for backward (MiB)",
    "train_cuda_peak_mib": "CUDA peak (MiB)",
    "train_samples_per_s": "train samples/s",
    "test_samples_per_s": "test samples/s",
    "synops": "SynOps/sample",
    "synops_mac": "MACs/sample",
    "num_parameters": "parameters",
}


def _float(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def axis_columns(rows: Sequence[Mapping[str, Any]], axes: Iterable[str] | None = None) -> list[str]:
    """The matrix axes present in the rows (the columns between the lead and the metrics)."""
    from harness.summary import LEAD, METRICS, TRAIL

    if axes is not None:
        return [a for a in axes if any(a in r for r in rows)]
    skip = set(LEAD) | set(METRICS) | set(TRAIL)
    out: list[str] = []
    for r in rows:
        for k in r:
            if k not in skip and not STEP_RATE.match(k) and k not in out:
                out.append(k)
    return out


def configuration(row: Mapping[str, Any], axes: Sequence[str], drop: Iterable[str] = ("seed",)) -> str:
    """The row's axis values without ``drop`` (seeds of one configuration share this label)."""
    dropped = set(drop)
    parts = [f"{a}={row.get(a, '')}" for a in axes if a not in dropped]
    return " ".join(parts) or "default"


def compare(rows: Sequence[Mapping[str, Any]], axes: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per configuration (finished cells, grouped over seeds by ``config_id``, or by the
    axis values without the seed for rows that lack one): mean and standard deviation of the
    accuracy, means of the rest. Values are plain numbers (accuracy in %, memory in MiB); ``seeds``
    counts the cells of the group, ``n_<column>`` the ones a column's mean is over when fewer."""
    axes = axis_columns(rows, axes)
    groups: dict[str, list[Mapping[str, Any]]] = {}
    labels: dict[str, str] = {}
    for r in rows:
        if r.get("status") != "finished":
            continue
        label = configuration(r, axes)
        key = str(r.get("config_id") or "") or f"label:{label}"
        groups.setdefault(key, []).append(r)
        labels[key] = label
    clash = {lab for lab in labels.values() if list(labels.values()).count(lab) > 1}
    out = []
    for key, members in groups.items():
        label = labels[key] + (f" [config {key[:8]}]" if labels[key] in clash else "")
        entry: dict[str, Any] = {"configuration": label, "seeds": len(members),
                                 "axes": {a: members[0].get(a, "") for a in axes if a != "seed"}}
        for column, metric, how in COMPARISON:
            values = [v for v in (_float(m.get(metric)) for m in members) if v is not None]
            if not values:
                continue
            if len(values) < len(members):
                entry["n_" + column] = len(values)
            if how == "mean_std":
                entry[column] = 100 * statistics.fmean(values)
                entry[column + "_std"] = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
            elif how == "mib":
                entry[column] = statistics.fmean(values) / 2**20
            else:
                entry[column] = statistics.fmean(values)
        out.append(entry)
    return out


def _cell(column: str, entry: Mapping[str, Any]) -> str:
    value = entry.get(column)
    if value is None:
        return ""
    if column in ("configuration",) or isinstance(value, str):
        return str(value)
    if column == "seeds" or column == "num_parameters":
        return f"{int(round(value))}"
    if column in ("test_top1", "best_test_top1"):
        std = entry.get(column + "_std", 0.0)
        return f"{value:.2f} ± {std:.2f}" if entry.get("seeds", 1) > 1 else f"{value:.2f}"
    if column.startswith("test_firing_rate"):
        return f"{value:.4f}"
    if column.endswith("_mib"):
        return f"{value:.2f}"
    if column.startswith("synops"):
        return f"{value:.3g}"
    return f"{value:.1f}"


def varying_axes(entries: Sequence[Mapping[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    """``(axes whose value differs between configurations, {axis: value} of those that do not})``."""
    names: list[str] = []
    for e in entries:
        names += [a for a in e.get("axes", {}) if a not in names]
    varying = [a for a in names if len({str(e.get("axes", {}).get(a, "")) for e in entries}) > 1]
    fixed = {a: entries[0]["axes"].get(a, "") for a in names if a not in varying}
    return varying, fixed


def comparison_columns(entries: Sequence[Mapping[str, Any]]) -> list[str]:
    cols = ["configuration", "seeds"] + [c for c, _, _ in COMPARISON]
    return [c for c in cols if any(c in e for e in entries)]


def format_comparison(entries: Sequence[Mapping[str, Any]], fmt: str = "markdown") -> str:
    """The comparison as ``markdown``, ``csv`` or ``json`` text."""
    cols = comparison_columns(entries)
    if fmt == "json":
        return json.dumps([dict(e) for e in entries], indent=2, sort_keys=False)
    if fmt == "csv":
        buf = io.StringIO()
        fields = [f for c in cols for f in ((c, c + "_std") if c in ("test_top1", "best_test_top1") else (c,))]
        writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for e in entries:
            writer.writerow({c: e.get(c, "") for c in fields})
        return buf.getvalue()
    if fmt == "markdown":
        lines = ["| " + " | ".join(TITLES.get(c, c) for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        lines += ["| " + " | ".join(_cell(c, e) for c in cols) + " |" for e in entries]
        return "\n".join(lines)
    raise ValueError(f"unknown format {fmt!r}; use markdown, csv or json")


# --- epoch history -------------------------------------------------------------------------------


def history_rows(cell_id: str, label: str, epoch: int, metrics: Mapping[str, float]) -> list[dict[str, Any]]:
    return [{"cell_id": cell_id, "label": label, "epoch": epoch, "metric": k, "value": v} for k, v in metrics.items()]


def append_history(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Append to ``history.csv`` (never rewrites what is there)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def read_history(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def curves(history: Iterable[Mapping[str, Any]], metric: str, cell_ids: Iterable[str] | None = None) -> dict[str, dict[int, float]]:
    """``{cell_id: {epoch: value}}`` for ``metric``; a later entry of the same epoch wins."""
    wanted = set(cell_ids) if cell_ids is not None else None
    out: dict[str, dict[int, float]] = {}
    for h in history:
        if h.get("metric") != metric or (wanted is not None and h["cell_id"] not in wanted):
            continue
        value = _float(h.get("value"))
        try:
            epoch = int(h.get("epoch") or "")
        except ValueError:  # a line cut short by a kill
            continue
        if value is not None:
            out.setdefault(h["cell_id"], {})[epoch] = value
    return out


# --- plots ---------------------------------------------------------------------------------------


def write_plots(
    out_dir: Path, rows: Sequence[Mapping[str, Any]], history: Sequence[Mapping[str, Any]], axes: Sequence[str] | None = None
) -> list[Path]:
    """Write what the data allows under ``out_dir/plots``: test accuracy per epoch of every cell,
    the per-step firing rate of every configuration (Fig. 2b), and -- when the matrix has a
    ``time_steps`` axis -- memory against T per configuration (Fig. 2a). Returns the files."""
    from harness import plots

    axes = axis_columns(rows, axes)
    finished = [r for r in rows if r.get("status") == "finished"]
    labels = {r["cell_id"]: (r.get("label") or configuration(r, axes, drop=())) for r in rows}
    written: list[Path] = []
    plot_dir = out_dir / "plots"

    acc = curves(history, "test_top1", labels)
    if acc:
        series = {labels[cid]: sorted(points.items()) for cid, points in acc.items()}
        written.append(plots.plot_accuracy_curves(series, plot_dir / "test_accuracy.png"))

    rates: dict[str, list[list[float]]] = {}
    for r in finished:
        steps = sorted((int(m.group(1)), _float(v)) for k, v in r.items() if (m := STEP_RATE.match(k)) and _float(v) is not None)
        if steps:
            rates.setdefault(configuration(r, axes), []).append([v for _, v in steps])  # type: ignore[misc]
    if rates:
        series = {}
        for label, runs in rates.items():
            T = min(len(x) for x in runs)
            series[label] = [statistics.fmean(x[t] for x in runs) for t in range(T)]
        written.append(plots.plot_step_firing_rates(series, plot_dir / "firing_rate_per_step.png", title="Test firing rate per time step (mean over seeds)"))

    if "time_steps" in axes:
        for metric, name, ylabel in (
            ("train_saved_bytes_peak", "memory_vs_time_steps.png", "saved for backward (MiB)"),
            ("train_cuda_peak_bytes", "cuda_memory_vs_time_steps.png", "CUDA peak allocated (MiB)"),
        ):
            points: dict[str, dict[int, list[float]]] = {}
            for r in finished:
                value, T = _float(r.get(metric)), _float(r.get("time_steps"))
                if value is None or T is None:
                    continue
                points.setdefault(configuration(r, axes, drop=("seed", "time_steps")), {}).setdefault(int(T), []).append(value)
            if points:
                data = {label: sorted((T, statistics.fmean(v)) for T, v in by_t.items()) for label, by_t in points.items()}
                written.append(plots.plot_memory_vs_time_steps(data, plot_dir / name, ylabel=ylabel, title="Training memory vs time steps"))
    return written


def memory_ratios(rows: Sequence[Mapping[str, Any]], metric: str = "train_saved_bytes_peak", numerator: str = "online", denominator: str = "bptt") -> dict[int, float]:
    """``{T: memory(online) / memory(bptt)}`` over finished cells that differ only in trainer."""
    by: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        value, T = _float(r.get(metric)), _float(r.get("time_steps"))
        if r.get("status") == "finished" and value is not None and T is not None:
            by.setdefault((str(r.get("trainer", "")), int(T)), []).append(value)
    out = {}
    for (trainer, T), values in sorted(by.items()):
        if trainer == numerator and (denominator, T) in by:
            out[T] = statistics.fmean(values) / statistics.fmean(by[(denominator, T)])
    return out
