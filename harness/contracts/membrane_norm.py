"""The membrane-normalization contract: what a module registered through ``register_membrane_norms``
must do (docs/plugins.md, section 3.4a).

A membrane normalization (:class:`harness.snn.MembraneNorm`, e.g. MPBN) is called by its LIF
neuron once per step between charge and fire, ``n[t] = norm(u[t], t)``; the threshold policy
sees ``n[t]``, the neuron fires on ``n[t] - theta[t]``, and the reset acts on ``n[t]`` or, with
``carry = "raw"``, on ``u[t]``. Subclass :class:`MembraneNormContract` with
``name = "my_membrane_norm"``. A factory that returns ``None`` (the plain LIF: the built-in
``none``) builds nothing to check: its clauses are skipped, saying so.

What a membrane normalization may declare (class attributes of the module):

* ``carry`` -- ``"normalized"`` (the default) or ``"raw"`` (the neuron then needs the hard reset).
* ``step_modes`` -- ``{"single", "sequence"}`` (the default) or one of them.
* ``batch_dependent_eval = True`` -- its evaluation output depends on the rest of the batch; the
  batch-independence clause is then skipped.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor, nn

from harness.contracts._common import (Contract, assert_close, assert_finite, check_dtype_and_device, check_state_dict_round_trip,
                                      draw_parameters)
from harness.registry import ComponentInfo, Registry
from harness.snn import LIFNeuron, MembraneNorm, SpikingSequential, begin_sequence, end_sequence, run_sequence

SHAPES = ("vector", "image")  # [B, C] (a neuron after a linear synapse) and [B, C, H, W] (after a convolution)
CARRIES = ("normalized", "raw")


def _buffers(module: nn.Module) -> dict[str, Tensor]:
    params = dict(module.named_parameters())
    return {k: v.detach().clone() for k, v in module.state_dict().items() if k not in params}


class MembraneNormContract(Contract):
    """The clauses every membrane normalization must pass. Set ``name``; optionally ``options``."""

    kind = "membrane_norm"
    time_steps: ClassVar[int] = 3
    batch: ClassVar[int] = 4
    num_features: ClassVar[int] = 3
    spatial: ClassVar[tuple[int, int]] = (3, 3)

    def build(self, registry: Registry, seed: int = 0) -> nn.Module:
        """The module as a cell builds it (``num_features``, and ``time_steps`` when the factory
        takes it), its parameters drawn from ``seed`` so that a wrong gradient or transform shows.
        Skips the clause for a factory that builds nothing (the plain LIF)."""
        info = registry.membrane_norms.info(self.name)
        extra = {"time_steps": self.time_steps} if info.takes("time_steps") else {}
        torch.manual_seed(seed)
        module = info.factory(num_features=self.num_features, **extra, **self.options)
        if module is None:
            pytest.skip(f"membrane_norm {self.name!r} builds no module (the plain LIF): nothing to check")
        draw_parameters(module, seed)
        return module

    def potentials(self, shape: str = "image", seed: int = 0, batch: int | None = None) -> Tensor:
        """Membrane potentials ``[T, B, C(, H, W)]``, per channel of their own mean and spread."""
        size = (self.time_steps, batch or self.batch, self.num_features, *(self.spatial if shape == "image" else ()))
        g = torch.Generator().manual_seed(3000 + seed)
        view = (1, 1, -1, *[1] * (len(size) - 3))
        scale = torch.linspace(0.5, 2.0, self.num_features).view(view)
        shift = torch.linspace(-0.5, 1.0, self.num_features).view(view)
        return torch.randn(size, generator=g) * scale + shift

    def outputs(self, module: nn.Module, u: Tensor, training: bool) -> list[Tensor]:
        """One sequence: ``module(u[t], t)`` for every step, between ``begin_sequence`` and ``end_sequence``."""
        module.train(training)
        begin_sequence(module, u.shape[0])
        out = [module(u[t], t) for t in range(u.shape[0])]
        end_sequence(module)
        return out

    def reset_for(self, module: nn.Module) -> str:
        """The reset a neuron with this normalization can run: hard for ``carry = "raw"``."""
        return "hard" if getattr(module, "carry", "normalized") == "raw" else "soft"

    # -- clauses -----------------------------------------------------------------------------

    def test_builds_a_membrane_norm_with_a_known_carry(self, contract_registry: Registry) -> None:
        """The factory returns a :class:`harness.snn.MembraneNorm` (or ``None``, the plain LIF),
        whose ``carry`` is ``"normalized"`` or ``"raw"``."""
        module = self.build(contract_registry)
        assert isinstance(module, MembraneNorm), (
            f"membrane_norm {self.name!r}: the factory returned a {type(module).__name__}, not a harness.snn.MembraneNorm "
            "(subclass it: the neuron calls forward(u, t) and reads carry)")
        carry = getattr(module, "carry", "normalized")
        assert carry in CARRIES, f"membrane_norm {self.name!r}: carry is {carry!r}; it must be one of {CARRIES}"

    @pytest.mark.parametrize("shape", SHAPES)
    def test_output_has_the_potential_s_shape_dtype_and_is_finite(self, contract_registry: Registry, shape: str) -> None:
        """``norm(u[t], t)`` has ``u[t]``'s shape and dtype and is finite, for ``[B, C]`` and
        ``[B, C, H, W]`` potentials, in training and evaluation."""
        module = self.build(contract_registry)
        u = self.potentials(shape)
        for training in (True, False):
            for t, n in enumerate(self.outputs(module, u, training)):
                where = f"{self.name} ({'training' if training else 'evaluation'}, potential {tuple(u[t].shape)}, step {t + 1})"
                assert isinstance(n, Tensor), f"{where}: returned {type(n).__name__}, not a tensor"
                assert n.shape == u[t].shape, f"{where}: output of shape {tuple(n.shape)}"
                assert n.dtype == u.dtype, f"{where}: output {n.dtype} for a {u.dtype} potential"
                assert_finite(n, where)

    def test_gradient_reaches_the_potential_and_the_parameters(self, contract_registry: Registry) -> None:
        """In training, the gradient of ``sum_t sum(n[t] * w[t])`` reaches every step's potential
        and every parameter, finite and not all zero: the neuron's surrogate gradient passes
        through the normalization (the neuron with one runs the unfused path, autograd records it)."""
        module = self.build(contract_registry)
        u = self.potentials().requires_grad_(True)
        w = torch.randn(u.shape, generator=torch.Generator().manual_seed(7))
        n = self.outputs(module, u, True)
        total = sum((n_t * w[t]).sum() for t, n_t in enumerate(n))
        assert isinstance(total, Tensor) and total.requires_grad, (
            f"membrane_norm {self.name!r}: its output carries no gradient (computed under no_grad, or detached): "
            "the neuron's gradient would stop at it")
        total.backward()
        for t in range(u.shape[0]):
            assert_finite(u.grad[t], f"{self.name}: gradient of the potential at step {t + 1}")
            assert bool(u.grad[t].abs().sum() > 0), f"{self.name}: no gradient reaches the potential at step {t + 1}"
        for name, p in module.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and bool(torch.isfinite(p.grad).all()), f"{self.name}: parameter {name} has no finite gradient"
                assert bool(p.grad.abs().sum() > 0), f"{self.name}: parameter {name} gets a zero gradient"

    def test_evaluation_changes_no_state(self, contract_registry: Registry) -> None:
        """Evaluation updates no buffer (running statistics, counters), and the same sequence
        evaluated twice gives the same output."""
        module = self.build(contract_registry)
        self.outputs(module, self.potentials(seed=1), True)
        before = _buffers(module)
        u = self.potentials(seed=2)
        first = self.outputs(module, u, False)
        second = self.outputs(module, u, False)
        for key, value in _buffers(module).items():
            assert_close(value, before[key], f"{self.name}: buffer {key} after evaluation", 0.0, 0.0)
        for t, (a, b) in enumerate(zip(first, second, strict=True)):
            assert_close(b, a, f"{self.name}: one sequence evaluated twice, step {t + 1}", self.rtol, self.atol)

    def test_evaluation_does_not_depend_on_the_batch(self, contract_registry: Registry) -> None:
        """In evaluation each sample's output is its own: a sample alone gives what it gives in a
        batch (inference one sample at a time is the same model). ``batch_dependent_eval = True``
        declares otherwise and skips this."""
        module = self.build(contract_registry)
        if getattr(module, "batch_dependent_eval", False):
            pytest.skip(f"{self.name} declares batch_dependent_eval")
        self.outputs(module, self.potentials(seed=1), True)
        u = self.potentials(seed=2)
        whole = self.outputs(module, u, False)
        alone = self.outputs(module, u[:, :1].clone(), False)
        for t, (a, b) in enumerate(zip(alone, whole, strict=True)):
            assert_close(a, b[:1], f"{self.name}: evaluation of the first sample alone against in its batch, step {t + 1}",
                         self.rtol, self.atol)

    def test_state_dict_round_trip(self, contract_registry: Registry) -> None:
        """A fresh module loaded with a trained one's ``state_dict`` gives the same output in
        evaluation and in the next training sequence, and the same state after it (a resumed cell
        continues exactly)."""
        check_state_dict_round_trip(self, contract_registry, self.outputs)

    def test_to_another_dtype_and_device(self, contract_registry: Registry) -> None:
        """After ``.to(torch.float64)`` a float64 potential gives float64 outputs (the float32
        numbers up to rounding); after ``.to(device)`` (CUDA, else ``meta``) the outputs are made there."""
        check_dtype_and_device(self, contract_registry, self.outputs, "output")

    def test_constant_potential_gives_finite_output(self, contract_registry: Registry) -> None:
        """A layer whose potential is the same everywhere (zero spread, as a silent layer's)
        gets a finite output in training and evaluation."""
        module = self.build(contract_registry)
        u = torch.full((self.time_steps, self.batch, self.num_features, *self.spatial), 0.5)
        for training in (True, False):
            for t, n in enumerate(self.outputs(module, u, training)):
                assert_finite(n, f"{self.name}, constant potential, {'training' if training else 'evaluation'} step {t + 1}")

    def test_declared_step_modes_are_honoured_in_a_lif_neuron(self, contract_registry: Registry,
                                                               contract_info: ComponentInfo) -> None:
        """The registry's step modes are the module's own, and a LIF neuron with it (and a fixed
        threshold; the hard reset where ``carry = "raw"``) runs in each of them, giving spikes
        (0 or 1) of the input's shape, the same in every mode."""
        module = self.build(contract_registry)
        own = frozenset(getattr(module, "step_modes", {"single", "sequence"}))
        assert own == contract_info.step_modes, (f"{self.name}: registered with step modes {sorted(contract_info.step_modes)} "
                                                 f"but the module declares {sorted(own)}")
        fixed = contract_registry.thresholds.info("fixed").factory
        x = self.potentials() * 2
        spikes = {}
        for mode in sorted(own):
            net = SpikingSequential(LIFNeuron(fixed(), tau=2.0, reset=self.reset_for(module),
                                              membrane_norm=self.build(contract_registry)))
            with torch.no_grad():
                s = run_sequence(net.train(), x, mode)
            assert s.shape == x.shape, f"{self.name} in a LIF neuron ({mode} mode): spikes of shape {tuple(s.shape)}"
            assert bool(((s == 0) | (s == 1)).all()), f"{self.name} in a LIF neuron ({mode} mode): outputs other than 0 and 1"
            spikes[mode] = s
        if len(spikes) == 2:
            assert_close(spikes["single"], spikes["sequence"], f"{self.name} in a LIF neuron: single against sequence mode", 0.0, 0.0)


__all__ = ["MembraneNormContract"]
