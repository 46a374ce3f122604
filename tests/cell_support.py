"""Shared by the tests that call :func:`harness.runner.run_cell` directly, without MLflow."""

from __future__ import annotations

from typing import Any

from harness.config import CellConfig, Component, OptimizerConfig
from harness.matrix import Cell
from harness.testing import RecordingHook


class Recorder(RecordingHook):
    """Stands in for the plugin manager's hook relay: records every call, and refuses a hook or
    an argument the plugin API does not have (the kit's :class:`harness.testing.RecordingHook`)."""


class StopAfterEpoch1(Recorder):
    """Stops the cell as Ctrl-C would, once epoch 1 is checkpointed and told."""

    def on_epoch_end(self, cell, epoch, metrics):
        if epoch == 1:
            raise KeyboardInterrupt


def interrupted_then_resumed(cell: Cell, registry: Any, checkpoint_dir: Any) -> Any:
    """Run ``cell`` until the end of epoch 1 (its checkpoint kept), then again from the
    checkpoint to its end; returns the resumed run's result."""
    import pytest

    from harness.runner import run_cell

    with pytest.raises(KeyboardInterrupt):
        run_cell(cell, registry, StopAfterEpoch1(), checkpoint_dir=checkpoint_dir)
    return run_cell(cell, registry, Recorder(), checkpoint_dir=checkpoint_dir)


def tiny_cell(seed: int = 0, *, epochs: int = 1, batch_size: int = 32, **kw: Any) -> Cell:
    """A digits cell small enough to train in a second: vgg_small 4-8, T = 2, 384 samples, on the
    CPU (bit-identical comparisons; ``device=`` overrides)."""
    kw.setdefault("device", "cpu")
    cfg = CellConfig(
        dataset=Component("digits", {"test_fraction": 0.2, "split_seed": 0}),
        model=Component("vgg_small", {"channels": [4, 8]}),
        normalizer=Component("vanilla_bn", {"eps": 1e-5, "momentum": 0.1, "affine": True}),
        threshold=Component("fixed", {"theta": 1.0}),
        trainer=Component("bptt", {"max_grad_norm": 0.0}),
        loss=Component("tet", {"mse_weight": 0.05}),
        epochs=epochs, batch_size=batch_size, time_steps=2, seed=seed, train_subset=384,
        optimizer=OptimizerConfig(lr=0.05), **kw,
    )
    return Cell(id=f"c{seed}", index=0, config=cfg, axes={"seed": seed})
