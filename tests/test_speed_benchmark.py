"""benchmarks/speed.py: its interleaving and its statistics on fake methods, then one end-to-end
run on a tiny configuration (seconds) and its outputs."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "speed.py"
TINY = ["--time-steps", "2", "--rounds", "2", "--iterations", "1", "--warmup", "0", "--batch-size", "4", "--channels", "4", "8"]


def _module():
    spec = importlib.util.spec_from_file_location("speed_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["speed_benchmark"] = module
    spec.loader.exec_module(module)
    return module


speed = _module()


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_methods_are_interleaved_in_rotating_rounds():
    calls = []

    def bench(name):
        return speed.Bench(step=lambda: calls.append(name), model=None,
                           begin=lambda: calls.append(f"begin {name}"), end=lambda: calls.append(f"end {name}"))

    setup = SimpleNamespace(sync=lambda: None)
    args = SimpleNamespace(rounds=3, iterations=2, warmup=1)
    samples = speed.interleaved_rounds(setup, {m: bench(m) for m in ("a", "b", "c")}, args)
    steps = [c for c in calls if " " not in c]
    assert steps[:3] == ["a", "b", "c"]  # warm-up: one each
    rounds = [steps[3 + 6 * r: 9 + 6 * r] for r in range(3)]
    assert rounds[0] == ["a", "a", "b", "b", "c", "c"]
    assert rounds[1] == ["a", "a", "c", "c", "b", "b"]  # rotated by one, then reversed
    assert rounds[2] == ["c", "c", "a", "a", "b", "b"]
    for m in "abc":
        assert len(samples[m]["thread"]) == 6 and len(samples[m]["rounds"]) == 3
        assert all(len(r["wall"]) == 2 for r in samples[m]["rounds"])
    assert calls.count("begin a") == 4 and calls.count("end a") == 4  # warm-up block + a block per round


def _samples(per_round):
    return {"thread": [v for r in per_round for v in r], "process": [v for r in per_round for v in r],
            "wall": [v for r in per_round for v in r],
            "rounds": [{"thread": r, "process": r, "wall": r} for r in per_round]}


def test_ratios_are_taken_per_round_against_the_ann_limit_times_T():
    # The ANN's step takes 1, 2, 1 s in three rounds (a busy second round); bptt at T = 4 takes
    # 5, 10, 5 s: every round's ratio is 1.25, whatever the machine did.
    samples = {"ann": _samples([[1.0], [2.0], [1.0]]), "bptt": _samples([[5.0], [10.0], [5.0]]),
               "bptt_meters": _samples([[5.5], [11.0], [5.5]]), "sj_bptt": _samples([[10.0], [20.0], [10.0]])}
    out = speed.summarize(samples, 4, "thread")
    assert out["bptt"]["ratio_to_ann"] == {"median": 1.25, "q1": 1.25, "q3": 1.25}
    assert out["ann"]["ratio_to_ann"]["median"] == 1.0
    assert out["ann"]["thread"]["median"] == 4.0  # one step's time times T
    assert out["ann"]["per_step"]["thread"]["median"] == 1.0
    assert out["bptt_meters"]["overhead_pct"]["median"] == pytest.approx(10.0)
    assert out["bptt"]["speedup_over_sj_bptt"]["median"] == 2.0
    checked = speed.targets([{"method": "bptt", "T": 4, **out["bptt"], "saved_over_ann": 1.2}])
    assert {t["target"]: t["met"] for t in checked} == {
        "bptt step <= 1.10x the ANN limit": False,
        "bptt saved bytes <= 1.05 x T x the ANN's": False,
        "bptt >= 1.3x faster than sj_bptt": True,
    }


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
    assert "| method | T | s/iter | x ANN limit | x channels-last ANN |" in md
    assert "Machine:" in md and "torch threads 1" in md and "--batch-size 4" in md and "thread clock" in md
    rows = list(csv.DictReader((out / "speed.csv").open()))
    expected = [m for m in speed.METHODS if m not in speed.COMPILED]
    assert [r["method"] for r in rows] == expected and {r["T"] for r in rows} == {"2"}


def test_every_method_has_times_ratios_and_memory(tiny_run):
    _, out = tiny_run
    result = json.loads((out / "speed.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    for method, r in rows.items():
        assert r["thread"]["q1"] <= r["thread"]["median"] <= r["thread"]["q3"], method
        assert r["wall"]["median"] > 0, method
        assert len(r["samples"]["rounds"]) == 2, method
        if method in speed.EVAL_METHODS:
            assert r["ratio_to_eval"]["median"] > 0, method
        else:
            assert r["ratio_to_ann"]["median"] > 0 and r["saved_bytes"] > 0, method
    assert rows["ann"]["ratio_to_ann"]["median"] == 1.0
    # BPTT keeps every step's activations, online training one step's; the metered benches report
    # their own meter's reading, the same as the plain one's.
    assert rows["bptt"]["saved_bytes"] > rows["online"]["saved_bytes"]
    assert rows["sj_bptt"]["saved_bytes"] > rows["sj_sltt"]["saved_bytes"]
    assert rows["online_meters"]["saved_bytes"] == rows["online"]["saved_bytes"]
    for meters_on, _ in speed.OVERHEADS:
        assert "overhead_pct" in rows[meters_on], meters_on
    assert result["machine"]["torch_threads"] == 1
    assert {t["target"].split()[0] for t in result["targets"]} == {"online", "online_osr_ots", "bptt", "bptt_osr"}


def test_run_overhead_and_tracking_are_measured(tiny_run):
    _, out = tiny_run
    result = json.loads((out / "speed.json").read_text())
    runs = result["run_overhead"]["runs"]
    assert [r["label"] for r in runs] == ["fresh store", "existing store"]
    for r in runs:
        assert 0 < r["cell_s"] < r["wall_s"] and r["outside_s"] == pytest.approx(r["wall_s"] - r["cell_s"])
    assert result["tracking"]["log_batch_s"] > 0
    md = (out / "speed.md").read_text()
    assert "## Outside training" in md and "## Overhead of the meters" in md and "## Targets" in md


def test_unknown_method_is_a_usage_error_listing_the_known_ones(tmp_path):
    proc = _run(["--only", "nope", "--out", str(tmp_path / "out")], cwd=tmp_path)
    assert proc.returncode != 0
    for method in speed.METHODS:
        assert method in proc.stderr
    assert not (tmp_path / "out").exists()
