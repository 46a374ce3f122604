"""Data parallelism within a cell: one process per GPU under ``torchrun``.

``torchrun --nproc_per_node=N -m harness run --matrix F`` starts N processes that run the same
cells together: each trains on its shard of every batch (the matrix's ``batch_size`` is the global
batch, split evenly), gradients are averaged before every optimizer step, and the normalizers
synchronize the statistics the method needs across processes (``harness.snn.distributed``), so a
run on N processes equals a run on one process with the union batch. Process 0 alone talks to
the tracking store, writes the result files and checkpoints; the others stay silent.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Parallel:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environment() -> Parallel:
    """The process's place in a ``torchrun`` launch (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Parallel(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def current() -> Parallel:
    """This process's place in the initialized process group (one process if there is none)."""
    if dist.is_available() and dist.is_initialized():
        return Parallel(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return Parallel()


def init_from_environment() -> Parallel:
    """Join the process group ``torchrun`` describes (NCCL with GPUs, gloo otherwise); no-op for one process."""
    par = from_environment()
    if par.enabled and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(par.local_rank)
        dist.init_process_group(backend)
    return par


def device_for(name: str, par: Parallel) -> torch.device | None:
    """Under data parallelism on GPUs each process uses its own: ``cuda:<local rank>``."""
    if par.enabled and name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", par.local_rank)
    return None


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
