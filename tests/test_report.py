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
