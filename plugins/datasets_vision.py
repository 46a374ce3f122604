"""Built-in static-image data sets of the paper: ``cifar10``, ``cifar100`` and ``imagenet``.

Each is read with torchvision's own reader (``CIFAR10``/``CIFAR100`` on the python-pickle
release, ``ImageFolder`` on the usual ILSVRC2012 folder tree) and carries the augmentation of the
paper's official code (docs/method.md section 8; github.com/zhuyaoyu/SNN-online-normalization,
``datasets/data.py``); its Cutout is an option: the DeVries-Taylor square by default, or the
official code's random-erasing variant (``cutout_kind``, see :mod:`snn_harness_plugins.augment`).
Nothing is downloaded at import time, and nothing at all unless a matrix
sets ``download = true`` for a CIFAR set; missing files fail with one
:class:`~snn_harness_plugins.datasets.DatasetNotFoundError` naming the expected layout and how to
get the data.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from harness import hookimpl
from harness.data import DatasetBundle
from snn_harness_plugins.augment import Cutout, CutoutKind, cutout_transform
from snn_harness_plugins.datasets import DatasetNotFoundError

__all__ = ["Cutout", "cifar10", "cifar100", "cifar_transforms", "imagenet", "imagenet_transforms"]

# The official code normalizes CIFAR-10 *and* CIFAR-100 with these values (kuangliu/pytorch-cifar's
# CIFAR-10 statistics; the std is not the per-pixel std 0.247/0.243/0.261, but what the code uses).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CIFAR_PAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"
IMAGENET_PAGE = "https://image-net.org/download.php"
VALPREP_SCRIPT = "https://raw.githubusercontent.com/soumith/imagenetloader.torch/master/valprep.sh"


def cifar_transforms(cutout: int = 16, normalize: bool = True, cutout_kind: str = "square") -> tuple[Any, Any]:
    """The (train, test) transforms of the CIFAR sets.

    Train: RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor + Normalize + Cutout
    (``cutout_kind``: ``"square"``, :class:`~snn_harness_plugins.augment.Cutout` of side
    ``cutout``; ``"random_erasing"``, :func:`~snn_harness_plugins.augment.official_cutout`;
    ``cutout = 0``: none); test: ToTensor + Normalize. ``normalize = False`` leaves pixels in [0, 1].
    """
    from torchvision import transforms as T

    norm = [T.Normalize(CIFAR_MEAN, CIFAR_STD)] if normalize else []
    cut = cutout_transform(cutout_kind, cutout)
    train = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), *norm, *cut])
    test = T.Compose([T.ToTensor(), *norm])
    return train, test


def cifar10(root: str = "data", download: bool = False, cutout: int = 16, normalize: bool = True,
            cutout_kind: CutoutKind = "square") -> DatasetBundle:
    """CIFAR-10 (50k/10k 32x32 colour images, 10 classes), read with torchvision's ``CIFAR10``.

    Expects the python release under ``<root>/cifar-10-batches-py/``. ``download = true`` lets
    torchvision fetch and extract it (off by default). Paper settings (Table 3): VGGSNN or
    ResNet-19, T = 4, 300 epochs, batch 128, SGD lr 0.1, weight decay 5e-4, eps_mse 0.05.
    Augmentation as the official code: RandomCrop(32, padding 4) + horizontal flip + Normalize with
    mean (0.4914, 0.4822, 0.4465) and std (0.2023, 0.1994, 0.2010); then Cutout: with
    ``cutout_kind = "square"`` (the default) the DeVries-Taylor square of side ``cutout``, with
    ``"random_erasing"`` the official code's own variant (p = 0.5, a rectangle of 2-40% of the
    image; ``cutout`` then only turns it on). ``cutout = 0`` turns either off.
    torchvision checks the md5 of every file before loading.
    """
    from torchvision.datasets import CIFAR10

    return _cifar(CIFAR10, "CIFAR-10", "cifar10", 10, root, download, cutout, normalize, cutout_kind)


def cifar100(root: str = "data", download: bool = False, cutout: int = 16, normalize: bool = True,
             cutout_kind: CutoutKind = "square") -> DatasetBundle:
    """CIFAR-100 (50k/10k 32x32 colour images, 100 fine classes), read with torchvision's ``CIFAR100``.

    Expects the python release under ``<root>/cifar-100-python/``. ``download = true`` lets
    torchvision fetch and extract it (off by default). Paper settings (Table 3): as CIFAR-10 (T = 4,
    300 epochs, batch 128, lr 0.1, weight decay 5e-4, eps_mse 0.05), and the same augmentation,
    normalized with CIFAR-10's mean/std, as the official code does.
    """
    from torchvision.datasets import CIFAR100

    return _cifar(CIFAR100, "CIFAR-100", "cifar100", 100, root, download, cutout, normalize, cutout_kind)


def _cifar(
    cls: Any, title: str, name: str, num_classes: int, root: str, download: bool, cutout: int, normalize: bool,
    cutout_kind: str = "square",
) -> DatasetBundle:
    # torchvision's reader is used unchanged, md5 check included: a truncated or foreign file fails
    # here, not as a pickle error or silently wrong labels mid-run. torchvision hashes all ~180 MB
    # once per split: about a second per load. (The tests write tiny files and stub torchvision's
    # check_integrity instead.)
    train_tf, test_tf = cifar_transforms(cutout, normalize, cutout_kind)
    if _cifar_missing_files(cls, root) and not download:
        raise DatasetNotFoundError(_cifar_problem(cls, title, name, root, download, None))
    try:
        train = cls(root, train=True, transform=train_tf, download=download)
        test = cls(root, train=False, transform=test_tf)
    except Exception as exc:  # no network, a proxy, a failed md5 check, a broken archive
        raise DatasetNotFoundError(_cifar_problem(cls, title, name, root, download, exc)) from exc
    folder = Path(root) / cls.base_folder
    return DatasetBundle(train=train, test=test, in_channels=3, num_classes=num_classes, input_size=(32, 32),
                         files=tuple(folder / f for f in _cifar_files(cls)))


def _cifar_files(cls: Any) -> list[str]:
    return [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]


def _cifar_missing_files(cls: Any, root: str) -> list[str]:
    folder = Path(root) / cls.base_folder
    return [f for f in _cifar_files(cls) if not (folder / f).is_file()]


def _cifar_problem(cls: Any, title: str, name: str, root: str, download: bool, exc: Exception | None) -> str:
    from torchvision.datasets.utils import calculate_md5

    folder = Path(root) / cls.base_folder
    missing = _cifar_missing_files(cls, root)
    if missing:
        problem = f"missing {', '.join(missing)}"
    else:  # every file is there, so torchvision rejected one: name those whose md5 differs
        md5s = dict(cls.train_list + cls.test_list)
        md5s[cls.meta["filename"]] = cls.meta["md5"]
        bad = [f for f, md5 in md5s.items() if calculate_md5(folder / f) != md5]
        problem = (
            f"{', '.join(bad)} failed torchvision's md5 check (a partial download or not the official "
            "files; delete the folder and get it again)"
            if bad
            else "torchvision could not read it"
        )
    if exc is not None:
        problem += f"; torchvision: {type(exc).__name__}: {str(exc).rstrip('.')}"
    elif not download:
        problem += "; download is off"
    return (
        f"{title} not found or unusable under {root}: expected {folder}/ holding "
        f"{', '.join(_cifar_files(cls))} (the python version, as extracted from {cls.filename}); "
        f"{problem}. To get it: set `download = true` in [options.dataset.{name}] (torchvision fetches "
        f"{cls.url} and checks its md5), or download that archive yourself ({CIFAR_PAGE}) and "
        f"extract it in {root}."
    )


def imagenet_transforms(image_size: int = 224, resize: int = 256) -> tuple[Any, Any]:
    """The (train, test) transforms of ImageNet, from timm's ``create_transform``, set to the
    official code's: train RandomResizedCrop(``image_size``, scale 0.08-1, ratio 3/4-4/3,
    bilinear) + horizontal flip (p = 0.5), no colour jitter (timm's default 0.4 is turned off);
    test Resize(``resize``, the shorter side) + CenterCrop(``image_size``); both normalized with
    ImageNet's mean and std. timm's crop draws its box from Python's ``random`` (torchvision's
    from torch's): a cell seeds both, DataLoader workers seed both.
    """
    from timm.data import create_transform

    common = {"interpolation": "bilinear", "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    train = create_transform(image_size, is_training=True, hflip=0.5, vflip=0.0, color_jitter=None, **common)
    test = create_transform(image_size, is_training=False, crop_pct=crop_fraction(image_size, resize), **common)
    return train, test


def crop_fraction(image_size: int, resize: int) -> float:
    """timm's ``crop_pct`` for a test Resize of ``resize``: timm resizes to
    ``floor(image_size / crop_pct)``, which ``image_size / resize`` can miss by one in floating
    point (e.g. 16 / (16 / 93) = 92.99...); one step down of the fraction puts it back."""
    if not 0 < image_size <= resize:
        raise ValueError(f"imagenet: resize ({resize}) must be at least image_size ({image_size}), both positive")
    fraction = image_size / resize
    if math.floor(image_size / fraction) < resize:
        fraction = math.nextafter(fraction, 0.0)
    return fraction


def imagenet(root: str = "data/imagenet", image_size: int = 224, resize: int = 256) -> DatasetBundle:
    """ImageNet ILSVRC2012 (1.28M/50k images, 1000 classes) as two ``ImageFolder`` trees.

    Expects ``<root>/train/<wnid>/*.JPEG`` and ``<root>/val/<wnid>/*.JPEG`` (validation images
    sorted into the same class folders). No download option: the images are only given to
    registered users by image-net.org. Paper settings (Table 3): SEW-ResNet-34 or NF-ResNet-34,
    T = 4, 100 epochs, batch 256, SGD lr 0.1, weight decay 2e-5, eps_mse 0.05. Augmentation as the
    official code: train RandomResizedCrop(``image_size``) + horizontal flip; test
    Resize(``resize``) + CenterCrop(``image_size``); both normalized with ImageNet's mean
    (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225). Built by timm (:func:`imagenet_transforms`).
    """
    from torchvision.datasets import ImageFolder

    train_tf, test_tf = imagenet_transforms(image_size, resize)
    base = Path(root)
    absent = [str(base / split) for split in ("train", "val") if not (base / split).is_dir()]
    if absent:
        raise DatasetNotFoundError(_imagenet_problem(root, f"no folder {' or '.join(absent)}"))
    try:
        train = ImageFolder(str(base / "train"), transform=train_tf)
        test = ImageFolder(str(base / "val"), transform=test_tf)
    except FileNotFoundError as exc:  # no class folders (val not sorted), or a class folder without images
        raise DatasetNotFoundError(_imagenet_problem(root, f"torchvision: {str(exc).rstrip('.')}")) from exc
    if train.classes != test.classes:  # the labels would not mean the same class
        only_train = sorted(set(train.classes) - set(test.classes))
        only_val = sorted(set(test.classes) - set(train.classes))
        raise DatasetNotFoundError(
            _imagenet_problem(
                root,
                f"train and val have different class folders (only in train: {_few(only_train)}; "
                f"only in val: {_few(only_val)})",
            )
        )
    return DatasetBundle(
        train=train, test=test, in_channels=3, num_classes=len(train.classes), input_size=(image_size, image_size),
        files=(base / "train", base / "val"),
    )


def _few(names: list[str], n: int = 5) -> str:
    return (", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")) or "none"


def _imagenet_problem(root: str, problem: str) -> str:
    base = Path(root)
    return (
        f"ImageNet not found or unusable under {root}: expected the ImageFolder layout "
        f"{base / 'train'}/<wnid>/*.JPEG and {base / 'val'}/<wnid>/*.JPEG (the same 1000 class "
        f"folders n01440764 ... in both); {problem}. To get it: register at {IMAGENET_PAGE}, download "
        "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar, untar each per-class archive of the "
        "training set into train/<wnid>/, and sort the 50,000 validation images into val/<wnid>/, "
        f"e.g. with the usual valprep script ({VALPREP_SCRIPT}). There is no download option: "
        "image-net.org gives the images only to registered users."
    )


@hookimpl
def register_datasets(registry) -> None:
    registry.add("cifar10", cifar10)
    registry.add("cifar100", cifar100)
    registry.add("imagenet", imagenet)
