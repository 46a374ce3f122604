"""Host traffic of code that runs on an accelerator, observable without one.

A training loop that is right on the CPU can still be wrong or slow on a GPU in two ways that
the CPU never shows: a tensor on the wrong device (CPU tensors mixed with CUDA ones), and hidden
host synchronizations (``.item()``, ``bool(t)``, ``.tolist()``, a copy from the host in the hot
loop), each of which stalls the GPU's queue. Both show on PyTorch's ``meta`` device, which has no
data but enforces the same same-device rule as CUDA (0-d CPU tensors are allowed, as on CUDA):

* run the real loop with the model and batches on ``meta``: a CPU tensor reaching a device
  computation raises ``Tensor on device cpu is not on the expected device meta``;
* inside :class:`HostTraffic`, every read of a device tensor on the host and every copy of host
  data to the device is recorded with the line of harness or plugin code that caused it. With
  ``placeholders=True`` reads of ``meta`` tensors return ones (a ``meta`` tensor has no values),
  so the loop runs to its end and every sync point of a whole cell is listed.

On a real GPU the same class records the same events (``placeholders`` off), beside PyTorch's own
``torch.cuda.set_sync_debug_mode``. Used by the test suite (``tests/test_device_placement.py``) and
by ``scripts/gpu-check.sh``.

What counts (``Event.kind``):

* ``"read"``: a value of a device tensor read on the host: ``aten._local_scalar_dense``
  (``.item()``, ``bool()``, ``int()``, ``float()``), ``aten.equal``, and operations whose output
  shape depends on the data (``nonzero``, ``masked_select``, boolean-mask indexing, ``unique``);
* ``"to_host"``: a device tensor copied to the CPU (``.cpu()``, ``.tolist()``, ``.numpy()`` after
  ``.cpu()``);
* ``"to_device"``: host data copied to the device: ``torch.tensor`` / ``as_tensor`` /
  ``Tensor.new_tensor`` with a device target, or ``.to()`` / ``.copy_()`` of a CPU tensor onto
  the device (a batch transfer is one, by design: once per batch).
"""

from __future__ import annotations

import os
import sys
import traceback
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["Event", "HostTraffic"]

_aten = torch.ops.aten
_READS = {
    _aten._local_scalar_dense.default,
    _aten.equal.default,
    _aten.nonzero.default,
    _aten.masked_select.default,
    _aten._unique2.default,
    _aten.unique_dim.default,
    _aten.unique_consecutive.default,
}
_TORCH_DIR = os.path.join(os.path.dirname(os.path.abspath(torch.__file__)), "")
_THIS_FILE = os.path.abspath(__file__)


@dataclass(frozen=True)
class Event:
    """One host read or host-to-device copy: ``kind`` (``read``, ``to_host``, ``to_device``),
    the operation, and ``site``: ``file:function`` of the innermost frame outside PyTorch (the
    code that asked for it), ``line`` its line number."""

    kind: str
    op: str
    site: str
    line: int

    def __str__(self) -> str:
        return f"{self.kind} {self.op} at {self.site}:{self.line}"


def _site() -> tuple[str, int]:
    for frame, lineno in traceback.walk_stack(sys._getframe(2)):
        path = os.path.abspath(frame.f_code.co_filename)
        if path == _THIS_FILE or path.startswith(_TORCH_DIR) or "importlib" in path:
            continue
        parts = path.split(os.sep)
        short = os.sep.join(parts[-2:])
        return f"{short}:{frame.f_code.co_name}", lineno
    return "?", 0


def _device_type(x: Any) -> str | None:
    if isinstance(x, torch.Tensor):
        return x.device.type
    if isinstance(x, torch.device):
        return x.type
    if isinstance(x, str):
        return torch.device(x).type
    if isinstance(x, int):
        return "cuda"  # a bare index means a CUDA device
    return None


class _Reads(TorchDispatchMode):
    def __init__(self, audit: HostTraffic) -> None:
        super().__init__()
        self.audit = audit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        audit = self.audit
        if func in _READS:
            src = args[0]
            if isinstance(src, torch.Tensor) and src.device.type == audit.device_type:
                audit._record("read", func.__name__.split(".")[0])
                if audit.placeholders and src.device.type == "meta":
                    return _placeholder(func, src, args, kwargs)
        elif func is _aten._to_copy.default:
            src, target = args[0], kwargs.get("device")
            if src.device.type == audit.device_type and target is not None and torch.device(target).type == "cpu":
                audit._record("to_host", "to")
                if audit.placeholders and src.device.type == "meta":
                    return torch.ones(src.shape, dtype=kwargs.get("dtype") or src.dtype)
        elif func is _aten.copy_.default:
            dst, src = args[0], args[1]
            if dst.device.type == "cpu" and src.device.type == audit.device_type:
                audit._record("to_host", "copy_")
                if audit.placeholders and src.device.type == "meta":
                    return dst.fill_(1)
        return func(*args, **kwargs)


def _placeholder(func: Any, src: torch.Tensor, args: tuple, kwargs: dict) -> Any:
    if func is _aten._local_scalar_dense.default:
        return True if src.dtype == torch.bool else (1.0 if src.dtype.is_floating_point else 1)
    if func is _aten.equal.default:
        return True
    if func is _aten.nonzero.default:
        return torch.zeros((0, src.dim()), dtype=torch.long, device=src.device)
    return func(*args, **kwargs)


class _Copies(TorchFunctionMode):
    _FROM_HOST_DATA = ("tensor", "as_tensor", "asarray", "new_tensor")

    def __init__(self, audit: HostTraffic) -> None:
        super().__init__()
        self.audit = audit

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        audit = self.audit
        if name in self._FROM_HOST_DATA:
            data = args[1] if name == "new_tensor" else (args[0] if args else kwargs.get("data"))
            target = kwargs.get("device")
            if target is None and name == "new_tensor":
                target = args[0].device
            if not isinstance(data, torch.Tensor) and target is not None and _device_type(target) == audit.device_type:
                audit._record("to_device", name)
        elif name in ("to", "cuda") and args and isinstance(args[0], torch.Tensor) and args[0].device.type == "cpu":
            if name == "cuda":
                target: Any = "cuda"
            else:
                target = torch._C._nn._parse_to(*args[1:], **kwargs)[0]
            if target is not None and _device_type(target) == audit.device_type:
                audit._record("to_device", name)
        elif name == "copy_" and len(args) >= 2 and isinstance(args[1], torch.Tensor):
            if args[1].device.type == "cpu" and args[1].dim() > 0 and args[0].device.type == audit.device_type:
                audit._record("to_device", name)
        return func(*args, **kwargs)


class HostTraffic:
    """Records host reads and host-to-device copies on ``device_type`` inside ``with``.

    ::

        with HostTraffic("meta") as traffic:
            run_cell(cell_on_meta, registry, hook)
        traffic.count("read")            # host reads of device tensors
        traffic.by_site()                # Counter of (kind, site)

    :param device_type: the accelerator's device type (``"meta"`` in tests, ``"cuda"`` on a GPU).
    :param placeholders: reads of ``meta`` tensors return ones instead of raising (a ``meta``
        tensor has no data), so that a loop can run to its end under audit.
    """

    def __init__(self, device_type: str = "meta", placeholders: bool = True) -> None:
        self.device_type = device_type
        self.placeholders = placeholders
        self.events: list[Event] = []
        self._modes: list[Any] = []
        self.paused = False

    def _record(self, kind: str, op: str) -> None:
        if self.paused:
            return
        site, line = _site()
        self.events.append(Event(kind, op, site, line))

    def __enter__(self) -> HostTraffic:
        self._modes = [_Reads(self), _Copies(self)]
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)
        self._modes = []

    def mark(self) -> int:
        """The number of events so far: ``events[mark:]`` are the ones after this point."""
        return len(self.events)

    def count(self, kind: str | None = None, since: int = 0) -> int:
        return sum(1 for e in self.events[since:] if kind is None or e.kind == kind)

    def by_site(self, since: int = 0) -> Counter[tuple[str, str]]:
        """``(kind, site) -> count`` for the events from ``since`` on."""
        return Counter((e.kind, e.site) for e in self.events[since:])

    def report(self, since: int = 0) -> str:
        """One line per (kind, site) with its count, most frequent first."""
        lines = [f"{n:6d}  {kind:9s} {site}" for (kind, site), n in self.by_site(since).most_common()]
        return "\n".join(lines) or "(none)"
