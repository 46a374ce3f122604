"""The step protocol: how spiking layers run one step at a time or a whole sequence.

A network runs in one of two *step modes*:

* ``"sequence"`` (BPTT): each layer gets the whole sequence ``[T, B, ...]`` at once. Stateless
  layers (conv, linear, pooling) run once on the sequence folded into the batch ``[T*B, ...]``
  (:class:`TimeDistributed`); normalizers see all steps (tdBN and TEBN need this); neurons loop
  over time.
* ``"single"`` (online trainers): the network is called once per step with ``[B, ...]``;
  stateful modules keep their state (membrane potential, running sums) between calls.

Stateful modules derive from :class:`SequenceAware` and are told when a sequence begins (with
``T``) and ends, by :func:`begin_sequence` / :func:`end_sequence` walking the model. Between
the two, ``module.t`` is the index of the current step (0-based: the paper's ``t`` is
``module.t + 1``) and ``module.time_steps`` is ``T``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from harness.snn.fused import avg_pool, trace_synapse

STEP_MODES = frozenset({"single", "sequence"})


class SequenceAware:
    """Mixin for modules with per-sequence state. Override the two hooks; both default to no-ops.

    The walker sets ``time_steps`` and ``t`` before calling :meth:`begin_sequence`, so
    overrides do not need to call ``super()``.
    """

    step_modes: ClassVar[frozenset[str]] = STEP_MODES
    time_steps: int = 0
    t: int = 0

    def begin_sequence(self, time_steps: int) -> None:
        """A new sequence of ``time_steps`` steps starts: reset per-sequence state."""

    def end_sequence(self) -> None:
        """The sequence ended (after step ``T``): e.g. update running statistics, free state."""


class SequenceModule(SequenceAware, nn.Module):
    """A layer that follows the step protocol.

    Implement :meth:`forward_step` (``[B, ...] -> [B, ...]``, one step) and/or
    :meth:`forward_sequence` (``[T, B, ...] -> [T, B, ...]``), and declare which in
    ``step_modes``. The default :meth:`forward_sequence` calls :meth:`forward_step` once per
    step, so a module that implements only :meth:`forward_step` works in both modes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.step_mode = "sequence"

    def forward(self, x: Tensor) -> Tensor:
        if self.step_mode == "single":
            if self.t >= self.time_steps:
                raise RuntimeError(
                    f"{type(self).__name__}: step {self.t + 1} of a {self.time_steps}-step sequence; "
                    "call harness.snn.begin_sequence(model, T) before the first step"
                )
            y = self.forward_step(x)
            self.t += 1
            return y
        return self.forward_sequence(x)

    def forward_step(self, x: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} cannot run one step at a time (step_modes={sorted(self.step_modes)})")

    def forward_sequence(self, x: Tensor) -> Tensor:
        if "single" not in self.step_modes:
            raise NotImplementedError(f"{type(self).__name__} must implement forward_sequence")
        return self.loop_steps(x)

    def loop_steps(self, x: Tensor) -> Tensor:
        """Run :meth:`forward_step` on each step of ``x`` ``[T, B, ...]``, keeping ``self.t`` current."""
        outputs = []
        for t in range(x.shape[0]):
            self.t = t
            outputs.append(self.forward_step(x[t]))
        self.t = x.shape[0]
        return torch.stack(outputs)


class TimeDistributed(SequenceModule):
    """Runs a stateless module on every step; in sequence mode once, on ``[T*B, ...]``.

    With ``trace_decay = lambda`` (set by OTTT-style online trainers on synapses that receive
    spikes), one step computes ``module(s[t])`` in value while the weight gradient uses the
    presynaptic trace ``a[t] = lambda * a[t-1] + s[t]`` (tracked without gradient) in place of
    ``s[t]``: ``y = module(a) + module_no_bias(s - a; W detached)``, so ``dL/dW = g[t] a[t]^T``
    and ``dL/ds[t] = W^T g[t]`` (OTTT, Xiao et al. 2022; docs/method.md section 7). For
    ``nn.Linear`` and zero-padded convolutions this is one forward and one backward of the synapse
    (:func:`harness.snn.fused.trace_synapse`), saving the trace only.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.trace_decay: float | None = None
        self._trace: Tensor | None = None

    def begin_sequence(self, time_steps: int) -> None:
        self._trace = None

    def end_sequence(self) -> None:
        self._trace = None

    def forward_step(self, x: Tensor) -> Tensor:
        if self.trace_decay is None or not torch.is_grad_enabled():
            return self.module(x)
        s = x.detach()
        a = s if self._trace is None else self.trace_decay * self._trace + s
        self._trace = a
        fused = trace_synapse(self.module, x, a)  # one call of the synapse, saving a only
        if fused is not None:
            return fused
        frozen = {name: p.detach() for name, p in self.module.named_parameters()}
        if "bias" in frozen:
            frozen["bias"] = torch.zeros_like(frozen["bias"])
        return self.module(a) + torch.func.functional_call(self.module, frozen, (x - a,))

    def forward_sequence(self, x: Tensor) -> Tensor:
        y = self.module(x.flatten(0, 1))
        return y.unflatten(0, x.shape[:2])

    def forward(self, x: Tensor) -> Tensor:  # no step counting needed
        return self.forward_step(x) if self.step_mode == "single" else self.forward_sequence(x)


class GlobalAvgPool(nn.Module):
    """Global average pooling, ``[N, C, H, W] -> [N, C]``: the mean over the spatial dimensions.

    The same numbers as ``nn.AdaptiveAvgPool2d(1)`` followed by ``nn.Flatten()``, forward and
    backward, but its backward is deterministic on CUDA (adaptive pooling's is not, so
    ``torch.use_deterministic_algorithms`` refuses it) and it saves nothing for backward."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(-2, -1))


class AvgPool(nn.Module):
    """``k x k`` average pooling with stride ``k`` (``nn.AvgPool2d(k)``'s numbers up to the order of
    the sum) that saves nothing for backward: the forward sums ``k^2`` strided slices, the backward
    spreads ``dy / k^2`` over each window (:func:`harness.snn.fused.avg_pool`). ``nn.AvgPool2d``
    keeps its whole input (a spike tensor, here) only to know its shape."""

    def __init__(self, kernel_size: int = 2) -> None:
        super().__init__()
        if int(kernel_size) != kernel_size or kernel_size < 1:
            raise ValueError(f"kernel_size must be a positive integer, got {kernel_size!r}")
        self.kernel_size = int(kernel_size)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}"

    def forward(self, x: Tensor) -> Tensor:
        return avg_pool(x, self.kernel_size)


class SpikingSequential(nn.Sequential):
    """``nn.Sequential`` whose plain (stateless) layers are wrapped in :class:`TimeDistributed`."""

    def __init__(self, *layers: nn.Module) -> None:
        wrapped = []
        for layer in layers:
            if isinstance(layer, (SequenceAware, SpikingSequential)):
                wrapped.append(layer)
                continue
            if any(isinstance(m, SequenceAware) for m in layer.modules()):
                raise TypeError(
                    f"{type(layer).__name__} holds stateful spiking modules but is not a SpikingSequential: "
                    "in sequence mode it would see [T*B, ...] as if it were stateless; use SpikingSequential for it"
                )
            wrapped.append(TimeDistributed(layer))
        super().__init__(*wrapped)


def sequence_modules(model: nn.Module) -> list[SequenceAware]:
    return [m for m in model.modules() if isinstance(m, SequenceAware)]


def step_modes_of(model: nn.Module) -> frozenset[str]:
    """The step modes every stateful module of ``model`` supports."""
    modes = set(STEP_MODES)
    for m in sequence_modules(model):
        modes &= set(m.step_modes)
    return frozenset(modes)


def set_step_mode(model: nn.Module, mode: str) -> None:
    """Put every :class:`SequenceModule` of ``model`` in ``mode`` (``"single"`` or ``"sequence"``)."""
    if mode not in STEP_MODES:
        raise ValueError(f"step mode must be one of {sorted(STEP_MODES)}, got {mode!r}")
    for m in sequence_modules(model):
        if mode not in m.step_modes:
            raise ValueError(
                f"{type(m).__name__} supports step modes {sorted(m.step_modes)}, not {mode!r}"
                + (" (it needs the whole sequence at once)" if mode == "single" else "")
            )
        if isinstance(m, SequenceModule):
            m.step_mode = mode


def begin_sequence(model: nn.Module, time_steps: int) -> None:
    """Tell every stateful module that a sequence of ``time_steps`` steps begins."""
    for m in sequence_modules(model):
        m.time_steps, m.t = time_steps, 0
        m.begin_sequence(time_steps)


def end_sequence(model: nn.Module) -> None:
    """Tell every stateful module that the sequence ended."""
    for m in sequence_modules(model):
        m.end_sequence()


def collect_epoch_metrics(model: nn.Module) -> dict[str, float]:
    """Gather what modules report once per epoch (``module.epoch_metrics() -> dict``, which also
    resets their counters): ``key/<module path>`` per module and ``key`` averaged over modules."""
    out: dict[str, float] = {}
    groups: dict[str, list[float]] = {}
    for name, m in model.named_modules():
        report = getattr(m, "epoch_metrics", None)
        if not callable(report):
            continue
        for key, value in report().items():
            out[f"{key}/{name or 'model'}"] = float(value)
            groups.setdefault(key, []).append(float(value))
    out.update({k: sum(v) / len(v) for k, v in groups.items()})
    return out


def run_sequence(model: nn.Module, x_seq: Tensor, mode: str = "sequence") -> Tensor:
    """Run ``model`` over ``x_seq`` ``[T, B, ...]`` in ``mode``; returns the outputs ``[T, B, ...]``.

    Brackets the run with :func:`begin_sequence` / :func:`end_sequence`. Online trainers that
    need a backward pass per step drive the steps themselves instead.
    """
    set_step_mode(model, mode)
    T = x_seq.shape[0]
    begin_sequence(model, T)
    if mode == "sequence":
        out = model(x_seq)
    else:
        out = torch.stack([model(x_seq[t]) for t in range(T)])
    end_sequence(model)
    return out
