"""Training memory: bytes saved for backward, CUDA peak allocation, process RSS (paper Fig. 2a).

* :class:`SavedTensorMeter` -- the peak, within one training iteration, of the bytes held by
  tensors that autograd saved for backward (``torch.autograd.graph.saved_tensors_hooks``). A
  storage saved several times (a weight used at every step, a view of an activation) counts once
  while any of its saves is alive; a save stops counting when autograd frees it (after the
  backward that used it). Device-independent and deterministic: it measures what the training
  schedule keeps alive, which is what online training makes flat in T.
* :func:`cuda_peak_bytes` -- ``torch.cuda.max_memory_allocated`` since the last
  :func:`reset_cuda_peak` (per iteration on CUDA).
* :func:`peak_rss_bytes` -- the process's peak resident set size so far (``getrusage``).
"""

from __future__ import annotations

import resource
import sys
import threading
from typing import Any

import torch
from torch import Tensor


class _Saved:
    """What the pack hook stores in the graph: the tensor, and a release when autograd drops it."""

    __slots__ = ("tensor", "key", "meter", "__weakref__")

    def __init__(self, tensor: Tensor, key: Any, meter: SavedTensorMeter) -> None:
        self.tensor, self.key, self.meter = tensor, key, meter

    def __del__(self) -> None:
        self.meter._release(self.key)


def _storage_key(t: Tensor) -> tuple[Any, int]:
    try:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr:
            return (str(t.device), ptr), storage.nbytes()
    except (RuntimeError, NotImplementedError):  # tensors without a plain storage
        pass
    return ("id", id(t)), t.numel() * t.element_size()


class SavedTensorMeter:
    """``with meter: loss.backward() ...`` -- peak live saved-for-backward bytes in the block.

    After the block, :attr:`peak_bytes` is that block's peak; :attr:`max_peak_bytes` the largest
    over all blocks since :meth:`reset`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # CUDA backward frees saves from autograd's device threads
        self._live: dict[Any, list[int]] = {}  # storage key -> [saves alive, bytes]
        self._bytes = 0
        self._peak = 0
        self._ctx: Any = None
        self.peak_bytes = 0
        self.max_peak_bytes = 0

    def reset(self) -> None:
        self.peak_bytes = self.max_peak_bytes = 0

    def __enter__(self) -> SavedTensorMeter:
        with self._lock:
            self._peak = self._bytes  # saves still alive from outside the block count from the start
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)
        self._ctx = None
        self.peak_bytes = self._peak
        self.max_peak_bytes = max(self.max_peak_bytes, self._peak)

    @property
    def live_bytes(self) -> int:
        return self._bytes

    def _pack(self, t: Tensor) -> _Saved:
        key, nbytes = _storage_key(t)
        with self._lock:
            entry = self._live.get(key)
            if entry is None:
                self._live[key] = [1, nbytes]
                self._bytes += nbytes
                if self._bytes > self._peak:
                    self._peak = self._bytes
            else:
                entry[0] += 1
        return _Saved(t, key, self)

    @staticmethod
    def _unpack(saved: _Saved) -> Tensor:
        return saved.tensor

    def _release(self, key: Any) -> None:
        with self._lock:
            entry = self._live.get(key)
            if entry is None:
                return
            entry[0] -= 1
            if entry[0] == 0:
                del self._live[key]
                self._bytes -= entry[1]


def reset_cuda_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def cuda_peak_bytes(device: torch.device) -> int:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
