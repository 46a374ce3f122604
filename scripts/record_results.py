#!/usr/bin/env python3
"""Keep a matrix's finished cells under ``docs/results/`` and turn them into the README's table.

``results/`` is an output directory: it is not committed and does not outlive the checkout. The
README's numbers must be traceable to committed data, so a finished cell's summary row (with its
per-step firing rates, wall time, cell id and config id) and its epoch history are copied here:

    record_results.py record results/fashion-mnist docs/results/fashion-mnist.csv --commit bb1a4b9
        merges the finished rows of results/fashion-mnist/summary.csv into the CSV (by cell id; a
        row of a re-run cell replaces the old one) and their epochs of history.csv into
        docs/results/fashion-mnist-history.csv; ``--commit`` is the code the cells ran on (default:
        HEAD of the checkout the results directory is in).
    record_results.py table docs/results/fashion-mnist.csv --matrix benchmarks.toml
        prints the README's table rows, one per configuration in the matrix's order; the cells of
        the CSV must all belong to the matrix, so the table describes the matrix that ships.
    record_results.py figure docs/results/fashion-mnist.csv docs/figures/firing_rate_per_step.png
        draws the test firing rate per time step of the online configurations (mean over seeds).
    record_results.py differences docs/results/fashion-mnist.csv --matrix benchmarks.toml
        the matrix's [[difference]] tables on the recorded cells (paired by seed, 95% interval,
        verdict; harness.differences): prints the markdown table and writes differences.md/csv
        and the gap-per-epoch plots under docs/results/fashion-mnist-differences/.

Run it with the project's virtual environment (``.venv/bin/python scripts/record_results.py``).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# The configuration's columns in the README table (then any other axis of the matrix, e.g.
# membrane_norm or a plugin option), then the seed; everything else is a metric.
CONFIG_COLUMNS = ("trainer", "normalizer", "threshold")
METRIC_HEADER = ("| seeds | test top-1 (final), mean ± std | best test top-1 | per seed (final) | test firing rate "
                 "| rate CV over t | wall time per cell |")


def extra_axes(cells: Sequence[Any]) -> list[str]:
    """The matrix's axes besides seed and CONFIG_COLUMNS, in the order its cells name them."""
    seen: dict[str, None] = {}
    for cell in cells:
        for key in cell.axes:
            if key != "seed" and key not in CONFIG_COLUMNS:
                seen.setdefault(key, None)
    return list(seen)


def axis_title(key: str) -> str:
    """``options.normalizer.osr.momentum_warmup_batches`` -> ``osr momentum_warmup_batches``."""
    parts = key.split(".")
    return " ".join(parts[2:]) if parts[0] == "options" and len(parts) == 4 else key


def axis_value(key: str, config: Mapping[str, Any]) -> str:
    """The configuration's value on an axis; a plugin option's axis reads "–" where the
    configuration does not use that plugin (the option changes nothing there)."""
    parts = key.split(".")
    if parts[0] == "options" and len(parts) == 4 and str(config.get(parts[1], "")) != parts[2]:
        return "–"
    return str(config.get(key, ""))


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], first: Sequence[str] = ()) -> None:
    columns: list[str] = [c for c in first if any(c in r for r in rows)]
    for row in rows:
        columns += [k for k in row if k not in columns]
    from harness.atomic import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})


def history_path(dest: Path) -> Path:
    return dest.with_name(dest.stem + "-history.csv")


def head_commit(directory: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(directory), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        raise SystemExit(f"record_results: {directory} is not in a git checkout; give the code's commit with --commit")
    return out.stdout.strip()


def record(results: Path, dest: Path, commit: str | None = None) -> list[dict[str, str]]:
    """Merge the finished cells of ``results/summary.csv`` (and their history) into ``dest``."""
    summary = results / "summary.csv"
    if not summary.exists():
        raise SystemExit(f"record_results: {summary} does not exist (no cell of that matrix has ended there)")
    finished = [r for r in read_csv(summary) if r.get("status") == "finished"]
    if not finished:
        raise SystemExit(f"record_results: no finished cell in {summary}")
    commit = commit or head_commit(results)
    for row in finished:
        row["code_commit"] = commit
    merged = {r["cell_id"]: r for r in read_csv(dest)}
    merged.update({r["cell_id"]: r for r in finished})
    write_csv(dest, list(merged.values()), first=("cell_id", "label", "status"))

    ids = {r["cell_id"] for r in finished}
    history = read_csv(results / "history.csv")
    kept = [h for h in read_csv(history_path(dest)) if h["cell_id"] not in ids]
    # The matrix-level metrics of each epoch (not the per-layer ones, "metric/<module path>"),
    # without the label (the summary row has it): a few kB per cell.
    fresh = [{k: h[k] for k in ("cell_id", "epoch", "metric", "value")} for h in history
             if h["cell_id"] in ids and "/" not in h["metric"]]
    write_csv(history_path(dest), kept + fresh)
    return finished


def matrix_cells(matrix: Path) -> list[Any]:
    from harness import get_registry
    from harness.matrix import load_matrix

    return load_matrix(matrix, get_registry()).cells


def _float(text: Any) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def _mean_std(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.fmean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def configurations(rows: Sequence[Mapping[str, str]], matrix: Path) -> list[tuple[dict[str, Any], list[Mapping[str, str]]]]:
    """The matrix's configurations in its order, each with its recorded cells (by seed).

    :raises SystemExit: a recorded cell is not a cell of the matrix (the table would describe
        something the matrix does not run).
    """
    from harness.config import config_id

    cells = matrix_cells(matrix)
    by_id = {c.id: c for c in cells}
    stray = sorted(r["cell_id"] for r in rows if r["cell_id"] not in by_id)
    if stray:
        raise SystemExit(f"record_results: {len(stray)} recorded cell(s) are not cells of {matrix}: "
                         f"{', '.join(stray[:5])}; re-run them or drop them from the CSV")
    recorded = {r["cell_id"]: r for r in rows}
    out: list[tuple[dict[str, Any], list[Mapping[str, str]]]] = []
    seen: dict[str, int] = {}
    for cell in cells:
        config = {k: v for k, v in cell.axes.items() if k != "seed"}
        label = config_id(cell.config)
        if label not in seen:
            seen[label] = len(out)
            out.append((config, []))
        if cell.id in recorded:
            out[seen[label]][1].append(recorded[cell.id])
    return out


def _threshold(config: Mapping[str, Any], cells: Sequence[Mapping[str, str]]) -> str:
    if "threshold" in config:
        return str(config["threshold"])
    return cells[0].get("threshold", "fixed") if cells else "fixed"


def table_rows(rows: Sequence[Mapping[str, str]], matrix: Path) -> list[str]:
    """The README's table: header, rule and one row per configuration of the matrix."""
    extras = extra_axes(matrix_cells(matrix))
    header = "| " + " | ".join([*CONFIG_COLUMNS, *map(axis_title, extras)]) + " " + METRIC_HEADER
    lines = [header, "|" + "---|" * (header.count(" | ") + 1)]
    for config, cells in configurations(rows, matrix):
        cells = sorted(cells, key=lambda r: int(r.get("seed") or 0))
        trainer, normalizer = config.get("trainer", ""), config.get("normalizer", "")
        threshold = _threshold(config, cells)
        first = " | ".join([f"| {trainer}", str(normalizer), threshold, *(axis_value(k, config) for k in extras)])
        if not cells:
            lines.append(f"{first} | | not run yet | | | | | |")
            continue
        final = [float(r["test_top1"]) for r in cells]
        best = [_float(r.get("best_test_top1")) or f for r, f in zip(cells, final)]
        rate = _mean(_float(r.get("test_firing_rate")) for r in cells)
        cv = _mean(_float(r.get("test_firing_rate_cv")) for r in cells)
        minutes = statistics.median(_float(r.get("duration_s")) or 0.0 for r in cells) / 60
        lines.append(" | ".join([
            first, ",".join(r["seed"] for r in cells),
            _mean_std(final), _mean_std(best), " / ".join(f"{100 * f:.2f}" for f in final),
            "" if rate is None else f"{rate:.3f}", "" if cv is None else f"{cv:.3f}",
            f"{minutes:.1f} min |",
        ]))
    return lines


def step_rates(rows: Sequence[Mapping[str, str]], matrix: Path, trainer: str = "online") -> dict[str, list[float]]:
    """Mean test firing rate at each step over the recorded seeds, per configuration of ``trainer``."""
    series: dict[str, list[float]] = {}
    for config, cells in configurations(rows, matrix):
        if config.get("trainer", trainer) != trainer or not cells:
            continue
        steps = sorted((k for k in cells[0] if k.startswith("test_firing_rate_t") and cells[0][k]),
                       key=lambda k: int(k.rsplit("t", 1)[1]))
        if not steps:
            continue
        extras = "".join(f", {axis_title(k)} {axis_value(k, config)}" for k in config if k not in CONFIG_COLUMNS
                         and axis_value(k, config) != "–")
        label = f"{config.get('normalizer', '')} + {_threshold(config, cells)}{extras} (n={len(cells)})"
        series[label] = [statistics.fmean(float(c[k]) for c in cells if c.get(k)) for k in steps]
    return series


def differences(recorded: Path, matrix: Path, out: Path | None = None) -> tuple[list[Any], list[Path]]:
    """The matrix's ``[[difference]]`` tables on the recorded cells and their history."""
    from harness import get_registry
    from harness.differences import write_differences
    from harness.matrix import load_matrix

    wanted = load_matrix(matrix, get_registry()).differences
    if not wanted:
        raise SystemExit(f"record_results: {matrix} has no [[difference]] table")
    rows = read_csv(recorded)
    configurations(rows, matrix)  # every recorded cell is one of the matrix's
    out = out or recorded.with_name(recorded.stem + "-differences")
    return write_differences(out, rows, read_csv(history_path(recorded)), wanted)


def changes(recorded: Path, matrix: Path, control: Path, control_matrix: Path) -> str:
    """How each ``[[difference]]`` the two matrices both name moved from the control's recorded
    cells to these (e.g. 5 to 20 epochs), paired by seed: a markdown table."""
    from harness import get_registry
    from harness.differences import format_gap_changes, gap_change, paired_difference
    from harness.matrix import load_matrix

    registry = get_registry()
    treated_matrix, base_matrix = load_matrix(matrix, registry), load_matrix(control_matrix, registry)
    mine = {d.name: d for d in treated_matrix.differences}
    theirs = {d.name: d for d in base_matrix.differences}
    shared = [name for name in mine if name in theirs]
    if not shared:
        raise SystemExit(f"record_results: {matrix} and {control_matrix} name no [[difference]] in common")
    from harness.validate import same_value

    for name in shared:  # one name, one comparison: the same metric, the sides agreeing where both name an axis
        here, there = mine[name], theirs[name]
        if here.metric != there.metric:
            raise SystemExit(f"record_results: difference {name!r} compares {here.metric} in {matrix} but "
                             f"{there.metric} in {control_matrix}")
        for side in ("a", "b"):
            x, y = getattr(here, side), getattr(there, side)
            clash = [k for k in x if k in y and not same_value(x[k], y[k])]
            if clash:
                raise SystemExit(f"record_results: difference {name!r}: its side {side} sets {clash[0]} to "
                                 f"{x[clash[0]]!r} in {matrix} but {y[clash[0]]!r} in {control_matrix}")
    left = [name for name in mine if name not in theirs]
    if left:
        print(f"record_results: no control in {control_matrix} for {', '.join(left)}", file=sys.stderr)
    rows, control_rows = read_csv(recorded), read_csv(control)
    configurations(rows, matrix)
    configurations(control_rows, control_matrix)
    found = [gap_change(paired_difference(control_rows, theirs[n]), paired_difference(rows, mine[n])) for n in shared]
    return format_gap_changes(found, control=base_matrix.name, treated=treated_matrix.name)


def format_differences(results: Sequence[Any]) -> str:
    from harness.differences import format_differences as fmt

    return fmt(results)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="merge a results directory's finished cells into a CSV under docs/results")
    rec.add_argument("results", type=Path, help="the matrix's results directory (holds summary.csv)")
    rec.add_argument("dest", type=Path)
    rec.add_argument("--commit", help="the code commit the cells ran on (default: HEAD of the results' checkout)")
    tab = sub.add_parser("table", help="print the README table rows")
    tab.add_argument("csv", type=Path)
    tab.add_argument("--matrix", type=Path, default=ROOT / "benchmarks.toml")
    fig = sub.add_parser("figure", help="draw the per-step firing rate of the online configurations")
    fig.add_argument("csv", type=Path)
    fig.add_argument("png", type=Path)
    fig.add_argument("--matrix", type=Path, default=ROOT / "benchmarks.toml")
    dif = sub.add_parser("differences", help="the matrix's [[difference]] tables on the recorded cells")
    dif.add_argument("csv", type=Path)
    dif.add_argument("--matrix", type=Path, default=ROOT / "benchmarks.toml")
    dif.add_argument("--out", type=Path, default=None, help="default: <csv stem>-differences/ beside the CSV")
    chg = sub.add_parser("changes", help="how the differences both matrices name moved from a control's cells to these")
    chg.add_argument("csv", type=Path)
    chg.add_argument("--matrix", type=Path, required=True)
    chg.add_argument("--control", type=Path, required=True, help="the control's record (e.g. docs/results/fashion-mnist.csv)")
    chg.add_argument("--control-matrix", type=Path, default=ROOT / "benchmarks.toml")
    args = parser.parse_args(argv)

    if args.command == "record":
        rows = record(args.results, args.dest, args.commit)
        print(f"recorded {len(rows)} finished cell(s) into {args.dest} and {history_path(args.dest)}")
    elif args.command == "table":
        print("\n".join(table_rows(read_csv(args.csv), args.matrix)))
    elif args.command == "changes":
        print(changes(args.csv, args.matrix, args.control, args.control_matrix))
    elif args.command == "differences":
        results, written = differences(args.csv, args.matrix, args.out)
        print(format_differences(results))
        print("wrote " + ", ".join(map(str, written)), file=sys.stderr)
    else:
        from harness.plots import plot_step_firing_rates

        series = step_rates(read_csv(args.csv), args.matrix)
        if not series:
            raise SystemExit(f"record_results: no online cell with per-step firing rates in {args.csv}")
        plot_step_firing_rates(series, args.png, title="Test firing rate per time step (online, mean over seeds)")
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
