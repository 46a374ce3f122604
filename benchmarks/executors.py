#!/usr/bin/env python
"""Wall time of one 4-cell matrix under each executor, side by side in one run.

Modes (each a fresh ``harness run`` process on a fresh results directory, so the times include
everything a user waits for: start-up, MLflow, the preflight, the cells, the summary and plots):

* ``serial_1``: ``--executor serial`` with ``cpus_per_cell = 1`` (one torch thread);
* ``serial_all``: ``--executor serial`` at torch's default thread count (every core);
* ``ray``: ``--executor ray`` with ``cpus_per_cell = 1``: as many cells at a time as there are
  cores (``--jobs`` caps it; 2 on a 2-core machine), one thread each, on a local Ray instance the
  run starts and stops;
* ``split``: the hand-made split Ray replaces: two ``harness run --executor serial`` processes at
  one thread each, side by side, each on half of the cells (``--only seed=...``) in a results
  directory of its own. Its cells' durations against ``serial_1``'s show what two cells at once
  cost on this machine without Ray (shared caches and memory bandwidth): the ceiling of any
  executor's ratio.

The modes are interleaved: ``--rounds`` rounds run every mode once, the order rotating from round
to round, so a busy phase of the shared machine slows every mode alike. Ratios (serial_1 / ray,
serial_all / ray) are taken per round and reported as the median over rounds with the range.
Each round also measures Ray's fixed cost in a process of its own (``ray.init`` of a local
instance until it answers, and its shutdown). The ``ray`` run is made with ``--verbose``, whose
last ``harness: ray:`` line gives what the driver measured: the per-cell overhead (the time a
cell's slot spends on it outside the cell's own ``duration_s``, from the moment it could start
to the arrival of its end: scheduling, the registry and the data set in the worker, the events'
travel; median over the run's cells) and the preflight's time (the data-presence probe, which
also loads the data sets into the object store, and the workers' start: Python, torch, timm and
the plugins imported in each fresh worker, a fixed cost per run, not per cell).

The matrix: scikit-learn's digits (1437 training, 360 test images), ``vgg_small`` (channels 8-16),
T = 4, the online trainer, ``--epochs`` epochs, 4 seeds, on the CPU.

Output: ``<out>/executors.md`` (also printed) and ``<out>/executors.json`` (every sample).
Example: ``python benchmarks/executors.py --rounds 3 --epochs 100 --out results/executors`` (about 40 minutes
on a 2-core machine).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("serial_1", "serial_all", "ray", "split")
CELLS = 4

MATRIX = """
name = "executors"
[defaults]
dataset = "digits"
model = "vgg_small"
normalizer = "vanilla_bn"
trainer = "online"
epochs = {epochs}
batch_size = 32
time_steps = 4
device = "cpu"
seeds = [0, 1, 2, 3]
[options.model.vgg_small]
channels = [8, 16]
{execution}
"""

RAY_START = """
import json, time
t0 = time.perf_counter()
from harness.matrix import ExecutionConfig
from harness.ray_executor import RayExecutor
ex = RayExecutor(ExecutionConfig(executor="ray"))
t1 = time.perf_counter()
ex.start()
ex.resources()
t2 = time.perf_counter()
ex.close()
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "start_s": t2 - t1, "shutdown_s": t3 - t2}))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds of every mode (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=50, help="epochs of each cell (default: %(default)s; about a minute a cell on one core)")
    p.add_argument("--jobs", type=int, default=None, help="ray: cells at a time (default: one per core)")
    p.add_argument("--out", type=Path, default=Path("results/executors"), help="output directory (default: %(default)s)")
    return p.parse_args(argv)


def harness_command() -> list[str]:
    exe = Path(sys.executable).with_name("harness")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "harness"]


def run_mode(mode: str, work: Path, args: argparse.Namespace) -> dict:
    """One ``harness run`` of the matrix under ``mode`` (two side by side for ``split``): wall
    time and the cells' durations."""
    execution = "" if mode == "serial_all" else "[execution]\ncpus_per_cell = 1\n"
    matrix = work / f"{mode}.toml"
    matrix.write_text(MATRIX.format(epochs=args.epochs, execution=execution))
    parts = [["--only", "seed=0", "--only", "seed=1"], ["--only", "seed=2", "--only", "seed=3"]] if mode == "split" else [[]]
    env = {**os.environ, "SNN_HARNESS_DISABLE_PLUGIN_AUTOLOAD": "1"}
    runs = []
    t0 = time.perf_counter()
    for i, only in enumerate(parts):
        results = work / f"results-{mode}-{i}"
        shutil.rmtree(results, ignore_errors=True)
        cmd = [*harness_command(), "run", "--matrix", str(matrix), "--results", str(results),
               "--executor", "ray" if mode == "ray" else "serial", *only]
        if mode == "ray":
            cmd += ["--verbose"] + (["--jobs", str(args.jobs)] if args.jobs else [])
        runs.append((results, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=work, env=env)))
    outputs = [(proc.returncode, err) for _, proc in runs for _, err in [proc.communicate()]]
    wall = time.perf_counter() - t0
    errors = [(rc, err) for rc, err in outputs if rc != 0]
    if errors:
        raise SystemExit(f"{mode}: harness run failed ({errors[0][0]}):\n{errors[0][1][-3000:]}")
    rows = []
    for results, _ in runs:
        with (results / "executors" / "summary.csv").open() as fh:
            rows += list(csv.DictReader(fh))
    sample = {"wall_s": wall, "durations_s": [float(r["duration_s"]) for r in rows],
              "test_top1": {r["label"]: float(r["test_top1"]) for r in rows}}
    if mode == "ray":
        sample.update(ray_costs(outputs[0][1]))
    return sample


def ray_costs(stderr: str) -> dict:
    """The per-cell overhead (median over the cells) and the preflight's time that the driver
    states in its ``--verbose`` output."""
    found = re.search(r"harness: ray: time outside the cells' own run, per cell: ([0-9.]+) s .*"
                      r"the preflight \(probe, data sets, workers' start\) took ([0-9.]+) s", stderr)
    if found is None:
        raise SystemExit(f"ray: the run did not state its per-cell overhead:\n{stderr[-3000:]}")
    return {"overhead_per_cell_s": float(found.group(1)), "preflight_s": float(found.group(2))}


def ray_start_cost(work: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", RAY_START], capture_output=True, text=True, cwd=work)
    if proc.returncode != 0:
        raise SystemExit(f"measuring Ray's start failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cores = os.cpu_count() or 1
    slots = min(args.jobs or cores, cores, CELLS)
    samples: dict[str, list[dict]] = {m: [] for m in MODES}
    starts: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for r in range(args.rounds):
            order = MODES[r % len(MODES):] + MODES[: r % len(MODES)]
            for mode in order:
                sample = run_mode(mode, work, args)
                samples[mode].append(sample)
                print(f"round {r + 1}/{args.rounds} {mode}: {sample['wall_s']:.1f} s wall, cells "
                      f"{sum(sample['durations_s']):.1f} s", file=sys.stderr, flush=True)
            starts.append(ray_start_cost(work))
    rounds = range(args.rounds)
    ratio_1 = [samples["serial_1"][i]["wall_s"] / samples["ray"][i]["wall_s"] for i in rounds]
    ratio_all = [samples["serial_all"][i]["wall_s"] / samples["ray"][i]["wall_s"] for i in rounds]
    ratio_split = [samples["serial_1"][i]["wall_s"] / samples["split"][i]["wall_s"] for i in rounds]
    slowdown = {m: [sum(samples[m][i]["durations_s"]) / sum(samples["serial_1"][i]["durations_s"]) for i in rounds]
                for m in ("split", "ray")}
    overhead = [s["overhead_per_cell_s"] for s in samples["ray"]]
    preflight = [s["preflight_s"] for s in samples["ray"]]
    same = all(samples[m][i]["test_top1"] == samples["serial_1"][0]["test_top1"] for m in ("serial_1", "ray", "split") for i in rounds)

    def fmt(values: list[float], unit: str = " s", digits: int = 1) -> str:
        med, lo, hi = spread(values)
        return f"{med:.{digits}f}{unit} ({lo:.{digits}f}-{hi:.{digits}f})"

    lines = [
        f"# Executors: wall time of a {CELLS}-cell matrix",
        "",
        f"{datetime.date.today()}, {platform.machine()} {cores} core(s), Python {platform.python_version()}; "
        f"digits, vgg_small 8-16, T=4, online trainer, {args.epochs} epoch(s) a cell; {args.rounds} interleaved rounds; "
        f"ray: {slots} cell(s) at a time at one thread each. Median (min-max) over rounds.",
        "",
        "| mode | wall time | sum of cell durations |",
        "|---|---|---|",
    ]
    for mode in MODES:
        lines.append(f"| `{mode}` | {fmt([s['wall_s'] for s in samples[mode]])} | "
                     f"{fmt([sum(s['durations_s']) for s in samples[mode]])} |")
    lines += [
        "",
        f"- `ray` is {fmt(ratio_1, 'x', 2)} as fast as `serial` at one thread (goal >= 1.8x) and "
        f"{fmt(ratio_all, 'x', 2)} as fast as `serial` on all cores (goal > 1x), per round.",
        f"- Two cells at once, one thread each: each cell takes {fmt(slowdown['split'], 'x', 3)} its time alone "
        f"in the hand-made `split` (two serial processes, no Ray) and {fmt(slowdown['ray'], 'x', 3)} under `ray`; "
        f"so no executor of 2 cells at a time beats {2 / statistics.median(slowdown['split']):.2f}x here. "
        f"`split` is {fmt(ratio_split, 'x', 2)} as fast as `serial` at one thread.",
        f"- Ray's fixed cost: start of a local instance {fmt([s['start_s'] for s in starts])}, shutdown "
        f"{fmt([s['shutdown_s'] for s in starts])}, import {fmt([s['import_s'] for s in starts], digits=2)}.",
        f"- Per-cell overhead of `ray`, measured by the driver (a slot's time per cell outside the cell's own "
        f"duration: scheduling, the worker's set-up, the events' travel; median over the cells): "
        f"{fmt(overhead, digits=2)} (goal <= 2 s). The preflight (probe and data sets on the node, every worker's "
        f"start with its imports), once per run: {fmt(preflight)}.",
        f"- Final test accuracy of every cell identical under `serial_1`, `ray` and `split` in every round: {same}.",
    ]
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "executors.md").write_text(text)
    (args.out / "executors.json").write_text(json.dumps(
        {"samples": samples, "ray_start": starts, "ratio_serial_1": ratio_1, "ratio_serial_all": ratio_all, "ratio_split": ratio_split, "cell_slowdown": slowdown,
         "overhead_per_cell_s": overhead, "preflight_s": preflight, "slots": slots, "args": {k: str(v) for k, v in vars(args).items()}}, indent=1))
    print(text)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
