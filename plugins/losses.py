"""Built-in losses: ``tet`` (TET with an MSE regularizer, paper Eq. 5, docs/method.md section 2)."""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor

from harness import Range, hookimpl
from harness.training import SequenceLoss


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Softmax cross-entropy, mean over the batch: ``F.cross_entropy``, except on CUDA under
    ``torch.use_deterministic_algorithms`` (a cell's ``deterministic = true``), where PyTorch has
    no deterministic NLL loss and refuses it: there the same quantity as a one-hot product and
    plain reductions, which are deterministic (equal up to rounding)."""
    if logits.is_cuda and torch.are_deterministic_algorithms_enabled():
        onehot = F.one_hot(target, logits.shape[-1]).to(logits.dtype)
        return -(F.log_softmax(logits, dim=-1) * onehot).sum(-1).mean()
    return F.cross_entropy(logits, target)


class TETLoss(SequenceLoss):
    """``L = (1/T) sum_t [(1 - w) * CE(o[t], y) + w * MSE(o[t], onehot(y))]`` (Eq. 5).

    ``o[t]`` are the logits of step ``t``; CE is softmax cross-entropy (the paper's Eq. 5 drops
    the minus sign of its log term); the MSE mean runs over batch and classes; ``w`` is
    ``mse_weight`` (Table 3: 0.05 for static images, 0.001 for DVS data).

    Soft targets ``p`` ``[B, K]`` (mixup, CutMix) take the place of ``onehot(y)`` in both terms:
    ``CE = -sum_k p_k log softmax(o[t])_k`` and ``MSE(o[t], p)``; one-hot ``p`` gives the loss of
    the labels exactly.
    """

    soft_targets = True

    def __init__(self, mse_weight: Annotated[float, Range(0.0, 1.0)] = 0.05) -> None:
        if not 0.0 <= mse_weight <= 1.0:
            raise ValueError(f"mse_weight must be in [0, 1], got {mse_weight}")
        self.mse_weight = mse_weight

    def step(self, logits: Tensor, target: Tensor) -> Tensor:
        if target.ndim == 2:  # soft targets [B, K]
            loss = -(F.log_softmax(logits, dim=-1) * target).sum(-1).mean()
            onehot = target.to(logits.dtype)
        else:
            loss = cross_entropy(logits, target)
            onehot = F.one_hot(target, logits.shape[-1]).to(logits.dtype) if self.mse_weight else None
        if self.mse_weight:
            loss = (1.0 - self.mse_weight) * loss + self.mse_weight * F.mse_loss(logits, onehot)
        return loss

    def __call__(self, logits: Tensor, target: Tensor) -> Tensor:
        # All steps at once: means over [T*B] equal (1/T) sum_t of the per-step means.
        T = logits.shape[0]
        return self.step(logits.flatten(0, 1), target.repeat(T, 1) if target.ndim == 2 else target.repeat(T))


@hookimpl
def register_losses(registry) -> None:
    registry.add("tet", TETLoss)
