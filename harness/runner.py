"""One cell: seed, build data + model + optimizer from the registry, train epoch by epoch,
fire lifecycle hooks. Never imports a tracking backend: observers listen to the hooks."""

from __future__ import annotations

import math
import random
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from harness import checkpoint, parallel
from harness.config import CellConfig, OptimizerConfig, ScheduleConfig
from harness.data import DatasetBundle, EpochShuffle, to_sequence, train_subset
from harness.errors import HarnessError
from harness.matrix import Cell
from harness.meters.cell import CellMeters, model_size
from harness.registry import Registry
from harness.snn import LayerFactory, LIFNeuron, collect_epoch_metrics


class DivergedError(HarnessError):
    """The loss or a parameter became non-finite."""


class ObserverError(HarnessError):
    """An observer (tracking, progress, ...) or a checkpoint write failed during a data-parallel cell."""


class HeldHook:
    """The hook relay of a data-parallel cell: an error in one process's observers (only process 0
    has any) or checkpoint writes is held back instead of raised, until the next point where the
    processes meet anyway (the :class:`DivergenceGuard`'s all-reduce). There every process stops
    the cell together; raising at once would leave the others waiting in a collective, or pair
    their collectives with those of the next cell. After an error the remaining calls are skipped.
    """

    def __init__(self, hook: Any) -> None:
        self._hook = hook
        self.error: Exception | None = None

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self._hook, name)
        return lambda **kw: self.run(fn, **kw)

    def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if self.error is not None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            self.error = exc
            return None

    def raise_held(self) -> None:
        """At the end of the cell, when no collective follows: fail this process's cell."""
        if self.error is not None:
            raise ObserverError(f"an observer failed: {type(self.error).__name__}: {self.error}") from self.error


class CellInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a cell; carries the cell's (killed) result to the session."""

    def __init__(self, result: CellResult) -> None:
        super().__init__(f"interrupted during cell {result.label}")
        self.result = result


@dataclass
class CellResult:
    cell_id: str
    label: str
    status: str  # "finished" | "failed" | "killed"
    metrics: dict[str, float] = field(default_factory=dict)  # final epoch's metrics + best_test_top1
    epochs_completed: int = 0
    duration_s: float = 0.0
    error: str | None = None  # traceback text of a failed cell
    error_type: str | None = None
    artifacts: dict[str, bytes] = field(default_factory=dict)  # file name -> content (observers store them)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return the generator that seeds the data-loading workers
    (the training order itself is :class:`harness.data.EpochShuffle`'s, from the seed and epoch)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HarnessError(f"device {name!r} requested but CUDA is not available; use device = \"auto\" or \"cpu\"")
    return device


def load_dataset(config: CellConfig, registry: Registry) -> DatasetBundle:
    """The cell's data set; a factory that takes ``time_steps`` gets the cell's T (frame data)."""
    ds = config.dataset
    extra = {"time_steps": config.time_steps} if registry.datasets.info(ds.name).takes("time_steps") else {}
    return registry.datasets[ds.name](**extra, **ds.options)


def build_model(config: CellConfig, registry: Registry, data: DatasetBundle) -> nn.Module:
    norm = config.normalizer
    norm_info = registry.normalizers.info(norm.name)
    provided = {"time_steps": config.time_steps, "v_threshold": config.threshold.options.get("theta", 1.0)}
    norm_extra = {k: v for k, v in provided.items() if norm_info.takes(k)}
    policy = config.threshold
    neuron_cfg = config.neuron
    layers = LayerFactory(
        normalizer=lambda c: registry.normalizers[norm.name](num_features=c, **norm_extra, **norm.options),
        neuron=lambda: LIFNeuron(
            registry.thresholds[policy.name](**policy.options),
            tau=neuron_cfg.tau,
            reset=neuron_cfg.reset,
            surrogate_alpha=neuron_cfg.surrogate_alpha,
            detach_reset=neuron_cfg.detach_reset,
        ),
    )
    return registry.models[config.model.name](
        in_channels=data.in_channels,
        num_classes=data.num_classes,
        input_size=data.input_size,
        layers=layers,
        **config.model.options,
    )


def build_optimizer(params: Any, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    raise HarnessError(f"unknown optimizer {cfg.name!r}; known optimizers: adam, adamw, sgd")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, epochs: int) -> Any:
    """Stepped once per epoch."""
    if cfg.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=cfg.min_lr)
    if cfg.name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    if cfg.name == "constant":
        return None
    raise HarnessError(f"unknown lr schedule {cfg.name!r}; known: constant, cosine, step")


def run_cell(cell: Cell, registry: Registry, hook: Any, checkpoint_dir: Path | None = None) -> CellResult:
    """Train and evaluate one cell. Exceptions become a failed result (the matrix goes on);
    ``KeyboardInterrupt`` marks the cell killed and propagates.

    With ``checkpoint_dir``, the cell checkpoints into ``checkpoint_dir / cell.id`` at the end of
    every epoch and, if a checkpoint is there when it starts, continues from it (the result equals
    an uninterrupted run's on CPU). Once the observers have recorded the end of a finished or
    diverged cell, its checkpoint is removed; a killed cell's, or one that failed otherwise (a
    transient error may not recur), is kept for the next run.
    """
    start = time.perf_counter()
    result = CellResult(cell.id, cell.label, "failed")
    ckpt = checkpoint_dir / cell.id if checkpoint_dir is not None else None
    train_hook = HeldHook(hook) if parallel.current().enabled else hook
    try:
        _train(cell, registry, train_hook, result, ckpt)
        if isinstance(train_hook, HeldHook):
            train_hook.raise_held()
        result.status = "finished"
    except KeyboardInterrupt as exc:
        result.status = "killed"
        result.duration_s = time.perf_counter() - start
        hook.on_cell_end(cell=cell, result=result)
        raise CellInterrupted(result) from exc
    except Exception as exc:  # isolation: one bad cell never takes down the matrix
        result.status = "failed"
        result.error = traceback.format_exc()
        result.error_type = type(exc).__name__
    result.duration_s = time.perf_counter() - start
    hook.on_cell_end(cell=cell, result=result)  # recorded first: a crash here keeps the checkpoint
    if ckpt is not None and parallel.current().is_main and (result.status == "finished" or result.error_type == "DivergedError"):
        checkpoint.remove(ckpt)
    return result


class DivergenceGuard:
    """Stops a cell whose training loss or parameters become non-finite.

    Losses are collected on the device and checked every ``every`` steps (and at the end of the
    epoch) with one host sync, together with every parameter: a diverged cell stops within
    ``every`` steps, with the step where the loss first went non-finite. In a data-parallel cell the
    same all-reduce also carries whether ``held`` holds an observer's error, so that every process
    stops then.
    """

    def __init__(self, model: nn.Module, every: int = 25, held: HeldHook | None = None) -> None:
        self.held = held
        self.params = [(n, p) for n, p in model.named_parameters()]
        self.every = every
        self.epoch = 0
        self.pending: list[torch.Tensor] = []
        self.last_step = 0

    def start(self, epoch: int) -> None:
        self.epoch, self.pending, self.last_step = epoch, [], 0

    def step(self, step: int, loss: torch.Tensor) -> None:
        self.pending.append(loss.detach().reshape(()).float())
        self.last_step = step
        if len(self.pending) >= self.every:
            self.check()

    def check(self) -> None:
        if not self.pending:
            return
        losses = torch.stack(self.pending)
        flags = torch.isfinite(losses)
        if self.params:
            flags = torch.cat([flags, torch.stack([torch.isfinite(p.detach()).all() for _, p in self.params]).to(flags.device)])
        ok = flags.all().float().reshape(1)
        if parallel.current().enabled:  # every process stops together, or none does
            observers_ok = 0.0 if self.held is not None and self.held.error is not None else 1.0
            both = torch.cat([ok, torch.tensor([observers_ok], device=ok.device)])
            torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MIN)
            finite, observed = both.tolist()  # the one host sync
            if not observed:
                if self.held is not None and self.held.error is not None:
                    raise ObserverError(
                        f"an observer failed ({type(self.held.error).__name__}: {self.held.error}); "
                        f"every process stopped the cell at epoch {self.epoch}, by step {self.last_step}"
                    ) from self.held.error
                raise ObserverError(f"an observer failed in another process; stopped at epoch {self.epoch}, by step {self.last_step}")
            ok = torch.tensor([finite])
        if bool(ok.item()):  # the one host sync
            self.pending.clear()
            return
        if bool(flags.all()):
            raise DivergedError(f"diverged at epoch {self.epoch}, by step {self.last_step}, in another process")
        n = len(self.pending)
        first = self.last_step - n + 1
        bad = (~flags[:n]).nonzero()
        if len(bad):
            j = int(bad[0])
            raise DivergedError(f"diverged at epoch {self.epoch}, step {first + j}: training loss is {losses[j].item()}")
        k = int((~flags[n:]).nonzero()[0])
        raise DivergedError(
            f"diverged at epoch {self.epoch}, by step {self.last_step}: parameter {self.params[k][0]!r} is not finite"
        )


def _train(cell: Cell, registry: Registry, hook: Any, result: CellResult, ckpt: Path | None, discarded: str | None = None) -> None:
    cfg = cell.config
    par = parallel.current()
    if cfg.batch_size % par.world_size:
        raise HarnessError(f"batch_size {cfg.batch_size} does not split evenly over {par.world_size} processes")
    generator = seed_everything(cfg.seed)
    device = parallel.device_for(cfg.device, par) or resolve_device(cfg.device)
    data = load_dataset(cfg, registry)
    train_set = train_subset(data.train, cfg.train_subset)
    pin = device.type == "cuda"
    sampler = EpochShuffle(len(train_set), cfg.seed, par.rank, par.world_size)  # type: ignore[arg-type]
    train_loader = DataLoader(
        train_set, batch_size=cfg.batch_size // par.world_size, sampler=sampler, generator=generator,
        num_workers=cfg.num_workers, pin_memory=pin,
    )
    # Every process evaluates the whole test set (no collective can then wait on a shard's end).
    test_loader = DataLoader(data.test, batch_size=cfg.eval_batch_size or cfg.batch_size, num_workers=cfg.num_workers, pin_memory=pin)

    model = build_model(cfg, registry, data).to(device)
    trainer = registry.trainers[cfg.trainer.name](**cfg.trainer.options)
    loss_fn = registry.losses[cfg.loss.name](**cfg.loss.options)
    optimizer = build_optimizer(model.parameters(), cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg.lr_schedule, cfg.epochs)
    step_optimizer = parallel.GradientAveragingOptimizer(optimizer) if par.enabled else optimizer
    if par.rank:  # same initial weights everywhere; from here on each process draws its own
        # augmentations and dropout masks
        seed_everything(cfg.seed + 1_000_003 * par.rank)
        generator.manual_seed(cfg.seed + 1_000_003 * par.rank)

    meters = CellMeters(model, device, cfg.meters)
    static = model_size(model)
    best = -math.inf
    first_epoch = 1
    info: dict[str, Any] = {"device": str(device), **static, "train_size": len(train_set), "test_size": len(data.test)}
    if discarded:
        info["checkpoint_discarded"] = discarded
    state = None
    if ckpt is not None:
        try:
            state = checkpoint.load(ckpt, cell.id)
        except checkpoint.CheckpointError as exc:  # never fatal: the cell starts from scratch
            info["checkpoint_discarded"] = f"{exc}; starting from scratch"
            checkpoint.remove(ckpt)
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(state["scheduler"])
            checkpoint.set_rng_state(state["rng"], generator)
        except Exception as exc:  # readable but not this cell's shape (the code changed): start over
            info["checkpoint_discarded"] = f"checkpoint {ckpt} does not fit the cell ({type(exc).__name__}: {exc}); starting from scratch"
            checkpoint.remove(ckpt)  # type: ignore[arg-type]
            return _train(cell, registry, hook, result, ckpt, info["checkpoint_discarded"])  # now without a checkpoint
        first_epoch = int(state["epoch"]) + 1
        best = float(state["best"])
        result.metrics = dict(state["metrics"])
        result.epochs_completed = int(state["epoch"])
        info["resumed_from_epoch"] = int(state["epoch"])
    hook.on_cell_start(cell=cell, info=info)
    guard = DivergenceGuard(model, held=hook if isinstance(hook, HeldHook) else None)
    num_train = _batches(len(train_loader), cfg.max_train_batches)
    num_test = _batches(len(test_loader), cfg.max_eval_batches)
    try:
        for epoch in range(first_epoch, cfg.epochs + 1):
            hook.on_epoch_start(cell=cell, epoch=epoch, num_train_batches=num_train, num_test_batches=num_test)
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            guard.start(epoch)
            sampler.set_epoch(epoch)
            train = _run_epoch(cell, "train", train_loader, num_train, device, data.temporal, hook, meters,
                               lambda x, y: trainer.train_batch(model, x, y, loss_fn, step_optimizer), guard)
            if not math.isfinite(train["train_loss"]):
                raise DivergedError(f"diverged at epoch {epoch}: training loss is {train['train_loss']}")
            module_metrics = collect_epoch_metrics(model)  # e.g. OSR's fallback rate, from training steps
            test = _run_epoch(cell, "test", test_loader, num_test, device, data.temporal, hook, meters,
                              lambda x, y: trainer.eval_batch(model, x, y, loss_fn))
            if scheduler is not None:
                scheduler.step()
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
            hook.on_epoch_end(cell=cell, epoch=epoch, metrics=dict(metrics))
            if ckpt is not None and epoch < cfg.epochs and par.is_main:
                snapshot = {
                    "epoch": epoch,
                    "best": best,
                    "metrics": metrics,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else {},
                    "rng": checkpoint.rng_state(generator),
                }
                if isinstance(hook, HeldHook):  # a failed write must not stop process 0 alone
                    hook.run(checkpoint.save, ckpt, cell.id, snapshot)
                else:
                    checkpoint.save(ckpt, cell.id, snapshot)
    finally:
        meters.close()
    if cfg.membrane_histograms:
        result.artifacts.update(_membrane_histograms(cell, model, trainer, loss_fn, test_loader, device, data.temporal))


def _batches(available: int, limit: int | None) -> int:
    return available if limit is None else min(available, limit)


def _run_epoch(
    cell: Cell, phase: str, loader: DataLoader, num_batches: int, device: torch.device, temporal: bool,
    hook: Any, meters: CellMeters, step: Any, guard: DivergenceGuard | None = None,
) -> dict[str, float]:
    """One pass over ``loader`` (at most ``num_batches`` batches); returns ``{phase}_loss``,
    ``{phase}_top1`` and the meters' metrics of the phase."""
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
        with meters.iteration():
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
    if phase == "train" and parallel.current().enabled:  # the union batch's loss and accuracy
        totals = torch.stack([loss_sum, correct.double(), torch.tensor(float(count), device=device, dtype=torch.float64)])
        parallel.all_reduce_sum(totals)
        loss_sum, correct, count = totals[0], totals[1], int(totals[2].item())
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
