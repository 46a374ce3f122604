"""The README's results table is the committed record of the default matrix (docs/results/), and
scripts/record_results.py keeps that record: finished cells only, merged by cell id, with history."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

from harness.plots import is_png

REPO = Path(__file__).resolve().parents[1]
RECORD = REPO / "docs" / "results" / "fashion-mnist.csv"
SECTION = "### The paper's ablation and the baselines on Fashion-MNIST (the default matrix)"


def _script():
    spec = importlib.util.spec_from_file_location("record_results", REPO / "scripts" / "record_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _read(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


# Each README results section printed from a committed record: (heading's start, matrix, record,
# the control's (record, matrix) whose differences it compares its own with, if any).
STUDIES = [
    (SECTION, REPO / "benchmarks.toml", RECORD, None),
    ("### Does OSR overtake vanilla BN with longer training?", REPO / "benchmarks" / "ablation-fmnist-long.toml",
     REPO / "docs" / "results" / "ablation-fmnist-long.csv", (RECORD, REPO / "benchmarks.toml")),
    ("### TAB and MPBN beside the baselines", REPO / "benchmarks" / "fmnist-tab-mpbn.toml",
     REPO / "docs" / "results" / "fmnist-tab-mpbn.csv", None),
]


def _section(heading: str) -> str:
    text = (REPO / "README.md").read_text()
    assert f"\n{heading}" in text, f"the README lost its section {heading!r}"
    return text.split(f"\n{heading}", 1)[1].split("\n### ", 1)[0]


def _readme_table(heading: str = SECTION) -> list[str]:
    lines = _section(heading).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| trainer |"))
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return lines[start:end]


def test_the_readme_table_is_the_recorded_cells_of_the_shipped_matrix():
    """Every row as the script prints it from docs/results (so no number is typed by hand), and
    every recorded cell a cell of benchmarks.toml as it ships (so the table describes it)."""
    script = _script()
    rows = script.read_csv(RECORD)
    assert rows, f"{RECORD} holds no cell"
    assert all(r["status"] == "finished" and r["code_commit"] for r in rows)
    assert _readme_table() == script.table_rows(rows, REPO / "benchmarks.toml")


def test_record_merges_finished_cells_and_their_history(tmp_path):
    script = _script()
    results = tmp_path / "results" / "m"
    summary = [
        {"cell_id": "a1", "label": "seed=0", "status": "finished", "seed": "0", "test_top1": "0.5", "duration_s": "60"},
        {"cell_id": "b2", "label": "seed=1", "status": "failed", "seed": "1", "test_top1": "", "duration_s": ""},
    ]
    _write(results / "summary.csv", summary)
    _write(results / "history.csv", [
        {"cell_id": "a1", "label": "seed=0", "epoch": "1", "metric": "test_top1", "value": "0.5"},
        {"cell_id": "a1", "label": "seed=0", "epoch": "1", "metric": "test_firing_rate/layer1", "value": "0.1"},
        {"cell_id": "b2", "label": "seed=1", "epoch": "1", "metric": "test_top1", "value": "0.1"},
    ])
    dest = tmp_path / "docs" / "m.csv"
    script.record(results, dest, commit="abc1234")
    kept = _read(dest)
    assert [(r["cell_id"], r["code_commit"], r["test_top1"]) for r in kept] == [("a1", "abc1234", "0.5")]
    assert [h["cell_id"] for h in _read(tmp_path / "docs" / "m-history.csv")] == ["a1"]

    # A re-run of a1 (other code) replaces its row and its history; b2, now finished, is added.
    summary[0].update(test_top1="0.6")
    summary[1].update(status="finished", test_top1="0.4", duration_s="30")
    _write(results / "summary.csv", summary)
    _write(results / "history.csv", [
        {"cell_id": "a1", "label": "seed=0", "epoch": "1", "metric": "test_top1", "value": "0.6"},
        {"cell_id": "b2", "label": "seed=1", "epoch": "1", "metric": "test_top1", "value": "0.4"},
    ])
    script.record(results, dest, commit="def5678")
    kept = {r["cell_id"]: r for r in _read(dest)}
    assert {k: (r["test_top1"], r["code_commit"]) for k, r in kept.items()} == {"a1": ("0.6", "def5678"), "b2": ("0.4", "def5678")}
    history = _read(tmp_path / "docs" / "m-history.csv")
    assert sorted((h["cell_id"], h["value"]) for h in history) == [("a1", "0.6"), ("b2", "0.4")]


def test_record_refuses_a_results_directory_without_finished_cells(tmp_path):
    script = _script()
    with pytest.raises(SystemExit, match="does not exist"):
        script.record(tmp_path, tmp_path / "out.csv", commit="abc")
    _write(tmp_path / "summary.csv", [{"cell_id": "x", "label": "", "status": "failed"}])
    with pytest.raises(SystemExit, match="no finished cell"):
        script.record(tmp_path, tmp_path / "out.csv", commit="abc")
    assert not (tmp_path / "out.csv").exists()


def _cell_row(cell, seed_top1: float, rates=(0.1, 0.2, 0.3, 0.4)) -> dict:
    row = {"cell_id": cell.id, "label": cell.label, "status": "finished", "code_commit": "abc"}
    row.update({k: str(v) for k, v in cell.axes.items()})
    row.update(test_top1=str(seed_top1), best_test_top1=str(seed_top1 + 0.01), test_firing_rate="0.25",
               test_firing_rate_cv="0.5", duration_s="600")
    row.update({f"test_firing_rate_t{i + 1}": str(r) for i, r in enumerate(rates)})
    return row


def test_table_aggregates_over_seeds_in_the_matrix_order(tmp_path):
    script = _script()
    cells = script.matrix_cells(REPO / "benchmarks.toml")
    first = [c for c in cells if c.axes["trainer"] == "online" and c.axes["normalizer"] == "vanilla_bn"
             and c.axes["threshold"] == "fixed"]
    assert [c.axes["seed"] for c in first] == [0, 1, 2]
    rows = [_cell_row(first[0], 0.8), _cell_row(first[2], 0.9)]
    lines = script.table_rows(rows, REPO / "benchmarks.toml")
    assert lines[0].startswith("| trainer |") and len(lines) == 2 + 10  # ten configurations
    assert lines[2] == "| online | vanilla_bn | fixed | 0,2 | 85.00 ± 7.07 | 86.00 ± 7.07 | 80.00 / 90.00 | 0.250 | 0.500 | 10.0 min |"
    assert all(line.endswith("| not run yet | | | | | |") for line in lines[3:])

    png = tmp_path / "rates.png"
    series = script.step_rates(rows, REPO / "benchmarks.toml")
    assert series == {"vanilla_bn + fixed (n=2)": pytest.approx([0.1, 0.2, 0.3, 0.4])}
    _write(tmp_path / "r.csv", rows)
    assert script.main(["figure", str(tmp_path / "r.csv"), str(png)]) == 0 and is_png(png)


def test_table_refuses_cells_the_matrix_does_not_have():
    script = _script()
    cell = script.matrix_cells(REPO / "benchmarks.toml")[0]
    stray = dict(_cell_row(cell, 0.5), cell_id="000000000000")
    with pytest.raises(SystemExit, match="not cells of .*benchmarks.toml: 000000000000"):
        script.table_rows([stray], REPO / "benchmarks.toml")


def test_the_matrix_differences_on_recorded_cells(tmp_path):
    script = _script()
    cells = script.matrix_cells(REPO / "benchmarks.toml")

    def pick(normalizer, seed):
        return next(c for c in cells if c.axes == {"seed": seed, "trainer": "online", "normalizer": normalizer, "threshold": "fixed"})

    rows = [_cell_row(pick("vanilla_bn", 0), 0.80), _cell_row(pick("vanilla_bn", 1), 0.82),
            _cell_row(pick("osr", 0), 0.78), _cell_row(pick("osr", 1), 0.798)]
    recorded = _write(tmp_path / "m.csv", rows)
    _write(tmp_path / "m-history.csv", [
        {"cell_id": r["cell_id"], "label": r["label"], "epoch": "1", "metric": "test_top1", "value": r["test_top1"]} for r in rows])
    results, written = script.differences(recorded, REPO / "benchmarks.toml")
    first = results[0]
    assert first.difference.name == "osr_minus_vanilla_bn" and first.per_seed == pytest.approx([-2.0, -2.2])
    assert first.high < 0 and first.verdict == "a below b"
    assert all(r.mean is None and r.verdict == "unresolved" for r in results[1:])  # nothing recorded for the others
    assert (tmp_path / "m-differences" / "differences.md").exists()
    assert is_png(tmp_path / "m-differences" / "plots" / "gap_osr_minus_vanilla_bn.png")
    assert "| osr_minus_vanilla_bn |" in script.format_differences(results) and len(written) == 3


def test_changes_pair_each_shared_difference_of_a_control_and_a_longer_run(tmp_path, capsys):
    """`record_results.py changes`: the 5-epoch control's OSR - vanilla BN per seed against the
    20-epoch run's, each side picked by its own matrix's [[difference]] table."""
    script = _script()
    long_matrix = REPO / "benchmarks" / "ablation-fmnist-long.toml"

    def rows(matrix, accuracies):
        cells = script.matrix_cells(matrix)
        out = []
        for (normalizer, seed), acc in accuracies.items():
            cell = next(c for c in cells if c.axes["seed"] == seed and c.axes["trainer"] == "online"
                        and c.axes["normalizer"] == normalizer and c.axes["threshold"] == "fixed")
            out.append(_cell_row(cell, acc))
        return out

    control = _write(tmp_path / "short.csv", rows(REPO / "benchmarks.toml", {
        ("vanilla_bn", 0): 0.80, ("osr", 0): 0.78, ("vanilla_bn", 1): 0.81, ("osr", 1): 0.80}))  # -2, -1
    longer = _write(tmp_path / "long.csv", rows(long_matrix, {
        ("vanilla_bn", 0): 0.85, ("osr", 0): 0.845, ("vanilla_bn", 1): 0.86, ("osr", 1): 0.86, ("vanilla_bn", 2): 0.9}))  # -0.5, 0
    lines = script.changes(longer, long_matrix, control, REPO / "benchmarks.toml").splitlines()
    assert lines[0].startswith("| difference | seeds | a - b, fashion-mnist | a - b, ablation-fmnist-long | change |")
    (osr,) = [line for line in lines if line.startswith("| osr_minus_vanilla_bn |")]
    assert osr.startswith("| osr_minus_vanilla_bn | 0,1 | -1.50 | -0.25 | +1.25 | 0.35 |") and osr.endswith("| +1.50 / +1.00 |")
    assert [line.split(" | ")[0] for line in lines[2:]] == [
        "| osr_minus_vanilla_bn", "| osr_ots_minus_osr", "| osr_ots_minus_vanilla_bn", "| online_minus_bptt_vanilla_bn"]
    assert "no control in" in capsys.readouterr().err and "fast_stats_minus_paper_stats" not in "\n".join(lines)
    with pytest.raises(SystemExit, match="name no \\[\\[difference\\]\\] in common"):
        script.changes(longer, long_matrix, control, REPO / "benchmarks" / "fmnist-tab-mpbn.toml")

    def control_with(table: str) -> Path:  # benchmarks.toml with its osr_minus_vanilla_bn changed
        text = (REPO / "benchmarks.toml").read_text()
        start = text.index('name = "osr_minus_vanilla_bn"')
        end = text.index("[[difference]]", start)
        path = tmp_path / "changed" / "benchmarks.toml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text[:start] + table + "\n\n" + text[end:])
        return path

    swapped = control_with('name = "osr_minus_vanilla_bn"\na = { trainer = "online", normalizer = "vanilla_bn", threshold = "fixed" }\n'
                           'b = { trainer = "online", normalizer = "osr", threshold = "fixed" }')
    with pytest.raises(SystemExit, match="difference 'osr_minus_vanilla_bn': its side a sets normalizer to 'osr' in .* but 'vanilla_bn'"):
        script.changes(longer, long_matrix, control, swapped)
    other = control_with('name = "osr_minus_vanilla_bn"\na = { trainer = "online", normalizer = "osr", threshold = "fixed" }\n'
                         'b = { trainer = "online", normalizer = "vanilla_bn", threshold = "fixed" }\nmetric = "best_test_top1"')
    with pytest.raises(SystemExit, match="compares test_top1 in .* but best_test_top1 in"):
        script.changes(longer, long_matrix, control, other)


def test_the_readme_differences_are_those_of_the_recorded_cells(tmp_path):
    script = _script()
    results, _ = script.differences(RECORD, REPO / "benchmarks.toml", tmp_path / "out")
    table = script.format_differences(results)
    section = (REPO / "README.md").read_text().split(SECTION, 1)[1].split("\n### ", 1)[0]
    assert table in section


def test_a_matrix_with_more_axes_gets_a_column_for_each(tmp_path):
    """The long ablation varies an OSR option: its column reads "–" where the cell has no OSR,
    and the two OSR + OTS configurations stay apart in the table and the figure's legend."""
    script = _script()
    matrix = REPO / "benchmarks" / "ablation-fmnist-long.toml"
    cells = script.matrix_cells(matrix)
    osr_ots = [c for c in cells if c.axes["seed"] == 0 and c.axes["normalizer"] == "osr" and c.axes["threshold"] == "ots"]
    assert len(osr_ots) == 2
    rows = [_cell_row(c, acc) for c, acc in zip(osr_ots, (0.8, 0.9))]
    lines = script.table_rows(rows, matrix)
    assert lines[0].startswith("| trainer | normalizer | threshold | osr momentum_warmup_batches | seeds |")
    assert len(lines[1].split("|")) == len(lines[0].split("|"))
    assert "| online | osr | ots | 0 | 0 | 80.00 |" in lines[5] and "| online | osr | ots | 938 | 0 | 90.00 |" in lines[6]
    assert lines[2].startswith("| online | vanilla_bn | fixed | – | | not run yet |")
    assert set(script.step_rates(rows, matrix)) == {"osr + ots, osr momentum_warmup_batches 0 (n=1)",
                                                     "osr + ots, osr momentum_warmup_batches 938 (n=1)"}

    tab = REPO / "benchmarks" / "fmnist-tab-mpbn.toml"
    lines = script.table_rows([], tab)
    assert lines[0].startswith("| trainer | normalizer | threshold | membrane_norm | seeds |")
    assert lines[2:] == ["| online | vanilla_bn | fixed | mpbn | | not run yet | | | | | |",
                         "| bptt | vanilla_bn | fixed | mpbn | | not run yet | | | | | |",
                         "| bptt | tab | fixed | none | | not run yet | | | | | |"]


@pytest.mark.parametrize("heading, matrix, record, control", STUDIES, ids=[m.stem for _, m, _, _ in STUDIES])
def test_each_results_section_is_its_recorded_cells(heading, matrix, record, control, tmp_path):
    """A study's README table and differences are the script's output from its record; a study
    with no record says so instead of showing numbers."""
    script = _script()
    if not record.exists():
        assert "No cell of it has been recorded yet" in _section(heading)
        assert not any(line.startswith("| trainer |") for line in _section(heading).splitlines())
        return
    rows = script.read_csv(record)
    assert rows and all(r["status"] == "finished" and r["code_commit"] for r in rows)
    assert _readme_table(heading) == script.table_rows(rows, matrix)
    from harness import get_registry
    from harness.matrix import load_matrix

    if load_matrix(matrix, get_registry()).differences:
        results, _ = script.differences(record, matrix, tmp_path / "out")
        assert script.format_differences(results) in _section(heading)
    if control is not None:  # how its differences moved from the control's
        assert script.changes(record, matrix, *control) in _section(heading)
