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

import contextlib
import os
from collections.abc import Iterator
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


def exit_process(code: int) -> None:
    """End this process now, after flushing its output, without interpreter finalization: with a
    TCP store, a process group's background threads can abort the process there (SIGABRT,
    "terminate called without an active exception") after a successful run."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


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

    Overlap, as DDP does it: the backward pass inside :meth:`last_backward` (the last one before
    the next ``step()``; :func:`harness.training.last_backward` is how a trainer says so) averages
    the gradients while it runs. Parameters are grouped into buckets of about ``bucket_bytes``
    (in reverse order of registration, roughly the order in which backward produces their
    gradients); each bucket's all-reduce starts, asynchronously, as soon as backward has produced
    all of its gradients, and ``step()`` waits for them. Buckets start in the same order on every
    process (a bucket waits for the ones before it), as collectives must. Without
    :meth:`last_backward` (a third party's trainer), ``step()`` averages everything at once, after
    the backward. Both give the same numbers. Like DDP without ``find_unused_parameters``, every
    process's backward must give the same parameters a gradient.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, bucket_bytes: int = 25 * 2**20) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        buckets: list[list[torch.Tensor]] = []
        size = bucket_bytes
        for p in reversed(params):
            if size >= bucket_bytes:
                buckets.append([])
                size = 0
            buckets[-1].append(p)
            size += p.numel() * p.element_size()
        state = {
            "optimizer": optimizer, "_synchronized": False, "_buckets": buckets,
            "_bucket_of": {id(p): k for k, bucket in enumerate(buckets) for p in bucket},
            "_armed": False, "_ready": [0] * len(buckets), "_launched": [],
        }
        self.__dict__.update(state)
        self.__dict__["_hooks"] = [p.register_post_accumulate_grad_hook(self._gradient_ready) for p in params]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.optimizer, name, value)

    @contextlib.contextmanager
    def last_backward(self) -> Iterator[None]:
        """The backward pass inside is the last before ``step()``: average while it runs."""
        self.__dict__["_armed"] = True
        try:
            yield
        except BaseException:
            self.__dict__["_armed"] = False
            raise
        self.__dict__["_armed"] = False
        for k in range(len(self._launched), len(self._buckets)):  # parameters that got no gradient
            self._launch(k)

    def _gradient_ready(self, param: torch.Tensor) -> None:
        if not self._armed:
            return
        self._ready[self._bucket_of[id(param)]] += 1
        while len(self._launched) < len(self._buckets):
            k = len(self._launched)
            if self._ready[k] < len(self._buckets[k]):
                break
            self._launch(k)

    def _launch(self, k: int) -> None:
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self._buckets[k]])
        self._launched.append((k, dist.all_reduce(flat, async_op=True), flat))

    def synchronize(self) -> None:
        """Average the gradients now (once per step): before clipping, say, so that the clipped
        update is the union batch's (``harness.training.clip_grad_norm`` calls this)."""
        if self._synchronized:
            return
        world = dist.get_world_size()
        if self._launched:  # started during the last backward: wait, then write the averages back
            for k, work, flat in self._launched:
                work.wait()
                flat /= world
                offset = 0
                for p in self._buckets[k]:
                    n = p.numel()
                    if p.grad is not None:
                        p.grad.copy_(flat[offset : offset + n].view_as(p))
                    offset += n
            self._launched.clear()
            self.__dict__["_ready"] = [0] * len(self._buckets)
        else:
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
