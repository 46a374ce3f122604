"""One cell: seed, build data + model + optimizer from the registry, train epoch by epoch,
fire lifecycle hooks. Never imports a tracking backend: observers listen to the hooks."""

from __future__ import annotations

import contextlib
import math
import random
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from harness import checkpoint, devices, parallel
from harness.config import CellConfig, OptimizerConfig, ScheduleConfig
from harness.data import DatasetBundle, EpochSequence, EpochShuffle, WorkerSeeding, to_sequence, train_subset
from harness.errors import HarnessError
from harness.events import CellResult, checkpoint_done
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
    processes meet anyway (the :class:`DivergenceGuard`'s all-reduce, or a :class:`Meetings`
    settle at the end of the epoch). There every process stops the cell together; raising at once
    would leave the others waiting in a collective, or pair their collectives with those of the
    next cell. After an error the remaining calls are skipped.
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


class CellInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a cell; carries the cell's (killed) result to the session."""

    def __init__(self, result: CellResult) -> None:
        super().__init__(f"interrupted during cell {result.label}")
        self.result = result


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return the generator that seeds the data-loading workers
    (the training order itself is :class:`harness.data.EpochShuffle`'s, from the seed and epoch)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """The cell's device in this process (:func:`harness.devices.resolve_device`: under data
    parallelism, this process's own GPU)."""
    par = parallel.current()
    return devices.resolve_device(name, par.rank, par.world_size, par.local_rank)


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


def run_cell(cell: Cell, registry: Registry, hook: Any, checkpoint_dir: Path | None = None, preloaded: Any = None,
             remove_checkpoint: bool = True) -> CellResult:
    """Train and evaluate one cell. Exceptions become a failed result (the matrix goes on);
    ``KeyboardInterrupt`` marks the cell killed and propagates.

    With ``checkpoint_dir``, the cell checkpoints into ``checkpoint_dir / cell.id`` at the end of
    every epoch and, if a checkpoint is there when it starts, continues from it (the result equals
    an uninterrupted run's on CPU). Once the observers have recorded the end of a finished or
    diverged cell, its checkpoint is removed; a killed cell's, or one that failed otherwise (a
    transient error may not recur), is kept for the next run.

    ``preloaded`` (:class:`harness.session.PreloadedData`): data sets already loaded in this
    process; the cell takes its own from there instead of loading it again.
    ``remove_checkpoint=False`` leaves the removal to the caller (a worker's ``on_cell_end`` is
    only sent, not recorded, when it returns).

    Under data parallelism the processes fail a cell together (:class:`Meetings`); an error in
    the middle of a training step, which they cannot agree on, is recorded and then propagates
    as :class:`harness.parallel.GroupBroken`: the run must end.
    """
    start = time.perf_counter()
    result = CellResult(cell.id, cell.label, "failed")
    ckpt = checkpoint_dir / cell.id if checkpoint_dir is not None else None
    train_hook = HeldHook(hook) if parallel.current().enabled else hook
    try:
        with devices.backend_settings(cell.config.deterministic, cell.config.cudnn_benchmark):
            _train(cell, registry, train_hook, result, ckpt, preloaded)
        result.status = "finished"
    except KeyboardInterrupt as exc:
        result.status = "killed"
        result.duration_s = time.perf_counter() - start
        hook.on_cell_end(cell=cell, result=result)
        raise CellInterrupted(result) from exc
    except parallel.GroupBroken as exc:  # recorded as failed (checkpoint kept), then the run ends
        _failed(result, exc)
        result.duration_s = time.perf_counter() - start
        hook.on_cell_end(cell=cell, result=result)
        raise
    except Exception as exc:  # isolation: one bad cell never takes down the matrix
        _failed(result, exc)
    result.duration_s = time.perf_counter() - start
    hook.on_cell_end(cell=cell, result=result)  # recorded first: a crash here keeps the checkpoint
    if remove_checkpoint and ckpt is not None and parallel.current().is_main and checkpoint_done(result):
        checkpoint.remove(ckpt)
    return result


def _failed(result: CellResult, exc: BaseException) -> None:
    result.status = "failed"
    result.error = traceback.format_exc()
    result.error_type = type(exc).__name__


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
            both = torch.cat([ok, torch.full((1,), observers_ok, device=ok.device)])  # no copy from the host
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


class Meetings:
    """Where the processes of a data-parallel cell meet outside the training step and agree on
    the cell's outcome: after building it, after restoring its checkpoint, at the end of every
    epoch and after training (:func:`harness.parallel.agree`, one object all-gather each).

    ``with meetings.hold():`` runs a block whose error (a data file one node cannot read, an
    evaluation error, an observer's error held by :class:`HeldHook`) is held, not raised, until
    ``meetings.settle(where)``, where every process stops the cell together if any process
    failed. With one process, errors are raised where they happen and ``settle`` only returns
    ``[payload]``.
    """

    def __init__(self, par: parallel.Parallel, held: HeldHook | None) -> None:
        self.par, self.held = par, held
        self.error: Exception | None = None

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            if not self.par.enabled:
                raise
            self.error = self.error or exc

    def settle(self, where: str, payload: Any = None) -> list[Any]:
        """Agree with the other processes; returns every process's ``payload``, by rank."""
        error, self.error = self.error, None
        if error is None and self.held is not None and self.held.error is not None:
            error = ObserverError(f"an observer failed ({parallel.describe(self.held.error)}); every process stopped the cell {where}")
            error.__cause__ = self.held.error
        return parallel.agree(error, self.par, where, payload)


@dataclass
class _Parts:
    """What a cell trains, built from the registry."""

    model: nn.Module
    trainer: Any
    loss_fn: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    step_optimizer: Any  # what the trainer steps: the optimizer, or its gradient-averaging wrapper
    meters: CellMeters


def _process_seed(seed: int, rank: int, epoch: int = 0) -> int:
    """The seed of process ``rank``'s own random stream (augmentations, dropout masks); restarted
    from ``epoch`` when a checkpoint has no state of this process's."""
    return seed + 1_000_003 * rank + 7_919 * epoch


def _seed_process(seed: int, rank: int, generator: torch.Generator, epoch: int = 0) -> None:
    seed_everything(_process_seed(seed, rank, epoch))
    generator.manual_seed(_process_seed(seed, rank, epoch))


def _build(cfg: CellConfig, registry: Registry, data: DatasetBundle, device: torch.device, generator: torch.Generator) -> _Parts:
    par = parallel.current()
    model = build_model(cfg, registry, data).to(device)
    if cfg.compile:  # in place: the module, its state dict and its hooks stay what they were
        model.compile(dynamic=False)
    trainer = registry.trainers[cfg.trainer.name](**cfg.trainer.options)
    loss_fn = registry.losses[cfg.loss.name](**cfg.loss.options)
    optimizer = build_optimizer(model.parameters(), cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg.lr_schedule, cfg.epochs)
    step_optimizer = parallel.GradientAveragingOptimizer(optimizer) if par.enabled else optimizer
    if par.rank:  # same initial weights everywhere; from here on each process draws its own
        # augmentations and dropout masks
        _seed_process(cfg.seed, par.rank, generator)
    return _Parts(model, trainer, loss_fn, optimizer, scheduler, step_optimizer, CellMeters(model, device, cfg.meters))


def _loaders(cfg: CellConfig, data: DatasetBundle, train_set: Any, generator: torch.Generator, device: torch.device) -> tuple[DataLoader, DataLoader, _Epochs]:
    """The training loader (the epoch's order from :class:`EpochShuffle`, this process's shard)
    and the test loader (every process evaluates the whole test set: no collective can then wait
    on a shard's end). Workers, if any, persist across epochs and are reseeded at every epoch
    (:class:`WorkerSeeding`), so that a resumed cell draws what an uninterrupted one draws."""
    par = parallel.current()
    workers = cfg.num_workers
    persistent = workers > 0
    pin = device.type == "cuda"
    sampler = EpochShuffle(len(train_set), cfg.seed, par.rank, par.world_size, with_epoch=persistent)
    train_data = WorkerSeeding(train_set, _process_seed(cfg.seed, par.rank)) if persistent else train_set
    train_loader = DataLoader(
        train_data, batch_size=cfg.batch_size // par.world_size, sampler=sampler, generator=generator,
        num_workers=workers, pin_memory=pin, persistent_workers=persistent,
    )
    # Persistent test-loading workers are reseeded at every epoch too (random test transforms).
    test_sampler = EpochSequence(len(data.test)) if persistent else None
    test_data = WorkerSeeding(data.test, _process_seed(cfg.seed, par.rank) + 1) if persistent else data.test
    test_loader = DataLoader(
        test_data, batch_size=cfg.eval_batch_size or cfg.batch_size, sampler=test_sampler, num_workers=workers,
        pin_memory=pin, persistent_workers=persistent,
    )
    return train_loader, test_loader, _Epochs(sampler, test_sampler)


@dataclass
class _Epochs:
    """The samplers that are told the epoch (the training order; the test order's worker seeds)."""

    train: EpochShuffle
    test: EpochSequence | None

    def set_epoch(self, epoch: int) -> None:
        self.train.set_epoch(epoch)
        if self.test is not None:
            self.test.set_epoch(epoch)


def _read_checkpoint(ckpt: Path | None, cell_id: str, par: parallel.Parallel) -> tuple[dict[str, Any] | None, str | None]:
    """Process 0 reads the cell's checkpoint and sends it to the others (their nodes need not see
    the file). Returns the state (None: start from scratch) and why a checkpoint was discarded."""
    state, discarded, error = None, None, None
    if ckpt is not None and par.is_main:
        try:
            state = checkpoint.load(ckpt, cell_id)
        except checkpoint.CheckpointError as exc:  # never fatal: the cell starts from scratch
            discarded = f"{exc}; starting from scratch"
            checkpoint.remove(ckpt)
        except Exception as exc:  # e.g. an unreadable directory: fail the cell on every process
            error = exc
    if par.enabled:
        state, discarded, text = parallel.broadcast_object((state, discarded, None if error is None else parallel.describe(error)), par)
        if text is not None and error is None:
            raise parallel.ProcessFailed(f"process 0 could not read the checkpoint of cell {cell_id} ({text})")
    if error is not None:
        raise error
    return state, discarded


def _restore(state: dict[str, Any], parts: _Parts, generator: torch.Generator, cfg: CellConfig) -> list[str]:
    """Load a checkpoint's states into ``parts``; returns warnings. Under data parallelism every
    process restores its own random states (``rng_ranks``); a checkpoint of another number of
    processes restarts each process's own stream from the seed and the epoch instead of giving
    every process process 0's."""
    par = parallel.current()
    parts.model.load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    if parts.scheduler is not None:
        parts.scheduler.load_state_dict(state["scheduler"])
    ranks = state.get("rng_ranks") or []
    if par.enabled and len(ranks) == par.world_size:
        return checkpoint.set_rng_state(ranks[par.rank], generator)
    warnings = checkpoint.set_rng_state(state["rng"], generator)
    if par.enabled:
        warnings.append(
            f"the checkpoint holds the random states of {max(len(ranks), 1)} process(es), this run has {par.world_size}: "
            "each process's random stream restarts from the seed and the epoch"
        )
        if par.rank:
            _seed_process(cfg.seed, par.rank, generator, int(state["epoch"]))
    return warnings


def _train(cell: Cell, registry: Registry, hook: Any, result: CellResult, ckpt: Path | None, preloaded: Any = None) -> None:
    cfg = cell.config
    par = parallel.current()
    meet = Meetings(par, hook if isinstance(hook, HeldHook) else None)
    with meet.hold():  # build the cell
        if cfg.batch_size % par.world_size:
            raise HarnessError(f"batch_size {cfg.batch_size} does not split evenly over {par.world_size} processes")
        device = resolve_device(cfg.device)
        autocast = devices.autocast(cfg.precision, device)
        generator = seed_everything(cfg.seed)
        data = preloaded.take(cfg) if preloaded is not None else None
        if data is None:
            data = load_dataset(cfg, registry)
        fresh = checkpoint.rng_state(generator)  # where building starts from (again, after a bad checkpoint)
        train_set = train_subset(data.train, cfg.train_subset)
        train_loader, test_loader, sampler = _loaders(cfg, data, train_set, generator, device)
        parts = _build(cfg, registry, data, device, generator)
    meet.settle("while building the cell")

    state, discarded = _read_checkpoint(ckpt, cell.id, par)
    warnings: list[str] = []
    if state is not None:
        with meet.hold():
            try:
                warnings = _restore(state, parts, generator, cfg)
            except Exception as exc:  # readable but not this cell's shape (the code changed): start over
                discarded = f"checkpoint {ckpt} does not fit the cell ({type(exc).__name__}: {exc}); starting from scratch"
                if par.is_main:
                    checkpoint.remove(ckpt)  # type: ignore[arg-type]
                parts.meters.close()
                checkpoint.set_rng_state(fresh, generator)
                parts, state, warnings = _build(cfg, registry, data, device, generator), None, []
        meet.settle("while restoring the checkpoint")

    model, trainer, loss_fn, optimizer, scheduler, meters = (
        parts.model, parts.trainer, parts.loss_fn, parts.optimizer, parts.scheduler, parts.meters)
    static = model_size(model)
    info: dict[str, Any] = {"device": str(device), **static, "train_size": len(train_set), "test_size": len(data.test)}
    if discarded:
        info["checkpoint_discarded"] = discarded
    if warnings:
        info["warnings"] = warnings
    best, first_epoch = -math.inf, 1
    if state is not None:
        first_epoch, best = int(state["epoch"]) + 1, float(state["best"])
        result.metrics, result.epochs_completed = dict(state["metrics"]), int(state["epoch"])
        info["resumed_from_epoch"] = int(state["epoch"])
    hook.on_cell_start(cell=cell, info=info)
    guard = DivergenceGuard(model, held=meet.held)
    num_train = _batches(len(train_loader), cfg.max_train_batches)
    num_test = _batches(len(test_loader), cfg.max_eval_batches)
    try:
        for epoch in range(first_epoch, cfg.epochs + 1):
            hook.on_epoch_start(cell=cell, epoch=epoch, num_train_batches=num_train, num_test_batches=num_test)
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            guard.start(epoch)
            sampler.set_epoch(epoch)
            train = _training_pass(cell, epoch, train_loader, num_train, device, data.temporal, hook, meters, autocast,
                                   lambda x, y: trainer.train_batch(model, x, y, loss_fn, parts.step_optimizer), guard)
            with meet.hold():  # evaluation and bookkeeping: errors here are agreed on below
                if not math.isfinite(train["train_loss"]):  # the union batch's loss: the same verdict everywhere
                    raise DivergedError(f"diverged at epoch {epoch}: training loss is {train['train_loss']}")
                module_metrics = collect_epoch_metrics(model)  # e.g. OSR's fallback rate, from training steps
                meters.count_synops = cfg.synops_epochs == "every" or epoch == cfg.epochs  # counting costs a third of an evaluation
                test = _run_epoch(cell, "test", test_loader, num_test, device, data.temporal, hook, meters, autocast,
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
            saving = ckpt is not None and epoch < cfg.epochs
            rng = meet.settle(f"at the end of epoch {epoch}", checkpoint.rng_state(generator) if saving else None)
            if saving and par.is_main:
                snapshot = {
                    "epoch": epoch,
                    "best": best,
                    "metrics": metrics,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else {},
                    "rng": rng[0],
                    **({"rng_ranks": rng} if par.enabled else {}),
                }
                if isinstance(hook, HeldHook):  # a failed write must not stop process 0 alone
                    hook.run(checkpoint.save, ckpt, cell.id, snapshot)
                else:
                    checkpoint.save(ckpt, cell.id, snapshot)  # type: ignore[arg-type]
            # Only now is the epoch told: a process killed in between resumes after this epoch
            # and never records it twice.
            hook.on_epoch_end(cell=cell, epoch=epoch, metrics=dict(metrics))
    finally:
        meters.close()
    with meet.hold():
        if cfg.membrane_histograms:
            result.artifacts.update(_membrane_histograms(cell, model, trainer, loss_fn, test_loader, device, data.temporal))
    meet.settle("after training")


def _training_pass(cell: Cell, epoch: int, *args: Any) -> dict[str, float]:
    """The epoch's training pass. Under data parallelism the processes meet inside every step
    (statistics, gradients), so an error that strikes one process there cannot be agreed on: it
    becomes :class:`harness.parallel.GroupBroken` and ends the run. Divergence and observer
    errors are agreed in the divergence check and stop the cell on every process together."""
    try:
        return _run_epoch(cell, "train", *args)
    except (DivergedError, ObserverError):
        raise
    except Exception as exc:
        par = parallel.current()
        if not par.enabled:
            raise
        raise parallel.GroupBroken(
            f"process {par.rank} of {par.world_size} failed in a training step of epoch {epoch} of cell [{cell.label}] "
            f"({parallel.describe(exc)}). The other processes may be waiting for it inside a collective, so the run "
            "ends here (torchrun stops them); the next run resumes the cell from its last checkpoint. A broken "
            "connection means that another process failed first: its own message says why"
        ) from exc


def _batches(available: int, limit: int | None) -> int:
    return available if limit is None else min(available, limit)


def _run_epoch(
    cell: Cell, phase: str, loader: DataLoader, num_batches: int, device: torch.device, temporal: bool,
    hook: Any, meters: CellMeters, autocast: Any, step: Any, guard: DivergenceGuard | None = None,
) -> dict[str, float]:
    """One pass over ``loader`` (at most ``num_batches`` batches); returns ``{phase}_loss``,
    ``{phase}_top1`` and the meters' metrics of the phase. ``step`` runs inside ``autocast()``
    (the cell's precision). Nothing is read back to the host inside the loop but every
    ``guard.every`` steps (the divergence check): losses and counts stay on the device."""
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
    if phase == "train" and parallel.current().enabled:  # the union batch's loss and accuracy
        totals = torch.stack([loss_sum, correct.double(), torch.full((), float(count), device=device, dtype=torch.float64)])
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
