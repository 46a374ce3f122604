"""The progress observer: plain log lines off a terminal, a live rich display on one."""

from __future__ import annotations

import io
from pathlib import Path

from harness.config import CellConfig, Component
from harness.matrix import Cell, Matrix
from harness.runner import CellResult
from harness.session import MatrixRun
from snn_harness_plugins.progress import ProgressDisplay


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def _drive(display: ProgressDisplay) -> None:
    cfg = CellConfig(
        dataset=Component("digits"), model=Component("vgg_small"), normalizer=Component("vanilla_bn"),
        trainer=Component("bptt"), epochs=2, batch_size=8, time_steps=2,
    )
    cell = Cell(id="abc123", index=0, config=cfg, axes={"seed": 0})
    matrix = Matrix(name="m", path="m.toml", description="", axes={"seed": [0]}, cells=[cell], skipped=[], excluded=0, filtered_out=0)
    run = MatrixRun(matrix=matrix, results_dir=Path("results"), tracking_uri="sqlite:///x.db", experiment="e")
    display.on_matrix_start(run)
    display.on_cell_start(cell, {"device": "cpu", "num_parameters": 10, "warnings": ["the checkpoint holds CUDA random states of 8 GPU(s)"]})
    for epoch in (1, 2):
        for b in (1, 2, 3):
            display.on_batch_end(cell, "train", b, 3)
        display.on_batch_end(cell, "test", 1, 1)
        display.on_epoch_end(cell, epoch, {"train_loss": 1.5, "train_top1": 0.5, "test_top1": 0.625, "epoch_time_s": 1.0})
    display.on_cell_end(cell, CellResult("abc123", "seed=0", "finished", {"test_top1": 0.625}, 2, 2.0))
    display.on_matrix_end(run, [CellResult("abc123", "seed=0", "finished", {"test_top1": 0.625}, 2, 2.0)])


def test_plain_lines_when_not_a_terminal():
    stream = _Stream(tty=False)
    _drive(ProgressDisplay(stream))
    out = stream.getvalue()
    assert "\x1b[" not in out  # no escape codes in logs
    assert "[cell 1/1] seed=0 (abc123) started on cpu, 10 parameters" in out
    assert "  warning: the checkpoint holds CUDA random states of 8 GPU(s)" in out  # what a resume could not restore
    assert "  epoch 2/2: loss 1.5000, train 50.00%, test 62.50%, 1.0s" in out
    assert "[cell 1/1] seed=0: finished, test top-1 62.50% (2.0s)" in out
    assert "matrix m: 1 finished in" in out


def test_live_display_on_a_terminal():
    stream = _Stream(tty=True)
    display = ProgressDisplay(stream)
    _drive(display)
    out = stream.getvalue()
    assert display.live and "\x1b[" in out  # a live rich display
    assert "epoch 2/2" in out and "cells" in out and display.progress is None  # stopped at the end
