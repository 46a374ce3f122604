"""Synaptic operations per sample (an energy proxy), following NeuroBench's ``SynapticOperations``.

Definitions (NeuroBench, ``neurobench/metrics/workload/synaptic_operations.py`` with
``single_layer_MACs`` / ``stateless_layer_macs`` in ``neurobench/metrics/utils/layers/macs.py``,
``binary_inputs`` in ``.../layers/input.py``, ``make_binary_copy`` in ``.../layers/binary_copy.py``
and the per-call forward pre-hook ``LayerHook`` in ``neurobench/hooks/layer.py``):

* For every forward call of a synaptic layer (``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``), the
  *effective* operations are the (input element, weight, output element) triples in which both the
  input element and the weight are nonzero -- NeuroBench binarizes the input and a copy of the
  layer (nonzero -> 1, bias zeroed) and sums the outputs. For a convolution this counts, for each
  nonzero input element, the (output position x kernel tap x output channel of its group) pairs
  that read it, with the layer's padding, stride, dilation and groups; an input element that falls
  only into the border never feeds a tap and costs nothing.
* The call's operations are **ACs** (``Effective_ACs``) when its input is *spiking* -- every entry
  is -1, 0 or 1 (NeuroBench's test; note that it admits -1, not only 0/1) -- and **MACs**
  (``Effective_MACs``) otherwise. The decision is made per call, for the whole call's input.
* **Dense** (``Dense``) counts every multiply-accumulate of the call ignoring sparsity: input and
  weights all ones (zeros of the layer's zero padding still cost nothing).
* **Bias additions are not synaptic operations** (NeuroBench zeroes the bias of its binary copy).
* Counts are summed over all calls and divided by the number of samples (NeuroBench divides by
  ``data[0].size(0)`` summed over batches): per sample, summed over time steps. In ``"sequence"``
  mode a :class:`~harness.snn.TimeDistributed` synapse is called once on ``[T*B, ...]``, in
  ``"single"`` mode ``T`` times on ``[B, ...]``; either way the sum is the same.

Keys from :meth:`SynOpsMeter.metrics`: ``synops_ac`` (Effective_ACs), ``synops_mac``
(Effective_MACs), ``synops_dense`` (Dense), ``synops`` (= ac + mac), and per layer
``synops_ac/<module name>`` and ``synops_mac/<module name>`` (``model`` for the root module).

Deviations from NeuroBench, and things to know:

* Only ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` (and subclasses) are counted; NeuroBench also
  handles ``Conv3d`` and recurrent cells.
* The count is computed without running a binary copy of the layer: the nonzero-input map is
  summed over the batch, padded like the layer pads (so ``reflect``/``circular`` padding counts the
  copies, as NeuroBench's forward of the copy would), unfolded into (channel, tap) windows and
  weighted by how many output channels have a nonzero weight at that (channel, tap). The result is
  the same number; counts are float64 (exact up to 2**53), not cast to ``int`` per call.
* AC vs MAC is decided per forward call, as NeuroBench does per hook call. A layer whose input is
  spiking at some time steps and not at others would therefore be all-MAC in ``"sequence"`` mode
  (one call) but split in ``"single"`` mode; a synapse of this harness receives either spikes at
  every step or real values at every step, and then both modes give the same counts.
* Meant for evaluation under ``torch.no_grad()``: with gradients enabled, an OTTT synapse
  (``TimeDistributed.trace_decay`` set) calls its module twice per step, and both calls would be
  counted.
* The hooks never synchronise with the host and never keep an input alive: counts are
  accumulated in float64 device tensors (the AC/MAC choice is made on the device), Dense in host
  integers (it depends only on shapes). Only :meth:`SynOpsMeter.metrics` reads counts back.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SYNAPTIC_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)


def is_spiking_input(x: Tensor) -> Tensor:
    """NeuroBench's test (``binary_inputs``): every entry is -1, 0 or 1. A 0-d bool on ``x``'s device."""
    a = x.abs()
    return ((a == 0) | (a == 1)).all()


class _Layer:
    """Counters of one synaptic layer: device tensors for the effective ops, host ints for Dense."""

    __slots__ = ("name", "module", "ac", "mac", "dense", "_dense_per_sample")

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module
        self.ac: dict[torch.device, Tensor] = {}  # float64 scalars, one per device used
        self.mac: dict[torch.device, Tensor] = {}
        self.dense = 0
        self._dense_per_sample: dict[tuple[int, ...], int] = {}  # conv: by input shape [C, *spatial]

    def reset(self) -> None:
        self.ac.clear()
        self.mac.clear()
        self.dense = 0

    # -- counting -----------------------------------------------------------------------------

    def count(self, x: Tensor) -> None:
        with torch.no_grad():
            if isinstance(self.module, nn.Linear):
                ops, dense = self._linear(x)
            else:
                ops, dense = self._conv(x)
            spiking = is_spiking_input(x)
            zero = torch.zeros((), dtype=torch.float64, device=ops.device)
            dev = ops.device
            # Out-of-place sums: accumulators made under inference_mode stay usable outside it.
            self.ac[dev] = self.ac.get(dev, zero) + torch.where(spiking, ops, zero)
            self.mac[dev] = self.mac.get(dev, zero) + torch.where(spiking, zero, ops)
            self.dense += dense

    def _linear(self, x: Tensor) -> tuple[Tensor, int]:
        m: nn.Linear = self.module  # type: ignore[assignment]
        nz_inputs = (x != 0).reshape(-1, m.in_features).sum(0, dtype=torch.float64)  # [in]
        nz_weights = (m.weight != 0).sum(0, dtype=torch.float64)  # [in]: outputs each input feeds
        return torch.dot(nz_inputs, nz_weights), x.numel() * m.out_features

    def _conv(self, x: Tensor) -> tuple[Tensor, int]:
        m: nn.Conv1d | nn.Conv2d = self.module  # type: ignore[assignment]
        nd = len(m.kernel_size)
        if x.dim() == nd + 1:  # unbatched input [C, *spatial]
            x = x.unsqueeze(0)
        batch = x.shape[0]
        # How many samples have a nonzero at each input position: [1, C, *spatial].
        nz = (x != 0).sum(0, keepdim=True, dtype=torch.float64)
        taps = self._taps_per_channel(nz)  # [C, K]: (output position, tap) pairs fed, summed over nz
        groups, c_in, c_out = m.groups, m.in_channels, m.out_channels
        kernel = int(torch.Size(m.kernel_size).numel())
        # Output channels (of the input channel's group) with a nonzero weight at each (channel, tap).
        nz_w = (m.weight != 0).reshape(groups, c_out // groups, c_in // groups, kernel)
        nz_w = nz_w.sum(1, dtype=torch.float64).reshape(c_in, kernel)
        ops = (taps * nz_w).sum()
        key = tuple(x.shape[1:])
        per_sample = self._dense_per_sample.get(key)
        if per_sample is None:
            ones = torch.ones((1, 1, *x.shape[2:]), dtype=torch.float64)  # on the host: no sync
            per_sample = int(self._taps_per_channel(ones).sum().item()) * c_in * (c_out // groups)
            self._dense_per_sample[key] = per_sample
        return ops, batch * per_sample

    def _taps_per_channel(self, counts: Tensor) -> Tensor:
        """``counts`` ``[1, C, *spatial]`` -> ``[C, K]``: for each channel and kernel tap, the sum of
        ``counts`` over the input positions that tap reads (over all output positions)."""
        m: nn.Conv1d | nn.Conv2d = self.module  # type: ignore[assignment]
        pads = list(m._reversed_padding_repeated_twice)
        if any(pads):
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            counts = F.pad(counts, pads, mode=mode)
        kernel, stride, dilation = m.kernel_size, m.stride, m.dilation
        if len(kernel) == 1:  # Conv1d: a 2-D window of height 1
            counts = counts.unsqueeze(2)
            kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
        cols = F.unfold(counts, kernel_size=kernel, dilation=dilation, stride=stride)  # [1, C*K, L]
        return cols.sum(-1).reshape(counts.shape[1], -1)


class SynOpsMeter:
    """Counts synaptic operations of every ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` of ``model``
    with forward hooks, following NeuroBench's ``SynapticOperations`` (see the module docstring).

    ``attach()`` / ``detach()`` (or ``with meter:``) install and remove the hooks; ``reset()``
    zeroes the counts; ``metrics(num_samples)`` reads them back per sample::

        meter = SynOpsMeter(model)
        with meter, torch.no_grad():
            for x, _ in loader:
                run_sequence(model, x, mode)
        meter.metrics(num_samples=len(loader.dataset))

    Meant for evaluation under ``torch.no_grad()`` (see the module docstring for OTTT synapses).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.layers = [
            _Layer(name or "model", module)
            for name, module in model.named_modules()
            if isinstance(module, SYNAPTIC_LAYERS)
        ]
        self._handles: list[Any] = []

    def attach(self) -> None:
        """Register the forward hooks (does nothing if they are already registered)."""
        if self._handles:
            return
        for layer in self.layers:
            self._handles.append(layer.module.register_forward_hook(self._hook(layer), with_kwargs=True))

    def detach(self) -> None:
        """Remove the hooks; the counts are kept."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def reset(self) -> None:
        """Zero the counts."""
        for layer in self.layers:
            layer.reset()

    def __enter__(self) -> SynOpsMeter:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    @staticmethod
    def _hook(layer: _Layer):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            x = args[0] if args else kwargs.get("input")
            if isinstance(x, Tensor):
                layer.count(x)

        return hook

    def metrics(self, num_samples: int) -> dict[str, float]:
        """Per-sample operations, summed over time steps: totals and per layer (see the module
        docstring). ``num_samples`` is the number of samples the counted forward calls saw;
        with none, every count is 0 (as NeuroBench reports)."""
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        # One read-back per device, for all layers' counters together.
        stacked: dict[torch.device, list[Tensor]] = {}
        for layer in self.layers:
            for counters in (layer.ac, layer.mac):
                for dev, t in counters.items():
                    stacked.setdefault(dev, []).append(t)
        read = {dev: iter(torch.stack(ts).tolist()) for dev, ts in stacked.items()}

        def per_sample(count: float) -> float:
            return count / num_samples if num_samples else 0.0

        layers: dict[str, float] = {}
        total_ac = total_mac = 0.0
        for layer in self.layers:  # same order as above
            ac = sum(next(read[dev]) for dev in layer.ac)
            mac = sum(next(read[dev]) for dev in layer.mac)
            layers[f"synops_ac/{layer.name}"] = per_sample(ac)
            layers[f"synops_mac/{layer.name}"] = per_sample(mac)
            total_ac += ac
            total_mac += mac
        return {
            "synops_ac": per_sample(total_ac),
            "synops_mac": per_sample(total_mac),
            "synops_dense": per_sample(sum(layer.dense for layer in self.layers)),
            "synops": per_sample(total_ac + total_mac),
            **layers,
        }
