"""Building a cell from its config and the registry: its data set, model, trainer, loss,
optimizer and learning-rate schedule (:func:`build_cell`), and its data loaders.

Nothing here knows of processes or observers: what data parallelism adds (gradient averaging,
each process's own random stream) is :class:`harness.engine.Engine`'s.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from harness import devices, parallel
from harness.config import CellConfig, EmaConfig, OptimizerConfig, ScheduleConfig
from harness.data import DatasetBundle, EpochSequence, EpochShuffle, WorkerSeeding
from harness.errors import HarnessError
from harness.meters.cell import CellMeters
from harness.registry import Registry
from harness.snn import LayerFactory, LIFNeuron


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return the generator that seeds the data-loading workers
    (the training order itself is :class:`harness.data.EpochShuffle`'s, from the seed and epoch)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def process_seed(seed: int, rank: int, epoch: int = 0) -> int:
    """The seed of process ``rank``'s own random stream (augmentations, dropout masks); restarted
    from ``epoch`` when a checkpoint has no state of this process's."""
    return seed + 1_000_003 * rank + 7_919 * epoch


def seed_process(seed: int, rank: int, generator: torch.Generator, epoch: int = 0) -> None:
    seed_everything(process_seed(seed, rank, epoch))
    generator.manual_seed(process_seed(seed, rank, epoch))


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
    """The cell's model from the registry, its normalizers and LIF neurons (with the cell's
    threshold policy and membrane normalization) made by a :class:`harness.snn.LayerFactory`."""
    norm = config.normalizer
    norm_info = registry.normalizers.info(norm.name)
    provided = {"time_steps": config.time_steps, "v_threshold": config.threshold.options.get("theta", 1.0)}
    norm_extra = {k: v for k, v in provided.items() if norm_info.takes(k)}
    policy = config.threshold
    neuron_cfg = config.neuron
    layers = LayerFactory(
        normalizer=lambda c: registry.normalizers[norm.name](num_features=c, **norm_extra, **norm.options),
        neuron=lambda num_features=None: LIFNeuron(
            registry.thresholds[policy.name](**policy.options),
            tau=neuron_cfg.tau,
            reset=neuron_cfg.reset,
            surrogate_alpha=neuron_cfg.surrogate_alpha,
            detach_reset=neuron_cfg.detach_reset,
            membrane_norm=build_membrane_norm(config, registry, num_features),
        ),
    )
    return registry.models[config.model.name](
        in_channels=data.in_channels,
        num_classes=data.num_classes,
        input_size=data.input_size,
        layers=layers,
        **config.model.options,
    )


def build_membrane_norm(config: CellConfig, registry: Registry, num_features: int | None) -> nn.Module | None:
    """The membrane normalization of one neuron with ``num_features`` channels (``None`` for the
    plain LIF: ``membrane_norm = "none"``, whose factory returns ``None``).

    :raises HarnessError: the cell has a membrane normalization, and the model built the neuron
        without its number of channels (``layers.neuron()`` instead of ``layers.neuron(C)``).
    """
    mn = config.membrane_norm
    if mn.name == "none":
        return None
    info = registry.membrane_norms.info(mn.name)
    if num_features is None:
        raise HarnessError(
            f"membrane_norm {mn.name!r} has per-channel parameters, but model {config.model.name!r} builds its neurons "
            "with layers.neuron() and no number of channels: the model must call layers.neuron(C), C being the "
            "channels (features) the neuron receives (docs/plugins.md, section 3.4a)")
    extra = {"time_steps": config.time_steps} if info.takes("time_steps") else {}
    return info.factory(num_features=num_features, **extra, **mn.options)


def build_optimizer(model_or_params: nn.Module | Any, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """The optimizer ``cfg`` names, from timm's factory (``timm.optim.create_optimizer_v2``).

    ``sgd`` is torch's SGD with classical momentum (timm's ``momentum``), Nesterov's with
    ``nesterov = true``. ``filter_bias_and_bn`` (given a module) puts every 1-D parameter
    (biases, normalizer scales and shifts) in a group without weight decay; otherwise all the
    parameters are one group, with ``weight_decay``. ``betas`` and ``eps`` reach the optimizers
    that take them (timm drops them for the others)."""
    from timm.optim import create_optimizer_v2

    kwargs: dict[str, Any] = {"betas": tuple(cfg.betas)}
    if cfg.eps is not None:
        kwargs["eps"] = cfg.eps
    if cfg.name == "sgd":
        kwargs["nesterov"] = cfg.nesterov
    filtered = cfg.filter_bias_and_bn and isinstance(model_or_params, nn.Module)
    if not filtered and isinstance(model_or_params, nn.Module):
        model_or_params = [p for p in model_or_params.parameters() if p.requires_grad]  # one group, in order
    return create_optimizer_v2(model_or_params, opt=cfg.name, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               momentum=cfg.momentum, filter_bias_and_bn=filtered, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, epochs: int, updates_per_epoch: int = 0) -> Any:
    """The learning-rate schedule ``cfg`` names, from timm's factory
    (``timm.scheduler.create_scheduler_v2``) over ``epochs`` (the warm-up is within them).

    A timm scheduler is told the epoch at the end of each epoch (``step(epoch, metric)``, the
    metric being the epoch's test top-1, which ``plateau`` watches) and the update count after
    every optimizer step (``step_update(n)``); the one with ``per_iteration`` acts on the
    latter, over ``epochs * updates_per_epoch`` updates. Cosine without warm-up is
    ``min_lr + (lr - min_lr) (1 + cos(pi t / epochs)) / 2`` at epoch ``t`` (0-based), as
    ``torch.optim.lr_scheduler.CosineAnnealingLR``.

    :raises HarnessError: ``per_iteration`` without ``updates_per_epoch``.
    """
    from timm.scheduler import create_scheduler_v2

    if cfg.per_iteration and updates_per_epoch < 1:
        raise HarnessError("lr_schedule.per_iteration needs the number of optimizer steps per epoch (updates_per_epoch)")
    with warnings.catch_warnings():
        # timm deprecates plateau since its own checkpoints lose the counters; the harness's keep
        # them (scheduler_state), so a resumed plateau cell goes on exactly
        warnings.filterwarnings("ignore", message="PlateauLRScheduler is deprecated", category=FutureWarning)
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=cfg.name, num_epochs=epochs, decay_epochs=cfg.step_size, decay_milestones=list(cfg.milestones),
            decay_rate=cfg.gamma, patience_epochs=cfg.patience, min_lr=cfg.min_lr, warmup_lr=cfg.warmup_lr,
            warmup_epochs=cfg.warmup_epochs, plateau_mode="max", step_on_epochs=not cfg.per_iteration,
            updates_per_epoch=updates_per_epoch if cfg.per_iteration else 0,
        )
    return scheduler


def scheduler_state(scheduler: Any) -> dict[str, Any]:
    """What a checkpoint keeps of ``scheduler`` for an exact resume: timm's state, and for
    ``plateau`` the state of the torch ``ReduceLROnPlateau`` inside it too (its count of epochs
    without improvement, its cool-down), which timm's own ``state_dict`` leaves out."""
    if scheduler is None:
        return {}
    state = dict(scheduler.state_dict())
    inner = getattr(scheduler, "lr_scheduler", None)
    if inner is not None:
        state["torch_plateau"] = inner.state_dict()
    return state


def load_scheduler_state(scheduler: Any, state: dict[str, Any]) -> None:
    """Inverse of :func:`scheduler_state`."""
    if scheduler is None:
        return
    state = dict(state)
    inner = state.pop("torch_plateau", None)
    scheduler.load_state_dict(state)
    if inner is not None:
        scheduler.lr_scheduler.load_state_dict(inner)


@dataclass
class CellParts:
    """What a cell trains, built from the registry."""

    model: nn.Module
    trainer: Any
    loss_fn: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    meters: CellMeters
    step_optimizer: Any = None  # what the trainer steps: the optimizer, or the engine's gradient-averaging wrapper
    ema: Any = None  # timm's ModelEmaV3 of the model (config.ema.decay > 0), else None
    mixing: Any = None  # harness.mixing.BatchMixing of the training batches (config.mixup), else None
    scaler: Any = None  # torch.amp.GradScaler of a float16 cell (harness.scaling), else None

    def __post_init__(self) -> None:
        if self.step_optimizer is None:
            self.step_optimizer = self.optimizer


def build_cell(config: CellConfig, registry: Registry, data: DatasetBundle, device: torch.device | str = "cpu",
               updates_per_epoch: int = 0) -> CellParts:
    """Everything a cell trains, built from ``config`` and ``registry`` for ``data`` (for its
    shapes and classes), on ``device``: the model (under ``torch.compile`` when ``compile`` is
    set, in place), the trainer, the loss, the optimizer, the learning-rate schedule (over
    ``updates_per_epoch`` optimizer steps an epoch when it advances per iteration) and the
    cell's meters. Draws the initial weights from torch's global random state."""
    model = build_model(config, registry, data).to(device)
    if config.compile:  # in place: the module, its state dict and its hooks stay what they were
        model.compile(dynamic=False)
    trainer = registry.trainers[config.trainer.name](**config.trainer.options)
    loss_fn = registry.losses[config.loss.name](**config.loss.options)
    optimizer = build_optimizer(model, config.optimizer)
    scheduler = build_scheduler(optimizer, config.lr_schedule, config.epochs, updates_per_epoch)
    from harness.mixing import build_mixing
    from harness.scaling import loss_scaler

    return CellParts(model, trainer, loss_fn, optimizer, scheduler, CellMeters(model, torch.device(device), config.meters),
                     ema=build_ema(model, config.ema), mixing=build_mixing(config.mixup, loss_fn, data.num_classes, data.temporal),
                     scaler=loss_scaler(config.precision, torch.device(device)))


def build_ema(model: nn.Module, cfg: EmaConfig) -> Any:
    """timm's ``ModelEmaV3`` of ``model`` (a copy on the model's device), or None when
    ``cfg.decay`` is 0. Buffers: ``"average"`` interpolates every floating-point buffer like the
    weights (normalizers' running statistics, OTS's running thresholds: each stays the average
    over the same updates as the weights it goes with); ``"copy"`` takes the model's own at every
    update. Integer buffers (``num_batches_tracked``) are copied either way."""
    if not cfg.decay:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=cfg.decay, use_warmup=cfg.warmup, exclude_buffers=cfg.buffers == "copy")


@dataclass
class Loaders:
    """A cell's data loaders, and the samplers that are told the epoch."""

    train: DataLoader
    test: DataLoader
    train_order: EpochShuffle
    test_order: EpochSequence | None  # with persistent workers: their seeds follow the epoch

    def set_epoch(self, epoch: int) -> None:
        self.train_order.set_epoch(epoch)
        if self.test_order is not None:
            self.test_order.set_epoch(epoch)


def build_loaders(config: CellConfig, data: DatasetBundle, train_set: Any, generator: torch.Generator,
                  device: torch.device) -> Loaders:
    """The training loader (the epoch's order from :class:`EpochShuffle`, this process's shard)
    and the test loader (every process evaluates the whole test set: no collective can then wait
    on a shard's end). Workers, if any, persist across epochs and are reseeded at every epoch
    (:class:`WorkerSeeding`, the test set's too), so that a resumed cell draws what an
    uninterrupted one draws."""
    par = parallel.current()
    workers = config.num_workers
    persistent = workers > 0
    pin = device.type == "cuda"
    sampler = EpochShuffle(len(train_set), config.seed, par.rank, par.world_size, with_epoch=persistent)
    train_data = WorkerSeeding(train_set, process_seed(config.seed, par.rank)) if persistent else train_set
    train_loader = DataLoader(
        train_data, batch_size=config.batch_size // par.world_size, sampler=sampler, generator=generator,
        num_workers=workers, pin_memory=pin, persistent_workers=persistent,
    )
    test_sampler = EpochSequence(len(data.test)) if persistent else None
    test_data = WorkerSeeding(data.test, process_seed(config.seed, par.rank) + 1) if persistent else data.test
    test_loader = DataLoader(
        test_data, batch_size=config.eval_batch_size or config.batch_size, sampler=test_sampler, num_workers=workers,
        pin_memory=pin, persistent_workers=persistent,
    )
    return Loaders(train_loader, test_loader, sampler, test_sampler)
