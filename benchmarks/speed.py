#!/usr/bin/env python
"""Training speed and memory, side by side in one process, on the same model and batch.

Every method trains the default model of ``benchmarks.toml`` on one fixed random batch of
Fashion-MNIST shape and is timed as seconds per training iteration (forward + backward +
optimizer step on one batch of ``T`` steps; the median over ``--iterations`` iterations after
``--warmup`` untimed ones, with ``torch.cuda.synchronize`` before every clock read on CUDA). One
more iteration, not timed, measures the peak bytes saved for backward
(``harness.meters.memory.SavedTensorMeter``).

Model (``benchmarks.toml``'s default, built through the registry as ``harness.runner.build_model``
builds a cell's): ``vgg_small`` with ``--channels`` (16 32 64), input 1x28x28, 10 classes,
``vanilla_bn``, ``fixed`` threshold 1.0, LIF tau 2 with soft, detached reset (sigmoid surrogate,
alpha 4), TET loss (mse_weight 0.05); SGD lr 0.1, momentum 0.9, weight decay 5e-4 (the matrix's
optimizer) for every method.

Methods:

* ``ann``: the ANN limit, the same network with ReLU in place of LIF and plain ``BatchNorm2d``:
  ONE forward + backward + step on the ``[B, ...]`` batch. Its time is reported multiplied by
  ``T`` (the ideal cost of ``T`` steps), its saved bytes as measured (not multiplied). Always
  measured (once, it does not depend on ``T``): it is the reference of the ratio column.
* ``bptt``: the harness's ``bptt`` trainer on ``[T, B, ...]``.
* ``online``: the harness's ``online`` trainer (spatial gradient, one update per sequence).
* ``online_trace``: the ``online`` trainer with ``gradient = "trace"`` (OTTT).
* ``sj_bptt``: SpikingJelly's multi-step network (``layer.*`` with ``step_mode='m'``,
  ``neuron.LIFNode``) trained with BPTT, ``functional.reset_net`` after every iteration.
* ``sj_sltt``: SpikingJelly's SLTT (``neuron.SLTTLIFNode``, single-step layers), driven by
  SpikingJelly's ``learning.ottt_online_training`` (per-step forward and backward, one update
  per sequence), ``reset_net`` after every iteration.
* ``sj_ottt``: SpikingJelly's OTTT (``neuron.OTTTLIFNode`` in ``layer.OTTTSequential``), driven
  the same way.

The SpikingJelly networks copy the harness network's initial parameters and use its neuron
settings (tau 2, input not decayed, soft reset, detached reset, sigmoid surrogate alpha 4), so the
spikes match at the first iteration. One difference is SpikingJelly's own: ``layer.BatchNorm2d``
in multi-step mode normalizes over all ``T x B`` samples at once (statistics of the sequence),
where ``vanilla_bn`` normalizes each step by itself; the arithmetic cost is the same.

Overhead section (``--no-overhead`` skips it): for ``bptt`` and ``online`` at T = 4 (or the first
``--time-steps`` value when 4 is not among them), training iterations with the harness's meters
OFF and ON, ON wrapping each iteration exactly as ``harness/runner.py`` does
(``CellMeters(model, device, ("firing_rate", "memory"))``, ``begin("train")``, per iteration
``data_ready(0.0)`` and ``with meters.iteration():``, ``end("train", samples, batches)``), in
``--repeats`` interleaved off/on blocks of ``--iterations`` iterations; the overhead is the ratio
of the median s/iter minus one. Then the cost of tracking: an MLflow run in a temporary SQLite
store and ``client.log_batch`` of one epoch's metrics (the keys the runner logs, from a meters-ON
training phase and a test phase), as a fraction of a 60000-sample Fashion-MNIST epoch at the
measured meters-ON s/iter.

Output: ``<out>/speed.md`` (printed to stdout as well), ``<out>/speed.csv`` (the main table) and
``<out>/speed.json`` (everything). Run with the machine quiet; on a shared CPU set
``OMP_NUM_THREADS``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METHODS = ("ann", "bptt", "online", "online_trace", "sj_bptt", "sj_sltt", "sj_ottt")
DESCRIPTIONS = {
    "ann": "ANN limit: ReLU + BatchNorm2d, one step on [B, ...], time x T",
    "bptt": "harness bptt trainer",
    "online": "harness online trainer (spatial gradient, update per sequence)",
    "online_trace": "harness online trainer, gradient = trace (OTTT)",
    "sj_bptt": "SpikingJelly multi-step LIFNode, BPTT",
    "sj_sltt": "SpikingJelly SLTTLIFNode, ottt_online_training",
    "sj_ottt": "SpikingJelly OTTTLIFNode + OTTTSequential, ottt_online_training",
}
OVERHEAD_METHODS = ("bptt", "online")
OVERHEAD_METERS = ("firing_rate", "memory")
EPOCH_SAMPLES = 60000  # Fashion-MNIST's training set
IN_CHANNELS, NUM_CLASSES, INPUT_SIZE = 1, 10, (28, 28)
TAU, THETA, SURROGATE_ALPHA, MSE_WEIGHT = 2.0, 1.0, 4.0, 0.05
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4
MIB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benchmarks/speed.py",
        description=__doc__,
        epilog="Example: OMP_NUM_THREADS=2 python benchmarks/speed.py --time-steps 2 4 8 16 --out results/speed",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--time-steps", "-T", type=int, nargs="+", default=[2, 4, 8, 16], metavar="T",
                   help="numbers of time steps to measure (default: 2 4 8 16)")
    p.add_argument("--batch-size", "-b", type=int, default=64, help="batch size (default: 64)")
    p.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64], metavar="C",
                   help="vgg_small's channels per stage (default: 16 32 64)")
    p.add_argument("--iterations", "-n", type=int, default=20, help="timed training iterations per method and T (default: 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations before timing, per method and T (default: 3)")
    p.add_argument("--repeats", type=int, default=5,
                   help="overhead measurement: this many interleaved meters-off/on block pairs of --iterations "
                        "iterations each (default: 5)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="cpu, cuda, or auto: cuda if available (default: auto)")
    p.add_argument("--out", type=Path, default=Path("results/speed"), help="output directory for speed.md, speed.csv, speed.json (default: results/speed)")
    p.add_argument("--only", action="append", choices=METHODS, metavar="METHOD",
                   help=f"measure only this method (repeatable); one of {', '.join(METHODS)}. "
                        "ann is always measured: it is the reference of the ratio")
    p.add_argument("--no-overhead", dest="overhead", action="store_false",
                   help="skip the meters-on/off and MLflow tracking overhead measurement (default: measure it)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random batch and of every model (default: 0)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads(N) (default: torch's, which follows OMP_NUM_THREADS)")
    p.add_argument("--sj-cuda-impl", choices=("torch", "auto", "cuda", "triton"), default="torch",
                   help="SpikingJelly's LIF implementation on CUDA (its SJ_LIF_CUDA_IMPLEMENTATION, read at import; "
                        "SpikingJelly 2.x has no backend= argument). It serves LIFNode and the single-step SLTT/OTTT "
                        "nodes alike (they call the same op with T = 1). torch: plain PyTorch loops (the old "
                        "backend='torch'); auto: its fused CUDA kernels, else Triton. No effect on CPU (default: torch)")
    args = p.parse_args(argv)
    for name in ("batch_size", "iterations", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if any(t < 1 for t in args.time_steps):
        p.error("--time-steps must be >= 1")
    if any(c < 1 for c in args.channels):
        p.error("--channels must be >= 1")
    args.time_steps = list(dict.fromkeys(args.time_steps))
    wanted = set(args.only or METHODS) | {"ann"}
    args.methods = [m for m in METHODS if m in wanted]
    return args


# -- building the networks -------------------------------------------------------------------------


@dataclass
class Setup:
    """What every method shares: the registry, the device, the batch."""

    registry: Any
    device: Any
    channels: list[int]
    x: Any  # [B, 1, 28, 28]
    y: Any  # [B]
    seed: int

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@dataclass
class Bench:
    """One method at one T: ``step()`` runs one training iteration."""

    step: Callable[[], Any]
    model: Any
    trainer: Any = None
    optimizer: Any = None
    loss_fn: Any = None
    inputs: Any = None


def _loss(setup: Setup) -> Any:
    return setup.registry.losses["tet"](mse_weight=MSE_WEIGHT)


def _optimizer(params: Any) -> Any:
    from harness.config import OptimizerConfig
    from harness.runner import build_optimizer

    return build_optimizer(params, OptimizerConfig(name="sgd", lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY))


def build_snn(setup: Setup, time_steps: int) -> Any:
    """The harness's network, as ``harness.runner.build_model`` builds it for a cell."""
    import torch

    from harness.config import CellConfig, Component, NeuronConfig
    from harness.data import DatasetBundle
    from harness.runner import build_model

    config = CellConfig(
        dataset=Component("fashion_mnist"),
        model=Component("vgg_small", {"channels": list(setup.channels)}),
        normalizer=Component("vanilla_bn"),
        trainer=Component("bptt"),
        epochs=1,
        batch_size=int(setup.x.shape[0]),
        time_steps=time_steps,
        threshold=Component("fixed", {"theta": THETA}),
        loss=Component("tet", {"mse_weight": MSE_WEIGHT}),
        seed=setup.seed,
        neuron=NeuronConfig(tau=TAU, reset="soft", surrogate_alpha=SURROGATE_ALPHA, detach_reset=True),
    )
    data = DatasetBundle(train=None, test=None, in_channels=IN_CHANNELS, num_classes=NUM_CLASSES, input_size=INPUT_SIZE)  # type: ignore[arg-type]
    torch.manual_seed(setup.seed)
    return build_model(config, setup.registry, data).to(setup.device)


def build_ann(setup: Setup) -> Any:
    """The same network with ReLU for LIF and plain BatchNorm2d, run one step at a time."""
    import torch
    from torch import nn

    from harness.snn import LayerFactory, set_step_mode

    torch.manual_seed(setup.seed)
    layers = LayerFactory(normalizer=lambda c: nn.BatchNorm2d(c), neuron=nn.ReLU)
    model = setup.registry.models["vgg_small"](
        in_channels=IN_CHANNELS, num_classes=NUM_CLASSES, input_size=INPUT_SIZE, layers=layers, channels=list(setup.channels)
    ).to(setup.device)
    set_step_mode(model, "single")  # TimeDistributed layers take [B, ...]
    return model


def build_sj(setup: Setup, kind: str, reference: Any) -> Any:
    """``vgg_small`` from SpikingJelly layers; ``kind`` is ``bptt`` (multi-step LIFNode), ``sltt`` or
    ``ottt`` (single-step online nodes). Parameters are copied from ``reference`` (the harness's
    network) so both start from the same weights."""
    from torch import nn

    from spikingjelly.activation_based import layer, neuron, surrogate

    mode = "m" if kind == "bptt" else "s"
    node_cls = {"bptt": neuron.LIFNode, "sltt": neuron.SLTTLIFNode, "ottt": neuron.OTTTLIFNode}[kind]

    def node() -> nn.Module:
        # LIFNode has no `backend` argument in SpikingJelly 2.x: the implementation follows the device
        # (and SJ_LIF_CUDA_IMPLEMENTATION on CUDA, see --sj-cuda-impl).
        return node_cls(tau=TAU, decay_input=False, v_threshold=THETA, v_reset=None, detach_reset=True,
                        surrogate_function=surrogate.Sigmoid(alpha=SURROGATE_ALPHA), step_mode=mode)

    body: list[nn.Module] = []
    size, c_in = min(INPUT_SIZE), IN_CHANNELS
    for i, c in enumerate(setup.channels):
        body += [layer.Conv2d(c_in, c, kernel_size=3, padding=1, bias=True, step_mode=mode),
                 layer.BatchNorm2d(c, step_mode=mode), node()]
        if i < len(setup.channels) - 1 and size >= 2:
            body.append(layer.AvgPool2d(2, step_mode=mode))
            size //= 2
        c_in = c
    body += [layer.AdaptiveAvgPool2d(1, step_mode=mode), layer.Flatten(step_mode=mode),
             layer.Linear(c_in, NUM_CLASSES, step_mode=mode)]
    net = layer.OTTTSequential(*body) if kind == "ottt" else nn.Sequential(*body)
    net = net.to(setup.device)
    ours, theirs = list(reference.parameters()), list(net.parameters())
    if [p.shape for p in ours] != [p.shape for p in theirs]:
        raise RuntimeError("the SpikingJelly network's parameters do not line up with the harness network's")
    for p_theirs, p_ours in zip(theirs, ours):
        p_theirs.data.copy_(p_ours.data)
    return net


def make_bench(setup: Setup, method: str, time_steps: int) -> Bench:
    from harness.data import to_sequence

    loss_fn = _loss(setup)
    xs = to_sequence(setup.x, time_steps, temporal=False)  # [T, B, ...], a view
    y = setup.y
    if method == "ann":
        model = build_ann(setup)
        opt = _optimizer(model.parameters())

        def ann_step() -> Any:
            model.train()
            out = model(setup.x)
            loss = loss_fn.step(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.detach()

        return Bench(ann_step, model, optimizer=opt, loss_fn=loss_fn, inputs=setup.x)
    if method in ("bptt", "online", "online_trace"):
        model = build_snn(setup, time_steps)
        name, options = {"bptt": ("bptt", {}), "online": ("online", {}), "online_trace": ("online", {"gradient": "trace"})}[method]
        trainer = setup.registry.trainers[name](**options)
        opt = _optimizer(model.parameters())
        return Bench(lambda: trainer.train_batch(model, xs, y, loss_fn, opt), model, trainer, opt, loss_fn, xs)

    from spikingjelly.activation_based import functional
    from spikingjelly.activation_based.learning.online_learning import ottt_online_training

    reference = build_snn(setup, time_steps)
    net = build_sj(setup, method.removeprefix("sj_"), reference)
    del reference
    opt = _optimizer(net.parameters())
    if method == "sj_bptt":

        def sj_bptt_step() -> Any:
            net.train()
            out = net(xs)  # [T, B, 10]
            loss = loss_fn(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            functional.reset_net(net)
            return loss.detach()

        return Bench(sj_bptt_step, net, optimizer=opt, loss_fn=loss_fn, inputs=xs)

    # SpikingJelly's online driver takes [B, T, ...] inputs and [B, T] targets (it transposes them back),
    # runs forward + backward of f_loss_t per step, detach_net after each, one optimizer step at the end.
    x_bt = xs.transpose(0, 1)
    y_bt = y.unsqueeze(1).expand(-1, time_steps)

    def f_loss_t(out: Any, target: Any) -> Any:
        return loss_fn.step(out, target) / time_steps

    def sj_online_step() -> Any:
        net.train()
        loss, _ = ottt_online_training(net, opt, x_bt, y_bt, f_loss_t, online=False)
        functional.reset_net(net)
        return loss

    return Bench(sj_online_step, net, optimizer=opt, loss_fn=loss_fn, inputs=x_bt)


# -- measuring -------------------------------------------------------------------------------------


def time_iterations(setup: Setup, step: Callable[[], Any], iterations: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        step()
    setup.sync()
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        step()
        setup.sync()
        times.append(time.perf_counter() - t0)
    return times


def saved_bytes(setup: Setup, step: Callable[[], Any]) -> tuple[int, int | None]:
    """Peak saved-for-backward bytes of one iteration (and the CUDA peak allocation on CUDA)."""
    import torch

    from harness.meters.memory import SavedTensorMeter

    setup.sync()
    cuda = setup.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(setup.device)
    with SavedTensorMeter() as meter:
        step()
    setup.sync()
    peak = int(torch.cuda.max_memory_allocated(setup.device)) if cuda else None
    return meter.peak_bytes, peak


def measure(setup: Setup, method: str, time_steps: int, args: argparse.Namespace) -> dict[str, Any]:
    bench = make_bench(setup, method, time_steps)
    times = time_iterations(setup, bench.step, args.iterations, args.warmup)
    nbytes, cuda_peak = saved_bytes(setup, bench.step)
    return {
        "s_per_iter": statistics.median(times),
        "s_per_iter_min": min(times),
        "s_per_iter_max": max(times),
        "times": times,
        "saved_bytes": nbytes,
        "cuda_peak_bytes": cuda_peak,
    }


def run_block(setup: Setup, bench: Bench, meters: Any, iterations: int) -> tuple[list[float], dict[str, float], float, float]:
    """``iterations`` training iterations as ``harness.runner._run_epoch`` runs them, with the meters
    (``meters`` given) or without; returns per-iteration times, the phase's metrics, the block's wall
    time and the time of ``meters.end`` (0 without meters)."""
    import torch

    device = setup.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    count = 0
    times = []
    setup.sync()
    t_block = time.perf_counter()
    if meters is not None:
        meters.begin("train")
    for _ in range(iterations):
        t0 = time.perf_counter()
        if meters is not None:
            meters.data_ready(0.0)
            with meters.iteration():
                out = bench.trainer.train_batch(bench.model, bench.inputs, setup.y, bench.loss_fn, bench.optimizer)
        else:
            out = bench.trainer.train_batch(bench.model, bench.inputs, setup.y, bench.loss_fn, bench.optimizer)
        loss_sum += out.loss.double() * out.count
        correct += out.correct
        count += out.count
        setup.sync()
        times.append(time.perf_counter() - t0)
    metrics = {"train_loss": loss_sum.item() / count, "train_top1": correct.item() / count}
    end_s = 0.0
    if meters is not None:
        t_end = time.perf_counter()
        metrics.update(meters.end("train", count, iterations))
        end_s = time.perf_counter() - t_end
    setup.sync()
    return times, metrics, time.perf_counter() - t_block, end_s


def eval_phase(setup: Setup, bench: Bench) -> dict[str, float]:
    """One evaluation batch with every meter, as the runner's test phase (for the logged keys)."""
    from harness.meters.cell import METERS, CellMeters

    meters = CellMeters(bench.model, setup.device, METERS)
    try:
        meters.begin("test")
        meters.data_ready(0.0)
        with meters.iteration():
            out = bench.trainer.eval_batch(bench.model, bench.inputs, setup.y, bench.loss_fn)
        metrics = {"test_loss": float(out.loss), "test_top1": float(out.correct) / out.count}
        metrics.update(meters.end("test", out.count, 1))
    finally:
        meters.close()
    return metrics


def measure_overhead(setup: Setup, method: str, time_steps: int, args: argparse.Namespace) -> dict[str, Any]:
    from harness.meters.cell import CellMeters, model_size
    from harness.snn import collect_epoch_metrics

    bench = make_bench(setup, method, time_steps)
    for _ in range(args.warmup):
        bench.step()
    meters = CellMeters(bench.model, setup.device, OVERHEAD_METERS)
    runs: dict[str, dict[str, list[float]]] = {m: {"times": [], "block_s_per_iter": [], "end_s": []} for m in ("off", "on")}
    last_on: dict[str, float] = {}
    try:
        for r in range(args.repeats):
            for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
                times, metrics, wall, end_s = run_block(setup, bench, meters if mode == "on" else None, args.iterations)
                runs[mode]["times"] += times
                runs[mode]["block_s_per_iter"].append(wall / args.iterations)
                if mode == "on":
                    runs[mode]["end_s"].append(end_s)
                    last_on = metrics
    finally:
        meters.close()
    off = statistics.median(runs["off"]["times"])
    on = statistics.median(runs["on"]["times"])
    block_off = statistics.median(runs["off"]["block_s_per_iter"])
    block_on = statistics.median(runs["on"]["block_s_per_iter"])
    # The epoch's metrics as the runner assembles them (for the tracking measurement).
    static = model_size(bench.model)
    test = eval_phase(setup, bench)
    epoch = {**last_on, **test, "best_test_top1": test["test_top1"], "epoch_time_s": 0.0,
             "lr": bench.optimizer.param_groups[0]["lr"], **{k: float(v) for k, v in static.items()},
             **collect_epoch_metrics(bench.model)}
    return {
        "method": method,
        "T": time_steps,
        "iterations_per_block": args.iterations,
        "blocks": args.repeats,
        "off_s_per_iter": off,
        "on_s_per_iter": on,
        "overhead_pct": 100.0 * (on / off - 1.0),
        "off_block_s_per_iter": block_off,
        "on_block_s_per_iter": block_on,
        "block_overhead_pct": 100.0 * (block_on / block_off - 1.0),
        "meters_end_s": statistics.median(runs["on"]["end_s"]),
        "off_times": runs["off"]["times"],
        "on_times": runs["on"]["times"],
        "_epoch_metrics": epoch,
    }


def measure_tracking(metrics: dict[str, float], calls: int) -> dict[str, Any]:
    """Time ``log_batch`` of one epoch's metrics into a fresh MLflow run in a temporary SQLite store."""
    from mlflow.entities import Metric

    from harness import tracking

    with tempfile.TemporaryDirectory(prefix="speed-mlflow-") as tmp:
        client = tracking.client(f"sqlite:///{tmp}/mlflow.db")
        experiment = tracking.ensure_experiment(client, "speed-benchmark", Path(tmp) / "mlartifacts")
        run_id = client.create_run(experiment, run_name="speed").info.run_id
        times = []
        for epoch in range(1, calls + 1):
            now = int(time.time() * 1000)
            batch = [Metric(k, float(v), now, epoch) for k, v in metrics.items()]
            batch.append(Metric("epochs_completed", float(epoch), now, epoch))  # as the MLflow observer adds
            t0 = time.perf_counter()
            client.log_batch(run_id, metrics=batch)
            times.append(time.perf_counter() - t0)
        client.set_terminated(run_id)
        n_metrics = len(batch)
    return {"metrics_per_epoch": n_metrics, "log_batch_s": statistics.median(times), "log_batch_first_s": times[0],
            "log_batch_times": times, "metric_keys": sorted(metrics) + ["epochs_completed"]}


# -- reporting -------------------------------------------------------------------------------------


def machine_info(setup: Setup) -> dict[str, Any]:
    import torch

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cpu = cpu or platform.processor() or platform.machine()
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:
        available = os.cpu_count() or 0
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_available": available,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(setup.device),
        "device_name": torch.cuda.get_device_name(setup.device) if setup.device.type == "cuda" else None,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    try:
        import spikingjelly

        info["spikingjelly"] = getattr(spikingjelly, "__version__", None) or _dist_version("spikingjelly")
    except ImportError:
        info["spikingjelly"] = None
    return info


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _fmt(v: float | None, spec: str) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def render_markdown(result: dict[str, Any]) -> str:
    m, c = result["machine"], result["config"]
    device = m["device"] + (f" ({m['device_name']})" if m["device_name"] else "")
    lines = [
        "# Training speed: harness trainers vs SpikingJelly vs the ANN limit",
        "",
        f"Machine: {m['cpu']}, {m['cpu_count']} cores ({m['cpus_available']} available), torch threads "
        f"{m['torch_threads']}, torch {m['torch']}, SpikingJelly {m['spikingjelly']}, device {device}, {m['date']}; "
        f"command: `{c['command']}`",
        "",
        f"Model: vgg_small channels {c['channels']}, input 1x28x28, 10 classes, batch {c['batch_size']}; vanilla_bn, "
        f"fixed threshold {THETA}, LIF tau {TAU} soft reset (detached), TET (mse_weight {MSE_WEIGHT}); SGD lr {LR} "
        f"momentum {MOMENTUM} weight decay {WEIGHT_DECAY}. s/iter: median of {c['iterations']} training iterations "
        f"(forward + backward + step on one batch of T steps) after {c['warmup']} warm-up ones. Ratio: s/iter over the "
        "ANN limit (one ANN iteration x T). Saved-for-backward: peak bytes autograd holds within one iteration.",
        "",
    ]
    cuda = m["device"].startswith("cuda")
    head = ["method", "T", "s/iter", "ratio to ANN limit", "saved-for-backward MiB"] + (["CUDA peak MiB"] if cuda else [])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cells = [r["method"], str(r["T"]), _fmt(r["s_per_iter"], ".4g"), _fmt(r["ratio_to_ann"], ".2f"),
                 _fmt(r["saved_mib"], ".3g")]
        if cuda:
            cells.append(_fmt(None if r["cuda_peak_bytes"] is None else r["cuda_peak_bytes"] / MIB, ".3g"))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Methods: " + "; ".join(f"`{k}`: {DESCRIPTIONS[k]}" for k in c["methods"]) + "."]
    ov = result.get("overhead")
    if ov:
        lines += [
            "",
            f"## Overhead of the harness's meters and of MLflow tracking (T = {ov['T']})",
            "",
            f"Meters ON wraps every iteration as harness/runner.py does (CellMeters with {', '.join(OVERHEAD_METERS)}: "
            f"begin, data_ready, iteration(), end). {ov['blocks']} interleaved off/on blocks of "
            f"{ov['iterations_per_block']} iterations; s/iter is the median over all iterations of each kind, "
            "'block' the median over blocks of a block's wall time per iteration (with begin/end and the read-back).",
            "",
            "| trainer | T | meters off s/iter | meters on s/iter | overhead | block off s/iter | block on s/iter | block overhead | meters.end() s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in ov["rows"]:
            lines.append(
                f"| {r['method']} | {r['T']} | {r['off_s_per_iter']:.4g} | {r['on_s_per_iter']:.4g} | {r['overhead_pct']:+.1f}% | "
                f"{r['off_block_s_per_iter']:.4g} | {r['on_block_s_per_iter']:.4g} | {r['block_overhead_pct']:+.1f}% | "
                f"{r['meters_end_s']:.3g} |"
            )
        tr = ov.get("tracking")
        if tr:
            lines += [
                "",
                f"MLflow tracking (temporary SQLite store): `log_batch` of one epoch's {tr['metrics_per_epoch']} metrics takes "
                f"{tr['log_batch_s'] * 1e3:.1f} ms (median of {len(tr['log_batch_times'])} calls; the first "
                f"{tr['log_batch_first_s'] * 1e3:.1f} ms). An epoch of {EPOCH_SAMPLES} samples is "
                f"{tr['iterations_per_epoch']} iterations at batch {c['batch_size']}:",
                "",
                "| trainer | T | epoch s (meters on) | log_batch s | fraction of the epoch |",
                "|---|---|---|---|---|",
            ]
            for r in tr["per_trainer"]:
                lines.append(f"| {r['method']} | {ov['T']} | {r['epoch_s']:.4g} | {tr['log_batch_s']:.3g} | {r['fraction']:.2e} |")
    return "\n".join(lines) + "\n"


def write_outputs(result: dict[str, Any], out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(result)
    (out / "speed.md").write_text(markdown)
    fields = ["method", "T", "s_per_iter", "ratio_to_ann", "saved_bytes", "saved_mib", "s_per_iter_min", "s_per_iter_max",
              "ann_s_per_step", "cuda_peak_bytes", "iterations", "warmup", "batch_size"]
    with (out / "speed.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in result["rows"]:
            writer.writerow(r)
    (out / "speed.json").write_text(json.dumps(result, indent=2) + "\n")
    return markdown


# -- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Read by SpikingJelly when it is imported: choose its CUDA LIF implementation first.
    os.environ["SJ_LIF_CUDA_IMPLEMENTATION"] = args.sj_cuda_impl

    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from harness import get_registry
    from harness.runner import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.rand(args.batch_size, IN_CHANNELS, *INPUT_SIZE, generator=g).to(device)
    y = torch.randint(0, NUM_CLASSES, (args.batch_size,), generator=g).to(device)
    setup = Setup(get_registry(), device, list(args.channels), x, y, args.seed)
    overhead_T = 4 if 4 in args.time_steps else args.time_steps[0]
    command = shlex.join(["python", "benchmarks/speed.py", *(sys.argv[1:] if argv is None else argv)])

    rows: list[dict[str, Any]] = []
    overhead: dict[str, Any] | None = None
    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("speed", total=len(args.methods) * len(args.time_steps))
        ann: dict[str, Any] | None = None
        for T in args.time_steps:
            for method in args.methods:
                progress.update(task, description=f"{method} T={T}")
                if method == "ann":
                    if ann is None:  # one ANN iteration does not depend on T
                        ann = measure(setup, "ann", 1, args)
                    res = dict(ann, s_per_iter=ann["s_per_iter"] * T, s_per_iter_min=ann["s_per_iter_min"] * T,
                               s_per_iter_max=ann["s_per_iter_max"] * T, ann_s_per_step=ann["s_per_iter"])
                else:
                    res = measure(setup, method, T, args)
                rows.append({"method": method, "T": T, **res})
                progress.advance(task)
        for r in rows:
            limit = ann["s_per_iter"] * r["T"]  # type: ignore[index]
            r["ratio_to_ann"] = 1.0 if r["method"] == "ann" else r["s_per_iter"] / limit
            r["saved_mib"] = r["saved_bytes"] / MIB
            r.update(iterations=args.iterations, warmup=args.warmup, batch_size=args.batch_size)
            r.setdefault("ann_s_per_step", None)
        if args.overhead:
            otask = progress.add_task("overhead", total=len(OVERHEAD_METHODS) + 1)
            orows = []
            for method in OVERHEAD_METHODS:
                progress.update(otask, description=f"overhead {method} T={overhead_T}")
                orows.append(measure_overhead(setup, method, overhead_T, args))
                progress.advance(otask)
            progress.update(otask, description="overhead MLflow log_batch")
            epoch_metrics = orows[0]["_epoch_metrics"]
            tracking = measure_tracking(epoch_metrics, calls=max(args.repeats, 3))
            iters = math.ceil(EPOCH_SAMPLES / args.batch_size)
            tracking["iterations_per_epoch"] = iters
            tracking["per_trainer"] = [
                {"method": r["method"], "epoch_s": iters * r["on_s_per_iter"],
                 "fraction": tracking["log_batch_s"] / (iters * r["on_s_per_iter"])}
                for r in orows
            ]
            for r in orows:
                r.pop("_epoch_metrics")
            overhead = {"T": overhead_T, "blocks": args.repeats, "iterations_per_block": args.iterations,
                        "meters": list(OVERHEAD_METERS), "rows": orows, "tracking": tracking}
            progress.advance(otask)

    result = {
        "machine": machine_info(setup),
        "config": {
            "command": command, "time_steps": args.time_steps, "batch_size": args.batch_size, "channels": args.channels,
            "iterations": args.iterations, "warmup": args.warmup, "repeats": args.repeats, "seed": args.seed,
            "methods": args.methods, "sj_cuda_impl": args.sj_cuda_impl,
            "model": {"name": "vgg_small", "normalizer": "vanilla_bn", "threshold": {"name": "fixed", "theta": THETA},
                      "neuron": {"tau": TAU, "reset": "soft", "detach_reset": True, "surrogate_alpha": SURROGATE_ALPHA},
                      "loss": {"name": "tet", "mse_weight": MSE_WEIGHT}},
            "optimizer": {"name": "sgd", "lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY},
        },
        "descriptions": DESCRIPTIONS,
        "rows": rows,
        "overhead": overhead,
    }
    markdown = write_outputs(result, args.out)
    sys.stdout.write(markdown)
    console.print(f"written: {args.out / 'speed.md'}, speed.csv, speed.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
