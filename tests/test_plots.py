"""harness.plots: PNG files written atomically, from plain data, without pyplot."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.image import imread

from harness import plots
from harness.plots import (
    _accuracy_figure,
    _membrane_figure,
    _memory_figure,
    _step_firing_rates_figure,
    is_png,
    plot_accuracy_curves,
    plot_membrane_histograms,
    plot_memory_vs_time_steps,
    plot_step_firing_rates,
)

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20
RNG = np.random.default_rng(0)

SMALL_INPUTS = {
    plot_step_firing_rates: {"online": [0.1, 0.2, 0.25], "online+OTS": [0.1, 0.12, 0.12, 0.12]},
    plot_memory_vs_time_steps: {
        "bptt": [(2, 2 * MIB), (4, 4 * MIB)],
        "online": [(2, MIB), (4, MIB)],
    },
    plot_accuracy_curves: {"cell-a": [(1, 0.5), (2, 0.7)], "cell-b": [(1, 0.4), (2, 0.6)]},
    plot_membrane_histograms: {"conv1": [RNG.normal(size=200), RNG.normal(size=200)]},
}
PLOTTERS = list(SMALL_INPUTS)


def _ids(fn) -> str:
    return fn.__name__


def _many(fn, n: int = 30) -> dict:
    """``n`` labels, each with a NaN somewhere, plus the input shape ``fn`` expects."""
    if fn is plot_step_firing_rates:
        return {f"config-{i}": [0.1, math.nan, 0.2 + i / 100, 0.3] for i in range(n)}
    if fn is plot_membrane_histograms:  # one grid row per layer: fewer keeps the test fast
        return {f"layer-{i}": [[0.0, math.nan, 1.0], [0.5, 2.0]] for i in range(min(n, 8))}
    return {f"cell-{i}": [(1, 0.1), (2, math.nan), (3, 0.3 + i / 100)] for i in range(n)}


# ------------------------------------------------------------------------------ files


def test_is_png(tmp_path):
    png = plot_accuracy_curves(SMALL_INPUTS[plot_accuracy_curves], tmp_path / "a.png")
    text = tmp_path / "b.png"
    text.write_text("not an image")
    assert is_png(png)
    assert not is_png(text)
    assert not is_png(tmp_path / "missing.png")


@pytest.mark.parametrize("fn", PLOTTERS, ids=_ids)
def test_writes_a_png_into_a_new_nested_directory(fn, tmp_path):
    target = tmp_path / "not" / "yet" / "there" / "plot.png"
    out = fn(SMALL_INPUTS[fn], str(target))  # a str path is accepted too
    assert out == target and isinstance(out, Path)
    assert is_png(target)
    image = imread(target)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert sorted(os.listdir(target.parent)) == ["plot.png"]  # no temp file left behind


@pytest.mark.parametrize("fn", PLOTTERS, ids=_ids)
@pytest.mark.parametrize("empty", [{}, "every-label-empty"])
def test_empty_input_raises_naming_the_function(fn, empty, tmp_path):
    data = {} if empty == {} else {"a": [], "b": []}
    with pytest.raises(ValueError, match=rf"^{fn.__name__}: no .* to plot"):
        fn(data, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("fn", PLOTTERS, ids=_ids)
def test_thirty_labels_with_nans(fn, tmp_path):
    out = fn(_many(fn), tmp_path / "many.png")
    assert is_png(out)


def test_replaces_an_existing_file(tmp_path):
    target = tmp_path / "plot.png"
    target.write_bytes(b"stale")
    plot_step_firing_rates({"a": [0.1, 0.2]}, target)
    assert is_png(target)
    assert os.listdir(tmp_path) == ["plot.png"]


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "plot.png"
    target.write_bytes(b"old")

    def broken_savefig(self, fh, **kwargs):
        fh.write(b"\x89PNG partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(RuntimeError, match="disk full"):
        plot_step_firing_rates({"a": [0.1, 0.2]}, target)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["plot.png"]


def test_does_not_import_pyplot_or_leave_figures(tmp_path):
    """Importing and using the module never loads pyplot (no global backend, no open figures)."""
    script = textwrap.dedent(
        f"""
        import sys
        import harness.plots as p
        assert "matplotlib.pyplot" not in sys.modules, "import loaded pyplot"
        for i in range(3):
            p.plot_step_firing_rates({{"a": [0.1, 0.2]}}, {str(tmp_path)!r} + f"/{{i}}.png")
        assert "matplotlib.pyplot" not in sys.modules, "plotting loaded pyplot"
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert sorted(os.listdir(tmp_path)) == ["0.png", "1.png", "2.png"]


# ------------------------------------------------------------------------------ figure content


def _lines(fig: Figure):
    return [line for ax in fig.axes for line in ax.get_lines()]


def _legend_texts(fig: Figure) -> list[str]:
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
    return [t.get_text() for legend in legends for t in legend.get_texts()]


def test_step_firing_rates_x_is_steps_from_one_and_fractions_shown_in_percent():
    fig = _step_firing_rates_figure({"a": [0.1, 0.2, 0.3, 0.4], "b": [0.5, math.nan, 0.25, 0.2]}, title="t")
    (ax,) = fig.axes  # one T: one panel
    four, other = ax.get_lines()
    assert list(four.get_xdata()) == [1, 2, 3, 4]
    assert list(four.get_ydata()) == pytest.approx([10, 20, 30, 40])
    assert list(other.get_xdata()) == [1, 3, 4]  # the NaN step is skipped, steps keep their place
    assert list(other.get_ydata()) == pytest.approx([50, 25, 20])
    assert "%" in ax.get_ylabel()
    assert ax.get_xlabel() == "time step t"


def test_step_firing_rates_of_different_t_get_a_panel_each_with_one_y_scale():
    fig = _step_firing_rates_figure({"T=4 a": [0.1, 0.2, 0.3, 0.6], "T=2": [0.5, 0.25], "T=4 b": [0.2] * 4}, title="t")
    two, four = fig.axes
    assert two.get_title() == "T = 2" and four.get_title() == "T = 4"
    assert [ln.get_label() for ln in two.get_lines()] == ["T=2"]
    assert [ln.get_label() for ln in four.get_lines()] == ["T=4 a", "T=4 b"]
    assert two.get_shared_y_axes().joined(two, four)
    assert all(ax.get_ylim()[0] == 0 and ax.get_ylim()[1] >= 60 for ax in (two, four))  # every panel's lines in view
    assert _legend_texts(fig) == ["T=4 a", "T=2", "T=4 b"]  # one legend, the series in their order


def test_step_firing_rates_already_in_percent_are_kept():
    fig = _step_firing_rates_figure({"a": [10.0, 20.0]}, title="t")
    assert list(_lines(fig)[0].get_ydata()) == pytest.approx([10, 20])


def test_memory_is_sorted_by_t_and_shown_in_mib_with_markers():
    fig = _memory_figure(
        {"bptt": [(6, 6 * MIB), (2, 2 * MIB), (4, math.nan), (3, 3 * MIB)], "online": [(2, MIB)]},
        ylabel="saved for backward (MiB)",
        title="t",
    )
    bptt, online = _lines(fig)
    assert list(bptt.get_xdata()) == [2, 3, 6]
    assert list(bptt.get_ydata()) == pytest.approx([2, 3, 6])
    assert bptt.get_marker() not in (None, "None", "", " ")
    # coinciding points stay visible: another hollow shape, a smaller size nested inside
    assert bptt.get_marker() != online.get_marker() and bptt.get_markersize() > online.get_markersize()
    assert bptt.get_markerfacecolor() == "none" and online.get_markerfacecolor() == "none"
    assert list(online.get_xdata()) == [2]
    assert fig.axes[0].get_ylabel() == "saved for backward (MiB)"
    assert not fig.axes[0].get_legend() and len(fig.legends) == 1  # the legend is outside the axes
    assert fig.axes[0].get_xlabel() == "number of time steps T"


def test_accuracy_is_shown_in_percent_and_a_single_epoch_is_a_marker():
    fig = _accuracy_figure({"a": [(2, 0.75), (1, 0.5)], "single": [(1, 0.3)]}, title="t")
    a, single = _lines(fig)
    assert list(a.get_xdata()) == [1, 2]
    assert list(a.get_ydata()) == pytest.approx([50, 75])
    assert len(single.get_xdata()) == 1
    assert single.get_marker() not in (None, "None", "", " ")
    assert _legend_texts(fig) == ["a", "single"]


def test_many_labels_get_distinct_styles_and_a_legend_entry_each():
    fig = _accuracy_figure(_many(plot_accuracy_curves), title="t")
    lines = _lines(fig)
    assert len(lines) == 30
    assert len({(tuple(ln.get_color()), ln.get_linestyle()) for ln in lines}) == 30
    assert len(_legend_texts(fig)) == 30
    for ln in lines:
        assert np.isfinite(np.asarray(ln.get_ydata(), dtype=float)).all()
    # Past the 40 colours of the palette, the line style tells lines apart.
    lines = _lines(_accuracy_figure(_many(plot_accuracy_curves, 45), title="t"))
    assert len({(tuple(ln.get_color()), ln.get_linestyle()) for ln in lines}) == 45


def test_a_label_without_finite_values_stays_in_the_legend():
    fig = _step_firing_rates_figure({"ok": [0.1, 0.2], "broken": [math.nan, math.nan]}, title="t")
    assert _legend_texts(fig) == ["ok", "broken (no finite data)"]


def test_malformed_points_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match=r"^plot_memory_vs_time_steps: points of 'a'"):
        plot_memory_vs_time_steps({"a": [(1, 2, 3)]}, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"^plot_accuracy_curves: 'curves' must be a mapping"):
        plot_accuracy_curves([(1, 0.5)], tmp_path / "x.png")  # type: ignore[arg-type]
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------------------ membrane grid


def test_membrane_grid_has_one_panel_per_layer_and_step_with_thresholds():
    values = {f"layer{l}": [RNG.normal(t, 1.0, 300) for t in range(4)] for l in range(3)}
    thresholds = {"layer0": [1.0, 1.1, 1.2, 1.3], "layer2": [0.9, math.nan, 1.0, 1.0]}
    fig = _membrane_figure(values, thresholds=thresholds, bins=20, title="t")
    assert len(fig.axes) == 3 * 4
    dashed = [
        ax for ax in fig.axes for ln in ax.get_lines() if ln.get_linestyle() == "--"
    ]
    assert len(dashed) == 4 + 3  # layer1 has none, the NaN threshold of layer2 is skipped
    assert fig.axes[0].get_lines()[0].get_xdata()[0] == pytest.approx(1.0)
    assert [ax.get_title() for ax in fig.axes[:4]] == ["t = 1", "t = 2", "t = 3", "t = 4"]
    assert "layer1" in fig.axes[4].get_ylabel()
    assert _legend_texts(fig) == ["threshold θ[t]"]
    # Each panel's histogram sums to 1 (a fraction of that panel's neurons).
    heights = fig.axes[5].patches[0].get_data().values
    assert heights.sum() == pytest.approx(1.0)


def test_membrane_grid_handles_ragged_steps_nan_and_constant_values():
    values = {
        "a": [np.array([[0.0, 1.0], [2.0, math.nan]]), [math.nan, math.nan], [0.5, 0.5, 0.5]],
        "b": [[1.0]],
    }
    fig = _membrane_figure(values, bins=10, title="t")
    assert len(fig.axes) == 2 * 3
    assert not fig.axes[4].axison and not fig.axes[5].axison  # layer b has one step only
    assert any(t.get_text() == "no data" for t in fig.axes[1].texts)
    assert fig.axes[2].patches  # a constant panel still draws a bar


def test_membrane_bins_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match=r"^plot_membrane_histograms: bins"):
        plot_membrane_histograms({"a": [[0.0]]}, tmp_path / "x.png", bins=0)


def test_public_names():
    assert set(plots.__all__) == {
        "is_png",
        "plot_accuracy_curves",
        "plot_membrane_histograms",
        "plot_memory_vs_time_steps",
        "plot_step_firing_rates",
    }
