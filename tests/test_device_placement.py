"""The CUDA path, checked without a GPU: the real training and evaluation loop (trainer, meters,
divergence guard, checkpoints) with the model and batches on PyTorch's ``meta`` device, which
enforces the same-device rule CUDA does, under :class:`harness.devicecheck.HostTraffic`, which
records every host read and host-to-device copy with the code that asked for it.

Covers every normalizer x threshold x trainer combination the matrix allows, the paper models
with neuron dropout, frame (DVS-shaped) input, and a resume on the device from a checkpoint
written on the CPU (checkpoints are read onto the CPU). The loop may read from the device once
per pass and every 25 steps (the divergence check), never per step."""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter

import pytest
import torch
from torch.utils.data import TensorDataset

from cell_support import Recorder, tiny_cell
from harness import get_registry, hookimpl
from harness.config import Component
from harness.data import DatasetBundle
from harness.devicecheck import HostTraffic
from harness.matrix import expand
from harness.runner import CellInterrupted, DivergenceGuard, run_cell


@pytest.fixture(autouse=True)
def _quiet_meta_loads():
    with warnings.catch_warnings():  # load_state_dict into meta parameters is a no-op, and says so
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
        yield


class FrameData:
    """A frame data set (``temporal=True``): ``[F, 2, 8, 8]`` event-count frames, as DVS data sets give."""

    @hookimpl
    def register_datasets(self, registry):
        def frames(time_steps: int) -> DatasetBundle:
            """Synthetic DVS-shaped frames, one per step."""
            g = torch.Generator().manual_seed(0)
            x = torch.poisson(torch.rand(48, time_steps, 2, 8, 8, generator=g))
            y = torch.arange(48) % 4
            return DatasetBundle(TensorDataset(x[:32], y[:32]), TensorDataset(x[32:], y[32:]), 2, 4, (8, 8), temporal=True)

        registry.add("frames", frames)


@pytest.fixture(scope="module")
def reg():
    return get_registry(extra_plugins=[(FrameData(), "test-frames")])


def _all_combinations(reg) -> list:
    """Every normalizer x threshold x trainer cell the matrix allows (skipped ones left out)."""
    data = {
        "name": "meta",
        "defaults": {"dataset": "digits", "model": "vgg_small", "normalizer": "vanilla_bn", "trainer": "bptt",
                     "epochs": 2, "batch_size": 16, "time_steps": 2, "device": "meta", "train_subset": 64,
                     "max_train_batches": 2, "max_eval_batches": 1},
        "matrix": {"normalizer": reg.names("normalizer"), "threshold": reg.names("threshold"), "trainer": reg.names("trainer")},
        "options": {"model": {"vgg_small": {"channels": [4, 8]}}},
    }
    return expand(data, reg, source="meta.toml").cells


def _run_on_meta(cell, reg, checkpoint_dir=None) -> tuple:
    with HostTraffic("meta") as traffic:
        result = run_cell(cell, reg, Recorder(), checkpoint_dir)
    assert result.status == "finished", result.error
    return result, traffic


def test_every_allowed_combination_runs_its_whole_cell_on_the_device(reg, tmp_path):
    cells = _all_combinations(reg)
    names = {(c.config.normalizer.name, c.config.threshold.name, c.config.trainer.name) for c in cells}
    assert ("osr", "ots", "online") in names and ("tebn", "fixed", "bptt") in names and len(names) == len(cells)
    for cell in cells:  # two epochs: the checkpoint of epoch 1 is written from the device
        _run_on_meta(cell, reg, tmp_path)


def _meta_cell(reg, normalizer="osr", threshold="ots", trainer="online", trainer_options=None, **kw):
    cell = tiny_cell(0, device="meta", max_eval_batches=1, **kw)
    cfg = dataclasses.replace(
        cell.config,
        normalizer=Component(normalizer, reg.normalizers.info(normalizer).defaults()),
        threshold=Component(threshold, reg.thresholds.info(threshold).defaults()),
        trainer=Component(trainer, {**reg.trainers.info(trainer).defaults(), **(trainer_options or {})}),
    )
    return dataclasses.replace(cell, config=cfg)


@pytest.mark.parametrize("combo", [("osr", "ots", "online"), ("vanilla_bn", "fixed", "bptt"), ("bntt", "ots", "online"),
                                   ("tebn", "ots", "bptt"), ("vanilla_bn", "fixed", "online", {"gradient": "trace"})])
def test_no_host_read_or_host_copy_per_step(reg, combo):
    """Two more training batches add exactly their two batch transfers (inputs, labels) and nothing
    else: no ``.item()``, ``bool()``, ``.tolist()`` or copy from the host per step or per sequence."""
    traffic = {}
    for n in (2, 4):
        _, t = _run_on_meta(_meta_cell(reg, *combo, max_train_batches=n), reg)
        traffic[n] = t.by_site()
    extra = traffic[4] - traffic[2]
    assert extra == Counter({("to_device", "harness/runner.py:_run_epoch"): 4}), (
        f"per-step host traffic:\n{extra}\n(the cell with 4 batches:\n{traffic[4]})"
    )
    assert traffic[4] - extra == traffic[2]  # nothing disappeared either: the same events, per pass


def test_the_divergence_check_reads_back_once_every_25_steps_and_at_the_end(reg):
    net = torch.nn.Linear(3, 2).to("meta")
    guard = DivergenceGuard(net)
    guard.start(1)
    with HostTraffic("meta") as traffic:
        for step in range(1, 31):
            guard.step(step, torch.ones((), device="meta"))
        guard.check()
    assert [e.site for e in traffic.events] == ["harness/engine.py:check"] * 2  # DivergenceGuard.check


def test_the_paper_models_with_dropout_and_frame_input_run_on_the_device(reg):
    for model, trainer, normalizer in [("vggsnn", "online", "osr"), ("resnet19", "bptt", "tdbn"),
                                       ("sew_resnet34", "online", "vanilla_bn"), ("nf_resnet34", "bptt", "osr")]:
        cell = _meta_cell(reg, normalizer, "ots", trainer, max_train_batches=1)
        cfg = dataclasses.replace(cell.config, model=Component(model, {**reg.models.info(model).defaults(), "dropout": 0.1}))
        _run_on_meta(dataclasses.replace(cell, config=cfg), reg)
    frames = _meta_cell(reg, "osr", "ots", "online", max_train_batches=1)
    cfg = dataclasses.replace(frames.config, dataset=Component("frames", {}),
                              model=Component("vggsnn", {"dropout": 0.1, "classifier": (16,), "classifier_dropout": 0.5}))
    result, _ = _run_on_meta(dataclasses.replace(frames, config=cfg), reg)
    assert result.epochs_completed == 1


class StopAtEpoch(Recorder):
    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, **kw):
        if kw["epoch"] == self.epoch:
            raise KeyboardInterrupt


@pytest.mark.parametrize("eval_threshold", ["dynamic", "running"])
def test_a_cell_resumes_on_the_device_from_a_checkpoint_written_on_the_cpu(reg, tmp_path, eval_threshold):
    """Checkpoints are read onto the CPU; OTS's running thresholds (resized on load) must land on
    the module's device, or the first training batch after the resume mixes devices."""
    cpu = _meta_cell(reg, "osr", "ots", "online", max_train_batches=2, epochs=3)
    cfg = dataclasses.replace(cpu.config, device="cpu", threshold=Component("ots", {**cpu.config.threshold.options, "eval_threshold": eval_threshold}))
    cpu = dataclasses.replace(cpu, config=cfg)
    with pytest.raises(CellInterrupted):
        run_cell(cpu, reg, StopAtEpoch(1), tmp_path)  # told of epoch 1 after its checkpoint: that stays
    assert (tmp_path / cpu.id / "last.pt").exists()
    on_device = dataclasses.replace(cpu, config=dataclasses.replace(cfg, device="meta"))  # same id, same checkpoint
    recorder = Recorder()
    with HostTraffic("meta"):
        result = run_cell(on_device, reg, recorder, tmp_path)
    assert result.status == "finished", result.error
    (start,) = [kw for name, kw in recorder.calls if name == "on_cell_start"]
    assert start["info"]["resumed_from_epoch"] == 1 and start["info"]["device"] == "meta"
    assert [kw["epoch"] for name, kw in recorder.calls if name == "on_epoch_end"] == [2, 3]
