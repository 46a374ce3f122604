"""CIFAR-10/100 and ImageNet plugins through their real loading code: tiny CIFAR files written in
the python-pickle release format and read by torchvision's own ``CIFAR10``/``CIFAR100`` (only its
md5 comparison is stubbed: tiny files cannot carry the official checksums), a tiny ImageFolder
tree of JPEGs, the Cutout transform, the missing-data errors, and the options as a matrix sees them.
No test touches the network: sockets refuse to connect for the whole module."""

from __future__ import annotations

import os
import pickle
import socket

import numpy as np
import pytest
import torch

from harness import ConfigError, get_plugin_manager, get_registry
from harness.matrix import expand
from snn_harness_plugins import datasets_vision as vision
from snn_harness_plugins.datasets import DatasetNotFoundError
from snn_harness_plugins.datasets_vision import Cutout

# The values the official code normalizes with, written out (not imported) so a changed constant fails.
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a test tried to open a network connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def no_md5(monkeypatch):
    """torchvision's CIFAR reader, except that a file only has to exist (tiny files have other md5s)."""
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def _registry():
    # Before the module has its entry point, register it by hand; after, it is already there.
    pm = get_plugin_manager()
    return get_registry(extra_plugins=[] if pm.is_registered(vision) else [(vision, "vision")])


@pytest.fixture(scope="module")
def registry():
    return _registry()


# ---------------------------------------------------------------------------------------------
# Tiny CIFAR files in the release format
# ---------------------------------------------------------------------------------------------


def _pickle(path, obj) -> None:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


def _images(rng, n):
    """``n`` random [3, 32, 32] uint8 images without zeros (so a cutout hole is visible)."""
    return rng.integers(1, 256, (n, 3, 32, 32), dtype=np.uint8)


def _batch(images, labels, key, label_key):
    # One row per image: 1024 red, then 1024 green, then 1024 blue values, each row-major.
    return {"batch_label": key, label_key: [int(v) for v in labels], "data": images.reshape(len(images), 3072),
            "filenames": [f"img_{i}.png" for i in range(len(images))]}


def _fake_cifar10(root, per_batch=2, n_test=3, seed=0):
    """data_batch_1..5, test_batch and batches.meta under root/cifar-10-batches-py."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_x, train_y = _images(rng, 5 * per_batch), rng.integers(0, 10, 5 * per_batch)
    train_x[0, :, 0, 0] = (255, 0, 128)  # a known pixel at the top-left of the first image
    for b in range(5):
        s = slice(b * per_batch, (b + 1) * per_batch)
        _pickle(folder / f"data_batch_{b + 1}", _batch(train_x[s], train_y[s], f"training batch {b + 1} of 5", "labels"))
    test_x, test_y = _images(rng, n_test), rng.integers(0, 10, n_test)
    test_x[0, :, 0, 0] = (255, 0, 128)
    _pickle(folder / "test_batch", _batch(test_x, test_y, "testing batch 1 of 1", "labels"))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _pickle(folder / "batches.meta", {"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072})
    return train_x, train_y, test_x, test_y


def _fake_cifar100(root, n_train=6, n_test=4, seed=1):
    """train, test and meta under root/cifar-100-python."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    train_x, train_y = _images(rng, n_train), rng.integers(0, 100, n_train)
    test_x, test_y = _images(rng, n_test), rng.integers(0, 100, n_test)
    for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        batch = _batch(x, y, name, "fine_labels")
        batch["coarse_labels"] = [int(v) // 5 for v in y]
        _pickle(folder / name, batch)
    _pickle(folder / "meta", {"fine_label_names": [f"class_{i}" for i in range(100)],
                              "coarse_label_names": [f"super_{i}" for i in range(20)]})
    return train_x, train_y, test_x, test_y


def _normalized(images_uint8, mean=CIFAR_MEAN, std=CIFAR_STD):
    x = torch.tensor(images_uint8, dtype=torch.float32) / 255
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


# ---------------------------------------------------------------------------------------------
# CIFAR
# ---------------------------------------------------------------------------------------------


def test_cifar10_loads_the_release_format_through_the_registry(tmp_path, registry, no_md5):
    train_x, train_y, test_x, test_y = _fake_cifar10(tmp_path)
    bundle = registry.datasets["cifar10"](root=str(tmp_path))
    assert (bundle.in_channels, bundle.num_classes, bundle.input_size, bundle.temporal) == (3, 10, (32, 32), False)
    assert len(bundle.train) == 10 and len(bundle.test) == 3
    assert bundle.train.classes[1] == "automobile"
    folder = tmp_path / "cifar-10-batches-py"  # the files read, for the checksum the cell's run records
    assert sorted(bundle.files) == sorted(folder / f for f in
                                          ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                                           "data_batch_5", "test_batch", "batches.meta"])
    assert all(f.is_file() for f in bundle.files)
    # Labels in file order across the five batches.
    assert [bundle.train[i][1] for i in range(10)] == train_y.tolist()
    assert [bundle.test[i][1] for i in range(3)] == test_y.tolist()
    x, _ = bundle.test[2]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x, _normalized(test_x[2]), atol=1e-6)


def test_cifar_normalization_uses_the_official_mean_and_std(tmp_path, registry, no_md5):
    _fake_cifar10(tmp_path)
    x, _ = registry.datasets["cifar10"](root=str(tmp_path)).test[0]
    # Pixel (255, 0, 128): (1 - 0.4914)/0.2023, (0 - 0.4822)/0.1994, (128/255 - 0.4465)/0.2010.
    assert torch.allclose(x[:, 0, 0], torch.tensor([2.514087, -2.418255, 0.275912]), atol=1e-5)
    raw, _ = registry.datasets["cifar10"](root=str(tmp_path), normalize=False).test[0]
    assert torch.allclose(raw[:, 0, 0], torch.tensor([1.0, 0.0, 128 / 255])) and raw.min() >= 0 and raw.max() <= 1


def test_cifar_train_augmentation_is_random_and_seeded_test_transform_is_fixed(tmp_path, registry, no_md5):
    _fake_cifar10(tmp_path)
    bundle = registry.datasets["cifar10"](root=str(tmp_path))
    torch.manual_seed(0)
    a, b = bundle.train[0][0], bundle.train[0][0]
    assert a.shape == (3, 32, 32) and not torch.equal(a, b)
    torch.manual_seed(0)
    assert torch.equal(bundle.train[0][0], a)  # the cell's seed reproduces crop, flip and cutout
    assert torch.equal(bundle.test[1][0], bundle.test[1][0])


def test_cifar_train_pipeline_is_crop_flip_normalize_then_a_zeroed_cutout_square(tmp_path, registry, no_md5):
    from PIL import Image
    from torchvision import transforms as T

    _fake_cifar10(tmp_path)
    with_cut = registry.datasets["cifar10"](root=str(tmp_path)).train
    without = registry.datasets["cifar10"](root=str(tmp_path), cutout=0).train
    by_hand = T.Compose(
        [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)]
    )
    img = with_cut.data[0]
    for seed in range(5):
        torch.manual_seed(seed)
        ref = by_hand(Image.fromarray(img))
        torch.manual_seed(seed)
        assert torch.equal(without[0][0], ref)  # cutout = 0: exactly crop + flip + normalize
        torch.manual_seed(seed)
        cut = with_cut[0][0]
        hole = (cut != ref).any(0)
        # Same crop and flip (drawn first), then one axis-aligned block zeroed in every channel.
        assert hole.any() and (cut[:, hole] == 0).all() and torch.equal(cut[:, ~hole], ref[:, ~hole])
        rows, cols = hole.any(1).nonzero().flatten(), hole.any(0).nonzero().flatten()
        assert len(rows) <= 16 and len(cols) <= 16 and hole.sum() == len(rows) * len(cols)


def test_cifar_random_erasing_is_the_official_codes_cutout_on_timm(tmp_path, registry, no_md5):
    """``cutout_kind = "random_erasing"``: after the same crop and flip, half of the samples get one
    rectangle of 2-40% of the image, aspect ratio 0.4-2.5, filled with one colour per channel."""
    import random

    from timm.data.random_erasing import RandomErasing

    _fake_cifar10(tmp_path)
    erasing = registry.datasets["cifar10"](root=str(tmp_path), cutout_kind="random_erasing").train
    without = registry.datasets["cifar10"](root=str(tmp_path), cutout=0).train
    (step,) = [t for t in erasing.transform.transforms if isinstance(t, RandomErasing)]
    assert erasing.transform.transforms[-1] is step  # last, on the normalized tensor
    assert (step.probability, step.min_area, step.max_area, step.mode, step.max_count) == (0.5, 0.02, 0.4, "rand", 1)
    assert step.log_aspect_ratio == pytest.approx((np.log(0.4), np.log(2.5)))
    erased = 0
    for seed in range(60):
        random.seed(seed)
        torch.manual_seed(seed)
        ref = without[seed % 4][0]
        random.seed(seed)
        torch.manual_seed(seed)
        out = erasing[seed % 4][0]
        changed = (out != ref).any(0)
        if not changed.any():
            continue
        erased += 1
        rows, cols = changed.any(1).nonzero().squeeze(1), changed.any(0).nonzero().squeeze(1)
        h, w = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        box = out[:, rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        assert torch.equal(box, box[:, :1, :1].expand_as(box))  # one colour per channel, the whole rectangle
        assert torch.equal(out[:, ~changed], ref[:, ~changed])  # nothing else changes
        assert 0.02 * 1024 * 0.6 <= h * w <= 0.4 * 1024 * 1.2 and 0.4 / 1.5 <= h / w <= 2.5 * 1.5  # rounding
    assert 15 <= erased <= 45  # p = 0.5 (60 draws)
    random.seed(3)
    torch.manual_seed(3)
    a = erasing[0][0]
    random.seed(3)
    torch.manual_seed(3)
    assert torch.equal(erasing[0][0], a)  # the cell's seeds reproduce it


def test_cifar100_loads_fine_labels_with_cifar10_normalization(tmp_path, registry, no_md5):
    train_x, train_y, test_x, test_y = _fake_cifar100(tmp_path)
    bundle = registry.datasets["cifar100"](root=str(tmp_path))
    assert (bundle.in_channels, bundle.num_classes, bundle.input_size, bundle.temporal) == (3, 100, (32, 32), False)
    assert len(bundle.train) == 6 and len(bundle.test) == 4 and len(bundle.train.classes) == 100
    assert [bundle.train[i][1] for i in range(6)] == train_y.tolist()
    x, y = bundle.test[3]
    assert y == test_y[3] and torch.allclose(x, _normalized(test_x[3]), atol=1e-6)
    assert bundle.train[0][0].shape == (3, 32, 32)


def test_cifar_files_that_fail_torchvisions_md5_check_are_named(tmp_path):
    _fake_cifar10(tmp_path)  # no stub: torchvision's real md5 check rejects the tiny files
    md5_failure = r"data_batch_1, .*test_batch, batches\.meta failed torchvision's md5 check"
    with pytest.raises(DatasetNotFoundError, match=md5_failure) as info:
        vision.cifar10(root=str(tmp_path))
    assert "download = true" in str(info.value) and "[options.dataset.cifar10]" in str(info.value)


def test_cifar10_missing_names_the_layout_and_how_to_get_it_without_downloading(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", lambda *a, **k: pytest.fail("downloaded"))
    with pytest.raises(DatasetNotFoundError) as info:
        vision.cifar10(root=str(tmp_path))
    msg = str(info.value)
    assert msg.startswith(f"CIFAR-10 not found or unusable under {tmp_path}: expected {tmp_path}/cifar-10-batches-py/ holding "
                          "data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5, test_batch, batches.meta")
    assert "missing data_batch_1," in msg and "; download is off." in msg
    assert "set `download = true` in [options.dataset.cifar10]" in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in msg


def test_cifar100_missing_names_its_own_layout(tmp_path):
    (tmp_path / "cifar-100-python").mkdir()
    (tmp_path / "cifar-100-python" / "train").write_bytes(b"")
    expected = (
        r"CIFAR-100 not found .*cifar-100-python/ holding train, test, meta .*missing test, meta; "
        r"download is off\. .*\[options\.dataset\.cifar100\] .*cifar-100-python\.tar\.gz"
    )
    with pytest.raises(DatasetNotFoundError, match=expected):
        vision.cifar100(root=str(tmp_path))


def test_the_cifar_factories_do_not_download_unless_asked():
    registry = _registry()
    for name in ("cifar10", "cifar100"):
        assert registry.info("dataset", name).options["download"].default is False
    assert "download" not in registry.info("dataset", "imagenet").options


def test_download_true_goes_to_torchvision(tmp_path, monkeypatch, no_md5):
    import torchvision.datasets.cifar as tv_cifar

    calls = []

    def fake_download(url, download_root, filename=None, md5=None, **kwargs):
        calls.append((url, str(download_root), filename, md5))
        _fake_cifar10(tmp_path)  # what extracting the archive leaves behind

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", fake_download)
    bundle = vision.cifar10(root=str(tmp_path), download=True)
    assert calls == [("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", str(tmp_path),
                      "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")]
    assert len(bundle.train) == 10
    vision.cifar10(root=str(tmp_path), download=True)  # present: torchvision does not fetch it again
    assert len(calls) == 1


def test_a_failed_download_gives_the_same_one_error(tmp_path, monkeypatch):
    import urllib.error

    import torchvision.datasets.cifar as tv_cifar

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    expected = r"CIFAR-100 not found .*missing train, test, meta; torchvision: URLError: <urlopen error no network>\. To get it"
    with pytest.raises(DatasetNotFoundError, match=expected):
        vision.cifar100(root=str(tmp_path), download=True)


# ---------------------------------------------------------------------------------------------
# Cutout
# ---------------------------------------------------------------------------------------------


def _seed_for_centre(accept):
    """A generator seed whose first two draws in [0, 32) -- row, then column -- satisfy ``accept``."""
    for seed in range(100_000):
        g = torch.Generator().manual_seed(seed)
        y, x = int(torch.randint(32, (1,), generator=g)), int(torch.randint(32, (1,), generator=g))
        if accept(y, x):
            return seed, (y, x)
    raise AssertionError("no seed found")


def _hole(cut, img):
    changed = (cut != img).any(0)
    assert (cut[:, changed] == 0).all() and torch.equal(cut[:, ~changed], img[:, ~changed])  # nothing else changes
    return changed


@pytest.mark.parametrize(
    "accept", [lambda y, x: 8 <= y <= 24 and 8 <= x <= 24, lambda y, x: y in (13, 14) and x in (20, 21)]
)
def test_cutout_zeroes_a_16_square_centred_on_the_drawn_pixel(accept):
    seed, (y, x) = _seed_for_centre(accept)
    img = torch.rand(3, 32, 32) + 0.5
    cut = Cutout(16, generator=torch.Generator().manual_seed(seed))(img)
    hole = _hole(cut, img)
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[y - 8 : y + 8, x - 8 : x + 8] = True
    assert torch.equal(hole, expected) and hole.sum() == 256
    assert img.min() >= 0.5  # the input is not modified


def test_cutout_is_clipped_at_a_corner():
    seed, (y, x) = _seed_for_centre(lambda y, x: y < 6 and x > 26)  # near the top-right corner
    img = -torch.rand(3, 32, 32) - 0.5
    hole = _hole(Cutout(16, generator=torch.Generator().manual_seed(seed))(img), img)
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[0 : y + 8, x - 8 : 32] = True
    assert torch.equal(hole, expected) and hole.sum() == (y + 8) * (32 - x + 8) < 256


def test_cutout_follows_the_global_rng_and_zero_is_the_identity():
    img = torch.rand(3, 32, 32) + 1
    torch.manual_seed(7)
    a = Cutout(8)(img)
    torch.manual_seed(7)
    assert torch.equal(Cutout(8)(img), a)
    holes = {tuple(_hole(Cutout(8)(img), img).nonzero()[0].tolist()) for _ in range(5)}
    assert len(holes) > 1
    assert torch.equal(Cutout(0)(img), img)
    with pytest.raises(ValueError, match="cutout must be >= 0"):
        Cutout(-1)


# ---------------------------------------------------------------------------------------------
# ImageNet
# ---------------------------------------------------------------------------------------------


def _fake_imagenet(root, classes=("n01440764", "n01443537"), per_class=2, seed=0):
    """root/{train,val}/<wnid>/*.JPEG, 300 wide and 260 high, a gradient plus noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    gradient = np.linspace(0, 200, 300)[None, :, None] + np.linspace(0, 50, 260)[:, None, None]
    paths = {}
    for split in ("train", "val"):
        for wnid in classes:
            (root / split / wnid).mkdir(parents=True)
            for i in range(per_class):
                pixels = np.clip(gradient + rng.integers(0, 6, (260, 300, 3)), 0, 255).astype(np.uint8)
                path = root / split / wnid / f"{wnid}_{i}.JPEG"
                Image.fromarray(pixels).save(path, quality=90)
                paths.setdefault(split, []).append(path)
    return paths


def test_imagenet_loads_an_imagefolder_tree(tmp_path, registry):
    from PIL import Image
    from torchvision import transforms as T

    paths = _fake_imagenet(tmp_path)
    bundle = registry.datasets["imagenet"](root=str(tmp_path))
    assert (bundle.in_channels, bundle.num_classes, bundle.input_size, bundle.temporal) == (3, 2, (224, 224), False)
    assert len(bundle.train) == 4 and len(bundle.test) == 4 and bundle.train.classes == ["n01440764", "n01443537"]
    assert bundle.files == (tmp_path / "train", tmp_path / "val")  # the trees, taken whole by the checksum
    x, y = bundle.test[3]
    assert x.shape == (3, 224, 224) and y == 1
    by_hand = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    with Image.open(paths["val"][3]) as img:
        assert torch.equal(x, by_hand(img.convert("RGB")))
    assert torch.equal(bundle.test[3][0], x)
    torch.manual_seed(0)
    a, b = bundle.train[0][0], bundle.train[0][0]
    assert a.shape == (3, 224, 224) and not torch.equal(a, b)


def test_imagenet_training_transform_is_timms_crop_and_flip_without_colour_jitter(tmp_path):
    """timm's pipeline, set to the official code's: a RandomResizedCrop box of scale 0.08-1 and
    ratio 3/4-4/3 (drawn with Python's random), bilinear, a flip (torch's RNG), nothing else."""
    import random

    from PIL import Image
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    paths = _fake_imagenet(tmp_path, per_class=1)
    train, _ = vision.imagenet_transforms(64, 73)
    with Image.open(paths["train"][0]) as img:
        img = img.convert("RGB")
        for seed in range(6):
            random.seed(seed)
            torch.manual_seed(seed)
            out = train(img)
            random.seed(seed)
            torch.manual_seed(seed)
            i, j, h, w = RandomResizedCropAndInterpolation.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))
            ref = F.resized_crop(img, i, j, h, w, [64, 64], InterpolationMode.BILINEAR)
            if float(torch.rand(1)) < 0.5:
                ref = F.hflip(ref)
            ref = F.normalize(F.to_tensor(ref), IMAGENET_MEAN, IMAGENET_STD)
            assert torch.equal(out, ref)


def test_the_test_resize_is_exactly_the_option_for_every_size():
    import math

    for size in range(16, 400):
        for resize in range(size, size + 120):
            assert math.floor(size / vision.crop_fraction(size, resize)) == resize
    with pytest.raises(ValueError, match=r"resize \(200\) must be at least image_size \(224\)"):
        vision.crop_fraction(224, 200)


def test_imagenet_sizes_are_options(tmp_path):
    _fake_imagenet(tmp_path, per_class=1)
    bundle = vision.imagenet(root=str(tmp_path), image_size=64, resize=73)
    assert bundle.input_size == (64, 64)
    assert bundle.train[0][0].shape == bundle.test[0][0].shape == (3, 64, 64)


def test_imagenet_missing_names_the_layout_and_how_to_get_it(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        vision.imagenet(root=str(tmp_path / "imagenet"))
    msg = str(info.value)
    root = tmp_path / "imagenet"
    assert f"expected the ImageFolder layout {root}/train/<wnid>/*.JPEG and {root}/val/<wnid>/*.JPEG" in msg
    assert f"no folder {tmp_path}/imagenet/train or {tmp_path}/imagenet/val" in msg
    assert "https://image-net.org" in msg and "ILSVRC2012_img_val.tar" in msg and "valprep" in msg
    assert "There is no download option" in msg


def test_imagenet_val_not_sorted_into_class_folders(tmp_path):
    _fake_imagenet(tmp_path, per_class=1)
    for wnid_dir in list((tmp_path / "val").iterdir()):  # the val tar unpacked flat, valprep not run
        for f in wnid_dir.iterdir():
            f.rename(tmp_path / "val" / f.name)
        wnid_dir.rmdir()
    expected = r"ImageNet not found .*torchvision: Couldn't find any class folder in .*val\. .*valprep"
    with pytest.raises(DatasetNotFoundError, match=expected):
        vision.imagenet(root=str(tmp_path))


def test_imagenet_train_and_val_classes_must_agree(tmp_path):
    _fake_imagenet(tmp_path, per_class=1)
    (tmp_path / "val" / "n01443537").rename(tmp_path / "val" / "n09999999")
    expected = r"different class folders \(only in train: n01443537; only in val: n09999999\)"
    with pytest.raises(DatasetNotFoundError, match=expected):
        vision.imagenet(root=str(tmp_path))


# ---------------------------------------------------------------------------------------------
# The options as a matrix file sees them
# ---------------------------------------------------------------------------------------------


def _matrix(options):
    return {
        "defaults": {"dataset": "cifar10", "model": "vgg_small", "normalizer": "vanilla_bn", "trainer": "bptt",
                     "epochs": 1, "batch_size": 8, "time_steps": 2},
        "options": {"dataset": {"cifar10": options}},
    }


def test_cifar_options_are_visible_to_the_matrix(registry):
    matrix = expand(_matrix({"cutout": 8}), registry, source="vision.toml")
    (cell,) = matrix.cells
    assert cell.config.dataset.name == "cifar10"
    assert cell.config.dataset.options == {"root": "data", "download": False, "cutout": 8, "normalize": True,
                                           "cutout_kind": "square"}
    with pytest.raises(ConfigError, match=r"unknown option 'cutuot' of dataset 'cifar10' \(did you mean 'cutout'\?\)"):
        expand(_matrix({"cutuot": 8}), registry, source="vision.toml")
    with pytest.raises(ConfigError, match=r"option 'cutout' of dataset 'cifar10'"):
        expand(_matrix({"cutout": "big"}), registry, source="vision.toml")
    with pytest.raises(ConfigError, match=r"option 'cutout_kind' of dataset 'cifar10'.*'square'.*'random_erasing'"):
        expand(_matrix({"cutout_kind": "devries"}), registry, source="vision.toml")
    for name in ("cifar10", "cifar100", "imagenet"):  # every default is TOML-expressible
        for opt in registry.info("dataset", name).options.values():
            assert isinstance(opt.default, (str, int, float, bool, list)), (name, opt)


def test_a_cifar_cell_with_the_official_cutout_resumes_as_an_uninterrupted_one(tmp_path, registry, no_md5):
    """timm's RandomErasing draws from Python's random: the checkpoint holds it, so a resumed cell
    erases what an uninterrupted one erases."""
    import dataclasses

    from cell_support import Recorder, interrupted_then_resumed, tiny_cell
    from harness.config import Component
    from harness.runner import run_cell

    _fake_cifar10(tmp_path / "data", per_batch=8, n_test=8)
    base = tiny_cell(0, epochs=2, batch_size=8)
    cfg = dataclasses.replace(base.config, train_subset=None, dataset=Component(
        "cifar10", {"root": str(tmp_path / "data"), "download": False, "cutout": 16, "normalize": True, "cutout_kind": "random_erasing"}))
    cell = dataclasses.replace(base, config=cfg)
    straight = run_cell(cell, registry, Recorder())
    assert straight.status == "finished", straight.error

    resumed = interrupted_then_resumed(cell, registry, tmp_path / "ckpt")
    for key in ("train_loss", "train_top1", "test_loss", "test_top1"):
        assert resumed.metrics[key] == straight.metrics[key], key
    square = run_cell(dataclasses.replace(cell, config=dataclasses.replace(cfg, dataset=Component(
        "cifar10", {**cfg.dataset.options, "cutout_kind": "square"}))), registry, Recorder())
    assert square.metrics["train_loss"] != straight.metrics["train_loss"]  # the option reaches the pipeline
