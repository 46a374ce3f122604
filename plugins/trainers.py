"""Built-in trainers: ``bptt`` (back-propagation through time) and ``online`` (the paper's
online training, Eqs. 6-7, and OTTT), docs/method.md sections 3 and 7."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from torch import Tensor, nn

from harness import Range, hookimpl
from harness.snn import LIFNeuron, TimeDistributed, begin_sequence, end_sequence, run_sequence, set_step_mode
from harness.training import BatchResult, SequenceLoss, Trainer, clip_grad_norm, last_backward, predict


class BPTTTrainer(Trainer):
    """BPTT: forward all ``T`` steps layer by layer on ``[T, B, ...]`` keeping the whole graph
    (membrane path included), one backward of ``L``, one optimizer step.

    :param max_grad_norm: clip the global gradient norm to this value; 0 disables clipping.
    """

    step_modes = frozenset({"sequence"})

    def __init__(self, max_grad_norm: Annotated[float, Range(0.0)] = 0.0) -> None:
        self.max_grad_norm = max_grad_norm

    def train_batch(
        self, model: nn.Module, inputs: Tensor, target: Tensor, loss_fn: SequenceLoss, optimizer: torch.optim.Optimizer
    ) -> BatchResult:
        model.train()
        logits = run_sequence(model, inputs, "sequence")
        loss = loss_fn(logits, target)
        optimizer.zero_grad(set_to_none=True)
        with last_backward(optimizer):  # DDP: gradients averaged while backward runs
            loss.backward()
        if self.max_grad_norm > 0:
            clip_grad_norm(optimizer, model.parameters(), self.max_grad_norm)
        optimizer.step()
        return BatchResult(loss.detach(), (predict(logits.detach()) == target).sum(), target.shape[0])

    @torch.no_grad()
    def eval_batch(self, model: nn.Module, inputs: Tensor, target: Tensor, loss_fn: SequenceLoss) -> BatchResult:
        model.eval()
        logits = run_sequence(model, inputs, "sequence")
        return BatchResult(loss_fn(logits, target), (predict(logits) == target).sum(), target.shape[0])


class OnlineTrainer(Trainer):
    """Online training: for ``t = 1..T``, forward one step with the membrane potential detached
    from the previous step (Eq. 6), back-propagate ``L_t / T`` at once (gradients accumulate in
    ``.grad``) and free the step's graph, so training memory is that of one step whatever ``T``
    (Eq. 7: ``dL/dW = sum_t dL_t/ds[t] ds[t]/du[t] du[t]/dW``).

    :param update: ``"sequence"`` steps the optimizer once after ``T`` steps (OTTT_A);
        ``"step"`` steps it after every time step (OTTT_O).
    :param gradient: ``"spatial"`` (the paper's rule; SpikingJelly's SLTT): instantaneous
        presynaptic spikes; ``"trace"`` (OTTT): synapses fed by spikes take their weight gradient
        from the presynaptic trace ``a[t] = (1 - 1/tau) a[t-1] + s[t]``.
    :param max_grad_norm: clip the global gradient norm before each optimizer step; 0 disables it.
    """

    step_modes = frozenset({"single"})

    def __init__(
        self,
        update: Literal["sequence", "step"] = "sequence",
        gradient: Literal["spatial", "trace"] = "spatial",
        max_grad_norm: Annotated[float, Range(0.0)] = 0.0,
    ) -> None:
        if update not in ("sequence", "step"):
            raise ValueError(f"update must be 'sequence' or 'step', got {update!r}")
        if gradient not in ("spatial", "trace"):
            raise ValueError(f"gradient must be 'spatial' or 'trace', got {gradient!r}")
        self.update, self.gradient, self.max_grad_norm = update, gradient, max_grad_norm

    def prepare(self, model: nn.Module) -> None:
        """Detach every neuron's membrane between steps; mark trace synapses (``gradient="trace"``)."""
        decay = None
        for m in model.modules():
            if isinstance(m, LIFNeuron):
                m.detach_membrane = True
                decay = m.decay if decay is None else decay
            elif isinstance(m, TimeDistributed) and isinstance(m.module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                # Synapses after the first neuron receive spikes; the first one sees the input.
                m.trace_decay = decay if (self.gradient == "trace" and decay is not None) else None
        model._harness_online_gradient = self.gradient

    def _step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if self.max_grad_norm > 0:
            clip_grad_norm(optimizer, model.parameters(), self.max_grad_norm)
        optimizer.step()

    def train_batch(
        self, model: nn.Module, inputs: Tensor, target: Tensor, loss_fn: SequenceLoss, optimizer: torch.optim.Optimizer
    ) -> BatchResult:
        if getattr(model, "_harness_online_gradient", None) != self.gradient:  # once per model, not per batch
            self.prepare(model)
        model.train()
        set_step_mode(model, "single")
        T = inputs.shape[0]
        begin_sequence(model, T)
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=inputs.device)
        logit_sum = None
        for t in range(T):
            out = model(inputs[t])
            loss_t = loss_fn.step(out, target) / T
            if self.update == "step" or t == T - 1:  # the last backward before an optimizer step
                with last_backward(optimizer):
                    loss_t.backward()  # frees this step's graph
            else:
                loss_t.backward()
            if self.update == "step":
                self._step(model, optimizer)
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss_t.detach()
            logit_sum = out.detach() if logit_sum is None else logit_sum + out.detach()
        end_sequence(model)
        if self.update == "sequence":
            self._step(model, optimizer)
        return BatchResult(loss_sum, (logit_sum.argmax(-1) == target).sum(), target.shape[0])

    @torch.no_grad()
    def eval_batch(self, model: nn.Module, inputs: Tensor, target: Tensor, loss_fn: SequenceLoss) -> BatchResult:
        model.eval()
        logits = run_sequence(model, inputs, "single")
        return BatchResult(loss_fn(logits, target), (predict(logits) == target).sum(), target.shape[0])


@hookimpl
def register_trainers(registry) -> None:
    registry.add("bptt", BPTTTrainer)
    registry.add("online", OnlineTrainer)
