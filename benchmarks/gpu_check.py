#!/usr/bin/env python
"""One-shot check of the harness's CUDA path, for the few minutes a GPU machine is available.

    scripts/gpu-check.sh                         # on the GPU machine (about 2-4 minutes)
    scripts/gpu-check.sh --device cpu            # the dry run: the same checks on the CPU, fewer cells

Needs PyTorch, pluggy, rich, matplotlib and scikit-learn, not MLflow or tonic; uses only the
bundled digits set and synthetic tensors. Writes ``<out>/gpu-check.json`` (everything) and
``<out>/gpu-check.md`` (one PASS/FAIL line per check, then the details); exits 0 when every check
passes. Each check runs the real training loop (``harness.runner.run_cell``, no tracking):

* ``host_syncs``: no host synchronization or host-to-device copy per training step beyond the
  batch transfers: ``harness.devicecheck.HostTraffic`` on the device, and on CUDA also PyTorch's
  ``torch.cuda.set_sync_debug_mode("warn")``; a cell with 4 training batches against one with 2.
* ``resume``: for every normalizer x threshold x trainer cell the matrix allows (and a paper model
  with neuron dropout on the GPU), a cell stopped after epoch 1 and resumed from its checkpoint
  ends with the uninterrupted cell's metrics, bit for bit (``deterministic = true``).
* ``cpu_parity``: in float64, the same training steps on the CPU and on the device give the same
  losses, parameters and buffers (running statistics, OTS thresholds) to 1e-9 relative.
* ``memory``: peak training memory per iteration (``train_cuda_peak_bytes`` on CUDA, the bytes
  saved for backward elsewhere) for online training and BPTT at T = 2, 4, 8, 30: online flat in
  T, BPTT growing with T (paper Fig. 2a).
* ``same_seed``: a deterministic cell run twice gives the same metrics; a default cell (cuDNN
  autotuner, TF32) is reported for comparison.
* ``autocast``: cells with ``precision = "bfloat16"`` and ``"float16"`` (loss scaling: the
  scaler's final scale is reported) train and evaluate to finite losses; every normalizer and OTS
  under float16 autocast keep float32, finite buffers.
* ``speed``: ``benchmarks/speed.py`` at the default model (``vgg_small`` 16-32-64, Fashion-MNIST
  shape, batch 64) and at VGGSNN on CIFAR-shaped synthetic data (batch 128), T = 4: the
  harness's trainers against SpikingJelly's (when it is installed) and the ANN limit, interleaved
  rounds, wall time; its tables land in ``<out>/speed-vgg_small/`` and ``<out>/speed-vggsnn/``.
  The ``memory`` check gives ``train_cuda_peak_bytes`` at T = 2 and 30.
* ``device_choice``: two data-parallel processes on a one-GPU machine: process 0 takes cuda:0,
  process 1 is refused with what to do, and a ``device = "cpu"`` cell runs on both processes over
  the same process group (gloo for CPU tensors beside NCCL).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import socket
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from harness import get_registry
from harness.config import CellConfig, Component, OptimizerConfig, cell_id
from harness.devicecheck import HostTraffic
from harness.matrix import Cell, expand
from harness.runner import CellInterrupted, build_model, load_dataset, run_cell

COMBOS = [("osr", "ots", "online"), ("vanilla_bn", "fixed", "bptt"), ("bntt", "ots", "online"), ("tebn", "fixed", "bptt")]
FINAL = ("train_loss", "train_top1", "test_loss", "test_top1")


class Recorder:
    """The hook relay without observers: records the calls (no MLflow, no files)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def __getattr__(self, name: str) -> Any:
        return lambda **kw: self.calls.append((name, kw))


class StopAtEpoch(Recorder):
    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, **kw: Any) -> None:
        if kw["epoch"] == self.epoch:
            raise KeyboardInterrupt


@dataclasses.dataclass
class Context:
    device: str  # "cuda" or "cpu"
    quick: bool
    out: Path
    registry: Any


def cell(ctx: Context, normalizer: str, threshold: str, trainer: str, *, seed: int = 0, device: str | None = None,
         model: tuple[str, dict] = ("vgg_small", {"channels": [8, 16]}), **kw: Any) -> Cell:
    reg = ctx.registry
    settings: dict[str, Any] = {"epochs": 1, "batch_size": 32, "time_steps": 2, "train_subset": 256, "max_train_batches": 4,
                                "max_eval_batches": 2, "meters": (), **kw}
    cfg = CellConfig(
        dataset=Component("digits", reg.datasets.info("digits").defaults()),
        model=Component(model[0], {**reg.models.info(model[0]).defaults(), **model[1]}),
        normalizer=Component(normalizer, reg.normalizers.info(normalizer).defaults()),
        threshold=Component(threshold, reg.thresholds.info(threshold).defaults()),
        trainer=Component(trainer, reg.trainers.info(trainer).defaults()),
        loss=Component("tet", reg.losses.info("tet").defaults()),
        seed=seed, device=device or ctx.device, optimizer=OptimizerConfig(lr=0.05), **settings,
    )
    return Cell(id=cell_id(cfg), index=0, config=cfg, axes={"cell": f"{normalizer}/{threshold}/{trainer}/{model[0]}"})


def finished(result: Any) -> Any:
    if result.status != "finished":
        raise RuntimeError(f"cell [{result.label}] {result.status}: {(result.error or '').strip().splitlines()[-1:]}")
    return result


# -- checks ---------------------------------------------------------------------------------------


def check_environment(ctx: Context) -> dict[str, Any]:
    info: dict[str, Any] = {"ok": True, "torch": torch.__version__, "python": platform.python_version(), "host": socket.gethostname(),
                            "device": ctx.device, "threads": torch.get_num_threads()}
    if ctx.device == "cuda":
        info.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), gpu=torch.cuda.get_device_name(0),
                    gpus=torch.cuda.device_count())
    return info


def check_host_syncs(ctx: Context) -> dict[str, Any]:
    device_type = "cuda" if ctx.device == "cuda" else "meta"  # on the CPU, the meta device stands in
    out: dict[str, Any] = {"ok": True, "cells": {}}
    for combo in COMBOS:
        sites, sync_warnings = {}, {}
        for batches in (2, 4):
            c = cell(ctx, *combo, device=device_type if device_type == "meta" else None, max_train_batches=batches,
                     meters=("firing_rate", "memory", "synops"))  # the meters' hooks run in every step too
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if device_type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode("warn")
                try:
                    with HostTraffic(device_type, placeholders=device_type == "meta") as traffic:
                        finished(run_cell(c, ctx.registry, Recorder()))
                finally:
                    if device_type == "cuda":
                        torch.cuda.set_sync_debug_mode("default")
            sites[batches] = traffic.by_site()
            sync_warnings[batches] = sum(1 for w in caught if "synchroniz" in str(w.message))
        extra = sites[4] - sites[2]
        expected = Counter({("to_device", "harness/runner.py:_run_epoch"): 4})
        extra_syncs = sync_warnings[4] - sync_warnings[2]
        ok = extra == expected and extra_syncs <= 0
        out["cells"]["/".join(combo)] = {
            "ok": ok, "per_step_extra": {f"{k} {s}": n for (k, s), n in (extra - expected).items()},
            "per_pass": {f"{k} {s}": n for (k, s), n in sites[2].items()},
            "cuda_sync_warnings": sync_warnings,
        }
        out["ok"] &= ok
    return out


def check_resume(ctx: Context, tmp: Path) -> dict[str, Any]:
    data = {
        "name": "gpu-check",
        "defaults": {"dataset": "digits", "model": "vgg_small", "normalizer": "vanilla_bn", "trainer": "bptt",
                     "epochs": 2, "batch_size": 32, "time_steps": 2},
        "matrix": {"normalizer": ctx.registry.names("normalizer"), "threshold": ctx.registry.names("threshold"),
                   "trainer": ctx.registry.names("trainer")},
    }
    combos = [(c.config.normalizer.name, c.config.threshold.name, c.config.trainer.name)
              for c in expand(data, ctx.registry, source="gpu-check.toml").cells]
    cases = [(combo, ("vgg_small", {"channels": [8, 16]})) for combo in (COMBOS if ctx.quick else combos)]
    if not ctx.quick:
        cases.append((("osr", "ots", "online"), ("vggsnn", {"dropout": 0.1})))
    out: dict[str, Any] = {"ok": True, "cells": {}}
    for i, (combo, model) in enumerate(cases):
        make = lambda: cell(ctx, *combo, model=model, epochs=3, max_train_batches=3, deterministic=True)  # noqa: E731
        reference = finished(run_cell(make(), ctx.registry, Recorder(), tmp / f"ref{i}"))
        try:
            run_cell(make(), ctx.registry, StopAtEpoch(1), tmp / f"cut{i}")  # told of epoch 1 after its checkpoint
        except CellInterrupted:
            pass
        recorder = Recorder()
        resumed = finished(run_cell(make(), ctx.registry, recorder, tmp / f"cut{i}"))
        starts = [kw["info"] for name, kw in recorder.calls if name == "on_cell_start"]
        diffs = {k: abs(resumed.metrics[k] - reference.metrics[k]) for k in FINAL}
        ok = all(d == 0 for d in diffs.values()) and starts[0].get("resumed_from_epoch") == 1
        out["cells"][f"{'/'.join(combo)}/{model[0]}"] = {"ok": ok, "abs_diff": diffs, "warnings": starts[0].get("warnings", [])}
        out["ok"] &= ok
    return out


def _train_steps(ctx: Context, combo: tuple[str, str, str], device: torch.device, steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    c = cell(ctx, *combo, device=str(device))
    cfg = c.config
    torch.manual_seed(0)
    data = load_dataset(cfg, ctx.registry)
    model = build_model(cfg, ctx.registry, data).double().to(device)
    trainer = ctx.registry.trainers[cfg.trainer.name](**cfg.trainer.options)
    loss_fn = ctx.registry.losses["tet"](**cfg.loss.options)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(data.train), (32,), generator=g).tolist()
        x = torch.stack([data.train[i][0] for i in idx]).double()
        y = torch.tensor([int(data.train[i][1]) for i in idx])
        seq = x.unsqueeze(0).expand(cfg.time_steps, *x.shape).to(device)
        losses.append(float(trainer.train_batch(model, seq, y.to(device), loss_fn, opt).loss))
    state = {k: v.detach().double().cpu() for k, v in model.state_dict().items() if v.is_floating_point()}
    return losses, state


def check_cpu_parity(ctx: Context) -> dict[str, Any]:
    out: dict[str, Any] = {"ok": True, "cells": {}}
    device = torch.device(ctx.device)
    for combo in COMBOS:
        cpu_losses, cpu_state = _train_steps(ctx, combo, torch.device("cpu"), 3)
        dev_losses, dev_state = _train_steps(ctx, combo, device, 3)
        loss_diff = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(cpu_losses, dev_losses))
        state_diff = max(float(((cpu_state[k] - dev_state[k]).abs().max() / cpu_state[k].abs().max().clamp_min(1e-12))) if cpu_state[k].numel() else 0.0
                         for k in cpu_state)
        ok = loss_diff <= 1e-9 and state_diff <= 1e-9
        out["cells"]["/".join(combo)] = {"ok": ok, "max_rel_loss_diff": loss_diff, "max_rel_state_diff": state_diff}
        out["ok"] &= ok
    return out


def check_memory(ctx: Context) -> dict[str, Any]:
    steps = (2, 4) if ctx.quick else (2, 4, 8, 30)
    key = "train_cuda_peak_bytes" if ctx.device == "cuda" else "train_saved_bytes_peak"
    peaks: dict[str, dict[int, float]] = {"online": {}, "bptt": {}}
    for trainer in peaks:
        for T in steps:
            c = cell(ctx, "vanilla_bn", "fixed", trainer, time_steps=T, batch_size=64, max_train_batches=2, max_eval_batches=1,
                     model=("vgg_small", {"channels": [32, 64, 128]}), meters=("memory",))
            peaks[trainer][T] = finished(run_cell(c, ctx.registry, Recorder())).metrics[key]
    online_spread = max(peaks["online"].values()) / min(peaks["online"].values())
    bptt_growth = peaks["bptt"][steps[-1]] / peaks["bptt"][steps[0]]
    below = all(peaks["online"][T] < peaks["bptt"][T] for T in steps if T >= 4)
    # CUDA's peak includes parameters, optimizer state and the batch: "flat" within 15%.
    ok = online_spread <= 1.15 and bptt_growth >= (1.5 if ctx.quick else 4.0) and below
    return {"ok": ok, "metric": key, "peaks_mib": {t: {T: v / 2**20 for T, v in p.items()} for t, p in peaks.items()},
            "online_max_over_min": online_spread, "bptt_growth": bptt_growth}


def check_same_seed(ctx: Context) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for deterministic in (True, False):
        runs = [finished(run_cell(cell(ctx, "osr", "ots", "online", deterministic=deterministic), ctx.registry, Recorder()))
                for _ in range(2)]
        out["deterministic" if deterministic else "default"] = {
            "identical": all(runs[0].metrics[k] == runs[1].metrics[k] for k in FINAL),
            "abs_diff": {k: abs(runs[0].metrics[k] - runs[1].metrics[k]) for k in FINAL},
        }
    out["ok"] = out["deterministic"]["identical"]
    return out


def check_autocast(ctx: Context) -> dict[str, Any]:
    out: dict[str, Any] = {"ok": True, "cells": {}, "float16_modules": {}}
    cuda = torch.device(ctx.device).type == "cuda"
    if not cuda:
        out["cells"]["float16"] = "not run: float16 cells need CUDA (their loss scaling)"
    for precision in ("bfloat16", "float16") if cuda else ("bfloat16",):
        for combo in COMBOS[:2]:
            r = finished(run_cell(cell(ctx, *combo, precision=precision), ctx.registry, Recorder()))
            ok = math.isfinite(r.metrics["train_loss"]) and math.isfinite(r.metrics["test_loss"])
            out["cells"][f"{precision}/" + "/".join(combo)] = {"ok": ok, **{k: r.metrics[k] for k in FINAL}}
            out["ok"] &= ok
    from harness.snn import LayerFactory, LIFNeuron, run_sequence

    device = torch.device(ctx.device)
    for name in ctx.registry.names("normalizer"):
        info = ctx.registry.normalizers.info(name)
        extra = {k: v for k, v in {"time_steps": 3, "v_threshold": 1.0}.items() if info.takes(k)}
        layers = LayerFactory(normalizer=lambda c: ctx.registry.normalizers[name](num_features=c, **extra),
                              neuron=lambda: LIFNeuron(ctx.registry.thresholds["ots"]()))
        net = ctx.registry.models["vgg_small"](in_channels=1, num_classes=4, input_size=(8, 8), layers=layers, channels=[4, 8]).to(device)
        mode = "sequence"
        try:
            with torch.autocast(device.type, dtype=torch.float16):
                y = run_sequence(net.train(), torch.randn(3, 16, 1, 8, 8, device=device), mode)
                loss = y.float().square().mean()
            loss.backward()
            ok = bool(torch.isfinite(loss)) and all(b.dtype in (torch.float32, torch.int64) and bool(torch.isfinite(b.float()).all())
                                                    for b in net.buffers())
            out["float16_modules"][name] = {"ok": ok, "output": str(y.dtype)}
        except RuntimeError as exc:
            if "autocast" in str(exc).lower() and device.type == "cpu":
                out["float16_modules"][name] = {"ok": True, "skipped": f"float16 autocast unavailable on the CPU: {exc}"}
                continue
            raise
        out["ok"] &= ok
    return out


def _two_process_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from harness import parallel

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    parallel.init_from_environment()
    ctx = Context(device="cpu", quick=True, out=Path(out_dir), registry=get_registry())
    report: dict[str, Any] = {"backend": str(dist.get_backend())}
    r = run_cell(cell(ctx, "osr", "ots", "online", device="cpu"), ctx.registry, Recorder())
    report["cpu_cell"] = [r.status, r.metrics.get("train_loss"), (r.error or "").strip().splitlines()[-1:]]
    if torch.cuda.is_available():
        r = run_cell(cell(ctx, "vanilla_bn", "fixed", "bptt", device="cuda"), ctx.registry, Recorder())
        report["cuda_cell"] = [r.status, r.error_type, (r.error or "").strip().splitlines()[-1:]]
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    parallel.shutdown()
    parallel.exit_process(0)


def check_device_choice(ctx: Context, tmp: Path) -> dict[str, Any]:
    import torch.multiprocessing as mp

    from harness import devices
    from harness.errors import HarnessError

    out: dict[str, Any] = {"ok": True}
    if ctx.device == "cuda":
        count = torch.cuda.device_count()
        out["rank0"] = str(devices.resolve_device("cuda", 0, count + 1, 0))
        try:
            devices.resolve_device("cuda", count, count + 1, count)
            out["extra_rank"] = "accepted (wrong)"
            out["ok"] = False
        except HarnessError as exc:
            out["extra_rank"] = str(exc)
        out["ok"] &= out["rank0"] == "cuda:0"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx_mp = mp.spawn(_two_process_worker, args=(port, str(tmp)), nprocs=2, join=False)
    deadline = time.monotonic() + 180
    while not ctx_mp.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx_mp.processes:
                p.kill()
            return {"ok": False, "error": "the two processes hung"}
    ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in (0, 1)]
    out["processes"] = ranks
    out["ok"] &= all(r["cpu_cell"][0] == "finished" for r in ranks) and ranks[0]["cpu_cell"][1] == ranks[1]["cpu_cell"][1]
    if ctx.device == "cuda" and torch.cuda.device_count() == 1:  # process 1 has no GPU: both fail the cell, none hangs
        out["ok"] &= all(r["cuda_cell"][0] == "failed" for r in ranks) and "per node" in " ".join(ranks[1]["cuda_cell"][2])
    return out


def check_speed(ctx: Context) -> dict[str, Any]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("speed_benchmark", Path(__file__).with_name("speed.py"))
    speed = importlib.util.module_from_spec(spec)
    sys.modules["speed_benchmark"] = speed
    spec.loader.exec_module(speed)  # type: ignore[union-attr]
    try:
        import spikingjelly  # noqa: F401

        sj: list[str] = []
    except ImportError:
        sj = ["--no-sj"]
    if ctx.quick:  # the dry run: the same code on tiny shapes
        runs = {"vgg_small": ["-b", "4", "--channels", "4", "8"], "vggsnn": ["--model", "vggsnn", "-b", "2", "--input", "3", "8", "8"]}
        common = ["-T", "2", "--rounds", "1", "--iterations", "1", "--warmup", "0", "--no-eval"]
    else:
        runs = {"vgg_small": ["-b", "64"], "vggsnn": ["--model", "vggsnn", "-b", "128", "--input", "3", "32", "32"]}
        common = ["-T", "4", "--rounds", "5", "--iterations", "3", "--warmup", "3"]
    detail: dict[str, Any] = {"spikingjelly": not sj}
    ok = True
    for label, extra in runs.items():
        out = ctx.out / f"speed-{label}"
        rc = speed.main([*common, *extra, *sj, "--device", ctx.device, "--threads", "0", "--no-run-overhead", "--out", str(out)])
        result = json.loads((out / "speed.json").read_text())
        ok = ok and rc == 0
        detail[label] = {
            "x_ann": {f"{r['method']} T={r['T']}": round(r["ratio_to_ann"]["median"], 3) for r in result["rows"] if "ratio_to_ann" in r},
            "s_per_iter": {f"{r['method']} T={r['T']}": r[result["config"]["clock"]]["median"] for r in result["rows"]},
            "targets": [f"{t['target']} (T={t['T']}): {t['measured']} {'met' if t['met'] else 'NOT met'}" for t in result["targets"]],
        }
    detail["ok"] = ok
    return detail


CHECKS: list[tuple[str, Callable[..., dict[str, Any]], bool]] = [  # name, function, takes a scratch directory
    ("environment", check_environment, False),
    ("host_syncs", check_host_syncs, False),
    ("resume", check_resume, True),
    ("cpu_parity", check_cpu_parity, False),
    ("memory", check_memory, False),
    ("same_seed", check_same_seed, False),
    ("autocast", check_autocast, False),
    ("speed", check_speed, False),
    ("device_choice", check_device_choice, True),
]


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# GPU check: {report['device']} ({report['started']})", "", "| check | result | seconds |", "|---|---|---|"]
    for c in report["checks"]:
        lines.append(f"| {c['name']} | {c['status']} | {c['seconds']:.1f} |")
    lines += ["", f"**{'PASS' if report['passed'] else 'FAIL'}**: {sum(c['status'] == 'PASS' for c in report['checks'])} of "
              f"{len(report['checks'])} checks passed.", ""]
    for c in report["checks"]:
        lines += [f"## {c['name']}: {c['status']}", "", "```", json.dumps(c["detail"], indent=1, default=str)[:6000], "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="where to check (default: %(default)s)")
    parser.add_argument("--out", default="results/gpu-check", help="output directory (default: %(default)s)")
    parser.add_argument("--only", action="append", default=[], help="run only this check (repeatable)")
    parser.add_argument("--quick", action="store_true", help="fewer cells (the default on the CPU)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: CUDA is not available here; run with --device cpu for the dry run", file=sys.stderr)
        return 4
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(device=args.device, quick=args.quick or args.device == "cpu", out=out, registry=get_registry())
    report: dict[str, Any] = {"device": args.device, "quick": ctx.quick, "started": datetime.datetime.now().isoformat(timespec="seconds"),
                              "checks": []}
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        for name, fn, needs_dir in CHECKS:
            if args.only and name not in args.only:
                continue
            t0 = time.perf_counter()
            try:
                tmp = Path(scratch, name)
                tmp.mkdir()
                detail = fn(ctx, tmp) if needs_dir else fn(ctx)
                status = "PASS" if detail.pop("ok") else "FAIL"
            except Exception as exc:  # a check that breaks is reported, the others still run
                detail, status = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}, "ERROR"
            seconds = time.perf_counter() - t0
            report["checks"].append({"name": name, "status": status, "seconds": seconds, "detail": detail})
            print(f"gpu-check: {name:14s} {status} ({seconds:.1f}s)", file=sys.stderr, flush=True)
    report["passed"] = all(c["status"] == "PASS" for c in report["checks"])
    (out / "gpu-check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu-check.md").write_text(markdown(report))
    print(f"gpu-check: {'PASS' if report['passed'] else 'FAIL'}; wrote {out / 'gpu-check.md'} and {out / 'gpu-check.json'}", file=sys.stderr)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
