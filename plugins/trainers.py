"""Built-in trainers: ``bptt`` (back-propagation through time, METHOD.md section 3)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from harness import hookimpl
from harness.snn import run_sequence
from harness.training import BatchResult, SequenceLoss, Trainer, predict


class BPTTTrainer(Trainer):
    """BPTT: forward all ``T`` steps layer by layer on ``[T, B, ...]`` keeping the whole graph
    (membrane path included), one backward of ``L``, one optimizer step.

    :param max_grad_norm: clip the global gradient norm to this value; 0 disables clipping.
    """

    step_modes = frozenset({"sequence"})

    def __init__(self, max_grad_norm: float = 0.0) -> None:
        self.max_grad_norm = max_grad_norm

    def train_batch(
        self, model: nn.Module, inputs: Tensor, target: Tensor, loss_fn: SequenceLoss, optimizer: torch.optim.Optimizer
    ) -> BatchResult:
        model.train()
        logits = run_sequence(model, inputs, "sequence")
        loss = loss_fn(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.max_grad_norm > 0:
            nn.utils.clip_grad_norm_(model.parameters(), self.max_grad_norm)
        optimizer.step()
        return BatchResult(loss.detach(), (predict(logits.detach()) == target).sum(), target.shape[0])

    @torch.no_grad()
    def eval_batch(self, model: nn.Module, inputs: Tensor, target: Tensor, loss_fn: SequenceLoss) -> BatchResult:
        model.eval()
        logits = run_sequence(model, inputs, "sequence")
        return BatchResult(loss_fn(logits, target), (predict(logits) == target).sum(), target.shape[0])


@hookimpl
def register_trainers(registry) -> None:
    registry.add("bptt", BPTTTrainer)
