"""The comparison over seeds: arithmetic, grouping by configuration id, missing values."""

from __future__ import annotations

import statistics

import pytest

from harness.config import CellConfig, Component, cell_id, config_id
from harness.report import compare, curves, format_comparison


def _row(cid: str, seed: int, top1: float, config: str | None, status: str = "finished", **extra) -> dict:
    row = {"cell_id": cid, "label": f"normalizer=osr seed={seed}", "status": status, "normalizer": "osr", "seed": str(seed),
           "test_top1": str(top1), **extra}
    if config is not None:
        row["config_id"] = config
    return row


def test_seeds_of_one_configuration_are_averaged_and_failed_cells_left_out():
    rows = [_row("a", 0, 0.80, "c1", test_firing_rate="0.1"), _row("b", 1, 0.84, "c1", test_firing_rate="0.3"),
            _row("c", 2, 0.10, "c1", status="failed")]
    (entry,) = compare(rows)
    assert entry["configuration"] == "normalizer=osr" and entry["seeds"] == 2
    assert entry["test_top1"] == pytest.approx(82.0) and entry["test_top1_std"] == pytest.approx(100 * statistics.stdev([0.8, 0.84]))
    assert entry["test_firing_rate"] == pytest.approx(0.2)
    assert "82.00 ± 2.83" in format_comparison([entry], "markdown")


def test_a_changed_matrix_reusing_labels_is_not_mixed_with_the_old_cells():
    # Same axis values, different settings elsewhere (e.g. epochs changed in the file): two groups.
    rows = [_row("a", 0, 0.80, "old"), _row("b", 0, 0.90, "new"), _row("c", 1, 0.92, "new")]
    entries = {e["seeds"]: e for e in compare(rows)}
    assert entries[1]["test_top1"] == pytest.approx(80.0) and entries[2]["test_top1"] == pytest.approx(91.0)
    assert entries[1]["configuration"] == "normalizer=osr [config old]" and entries[2]["configuration"] == "normalizer=osr [config new]"
    # Rows without an id (older result files) fall back to their labels.
    (legacy,) = compare([_row("a", 0, 0.8, None), _row("b", 1, 0.9, None)])
    assert legacy["seeds"] == 2


def test_a_metric_missing_in_some_seeds_says_over_how_many():
    rows = [_row("a", 0, 0.8, "c", synops="100"), _row("b", 1, 0.9, "c", synops="nan")]
    (entry,) = compare(rows)
    assert entry["synops"] == 100 and entry["n_synops"] == 1 and entry["seeds"] == 2


def test_config_id_ignores_the_seed_and_the_meters_but_not_the_settings():
    base = dict(dataset=Component("digits"), model=Component("vgg_small"), normalizer=Component("osr"), trainer=Component("bptt"),
                epochs=2, batch_size=8, time_steps=2)
    a = CellConfig(**base, seed=0)
    b = CellConfig(**base, seed=1, meters=())
    c = CellConfig(**{**base, "epochs": 3}, seed=0)
    assert config_id(a) == config_id(b) != config_id(c)
    assert cell_id(a) != cell_id(b)


def test_history_lines_cut_short_are_skipped():
    history = [{"cell_id": "a", "epoch": "1", "metric": "test_top1", "value": "0.5"},
               {"cell_id": "a", "epoch": "", "metric": "test_top1", "value": None},
               {"cell_id": "a", "epoch": "2", "metric": "test_top1", "value": "0.6"}]
    assert curves(history, "test_top1") == {"a": {1: 0.5, 2: 0.6}}


def test_the_table_shows_the_varying_axes_as_columns_fits_the_terminal_and_cuts_nothing(capsys, monkeypatch):
    from harness.cli import _print_comparison

    rows = []
    i = 0
    for trainer, norms in (("online", ("vanilla_bn", "osr", "bntt")), ("bptt", ("vanilla_bn", "osr", "bntt", "tdbn", "tebn"))):
        for norm in norms:
            for threshold in ("fixed", "ots") if trainer == "online" and norm != "bntt" else ("fixed",):
                for seed in (0, 1, 2):
                    i += 1
                    rows.append({"cell_id": f"c{i}", "label": "", "status": "finished", "trainer": trainer, "normalizer": norm,
                                 "threshold": threshold, "dataset": "fashion_mnist", "seed": str(seed),
                                 "config_id": f"{trainer}{norm}{threshold}", "test_top1": str(0.85 + seed / 100),
                                 "best_test_top1": "0.88", "test_firing_rate": "0.19", "test_firing_rate_cv": "0.2",
                                 "train_saved_bytes_peak": str(12.2 * 2**20), "train_samples_per_s": "180.5", "synops": "1.2e6"})
    entries = compare(rows, ["trainer", "normalizer", "threshold", "dataset", "seed"])
    monkeypatch.setenv("COLUMNS", "100")
    _print_comparison(entries, f"matrix fashion-mnist: {len(rows)} cell(s), {len(entries)} finished configuration(s)")
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 100
    assert "…" not in out and "..." not in out  # wrapped, never cut
    assert "the same in all: dataset=fashion_mnist" in " ".join(out.split())
    headers = [line for line in lines if "normalizer" in line]
    assert len(headers) == 2 and all("trainer" in h and "threshold" in h for h in headers)  # metrics that do not fit: a second block
    assert "top-1 %" in headers[0] and "SynOps" in headers[1]
    for norm in ("vanilla_bn", "osr", "bntt", "tdbn", "tebn"):  # each value whole, in its own column
        assert any(f" {norm} " in line for line in lines)
    assert sum(" ots " in line for line in lines) == 4  # two configurations, in both blocks
    assert "86.00 ± 1.00" in out
