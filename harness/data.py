"""What a data-set plugin returns, and how the runner turns samples into input sequences."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler, Subset


@dataclass
class DatasetBundle:
    """A data set as the runner needs it.

    ``temporal=False``: a sample is one static image ``[C, H, W]``, fed unchanged at every step.
    ``temporal=True``: a sample is a frame sequence ``[T, C, H, W]``, one frame per step.
    """

    train: Dataset
    test: Dataset
    in_channels: int
    num_classes: int
    input_size: tuple[int, int]
    temporal: bool = False


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


class EpochShuffle(Sampler[int]):
    """The training order: a fresh permutation every epoch, a function of ``(seed, epoch)`` only.

    Under data parallelism process ``rank`` of ``world`` takes every ``world``-th index of the
    permutation (the first ``n - n % world`` of it), so that the processes' ``i``-th batches of
    ``B / world`` samples together are the single-process ``i``-th batch of ``B``. Depending on
    nothing but the seed and the epoch, the order also survives a resume from a checkpoint.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.size, self.seed, self.rank, self.world = size, seed, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (self.size - self.size % self.world) // self.world

    def __iter__(self):  # type: ignore[no-untyped-def]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.size, generator=g)
        usable = self.size - self.size % self.world
        return iter(perm[:usable][self.rank :: self.world].tolist())
