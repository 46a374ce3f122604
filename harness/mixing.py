"""Mixup and CutMix of training batches (timm's ``Mixup``), with the soft targets they make.

A mixed batch has soft targets ``[B, K]`` (the two labels' one-hot vectors weighted by the
mixing factor, label smoothing on top); the loss takes them where the trainer passes its labels
(:class:`SoftTargets`), and the trainer's accuracy counts a sample correct when the prediction is
the label with the larger weight. Static images are mixed once and repeated at every step, as
they were; frame data is mixed frame by frame with the same factor and, for CutMix, the same box
in every frame.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from harness.config import MixupConfig
from harness.training import SequenceLoss


class SoftTargets(SequenceLoss):
    """``loss`` on the batch's soft targets, whatever labels the trainer gives it (the hard ones,
    which it counts its accuracy against)."""

    def __init__(self, loss: SequenceLoss, soft: Tensor) -> None:
        self.loss, self.soft = loss, soft

    def step(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.loss.step(logits, self.soft)

    def __call__(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.loss(logits, self.soft)


class BatchMixing:
    """timm's ``Mixup`` set from a cell's :class:`harness.config.MixupConfig`.

    ``mix(inputs, target)`` takes the network's input sequence ``[T, B, ...]`` and the labels
    ``[B]`` and returns the mixed sequence, the hard labels (the larger weight's) and the soft
    targets ``[B, K]``. timm mixes pairs (sample ``i`` with sample ``B - 1 - i``) and wants an
    even batch: in an odd one (the last of an epoch) the middle sample stays as it is, with its
    own (smoothed) target. Its draws come from numpy's global random state, which a cell seeds
    and its checkpoint holds.
    """

    def __init__(self, cfg: MixupConfig, num_classes: int, temporal: bool) -> None:
        from timm.data import Mixup

        self.cfg, self.num_classes, self.temporal = cfg, num_classes, temporal
        self.mixup = Mixup(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, prob=cfg.prob,
                           switch_prob=cfg.switch_prob, mode=cfg.mode, label_smoothing=cfg.label_smoothing,
                           num_classes=num_classes)

    def __call__(self, inputs: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        from timm.data.mixup import mixup_target

        T, B = inputs.shape[:2]
        if self.temporal:  # [T, B, C, H, W] -> [B, T*C, H, W]: one factor and one box for every frame
            images = inputs.transpose(0, 1).reshape(B, -1, *inputs.shape[-2:])
        else:  # every step holds the same image
            images = inputs[0]
        even = B - B % 2
        if even < B:  # keep the middle sample out of the pairs
            keep = B // 2
            order = torch.cat([torch.arange(keep), torch.arange(keep + 1, B), torch.tensor([keep])]).to(inputs.device)
            images, target = images[order], target[order]
        mixed, soft = images, mixup_target(target, self.num_classes, smoothing=self.cfg.label_smoothing)
        if even:
            mixed = images.clone()
            part, soft_part = self.mixup(mixed[:even], target[:even])
            mixed[:even], soft = part, torch.cat([soft_part, soft[even:]])
        if even < B:  # back to the loader's order
            back = torch.argsort(order)
            mixed, soft = mixed[back], soft[back]
        if self.temporal:
            out = mixed.reshape(B, T, *inputs.shape[2:]).transpose(0, 1)
        else:
            out = mixed.unsqueeze(0).expand(T, *mixed.shape)
        return out, soft.argmax(-1), soft.to(inputs.dtype if inputs.is_floating_point() else torch.float32)


def build_mixing(cfg: MixupConfig, loss: Any, num_classes: int, temporal: bool) -> BatchMixing | None:
    """The cell's batch mixing, or None when both alphas are 0.

    :raises ValueError: the cell's loss does not take soft targets (``soft_targets = True`` on
        its class says it does).
    """
    if not (cfg.mixup_alpha or cfg.cutmix_alpha):
        return None
    if not getattr(loss, "soft_targets", False):
        raise ValueError(f"mixup/cutmix need a loss that takes soft targets; {type(loss).__name__} does not "
                         "(a SequenceLoss declares soft_targets = True and accepts targets [B, K])")
    return BatchMixing(cfg, num_classes, temporal)
