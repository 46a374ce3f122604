"""Data-loading workers: they persist across epochs (no restart per epoch) and are reseeded at
every epoch, so a cell that resumes draws the augmentations an uninterrupted run draws."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.data import Dataset

from cell_support import Recorder, tiny_cell
from harness import get_registry, hookimpl
from harness.config import Component
from harness.data import DatasetBundle, EpochShuffle, WorkerSeeding
from harness.runner import CellInterrupted, run_cell


class Noisy(Dataset):
    """8x8 images with fresh random noise at every access: an augmentation that draws from torch's RNG."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 1, 8, 8, generator=g)
        self.y = torch.arange(n) % 3

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i] + 0.5 * torch.rand(1, 8, 8), self.y[i]


class NoisyData:
    @hookimpl
    def register_datasets(self, registry):
        def noisy() -> DatasetBundle:
            """Random-noise augmentation in the workers."""
            return DatasetBundle(Noisy(96), Noisy(32), 1, 3, (8, 8))

        registry.add("noisy", noisy)


class StopAt(Recorder):
    def on_epoch_end(self, **kw):
        if kw["epoch"] == 2:
            raise KeyboardInterrupt


def _cell(workers: int):
    cell = tiny_cell(0, epochs=3, batch_size=16, meters=(), num_workers=workers)
    return dataclasses.replace(cell, config=dataclasses.replace(cell.config, dataset=Component("noisy", {})))


@pytest.mark.slow
def test_a_cell_with_persistent_workers_resumes_to_the_uninterrupted_result(tmp_path):
    registry = get_registry(extra_plugins=[(NoisyData(), "test-noisy")])
    reference = run_cell(_cell(2), registry, Recorder(), tmp_path / "a")
    with pytest.raises(CellInterrupted):
        run_cell(_cell(2), registry, StopAt(), tmp_path / "b")
    resumed = run_cell(_cell(2), registry, Recorder(), tmp_path / "b")
    assert reference.status == resumed.status == "finished"
    for key in ("train_loss", "test_loss", "train_top1", "test_top1"):
        assert resumed.metrics[key] == reference.metrics[key], key


def test_each_worker_draws_from_a_stream_of_the_seed_epoch_and_worker_only():
    from torch.utils.data import DataLoader

    ds = WorkerSeeding(Noisy(16), seed=4)

    def epoch_draws(loader, sampler, epoch):
        sampler.set_epoch(epoch)
        return torch.cat([x for x, _ in loader])

    sampler = EpochShuffle(16, seed=4, with_epoch=True)
    persistent = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=2, persistent_workers=True)
    first = [epoch_draws(persistent, sampler, e) for e in (1, 2, 3)]
    fresh_sampler = EpochShuffle(16, seed=4, with_epoch=True)
    fresh = DataLoader(ds, batch_size=4, sampler=fresh_sampler, num_workers=2, persistent_workers=True)
    assert torch.equal(epoch_draws(fresh, fresh_sampler, 3), first[2])  # epoch 3 alone, from new workers: the same draws
    assert not torch.equal(first[1], first[2])
    assert list(EpochShuffle(5, seed=1, with_epoch=True)) == [(0, i) for i in EpochShuffle(5, seed=1)]
