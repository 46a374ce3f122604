"""Data parallelism within a cell: one process per GPU under ``torchrun``.

``torchrun --nproc_per_node=N -m harness run --matrix F`` starts N processes that run the same
cells together: each trains on its shard of every batch (the matrix's ``batch_size`` is the global
batch, split evenly), gradients are averaged before every optimizer step, and the normalizers
synchronize the statistics the method needs across processes (``harness.snn.distributed``), so a
run on N processes equals a run on one process with the union batch. Process 0 alone talks to
the tracking store, writes the result files and checkpoints; the others stay silent.

Failures: the processes of a cell meet at fixed points outside the training step (after the cell
is built, at the end of every epoch, and every 25 training steps in the divergence check); an
error in one process between two such points (a data file that cannot be read, a failing
observer, an evaluation error) is held until the next one, where every process stops the cell
together (:func:`agree`) and the matrix goes on. An error in the middle of a training step, where
the other processes may be waiting for this one inside a collective, cannot be agreed on: the run
ends (:class:`GroupBroken`) and ``torchrun`` stops the other processes; the next run resumes the
cell from its last checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from harness.errors import HarnessError


class ProcessFailed(HarnessError):
    """Another process of a data-parallel cell failed it; this process stops the cell too."""


class GroupBroken(HarnessError):
    """An error struck one process in the middle of a training step, while the others may be
    waiting for it in a collective that it will never join. The processes cannot agree any more:
    the run must end (``torchrun`` then stops the other processes), or the next cell's collectives
    would pair with this cell's."""


@dataclass(frozen=True)
class Parallel:
    rank: int = 0
    world_size: int = 1
    local_rank: int | None = 0  # index on the node (LOCAL_RANK); None when the launcher did not say

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _local_rank() -> int | None:
    value = os.environ.get("LOCAL_RANK")
    return int(value) if value not in (None, "") else None


def from_environment() -> Parallel:
    """The process's place in a ``torchrun`` launch (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = _local_rank()
    return Parallel(int(os.environ.get("RANK", "0")), world, local if local is not None or world > 1 else 0)


def current() -> Parallel:
    """This process's place in the initialized process group (one process if there is none).
    ``local_rank`` is ``LOCAL_RANK``, or ``None`` if the launcher did not set it (it is never
    guessed from the global rank: on several nodes that would name another node's GPU)."""
    if dist.is_available() and dist.is_initialized():
        return Parallel(dist.get_rank(), dist.get_world_size(), _local_rank())
    return Parallel()


def backend_for_this_machine() -> str:
    """gloo for CPU tensors, and NCCL for CUDA tensors where there are GPUs: one process group
    serves cells on either device (``"cpu:gloo,cuda:nccl"``)."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def init_from_environment() -> Parallel:
    """Join the process group ``torchrun`` describes; no-op for one process. With GPUs, the
    process's current CUDA device becomes ``cuda:<LOCAL_RANK>`` (when it has one; a cell that
    needs a GPU on a process without one fails with what to do, see
    :func:`harness.devices.resolve_device`)."""
    par = from_environment()
    if par.enabled and not dist.is_initialized():
        if torch.cuda.is_available() and par.local_rank is not None and par.local_rank < torch.cuda.device_count():
            torch.cuda.set_device(par.local_rank)
        dist.init_process_group(backend_for_this_machine())
    return par


def shutdown() -> None:
    """Leave the process group (at the end of ``harness run``)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def took_part() -> bool:
    """Whether this process joined a process group of several processes (now or earlier)."""
    return bool(os.environ.get("WORLD_SIZE", "1") not in ("", "1")) or (dist.is_available() and dist.is_initialized())


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if current().enabled:
        dist.all_reduce(t)
    return t


def broadcast_object(obj: Any, par: Parallel) -> Any:
    """Process 0's ``obj`` on every process."""
    if not par.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any, par: Parallel) -> list[Any]:
    """Every process's ``obj``, by rank, on every process (``[obj]`` for one process)."""
    if not par.enabled:
        return [obj]
    out: list[Any] = [None] * par.world_size
    dist.all_gather_object(out, obj)
    return out


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def agree(
    error: BaseException | None, par: Parallel, where: str, payload: Any = None, then: str = "every process stopped the cell"
) -> list[Any]:
    """A meeting point of the processes of a data-parallel cell, outside the training step: each
    says whether it failed since the last one (``error``), and sends ``payload``. If any process
    failed, every process raises (the one that failed its own error, the others
    :class:`ProcessFailed` naming it), so that they all stop the cell here together; otherwise
    returns every process's payload, by rank. One object all-gather; for one process, raises
    ``error`` if there is one and returns ``[payload]``.
    """
    if not par.enabled:
        if error is not None:
            raise error
        return [payload]
    gathered = gather_objects((None if error is None else describe(error), payload), par)
    failures = [(rank, text) for rank, (text, _) in enumerate(gathered) if text is not None]
    if failures:
        if error is not None:
            raise error
        rank, text = failures[0]
        raise ProcessFailed(f"process {rank} of {par.world_size} failed {where} ({text}); {then}")
    return [p for _, p in gathered]


class GradientAveragingOptimizer:
    """Wraps an optimizer: ``step()`` first averages every gradient across processes.

    Trainers call ``optimizer.step()`` whenever their schedule says (after a sequence, or after
    every step for ``update = "step"``), so averaging there works for any trainer, without
    wrapping the model. Everything else is the wrapped optimizer's.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.__dict__["optimizer"] = optimizer
        self.__dict__["_synchronized"] = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.optimizer, name, value)

    def synchronize(self) -> None:
        """Average the gradients now (once per step): before clipping, say, so that the clipped
        update is the union batch's (``harness.training.clip_grad_norm`` calls this)."""
        if self._synchronized:
            return
        world = dist.get_world_size()
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= world
            offset = 0
            for g in grads:
                n = g.numel()
                g.copy_(flat[offset : offset + n].view_as(g))
                offset += n
        self.__dict__["_synchronized"] = True

    def step(self, closure: Any = None) -> Any:
        self.synchronize()
        try:
            return self.optimizer.step(closure)
        finally:
            self.__dict__["_synchronized"] = False
