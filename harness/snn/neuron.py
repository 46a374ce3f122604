"""LIF neuron (paper Eqs. 2-4, docs/method.md section 1), the threshold-policy interface and the
membrane-normalization interface (a normalization inside the neuron step, such as MPBN)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from harness.snn.fused import LIFSpec, lif_sequence
from harness.snn.protocol import SequenceAware, SequenceModule


class SigmoidSurrogateSpike(torch.autograd.Function):
    """Heaviside forward; backward ``alpha * sig(alpha x) * (1 - sig(alpha x))`` (official code, alpha = 4)."""

    @staticmethod
    def forward(ctx, x: Tensor, alpha: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        sg = torch.sigmoid(ctx.alpha * x)
        return grad * ctx.alpha * sg * (1.0 - sg), None


def spike(x: Tensor, alpha: float = 4.0) -> Tensor:
    """``Heaviside(x)`` with the sigmoid surrogate gradient."""
    return SigmoidSurrogateSpike.apply(x, alpha)


class ThresholdPolicy(SequenceAware, nn.Module):
    """Gives the firing threshold of one layer at one step.

    ``forward(u, t)`` receives the membrane potential ``u[t]`` after charging and before firing
    (``t`` counts from 0) and returns ``theta[t]``: a float, a scalar tensor, or a tensor that
    broadcasts against ``u``. Per-sequence state is reset in :meth:`begin_sequence`.

    ``differentiable``: ``False`` (the default) promises that ``theta`` carries no gradient (a
    constant, or statistics taken without gradient, as OTS does); the neuron may then call the
    policy inside its fused autograd node, where gradient recording is off. A policy whose
    ``theta`` must carry gradient (a learnable threshold) sets it to ``True``; a policy with
    parameters that require gradient counts as differentiable too. The neuron then runs its
    unfused path, where autograd records every operation.
    """

    differentiable: ClassVar[bool] = False

    def forward(self, u: Tensor, t: int) -> Tensor | float:  # pragma: no cover - interface
        raise NotImplementedError


class MembraneNorm(SequenceAware, nn.Module):
    """A normalization inside the neuron step: between charge and fire.

    ``forward(u, t)`` receives the membrane potential ``u[t]`` after charging (``[B, C]`` or
    ``[B, C, H, W]``; ``t`` counts from 0) and returns the potential the threshold policy sees and
    the neuron fires on, of ``u``'s shape. Per-sequence state is reset in :meth:`begin_sequence`;
    running statistics are buffers (a checkpoint holds them).

    ``carry`` says which potential the neuron goes on with after the reset:

    * ``"normalized"`` -- the returned one: the reset acts on it and it is ``u[t + 1/2]``
      (SpikingJelly's ``MPBNLIFNode``);
    * ``"raw"`` -- the one before the normalization (MPBN's authors' code): the normalization only
      decides which neurons fire. Only with the hard reset, ``u[t + 1/2] = u[t] (1 - s[t])``: a
      soft reset would subtract a threshold of the normalized scale from a raw potential.

    ``step_modes`` as for a normalizer: a membrane normalization that needs the whole sequence at
    once declares ``{"sequence"}``; the neuron then runs only where both it and the threshold
    policy can. A neuron with a membrane normalization runs its unfused path (elementwise
    autograd operations); the normalization's own operations are recorded by autograd.
    """

    carry: Literal["normalized", "raw"] = "normalized"

    def forward(self, u: Tensor, t: int) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class LIFNeuron(SequenceModule):
    """Leaky integrate-and-fire neuron.

    Charge (Eq. 2): ``u[t] = (1 - 1/tau) * u[t-1/2] + I[t]``, with ``u[1/2] = 0``;
    fire (Eq. 3): ``s[t] = Heaviside(u[t] - theta[t])`` with the sigmoid surrogate;
    reset: ``"hard"`` is Eq. 4, ``u[t+1/2] = u[t] * (1 - s[t])``; ``"soft"`` (the official
    code's default) is ``u[t+1/2] = u[t] - s[t] * theta[t]``. With ``detach_reset`` the spike in
    the reset term carries no gradient. ``detach_membrane`` cuts the gradient path through
    ``u[t-1/2]`` (online training, Eq. 6).

    ``emits_spikes = True`` makes the firing-rate meter count its outputs (any spiking module of
    a plugin can set it).

    By default the neuron runs as one autograd node per call (a step, or the whole sequence in
    sequence mode) that saves one tensor per step (:func:`harness.snn.fused.lif_sequence`); the
    threshold policy is called inside it, at the point between charge and fire. ``fuse = False``,
    a differentiable threshold policy (:attr:`ThresholdPolicy.differentiable`) or an overridden
    :meth:`membrane` selects the unfused path, elementwise autograd operations with the same
    numbers.

    ``membrane_norm`` (a :class:`MembraneNorm`, e.g. MPBN) normalizes ``u[t]`` between charge and
    fire: ``n[t] = N(u[t], t)``, ``s[t] = Heaviside(n[t] - theta[t])`` with ``theta[t]`` given
    ``n[t]``, and the reset acts on ``n[t]`` or, where the normalization's ``carry`` is
    ``"raw"``, on ``u[t]``.
    """

    emits_spikes = True

    def __init__(
        self,
        threshold: ThresholdPolicy,
        tau: float = 2.0,
        reset: Literal["soft", "hard"] = "soft",
        surrogate_alpha: float = 4.0,
        detach_reset: bool = True,
        detach_membrane: bool = False,
        fuse: bool = True,
        membrane_norm: MembraneNorm | None = None,
    ) -> None:
        super().__init__()
        if tau < 1.0:
            raise ValueError(f"tau must be >= 1 (decay = 1 - 1/tau), got {tau}")
        if reset not in ("soft", "hard"):
            raise ValueError(f"reset must be 'soft' or 'hard', got {reset!r}")
        carry = getattr(membrane_norm, "carry", "normalized")
        if carry not in ("normalized", "raw"):
            raise ValueError(f"{type(membrane_norm).__name__}.carry must be 'normalized' or 'raw', got {carry!r}")
        if carry == "raw" and reset == "soft":
            raise ValueError(
                f"{type(membrane_norm).__name__} with carry = 'raw' (the neuron goes on with the potential before the "
                "normalization) needs the hard reset: a soft reset would subtract a threshold of the normalized scale "
                "from the raw potential. Set neuron.reset = \"hard\", or carry = \"normalized\"")
        self.threshold = threshold
        self.membrane_norm = membrane_norm  # a child module: its parameters train, its buffers are in the state_dict
        self._carry_raw = carry == "raw"  # the reset acts on u[t], not on the normalized potential
        self.decay = 1.0 - 1.0 / tau
        self.tau, self.reset, self.surrogate_alpha = tau, reset, surrogate_alpha
        self.detach_reset, self.detach_membrane = detach_reset, detach_membrane
        self.fuse = fuse
        # a neuron runs where its policy (and its membrane normalization) can
        self.step_modes = frozenset(threshold.step_modes) & frozenset(getattr(membrane_norm, "step_modes", threshold.step_modes))
        if not self.step_modes:
            raise ValueError(f"threshold policy {type(threshold).__name__} runs {sorted(threshold.step_modes)} only and "
                             f"membrane normalization {type(membrane_norm).__name__} {sorted(membrane_norm.step_modes)} only: "
                             "there is no step mode they share")
        self.v: Tensor | None = None  # u[t - 1/2]

    def extra_repr(self) -> str:
        return f"tau={self.tau}, reset={self.reset!r}, surrogate_alpha={self.surrogate_alpha}"

    def begin_sequence(self, time_steps: int) -> None:
        self.v = None

    def end_sequence(self) -> None:
        self.v = None  # drop the last step's graph

    def membrane(self, u: Tensor) -> Tensor:
        """The point between charge and fire: ``u[t]`` after charging, before the threshold policy
        sees it. The identity without a membrane normalization, else ``membrane_norm(u, t)``. A
        subclass that overrides it runs the unfused path."""
        return u if self.membrane_norm is None else self.membrane_norm(u, self.t)

    @property
    def fused(self) -> bool:
        """Whether this neuron runs as one autograd node (:func:`harness.snn.fused.lif_sequence`):
        yes unless ``fuse = False``, the threshold policy is differentiable, there is a membrane
        normalization, or :meth:`membrane` is overridden. Both paths give the same numbers."""
        policy = self.threshold
        return (
            self.fuse
            and self.membrane_norm is None
            and not getattr(policy, "differentiable", False)
            and not any(p.requires_grad for p in policy.parameters())
            and type(self).membrane is LIFNeuron.membrane
        )

    def _spec(self, first_step: int) -> LIFSpec:
        return LIFSpec(self.decay, self.reset, self.surrogate_alpha, self.detach_reset, self.detach_membrane,
                       self.threshold, first_step)

    def forward_sequence(self, x: Tensor) -> Tensor:
        # A neuron always loops over time, whatever step modes its threshold policy declares
        # (those only decide which trainers the cell may use).
        if not self.fused:
            return self.loop_steps(x)
        s, self.v = lif_sequence(x, self._previous_potential(), self._spec(self.t))
        self.t = x.shape[0]
        return s

    def forward_step(self, x: Tensor) -> Tensor:
        if not self.fused:
            return self.unfused_step(x)
        s, self.v = lif_sequence(x.unsqueeze(0), self._previous_potential(), self._spec(self.t))
        return s.squeeze(0)  # a view: its backward copies nothing

    def _previous_potential(self) -> Tensor | None:
        """``u[t - 1/2]``, cut from the graph with ``detach_membrane``; ``None`` at a sequence's start."""
        v = self.v
        return v.detach() if v is not None and self.detach_membrane else v

    def unfused_step(self, x: Tensor) -> Tensor:
        """One step from elementwise autograd operations, the reference of the fused node."""
        v = self._previous_potential()
        u = x if v is None else self.decay * v + x  # Eq. 2, with u[1/2] = 0
        n = self.membrane(u)
        theta = self.threshold(n, self.t)
        s = spike(n - theta, self.surrogate_alpha)  # Eq. 3
        s_reset = s.detach() if self.detach_reset else s
        if not self._carry_raw:
            u = n
        if self.reset == "soft":  # (never with carry = "raw": refused at construction)
            self.v = u - s_reset * theta
        else:
            self.v = u * (1.0 - s_reset)  # Eq. 4
        return s


@dataclass(frozen=True)
class LayerFactory:
    """Builds the cell's normalizer and neuron inside a model: ``layers.normalizer(C)`` and
    ``layers.neuron(C)``, ``C`` being the number of channels (features) the neuron receives.

    ``layers.neuron()`` without ``C`` works while the cell has no membrane normalization; with one
    (which has per-channel parameters) it raises an error that says to pass ``C``."""

    normalizer: Callable[[int], nn.Module]
    neuron: Callable[..., nn.Module]

    def __post_init__(self) -> None:
        # A neuron factory written before neurons took their channels, ``lambda: LIFNeuron(...)``,
        # keeps working: it is called without them.
        make = self.neuron
        try:
            params = inspect.signature(make).parameters.values()
        except (TypeError, ValueError):
            return
        if not any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in params):
            object.__setattr__(self, "neuron", lambda num_features=None: make())
