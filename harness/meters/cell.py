"""The meters of one cell, driven by the runner phase by phase (train, test).

Which meters run is the cell's ``meters`` setting (``"firing_rate"``, ``"memory"``,
``"synops"``); SynOps are counted in the evaluation phases while :attr:`CellMeters.count_synops`
is true (the runner sets it for the last epoch's evaluation, or for every one with
``synops_epochs = "every"``: counting costs about a third of an evaluation); speed (samples per second, seconds per iteration, data-loading time) is always
measured -- it costs two clock reads per batch.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from harness.meters.firing import FiringRateMeter
from harness.meters.memory import SavedTensorMeter, cuda_peak_bytes, peak_rss_bytes, reset_cuda_peak

METERS = ("firing_rate", "memory", "synops")


def model_size(model: nn.Module) -> dict[str, int]:
    """Parameter count and bytes of parameters plus buffers (the state dict's tensors)."""
    params = sum(p.numel() for p in model.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    nbytes += sum(b.numel() * b.element_size() for b in model.buffers())
    return {"num_parameters": params, "model_size_bytes": nbytes}


class CellMeters:
    """``begin(phase)``, then per batch ``data_ready(seconds)`` and ``with iteration():`` around the
    trainer's step, then ``end(phase, samples, batches)`` returns that phase's metrics."""

    def __init__(self, model: nn.Module, device: torch.device, enabled: Iterable[str] = METERS) -> None:
        enabled = set(enabled)
        unknown = enabled - set(METERS)
        if unknown:
            raise ValueError(f"unknown meter(s) {sorted(unknown)}; known: {', '.join(METERS)}")
        self.device = device
        self.firing = FiringRateMeter(model) if "firing_rate" in enabled else None
        self.saved = SavedTensorMeter() if "memory" in enabled else None
        self.synops = None
        if "synops" in enabled:
            from harness.meters.synops import SynOpsMeter

            self.synops = SynOpsMeter(model)
        self.count_synops = True  # whether the next evaluation phase counts synaptic operations
        self._counting = False
        self._phase = ""
        self._start = 0.0
        self._data_s = 0.0
        self._cuda_peak = 0

    def begin(self, phase: str) -> None:
        self._phase, self._data_s, self._cuda_peak = phase, 0.0, 0
        if self.firing is not None:
            self.firing.reset()
            self.firing.attach()
        if self.saved is not None:
            self.saved.reset()
        self._counting = self.synops is not None and phase != "train" and self.count_synops
        if self._counting:  # operations are counted at inference
            self.synops.reset()
            self.synops.attach()
        self._start = time.perf_counter()

    def data_ready(self, seconds: float) -> None:
        """Time spent waiting for the loader and moving the batch to the device."""
        self._data_s += seconds

    @contextlib.contextmanager
    def iteration(self) -> Iterator[None]:
        """One training or evaluation step: saved-for-backward and CUDA peaks are per iteration."""
        measure_memory = self.saved is not None and self._phase == "train"
        if measure_memory:
            reset_cuda_peak(self.device)
            with self.saved:  # type: ignore[union-attr]
                yield
            self._cuda_peak = max(self._cuda_peak, cuda_peak_bytes(self.device))
        else:
            yield

    def end(self, phase: str, samples: int, batches: int) -> dict[str, float]:
        """Metrics of the phase; call after the phase's results were read back (a device sync)."""
        wall = time.perf_counter() - self._start
        out: dict[str, float] = {
            f"{phase}_samples_per_s": samples / wall if wall > 0 else 0.0,
            f"{phase}_s_per_iter": wall / batches if batches else 0.0,
            f"{phase}_data_time_s": self._data_s,
            f"{phase}_time_s": wall,
        }
        if self.firing is not None:
            self.firing.detach()
            out.update(self.firing.metrics(phase))
        if self._counting:
            self.synops.detach()
            out.update(self.synops.metrics(max(samples, 1)))
            self._counting = False
        if self.saved is not None and phase == "train":
            out["train_saved_bytes_peak"] = float(self.saved.max_peak_bytes)
            if self.device.type == "cuda":
                out["train_cuda_peak_bytes"] = float(self._cuda_peak)
            out["peak_rss_bytes"] = float(peak_rss_bytes())
        return out

    def close(self) -> None:
        if self.firing is not None:
            self.firing.detach()
        if self.synops is not None:
            self.synops.detach()
