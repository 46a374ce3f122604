"""Paired differences between two configurations of a matrix, and the verdict they support.

A difference ``a - b`` compares two configurations seed by seed: for every seed that both ran to
the end, ``d_s = metric(a, s) - metric(b, s)``. Over the ``n`` paired seeds the report gives the
mean ``d``, the standard deviation ``s_d`` and the two-sided Student-t interval at level ``L``
(95% by default)::

    d  +-  t_{(1 + L) / 2, n - 1} * s_d / sqrt(n)

and the verdict by the rule stated in the README: ``"a above b"`` if the interval lies above 0,
``"a below b"`` if it lies below, ``"unresolved"`` if it spans 0 (or fewer than two seeds pair).
Pairing by seed takes out what the seed does to both (the data order, the initial weights), so
the interval is that of the configurations' difference, not of their spreads.

The same pairing per epoch (the gap curve) comes from the epoch history. A difference is named
in a matrix file (``[[difference]]``: ``name``, ``a``, ``b``, optional ``metric``) or on the
command line (``harness report --difference "normalizer=osr" "normalizer=vanilla_bn"``). Input
is plain rows, as in ``summary.csv`` and ``history.csv``: no torch, no MLflow here.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import ConfigError
from harness.validate import same_value

PERCENT_METRICS = {"test_top1", "best_test_top1", "ema_test_top1", "best_ema_test_top1", "train_top1"}
KEYS = ("name", "a", "b", "metric")
LEVEL = 0.95


@dataclass(frozen=True)
class Difference:
    """``a - b``: each side is ``{axis: value}``, matching one configuration of the matrix."""

    name: str
    a: dict[str, Any]
    b: dict[str, Any]
    metric: str = "test_top1"


@dataclass(frozen=True)
class PairedDifference:
    """The outcome of one :class:`Difference` (values in percentage points for accuracies)."""

    difference: Difference
    seeds: tuple[Any, ...]
    per_seed: tuple[float, ...]
    mean: float | None
    std: float | None
    low: float | None
    high: float | None
    level: float = LEVEL
    a_mean: float | None = None
    b_mean: float | None = None
    unpaired: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # side -> seeds without a partner

    @property
    def verdict(self) -> str:
        if self.low is None or self.high is None:
            return "unresolved"
        if self.low > 0:
            return "a above b"
        if self.high < 0:
            return "a below b"
        return "unresolved"


def side_text(side: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in side.items())


def read_differences(tables: Any, source: str, axes: Iterable[str]) -> list[Difference]:
    """``[[difference]]`` tables of a matrix file, checked for their keys and axes (not yet for
    the configurations they select: :func:`check_against` does that with the cells)."""
    if tables in (None, []):
        return []
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{source}: [[difference]] must be an array of tables, got {tables!r}")
    axis_names = [a for a in axes if a != "seed"]
    out: list[Difference] = []
    names: set[str] = set()
    for i, table in enumerate(tables, 1):
        where = f"{source}: [[difference]] number {i}"
        unknown = [k for k in table if k not in KEYS]
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; expected one of: {', '.join(KEYS)}")
        for key in ("a", "b"):
            side = table.get(key)
            if not isinstance(side, dict) or not side:
                raise ConfigError(f"{where}: key {key!r} must be an inline table of axis values, e.g. "
                                  f"{key} = {{ normalizer = \"osr\" }}, got {side!r}")
            for axis in side:
                if axis not in axis_names:
                    raise ConfigError(f"{where}: key {key!r} names {axis!r}, which is not an axis of the matrix; "
                                      f"its axes: {', '.join(axis_names) or '(none but the seed)'}")
        name = table.get("name", f"{side_text(table['a'])} - {side_text(table['b'])}")
        if not isinstance(name, str) or not name or any(c in name for c in "/\\"):
            raise ConfigError(f"{where}: key 'name' must be a non-empty string without slashes, got {name!r}")
        if name in names:
            raise ConfigError(f"{where}: name {name!r} is used twice")
        names.add(name)
        metric = table.get("metric", "test_top1")
        if not isinstance(metric, str) or not metric:
            raise ConfigError(f"{where}: key 'metric' must be a metric's name (e.g. \"test_top1\"), got {metric!r}")
        out.append(Difference(name=name, a=dict(table["a"]), b=dict(table["b"]), metric=metric))
    return out


def check_against(differences: Sequence[Difference], cell_axes: Sequence[Mapping[str, Any]], source: str) -> None:
    """Each side of each difference selects exactly one configuration (the cells' axis values
    without the seed), and the two sides differ.

    :raises ConfigError: naming the difference, the side, and what it selects.
    """
    configs: list[dict[str, Any]] = []
    for axes in cell_axes:
        config = {k: v for k, v in axes.items() if k != "seed"}
        if config not in configs:
            configs.append(config)
    for i, diff in enumerate(differences, 1):
        picked = {}
        for key in ("a", "b"):
            side = getattr(diff, key)
            found = [c for c in configs if all(k in c and same_value(c[k], v) for k, v in side.items())]
            where = f"{source}: [[difference]] number {i} ({diff.name!r}) side {key!r} ({side_text(side)})"
            if not found:
                raise ConfigError(f"{where} matches no configuration of the matrix")
            if len(found) > 1:
                shown = "; ".join(side_text(c) for c in found[:4])
                raise ConfigError(f"{where} matches {len(found)} configurations ({shown}): add axis values to pick one")
            picked[key] = found[0]
        if picked["a"] == picked["b"]:
            raise ConfigError(f"{source}: [[difference]] number {i} ({diff.name!r}): a and b are the same configuration")


def parse_side(text: str) -> dict[str, Any]:
    """``"normalizer=osr,threshold=fixed"`` -> ``{"normalizer": "osr", "threshold": "fixed"}``
    (values read as TOML where they parse, as text otherwise)."""
    from harness.matrix import parse_cli_value

    side: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--difference: expected axis=value[,axis=value...], got {text!r}")
        side[key.strip()] = parse_cli_value(value.strip())
    if not side:
        raise ConfigError(f"--difference: expected axis=value[,axis=value...], got {text!r}")
    return side


def select(rows: Iterable[Mapping[str, Any]], side: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The finished rows whose axis values are those of ``side``."""
    return [r for r in rows if r.get("status") == "finished" and all(k in r and same_value(r[k], v) for k, v in side.items())]


def _by_seed(rows: Sequence[Mapping[str, Any]], side: Mapping[str, Any], name: str) -> dict[str, Mapping[str, Any]]:
    out: dict[str, Mapping[str, Any]] = {}
    for r in rows:
        seed = str(r.get("seed", ""))
        if seed in out:
            raise ConfigError(f"difference {name!r}: {side_text(side)} matches more than one configuration "
                              f"(two finished cells of seed {seed or '(none)'}): add axis values to pick one")
        out[seed] = r
    return out


def _value(row: Mapping[str, Any], metric: str) -> float | None:
    try:
        x = float(row.get(metric, ""))
    except (TypeError, ValueError):
        return None
    if not math.isfinite(x):
        return None
    return 100 * x if metric in PERCENT_METRICS else x


def interval(values: Sequence[float], level: float = LEVEL) -> tuple[float | None, float | None, float | None, float | None]:
    """``(mean, std, low, high)``: the Student-t interval of the mean at ``level`` (None where
    fewer than two values)."""
    if not values:
        return None, None, None, None
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None, None, None
    from scipy.stats import t

    std = statistics.stdev(values)
    half = float(t.ppf((1 + level) / 2, len(values) - 1)) * std / math.sqrt(len(values))
    return mean, std, mean - half, mean + half


def paired_difference(rows: Sequence[Mapping[str, Any]], diff: Difference, level: float = LEVEL) -> PairedDifference:
    """The difference ``a - b`` of ``diff.metric`` over the seeds both sides finished."""
    a = _by_seed(select(rows, diff.a), diff.a, diff.name)
    b = _by_seed(select(rows, diff.b), diff.b, diff.name)
    seeds, per_seed, a_vals, b_vals = [], [], [], []
    for seed in sorted(set(a) & set(b), key=_seed_key):
        va, vb = _value(a[seed], diff.metric), _value(b[seed], diff.metric)
        if va is None or vb is None:
            continue
        seeds.append(seed)
        per_seed.append(va - vb)
        a_vals.append(va)
        b_vals.append(vb)
    mean, std, low, high = interval(per_seed, level)
    unpaired = {k: tuple(sorted(set(mine) - set(other), key=_seed_key)) for k, mine, other in (("a", a, b), ("b", b, a))}
    return PairedDifference(
        difference=diff, seeds=tuple(seeds), per_seed=tuple(per_seed), mean=mean, std=std, low=low, high=high,
        level=level, a_mean=statistics.fmean(a_vals) if a_vals else None,
        b_mean=statistics.fmean(b_vals) if b_vals else None, unpaired={k: v for k, v in unpaired.items() if v},
    )


def gap_per_epoch(
    rows: Sequence[Mapping[str, Any]], history: Iterable[Mapping[str, Any]], diff: Difference, level: float = LEVEL
) -> list[tuple[int, float, float | None, float | None, int]]:
    """``[(epoch, mean, low, high, n)]``: the paired difference at each epoch of the history."""
    return _epoch_means(gap_per_seed(rows, history, diff), level)


def _epoch_means(per_seed: Mapping[str, Sequence[tuple[int, float]]], level: float = LEVEL
                 ) -> list[tuple[int, float, float | None, float | None, int]]:
    """:func:`gap_per_epoch` from :func:`gap_per_seed`'s points."""
    by_epoch: dict[int, list[float]] = {}
    for points in per_seed.values():
        for epoch, gap in points:
            by_epoch.setdefault(epoch, []).append(gap)
    out = []
    for epoch in sorted(by_epoch):
        mean, _, low, high = interval(by_epoch[epoch], level)
        out.append((epoch, mean, low, high, len(by_epoch[epoch])))  # type: ignore[arg-type]
    return out


def gap_per_seed(
    rows: Sequence[Mapping[str, Any]], history: Iterable[Mapping[str, Any]], diff: Difference
) -> dict[str, list[tuple[int, float]]]:
    """``{seed: [(epoch, a - b)]}``: each paired seed's difference at the epochs both sides
    recorded (in points for a percentage metric), seeds in order: the spread behind
    :func:`gap_per_epoch`'s mean."""
    from harness.report import curves

    a = _by_seed(select(rows, diff.a), diff.a, diff.name)
    b = _by_seed(select(rows, diff.b), diff.b, diff.name)
    seeds = sorted(set(a) & set(b), key=_seed_key)
    scale = 100.0 if diff.metric in PERCENT_METRICS else 1.0
    by_cell = curves(list(history), diff.metric, [a[s]["cell_id"] for s in seeds] + [b[s]["cell_id"] for s in seeds])
    out = {}
    for seed in seeds:
        ca, cb = by_cell.get(a[seed]["cell_id"], {}), by_cell.get(b[seed]["cell_id"], {})
        points = [(epoch, scale * (ca[epoch] - cb[epoch])) for epoch in sorted(set(ca) & set(cb))]
        if points:
            out[seed] = points
    return out


def _seed_key(seed: str) -> tuple[int, str]:
    try:
        return int(seed), ""
    except ValueError:
        return 1 << 30, seed


def _number(x: float | None, digits: int = 2) -> str:
    return "" if x is None else f"{x:+.{digits}f}"


def format_differences(results: Sequence[PairedDifference], fmt: str = "markdown") -> str:
    """The differences as a ``markdown`` table or ``csv`` text."""
    columns = ("difference", "a", "b", "metric", "seeds", "a mean", "b mean", "mean a - b", "std", "interval", "verdict", "per seed a - b")
    lines = []
    for r in results:
        pct = 100 * r.level
        lines.append({
            "difference": r.difference.name, "a": side_text(r.difference.a), "b": side_text(r.difference.b),
            "metric": r.difference.metric, "seeds": ",".join(r.seeds),
            "a mean": "" if r.a_mean is None else f"{r.a_mean:.2f}", "b mean": "" if r.b_mean is None else f"{r.b_mean:.2f}",
            "mean a - b": _number(r.mean), "std": "" if r.std is None else f"{r.std:.2f}",
            "interval": "" if r.low is None else f"{pct:.0f}%: [{r.low:+.2f}, {r.high:+.2f}]",
            "verdict": r.verdict + ("" if r.low is not None else f" (n={len(r.seeds)})"),
            "per seed a - b": " / ".join(f"{d:+.2f}" for d in r.per_seed),
        })
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(lines)
        return buf.getvalue()
    if fmt != "markdown":
        raise ValueError(f"unknown format {fmt!r}; use markdown or csv")
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    out += ["| " + " | ".join(line[c] for c in columns) + " |" for line in lines]
    return "\n".join(out)


@dataclass(frozen=True)
class GapChange:
    """How a difference ``a - b`` moved between two runs of the same configurations (a control,
    e.g. 5 epochs, and a treated run, e.g. 20): per seed both paired,
    ``c_s = (a - b)_treated,s - (a - b)_control,s``, with the Student-t interval of their mean."""

    name: str
    seeds: tuple[Any, ...]
    per_seed: tuple[float, ...]
    control_mean: float | None
    treated_mean: float | None
    mean: float | None
    std: float | None
    low: float | None
    high: float | None
    level: float = LEVEL

    @property
    def verdict(self) -> str:
        """``"a - b rose"`` / ``"a - b fell"`` when the interval excludes 0, else ``"unresolved"``."""
        if self.low is not None and self.low > 0:
            return "a - b rose"
        if self.high is not None and self.high < 0:
            return "a - b fell"
        return "unresolved"


def gap_change(control: PairedDifference, treated: PairedDifference, level: float = LEVEL) -> GapChange:
    """The change of one difference from ``control`` to ``treated``, paired by seed (the seeds
    both paired); each side's mean is over those seeds only."""
    before, after = dict(zip(control.seeds, control.per_seed)), dict(zip(treated.seeds, treated.per_seed))
    seeds = sorted(set(before) & set(after), key=_seed_key)
    per_seed = [after[s] - before[s] for s in seeds]
    mean, std, low, high = interval(per_seed, level)
    return GapChange(
        name=treated.difference.name, seeds=tuple(seeds), per_seed=tuple(per_seed),
        control_mean=statistics.fmean(before[s] for s in seeds) if seeds else None,
        treated_mean=statistics.fmean(after[s] for s in seeds) if seeds else None,
        mean=mean, std=std, low=low, high=high, level=level)


def format_gap_changes(changes: Sequence[GapChange], control: str = "control", treated: str = "treated") -> str:
    """The changes as a markdown table; ``control`` / ``treated`` name the two runs' columns."""
    columns = ("difference", "seeds", f"a - b, {control}", f"a - b, {treated}", "change", "std", "interval", "verdict",
               "per seed change")
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for c in changes:
        cells = (c.name, ",".join(map(str, c.seeds)), _number(c.control_mean), _number(c.treated_mean), _number(c.mean),
                 "" if c.std is None else f"{c.std:.2f}",
                 "" if c.low is None else f"{100 * c.level:.0f}%: [{c.low:+.2f}, {c.high:+.2f}]",
                 c.verdict + ("" if c.low is not None else f" (n={len(c.seeds)})"), " / ".join(f"{d:+.2f}" for d in c.per_seed))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def write_differences(
    out_dir: Path, rows: Sequence[Mapping[str, Any]], history: Sequence[Mapping[str, Any]], differences: Sequence[Difference]
) -> tuple[list[PairedDifference], list[Path]]:
    """``differences.md``, ``differences.csv`` and ``plots/gap_<name>.png`` (the paired gap per
    epoch with its interval and each seed's gap, where the history has epochs of both sides)
    under ``out_dir``."""
    from harness import plots
    from harness.atomic import write_text

    results = [paired_difference(rows, d) for d in differences]
    out_dir.mkdir(parents=True, exist_ok=True)
    rule = ("Paired by seed: mean of a - b over the seeds both finished, with its two-sided Student-t 95% interval; "
            "'a above b' / 'a below b' when the interval excludes 0, 'unresolved' when it spans 0 or fewer than two seeds pair.")
    write_text(out_dir / "differences.md", "# Differences\n\n" + rule + "\n\n" + format_differences(results) + "\n")
    write_text(out_dir / "differences.csv", format_differences(results, "csv"))
    written = [out_dir / "differences.md", out_dir / "differences.csv"]
    for diff in differences:
        spread = gap_per_seed(rows, history, diff)
        curve = _epoch_means(spread)
        if curve:
            written.append(plots.plot_gap_per_epoch(
                {diff.name: curve}, out_dir / "plots" / f"gap_{_file_name(diff.name)}.png", seeds=spread,
                ylabel=f"{diff.metric} a - b" + (" (points)" if diff.metric in PERCENT_METRICS else ""),
                title=f"{diff.name}\na = {side_text(diff.a)}\nb = {side_text(diff.b)}"))
    return results, written


def _file_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
