"""The resolved configuration of one matrix cell: frozen, picklable dataclasses (no torch).

A :class:`CellConfig` holds every value that can change a result; its flattened form
(:func:`flatten`) gives the MLflow parameter names (``normalizer.name``, ``optimizer.lr``, ...)
and its hash the cell id.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from harness.validate import Range

COMPONENT_KINDS = ("dataset", "model", "normalizer", "threshold", "membrane_norm", "trainer", "loss")


@dataclass(frozen=True)
class Component:
    """A plugin chosen by name, with its fully resolved options (factory defaults included)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    # options the plugin marks ``AddedLater``, with the value the cells before them ran with
    # (:func:`cell_id` leaves an option out while it has that value)
    later: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NeuronConfig:
    """LIF neuron (docs/method.md section 1; defaults are the official code's)."""

    tau: Annotated[float, Range(1.0)] = 2.0  # membrane time constant: decay = 1 - 1/tau (in [0, 1) for tau >= 1)
    reset: Literal["soft", "hard"] = "soft"  # soft: u -= s*theta (official code); hard: u = 0 (Eq. 4)
    surrogate_alpha: Annotated[float, Range(0.0, low_open=True)] = 4.0  # sigmoid surrogate steepness
    detach_reset: bool = True  # reset kept out of the graph (official code)


OPTIMIZERS = ("sgd", "adam", "adamw", "nadam", "nadamw", "radam", "lamb", "lars", "lion", "rmsprop", "adabelief", "adamp",
              "sgdp", "adopt", "laprop", "madgrad")
"""The optimizers a cell may name: timm's optimizer factory builds each under this name
(``sgd`` is torch's SGD with ``momentum``, and Nesterov momentum only with ``nesterov = true``)."""

SCHEDULES = ("cosine", "constant", "step", "multistep", "tanh", "poly", "plateau")
"""The learning-rate schedules a cell may name: timm's scheduler factory builds each."""


@dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer, by timm's name (:data:`OPTIMIZERS`), built by ``timm.optim.create_optimizer_v2``."""

    name: Literal[OPTIMIZERS] = "sgd"  # type: ignore[valid-type]
    lr: Annotated[float, Range(0.0, low_open=True)] = 0.1
    momentum: Annotated[float, Range(0.0, 1.0, high_open=True)] = 0.9  # optimizers with momentum (sgd, lars, rmsprop, sgdp)
    weight_decay: Annotated[float, Range(0.0)] = 5e-4
    nesterov: bool = False  # sgd only
    betas: Annotated[tuple[float, float], Range(0.0, 1.0, high_open=True)] = (0.9, 0.999)  # every optimizer with two betas gets these (lion too)
    eps: Annotated[float, Range(0.0, low_open=True)] | None = None  # optimizers with an epsilon; None: the optimizer's default
    filter_bias_and_bn: bool = False  # true: no weight decay on biases and normalizer parameters (every 1-D parameter)


@dataclass(frozen=True)
class ScheduleConfig:
    """The learning-rate schedule, by timm's name (:data:`SCHEDULES`), built by
    ``timm.scheduler.create_scheduler_v2`` over the cell's epochs (warm-up included)."""

    name: Literal[SCHEDULES] = "cosine"  # type: ignore[valid-type]  # cosine: annealed to min_lr over all epochs
    min_lr: Annotated[float, Range(0.0)] = 0.0  # cosine, tanh, poly: the final learning rate
    step_size: Annotated[int, Range(1)] = 30  # step: epochs between decays
    gamma: Annotated[float, Range(0.0, low_open=True)] = 0.1  # step, multistep, plateau: decay factor; poly: the power
    milestones: Annotated[tuple[int, ...], Range(1)] = (30, 60)  # multistep: the epochs (from 1) that start at a decayed rate
    patience: Annotated[int, Range(0)] = 10  # plateau: epochs without a better test top-1 before a decay
    warmup_epochs: Annotated[int, Range(0)] = 0  # linear warm-up from warmup_lr, within the epochs
    warmup_lr: Annotated[float, Range(0.0)] = 1e-5  # the learning rate the warm-up starts from
    per_iteration: bool = False  # true: the schedule advances at every optimizer step, not once per epoch


@dataclass(frozen=True)
class EmaConfig:
    """An exponential moving average of the model (timm's ``ModelEmaV3``), updated after every
    training batch (``ema = decay * ema + (1 - decay) * model``, the first update a copy) and
    evaluated beside the model at every epoch (``ema_test_*`` metrics)."""

    decay: Annotated[float, Range(0.0, 1.0, high_open=True)] = 0.0  # 0: no EMA; e.g. 0.999
    warmup: bool = False  # timm's warm-up: decay 1 - (1 + k)^(-2/3) at update k, capped at `decay`
    buffers: Literal["average", "copy"] = "average"  # running statistics and OTS thresholds: averaged like the weights, or the model's copied


@dataclass(frozen=True)
class MixupConfig:
    """Mixup and CutMix of the training batches (timm's ``Mixup``; :mod:`harness.mixing`), with
    soft targets for the loss. Off while both alphas are 0."""

    mixup_alpha: Annotated[float, Range(0.0)] = 0.0  # mixing factor ~ Beta(alpha, alpha); 0: no mixup
    cutmix_alpha: Annotated[float, Range(0.0)] = 0.0  # CutMix box area ~ Beta(alpha, alpha); 0: no CutMix
    prob: Annotated[float, Range(0.0, 1.0)] = 1.0  # share of batches (or pairs, elements) mixed
    switch_prob: Annotated[float, Range(0.0, 1.0)] = 0.5  # with both alphas: the share that is CutMix
    mode: Literal["batch", "pair", "elem"] = "batch"  # one draw per batch, per pair of samples, per sample
    label_smoothing: Annotated[float, Range(0.0, 1.0, high_open=True)] = 0.0  # timm's default is 0.1


@dataclass(frozen=True)
class CellConfig:
    """Everything one cell needs. Required fields have no default."""

    dataset: Component
    model: Component
    normalizer: Component
    trainer: Component
    epochs: int
    batch_size: int
    time_steps: int
    threshold: Component = Component("fixed")
    membrane_norm: Component = Component("none")  # a normalization inside the neuron step (MPBN); none: the plain LIF
    loss: Component = Component("tet")
    seed: int = 0
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", "mps"; under torchrun: each process's own GPU
    precision: Literal["float32", "bfloat16", "float16"] = "float32"  # 16-bit: trainer steps under torch.autocast (statistics stay float32); float16: CUDA only, with loss scaling
    deterministic: bool = False  # GPU: deterministic algorithms, no TF32, no cuDNN autotuner (bit-identical reruns, slower)
    cudnn_benchmark: bool = True  # GPU: let cuDNN pick the fastest convolution algorithms (off when deterministic)
    compile: bool = False  # run the model under torch.compile (other floating-point order: part of the cell id when true)
    train_subset: int | None = None  # train on this many samples (a fixed random subset); test set always whole
    eval_batch_size: int | None = None  # defaults to batch_size
    num_workers: int = 0  # DataLoader workers
    max_train_batches: int | None = None  # stop each training epoch after this many batches (memory/speed cells)
    max_eval_batches: int | None = None  # evaluate on this many test batches only
    # What is measured, not what is trained: these three do not enter the cell id.
    meters: tuple[Literal["firing_rate", "memory", "synops"], ...] = ("firing_rate", "memory", "synops")
    membrane_histograms: bool = False  # after training: histograms of u[t] per layer and step (Fig. 3)
    synops_epochs: Literal["last", "every"] = "last"  # SynOps at the last epoch's evaluation only, or at every one
    optimizer: OptimizerConfig = OptimizerConfig()
    lr_schedule: ScheduleConfig = ScheduleConfig()
    neuron: NeuronConfig = NeuronConfig()
    ema: EmaConfig = EmaConfig()
    mixup: MixupConfig = MixupConfig()


# Keys of [defaults] that are not CellConfig fields as such: component names are strings there.
SCALAR_KEYS = tuple(f.name for f in dataclasses.fields(CellConfig) if f.name not in COMPONENT_KINDS)


def plugin_components(config: CellConfig) -> list[tuple[str, str]]:
    """``(kind, name)`` of every plugin the cell uses: its components, less ``membrane_norm =
    "none"`` (the plain LIF, which needs no plugin)."""
    return [(kind, getattr(config, kind).name) for kind in COMPONENT_KINDS
            if not (kind == "membrane_norm" and config.membrane_norm.name == "none")]


def flatten(config: CellConfig) -> dict[str, Any]:
    """Dotted names -> values: ``normalizer.name``, ``normalizer.momentum``, ``optimizer.lr``, ``seed``."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, Component):
            out[f"{f.name}.name"] = value.name
            for k in sorted(value.options):
                out[f"{f.name}.{k}"] = value.options[k]
        elif dataclasses.is_dataclass(value):
            for sub in dataclasses.fields(value):
                out[f"{f.name}.{sub.name}"] = getattr(value, sub.name)
        else:
            out[f.name] = value
    return out


# Keys that choose what is observed, not what is trained: the same cell with other meters is
# the same cell.
OBSERVATION_KEYS = ("meters", "membrane_histograms", "synops_epochs")


# Settings added after cell ids were first published, with the value every earlier cell ran
# with: hashed only when set to something else, so that adding a setting leaves the ids of the
# cells that do not use it (and so their finished runs and checkpoints) as they were.
LATER_KEYS: dict[str, Any] = {
    "precision": "float32", "deterministic": False, "cudnn_benchmark": True, "compile": False,
    "optimizer.eps": None, "optimizer.filter_bias_and_bn": False,
    "lr_schedule.milestones": (30, 60), "lr_schedule.patience": 10, "lr_schedule.warmup_epochs": 0,
    "lr_schedule.warmup_lr": 1e-5, "lr_schedule.per_iteration": False,
    "ema.decay": 0.0, "ema.warmup": False, "ema.buffers": "average",
    "mixup.mixup_alpha": 0.0, "mixup.cutmix_alpha": 0.0, "mixup.prob": 1.0, "mixup.switch_prob": 0.5, "mixup.mode": "batch",
    "mixup.label_smoothing": 0.0, "membrane_norm.name": "none",
}  # fmt: skip


def _later(config: CellConfig) -> dict[str, Any]:
    """:data:`LATER_KEYS` and the components' ``AddedLater`` options, as dotted names -> original values."""
    later = dict(LATER_KEYS)
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, Component):
            later.update((f"{f.name}.{k}", v) for k, v in value.later.items())
    return later


def _hashed(config: CellConfig, leave_out: tuple[str, ...] = ()) -> str:
    later = _later(config)
    flat = {
        k: v for k, v in flatten(config).items()
        if k not in OBSERVATION_KEYS and k not in leave_out and not (k in later and _same(v, later[k]))
    }
    text = json.dumps(flat, sort_keys=True, default=repr, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _same(value: Any, original: Any) -> bool:
    """``value == original`` of the same kind (``True`` is not ``1``, a list is its tuple; text is
    not read as a number, unlike ``validate.same_value``, which matches typed values against text)."""
    if isinstance(value, (list, tuple)) and isinstance(original, (list, tuple)):
        return len(value) == len(original) and all(_same(v, o) for v, o in zip(value, original))
    return (isinstance(value, bool) == isinstance(original, bool)) and value == original


def cell_id(config: CellConfig) -> str:
    """A stable id: the first 12 hex digits of the SHA-256 of the resolved config (without
    :data:`OBSERVATION_KEYS`, and without :data:`LATER_KEYS` or a plugin's ``AddedLater``
    options at their original values)."""
    return _hashed(config)


def config_id(config: CellConfig) -> str:
    """The id of the cell's configuration without its seed: the seeds of one configuration share
    it, and the comparison over seeds groups by it (never by labels, which a changed matrix can
    reuse for other settings)."""
    return _hashed(config, ("seed",))


def to_dict(config: CellConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(data: dict[str, Any]) -> CellConfig:
    """Inverse of :func:`to_dict` (for executors that ship configs as plain data)."""
    kwargs = dict(data)
    for kind in COMPONENT_KINDS:
        kwargs[kind] = Component(**data[kind])
    kwargs["optimizer"] = OptimizerConfig(**{**data["optimizer"], "betas": tuple(data["optimizer"]["betas"])})
    kwargs["lr_schedule"] = ScheduleConfig(**{**data["lr_schedule"], "milestones": tuple(data["lr_schedule"].get("milestones", (30, 60)))})
    kwargs["neuron"] = NeuronConfig(**data["neuron"])
    kwargs["ema"] = EmaConfig(**data.get("ema", {}))
    kwargs["mixup"] = MixupConfig(**data.get("mixup", {}))
    if "meters" in data:
        kwargs["meters"] = tuple(data["meters"])
    return CellConfig(**kwargs)
