"""What a data-set plugin returns, and how the runner turns samples into input sequences."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler, Subset, get_worker_info


@dataclass
class DatasetBundle:
    """A data set as the runner needs it.

    ``temporal=False``: a sample is one static image ``[C, H, W]``, fed unchanged at every step.
    ``temporal=True``: a sample is a frame sequence ``[T, C, H, W]``, one frame per step.
    ``files``: the files (or directories, taken whole) the samples were read from; a cell's run
    records their checksum (:func:`harness.provenance.data_checksum`). Empty: not recorded.
    """

    train: Dataset
    test: Dataset
    in_channels: int
    num_classes: int
    input_size: tuple[int, int]
    temporal: bool = False
    files: tuple[Path, ...] = ()


def train_subset(dataset: Dataset, size: int | None, seed: int = 0) -> Dataset:
    """A fixed random subset of ``size`` samples (the same for every cell: ``seed`` is not the cell's)."""
    n = len(dataset)  # type: ignore[arg-type]
    if size is None or size >= n:
        return dataset
    g = torch.Generator().manual_seed(seed)
    return Subset(dataset, torch.randperm(n, generator=g)[:size].tolist())


def to_sequence(x: Tensor, time_steps: int, temporal: bool) -> Tensor:
    """A batch as the network's input sequence ``[T, B, ...]``.

    Static images are repeated at every step (a view, no copy); frame data ``[B, F, ...]``
    is moved to time-major order and runs for its ``F`` frames -- fewer than ``time_steps`` when a
    training augmentation dropped frames (DVS-Gesture keeps 14 of 20), never more.
    """
    if temporal:
        if x.shape[1] > time_steps:
            raise ValueError(f"the data set gives {x.shape[1]} frames per sample but time_steps = {time_steps}")
        return x.transpose(0, 1)
    return x.unsqueeze(0).expand(time_steps, *x.shape)


class EpochShuffle(Sampler[Any]):
    """The training order: a fresh permutation every epoch, a function of ``(seed, epoch)`` only.

    Under data parallelism process ``rank`` of ``world`` takes every ``world``-th index of the
    permutation (the first ``n - n % world`` of it), so that the processes' ``i``-th batches of
    ``B / world`` samples together are the single-process ``i``-th batch of ``B``. Depending on
    nothing but the seed and the epoch, the order also survives a resume from a checkpoint.

    With ``with_epoch=True`` it yields ``(epoch, index)`` pairs, for :class:`WorkerSeeding`.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1, with_epoch: bool = False) -> None:
        self.size, self.seed, self.rank, self.world = size, seed, rank, world
        self.with_epoch = with_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (self.size - self.size % self.world) // self.world

    def __iter__(self):  # type: ignore[no-untyped-def]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.size, generator=g)
        usable = self.size - self.size % self.world
        indices = perm[:usable][self.rank :: self.world].tolist()
        if self.with_epoch:
            return iter([(self.epoch, i) for i in indices])
        return iter(indices)


class EpochSequence(Sampler):
    """The evaluation order (0, 1, ..., n - 1) as ``(epoch, index)`` pairs, for a
    :class:`WorkerSeeding` test set: random transforms in persistent test-loading workers then
    draw, at every epoch, what they drew in an uninterrupted run."""

    def __init__(self, size: int) -> None:
        self.size, self.epoch = size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter([(self.epoch, i) for i in range(self.size)])


class WorkerSeeding(Dataset):
    """Reseeds every data-loading worker when an epoch starts, for persistent workers.

    A persistent worker (kept alive from epoch to epoch, which saves starting the workers again
    every epoch) draws its random numbers from a seed chosen once, when it started: a cell resumed
    at epoch ``k`` would then draw other augmentations than an uninterrupted run. Items are
    ``(epoch, index)`` pairs (:class:`EpochShuffle` with ``with_epoch=True``); when a worker sees
    a new epoch it seeds Python, NumPy and torch with a function of ``(seed, epoch, worker id)``,
    so what a worker draws in an epoch depends on nothing else (batches go to the workers in a
    fixed rotation). In the main process (no workers) nothing is reseeded.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed
        self._epoch: int | None = None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        worker = get_worker_info()
        if worker is not None and epoch != self._epoch:
            seed = (self.seed * 1_000_003 + epoch) * 10_007 + worker.id
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
            self._epoch = epoch
        return self.dataset[index]
