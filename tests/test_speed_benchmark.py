"""benchmarks/speed.py: run it end to end on a tiny configuration (seconds) and check its outputs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "speed.py"
METHODS = ("ann", "bptt", "online", "online_trace", "sj_bptt", "sj_sltt", "sj_ottt")
TINY = ["--time-steps", "2", "--iterations", "1", "--warmup", "0", "--batch-size", "4", "--channels", "4", "8", "--repeats", "1"]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("speed")
    out = tmp / "out"
    proc = _run([*TINY, "--out", str(out)], cwd=tmp)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, out


def test_outputs_exist_and_stdout_is_the_markdown(tiny_run):
    proc, out = tiny_run
    for name in ("speed.md", "speed.csv", "speed.json"):
        assert (out / name).is_file(), name
    md = (out / "speed.md").read_text()
    assert proc.stdout == md
    assert "| method | T | s/iter | ratio to ANN limit | saved-for-backward MiB |" in md
    assert "Machine:" in md and "torch threads 1" in md and "--batch-size 4" in md
    rows = list(csv.DictReader((out / "speed.csv").open()))
    assert {(r["method"], r["T"]) for r in rows} == {(m, "2") for m in METHODS}


def test_every_method_has_a_row_with_time_and_memory(tiny_run):
    _, out = tiny_run
    result = json.loads((out / "speed.json").read_text())
    rows = {r["method"]: r for r in result["rows"] if r["T"] == 2}
    assert set(rows) == set(METHODS)
    for method, r in rows.items():
        assert r["s_per_iter"] > 0, method
        assert r["saved_bytes"] > 0, method
        assert r["ratio_to_ann"] > 0, method
    assert rows["ann"]["ratio_to_ann"] == 1.0
    # The ANN row is one step's time scaled by T.
    assert rows["ann"]["s_per_iter"] == pytest.approx(2 * rows["ann"]["ann_s_per_step"])
    # BPTT keeps every step's activations; online training keeps one step's.
    assert rows["bptt"]["saved_bytes"] > rows["online"]["saved_bytes"]
    assert rows["sj_bptt"]["saved_bytes"] > rows["sj_sltt"]["saved_bytes"]
    assert result["machine"]["torch_threads"] == 1


def test_overhead_section_has_meters_on_and_off_and_tracking(tiny_run):
    _, out = tiny_run
    overhead = json.loads((out / "speed.json").read_text())["overhead"]
    assert overhead["T"] == 2
    assert [r["method"] for r in overhead["rows"]] == ["bptt", "online"]
    for r in overhead["rows"]:
        assert r["off_s_per_iter"] > 0 and r["on_s_per_iter"] > 0
        assert r["overhead_pct"] == pytest.approx(100 * (r["on_s_per_iter"] / r["off_s_per_iter"] - 1))
    tracking = overhead["tracking"]
    assert tracking["log_batch_s"] > 0
    assert tracking["metrics_per_epoch"] >= 20
    assert {"train_loss", "train_top1", "test_loss", "test_top1", "train_firing_rate"} <= set(tracking["metric_keys"])
    assert tracking["iterations_per_epoch"] == 15000  # 60000 / batch 4
    assert all(0 < r["fraction"] < 1 for r in tracking["per_trainer"])
    assert "## Overhead" in (out / "speed.md").read_text()


def test_unknown_method_is_a_usage_error_listing_the_known_ones(tmp_path):
    proc = _run(["--only", "nope", "--out", str(tmp_path / "out")], cwd=tmp_path)
    assert proc.returncode != 0
    for method in METHODS:
        assert method in proc.stderr
    assert not (tmp_path / "out").exists()
