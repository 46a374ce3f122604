"""Membrane potentials per layer and step, for the histograms of paper Fig. 3.

A threshold policy receives ``u[t]`` -- the membrane potential after charging and before firing
-- and returns ``theta[t]`` (:class:`harness.snn.ThresholdPolicy`). A forward hook on every
policy therefore sees exactly what Fig. 3 plots, for any neuron that uses one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from harness.snn.neuron import ThresholdPolicy


class MembraneRecorder:
    """Records a sample of ``u[t]`` and the mean threshold ``theta[t]`` of every layer.

    ``with MembraneRecorder(model) as rec: <run one batch>``; then ``rec.values[layer][t]`` is a
    1-d CPU tensor (at most ``max_values`` entries, a random sample with a fixed generator) and
    ``rec.thresholds[layer][t]`` a float.
    """

    def __init__(self, model: nn.Module, max_values: int = 20000, seed: int = 0) -> None:
        self.policies = [(name.removesuffix(".threshold") or "model", m) for name, m in model.named_modules() if isinstance(m, ThresholdPolicy)]
        self.max_values = max_values
        self.generator = torch.Generator().manual_seed(seed)
        self.values: dict[str, list[Tensor]] = {}
        self.thresholds: dict[str, list[float]] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> MembraneRecorder:
        for name, policy in self.policies:
            self._handles.append(policy.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: tuple[Any, ...], theta: Any) -> None:
            u = inputs[0].detach().flatten().float().cpu()
            if u.numel() > self.max_values:
                u = u[torch.randperm(u.numel(), generator=self.generator)[: self.max_values]]
            self.values.setdefault(name, []).append(u)
            mean_theta = theta.detach().float().mean().item() if isinstance(theta, Tensor) else float(theta)
            self.thresholds.setdefault(name, []).append(mean_theta)

        return hook
