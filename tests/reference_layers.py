"""The elementwise implementations the fused autograd Functions replaced, kept as the reference
the tests compare against (values, gradients, running buffers, fallback counts).

Each is the composition of plain autograd operations the harness ran before its normalizers and
neuron became one node each: ``torch.var_mean`` statistics, ``(x - mu) / sqrt(var + eps)`` and the
affine map; OSR's Eq. 9 with ``ng(...)`` as ``.detach()`` and the fallback as ``torch.where``; the
LIF neuron as charge, ``Heaviside`` with the sigmoid surrogate, and the reset.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from harness.snn import SequenceModule


def _view(t: Tensor, ndim: int, channel_dim: int) -> Tensor:
    shape = [1] * ndim
    shape[channel_dim] = -1
    return t.view(shape)


class ReferenceStepNorm(SequenceModule):
    """Vanilla per-step BN (``kind="bn"``) or OSR (``kind="osr"``), one elementwise op at a time."""

    def __init__(self, num_features, kind="bn", eps=1e-5, momentum=0.1, fallback_ratio=None, gamma_grad="paper", affine=True):
        super().__init__()
        self.kind, self.num_features, self.eps, self.momentum = kind, num_features, eps, momentum
        self.fallback_ratio, self.gamma_grad = fallback_ratio, gamma_grad
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.fallback_steps = 0
        self._m = self._s = None

    def begin_sequence(self, time_steps):
        self._m = self._s = None

    def end_sequence(self):
        if self.training and self._m is not None:
            with torch.no_grad():
                var = self._s - self._m.square() if self.kind == "osr" else self._s
                self.running_mean.lerp_(self._m, self.momentum)
                self.running_var.lerp_(var, self.momentum)
        self._m = self._s = None

    def _acc(self, mean, var):
        mu, v = mean.reshape(-1, self.num_features), var.reshape(-1, self.num_features)
        second = v + mu.square() if self.kind == "osr" else v
        m, s = mu.sum(0) / self.time_steps, second.sum(0) / self.time_steps
        self._m = m if self._m is None else self._m + m
        self._s = s if self._s is None else self._s + s

    def forward_step(self, x):
        return self._f(x, 1, (0, *range(2, x.ndim)))

    def forward_sequence(self, x):
        return self._f(x, 2, (1, *range(3, x.ndim)))

    def _f(self, x, cd, dims):
        gamma = _view(self.weight, x.ndim, cd) if self.weight is not None else None
        beta = _view(self.bias, x.ndim, cd) if self.bias is not None else None

        def affine(y):
            return y if gamma is None else y * gamma + beta

        run_mean = _view(self.running_mean, x.ndim, cd)
        run_std = torch.sqrt(_view(self.running_var, x.ndim, cd) + self.eps)
        if not self.training:
            return affine((x - run_mean) / run_std)
        var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
        self._acc(mean.detach(), var.detach())
        if self.kind == "bn":
            return affine((x - mean) * torch.rsqrt(var + self.eps))
        batch_std = torch.sqrt(var + self.eps)
        x_hat = (x - mean) / batch_std
        ratio = (batch_std / run_std).detach()
        shift = ((mean - run_mean) / run_std).detach()
        if self.gamma_grad == "official" and gamma is not None:
            y = gamma * (x_hat + shift) + gamma.detach() * x_hat * (ratio - 1.0) + beta
        else:
            y = affine(x_hat * ratio + shift)
        if self.fallback_ratio is None:
            return y
        per_step = tuple(range(x.ndim)) if cd == 1 else tuple(range(1, x.ndim))
        fallback = torch.maximum(ratio, 1.0 / ratio).amax(dim=per_step, keepdim=True) > self.fallback_ratio
        self.fallback_steps += int(fallback.sum())
        return torch.where(fallback, affine(x_hat), y)


class _Spike(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha):
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        sg = torch.sigmoid(ctx.alpha * x)
        return grad * ctx.alpha * sg * (1.0 - sg), None


def reference_lif(x, threshold, decay=0.5, reset="soft", alpha=4.0, detach_reset=True, detach_membrane=False, v=None):
    """The LIF neuron over ``x`` ``[T, ...]``, step by step; ``threshold(u, t)`` gives ``theta[t]``.
    Returns the spikes ``[T, ...]`` and the last potential."""
    out = []
    for t in range(x.shape[0]):
        if v is None:
            u = x[t]
        else:
            u = decay * (v.detach() if detach_membrane else v) + x[t]
        theta = threshold(u, t)
        s = _Spike.apply(u - theta, alpha)
        s_reset = s.detach() if detach_reset else s
        v = u - s_reset * theta if reset == "soft" else u * (1.0 - s_reset)
        out.append(s)
    return torch.stack(out), v
