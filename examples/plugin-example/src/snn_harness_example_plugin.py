"""An example snn-harness plugin: the ``rms_norm`` normalizer.

Copy this file as a template: a plugin is a module (named in the ``snn_harness`` entry-point
group of its ``pyproject.toml``) with ``@hookimpl`` functions from :mod:`harness.hookspecs`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from harness import hookimpl
from harness.snn import SequenceModule

SNN_HARNESS_API = "1.0"  # the plugin API this plugin is written for (docs/plugins.md, "Versions")


class RMSNorm(SequenceModule):
    """Per-sample RMS normalization over channels and space, with a learnable per-channel gain.

    At every step, for each sample: ``y = x / sqrt(mean(x^2 over C, H, W) + eps) * weight``.
    No batch or running statistics, so training and inference compute the same thing, one
    step at a time (``[B, C, ...]``) or on the whole sequence (``[T, B, C, ...]``) alike.
    """

    def __init__(self, num_features: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.weight = nn.Parameter(torch.ones(num_features))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    def _normalize(self, x: Tensor, channel_dim: int) -> Tensor:
        dims = tuple(range(channel_dim, x.ndim))  # C and the spatial dims of each sample
        rms_inv = torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + self.eps)
        gain = self.weight.view(-1, *[1] * (x.ndim - channel_dim - 1))  # [C, 1, 1] for [.., C, H, W]
        return x * rms_inv * gain

    def forward_step(self, x: Tensor) -> Tensor:
        return self._normalize(x, 1)  # x: [B, C, ...]

    def forward_sequence(self, x: Tensor) -> Tensor:
        return self._normalize(x, 2)  # x: [T, B, C, ...]: every step at once, same numbers


@hookimpl
def register_normalizers(registry) -> None:
    registry.add("rms_norm", RMSNorm)
