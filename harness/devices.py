"""Where a cell runs and how the backend is set for it: the device, mixed precision, determinism
and cuDNN's autotuner.

* :func:`resolve_device` turns the cell's ``device`` setting into a ``torch.device``. Under data
  parallelism (``torchrun``) every CUDA setting (``"auto"`` with GPUs, ``"cuda"``, ``"cuda:N"``)
  means this process's own GPU, ``cuda:<LOCAL_RANK>``: N processes never share GPU 0.
* :func:`backend_settings` applies a cell's ``deterministic`` and ``cudnn_benchmark`` settings for
  the duration of the cell and restores the previous ones after it (they are process-wide flags;
  the next cell must not inherit them).
* :func:`autocast` is the cell's ``precision``: ``"bfloat16"`` runs the trainer's steps under
  ``torch.autocast`` (normalizer and threshold statistics stay in float32).

What determinism the harness offers: on the CPU a cell's results are bit-identical from run to
run and across a resume. On a GPU, ``deterministic = true`` asks PyTorch for deterministic
algorithms (``torch.use_deterministic_algorithms``; an operation without one raises), turns
cuDNN's autotuner off and computes float32 matrix products and convolutions in full float32
precision (no TF32); the run then repeats bit for bit on the same GPU model, driver and library
versions. The built-in models and loss use only operations that have a deterministic CUDA
implementation there (global average pooling as a mean, the cross-entropy as a one-hot product);
a plugin's operation without one stops the cell with PyTorch's error naming it. Without it (the default) cuDNN picks the fastest algorithms (``cudnn_benchmark``), some
of which are not deterministic, and results vary in the last digits between runs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from harness.errors import HarnessError

PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str, rank: int = 0, world_size: int = 1, local_rank: int | None = 0) -> torch.device:
    """The device of a cell whose setting is ``name``, for this process.

    :param rank: this process's rank, ``world_size`` the number of processes of the cell, and
        ``local_rank`` its index among the processes of its node (``LOCAL_RANK``; ``None`` when
        the launcher did not say).
    :raises HarnessError: the device does not exist here, or a data-parallel process has no GPU
        of its own.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise HarnessError(f"device {name!r} is not a device PyTorch knows ({exc})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise HarnessError(f"device {name!r} requested but CUDA is not available; use device = \"auto\" or \"cpu\"")
        count = torch.cuda.device_count()
        if world_size > 1:
            if local_rank is None:
                raise HarnessError(
                    f"process {rank} of {world_size} does not know its GPU: LOCAL_RANK is not set. Launch with "
                    "torchrun (it sets LOCAL_RANK), or set LOCAL_RANK to the process's index on its node"
                )
            if local_rank >= count:
                raise HarnessError(
                    f"process {rank} of {world_size} has local rank {local_rank}, but its node has {count} visible "
                    f"GPU(s): start at most {count} process(es) per node (torchrun --nproc_per_node={count})"
                )
            return torch.device("cuda", local_rank)  # one GPU per process, whatever index the setting named
        if device.index is not None and device.index >= count:
            raise HarnessError(f"device {name!r} requested but only {count} GPU(s) are visible (cuda:0..cuda:{count - 1})")
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise HarnessError(f"device {name!r} requested but MPS is not available; use device = \"auto\" or \"cpu\"")
    return device


def _tf32_flags() -> list[tuple[Any, str]]:
    """The objects and attributes that choose TF32 for float32 matrix products and convolutions
    (PyTorch >= 2.9: ``fp32_precision``; earlier: ``allow_tf32``)."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision") and hasattr(cudnn, "conv"):
        return [(matmul, "fp32_precision"), (cudnn.conv, "fp32_precision"), (cudnn.rnn, "fp32_precision")]
    return [(matmul, "allow_tf32"), (cudnn, "allow_tf32")]


@contextlib.contextmanager
def backend_settings(deterministic: bool, cudnn_benchmark: bool) -> Iterator[None]:
    """The cell's backend flags inside the block; the previous ones are restored after it.

    ``deterministic``: ``torch.use_deterministic_algorithms(True)``, ``cudnn.deterministic``,
    no autotuner, no TF32 (and ``CUBLAS_WORKSPACE_CONFIG=:4096:8``, which deterministic cuBLAS
    needs, unless already set). Otherwise ``cudnn.benchmark = cudnn_benchmark``.
    """
    cudnn = torch.backends.cudnn
    saved = {
        "benchmark": cudnn.benchmark,
        "cudnn_deterministic": cudnn.deterministic,
        "algorithms": (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()),
        "tf32": [(obj, attr, getattr(obj, attr)) for obj, attr in _tf32_flags()],
        "cublas": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }
    try:
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            cudnn.deterministic, cudnn.benchmark = True, False
            for obj, attr in _tf32_flags():
                setattr(obj, attr, "ieee" if attr == "fp32_precision" else False)
        else:
            cudnn.benchmark = cudnn_benchmark
        yield
    finally:
        cudnn.benchmark, cudnn.deterministic = saved["benchmark"], saved["cudnn_deterministic"]
        enabled, warn_only = saved["algorithms"]
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        for obj, attr, value in saved["tf32"]:
            setattr(obj, attr, value)
        if saved["cublas"] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def autocast(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """A factory of the context every trainer step of the cell runs in: ``torch.autocast`` for
    ``precision = "bfloat16"`` or ``"float16"`` (CUDA only; with loss scaling,
    :mod:`harness.scaling`), nothing for ``"float32"``.

    :raises HarnessError: an unknown precision, or one the device cannot autocast to.
    """
    if precision not in PRECISIONS:
        raise HarnessError(f"precision {precision!r}: known precisions: {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext
    if dtype == torch.float16 and device.type != "cuda":
        raise HarnessError(f"precision 'float16' needs a CUDA device (its loss scaling is for GPUs), not {device}: "
                           "on the CPU use 'bfloat16' or 'float32'")
    try:
        with torch.autocast(device.type, dtype=dtype):
            pass
    except (RuntimeError, ValueError) as exc:
        raise HarnessError(f"precision {precision!r} is not supported on device {device} ({exc})") from None
    return lambda: torch.autocast(device.type, dtype=dtype)
