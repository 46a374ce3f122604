"""The model and trainer contracts: a model registered through ``register_models`` and a trainer
registered through ``register_trainers``, each run with the other kind's built-ins.

Subclass :class:`ModelContract` (``name = "my_model"``) or :class:`TrainerContract`
(``name = "my_trainer"``).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor, nn

from harness.contracts._common import Contract, assert_close, assert_finite
from harness.registry import ComponentInfo, Registry
from harness.snn import (
    LayerFactory,
    LIFNeuron,
    SequenceModule,
    SpikingSequential,
    begin_sequence,
    end_sequence,
    run_sequence,
    set_step_mode,
    step_modes_of,
)


class RecordingSGD(torch.optim.SGD):
    """SGD that notes, at every ``step()``, which parameters have a gradient (and whether it is finite)."""

    def __init__(self, params: Any, lr: float = 0.05) -> None:
        super().__init__(params, lr=lr)
        self.steps = 0
        self.got_gradient: set[int] = set()
        self.non_finite: set[int] = set()

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        self.steps += 1
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.got_gradient.add(id(p))
                    if not torch.isfinite(p.grad).all():
                        self.non_finite.add(id(p))
        return super().step(closure)


def layers_of(registry: Registry, normalizer: str = "vanilla_bn", threshold: str = "fixed",
              threshold_options: dict[str, Any] | None = None) -> LayerFactory:
    """A :class:`harness.snn.LayerFactory` with built-in components (``vanilla_bn`` runs in both step modes)."""
    opts = {"theta": 0.5} if threshold_options is None and threshold == "fixed" else (threshold_options or {})
    return LayerFactory(normalizer=lambda c: registry.normalizers[normalizer](num_features=c),
                        neuron=lambda: LIFNeuron(registry.thresholds[threshold](**opts)))


class _ModeSpy(SequenceModule):
    """The identity, noting the step mode it is run in."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bool, str]] = []

    def forward_step(self, x: Tensor) -> Tensor:
        self.seen.append((self.training, "single"))
        return x

    def forward_sequence(self, x: Tensor) -> Tensor:
        self.seen.append((self.training, "sequence"))
        return x


def tiny_network(registry: Registry, in_features: int, num_classes: int, hidden: int = 8) -> SpikingSequential:
    """``flatten -> linear -> vanilla_bn -> LIF -> linear``, with a spy of the step mode first."""
    layers = layers_of(registry)
    return SpikingSequential(_ModeSpy(), nn.Flatten(), nn.Linear(in_features, hidden), layers.normalizer(hidden),
                             layers.neuron(), nn.Linear(hidden, num_classes))


def _batch(time_steps: int, batch: int, in_channels: int, size: tuple[int, int], num_classes: int,
           seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(3000 + seed)
    x = torch.rand((time_steps, batch, in_channels, *size), generator=g) * 2
    return x, torch.arange(batch) % num_classes


def _trainers_for(registry: Registry, modes: frozenset[str]) -> list[str]:
    return [n for n in registry.names("trainer") if registry.trainers.info(n).step_modes <= modes]


class ModelContract(Contract):
    """The clauses every model must pass, built with ``vanilla_bn`` and a fixed threshold for
    ``in_channels`` x ``input_size`` inputs and ``num_classes`` classes. Set ``name``, and
    ``options`` that keep it small."""

    kind = "model"
    in_channels: ClassVar[int] = 2
    num_classes: ClassVar[int] = 3
    input_size: ClassVar[tuple[int, int]] = (8, 8)
    time_steps: ClassVar[int] = 2
    batch: ClassVar[int] = 3
    trainers: ClassVar[tuple[str, ...] | None] = None  # the trainers to train it with; None: every registered one it fits

    def build(self, registry: Registry, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return registry.models.info(self.name).factory(in_channels=self.in_channels, num_classes=self.num_classes,
                                                       input_size=self.input_size, layers=layers_of(registry), **self.options)

    def inputs(self, seed: int = 0) -> tuple[Tensor, Tensor]:
        return _batch(self.time_steps, self.batch, self.in_channels, self.input_size, self.num_classes, seed)

    def test_output_shapes_in_every_step_mode(self, contract_registry: Registry) -> None:
        """The whole sequence gives ``[T, B, classes]``, one step ``[B, classes]``, finite, in every
        step mode the model's modules support."""
        model = self.build(contract_registry)
        modes = sorted(step_modes_of(model))
        assert modes, f"{self.name}: its modules have no step mode in common"
        x, _ = self.inputs()
        expected = (self.time_steps, self.batch, self.num_classes)
        for mode in modes:
            out = run_sequence(model.train(), x, mode)
            assert tuple(out.shape) == expected, f"{self.name} ({mode} mode): output {tuple(out.shape)}, expected {expected}"
            assert_finite(out, f"{self.name} ({mode} mode), output")
        if "single" in modes:
            set_step_mode(model, "single")
            begin_sequence(model, self.time_steps)
            with torch.no_grad():
                step = model.eval()(x[0])
            end_sequence(model)
            assert tuple(step.shape) == expected[1:], f"{self.name}: one step gives {tuple(step.shape)}, expected {expected[1:]}"

    def test_step_modes_agree(self, contract_registry: Registry) -> None:
        """A model whose modules support both modes computes the same outputs in both (evaluation)."""
        model = self.build(contract_registry)
        if step_modes_of(model) != {"single", "sequence"}:
            pytest.skip(f"{self.name} runs in {sorted(step_modes_of(model))} only")
        x, _ = self.inputs(seed=1)
        with torch.no_grad():
            model.eval()
            assert_close(run_sequence(model, x, "single"), run_sequence(model, x, "sequence"),
                         f"{self.name}: evaluation one step at a time against the whole sequence", self.rtol, self.atol)

    def test_every_parameter_gets_a_gradient(self, contract_registry: Registry) -> None:
        """Under every registered trainer whose step mode the model supports, every parameter that
        requires gradient has a finite gradient at the optimizer's step (none is left out of the graph)."""
        modes = step_modes_of(self.build(contract_registry))
        trainers = [n for n in _trainers_for(contract_registry, modes) if self.trainers is None or n in self.trainers]
        assert trainers, f"{self.name}: no registered trainer runs a model with step modes {sorted(modes)}"
        for trainer_name in trainers:
            model = self.build(contract_registry)
            names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
            optimizer = RecordingSGD(model.parameters())
            trainer = contract_registry.trainers[trainer_name]()
            x, y = self.inputs()
            trainer.train_batch(model, x, y, contract_registry.losses["tet"](), optimizer)
            missing = sorted(names[i] for i in names.keys() - optimizer.got_gradient)
            assert not missing, f"{self.name} under trainer {trainer_name!r}: no gradient for {', '.join(missing)}"
            bad = sorted(names[i] for i in optimizer.non_finite & names.keys())
            assert not bad, f"{self.name} under trainer {trainer_name!r}: non-finite gradient of {', '.join(bad)}"


class TrainerContract(Contract):
    """The clauses every trainer must pass, on a tiny network of built-ins
    (:func:`tiny_network`). Set ``name``; optionally ``options``."""

    kind = "trainer"
    time_steps: ClassVar[int] = 3
    batch: ClassVar[int] = 6
    num_classes: ClassVar[int] = 3

    def build(self, registry: Registry) -> Any:
        return registry.trainers.info(self.name).factory(**self.options)

    def network(self, registry: Registry, seed: int = 0) -> SpikingSequential:
        torch.manual_seed(seed)
        return tiny_network(registry, 2 * 2 * 2, self.num_classes)

    def inputs(self, seed: int = 0) -> tuple[Tensor, Tensor]:
        return _batch(self.time_steps, self.batch, 2, (2, 2), self.num_classes, seed)

    def test_train_batch_result(self, contract_registry: Registry) -> None:
        """``train_batch`` returns the batch's mean loss (a finite, detached scalar), the number of
        correct predictions (0..B) and the sample count B, and steps the optimizer."""
        trainer, model = self.build(contract_registry), self.network(contract_registry)
        before = copy.deepcopy(model.state_dict())
        x, y = self.inputs()
        result = trainer.train_batch(model, x, y, contract_registry.losses["tet"](), RecordingSGD(model.parameters()))
        assert isinstance(result.loss, Tensor) and result.loss.ndim == 0, f"{self.name}: loss {result.loss!r} is not a scalar tensor"
        assert not result.loss.requires_grad, f"{self.name}: the loss it returns keeps its graph (detach it)"
        assert_finite(result.loss, f"{self.name}: loss")
        assert 0 <= int(result.correct) <= self.batch, f"{self.name}: {int(result.correct)} correct of {self.batch}"
        assert result.count == self.batch, f"{self.name}: count {result.count}, the batch has {self.batch}"
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        assert any(k in changed for k, _ in model.named_parameters()), f"{self.name}: no parameter changed: the optimizer did not step"

    def test_every_parameter_gets_a_gradient(self, contract_registry: Registry) -> None:
        """Every parameter has a finite gradient when the optimizer steps."""
        trainer, model = self.build(contract_registry), self.network(contract_registry)
        names = {id(p): n for n, p in model.named_parameters()}
        optimizer = RecordingSGD(model.parameters())
        trainer.train_batch(model, *self.inputs(), contract_registry.losses["tet"](), optimizer)
        assert optimizer.steps > 0, f"{self.name}: the optimizer was not stepped"
        missing = sorted(names[i] for i in names.keys() - optimizer.got_gradient)
        assert not missing, f"{self.name}: no gradient for {', '.join(missing)} at the optimizer step"
        bad = sorted(names[i] for i in optimizer.non_finite)
        assert not bad, f"{self.name}: non-finite gradient of {', '.join(bad)}"

    def test_eval_batch_changes_nothing(self, contract_registry: Registry) -> None:
        """``eval_batch`` evaluates (the model in evaluation mode, no gradient): parameters and
        buffers (running statistics) are unchanged, and it gives the same result twice."""
        trainer, model = self.build(contract_registry), self.network(contract_registry)
        loss_fn = contract_registry.losses["tet"]()
        trainer.train_batch(model, *self.inputs(), loss_fn, RecordingSGD(model.parameters()))
        before = copy.deepcopy(model.state_dict())
        x, y = self.inputs(seed=1)
        first, second = trainer.eval_batch(model, x, y, loss_fn), trainer.eval_batch(model, x, y, loss_fn)
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        assert not changed, f"{self.name}: eval_batch changed {', '.join(changed)}"
        assert not first.loss.requires_grad, f"{self.name}: eval_batch recorded a graph"
        assert_close(second.loss, first.loss, f"{self.name}: eval_batch twice, the loss", 0, 0)
        assert int(first.correct) == int(second.correct) and first.count == self.batch
        assert all(not training for training, _ in model[0].seen[-2:]), f"{self.name}: eval_batch ran the model in training mode"

    def test_runs_the_declared_step_mode(self, contract_registry: Registry, contract_info: ComponentInfo) -> None:
        """The registry's step modes are the trainer's own (what the matrix pairs normalizers by),
        and ``train_batch`` and ``eval_batch`` run the model in those modes only."""
        trainer = self.build(contract_registry)
        own = frozenset(getattr(trainer, "step_modes", {"single", "sequence"}))
        assert own == contract_info.step_modes, (f"{self.name}: registered with step modes {sorted(contract_info.step_modes)} "
                                                 f"but the trainer declares {sorted(own)}")
        model = self.network(contract_registry)
        loss_fn = contract_registry.losses["tet"]()
        trainer.train_batch(model, *self.inputs(), loss_fn, RecordingSGD(model.parameters()))
        trainer.eval_batch(model, *self.inputs(seed=1), loss_fn)
        used = {mode for _, mode in model[0].seen}
        assert used and used <= own, f"{self.name}: declares {sorted(own)} but ran the model in {sorted(used)}"

    def test_training_is_reproducible(self, contract_registry: Registry) -> None:
        """Two runs from the same seed give the same losses and parameters (randomness, if any,
        from torch's global generator, which a cell's seed fixes)."""
        runs = []
        for _ in range(2):
            trainer, model = self.build(contract_registry), self.network(contract_registry, seed=5)
            optimizer = RecordingSGD(model.parameters())
            torch.manual_seed(11)
            losses = [trainer.train_batch(model, *self.inputs(seed=s), contract_registry.losses["tet"](), optimizer).loss
                      for s in range(2)]
            runs.append((torch.stack(losses), {k: v.clone() for k, v in model.state_dict().items()}))
        assert_close(runs[1][0], runs[0][0], f"{self.name}: the losses of two runs from one seed", 0, 0)
        for key, value in runs[0][1].items():
            assert_close(runs[1][1][key], value, f"{self.name}: {key} after two runs from one seed", 0, 0)


__all__ = ["ModelContract", "RecordingSGD", "TrainerContract", "layers_of", "tiny_network"]
