"""Plots of a benchmark's results, written as PNG files.

The figures follow the paper "Online Stabilization of Spiking Neural Networks" (ICLR 2024):

* :func:`plot_memory_vs_time_steps`: Fig. 2a, training memory against the number of time steps
  ``T``, online training against BPTT.
* :func:`plot_step_firing_rates`: Fig. 2b, firing rate at each time step, with and without
  OTS (online threshold stabilization).
* :func:`plot_membrane_histograms`: Fig. 3, distributions of the membrane potential per
  layer and time step, with the threshold of that step.
* :func:`plot_accuracy_curves`: test accuracy per epoch of each matrix cell (no paper figure;
  the paper reports final accuracies in tables).

Every public function takes plain Python data (mappings of labels to lists, tuples or NumPy
arrays; no torch tensors, no MLflow objects), writes exactly one PNG atomically (a temporary
file in the target directory, then :func:`os.replace`), creates missing parent directories and
returns the :class:`~pathlib.Path` it wrote. Non-finite values (NaN, inf) are skipped; empty
input raises :class:`ValueError` naming the function.

Figures are built with :class:`matplotlib.figure.Figure` and rendered by
:class:`~matplotlib.backends.backend_agg.FigureCanvasAgg`. The module never imports
:mod:`matplotlib.pyplot`, so it neither selects a global backend nor opens windows, and no figure
is kept in a global registry: each one is freed once written. The private ``_*_figure`` builders
return the figure without writing it (the tests inspect them).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, PercentFormatter

from harness.atomic import atomic_write

__all__ = [
    "is_png",
    "plot_accuracy_curves",
    "plot_membrane_histograms",
    "plot_memory_vs_time_steps",
    "plot_step_firing_rates",
]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_DPI = 100
_MIB = 1024.0 * 1024.0
_MAX_LABEL_CHARS = 60
# Series with at most this many points get a marker at each point (10 when there are many lines).
_MARKER_MAX_POINTS = 30
# The legend sits to the right of the axes, never over the lines; a second column beyond this many.
_LEGEND_ONE_COLUMN_MAX = 15
_LINESTYLES = ("-", "--", ":", "-.")
# Markers of series that may coincide (memory against T): each series its own hollow shape, in
# sizes that nest, so a point hidden under another's still shows its outline.
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def is_png(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a file that starts with the 8-byte PNG signature.

    A missing or unreadable file is not a PNG (returns ``False``).
    """
    try:
        with open(path, "rb") as fh:
            return fh.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE
    except OSError:
        return False


def plot_step_firing_rates(
    series: Mapping[str, Sequence[float]],
    path: str | Path,
    *,
    title: str = "Firing rate per time step",
) -> Path:
    """Firing rate at each time step, one line per configuration (paper Fig. 2b).

    Reproduces Fig. 2b: the firing rate of each step with and without OTS. ``series[label][i]``
    is the fraction of neurons that fired at step ``t = i + 1``; the x axis shows the integer
    steps ``1..T`` and labels may have different ``T``. Rates are drawn in percent: when every
    finite value of the whole plot lies in ``[0, 1]`` they are read as fractions and multiplied by
    100, otherwise they are taken to be percentages already. NaN steps are skipped; a label with a
    single step is drawn as a marker.

    :raises ValueError: if ``series`` is empty or every sequence in it is empty.
    """
    return _save(_step_firing_rates_figure(series, title=title), path)


def plot_memory_vs_time_steps(
    points: Mapping[str, Sequence[tuple[int, float]]],
    path: str | Path,
    *,
    ylabel: str = "saved for backward (MiB)",
    title: str = "Training memory vs. number of time steps",
) -> Path:
    """Training memory against the number of time steps, one line per trainer (paper Fig. 2a).

    Reproduces Fig. 2a: memory of online training (flat in ``T``) against BPTT (linear in ``T``).
    ``points[label]`` holds ``(T, bytes)`` pairs in any order; they are sorted by ``T`` and the
    bytes are shown in MiB (``bytes / 2**20``), with a marker at each point. Pairs with a
    non-finite value are skipped.

    :raises ValueError: if ``points`` is empty, every sequence in it is empty, or an item is not
        a ``(T, bytes)`` pair.
    """
    return _save(_memory_figure(points, ylabel=ylabel, title=title), path)


def plot_accuracy_curves(
    curves: Mapping[str, Sequence[tuple[int, float]]],
    path: str | Path,
    *,
    title: str = "Test accuracy per epoch",
) -> Path:
    """Test accuracy per epoch, one line per matrix cell.

    No paper figure (the paper reports final accuracies in its tables); this is the learning-curve
    view of the same runs. ``curves[label]`` holds ``(epoch, accuracy)`` pairs in any order, with
    the accuracy a fraction in ``[0, 1]``, shown in percent (always multiplied by 100: a value
    given in percent by mistake shows up as an implausible axis rather than being guessed at).
    NaN accuracies are skipped; a cell with a single epoch is drawn as a marker.

    :raises ValueError: if ``curves`` is empty, every sequence in it is empty, or an item is not
        an ``(epoch, accuracy)`` pair.
    """
    return _save(_accuracy_figure(curves, title=title), path)


def plot_gap_per_epoch(
    series: Mapping[str, Sequence[tuple[int, float, float | None, float | None, int]]],
    path: str | Path,
    *,
    ylabel: str = "difference a - b",
    title: str = "Paired difference per epoch",
    seeds: Mapping[str, Sequence[tuple[int, float]]] | None = None,
) -> Path:
    """The paired difference of two configurations at each epoch, with its interval as a band.

    ``series[label]`` holds ``(epoch, mean, low, high, n)`` as :func:`harness.differences.gap_per_epoch`
    returns them: the mean over the paired seeds of ``a - b`` and its interval (``None`` where fewer
    than two seeds pair: no band there). A line at 0 marks where the order of the two turns.
    ``seeds[seed]``: that seed's ``(epoch, a - b)`` (:func:`harness.differences.gap_per_seed`),
    drawn thin behind the mean: the spread the interval summarizes (one series only).

    :raises ValueError: if ``series`` is empty or holds no point, or ``seeds`` comes with more
        than one series.
    """
    name = "plot_gap_per_epoch"
    items = _items(name, series, "series")
    _require_points(name, "series", (len(pts) for _, pts in items))
    if seeds and len(items) > 1:
        raise ValueError(f"{name}: seeds= draws the spread of one series; got {len(items)} series")
    (fig, (ax,)) = _line_figure(len(items), title=title)
    colors = _palette(len(items))
    ax.axhline(0.0, color="0.4", linewidth=1.0, linestyle="--")
    for k, (seed, pts) in enumerate((seeds or {}).items()):
        label = f"seed {seed}" if len(seeds or {}) <= 5 else ("each seed" if k == 0 else None)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colors[0], alpha=0.45, linewidth=0.9,
                linestyle=_LINESTYLES[(k + 1) % len(_LINESTYLES)], marker=".", markersize=3, label=label)
    for i, (label, pts) in enumerate(items):
        epochs = np.array([p[0] for p in pts], dtype=float)
        mean = np.array([p[1] for p in pts], dtype=float)
        low = np.array([np.nan if p[2] is None else p[2] for p in pts], dtype=float)
        high = np.array([np.nan if p[3] is None else p[3] for p in pts], dtype=float)
        n = max(p[4] for p in pts)
        _plot_line(ax, i, len(items), f"a - b, mean (n={n} seed{'' if n == 1 else 's'})" if len(items) == 1 else f"{label} (n={n})", epochs, mean)
        band = np.isfinite(low) & np.isfinite(high)
        if band.any():
            ax.fill_between(epochs, low, high, where=band, color=colors[i % len(colors)], alpha=0.18, linewidth=0,
                            label="95% interval" if len(items) == 1 else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _finish_line_axes(fig, [ax], len(items))
    return _save(fig, path)


def plot_membrane_histograms(
    values: Mapping[str, Sequence[Sequence[float]]],
    path: str | Path,
    *,
    thresholds: Mapping[str, Sequence[float]] | None = None,
    bins: int = 60,
    title: str = "Membrane potential distributions per layer and time step",
) -> Path:
    """Histograms of membrane potentials, one row per layer and one column per step (paper Fig. 3).

    Reproduces Fig. 3: ``values[layer][t]`` is a flat sequence (list or NumPy array; it is
    flattened) of the membrane potentials of ``layer`` at step ``t + 1``, after charging and
    before firing. Each panel is a histogram normalized to the fraction of that panel's neurons;
    panels of one row share their bins, so the steps of a layer are comparable. When
    ``thresholds[layer][t]`` is given, a vertical dashed line marks it. Non-finite potentials and
    thresholds are skipped; a step without any finite value shows "no data". Layers with fewer
    steps than the longest one leave their last panels blank.

    :raises ValueError: if ``values`` is empty, every layer has no steps, or ``bins < 1``.
    """
    return _save(_membrane_figure(values, thresholds=thresholds, bins=bins, title=title), path)


# --------------------------------------------------------------------------------------------
# Figure builders (private; they return the figure without writing it)
# --------------------------------------------------------------------------------------------


def _step_firing_rates_figure(series: Mapping[str, Sequence[float]], *, title: str) -> Figure:
    name = "plot_step_firing_rates"
    data: list[tuple[str, np.ndarray, np.ndarray]] = []
    for label, rates in _items(name, series, "series"):
        y = _floats(name, label, rates)
        x = np.arange(1, y.size + 1, dtype=float)
        data.append((label, x, y))
    _require_points(name, "series", (y.size for _, _, y in data))

    scale = _percent_scale([y for _, _, y in data])
    steps = sorted({y.size for _, _, y in data})  # configurations of different T: a panel each
    fig, axes = _line_figure(len(data), title=title, panels=len(steps))
    for ax, T in zip(axes, steps):
        for i, (label, x, y) in enumerate(data):
            if y.size == T:
                _plot_line(ax, i, len(data), label, x, y * scale)
        if len(steps) > 1:
            ax.set_title(f"T = {T}", fontsize="medium")
        ax.set_xlabel("time step t")
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=100))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylim(bottom=0)  # once every panel holds its lines: the shared scale covers them all
    axes[0].set_ylabel("firing rate (% of neurons that fired)")
    _finish_line_axes(fig, axes, len(data))
    return fig


def _memory_figure(
    points: Mapping[str, Sequence[tuple[int, float]]], *, ylabel: str, title: str
) -> Figure:
    name = "plot_memory_vs_time_steps"
    data = [(label, *_pairs(name, label, pts)) for label, pts in _items(name, points, "points")]
    _require_points(name, "points", (x.size for _, x, _ in data))

    (fig, (ax,)) = _line_figure(len(data), title=title)
    for i, (label, x, y) in enumerate(data):
        _plot_line(ax, i, len(data), label, x, y / _MIB, nested_markers=True)
    ax.set_xlabel("number of time steps T")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    _finish_line_axes(fig, [ax], len(data))
    return fig


def _accuracy_figure(curves: Mapping[str, Sequence[tuple[int, float]]], *, title: str) -> Figure:
    name = "plot_accuracy_curves"
    data = [(label, *_pairs(name, label, pts)) for label, pts in _items(name, curves, "curves")]
    _require_points(name, "curves", (x.size for _, x, _ in data))

    (fig, (ax,)) = _line_figure(len(data), title=title)
    for i, (label, x, y) in enumerate(data):
        _plot_line(ax, i, len(data), label, x, y * 100.0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=100))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _finish_line_axes(fig, [ax], len(data))
    return fig


def _membrane_figure(
    values: Mapping[str, Sequence[Sequence[float]]],
    *,
    thresholds: Mapping[str, Sequence[float]] | None = None,
    bins: int = 60,
    title: str = "Membrane potential distributions per layer and time step",
) -> Figure:
    """The grid of :func:`plot_membrane_histograms`: ``len(values)`` rows, ``max T`` columns."""
    name = "plot_membrane_histograms"
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"{name}: bins must be a positive integer, got {bins!r}")
    if thresholds is not None and not isinstance(thresholds, Mapping):
        raise ValueError(
            f"{name}: thresholds must be a mapping of layer to per-step thresholds, "
            f"got {type(thresholds).__name__}"
        )
    _items(name, values, "values")
    layers: list[tuple[str, list[np.ndarray], list[float]]] = []
    for key, steps in values.items():
        label = str(key)
        if isinstance(steps, (str, bytes)) or not isinstance(steps, Iterable):
            raise ValueError(
                f"{name}: values[{label!r}] must be a sequence with one sequence of potentials "
                f"per time step, got {type(steps).__name__}"
            )
        arrays = [_finite(_floats(name, label, step, flatten=True)) for step in steps]
        theta: list[float] = []
        if thresholds is not None and key in thresholds:
            theta = list(_floats(name, label, thresholds[key]))
        layers.append((label, arrays, theta))
    n_rows = len(layers)
    n_cols = max(len(arrays) for _, arrays, _ in layers)
    if n_cols == 0:
        raise ValueError(f"{name}: no time steps to plot (every layer in 'values' is empty)")

    fig = _new_figure(
        (min(1.0 + 2.3 * n_cols, 40.0), min(1.2 + 1.9 * n_rows, 40.0)), layout="constrained"
    )
    fig.suptitle(title)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    drew_threshold = False
    for r, (label, arrays, theta) in enumerate(layers):
        finite_theta = [th for th in theta[: len(arrays)] if math.isfinite(th)]
        edges = _row_edges(arrays, finite_theta, bins)
        for c in range(n_cols):
            ax: Axes = axes[r][c]
            if c >= len(arrays):
                ax.set_axis_off()
                continue
            u = arrays[c]
            if u.size:
                counts, _ = np.histogram(u, bins=edges)
                ax.stairs(counts / u.size, edges, fill=True, color="tab:blue", alpha=0.75)
            else:
                ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center",
                        color="0.4", zorder=5, bbox={"facecolor": "white", "edgecolor": "none"})
            ax.set_xlim(edges[0], edges[-1])
            if c < len(theta) and math.isfinite(theta[c]):
                ax.axvline(theta[c], color="tab:red", linestyle="--", linewidth=1.2,
                           label="threshold θ[t]")
                drew_threshold = True
            ax.tick_params(labelsize="x-small")
            ax.yaxis.set_major_formatter(PercentFormatter(xmax=1))
            if r == 0:
                ax.set_title(f"t = {c + 1}", fontsize="small")
            if c == 0:
                ax.set_ylabel(f"{_short(label)}\n% of neurons", fontsize="small")
            if r == n_rows - 1 or c >= len(layers[r + 1][1]):
                ax.set_xlabel("membrane potential u[t]", fontsize="x-small")
    if drew_threshold:
        fig.legend(
            handles=[_threshold_handle()], loc="outside lower center", fontsize="small",
            frameon=False,
        )
    return fig


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _new_figure(figsize: tuple[float, float], *, layout: str | None = None) -> Figure:
    fig = Figure(figsize=figsize, dpi=_DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    """Writes ``fig`` as a PNG to ``path`` atomically and releases it; returns ``Path(path)``."""
    target = Path(path)
    try:
        with atomic_write(target, "wb") as fh:
            fig.savefig(fh, format="png", dpi=_DPI, facecolor="white")
    finally:
        fig.clear()  # drop the artists now rather than at the next garbage collection
    return target


def _items(name: str, mapping: Mapping, what: str) -> list[tuple[str, object]]:
    if not isinstance(mapping, Mapping):
        raise ValueError(
            f"{name}: '{what}' must be a mapping of label to data, got {type(mapping).__name__}"
        )
    if not mapping:
        raise ValueError(f"{name}: no {what} to plot ('{what}' is empty)")
    return [(str(label), data) for label, data in mapping.items()]


def _require_points(name: str, what: str, sizes: Iterable[int]) -> None:
    if not any(size > 0 for size in sizes):
        raise ValueError(f"{name}: no {what} to plot (every sequence in '{what}' is empty)")


def _floats(name: str, label: str, data: object, *, flatten: bool = False) -> np.ndarray:
    """``data`` as a float array (1-D; flattened when ``flatten``), NaN kept."""
    try:
        arr = np.asarray(data, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: values of {label!r} are not numbers: {exc}") from None
    if flatten:
        return arr.ravel()
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(
            f"{name}: values of {label!r} must be a flat sequence of numbers, "
            f"got shape {arr.shape}"
        )
    return arr


def _finite(arr: np.ndarray) -> np.ndarray:
    return arr[np.isfinite(arr)]


def _pairs(name: str, label: str, pts: object) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` pairs as two float arrays sorted by ``x``, non-finite pairs dropped."""
    try:
        arr = np.asarray(pts, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{name}: points of {label!r} must be (x, y) number pairs: {exc}"
        ) from None
    if arr.size == 0:
        return np.empty(0), np.empty(0)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(
            f"{name}: points of {label!r} must be a sequence of (x, y) pairs, got shape {arr.shape}"
        )
    arr = arr[np.isfinite(arr).all(axis=1)]
    arr = arr[np.argsort(arr[:, 0], kind="stable")]
    return arr[:, 0], arr[:, 1]


def _percent_scale(arrays: Sequence[np.ndarray]) -> float:
    """100 when every finite value lies in [0, 1] (fractions), else 1 (already percent)."""
    finite = [a[np.isfinite(a)] for a in arrays]
    peak = max((float(np.abs(a).max()) for a in finite if a.size), default=0.0)
    return 100.0 if peak <= 1.0 else 1.0


def _palette(n: int) -> list[tuple[float, float, float]]:
    if n <= 10:
        return list(colormaps["tab10"].colors)
    # tab20 then tab20b: 40 distinct colours; the line style changes once they run out.
    return list(colormaps["tab20"].colors) + list(colormaps["tab20b"].colors)


def _short(label: str) -> str:
    return label if len(label) <= _MAX_LABEL_CHARS else label[: _MAX_LABEL_CHARS - 1] + "…"


def _line_figure(n_lines: int, *, title: str, panels: int = 1) -> tuple[Figure, list[Axes]]:
    """A figure of ``panels`` axes side by side (one y scale), room on the right for the legend
    (a second column beyond 15 labels)."""
    legend = 3.0 if n_lines <= _LEGEND_ONE_COLUMN_MAX else 6.0
    panel = 6.5 if panels == 1 else 4.2
    fig = _new_figure((panel * panels + legend, 4.8), layout="constrained")
    axes = list(fig.subplots(1, panels, sharey=True, squeeze=False)[0])
    fig.suptitle(title)
    return fig, axes


def _plot_line(
    ax: Axes,
    index: int,
    n_lines: int,
    label: str,
    x: np.ndarray,
    y: np.ndarray,
    *,
    nested_markers: bool = False,
) -> None:
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    colors = _palette(n_lines)
    style = {
        "color": colors[index % len(colors)],
        "linestyle": _LINESTYLES[(index // len(colors)) % len(_LINESTYLES)],
        "linewidth": 1.8 if n_lines <= 10 else 1.3,
    }
    style["gid"] = str(index)  # the legend lists series in their order, whichever panel holds them
    if x.size == 0:  # keep it in the legend, so a label that produced nothing is visible
        ax.plot([], [], label=f"{_short(label)} (no finite data)", **style)
        return
    if nested_markers:
        style.update(marker=_MARKERS[index % len(_MARKERS)], markersize=11 - 2 * (index % 4), markerfacecolor="none",
                     markeredgewidth=1.6)
    elif x.size <= (_MARKER_MAX_POINTS if n_lines <= 10 else 10):
        style.update(marker="o", markersize=5 if n_lines <= 10 else 3.5)
    ax.plot(x, y, label=_short(label), **style)


def _finish_line_axes(fig: Figure, axes: Sequence[Axes], n_lines: int) -> None:
    """Grids, and one legend for all panels, outside the axes on the right (it never covers a line)."""
    entries = []
    for ax in axes:  # each series is drawn in one panel: every label once
        ax.grid(True, alpha=0.3)
        entries += zip(*ax.get_legend_handles_labels())
    entries.sort(key=lambda entry: int(entry[0].get_gid() or 0))
    fig.legend(
        [handle for handle, _ in entries],
        [label for _, label in entries],
        loc="outside right upper",
        fontsize="x-small" if n_lines > _LEGEND_ONE_COLUMN_MAX else "small",
        ncols=1 if n_lines <= _LEGEND_ONE_COLUMN_MAX else 2,
        frameon=False,
    )


def _row_edges(arrays: Sequence[np.ndarray], theta: Sequence[float], bins: int) -> np.ndarray:
    """Bin edges shared by the panels of one layer, covering its potentials and thresholds."""
    lows = [float(a.min()) for a in arrays if a.size] + list(theta)
    highs = [float(a.max()) for a in arrays if a.size] + list(theta)
    lo, hi = (min(lows), max(highs)) if lows else (0.0, 1.0)
    if hi - lo <= 1e-12 * max(1.0, abs(lo)):
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, bins + 1)


def _threshold_handle() -> Line2D:
    return Line2D([], [], color="tab:red", linestyle="--", linewidth=1.2, label="threshold θ[t]")
