"""Firing rates per spiking layer and time step (paper Fig. 2b, Table 2), counted on the device.

A *spiking layer* is a module with ``emits_spikes = True`` (``LIFNeuron`` sets it; a plugin's
neuron can too) that follows the step protocol: in ``"single"`` mode its output is ``[B, ...]``
for step ``module.t - 1`` (the step counter has advanced when forward hooks run), in
``"sequence"`` mode ``[T, B, ...]``.

Definitions (for a phase, e.g. one epoch of training or one evaluation pass):

* per-step rate of layer ``l``: ``r_l[t] = spikes_l[t] / neurons_l[t]``, where ``neurons_l[t]``
  counts neuron-steps (batch x features, summed over batches);
* per-step rate of the network: ``r[t] = sum_l spikes_l[t] / sum_l neurons_l[t]``;
* gross firing rate (Table 2): all spikes / all neuron-steps, over layers and steps;
* spread across steps: the coefficient of variation ``std_t(r[t]) / mean_t(r[t])`` (population
  standard deviation) -- what OTS is meant to shrink (Fig. 2b).

Counts live in device tensors; hooks never synchronise with the host and never keep spike
tensors alive. Only :meth:`FiringRateMeter.metrics` reads them back.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn


def is_spiking_layer(module: nn.Module) -> bool:
    return bool(getattr(module, "emits_spikes", False))


class _LayerCounts:
    __slots__ = ("spikes", "neurons")

    def __init__(self) -> None:
        self.spikes: Tensor | None = None  # [T] float64 on the layer's device
        self.neurons: list[int] = []  # neuron-steps per step (host ints: shapes are known on the host)

    def add(self, per_step: Tensor, first_step: int, neurons_per_step: int) -> None:
        end = first_step + per_step.shape[0]
        if self.spikes is None or self.spikes.shape[0] < end:
            grown = torch.zeros(end, dtype=torch.float64, device=per_step.device)
            if self.spikes is not None:
                grown[: self.spikes.shape[0]] = self.spikes
            self.spikes = grown
        self.spikes[first_step:end] += per_step
        if len(self.neurons) < end:
            self.neurons.extend([0] * (end - len(self.neurons)))
        for t in range(first_step, end):
            self.neurons[t] += neurons_per_step


class FiringRateMeter:
    """Counts spikes of every spiking layer of ``model``, per step, with forward hooks.

    ``attach()`` / ``detach()`` (or ``with meter:``) install and remove the hooks; ``reset()``
    starts a new phase; ``metrics(prefix)`` reads the counts back::

        meter = FiringRateMeter(model)
        with meter:
            ...  # train or evaluate
        meter.metrics("test")  # {"test_firing_rate": ..., "test_firing_rate_cv": ..., ...}
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = [(name or "model", m) for name, m in model.named_modules() if is_spiking_layer(m)]
        self._counts: dict[str, _LayerCounts] = {name: _LayerCounts() for name, _ in self.layers}
        self._handles: list[Any] = []

    def __enter__(self) -> FiringRateMeter:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def attach(self) -> None:
        if self._handles:
            return
        for name, module in self.layers:
            self._handles.append(module.register_forward_hook(self._hook(self._counts[name])))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def reset(self) -> None:
        self._counts = {name: _LayerCounts() for name, _ in self.layers}
        if self._handles:  # re-bind the hooks to the fresh counters
            self.detach()
            self.attach()

    @staticmethod
    def _hook(counts: _LayerCounts) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
            out = output.detach()
            if getattr(module, "step_mode", "sequence") == "single":
                step = int(getattr(module, "t", 1)) - 1
                counts.add(out.sum(dtype=torch.float32).reshape(1), step, out.numel())
            else:
                T = out.shape[0]
                counts.add(out.reshape(T, -1).sum(1, dtype=torch.float32), 0, out[0].numel())

        return hook

    def step_rates(self) -> dict[str, list[float]]:
        """``{layer: [r_l[1], ..., r_l[T]]}`` (one host sync)."""
        out = {}
        for name, c in self._counts.items():
            if c.spikes is None:
                continue
            spikes = c.spikes.tolist()
            out[name] = [s / n if n else math.nan for s, n in zip(spikes, c.neurons)]
        return out

    def metrics(self, prefix: str) -> dict[str, float]:
        """Gross rate, spread and per-step rates of the network, gross rate and spread per layer.

        Keys: ``{prefix}_firing_rate``, ``{prefix}_firing_rate_cv``, ``{prefix}_firing_rate_t{k}``
        (k = 1..T), ``{prefix}_firing_rate/{layer}``, ``{prefix}_firing_rate_cv/{layer}``.
        Empty if nothing was counted.
        """
        per_layer = {name: (c.spikes.tolist(), c.neurons) for name, c in self._counts.items() if c.spikes is not None}
        if not per_layer:
            return {}
        T = max(len(n) for _, n in per_layer.values())
        spikes_t = [0.0] * T
        neurons_t = [0] * T
        out: dict[str, float] = {}
        for name, (spikes, neurons) in per_layer.items():
            for t, (s, n) in enumerate(zip(spikes, neurons)):
                spikes_t[t] += s
                neurons_t[t] += n
            total = sum(neurons)
            out[f"{prefix}_firing_rate/{name}"] = sum(spikes) / total if total else math.nan
            out[f"{prefix}_firing_rate_cv/{name}"] = coefficient_of_variation(
                [s / n for s, n in zip(spikes, neurons) if n]
            )
        rates = [s / n for s, n in zip(spikes_t, neurons_t) if n]
        total = sum(neurons_t)
        head = {
            f"{prefix}_firing_rate": sum(spikes_t) / total if total else math.nan,
            f"{prefix}_firing_rate_cv": coefficient_of_variation(rates),
        }
        head.update({f"{prefix}_firing_rate_t{t + 1}": (s / n if n else math.nan) for t, (s, n) in enumerate(zip(spikes_t, neurons_t))})
        return {**head, **out}


def coefficient_of_variation(values: list[float]) -> float:
    """``std / mean`` (population std); 0 for a constant or all-zero sequence, nan if empty."""
    if not values:
        return math.nan
    mean = sum(values) / len(values)
    if mean == 0:
        return 0.0
    var = sum((v - mean) ** 2 for v in values) / len(values)
    return math.sqrt(var) / mean
