#!/usr/bin/env python
"""Training speed and memory of the harness against SpikingJelly and the ANN limit, measured
side by side in one process, robustly on a shared machine.

Every method trains the same model on one fixed random batch. Methods are *interleaved*: for each
``T``, every method is built and warmed up, then ``--rounds`` rounds run ``--iterations`` training
iterations of each method in turn (the order rotates from round to round), so a busy phase of the
machine slows every method alike. Each iteration's thread CPU time, process CPU time and wall time
are recorded (``torch.cuda.synchronize`` before each clock read on CUDA). Ratios are taken per
round (a method's median in the round over the ANN limit's in the same round) and reported as the
median over rounds with the interquartile range; times as medians with IQR. The clock of the
ratios is thread CPU time at one torch thread on the CPU (immune to other processes' load), else
wall time (``--clock`` overrides). After the rounds, one more iteration of each method measures the
peak bytes saved for backward (``harness.meters.memory.SavedTensorMeter``).

Model: ``--model`` ``vgg_small`` (default, ``benchmarks.toml``'s: channels ``--channels``, input
1x28x28, 10 classes) or ``vggsnn`` (``--input 3 32 32``: CIFAR-shaped), built through the registry
as a cell's model (``harness.runner.build_model``): LIF tau 2, soft detached reset, sigmoid
surrogate alpha 4, TET loss (mse_weight 0.05), SGD lr 0.1, momentum 0.9, weight decay 5e-4.

Methods (``--only`` selects; the ANN limit is always measured):

* ``ann``: the ANN limit: the same model code with ReLU for LIF and batch normalization for the
  normalizer, one forward + backward + step on ``[B, ...]``; its time is reported times ``T``,
  its saved bytes as measured. ``ann_cl``: the same in channels-last memory format. With
  ``--compile``, ``ann_compiled``: the ANN under ``torch.compile`` (compile time reported).
  ``folded_ann``: the ANN once on the ``T`` steps folded into the batch, ``[T*B, ...]``: the
  working set of BPTT's layers without any spiking arithmetic (a control for the BPTT ratio).
* ``bptt``, ``bptt_osr``: the harness's ``bptt`` trainer with ``vanilla_bn`` / ``osr``; with
  ``--compile``, ``bptt_compiled``: the ``bptt`` cell with ``compile = true``.
* ``online``, ``online_osr_ots``, ``online_trace``: the ``online`` trainer with ``vanilla_bn``
  and a fixed threshold, with ``osr`` and ``ots``, and with ``gradient = "trace"`` (OTTT).
* ``bptt_meters``, ``online_meters``: ``bptt`` / ``online`` with the runner's training meters
  on (``CellMeters`` with ``firing_rate`` and ``memory``, wrapping each iteration exactly as
  ``harness/runner.py`` does): the meters' overhead, interleaved with the meters-off runs.
* ``sj_bptt``: SpikingJelly's multi-step network (``neuron.LIFNode``, ``step_mode='m'``) with
  BPTT; ``sj_sltt`` / ``sj_ottt``: SLTT / OTTT nodes driven by SpikingJelly's
  ``ottt_online_training``. Their networks copy the harness network's initial parameters.
* evaluation (``--no-eval`` skips): ``eval`` (the online cell's ``eval_batch``), ``eval_meters``
  (with the test phase's meters: firing rate and SynOps), ``eval_firing`` (firing rate only).

Run overhead (``--no-run-overhead`` skips): ``harness run`` on a one-cell digits matrix in a
fresh results directory, then a second cell in the same (existing) store; the time outside the
cell is the wall time minus the cell's own ``duration_s`` (its build, data, training and
evaluation). Then the cost of logging one epoch's metrics to MLflow (``log_batch``).

Output: ``<out>/speed.md`` (also printed), ``<out>/speed.csv`` (the main table) and
``<out>/speed.json`` (everything, every sample included).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRAIN_METHODS = ("ann", "ann_cl", "ann_compiled", "folded_ann", "bptt", "bptt_osr", "bptt_compiled", "online", "online_osr_ots",
                 "online_trace", "bptt_meters", "online_meters", "sj_bptt", "sj_sltt", "sj_ottt")
COMPILED = ("ann_compiled", "bptt_compiled")
EVAL_METHODS = ("eval", "eval_meters", "eval_firing")
METHODS = TRAIN_METHODS + EVAL_METHODS
DESCRIPTIONS = {
    "ann": "ANN limit: the same model code, ReLU + batch norm, one step on [B, ...], time x T",
    "ann_cl": "ANN limit in channels-last memory format",
    "ann_compiled": "ANN limit under torch.compile",
    "folded_ann": "the ANN once on the T steps folded into the batch ([T*B, ...]): BPTT's working set, no spikes",
    "bptt": "harness bptt, vanilla_bn, fixed threshold",
    "bptt_osr": "harness bptt, osr, fixed threshold",
    "bptt_compiled": "harness bptt, vanilla_bn, the cell setting compile = true (torch.compile, dynamic=False)",
    "online": "harness online, vanilla_bn, fixed threshold",
    "online_osr_ots": "harness online, osr + ots",
    "online_trace": "harness online, gradient = trace (OTTT), vanilla_bn",
    "bptt_meters": "harness bptt with the training meters on (firing_rate, memory)",
    "online_meters": "harness online with the training meters on (firing_rate, memory)",
    "sj_bptt": "SpikingJelly multi-step LIFNode, BPTT",
    "sj_sltt": "SpikingJelly SLTTLIFNode, ottt_online_training",
    "sj_ottt": "SpikingJelly OTTTLIFNode + OTTTSequential, ottt_online_training",
    "eval": "evaluation of the online cell, no meters",
    "eval_meters": "evaluation with the test phase's meters (firing_rate, synops)",
    "eval_firing": "evaluation with the firing-rate meter only",
}
# Harness methods: trainer, trainer options, normalizer, threshold, meters on.
SNN_METHODS = {
    "bptt": ("bptt", {}, "vanilla_bn", "fixed", ()),
    "bptt_osr": ("bptt", {}, "osr", "fixed", ()),
    "bptt_compiled": ("bptt", {}, "vanilla_bn", "fixed", ()),
    "online": ("online", {}, "vanilla_bn", "fixed", ()),
    "online_osr_ots": ("online", {}, "osr", "ots", ()),
    "online_trace": ("online", {"gradient": "trace"}, "vanilla_bn", "fixed", ()),
    "bptt_meters": ("bptt", {}, "vanilla_bn", "fixed", ("firing_rate", "memory")),
    "online_meters": ("online", {}, "vanilla_bn", "fixed", ("firing_rate", "memory")),
}
EVAL_METERS = {"eval": (), "eval_meters": ("firing_rate", "synops"), "eval_firing": ("firing_rate",)}
OVERHEADS = (("bptt_meters", "bptt"), ("online_meters", "online"), ("eval_meters", "eval"), ("eval_firing", "eval"))
# Issue targets (ratio to the ANN limit; saved bytes to the ANN's, times T for BPTT).
TARGETS = {"online": 1.05, "online_osr_ots": 1.15, "bptt": 1.10, "bptt_osr": 1.10}
SAVED_TARGET = 1.05
SJ_COUNTERPART = {"online": "sj_sltt", "bptt": "sj_bptt"}
EPOCH_SAMPLES = 60000  # Fashion-MNIST's training set
TAU, THETA, SURROGATE_ALPHA, MSE_WEIGHT = 2.0, 1.0, 4.0, 0.05
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4
MIB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benchmarks/speed.py",
        description=__doc__,
        epilog="Example: python benchmarks/speed.py --threads 1 --time-steps 4 16 --out results/speed",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--time-steps", "-T", type=int, nargs="+", default=[4, 16], metavar="T",
                   help="numbers of time steps to measure (default: 4 16)")
    p.add_argument("--batch-size", "-b", type=int, default=64, help="batch size (default: 64)")
    p.add_argument("--model", choices=("vgg_small", "vggsnn"), default="vgg_small", help="the model (default: vgg_small)")
    p.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64], metavar="C",
                   help="vgg_small's channels per stage (default: 16 32 64)")
    p.add_argument("--input", type=int, nargs=3, default=None, metavar=("C", "H", "W"),
                   help="input shape (default: 1 28 28 for vgg_small, 3 32 32 for vggsnn)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds per T (default: 7)")
    p.add_argument("--iterations", "-n", type=int, default=3, help="iterations of each method per round (default: 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations per method before the rounds (default: 2)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads(N); 0 keeps torch's default (default: 1)")
    p.add_argument("--clock", choices=("auto", "thread", "process", "wall"), default="auto",
                   help="clock of the ratios: auto = thread CPU time at one thread on the CPU, else wall (default: auto)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="cpu, cuda, or auto (default: auto)")
    p.add_argument("--out", type=Path, default=Path("results/speed"), help="output directory (default: results/speed)")
    p.add_argument("--only", action="append", choices=METHODS, metavar="METHOD",
                   help=f"measure only this method (repeatable); one of {', '.join(METHODS)}. ann is always measured")
    p.add_argument("--compile", action="store_true",
                   help="also measure the ANN limit and the bptt cell under torch.compile (minutes of compilation on a CPU)")
    p.add_argument("--no-eval", dest="eval", action="store_false", help="skip the evaluation methods")
    p.add_argument("--no-sj", dest="sj", action="store_false", help="skip SpikingJelly's methods")
    p.add_argument("--no-run-overhead", dest="run_overhead", action="store_false",
                   help="skip timing `harness run` outside training and MLflow's log_batch")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch and of every model (default: 0)")
    p.add_argument("--sj-cuda-impl", choices=("torch", "auto", "cuda", "triton"), default="torch",
                   help="SpikingJelly's LIF implementation on CUDA (SJ_LIF_CUDA_IMPLEMENTATION; no effect on CPU)")
    args = p.parse_args(argv)
    for name in ("batch_size", "iterations", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.threads < 0:
        p.error("--warmup and --threads must be >= 0")
    if any(t < 1 for t in args.time_steps):
        p.error("--time-steps must be >= 1")
    if any(c < 1 for c in args.channels):
        p.error("--channels must be >= 1")
    args.time_steps = list(dict.fromkeys(args.time_steps))
    if args.input is None:
        args.input = [1, 28, 28] if args.model == "vgg_small" else [3, 32, 32]
    wanted = set(args.only or [m for m in METHODS if m not in COMPILED or args.compile]) | {"ann"}
    if not args.eval:
        wanted -= set(EVAL_METHODS)
    if not args.sj:
        wanted -= {"sj_bptt", "sj_sltt", "sj_ottt"}
    if args.compile:
        wanted |= set(COMPILED)
    args.methods = [m for m in METHODS if m in wanted]
    return args


# -- building the networks -------------------------------------------------------------------------


@dataclass
class Setup:
    """What every method shares: the registry, the device, the model settings, the batch."""

    registry: Any
    device: Any
    model: str
    channels: list[int]
    x: Any  # [B, C, H, W]
    y: Any  # [B]
    seed: int
    num_classes: int = 10

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def model_component(self) -> Any:
        from harness.config import Component

        options = {"channels": list(self.channels)} if self.model == "vgg_small" else {}
        return Component(self.model, options)


@dataclass
class Bench:
    """One method at one T: ``step()`` runs one iteration; ``begin()`` / ``end()`` bracket each
    round's block of iterations (the meters' phase)."""

    step: Callable[[], Any]
    model: Any
    begin: Callable[[], None] = lambda: None
    end: Callable[[], None] = lambda: None
    close: Callable[[], None] = lambda: None
    notes: dict[str, Any] = field(default_factory=dict)
    saved_bytes: Callable[[], int | None] | None = None  # a metered bench's own reading


def _loss(setup: Setup) -> Any:
    return setup.registry.losses["tet"](mse_weight=MSE_WEIGHT)


def _optimizer(params: Any) -> Any:
    from harness.config import OptimizerConfig
    from harness.runner import build_optimizer

    return build_optimizer(params, OptimizerConfig(name="sgd", lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY))


def build_snn(setup: Setup, time_steps: int, normalizer: str = "vanilla_bn", threshold: str = "fixed") -> Any:
    """The harness's network, as ``harness.runner.build_model`` builds it for a cell."""
    import torch

    from harness.config import CellConfig, Component, NeuronConfig
    from harness.data import DatasetBundle
    from harness.runner import build_model

    config = CellConfig(
        dataset=Component("fashion_mnist"),
        model=setup.model_component(),
        normalizer=Component(normalizer),
        trainer=Component("bptt"),
        epochs=1,
        batch_size=int(setup.x.shape[0]),
        time_steps=time_steps,
        threshold=Component(threshold, {"theta": THETA}),
        loss=Component("tet", {"mse_weight": MSE_WEIGHT}),
        seed=setup.seed,
        neuron=NeuronConfig(tau=TAU, reset="soft", surrogate_alpha=SURROGATE_ALPHA, detach_reset=True),
    )
    c, h, w = setup.x.shape[1:]
    data = DatasetBundle(train=None, test=None, in_channels=int(c), num_classes=setup.num_classes, input_size=(int(h), int(w)))  # type: ignore[arg-type]
    torch.manual_seed(setup.seed)
    return build_model(config, setup.registry, data).to(setup.device)


def _any_batch_norm(num_features: int) -> Any:
    """Batch normalization of ``[B, C, ...]`` of any rank (the ANN's normalizer, conv or linear)."""
    from torch import nn

    class AnyBatchNorm(nn.modules.batchnorm._BatchNorm):
        def _check_input_dim(self, x: Any) -> None:
            if x.dim() < 2:
                raise ValueError(f"expected at least 2-d input, got {x.dim()}-d")

    return AnyBatchNorm(num_features)


def build_ann(setup: Setup) -> Any:
    """The same model code with ReLU for LIF and batch normalization, run one step at a time."""
    import torch
    from torch import nn

    from harness.snn import LayerFactory, set_step_mode

    torch.manual_seed(setup.seed)
    layers = LayerFactory(normalizer=_any_batch_norm, neuron=nn.ReLU)
    c, h, w = setup.x.shape[1:]
    options = {"channels": list(setup.channels)} if setup.model == "vgg_small" else {}
    model = setup.registry.models[setup.model](
        in_channels=int(c), num_classes=setup.num_classes, input_size=(int(h), int(w)), layers=layers, **options
    ).to(setup.device)
    set_step_mode(model, "single")  # TimeDistributed layers take [B, ...]
    return model


def build_sj(setup: Setup, kind: str, reference: Any) -> Any:
    """The harness network ``reference`` rebuilt from SpikingJelly layers, layer by layer, with its
    initial parameters; ``kind`` is ``bptt`` (multi-step LIFNode), ``sltt`` or ``ottt``
    (single-step online nodes)."""
    from torch import nn

    from harness.snn import AvgPool, GlobalAvgPool, LIFNeuron, SpikingSequential, TimeDistributed
    from spikingjelly.activation_based import layer, neuron, surrogate

    mode = "m" if kind == "bptt" else "s"
    node_cls = {"bptt": neuron.LIFNode, "sltt": neuron.SLTTLIFNode, "ottt": neuron.OTTTLIFNode}[kind]

    def convert(m: nn.Module) -> list[nn.Module]:
        if isinstance(m, SpikingSequential):
            return [x for child in m for x in convert(child)]
        if isinstance(m, TimeDistributed):
            m = m.module
        if isinstance(m, LIFNeuron):
            return [node_cls(tau=TAU, decay_input=False, v_threshold=THETA, v_reset=None, detach_reset=True,
                             surrogate_function=surrogate.Sigmoid(alpha=SURROGATE_ALPHA), step_mode=mode)]
        if isinstance(m, nn.Conv2d):
            return [layer.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, bias=m.bias is not None, step_mode=mode)]
        if isinstance(m, nn.Linear):
            return [layer.Linear(m.in_features, m.out_features, bias=m.bias is not None, step_mode=mode)]
        if isinstance(m, AvgPool):
            return [layer.AvgPool2d(m.kernel_size, step_mode=mode)]
        if isinstance(m, GlobalAvgPool):
            return [layer.AdaptiveAvgPool2d(1, step_mode=mode), layer.Flatten(step_mode=mode)]
        if isinstance(m, nn.Flatten):
            return [layer.Flatten(step_mode=mode)]
        if hasattr(m, "running_mean") and getattr(m, "weight", None) is not None and m.weight.dim() == 1:
            return [layer.BatchNorm2d(m.weight.numel(), step_mode=mode)]
        raise RuntimeError(f"no SpikingJelly counterpart for {type(m).__name__} in the benchmark's converter")

    body = convert(reference)
    net = layer.OTTTSequential(*body) if kind == "ottt" else nn.Sequential(*body)
    net = net.to(setup.device)
    ours, theirs = list(reference.parameters()), list(net.parameters())
    if [p.shape for p in ours] != [p.shape for p in theirs]:
        raise RuntimeError("the SpikingJelly network's parameters do not line up with the harness network's")
    for p_theirs, p_ours in zip(theirs, ours):
        p_theirs.data.copy_(p_ours.data)
    return net


def make_bench(setup: Setup, method: str, time_steps: int) -> Bench:
    import torch

    from harness.data import to_sequence

    loss_fn = _loss(setup)
    xs = to_sequence(setup.x, time_steps, temporal=False)  # [T, B, ...], a view
    y = setup.y
    if method.startswith("ann") or method == "folded_ann":
        model = build_ann(setup)
        x, target = setup.x, y
        if method == "folded_ann":  # what BPTT's layers see: one call on [T*B, ...]
            x, target = xs.flatten(0, 1).contiguous(), y.repeat(time_steps)
        if method == "ann_cl":
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        opt = _optimizer(model.parameters())
        forward = torch.compile(model) if method == "ann_compiled" else model

        def ann_step() -> Any:
            model.train()
            loss = loss_fn.step(forward(x), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.detach()

        bench = Bench(ann_step, model)
        if method == "ann_compiled":
            t0 = time.perf_counter()
            ann_step()
            setup.sync()
            bench.notes["compile_s"] = time.perf_counter() - t0
        return bench
    if method in SNN_METHODS:
        name, options, normalizer, threshold, meter_names = SNN_METHODS[method]
        model = build_snn(setup, time_steps, normalizer, threshold)
        if method in COMPILED:
            model.compile(dynamic=False)  # as the runner does for a cell with compile = true
        trainer = setup.registry.trainers[name](**options)
        opt = _optimizer(model.parameters())
        if not meter_names:
            bench = Bench(lambda: trainer.train_batch(model, xs, y, loss_fn, opt), model)
            if method in COMPILED:
                t0 = time.perf_counter()
                bench.step()
                setup.sync()
                bench.notes["compile_s"] = time.perf_counter() - t0
            return bench
        return _metered(setup, model, meter_names, "train", lambda: trainer.train_batch(model, xs, y, loss_fn, opt))
    if method in EVAL_METERS:
        model = build_snn(setup, time_steps)
        trainer = setup.registry.trainers["online"]()
        opt = _optimizer(model.parameters())
        for _ in range(2):  # trained statistics, so evaluation sees spikes
            trainer.train_batch(model, xs, y, loss_fn, opt)
        if not EVAL_METERS[method]:
            return Bench(lambda: trainer.eval_batch(model, xs, y, loss_fn), model)
        return _metered(setup, model, EVAL_METERS[method], "test", lambda: trainer.eval_batch(model, xs, y, loss_fn))

    from spikingjelly.activation_based import functional
    from spikingjelly.activation_based.learning.online_learning import ottt_online_training

    reference = build_snn(setup, time_steps)
    net = build_sj(setup, method.removeprefix("sj_"), reference)
    del reference
    opt = _optimizer(net.parameters())
    if method == "sj_bptt":

        def sj_bptt_step() -> Any:
            net.train()
            loss = loss_fn(net(xs), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            functional.reset_net(net)
            return loss.detach()

        return Bench(sj_bptt_step, net)

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

    return Bench(sj_online_step, net)


def _metered(setup: Setup, model: Any, meter_names: tuple[str, ...], phase: str, run: Callable[[], Any]) -> Bench:
    """``run`` wrapped as harness/runner.py wraps an iteration: ``begin(phase)`` per block,
    ``data_ready`` and ``with meters.iteration():`` per iteration, the results read back and
    ``end(phase, ...)`` at the end of the block."""
    import torch

    from harness.meters.cell import CellMeters

    meters = CellMeters(model, setup.device, meter_names)
    state: dict[str, Any] = {}

    def begin() -> None:
        state.update(loss=torch.zeros((), device=setup.device, dtype=torch.float64),
                     correct=torch.zeros((), device=setup.device, dtype=torch.long), count=0, batches=0)
        meters.begin(phase)

    def step() -> Any:
        meters.data_ready(0.0)
        with meters.iteration():
            out = run()
        state["loss"] += out.loss.double() * out.count
        state["correct"] += out.correct
        state["count"] += out.count
        state["batches"] += 1
        return out

    def end() -> None:
        t0 = time.perf_counter()
        float(state["loss"]), int(state["correct"])  # the runner's read-back of the phase
        state["metrics"] = meters.end(phase, state["count"], state["batches"])
        bench.notes.setdefault("end_s", []).append(time.perf_counter() - t0)

    bench = Bench(step, model, begin, end, meters.close)
    # Saved-tensor hooks nest (the innermost wins): the meters' own reading is the one to take.
    bench.saved_bytes = lambda: int(state.get("metrics", {}).get("train_saved_bytes_peak", 0)) or None
    return bench


# -- measuring -------------------------------------------------------------------------------------


def _quantiles(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    if len(v) == 1:
        return {"median": v[0], "q1": v[0], "q3": v[0]}
    q = statistics.quantiles(v, n=4, method="inclusive")
    return {"median": statistics.median(v), "q1": q[0], "q3": q[2]}


def _clock_reads() -> tuple[float, float, float]:
    return time.thread_time(), time.process_time(), time.perf_counter()


def interleaved_rounds(setup: Setup, benches: dict[str, Bench], args: argparse.Namespace, progress: Any = None) -> dict[str, dict[str, list]]:
    """Run every bench ``args.iterations`` times per round for ``args.rounds`` rounds, the order
    rotating each round; returns per method the per-iteration samples of each clock and the
    per-round lists of them."""
    names = list(benches)
    samples: dict[str, dict[str, list]] = {m: {"thread": [], "process": [], "wall": [], "rounds": []} for m in names}
    for bench in benches.values():
        bench.begin()
        for _ in range(args.warmup):
            bench.step()
        bench.end()
    setup.sync()
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        if r % 2:
            order.reverse()
        for m in order:
            bench = benches[m]
            bench.begin()
            per_round: dict[str, list[float]] = {"thread": [], "process": [], "wall": []}
            for _ in range(args.iterations):
                t0, p0, w0 = _clock_reads()
                bench.step()
                setup.sync()
                t1, p1, w1 = _clock_reads()
                for clock, value in (("thread", t1 - t0), ("process", p1 - p0), ("wall", w1 - w0)):
                    per_round[clock].append(value)
                    samples[m][clock].append(value)
            bench.end()
            samples[m]["rounds"].append(per_round)
            if progress is not None:
                progress()
    return samples


def saved_bytes(setup: Setup, bench: Bench) -> tuple[int, int | None]:
    """Peak saved-for-backward bytes of one iteration (and the CUDA peak allocation on CUDA)."""
    import torch

    from harness.meters.memory import SavedTensorMeter

    setup.sync()
    cuda = setup.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(setup.device)
    bench.begin()
    with SavedTensorMeter() as meter:
        bench.step()
    bench.end()
    setup.sync()
    peak = int(torch.cuda.max_memory_allocated(setup.device)) if cuda else None
    own = bench.saved_bytes() if bench.saved_bytes is not None else None
    return (meter.peak_bytes if own is None else own), peak


def summarize(samples: dict[str, dict[str, list]], T: int, clock: str) -> dict[str, dict[str, Any]]:
    """Per method: median and IQR of each clock, and of the per-round ratio to the ANN limit
    (and to the channels-last / compiled ANN when measured)."""
    def round_medians(method: str) -> list[float]:
        return [statistics.median(r[clock]) for r in samples[method]["rounds"]]

    refs = {ref: round_medians(ref) for ref in ("ann", "ann_cl", "ann_compiled") if ref in samples}
    out: dict[str, dict[str, Any]] = {}
    for m, s in samples.items():
        ann = m.startswith("ann")  # an ANN iteration is one step: it stands for T steps
        row: dict[str, Any] = {c: _quantiles([v * (T if ann else 1) for v in s[c]]) for c in ("thread", "process", "wall")}
        if ann:
            row["per_step"] = {c: _quantiles(s[c]) for c in ("thread", "process", "wall")}
        mine = round_medians(m)
        for ref, ref_rounds in refs.items():
            if m in EVAL_METHODS:
                continue
            row[f"ratio_to_{ref}"] = _quantiles([a / (b * (1 if ann else T)) for a, b in zip(mine, ref_rounds)])
        if m in EVAL_METHODS and "eval" in samples:
            row["ratio_to_eval"] = _quantiles([a / b for a, b in zip(mine, round_medians("eval"))])
        out[m] = row
    for meters_on, meters_off in OVERHEADS:
        if meters_on in samples and meters_off in samples:
            ratios = [a / b for a, b in zip(round_medians(meters_on), round_medians(meters_off))]
            out[meters_on]["overhead_pct"] = {k: 100.0 * (v - 1.0) for k, v in _quantiles(ratios).items()}
    for ours, theirs in SJ_COUNTERPART.items():
        if ours in samples and theirs in samples:
            out[ours][f"speedup_over_{theirs}"] = _quantiles([b / a for a, b in zip(round_medians(ours), round_medians(theirs))])
    return out


# -- run overhead and tracking ---------------------------------------------------------------------

TINY_MATRIX = """\
name = "{name}"
[defaults]
dataset = "digits"
model = "vgg_small"
normalizer = "vanilla_bn"
trainer = "online"
epochs = 1
batch_size = 32
time_steps = 2
seed = {seed}
device = "cpu"
max_train_batches = 2
max_eval_batches = 2
[options.model.vgg_small]
channels = [4, 8]
"""


def measure_run_overhead() -> dict[str, Any]:
    """``harness run`` of a one-cell matrix: in a fresh results directory (the MLflow store is
    created), then another cell in the same store. Time outside the cell = wall - the cell's duration."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="speed-run-") as tmp:
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        for label, seed in (("fresh store", 0), ("existing store", 1)):
            name = f"speed-run-{seed}"
            path = Path(tmp) / f"{name}.toml"
            path.write_text(TINY_MATRIX.format(name=name, seed=seed))
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "harness", "run", "--matrix", str(path), "--results", str(Path(tmp) / "results")],
                                  cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                return {"error": f"harness run failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-2000:]}"}
            rows = list(csv.DictReader((Path(tmp) / "results" / name / "summary.csv").open()))
            inside = float(rows[0]["duration_s"])  # the cell itself: build, data, training, evaluation
            runs.append({"label": label, "wall_s": wall, "cell_s": inside, "outside_s": wall - inside})
    return {"runs": runs, "executor": "serial"}


def measure_tracking(calls: int) -> dict[str, Any]:
    """Time ``log_batch`` of one epoch's worth of metrics (60 keys) into a fresh MLflow run."""
    from mlflow.entities import Metric

    from harness import tracking

    keys = [f"metric_{i}" for i in range(60)]
    with tempfile.TemporaryDirectory(prefix="speed-mlflow-") as tmp:
        client = tracking.client(f"sqlite:///{tmp}/mlflow.db")
        experiment = tracking.ensure_experiment(client, "speed-benchmark", Path(tmp) / "mlartifacts")
        run_id = client.create_run(experiment, run_name="speed").info.run_id
        times = []
        for epoch in range(1, calls + 1):
            now = int(time.time() * 1000)
            batch = [Metric(k, float(epoch), now, epoch) for k in keys]
            t0 = time.perf_counter()
            client.log_batch(run_id, metrics=batch)
            times.append(time.perf_counter() - t0)
        client.set_terminated(run_id)
    return {"metrics_per_epoch": len(keys), "log_batch_s": statistics.median(times), "log_batch_times": times}


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
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:
        available = os.cpu_count() or 0
    info = {
        "cpu": cpu or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_available": available,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(setup.device),
        "device_name": torch.cuda.get_device_name(setup.device) if setup.device.type == "cuda" else None,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    try:
        from importlib.metadata import version

        info["spikingjelly"] = version("spikingjelly")
    except Exception:  # noqa: BLE001 - not installed
        info["spikingjelly"] = None
    return info


def _iqr(q: dict[str, float] | None, spec: str = ".3f", scale: float = 1.0) -> str:
    if not q:
        return ""
    return f"{q['median'] * scale:{spec}} [{q['q1'] * scale:{spec}}-{q['q3'] * scale:{spec}}]"


def render_markdown(result: dict[str, Any]) -> str:
    c, m = result["config"], result["machine"]
    clock = c["clock"]
    lines = [
        "# Training speed: harness, SpikingJelly and the ANN limit",
        "",
        f"Machine: {m['cpu']} ({m['cpus_available']} CPUs available), torch {m['torch']}, torch threads {m['torch_threads']}, "
        f"device {m['device']}{' (' + m['device_name'] + ')' if m.get('device_name') else ''}, SpikingJelly {m.get('spikingjelly')}, "
        f"load average at the start {m.get('load_average')}, {m['date']}.",
        f"Command: `{c['command']}`",
        "",
        f"Model {c['model']} (channels {c['channels']}), input {c['input']}, batch {c['batch_size']}. {c['rounds']} interleaved rounds "
        f"of {c['iterations']} iterations per method and T. Times: median [IQR] seconds per iteration, {clock} clock; ratios: "
        "median [IQR] over rounds of a method's round median over the reference's in the same round (the ANN limit's times T). "
        "Saved: peak bytes saved for backward in one iteration, and that over the ANN's (times T for BPTT).",
        "",
        "| method | T | s/iter | x ANN limit | x channels-last ANN | x compiled ANN | saved MiB | saved / ANN's |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if r["method"] in EVAL_METHODS:
            continue
        saved_ratio = r.get("saved_over_ann")
        lines.append(
            f"| {r['method']} | {r['T']} | {_iqr(r[clock], '.4f')} | {_iqr(r.get('ratio_to_ann'), '.2f')} | "
            f"{_iqr(r.get('ratio_to_ann_cl'), '.2f')} | {_iqr(r.get('ratio_to_ann_compiled'), '.2f')} | "
            f"{r['saved_bytes'] / MIB:.1f} | {'' if saved_ratio is None else f'{saved_ratio:.2f}'} |"
        )
    lines += ["", "Methods: " + "; ".join(f"`{k}`: {DESCRIPTIONS[k]}" for k in c["methods"]) + "."]
    compiled = [r for r in result["rows"] if r.get("compile_s") is not None]
    if compiled:
        lines += ["", "First call under torch.compile (compilation): " + ", ".join(
            f"{r['method']} {r['compile_s']:.1f} s (T={r['T']})" for r in compiled) + "."]
    lines += ["", "## Targets", "", "| target | T | measured | met |", "|---|---|---|---|"]
    for t in result["targets"]:
        lines.append(f"| {t['target']} | {t['T']} | {t['measured']} | {'yes' if t['met'] else 'no'} |")
    ov = [r for r in result["rows"] if "overhead_pct" in r]
    if ov:
        lines += ["", "## Overhead of the meters", "",
                  "Meters on against off in the same rounds (training: firing_rate and memory, as the runner's training phase; "
                  "evaluation: firing_rate and synops, as its test phase). Overhead: median [IQR] over rounds.",
                  "", "| method | T | overhead % | meters.end() s |", "|---|---|---|---|"]
        for r in ov:
            end = r.get("end_s")
            lines.append(f"| {r['method']} | {r['T']} | {_iqr(r['overhead_pct'], '+.1f')} | {'' if not end else f'{statistics.median(end):.3g}'} |")
    ro = result.get("run_overhead")
    if ro:
        lines += ["", "## Outside training: one `harness run`", ""]
        if "error" in ro:
            lines.append(f"Not measured: {ro['error']}")
        else:
            lines += ["A one-cell digits matrix (2 training and 2 test batches), serial executor.", "",
                      "| store | wall s | the cell's own s | outside the cell s |", "|---|---|---|---|"]
            for r in ro["runs"]:
                lines.append(f"| {r['label']} | {r['wall_s']:.2f} | {r['cell_s']:.2f} | {r['outside_s']:.2f} |")
    tr = result.get("tracking")
    if tr:
        lines += ["", f"MLflow `log_batch` of {tr['metrics_per_epoch']} metrics: {tr['log_batch_s'] * 1e3:.1f} ms (median of "
                  f"{len(tr['log_batch_times'])} calls)."]
    return "\n".join(lines) + "\n"


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, checked against the measured medians."""
    by = {(r["method"], r["T"]): r for r in rows}
    out = []
    for (method, T), r in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if method in TARGETS and "ratio_to_ann" in r:
            v = r["ratio_to_ann"]["median"]
            out.append({"target": f"{method} step <= {TARGETS[method]:.2f}x the ANN limit", "T": T, "measured": f"{v:.3f}x",
                        "met": v <= TARGETS[method]})
        if method in ("online", "bptt") and r.get("saved_over_ann") is not None:
            v = r["saved_over_ann"]
            what = "saved bytes <= 1.05x the ANN's" if method == "online" else "saved bytes <= 1.05 x T x the ANN's"
            out.append({"target": f"{method} {what}", "T": T, "measured": f"{v:.3f}x", "met": v <= SAVED_TARGET})
        key = f"speedup_over_{SJ_COUNTERPART.get(method, '')}"
        if key in r:
            v = r[key]["median"]
            out.append({"target": f"{method} >= 1.3x faster than {SJ_COUNTERPART[method]}", "T": T, "measured": f"{v:.3f}x",
                        "met": v >= 1.3})
    return out


def write_outputs(result: dict[str, Any], out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(result)
    (out / "speed.md").write_text(markdown)
    clock = result["config"]["clock"]
    with (out / "speed.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "T", "s_per_iter", "s_per_iter_q1", "s_per_iter_q3", "ratio_to_ann", "ratio_q1", "ratio_q3",
                         "saved_bytes", "saved_over_ann", "clock"])
        for r in result["rows"]:
            q, ratio = r[clock], r.get("ratio_to_ann") or r.get("ratio_to_eval") or {}
            writer.writerow([r["method"], r["T"], q["median"], q["q1"], q["q3"], ratio.get("median"), ratio.get("q1"),
                             ratio.get("q3"), r["saved_bytes"], r.get("saved_over_ann"), clock])
    (out / "speed.json").write_text(json.dumps(result, indent=2) + "\n")
    return markdown


# -- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["SJ_LIF_CUDA_IMPLEMENTATION"] = args.sj_cuda_impl  # read when SpikingJelly is imported

    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from harness import get_registry
    from harness.runner import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    clock = args.clock
    if clock == "auto":
        clock = "thread" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    g = torch.Generator().manual_seed(args.seed)
    x = torch.rand(args.batch_size, *args.input, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=g).to(device)
    setup = Setup(get_registry(), device, args.model, list(args.channels), x, y, args.seed)
    command = shlex.join(["python", "benchmarks/speed.py", *(sys.argv[1:] if argv is None else argv)])
    console = Console(stderr=True)
    result: dict[str, Any] = {"machine": machine_info(setup)}
    rows: list[dict[str, Any]] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("speed", total=len(args.time_steps) * args.rounds * len(args.methods))
        for T in args.time_steps:
            progress.update(task, description=f"building T={T}")
            benches = {m: make_bench(setup, m, T) for m in args.methods}
            progress.update(task, description=f"rounds T={T}")
            samples = interleaved_rounds(setup, benches, args, lambda: progress.advance(task))
            summary = summarize(samples, T, clock)
            ann_saved = None
            for m in args.methods:
                nbytes, cuda_peak = saved_bytes(setup, benches[m])
                row = {"method": m, "T": T, **summary[m], "saved_bytes": nbytes, "cuda_peak_bytes": cuda_peak,
                       "samples": samples[m], **benches[m].notes}
                if m == "ann":
                    ann_saved = nbytes
                rows.append(row)
            for row in rows:
                if row["T"] == T and ann_saved and row["method"] not in EVAL_METHODS:
                    per = T if row["method"].startswith(("bptt", "sj_bptt", "folded_ann")) else 1
                    row["saved_over_ann"] = row["saved_bytes"] / (ann_saved * per)
            for bench in benches.values():
                bench.close()
            del benches
        if args.run_overhead:
            progress.update(task, description="harness run overhead")
            result["run_overhead"] = measure_run_overhead()
            result["tracking"] = measure_tracking(calls=5)
    result.update(
        config={"command": command, "time_steps": args.time_steps, "batch_size": args.batch_size, "model": args.model,
                "channels": args.channels, "input": args.input, "rounds": args.rounds, "iterations": args.iterations,
                "warmup": args.warmup, "seed": args.seed, "methods": args.methods, "clock": clock,
                "sj_cuda_impl": args.sj_cuda_impl},
        descriptions=DESCRIPTIONS, rows=rows, targets=targets(rows),
    )
    markdown = write_outputs(result, args.out)
    sys.stdout.write(markdown)
    console.print(f"written: {args.out / 'speed.md'}, speed.csv, speed.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
