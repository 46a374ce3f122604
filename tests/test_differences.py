"""Paired differences: the seed-paired mean, its Student-t interval and the verdict rule, the gap
per epoch, ``[[difference]]`` tables checked at load, and ``harness report --difference``."""

from __future__ import annotations

import math
import statistics
import textwrap

import pytest

from harness.differences import (Difference, format_gap_changes, gap_change, gap_per_epoch, gap_per_seed, paired_difference,
                                 parse_side, write_differences)
from harness.errors import ConfigError
from harness.plots import is_png, plot_gap_per_epoch

T_975_DF2 = 4.302652729911275  # Student-t quantile 0.975 at 2 degrees of freedom (tables)
T_975_DF1 = 12.706204736174707


def _row(cid, seed, normalizer, top1, status="finished", **extra):
    return {"cell_id": cid, "label": f"seed={seed} normalizer={normalizer}", "status": status, "seed": str(seed),
            "normalizer": normalizer, "threshold": "fixed", "test_top1": str(top1), **extra}


ROWS = [
    _row("a0", 0, "osr", 0.80), _row("a1", 1, "osr", 0.82), _row("a2", 2, "osr", 0.84),
    _row("b0", 0, "vanilla_bn", 0.79), _row("b1", 1, "vanilla_bn", 0.80), _row("b2", 2, "vanilla_bn", 0.80),
]
OSR_MINUS_BN = Difference(name="osr-bn", a={"normalizer": "osr"}, b={"normalizer": "vanilla_bn"})


def test_the_mean_interval_and_verdict_of_seed_paired_differences():
    result = paired_difference(ROWS, OSR_MINUS_BN)
    d = [1.0, 2.0, 4.0]  # points, seed by seed
    assert result.seeds == ("0", "1", "2") and result.per_seed == pytest.approx(d)
    assert result.mean == pytest.approx(7 / 3) and result.std == pytest.approx(statistics.stdev(d))
    half = T_975_DF2 * statistics.stdev(d) / math.sqrt(3)
    assert (result.low, result.high) == pytest.approx((7 / 3 - half, 7 / 3 + half))
    assert result.low < 0 < result.high and result.verdict == "unresolved"  # three seeds this spread: unresolved
    assert result.a_mean == pytest.approx(82.0) and result.b_mean == pytest.approx(79.6667, abs=1e-4)

    steady = ROWS[:3] + [_row("b0", 0, "vanilla_bn", 0.79), _row("b1", 1, "vanilla_bn", 0.81), _row("b2", 2, "vanilla_bn", 0.83)]
    assert paired_difference(steady, OSR_MINUS_BN).verdict == "a above b"  # +1 every seed: the interval is [1, 1]
    flipped = Difference(name="bn-osr", a=OSR_MINUS_BN.b, b=OSR_MINUS_BN.a)
    assert paired_difference(steady, flipped).verdict == "a below b"


def test_only_seeds_both_sides_finished_are_paired():
    rows = ROWS[:2] + [_row("a2", 2, "osr", 0.84, status="failed"), *ROWS[3:], _row("a3", 3, "osr", 0.9)]
    result = paired_difference(rows, OSR_MINUS_BN)
    assert result.seeds == ("0", "1") and result.per_seed == pytest.approx([1.0, 2.0])
    assert result.high - result.mean == pytest.approx(T_975_DF1 * statistics.stdev([1, 2]) / math.sqrt(2))
    assert result.unpaired == {"a": ("3",), "b": ("2",)}
    single = paired_difference(ROWS[:1] + ROWS[3:4], OSR_MINUS_BN)
    assert single.mean == pytest.approx(1.0) and single.low is None and single.verdict == "unresolved"


def test_the_change_of_a_difference_between_two_runs_is_paired_by_seed():
    """(a - b) of the treated run minus (a - b) of the control, seed by seed, over the seeds both
    paired; its interval and verdict by the same rule as a difference's."""
    control = paired_difference(ROWS, OSR_MINUS_BN)  # +1, +2, +4 points
    longer = [_row("a0", 0, "osr", 0.83), _row("a1", 1, "osr", 0.85), _row("a3", 3, "osr", 0.9),
              _row("b0", 0, "vanilla_bn", 0.79), _row("b1", 1, "vanilla_bn", 0.80), _row("b3", 3, "vanilla_bn", 0.8)]
    change = gap_change(control, paired_difference(longer, OSR_MINUS_BN))  # +4, +5 on seeds 0, 1; seed 3 has no control
    assert change.name == "osr-bn" and change.seeds == ("0", "1") and change.per_seed == pytest.approx([3.0, 3.0])
    assert (change.control_mean, change.treated_mean, change.mean) == pytest.approx((1.5, 4.5, 3.0))
    assert (change.low, change.high) == pytest.approx((3.0, 3.0)) and change.verdict == "a - b rose"
    shrank = gap_change(paired_difference(longer, OSR_MINUS_BN), control)
    assert shrank.verdict == "a - b fell" and shrank.mean == pytest.approx(-3.0)
    noisy = [_row("a0", 0, "osr", 0.81), _row("a1", 1, "osr", 0.86), *longer[3:5]]  # +2, +6 points against +1, +2
    mixed = gap_change(control, paired_difference(noisy, OSR_MINUS_BN))
    half = T_975_DF1 * statistics.stdev([1.0, 4.0]) / math.sqrt(2)
    assert mixed.per_seed == pytest.approx([1.0, 4.0])
    assert (mixed.low, mixed.high) == pytest.approx((2.5 - half, 2.5 + half)) and mixed.verdict == "unresolved"
    table = format_gap_changes([change, mixed], control="5 epochs", treated="20 epochs")
    lines = table.splitlines()
    assert lines[0] == "| difference | seeds | a - b, 5 epochs | a - b, 20 epochs | change | std | interval | verdict | per seed change |"
    assert lines[2] == "| osr-bn | 0,1 | +1.50 | +4.50 | +3.00 | 0.00 | 95%: [+3.00, +3.00] | a - b rose | +3.00 / +3.00 |"
    lonely = gap_change(control, paired_difference(longer[:1] + longer[3:4], OSR_MINUS_BN))
    assert "| unresolved (n=1) | +3.00 |" in format_gap_changes([lonely])


def test_a_side_matching_two_configurations_is_refused():
    rows = ROWS + [dict(_row("c0", 0, "osr", 0.7), threshold="ots")]
    with pytest.raises(ConfigError, match="normalizer=osr matches more than one configuration .*seed 0"):
        paired_difference(rows, OSR_MINUS_BN)
    narrowed = Difference(name="x", a={"normalizer": "osr", "threshold": "fixed"}, b={"normalizer": "vanilla_bn"})
    assert paired_difference(rows, narrowed).seeds == ("0", "1", "2")


def test_side_values_compare_as_the_axis_types():
    assert parse_side("normalizer=osr, optimizer.weight_decay=2e-4,seed=1") == {
        "normalizer": "osr", "optimizer.weight_decay": 2e-4, "seed": 1}
    rows = [dict(r, **{"optimizer.weight_decay": "0.0002" if r["normalizer"] == "osr" else "0.0005"}) for r in ROWS]
    diff = Difference(name="wd", a={"optimizer.weight_decay": 2e-4}, b={"optimizer.weight_decay": 5e-4})
    assert paired_difference(rows, diff).per_seed == pytest.approx([1.0, 2.0, 4.0])
    with pytest.raises(ConfigError, match="expected axis=value"):
        parse_side("osr")


def _history(cell, values):
    return [{"cell_id": cell, "label": "", "epoch": str(e), "metric": "test_top1", "value": str(v)} for e, v in enumerate(values, 1)]


def test_the_gap_per_epoch_pairs_seeds_at_every_epoch_and_draws(tmp_path):
    history = (_history("a0", [0.5, 0.7]) + _history("a1", [0.6, 0.8]) + _history("a2", [0.4])
               + _history("b0", [0.6, 0.7]) + _history("b1", [0.6, 0.7]) + _history("b2", [0.5, 0.6]))
    curve = gap_per_epoch(ROWS, history, OSR_MINUS_BN)
    (e1, m1, lo1, hi1, n1), (e2, m2, lo2, hi2, n2) = curve
    assert (e1, n1, e2, n2) == (1, 3, 2, 2)  # seed 2 has no epoch 2 of a
    assert m1 == pytest.approx(statistics.fmean([-10.0, 0.0, -10.0]))
    half = T_975_DF1 * statistics.stdev([0.0, 10.0]) / math.sqrt(2)
    assert m2 == pytest.approx(5.0) and (lo2, hi2) == pytest.approx((5.0 - half, 5.0 + half))
    assert lo1 < m1 < hi1 and lo2 <= m2 <= hi2
    spread = gap_per_seed(ROWS, history, OSR_MINUS_BN)  # the seeds behind each mean
    assert list(spread) == ["0", "1", "2"]
    points = {seed: ([e for e, _ in pts], pytest.approx([g for _, g in pts])) for seed, pts in spread.items()}
    assert points == {"0": ([1, 2], [-10.0, 0.0]), "1": ([1, 2], [0.0, 10.0]), "2": ([1], [-10.0])}

    bare, drawn = plot_gap_per_epoch({"g": curve}, tmp_path / "bare.png"), plot_gap_per_epoch({"g": curve}, tmp_path / "seeds.png", seeds=spread)
    assert is_png(drawn) and drawn.read_bytes() != bare.read_bytes()  # the seeds' lines are drawn
    with pytest.raises(ValueError, match="seeds= draws the spread of one series; got 2 series"):
        plot_gap_per_epoch({"g": curve, "h": curve}, tmp_path / "two.png", seeds=spread)

    results, written = write_differences(tmp_path, ROWS, history, [OSR_MINUS_BN])
    names = sorted(p.name for p in written)
    assert names == ["differences.csv", "differences.md", "gap_osr-bn.png"] and is_png(tmp_path / "plots" / "gap_osr-bn.png")
    md = (tmp_path / "differences.md").read_text()
    assert "| osr-bn | normalizer=osr | normalizer=vanilla_bn | test_top1 | 0,1,2 | 82.00 | 79.67 | +2.33 |" in md
    assert "unresolved" in md and "+1.00 / +2.00 / +4.00" in md
    with pytest.raises(ValueError, match="plot_gap_per_epoch"):
        plot_gap_per_epoch({}, tmp_path / "empty.png")


DIFF_MATRIX = """
[matrix]
threshold = ["fixed", "ots"]
seed = [0, 1]
"""


def test_difference_tables_are_checked_at_load(tiny_matrix, registry):
    from harness.matrix import load_matrix

    good = tiny_matrix(DIFF_MATRIX + """
    [[difference]]
    name = "ots"
    a = { threshold = "ots" }
    b = { threshold = "fixed" }
    """)
    (diff,) = load_matrix(good, registry).differences
    assert diff == Difference(name="ots", a={"threshold": "ots"}, b={"threshold": "fixed"}, metric="test_top1")

    cases = {
        'colour = 1\na = { threshold = "ots" }\nb = { threshold = "fixed" }': "unknown key 'colour'",
        'a = { normalizer = "osr" }\nb = { threshold = "fixed" }': "names 'normalizer', which is not an axis of the matrix; its axes: threshold",
        'a = { threshold = "osr" }\nb = { threshold = "fixed" }': "side 'a' \\(threshold=osr\\) matches no configuration",
        'a = { threshold = "fixed" }\nb = { threshold = "fixed" }': "a and b are the same configuration",
        'a = "ots"\nb = { threshold = "fixed" }': "key 'a' must be an inline table",
    }
    for body, message in cases.items():
        path = tiny_matrix(DIFF_MATRIX + "\n[[difference]]\n" + body + "\n", name="bad")
        with pytest.raises(ConfigError, match=f"bad.toml: \\[\\[difference\\]\\] number 1.*{message}"):
            load_matrix(path, registry)

    several = tiny_matrix(DIFF_MATRIX.replace('seed = [0, 1]', 'seed = [0, 1]\ntime_steps = [2, 3]') + """
    [[difference]]
    a = { threshold = "ots" }
    b = { threshold = "fixed", time_steps = 2 }
    """, name="several")
    with pytest.raises(ConfigError, match="side 'a' \\(threshold=ots\\) matches 2 configurations .*add axis values"):
        load_matrix(several, registry)


def test_report_prints_and_writes_the_differences(tmp_path, capsys):
    from harness.cli import ExitCode, main
    from harness.testing import run_matrix

    import tests.conftest as conftest

    text = 'name = "diff"\n' + conftest.TINY_DEFAULTS + textwrap.dedent(DIFF_MATRIX + """
    [[difference]]
    name = "ots_minus_fixed"
    a = { threshold = "ots" }
    b = { threshold = "fixed" }
    """)
    ran = run_matrix(tmp_path, text, "--executor", "serial")
    assert ran.rc == 0, ran.stderr
    capsys.readouterr()
    args = ["report", "--matrix", str(ran.matrix), "--results", str(ran.results)]
    assert main([*args, "--difference", "threshold=fixed", "threshold=ots"]) == ExitCode.OK
    out = capsys.readouterr().out
    assert "paired differences" in out and "| ots_minus_fixed | threshold=ots | threshold=fixed | test_top1 | 0,1 |" in out
    assert "| threshold=fixed - threshold=ots | threshold=fixed | threshold=ots |" in out
    folder = ran.results / "diff"
    assert is_png(folder / "plots" / "gap_ots_minus_fixed.png")
    rows = (folder / "differences.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("difference,a,b,metric,seeds")

    assert main([*args, "--difference", "normalizer=osr", "threshold=ots"]) == ExitCode.USAGE_ERROR
    assert "'normalizer' is not an axis of matrix 'diff'; its axes: threshold" in capsys.readouterr().err
