"""Interfaces of trainers and losses (one batch: forward schedule, loss, backward schedule)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from harness.snn.protocol import STEP_MODES


@dataclass
class BatchResult:
    """What one batch gives back. Tensors stay on the device; the runner sums them per epoch."""

    loss: Tensor  # mean loss of the batch (detached scalar)
    correct: Tensor  # number of correct predictions (scalar)
    count: int  # samples in the batch


class SequenceLoss:
    """A loss over per-step outputs ``o[t]`` (logits ``[B, K]``) and labels ``y`` ``[B]``.

    ``step(o_t, y)`` is the loss of one step, ``L_t``; calling the loss on the whole output
    ``[T, B, K]`` gives ``L = (1/T) sum_t L_t``. Online trainers back-propagate ``L_t / T`` at
    every step, so the two agree by construction.

    ``soft_targets = True`` declares that ``y`` may also be soft targets ``[B, K]`` (class
    probabilities: mixup and CutMix, :mod:`harness.mixing`, need it).
    """

    soft_targets: ClassVar[bool] = False

    def step(self, logits: Tensor, target: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, logits: Tensor, target: Tensor) -> Tensor:
        return torch.stack([self.step(logits[t], target) for t in range(logits.shape[0])]).mean()


class Trainer:
    """Trains and evaluates one batch.

    ``step_modes`` says how the trainer runs the network (``{"sequence"}`` for BPTT,
    ``{"single"}`` for online training); the matrix pairs it only with normalizers and
    threshold policies that support that mode.
    """

    step_modes: ClassVar[frozenset[str]] = STEP_MODES

    def train_batch(
        self, model: nn.Module, inputs: Tensor, target: Tensor, loss_fn: SequenceLoss, optimizer: torch.optim.Optimizer
    ) -> BatchResult:  # pragma: no cover - interface
        """One training iteration on ``inputs`` ``[T, B, ...]`` (including the optimizer step)."""
        raise NotImplementedError

    def eval_batch(self, model: nn.Module, inputs: Tensor, target: Tensor, loss_fn: SequenceLoss) -> BatchResult:  # pragma: no cover
        """Evaluate one batch (no gradients, model in eval mode)."""
        raise NotImplementedError


def predict(logits: Tensor) -> Tensor:
    """The class with the largest summed output: ``argmax_k sum_t o[t]`` (docs/method.md section 1)."""
    return logits.sum(0).argmax(-1)


@contextlib.contextmanager
def last_backward(optimizer: Any) -> Iterator[None]:
    """Wrap the last backward pass before ``optimizer.step()`` in this: under data parallelism the
    gradients are then averaged across processes while the backward runs, bucket by bucket, as
    DDP does (:class:`harness.parallel.GradientAveragingOptimizer`); otherwise it does nothing.
    A trainer that does not use it is still right: ``step()`` averages after the backward."""
    overlap = getattr(optimizer, "last_backward", None)
    if overlap is None:
        yield
        return
    with overlap():
        yield


def clip_grad_norm(optimizer: Any, parameters: Any, max_norm: float) -> None:
    """Clip the global gradient norm to ``max_norm``. Under data parallelism the gradients are
    averaged across processes first, so every process clips the union batch's gradient the same
    way (a trainer that clips with ``torch.nn.utils.clip_grad_norm_`` directly clips its own)."""
    synchronize = getattr(optimizer, "synchronize", None)
    if synchronize is not None:
        synchronize()
    torch.nn.utils.clip_grad_norm_(parameters, max_norm)
