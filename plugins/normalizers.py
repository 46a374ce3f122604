"""Built-in normalizers: ``vanilla_bn`` (per-step batch normalization, METHOD.md section 4)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from harness import hookimpl
from harness.snn import SequenceModule


def _channel_view(t: Tensor, ndim: int, channel_dim: int) -> Tensor:
    """Reshape a ``[C]`` vector to broadcast along ``channel_dim`` of an ``ndim``-d tensor."""
    shape = [1] * ndim
    shape[channel_dim] = -1
    return t.view(shape)


class VanillaBatchNorm(SequenceModule):
    """Per-step batch normalization, the paper's online baseline (Appendix C, METHOD.md section 4).

    Training, at every step ``t``: ``Ĩ[t] = gamma * (I[t] - mu[t]) / sqrt(var[t] + eps) + beta``
    with the batch mean and biased variance of that step only (per channel, over batch and
    space). Running statistics: ``M = sum_t mu[t] / T``, ``V = sum_t var[t] / T``, applied once per
    sequence at ``t = T``: ``run += momentum * (new - run)`` (PyTorch's momentum 0.1 is the
    paper's 0.9). Inference uses the running statistics.

    Works on ``[B, C]`` (after a linear synapse) and ``[B, C, ...]`` (after a conv), one step at a
    time or on the whole sequence ``[T, B, C, ...]`` (same numbers either way).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True) -> None:
        super().__init__()
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self._sum_mean: Tensor | None = None
        self._sum_var: Tensor | None = None

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.weight is not None}"

    def begin_sequence(self, time_steps: int) -> None:
        self._sum_mean = self._sum_var = None

    def end_sequence(self) -> None:
        if self.training and self._sum_mean is not None:
            with torch.no_grad():
                self.running_mean.lerp_(self._sum_mean, self.momentum)
                self.running_var.lerp_(self._sum_var, self.momentum)
                self.num_batches_tracked += 1
        self._sum_mean = self._sum_var = None

    def _affine(self, y: Tensor, channel_dim: int) -> Tensor:
        if self.weight is None:
            return y
        return y * _channel_view(self.weight, y.ndim, channel_dim) + _channel_view(self.bias, y.ndim, channel_dim)

    def _normalize(self, x: Tensor, channel_dim: int, stat_dims: tuple[int, ...]) -> Tensor:
        if not self.training:
            mean = _channel_view(self.running_mean, x.ndim, channel_dim)
            var = _channel_view(self.running_var, x.ndim, channel_dim)
            return self._affine((x - mean) * torch.rsqrt(var + self.eps), channel_dim)
        var, mean = torch.var_mean(x, dim=stat_dims, correction=0, keepdim=True)
        self._accumulate(mean.detach(), var.detach(), stat_dims)
        return self._affine((x - mean) * torch.rsqrt(var + self.eps), channel_dim)

    def _accumulate(self, mean: Tensor, var: Tensor, stat_dims: tuple[int, ...]) -> None:
        # mean/var keep singleton dims; per-step stats are [C] (one step) or [T, C] (sequence).
        steps_mean = mean.reshape(-1, self.num_features)
        steps_var = var.reshape(-1, self.num_features)
        m = steps_mean.sum(0) / self.time_steps
        v = steps_var.sum(0) / self.time_steps
        self._sum_mean = m if self._sum_mean is None else self._sum_mean + m
        self._sum_var = v if self._sum_var is None else self._sum_var + v

    def forward_step(self, x: Tensor) -> Tensor:
        # x: [B, C, ...]; statistics over batch and space.
        return self._normalize(x, 1, (0, *range(2, x.ndim)))

    def forward_sequence(self, x: Tensor) -> Tensor:
        # x: [T, B, C, ...]; statistics of each step over its batch and space, all steps at once.
        return self._normalize(x, 2, (1, *range(3, x.ndim)))


@hookimpl
def register_normalizers(registry) -> None:
    registry.add("vanilla_bn", VanillaBatchNorm)
