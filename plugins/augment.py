"""Augmentations shared by the static-image and the event data sets.

* :class:`Cutout`: the DeVries-Taylor square, on an image ``[C, H, W]`` or on all frames of an
  event sample ``[F, C, H, W]`` alike; the CIFAR sets use it after ``Normalize``, NDA (the
  CIFAR10-DVS augmentation) uses its square as one of its operations.
* :func:`official_cutout`: the Cutout of the paper's official training code, which is a
  random-erasing variant, built from timm's ``RandomErasing``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

CutoutKind = Literal["square", "random_erasing"]
CUTOUT_KINDS: tuple[str, ...] = ("square", "random_erasing")


class Cutout:
    """Cutout (DeVries & Taylor 2017, arXiv:1708.04552): one square hole set to 0.

    As in the authors' code (github.com/uoguelph-mlrg/Cutout, ``util/cutout.py``, one hole): the
    centre ``(y, x)`` is a uniformly random pixel, the square spans rows ``y - length//2`` to
    ``y + length//2`` (exclusive) and likewise columns, clipped at the borders, and is set to 0 in
    every channel (and every frame). So a hole near a border is smaller than ``length x length``,
    and an odd ``length`` gives a side of ``length - 1``, as in the original. Applied after
    ``Normalize``, 0 is the data set's mean colour; on event frames, no events. ``length = 0`` is
    the identity. The input is not modified.

    The centre is drawn from torch's global RNG (unlike the original's ``np.random``): a cell's
    ``torch.manual_seed`` makes it reproducible, and DataLoader workers, which torch seeds from
    that RNG, each draw different holes. ``generator`` overrides the RNG (tests).
    """

    def __init__(self, length: int, generator: torch.Generator | None = None) -> None:
        if length < 0:
            raise ValueError(f"cutout must be >= 0 (0 turns it off), got {length}")
        self.length = length
        self.generator = generator

    def draw(self, height: int, width: int) -> tuple[int, int]:
        """The hole's centre: a row, then a column, each uniform."""
        y = int(torch.randint(height, (1,), generator=self.generator))
        x = int(torch.randint(width, (1,), generator=self.generator))
        return y, x

    def erase(self, img: Tensor, y: int, x: int) -> Tensor:
        """``img`` (``[..., H, W]``) with the square centred on ``(y, x)`` set to 0."""
        if self.length == 0:
            return img
        h, w = img.shape[-2:]
        half = self.length // 2
        out = img.clone()
        out[..., max(0, y - half) : min(h, y + half), max(0, x - half) : min(w, x + half)] = 0
        return out

    def __call__(self, img: Tensor) -> Tensor:
        if self.length == 0:
            return img
        return self.erase(img, *self.draw(*img.shape[-2:]))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(length={self.length})"


def official_cutout() -> Any:
    """The official code's Cutout as timm's ``RandomErasing``: with probability 0.5, one rectangle
    of 2-40% of the image's area and aspect ratio 0.4-2.5, filled with one random colour.

    The official code (``datasets/data.py``) calls torchtoolbox's ``Cutout()`` with its defaults
    on the PIL image right after RandomCrop: probability 0.5, area 2-40%, aspect ratio uniform in
    0.4-2.5, filled with one random grey level in [0, 255). timm's version, applied to the
    normalized tensor (so a flip before it changes nothing in distribution), matches the
    probability, the area range and the aspect-ratio range; it differs in two details, stated
    here rather than hand-written around: the aspect ratio is log-uniform (the same range), and
    the fill is one random normal value per channel in normalized units (``mode = "rand"``: a
    random colour, where torchtoolbox's is a random grey). Its draws come from Python's
    ``random`` (the geometry) and torch's RNG (the colour): a cell seeds both, DataLoader workers
    seed both, and a checkpoint holds both.
    """
    from timm.data.random_erasing import RandomErasing

    return RandomErasing(probability=0.5, min_area=0.02, max_area=0.4, min_aspect=0.4, max_aspect=2.5,
                         mode="rand", max_count=1, device="cpu")


def cutout_transform(kind: str, length: int) -> list[Any]:
    """The cutout step of a training pipeline (after ``Normalize``): ``[]`` when ``length`` is 0.

    :raises ValueError: an unknown ``kind`` (the option's validation names the choices first).
    """
    if length == 0:
        return []
    if kind == "square":
        return [Cutout(length)]
    if kind == "random_erasing":
        return [official_cutout()]
    raise ValueError(f"cutout_kind must be one of {', '.join(CUTOUT_KINDS)}, got {kind!r}")
