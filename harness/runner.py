"""One cell: build it from the registry (:mod:`harness.build`), train it epoch by epoch, and
tell the observers at each point of its life. The loop below reads top to bottom; what data
parallelism adds (gradient averaging, the union batch's metrics, process-0 checkpoints, errors
agreed between processes) is behind :class:`harness.engine.Engine`, and resuming is
:func:`_resume`. Never imports a tracking backend: observers listen to the hooks."""

from __future__ import annotations

import itertools
import math
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from harness import checkpoint, devices, parallel
from harness.build import (  # noqa: F401 - also the public names of this module, for callers of old
    CellParts,
    build_cell,
    build_loaders,
    build_model,
    build_optimizer,
    build_scheduler,
    load_dataset,
    resolve_device,
    scheduler_state,
    seed_everything,
)
from harness.data import to_sequence, train_subset
from harness.engine import DivergedError, DivergenceGuard, Engine, HeldHook, Meetings, ObserverError  # noqa: F401
from harness.errors import HarnessError
from harness.events import CellResult, checkpoint_done, error_message, interrupts_deferred
from harness.matrix import Cell
from harness.meters.cell import CellMeters, model_size
from harness.mixing import SoftTargets
from harness.scaling import ScaledLoss, ScaledOptimizer
from harness.provenance import Provenance, data_checksum, environment
from harness.registry import Registry
from harness.snn import collect_epoch_metrics


class CellInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a cell; carries the cell's (killed) result to the session."""

    def __init__(self, result: CellResult) -> None:
        super().__init__(f"interrupted during cell {result.label}")
        self.result = result


def run_cell(cell: Cell, registry: Registry, hook: Any, checkpoint_dir: Path | None = None, preloaded: Any = None,
             remove_checkpoint: bool = True) -> CellResult:
    """Train and evaluate one cell. Exceptions become a failed result (the matrix goes on);
    ``KeyboardInterrupt`` marks the cell killed and propagates.

    With ``checkpoint_dir``, the cell checkpoints into ``checkpoint_dir / cell.id`` at the end of
    every epoch (before the observers hear of the epoch) and, if a checkpoint is there when it
    starts, continues from it (the result equals an uninterrupted run's on CPU). Once the
    observers have recorded the end of a finished or diverged cell, its checkpoint is removed; a
    killed cell's, or one that failed otherwise (a transient error may not recur), is kept for
    the next run. ``remove_checkpoint=False`` leaves the removal to the caller (a worker's
    ``on_cell_end`` is only sent, not recorded, when it returns).

    ``preloaded`` (:class:`harness.session.PreloadedData`): data sets already loaded in this
    process; the cell takes its own from there instead of loading it again.

    Under data parallelism the processes fail a cell together (:class:`harness.engine.Meetings`);
    an error in the middle of a training step, which they cannot agree on, is recorded and then
    propagates as :class:`harness.parallel.GroupBroken`: the run must end.
    """
    start = time.perf_counter()
    result = CellResult(cell.id, cell.label, "failed")
    ckpt = checkpoint_dir / cell.id if checkpoint_dir is not None else None
    engine = Engine(hook)

    def elapsed() -> float:  # this sitting's time, after the earlier ones a checkpoint carried
        return result.earlier_s + time.perf_counter() - start

    try:
        with devices.backend_settings(cell.config.deterministic, cell.config.cudnn_benchmark):
            _train(cell, registry, engine, result, ckpt, preloaded, clock=elapsed)
        result.status = "finished"
    except KeyboardInterrupt as exc:
        result.status = "killed"
        result.duration_s = elapsed()
        hook.on_cell_end(cell=cell, result=result)
        raise CellInterrupted(result) from exc
    except parallel.GroupBroken as exc:  # recorded as failed (checkpoint kept), then the run ends
        _failed(result, exc)
        result.duration_s = elapsed()
        hook.on_cell_end(cell=cell, result=result)
        raise
    except Exception as exc:  # isolation: one bad cell never takes down the matrix
        _failed(result, exc)
    result.duration_s = elapsed()
    hook.on_cell_end(cell=cell, result=result)  # recorded first: a crash here keeps the checkpoint
    if remove_checkpoint and ckpt is not None and checkpoint_done(result):
        engine.remove_checkpoint(ckpt)
    return result


def _failed(result: CellResult, exc: BaseException) -> None:
    result.status = "failed"
    result.error = traceback.format_exc()
    result.error_type = type(exc).__name__
    result.error_message = error_message(exc)


def _training_step(trainer: Any, model: nn.Module, loss_fn: Any, optimizer: Any, mixing: Any, scaler: Any = None) -> Any:
    """The trainer's step on a batch; with mixup/CutMix (:mod:`harness.mixing`) on the mixed
    batch, the loss on its soft targets and the accuracy against the larger weight's label; with
    a float16 cell's loss scaling (:mod:`harness.scaling`), the scaled loss and optimizer."""
    if scaler is not None:
        loss_fn, optimizer = ScaledLoss(loss_fn, scaler), ScaledOptimizer(optimizer, scaler)
    if mixing is None:
        return lambda x, y: trainer.train_batch(model, x, y, loss_fn, optimizer)

    def step(inputs: Any, target: Any) -> Any:
        inputs, hard, soft = mixing(inputs, target)
        return trainer.train_batch(model, inputs, hard, SoftTargets(loss_fn, soft), optimizer)

    return step


def _scheduled(train_batch: Any, scheduler: Any, first_update: int) -> Any:
    """``train_batch``, then the schedule told the number of optimizer steps so far (timm's
    ``step_update``: a schedule that advances per iteration sets the next step's learning rate).
    Given only for such a schedule (one per epoch would ignore the call: the loop makes none).
    The count goes on from ``first_update``, the steps of the epochs before (a resumed cell's
    included)."""
    if scheduler is None:
        return train_batch
    updates = itertools.count(first_update + 1)

    def step(inputs: Any, target: Any) -> Any:
        result = train_batch(inputs, target)
        scheduler.step_update(num_updates=next(updates))
        return result

    return step


def _averaged(train_batch: Any, ema: Any, model: nn.Module, first_update: int) -> Any:
    """``train_batch``, then the model's moving average updated (timm's ``ModelEmaV3``, told
    the number of training batches so far, which its warm-up and its first copy go by; from
    ``first_update`` on, as :func:`_scheduled` counts). Given only where the cell has an EMA."""
    if ema is None:
        return train_batch
    updates = itertools.count(first_update + 1)
    first = [True]

    def step(inputs: Any, target: Any) -> Any:
        result = train_batch(inputs, target)
        if first[0]:  # buffers a module sizes at its first training step (OTS's per-step thresholds)
            _match_lazy_buffers(ema.module, model)
            first[0] = False
        ema.update(model, step=next(updates))
        return result

    return step


def _match_lazy_buffers(copy: nn.Module, model: nn.Module) -> None:
    """Give ``copy`` the model's value of every buffer whose shape the model changed since the
    copy was made (a buffer sized at the first training step): it has no average yet."""
    for name, buf in model.named_buffers():
        try:
            mine = copy.get_buffer(name)
        except AttributeError:  # registered at the first step
            mine = None
        if mine is None or mine.shape != buf.shape:
            owner, _, leaf = name.rpartition(".")
            copy.get_submodule(owner)._buffers[leaf] = buf.detach().clone()


def _train(cell: Cell, registry: Registry, engine: Engine, result: CellResult, ckpt: Path | None, preloaded: Any = None,
           clock: Callable[[], float] = lambda: 0.0) -> None:
    """Build, resume and train the cell into ``result``; ``clock()``: the seconds the cell has
    taken so far, earlier sittings included (each checkpoint keeps it, as ``elapsed_s``)."""
    cfg, hook = cell.config, engine.hook
    with engine.hold():  # build the cell: its errors are agreed on by every process
        engine.check(cfg)
        device = resolve_device(cfg.device)
        autocast = devices.autocast(cfg.precision, device)
        generator = seed_everything(cfg.seed)
        data = preloaded.take(cfg) if preloaded is not None else None
        if data is None:  # not loaded by the preflight in this process
            data = load_dataset(cfg, registry)
        fresh = checkpoint.rng_state(generator)  # where building starts from (again, after a bad checkpoint)
        train_set = train_subset(data.train, cfg.train_subset)
        loaders = build_loaders(cfg, data, train_set, generator, device)
        num_train = _batches(len(loaders.train), cfg.max_train_batches)

        def build() -> CellParts:
            return engine.prepare(build_cell(cfg, registry, data, device, updates_per_epoch=num_train), cfg, generator)

        parts = build()
    engine.settle("while building the cell")
    static = model_size(parts.model)  # as built: a resumed cell's buffers sized in training (OTS's) would count otherwise
    parts, state, notes = _resume(engine, ckpt, cell, parts, generator, fresh, build)

    model, trainer, loss_fn, optimizer, scheduler, meters, ema = (
        parts.model, parts.trainer, parts.loss_fn, parts.optimizer, parts.scheduler, parts.meters, parts.ema)
    ema_meters = CellMeters(ema.module, device, [m for m in cfg.meters if m == "firing_rate"]) if ema is not None else None
    info: dict[str, Any] = {"device": str(device), **static, "train_size": len(train_set), "test_size": len(data.test), **notes,
                            "provenance": {"code": Provenance(registry).code(cfg), "env": environment(device),
                                           "data": data_checksum(data.files)}}
    best, best_ema, first_epoch = -math.inf, -math.inf, 1
    if state is not None:
        first_epoch, best = int(state["epoch"]) + 1, float(state["best"])
        best_ema = float(state.get("best_ema", -math.inf))
        result.metrics, result.epochs_completed = dict(state["metrics"]), int(state["epoch"])
        result.earlier_s = notes["resumed_elapsed_s"]  # 0 from a checkpoint of an older harness
    hook.on_cell_start(cell=cell, info=info)
    if state is not None and checkpoint.told(ckpt) != state["epoch"]:  # type: ignore[arg-type]
        # killed after the checkpoint, before the observers heard of its epoch: tell them now
        hook.on_epoch_end(cell=cell, epoch=int(state["epoch"]), metrics=dict(state["metrics"]))
        engine.mark_told(ckpt, int(state["epoch"]))
    guard = engine.guard(model)
    num_test = _batches(len(loaders.test), cfg.max_eval_batches)
    try:
        for epoch in range(first_epoch, cfg.epochs + 1):
            hook.on_epoch_start(cell=cell, epoch=epoch, num_train_batches=num_train, num_test_batches=num_test)
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            guard.start(epoch)
            loaders.set_epoch(epoch)
            train_batch = _scheduled(_training_step(trainer, model, loss_fn, parts.step_optimizer, parts.mixing, parts.scaler),
                                     scheduler if cfg.lr_schedule.per_iteration else None, first_update=(epoch - 1) * num_train)
            train_batch = _averaged(train_batch, ema, model, first_update=(epoch - 1) * num_train)
            train = engine.training_pass(lambda: _run_epoch(
                cell, "train", loaders.train, num_train, device, data.temporal, hook, meters, autocast,
                train_batch, guard, engine.reduce_pass,
            ), cell, epoch)
            with engine.hold():  # evaluation and bookkeeping: errors here are agreed on below
                if not math.isfinite(train["train_loss"]):  # the union batch's loss: the same verdict everywhere
                    raise DivergedError(f"diverged at epoch {epoch}: training loss is {train['train_loss']}")
                module_metrics = collect_epoch_metrics(model)  # e.g. OSR's fallback rate, from training steps
                meters.count_synops = cfg.synops_epochs == "every" or epoch == cfg.epochs  # counting costs a third of an evaluation
                test = _run_epoch(cell, "test", loaders.test, num_test, device, data.temporal, hook, meters, autocast,
                                  lambda x, y: trainer.eval_batch(model, x, y, loss_fn))
                if ema is not None:  # the moving average, evaluated as the model is (its own firing rates)
                    test.update(_run_epoch(cell, "ema_test", loaders.test, num_test, device, data.temporal, hook, ema_meters,
                                           autocast, lambda x, y: trainer.eval_batch(ema.module, x, y, loss_fn)))
                    best_ema = max(best_ema, test["ema_test_top1"])
                    test["best_ema_test_top1"] = best_ema
                if scheduler is not None:  # timm's: the epoch that ended, and what plateau watches
                    scheduler.step(epoch, test["test_top1"])
                best = max(best, test["test_top1"])
                metrics = {
                    **train,
                    **test,
                    "best_test_top1": best,
                    "epoch_time_s": time.perf_counter() - t0,
                    "lr": lr,
                    **{k: float(v) for k, v in static.items()},
                    **module_metrics,
                }
                result.metrics = metrics
                result.epochs_completed = epoch
            saving = ckpt is not None and epoch < cfg.epochs
            rng = engine.settle(f"at the end of epoch {epoch}", checkpoint.rng_state(generator) if saving else None)
            if saving:
                engine.save_checkpoint(ckpt, cell.id, lambda: {  # type: ignore[arg-type]
                    "epoch": epoch,
                    "elapsed_s": clock(),
                    "best": best,
                    "metrics": metrics,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler_state(scheduler),
                    **({"ema": ema.module.state_dict(), "best_ema": best_ema} if ema is not None else {}),
                    **({"scaler": parts.scaler.state_dict()} if parts.scaler is not None else {}),
                    **engine.rng_ranks(rng),
                })
            # Only now is the epoch told: a process killed in between resumes after this epoch
            # and never records it twice (the resume tells what this process could not).
            with interrupts_deferred():  # Ctrl-C: every observer hears of the epoch first
                try:
                    hook.on_epoch_end(cell=cell, epoch=epoch, metrics=dict(metrics))
                except KeyboardInterrupt:  # an observer stopped the run: it was told
                    if saving:
                        engine.mark_told(ckpt, epoch)
                    raise
                if saving:  # an observer that failed is told again by the resume
                    engine.mark_told(ckpt, epoch)
    finally:
        meters.close()
        if ema_meters is not None:
            ema_meters.close()
    with engine.hold():
        if cfg.membrane_histograms:
            result.artifacts.update(_membrane_histograms(cell, model, trainer, loss_fn, loaders.test, device, data.temporal))
    engine.settle("after training")


def _resume(engine: Engine, ckpt: Path | None, cell: Cell, parts: CellParts, generator: torch.Generator,
            fresh: dict[str, Any], build: Callable[[], CellParts]) -> tuple[CellParts, dict[str, Any] | None, dict[str, Any]]:
    """Continue from the cell's checkpoint, if there is one that fits: returns the parts (built
    again from ``fresh`` random states when the checkpoint does not fit them), the checkpoint's
    state (None: from scratch) and what ``on_cell_start`` is told of it."""
    state, discarded = engine.read_checkpoint(ckpt, cell.id)
    warnings: list[str] = []
    if state is not None:
        with engine.hold():
            try:
                warnings = engine.restore(state, parts, generator, cell.config)
            except Exception as exc:  # readable but not this cell's shape (the code changed): start over
                discarded = f"checkpoint {ckpt} does not fit the cell ({type(exc).__name__}: {exc}); starting from scratch"
                engine.remove_checkpoint(ckpt)  # type: ignore[arg-type]
                parts.meters.close()
                checkpoint.set_rng_state(fresh, generator)
                parts, state, warnings = build(), None, []
        engine.settle("while restoring the checkpoint")
    notes: dict[str, Any] = {}
    if discarded:
        notes["checkpoint_discarded"] = discarded
    if warnings:
        notes["warnings"] = warnings
    if state is not None:
        notes["resumed_from_epoch"] = int(state["epoch"])
        notes["resumed_elapsed_s"] = float(state.get("elapsed_s", 0.0))
    return parts, state, notes


def _batches(available: int, limit: int | None) -> int:
    return available if limit is None else min(available, limit)


def _run_epoch(
    cell: Cell, phase: str, loader: DataLoader, num_batches: int, device: torch.device, temporal: bool,
    hook: Any, meters: CellMeters, autocast: Any, step: Any, guard: DivergenceGuard | None = None,
    reduce: Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor, int]] | None = None,
) -> dict[str, float]:
    """One pass over ``loader`` (at most ``num_batches`` batches); returns ``{phase}_loss``,
    ``{phase}_top1`` and the meters' metrics of the phase. ``step`` runs inside ``autocast()``
    (the cell's precision). Nothing is read back to the host inside the loop but every
    ``guard.every`` steps (the divergence check): losses and counts stay on the device.
    ``reduce`` turns the pass's totals into those over every process (:meth:`Engine.reduce_pass`)."""
    T = cell.config.time_steps
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    count = 0
    batches = 0
    meters.begin(phase)
    it = iter(loader)
    for i in range(1, num_batches + 1):
        t_data = time.perf_counter()
        try:
            x, y = next(it)
        except StopIteration:
            break
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        meters.data_ready(time.perf_counter() - t_data)
        with meters.iteration(), autocast():
            out = step(to_sequence(x, T, temporal), y)
        if guard is not None:
            guard.step(i, out.loss)
        loss_sum += out.loss.double() * out.count
        correct += out.correct
        count += out.count
        batches = i
        hook.on_batch_end(cell=cell, phase=phase, batch=i, num_batches=num_batches)
    if guard is not None:
        guard.check()
    if batches == 0:
        raise HarnessError(f"the {phase} pass had no batch: the {phase} set (or its share in this process) is empty")
    if reduce is not None:  # the union batch's loss and accuracy
        loss_sum, correct, count = reduce(loss_sum, correct, count)
    count = max(count, 1)
    metrics = {f"{phase}_loss": loss_sum.item() / count, f"{phase}_top1": correct.item() / count}
    metrics.update(meters.end(phase, count, batches))
    return metrics


def _membrane_histograms(
    cell: Cell, model: nn.Module, trainer: Any, loss_fn: Any, loader: DataLoader, device: torch.device, temporal: bool
) -> dict[str, bytes]:
    """Fig. 3: record u[t] per layer and step on the first test batch; a PNG (and the sampled
    values as a ``.pt`` file) for the cell's artifacts."""
    import io
    import tempfile
    from pathlib import Path

    from harness.meters.membrane import MembraneRecorder
    from harness.plots import plot_membrane_histograms

    x, y = next(iter(loader))
    x, y = x.to(device), y.to(device)
    with MembraneRecorder(model) as rec:
        trainer.eval_batch(model, to_sequence(x, cell.config.time_steps, temporal), y, loss_fn)
    values = {layer: [v.numpy() for v in steps] for layer, steps in rec.values.items()}
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_membrane_histograms(
            values, Path(tmp) / "membrane.png", thresholds=rec.thresholds, title=f"Membrane potential u[t] before firing: {cell.label}"
        ).read_bytes()
    buf = io.BytesIO()
    torch.save({"values": rec.values, "thresholds": rec.thresholds}, buf)
    return {"membrane_histograms.png": png, "membrane_values.pt": buf.getvalue()}
