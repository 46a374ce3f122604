"""Loss scaling for float16 training (``precision = "float16"`` on CUDA), with torch's ``GradScaler``.

float16 gradients underflow where float32 ones do not, so the backward runs on the loss times a
scale ``S`` (``2^16`` at first) and the optimizer step divides the gradients by ``S`` again;
a step whose gradients hold an inf or a NaN is skipped and ``S`` halved, and after 2000 good
steps ``S`` doubles (torch's ``GradScaler``). Trainers need not know: they get

* the loss wrapped in :class:`ScaledLoss`: its value is the loss's, its gradient ``S`` times the
  loss's (what ``scaler.scale(loss).backward()`` would give; the trainer reports the real loss);
* the optimizer wrapped in :class:`ScaledOptimizer`: ``step()`` is ``scaler.step`` (unscale,
  skip on inf) then ``scaler.update()``; gradient clipping through
  :func:`harness.training.clip_grad_norm` unscales first, so the norm is that of the true gradient.

Powers of two scale exactly: without an overflow, a scaled float32 run is the unscaled run bit
for bit (tested on the CPU, which is how the mechanism is tested without a GPU).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from harness.training import SequenceLoss


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by the scaler's scale."""

    @staticmethod
    def forward(ctx: Any, value: Tensor, scaler: torch.amp.GradScaler) -> Tensor:
        ctx.scaler = scaler
        return value.view_as(value)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return ctx.scaler.scale(grad).to(grad.dtype), None


class ScaledLoss(SequenceLoss):
    """``loss`` whose gradient is scaled (see the module): values unchanged, no host sync."""

    def __init__(self, loss: SequenceLoss, scaler: torch.amp.GradScaler) -> None:
        self.loss, self.scaler = loss, scaler
        self.soft_targets = getattr(loss, "soft_targets", False)

    def _scaled(self, value: Tensor) -> Tensor:
        return _ScaleGradient.apply(value, self.scaler) if value.requires_grad else value

    def step(self, logits: Tensor, target: Tensor) -> Tensor:
        return self._scaled(self.loss.step(logits, target))

    def __call__(self, logits: Tensor, target: Tensor) -> Tensor:
        return self._scaled(self.loss(logits, target))


class ScaledOptimizer:
    """The optimizer a trainer steps under loss scaling; everything else is the wrapped one's."""

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        self.__dict__.update(optimizer=optimizer, scaler=scaler)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.optimizer, name, value)

    def synchronize(self) -> None:
        """Before clipping: the true (unscaled) gradients."""
        self.scaler.unscale_(self.optimizer)

    def step(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)


def loss_scaler(precision: str, device: torch.device, *, force: bool = False) -> torch.amp.GradScaler | None:
    """torch's ``GradScaler`` for a float16 cell on CUDA, else None. ``force``: one on any
    device whatever the precision (the CPU tests of the mechanism)."""
    if force or (precision == "float16" and device.type == "cuda"):
        return torch.amp.GradScaler(device.type)
    return None
