"""The threshold-policy contract: what a policy registered through ``register_thresholds`` must do.

A policy (:class:`harness.snn.ThresholdPolicy`) is called by its LIF neuron once per step with the
membrane potential ``u[t]`` and gives ``theta[t]``. Subclass :class:`ThresholdContract` with
``name = "my_policy"``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor, nn

from harness.contracts._common import Contract, assert_close, assert_finite, check_dtype_and_device, check_state_dict_round_trip
from harness.registry import ComponentInfo, Registry
from harness.snn import LIFNeuron, SpikingSequential, begin_sequence, end_sequence, run_sequence

SHAPES = ("vector", "image")


def _params_require_grad(policy: nn.Module) -> bool:
    return any(p.requires_grad for p in policy.parameters())


class ThresholdContract(Contract):
    """The clauses every threshold policy must pass. Set ``name``; optionally ``options``."""

    kind = "threshold"
    time_steps: ClassVar[int] = 3
    batch: ClassVar[int] = 4
    num_features: ClassVar[int] = 3
    spatial: ClassVar[tuple[int, int]] = (3, 3)

    def build(self, registry: Registry, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return registry.thresholds.info(self.name).factory(**self.options)

    def potentials(self, shape: str = "image", seed: int = 0) -> Tensor:
        """Membrane potentials ``[T, B, C(, H, W)]`` around the usual threshold of 1."""
        size = (self.time_steps, self.batch, self.num_features, *(self.spatial if shape == "image" else ()))
        g = torch.Generator().manual_seed(2000 + seed)
        return torch.randn(size, generator=g) * 0.6 + 0.8 + 0.2 * torch.arange(self.time_steps).view(-1, *[1] * (len(size) - 1))

    def thetas(self, policy: nn.Module, u: Tensor, training: bool) -> list[Any]:
        """One sequence: ``policy(u[t], t)`` for every step, between ``begin_sequence`` and ``end_sequence``."""
        policy.train(training)
        begin_sequence(policy, u.shape[0])
        out = [policy(u[t], t) for t in range(u.shape[0])]
        end_sequence(policy)
        return out

    @staticmethod
    def as_tensor(theta: Any, like: Tensor) -> Tensor:
        return theta if isinstance(theta, Tensor) else torch.tensor(float(theta), dtype=like.dtype)

    # -- clauses -----------------------------------------------------------------------------

    @pytest.mark.parametrize("shape", SHAPES)
    def test_theta_broadcasts_and_is_finite(self, contract_registry: Registry, shape: str) -> None:
        """``theta[t]`` is a number or a tensor of ``u``'s dtype and device that broadcasts
        against ``u[t]`` (``[B, C]`` and ``[B, C, H, W]``), finite, in training and evaluation."""
        policy = self.build(contract_registry)
        u = self.potentials(shape)
        for training in (True, False):
            for t, theta in enumerate(self.thetas(policy, u, training)):
                where = f"{self.name} ({'training' if training else 'evaluation'}, {shape} potential {tuple(u[t].shape)}, step {t + 1})"
                if not isinstance(theta, Tensor):
                    assert isinstance(theta, (int, float)) and not isinstance(theta, bool), f"{where}: theta is {theta!r}"
                    assert theta == theta and abs(theta) != float("inf"), f"{where}: theta is {theta!r}"
                    continue
                assert theta.dtype == u.dtype and theta.device == u.device, (
                    f"{where}: theta is {theta.dtype} on {theta.device}, the potential {u.dtype} on {u.device}")
                try:
                    shape_out = torch.broadcast_shapes(theta.shape, u[t].shape)
                except RuntimeError:
                    shape_out = None
                assert shape_out == u[t].shape, f"{where}: theta of shape {tuple(theta.shape)} does not broadcast against u"
                assert_finite(theta, where)

    def test_no_gradient_unless_declared_differentiable(self, contract_registry: Registry) -> None:
        """A policy with ``differentiable = False`` (the default) promises ``theta`` carries no
        gradient: the neuron then calls it inside its fused autograd node, where none is recorded."""
        policy = self.build(contract_registry)
        if getattr(policy, "differentiable", False) or _params_require_grad(policy):
            pytest.skip(f"{self.name} is differentiable: its theta may carry gradient")
        u = self.potentials().requires_grad_(True)
        for t, theta in enumerate(self.thetas(policy, u, True)):
            assert not (isinstance(theta, Tensor) and theta.requires_grad), (
                f"{self.name}, step {t + 1}: theta carries gradient although the policy is not differentiable "
                "(compute it under torch.no_grad(), or set differentiable = True)")

    def test_every_sequence_starts_afresh(self, contract_registry: Registry) -> None:
        """``begin_sequence`` resets the per-sequence state: after training, the same sequence
        evaluated twice gives the same thresholds."""
        policy = self.build(contract_registry)
        self.thetas(policy, self.potentials(seed=1), True)
        u = self.potentials(seed=2)
        first, second = self.thetas(policy, u, False), self.thetas(policy, u, False)
        for t, (a, b) in enumerate(zip(first, second, strict=True)):
            assert_close(self.as_tensor(b, u), self.as_tensor(a, u),
                         f"{self.name}: evaluation of one sequence twice, step {t + 1}", self.rtol, self.atol)

    def test_state_dict_round_trip(self, contract_registry: Registry) -> None:
        """A fresh policy loaded with a trained one's ``state_dict`` gives the same thresholds in
        evaluation and in the next training sequence, and the same state after it."""
        check_state_dict_round_trip(self, contract_registry,
                                    lambda policy, u, training: [self.as_tensor(x, u) for x in self.thetas(policy, u, training)])

    def test_to_another_dtype_and_device(self, contract_registry: Registry) -> None:
        """After ``.to(torch.float64)`` a float64 potential gives float64 thresholds (the float32
        numbers up to rounding); after ``.to(device)`` (CUDA, else ``meta``) the thresholds are
        made there."""
        check_dtype_and_device(self, contract_registry, self.thetas, "threshold", self.as_tensor)

    def test_constant_potential_gives_finite_thresholds(self, contract_registry: Registry) -> None:
        """A layer whose potential is the same everywhere (zero spread) gets finite thresholds."""
        policy = self.build(contract_registry)
        u = torch.full((self.time_steps, self.batch, self.num_features, *self.spatial), 0.5)
        for training in (True, False):
            for t, theta in enumerate(self.thetas(policy, u, training)):
                assert_finite(self.as_tensor(theta, u), f"{self.name}, constant potential, step {t + 1}")

    def test_declared_step_modes_are_honoured(self, contract_registry: Registry, contract_info: ComponentInfo) -> None:
        """The registry's step modes are the policy's own, and a LIF neuron with the policy runs in
        each of them, giving spikes (0 or 1) of the input's shape."""
        policy = self.build(contract_registry)
        own = frozenset(getattr(policy, "step_modes", {"single", "sequence"}))
        assert own == contract_info.step_modes, (f"{self.name}: registered with step modes {sorted(contract_info.step_modes)} "
                                                 f"but the policy declares {sorted(own)}")
        x = self.potentials() * 2
        for mode in sorted(own):
            net = SpikingSequential(LIFNeuron(self.build(contract_registry), tau=2.0))
            with torch.no_grad():
                s = run_sequence(net.train(), x, mode)
            assert s.shape == x.shape, f"{self.name} in a LIF neuron ({mode} mode): spikes of shape {tuple(s.shape)}"
            assert bool(((s == 0) | (s == 1)).all()), f"{self.name} in a LIF neuron ({mode} mode): outputs other than 0 and 1"


__all__ = ["ThresholdContract"]
