"""A plugin of deliberately broken components: each breaks exactly one clause of its contract
(``BREAKERS`` names the clause), so that no clause of harness.testing's suites is a check that
cannot fail. tests/test_contract_breakers.py runs the suites on them."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from harness import DatasetNotFoundError, Range, hookimpl
from harness.data import DatasetBundle
from harness.snn import SequenceModule, SpikingSequential, run_sequence
from harness.training import BatchResult, predict
from snn_harness_plugins.normalizers import Eps, MembranePotentialBatchNorm, Momentum, TemporalEffectiveBatchNorm, VanillaBatchNorm
from snn_harness_plugins.thresholds import FixedThreshold, OnlineThresholdStabilizer, Theta
from snn_harness_plugins.trainers import BPTTTrainer

# ---------------------------------------------------------------------------------------------
# Normalizers
# ---------------------------------------------------------------------------------------------


class DropsChannelsOfVectors(VanillaBatchNorm):
    """Per-step BN that keeps only the first channel of a ``[B, C]`` input."""

    def forward_step(self, x: Tensor) -> Tensor:
        y = super().forward_step(x)
        return y[:, :1] if x.ndim == 2 else y

    def forward_sequence(self, x: Tensor) -> Tensor:
        y = super().forward_sequence(x)
        return y[..., :1] if x.ndim == 3 else y


class FoldedBatchNorm(nn.Module):
    """A plain module, as ``nn.BatchNorm2d``: registered for both step modes, but in sequence mode
    the harness folds the steps into the batch, so its statistics are over all steps at once."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight, self.bias = nn.Parameter(torch.ones(num_features)), nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, self.momentum, self.eps)


class ComputesSingleSteps(TemporalEffectiveBatchNorm):
    """Declares the sequence mode only, yet answers a single step (with its input)."""

    def forward_step(self, x: Tensor) -> Tensor:
        return x


class EvaluatesWithBatchStatistics(VanillaBatchNorm):
    """Per-step BN that normalizes test batches by their own statistics."""

    def _normalize(self, x: Tensor, channel_dim: int, stat_dims: tuple[int, ...]) -> Tensor:
        if self.training:
            return super()._normalize(x, channel_dim, stat_dims)
        mean = x.mean(stat_dims, keepdim=True)
        var = (x - mean).square().mean(stat_dims, keepdim=True)
        view = (-1, *[1] * (x.ndim - channel_dim - 1))
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight.view(view) + self.bias.view(view)


class CountsInAPlainAttribute(VanillaBatchNorm):
    """A cumulative average of the statistics whose count is a plain attribute, not a buffer."""

    def __init__(self, num_features: int, eps: Eps = 1e-5) -> None:
        super().__init__(num_features, eps)
        self._seen = 0

    def end_sequence(self) -> None:
        if self.training and self._sum_mean is not None:
            self.momentum = 1.0 / (self._seen + 1)
            self._seen += 1
        super().end_sequence()


class GainMadeOnTheCpu(VanillaBatchNorm):
    """A constant gain kept as a plain tensor attribute: ``.to()`` does not move it."""

    def __init__(self, num_features: int, eps: Eps = 1e-5) -> None:
        super().__init__(num_features, eps)
        self.gain = torch.full((num_features,), 1.5)

    def forward_step(self, x: Tensor) -> Tensor:
        return super().forward_step(x) * self.gain.view(-1, *[1] * (x.ndim - 2))

    def forward_sequence(self, x: Tensor) -> Tensor:
        return super().forward_sequence(x) * self.gain.view(-1, *[1] * (x.ndim - 3))


class NoEpsilon(VanillaBatchNorm):
    """Divides by the batch standard deviation with no epsilon."""

    def __init__(self, num_features: int, momentum: Momentum = 0.1) -> None:
        super().__init__(num_features, momentum=momentum)
        self.eps = 0.0


class DefaultOutsideItsRange(VanillaBatchNorm):
    """``eps`` defaults to a value its own constraint refuses."""

    def __init__(self, num_features: int, eps: Annotated[float, Range(0.0, 1e-3)] = 0.01) -> None:
        super().__init__(num_features, eps)


class LocalStatistics(SequenceModule):
    """Declares synchronized statistics but takes each process's own (plain ``F.batch_norm``)."""

    synchronized_statistics = True

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight, self.bias = nn.Parameter(torch.ones(num_features)), nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward_step(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, self.momentum, self.eps)


# ---------------------------------------------------------------------------------------------
# Threshold policies
# ---------------------------------------------------------------------------------------------


class ColumnThetaForVectors(FixedThreshold):
    """Gives a ``[C, 1]`` threshold for a ``[B, C]`` potential (it does not broadcast)."""

    def forward(self, u: Tensor, t: int) -> Tensor | float:
        if u.ndim == 2:
            return torch.full((u.shape[1], 1), self.theta, dtype=u.dtype, device=u.device)
        return self.theta


class ThetaWithGradient(FixedThreshold):
    """Not differentiable by declaration, but its threshold is computed from ``u`` with gradient."""

    def forward(self, u: Tensor, t: int) -> Tensor:
        return self.theta + 0.0 * u.mean()


class DriftsAcrossSequences(FixedThreshold):
    """Raises its threshold at every call and never resets it at a sequence's start."""

    def __init__(self, theta: Theta = 1.0) -> None:
        super().__init__(theta)
        self.register_buffer("calls", torch.tensor(0))

    def forward(self, u: Tensor, t: int) -> Tensor:
        self.calls += 1
        return torch.full((), self.theta, dtype=u.dtype, device=u.device) * (1 + 0.01 * self.calls)


class LevelInAPlainAttribute(FixedThreshold):
    """Learns a level in training, kept as a plain attribute (not in the state dict)."""

    def __init__(self, theta: Theta = 1.0) -> None:
        super().__init__(theta)
        self._level: Tensor | None = None
        self._last: Tensor | None = None

    def forward(self, u: Tensor, t: int) -> Tensor | float:
        if self.training:
            self._last = u.detach().mean()
            return self.theta
        level = 0.0 if self._level is None else self._level.to(u)
        return torch.full((), self.theta, dtype=u.dtype, device=u.device) + 0.1 * level

    def end_sequence(self) -> None:
        if self.training and self._last is not None:
            self._level = self._last if self._level is None else 0.5 * (self._level.to(self._last) + self._last)


class ScaleMadeOnTheCpu(FixedThreshold):
    """Multiplies by a plain float32 CPU tensor: its threshold stays there, whatever ``.to()``."""

    def __init__(self, theta: Theta = 1.0) -> None:
        super().__init__(theta)
        self.scale = torch.ones(1)

    def forward(self, u: Tensor, t: int) -> Tensor:
        return self.theta * self.scale


class NoMinimumSpread(OnlineThresholdStabilizer):
    """OTS dividing by the potential's spread with no floor."""

    def __init__(self, theta: Theta = 1.0) -> None:
        super().__init__(theta=theta, min_std=0.0)


class SingleStepPolicy(FixedThreshold):
    """Declares the single-step mode only (registered for both)."""

    step_modes = frozenset({"single"})


def kwargs_threshold(**options):
    """A fixed threshold whose options are hidden behind ``**options``."""
    return FixedThreshold(**options)


# ---------------------------------------------------------------------------------------------
# Trainers
# ---------------------------------------------------------------------------------------------


class _Bptt(BPTTTrainer):
    def _loss(self, model: nn.Module, inputs: Tensor, target: Tensor, loss_fn, optimizer) -> tuple[Tensor, Tensor]:
        model.train()
        logits = run_sequence(model, inputs, "sequence")
        loss = loss_fn(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss, logits


class KeepsTheGraph(_Bptt):
    """Returns the loss with its graph."""

    def train_batch(self, model, inputs, target, loss_fn, optimizer):
        loss, logits = self._loss(model, inputs, target, loss_fn, optimizer)
        optimizer.step()
        return BatchResult(loss, (predict(logits.detach()) == target).sum(), target.shape[0])


class DropsAGradient(_Bptt):
    """Throws away the first parameter's gradient before the step."""

    def train_batch(self, model, inputs, target, loss_fn, optimizer):
        loss, logits = self._loss(model, inputs, target, loss_fn, optimizer)
        next(model.parameters()).grad = None
        optimizer.step()
        return BatchResult(loss.detach(), (predict(logits.detach()) == target).sum(), target.shape[0])


class EvaluatesInTrainingMode(BPTTTrainer):
    """Evaluates with the model in training mode (its running statistics move)."""

    @torch.no_grad()
    def eval_batch(self, model, inputs, target, loss_fn):
        model.train()
        logits = run_sequence(model, inputs, "sequence")
        return BatchResult(loss_fn(logits, target), (predict(logits) == target).sum(), target.shape[0])


class EvaluatesOneStepAtATime(BPTTTrainer):
    """Declares the sequence mode, but evaluates one step at a time."""

    @torch.no_grad()
    def eval_batch(self, model, inputs, target, loss_fn):
        model.eval()
        logits = run_sequence(model, inputs, "single")
        return BatchResult(loss_fn(logits, target), (predict(logits) == target).sum(), target.shape[0])


class UnseededNoise(BPTTTrainer):
    """Perturbs its inputs with noise that no seed fixes."""

    def train_batch(self, model, inputs, target, loss_fn, optimizer):
        noisy = inputs * (1 + 1e-2 * random.SystemRandom().random())
        return super().train_batch(model, noisy, target, loss_fn, optimizer)


def kwargs_trainer(**options):
    """BPTT with its options hidden behind ``**options``."""
    return BPTTTrainer(**options)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def _mlp(in_channels, input_size, layers, outputs, *extra):
    features = in_channels * input_size[0] * input_size[1]
    return SpikingSequential(nn.Flatten(), nn.Linear(features, 8), layers.normalizer(8), layers.neuron(),
                             nn.Linear(8, outputs), *extra)


def one_class_too_many(in_channels: int, num_classes: int, input_size: tuple[int, int], layers):
    """An MLP with ``num_classes + 1`` outputs."""
    return _mlp(in_channels, input_size, layers, num_classes + 1)


def spare_parameter(in_channels: int, num_classes: int, input_size: tuple[int, int], layers):
    """An MLP holding a parameter that no layer uses."""
    model = _mlp(in_channels, input_size, layers, num_classes)
    model.register_parameter("spare", nn.Parameter(torch.zeros(3)))
    return model


class _ReversedInSequence(SequenceModule):
    def forward_step(self, x: Tensor) -> Tensor:
        return x

    def forward_sequence(self, x: Tensor) -> Tensor:
        return x.flip(0)


def reversed_in_sequence(in_channels: int, num_classes: int, input_size: tuple[int, int], layers):
    """An MLP whose last layer reverses time in sequence mode only."""
    return _mlp(in_channels, input_size, layers, num_classes, _ReversedInSequence())


def stale_docstring(in_channels: int, num_classes: int, input_size: tuple[int, int], layers):
    """An MLP.

    :param width: the hidden width (an option it no longer has).
    """
    return _mlp(in_channels, input_size, layers, num_classes)


# ---------------------------------------------------------------------------------------------
# Data sets: a tiny tensor file, root/tiny.pt
# ---------------------------------------------------------------------------------------------


def write_tiny(root: Path, size: tuple[int, int] = (8, 8)) -> None:
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    torch.save({"x": torch.rand((6, 1, *size), generator=g), "y": torch.arange(6) % 3}, root / "tiny.pt")


def _tiny(root: str, declared: tuple[int, int] = (8, 8), extra_files: tuple[str, ...] = (), check: bool = True) -> DatasetBundle:
    path = Path(root) / "tiny.pt"
    if check and not path.exists():
        raise DatasetNotFoundError(f"tiny data set not found: expected {path} (write it with write_tiny)")
    data = torch.load(path)
    split = TensorDataset(data["x"], data["y"])
    return DatasetBundle(split, split, 1, 3, declared, files=(path, *(Path(root) / f for f in extra_files)))


def opens_blindly(root: str = "data"):
    """Opens its file without checking it is there (a bare FileNotFoundError)."""
    return _tiny(root, check=False)


def declares_another_size(root: str = "data"):
    """Declares 9x9 images; its samples are 8x8."""
    return _tiny(root, declared=(9, 9))


def lists_a_file_it_lacks(root: str = "data"):
    """Lists a labels file that it neither reads nor has."""
    return _tiny(root, extra_files=("labels.csv",))


def default_outside_its_range(root: str = "data", fraction: Annotated[float, Range(0.0, 1.0)] = 2.0):
    """A fraction option whose default its own range refuses."""
    return _tiny(root)


# ---------------------------------------------------------------------------------------------
# Registration, and the clause each breaks
# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------
# Membrane normalizations
# ---------------------------------------------------------------------------------------------


class NotAMembraneNorm(nn.Module):
    """MPBN's arithmetic in a plain module: the neuron would call it, but it is no MembraneNorm."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(num_features)), nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, u: Tensor, t: int) -> Tensor:
        return F.batch_norm(u, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, 1e-5)


class MembraneDropsChannelsOfVectors(MembranePotentialBatchNorm):
    """Keeps only the first channel of a ``[B, C]`` potential."""

    def forward(self, u: Tensor, t: int) -> Tensor:
        n = super().forward(u, t)
        return n[:, :1] if u.ndim == 2 else n


class DetachedMembrane(MembranePotentialBatchNorm):
    """Gives the normalized potential without its graph: the neuron's gradient stops there."""

    def forward(self, u: Tensor, t: int) -> Tensor:
        return super().forward(u, t).detach()


class CountsInEvaluation(MembranePotentialBatchNorm):
    """Counts evaluation steps in its ``num_batches_tracked`` buffer (the output is unchanged)."""

    def forward(self, u: Tensor, t: int) -> Tensor:
        if not self.training:
            with torch.no_grad():
                self.num_batches_tracked += 1
        return super().forward(u, t)


class MembraneEvaluatesWithBatchStatistics(MembranePotentialBatchNorm):
    """Normalizes test potentials by their own batch statistics (updating no running statistic)."""

    def forward(self, u: Tensor, t: int) -> Tensor:
        if self.training:
            return super().forward(u, t)
        return F.batch_norm(u, None, None, self.weight, self.bias, True, 0.0, self.eps)


class MembraneCountsInAPlainAttribute(MembranePotentialBatchNorm):
    """A gain that grows with the training steps seen, counted in a plain attribute, not a buffer."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self._seen = 0

    def forward(self, u: Tensor, t: int) -> Tensor:
        if self.training:
            self._seen += 1
        return super().forward(u, t) * (1.0 + 0.1 * min(self._seen, 5))


class MembraneGainMadeOnTheCpu(MembranePotentialBatchNorm):
    """A per-channel gain made on the CPU at every call, whatever the module's device."""

    def forward(self, u: Tensor, t: int) -> Tensor:
        gain = torch.ones(self.num_features).view(1, -1, *[1] * (u.ndim - 2))
        return super().forward(u, t) * gain


class MembraneNoEpsilon(MembranePotentialBatchNorm):
    """Divides training potentials by their bare standard deviation: a constant one gives 0 / 0."""

    def forward(self, u: Tensor, t: int) -> Tensor:
        n = super().forward(u, t)
        if not self.training:
            return n
        dims = [d for d in range(u.ndim) if d != 1]
        centred = u - u.mean(dims, keepdim=True)
        view = (1, -1, *[1] * (u.ndim - 2))
        return centred / centred.square().mean(dims, keepdim=True).sqrt() * self.weight.view(view) + self.bias.view(view)


class SingleStepMembraneNorm(MembranePotentialBatchNorm):
    """Declares the single-step mode only, though registered for both."""

    step_modes = frozenset({"single"})


def kwargs_membrane_norm(num_features: int, **options):
    """Options the matrix cannot check."""
    return MembranePotentialBatchNorm(num_features)


BREAKERS: dict[str, dict[str, tuple[object, str]]] = {
    "normalizer": {
        "broken_vector_shape": (DropsChannelsOfVectors, "test_shapes_in_every_declared_step_mode[vector]"),
        "broken_folded_bn": (FoldedBatchNorm, "test_step_modes_agree"),
        "broken_single_step": (ComputesSingleSteps, "test_declared_step_modes_are_honoured"),
        "broken_eval_batch": (EvaluatesWithBatchStatistics, "test_evaluation_does_not_depend_on_the_batch"),
        "broken_plain_state": (CountsInAPlainAttribute, "test_state_dict_round_trip"),
        "broken_cpu_gain": (GainMadeOnTheCpu, "test_to_another_dtype_and_device"),
        "broken_no_eps": (NoEpsilon, "test_constant_input_gives_finite_output"),
        "broken_norm_default": (DefaultOutsideItsRange, "test_options_match_the_signature"),
        "broken_local_stats": (LocalStatistics, "test_synchronized_statistics"),
    },
    "threshold": {
        "broken_column_theta": (ColumnThetaForVectors, "test_theta_broadcasts_and_is_finite[vector]"),
        "broken_theta_grad": (ThetaWithGradient, "test_no_gradient_unless_declared_differentiable"),
        "broken_drift": (DriftsAcrossSequences, "test_every_sequence_starts_afresh"),
        "broken_plain_level": (LevelInAPlainAttribute, "test_state_dict_round_trip"),
        "broken_cpu_scale": (ScaleMadeOnTheCpu, "test_to_another_dtype_and_device"),
        "broken_zero_spread": (NoMinimumSpread, "test_constant_potential_gives_finite_thresholds"),
        "broken_threshold_modes": (SingleStepPolicy, "test_declared_step_modes_are_honoured"),
        "broken_threshold_kwargs": (kwargs_threshold, "test_options_match_the_signature"),
    },
    "membrane_norm": {
        "broken_not_membrane_norm": (NotAMembraneNorm, "test_builds_a_membrane_norm_with_a_known_carry"),
        "broken_membrane_vector": (MembraneDropsChannelsOfVectors, "test_output_has_the_potential_s_shape_dtype_and_is_finite[vector]"),
        "broken_membrane_detached": (DetachedMembrane, "test_gradient_reaches_the_potential_and_the_parameters"),
        "broken_membrane_eval_count": (CountsInEvaluation, "test_evaluation_changes_no_state"),
        "broken_membrane_eval_batch": (MembraneEvaluatesWithBatchStatistics, "test_evaluation_does_not_depend_on_the_batch"),
        "broken_membrane_plain_state": (MembraneCountsInAPlainAttribute, "test_state_dict_round_trip"),
        "broken_membrane_cpu_gain": (MembraneGainMadeOnTheCpu, "test_to_another_dtype_and_device"),
        "broken_membrane_no_eps": (MembraneNoEpsilon, "test_constant_potential_gives_finite_output"),
        "broken_membrane_modes": (SingleStepMembraneNorm, "test_declared_step_modes_are_honoured_in_a_lif_neuron"),
        "broken_membrane_kwargs": (kwargs_membrane_norm, "test_options_match_the_signature"),
    },
    "trainer": {
        "broken_graph": (KeepsTheGraph, "test_train_batch_result"),
        "broken_dropped_grad": (DropsAGradient, "test_every_parameter_gets_a_gradient"),
        "broken_eval_train_mode": (EvaluatesInTrainingMode, "test_eval_batch_changes_nothing"),
        "broken_eval_mode": (EvaluatesOneStepAtATime, "test_runs_the_declared_step_mode"),
        "broken_unseeded": (UnseededNoise, "test_training_is_reproducible"),
        "broken_trainer_kwargs": (kwargs_trainer, "test_options_match_the_signature"),
    },
    "model": {
        "broken_outputs": (one_class_too_many, "test_output_shapes_in_every_step_mode"),
        "broken_spare": (spare_parameter, "test_every_parameter_gets_a_gradient"),
        "broken_reversed": (reversed_in_sequence, "test_step_modes_agree"),
        "broken_model_doc": (stale_docstring, "test_options_match_the_signature"),
    },
    "dataset": {
        "broken_bare_error": (opens_blindly, "test_missing_files_raise_the_documented_error"),
        "broken_size": (declares_another_size, "test_samples_have_the_declared_shape"),
        "broken_files": (lists_a_file_it_lacks, "test_listed_files_exist"),
        "broken_data_default": (default_outside_its_range, "test_options_match_the_signature"),
    },
}

STEP_MODES = {"broken_threshold_modes": ("single", "sequence"), "broken_trainer_kwargs": ("sequence",),
              "broken_membrane_modes": ("single", "sequence")}


def _present(self, tmp_path: Path) -> dict:
    write_tiny(tmp_path)
    return {"root": str(tmp_path)}


SETTINGS = {
    **{name: {"present": _present} for name in BREAKERS["dataset"]},
    **{name: {"trainers": ("bptt", "online")} for name in BREAKERS["model"]},  # not the broken ones
}


def _registers(kind: str):
    """The ``register_*`` hook of one kind: every breaker of the kind, with its step modes."""

    @hookimpl
    def register(registry) -> None:
        for name, (factory, _) in BREAKERS[kind].items():
            registry.add(name, factory, step_modes=STEP_MODES.get(name))

    return register


register_normalizers = _registers("normalizer")
register_thresholds = _registers("threshold")
register_membrane_norms = _registers("membrane_norm")
register_trainers = _registers("trainer")
register_models = _registers("model")
register_datasets = _registers("dataset")
