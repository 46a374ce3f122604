"""Mixup and CutMix (timm's ``Mixup``) of training batches: the mixed inputs and soft targets,
the TET loss on soft targets, frame data mixed alike in every frame, odd batches, and a cell."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness.config import Component, MixupConfig
from harness.mixing import BatchMixing, SoftTargets, build_mixing
from harness import hookimpl
from harness.registry import get_registry
from harness.runner import run_cell
from snn_harness_plugins.losses import TETLoss

from cell_support import Recorder, interrupted_then_resumed, tiny_cell


def test_tet_on_one_hot_soft_targets_is_tet_on_the_labels_and_on_soft_ones_the_formula():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 5, requires_grad=True)  # [T, B, K]
    y = torch.randint(0, 5, (6,))
    loss = TETLoss(0.05)
    hard = loss(logits, y)
    (g_hard,) = torch.autograd.grad(hard, logits)
    soft = loss(logits, F.one_hot(y, 5).float())
    (g_soft,) = torch.autograd.grad(soft, logits)
    torch.testing.assert_close(soft, hard, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_soft, g_hard, rtol=1e-6, atol=1e-7)
    p = torch.softmax(torch.randn(6, 5), -1)
    by_hand = torch.stack([0.95 * -(torch.log_softmax(logits[t], -1) * p).sum(-1).mean() + 0.05 * ((logits[t] - p) ** 2).mean()
                           for t in range(3)]).mean()
    torch.testing.assert_close(loss(logits, p), by_hand, rtol=1e-6, atol=1e-7)
    wrapped = SoftTargets(loss, p)  # what the trainer sees: its labels are ignored for the loss
    torch.testing.assert_close(wrapped(logits, y), by_hand, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(wrapped.step(logits[1], y), loss.step(logits[1], p))


@pytest.mark.parametrize("alphas", [(1.0, 0.0), (0.0, 1.0)], ids=["mixup", "cutmix"])
def test_static_images_are_mixed_as_timm_mixes_them_and_repeated_at_every_step(alphas):
    from timm.data import Mixup

    cfg = MixupConfig(mixup_alpha=alphas[0], cutmix_alpha=alphas[1], label_smoothing=0.1)
    x = torch.rand(8, 3, 12, 12)
    y = torch.arange(8) % 4
    np.random.seed(3)
    out, hard, soft = BatchMixing(cfg, 4, temporal=False)(x.unsqueeze(0).expand(3, *x.shape), y)
    np.random.seed(3)
    ref_x, ref_soft = Mixup(mixup_alpha=alphas[0], cutmix_alpha=alphas[1], label_smoothing=0.1, num_classes=4)(x.clone(), y)
    assert out.shape == (3, 8, 3, 12, 12) and all(torch.equal(out[t], ref_x) for t in range(3))
    assert not torch.equal(ref_x, x)  # something was mixed
    torch.testing.assert_close(soft, ref_soft)
    assert torch.equal(hard, soft.argmax(-1))


def test_the_loaders_batch_is_not_modified():
    x = torch.rand(4, 2, 6, 6)
    before = x.clone()
    np.random.seed(0)
    BatchMixing(MixupConfig(mixup_alpha=1.0), 3, temporal=False)(x.unsqueeze(0).expand(2, *x.shape), torch.tensor([0, 1, 2, 0]))
    frames = torch.rand(4, 5, 2, 6, 6)
    kept = frames.clone()
    BatchMixing(MixupConfig(cutmix_alpha=1.0), 3, temporal=True)(frames.transpose(0, 1), torch.tensor([0, 1, 2, 0]))
    assert torch.equal(x, before) and torch.equal(frames, kept)


def test_frame_data_gets_one_box_for_every_frame():
    frames = torch.rand(6, 4, 2, 10, 10)  # [B, F, C, H, W]
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    np.random.seed(5)
    out, _, soft = BatchMixing(MixupConfig(cutmix_alpha=1.0), 3, temporal=True)(frames.transpose(0, 1), y)
    out = out.transpose(0, 1)  # back to [B, F, ...]
    changed = out != frames
    boxes = changed.any(2)  # [B, F, H, W]
    assert changed.any()
    for b in range(6):
        assert all(torch.equal(boxes[b, f], boxes[b, 0]) for f in range(4))  # the same box in every frame
        assert torch.equal(out[b][:, :, boxes[b, 0]], frames[5 - b][:, :, boxes[b, 0]])  # from its partner
    assert torch.allclose(soft.sum(-1), torch.ones(6))


def test_an_odd_batch_leaves_its_middle_sample_alone_with_its_own_target():
    x = torch.rand(5, 1, 4, 4)
    y = torch.tensor([0, 1, 2, 1, 0])
    np.random.seed(1)
    out, hard, soft = BatchMixing(MixupConfig(mixup_alpha=1.0), 3, temporal=False)(x.unsqueeze(0).expand(2, *x.shape), y)
    assert torch.equal(out[0, 2], x[2]) and torch.equal(soft[2], F.one_hot(torch.tensor(2), 3).float()) and hard[2] == 2
    assert not torch.equal(out[0, 0], x[0])


def test_mixing_needs_a_loss_that_takes_soft_targets_and_is_off_by_default():
    class HardOnly:
        pass

    assert build_mixing(MixupConfig(), HardOnly(), 10, False) is None
    with pytest.raises(ValueError, match="mixup/cutmix need a loss that takes soft targets; HardOnly does not"):
        build_mixing(MixupConfig(mixup_alpha=0.2), HardOnly(), 10, False)


@pytest.mark.parametrize("trainer", ["bptt", "online"])
def test_a_cell_trains_on_mixed_batches_and_a_resume_draws_the_same_mixes(trainer, tmp_path):
    registry = get_registry()
    cell = tiny_cell(0, epochs=2, batch_size=128)
    cfg = dataclasses.replace(cell.config, trainer=Component(trainer),
                              mixup=MixupConfig(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1))
    cell = dataclasses.replace(cell, config=cfg)
    plain = run_cell(dataclasses.replace(cell, config=dataclasses.replace(cfg, mixup=MixupConfig())), registry, Recorder())
    straight = run_cell(cell, registry, Recorder())
    assert straight.status == "finished", straight.error
    assert straight.metrics["train_loss"] != plain.metrics["train_loss"]

    resumed = interrupted_then_resumed(cell, registry, tmp_path)
    for key in ("train_loss", "train_top1", "test_top1", "test_loss"):
        assert resumed.metrics[key] == straight.metrics[key], key


def test_the_mixup_keys_are_checked_where_the_matrix_is_read(tmp_path):
    from harness.errors import ConfigError
    from harness.matrix import load_matrix

    from conftest import TINY_DEFAULTS

    registry = get_registry()
    path = tmp_path / "m.toml"
    for body, message in [("mixup_alpha = -1.0", r"key 'mixup.mixup_alpha'.*at least 0"),
                          ('mode = "row"', r"key 'mixup.mode'.*'batch' or 'pair' or 'elem'"),
                          ("cutmix = 1.0", r"unknown key 'mixup.cutmix' \(did you mean 'mixup.cutmix_alpha'\?\)")]:
        path.write_text('name = "m"\n' + TINY_DEFAULTS + f"[defaults.mixup]\n{body}\n")
        with pytest.raises(ConfigError, match=message):
            load_matrix(path, registry)
    path.write_text('name = "m"\n' + TINY_DEFAULTS + "[defaults.mixup]\ncutmix_alpha = 1.0\n")
    assert load_matrix(path, registry).cells[0].config.mixup.cutmix_alpha == 1.0


def test_mixing_with_a_loss_that_takes_no_soft_targets_is_refused_at_load(tmp_path):
    """The cell is impossible before it trains: the matrix says so (a skip with the reason)."""
    from harness.errors import IncompatibleCellError
    from harness.matrix import load_matrix
    from harness.training import SequenceLoss

    from conftest import TINY_DEFAULTS

    class HardLabelsOnly(SequenceLoss):
        def step(self, logits, target):
            return F.cross_entropy(logits, target)

    class Plugin:
        @staticmethod
        @hookimpl
        def register_losses(registry):
            registry.add("hard_ce", HardLabelsOnly)

    registry = get_registry(autoload=False, extra_plugins=[(Plugin, "hard")])
    path = tmp_path / "m.toml"
    defaults = TINY_DEFAULTS.replace('trainer = "bptt"', 'trainer = "bptt"\nloss = "hard_ce"')
    path.write_text('name = "m"\n' + defaults + "[defaults.mixup]\nmixup_alpha = 0.2\n")
    with pytest.raises(IncompatibleCellError, match="mixup/cutmix give soft targets, but loss 'hard_ce' does not take them"):
        load_matrix(path, registry)
