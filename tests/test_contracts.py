"""The plugin author's contract suites (harness.testing), run over every registered built-in name.

The suites are made from the registry, so a new built-in is tested without anyone adding it
here; what is here is only what keeps them tiny (model widths) and the tiny on-disk copies that
the data sets' suites load (written in each data set's own format by its loader's tests)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.registry import get_registry
from harness.testing import contract_suites

BUILTINS = get_registry(autoload=False)

MODEL_SETTINGS = {
    "vgg_small": {"options": {"channels": [4, 8]}},
    "vggsnn": {"input_size": (8, 8), "options": {"classifier": (8,)}},
    "resnet19": {"input_size": (8, 8)},
    "sew_resnet34": {"input_size": (8, 8), "options": {"stem": "cifar"}, "batch": 2},
    "nf_resnet34": {"input_size": (8, 8), "options": {"stem": "cifar"}, "batch": 2},
}


def _cifar_files_need_not_match_the_release_md5(self, monkeypatch):
    """torchvision's CIFAR reader, except that a file only has to exist (tiny files have other md5s)."""
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def _present(writer):
    def present(self, tmp_path: Path) -> dict:
        writer(tmp_path)
        return {**self.options, "root": str(tmp_path)}

    return present


def _write_cifar10(root: Path) -> None:
    from test_datasets_vision import _fake_cifar10

    _fake_cifar10(root)


def _write_cifar100(root: Path) -> None:
    from test_datasets_vision import _fake_cifar100

    _fake_cifar100(root)


def _write_imagenet(root: Path) -> None:
    from test_datasets_vision import _fake_imagenet

    _fake_imagenet(root)


def _write_dvs_gesture(root: Path) -> None:
    from test_datasets_dvs import _fake_gesture

    _fake_gesture(root)


def _write_cifar10_dvs(root: Path) -> None:
    from test_datasets_dvs import _fake_cifar10_dvs

    _fake_cifar10_dvs(root / "CIFAR10DVS", per_class=2)


def _fashion_mnist_present(tmp_path: Path) -> dict:
    from snn_harness_plugins.datasets import DEBIAN_FASHION_MNIST

    if not Path(DEBIAN_FASHION_MNIST).is_dir():
        pytest.skip(f"no Fashion-MNIST files in {DEBIAN_FASHION_MNIST} (Debian's package dataset-fashion-mnist)")
    return {"root": str(tmp_path)}  # the loader copies them under root


MEMBRANE_NORM_SETTINGS = {"none": {}}  # (builds no module: its clauses skip, saying so)

DATASET_SETTINGS = {
    "digits": {"needs_files": False},
    "fashion_mnist": {
        "absent": lambda self, tmp_path: {"root": str(tmp_path / "absent"), "search_dirs": []},
        "present": lambda self, tmp_path: _fashion_mnist_present(tmp_path),
    },
    "cifar10": {"present": _present(_write_cifar10), "_md5": pytest.fixture(autouse=True)(_cifar_files_need_not_match_the_release_md5)},
    "cifar100": {"present": _present(_write_cifar100), "_md5": pytest.fixture(autouse=True)(_cifar_files_need_not_match_the_release_md5)},
    "imagenet": {"present": _present(_write_imagenet), "options": {"image_size": 16, "resize": 18}},
    "dvs_gesture": {"present": _present(_write_dvs_gesture), "options": {"size": 8, "train_frames": 3}},
    "cifar10_dvs": {"present": _present(_write_cifar10_dvs), "options": {"size": 8, "train_fraction": 0.5}},
}

for _kind, _settings in [("normalizer", {}), ("threshold", {}), ("membrane_norm", MEMBRANE_NORM_SETTINGS), ("trainer", {}),
                         ("model", MODEL_SETTINGS), ("dataset", DATASET_SETTINGS)]:
    globals().update(contract_suites(_kind, BUILTINS.names(_kind), autoload=False, settings=_settings))

# MPBN as its authors' code runs it: the reset on the potential before the BN (the neuron's hard reset).
globals().update(contract_suites("membrane_norm", ["mpbn"], autoload=False, prefix="TestRawCarry",
                                 settings={"mpbn": {"options": {"carry": "raw"}}}))


def test_every_registered_built_in_has_its_suite_here():
    suites = {name for name, value in globals().items() if isinstance(value, type) and name.startswith("Test")}
    for kind in ("normalizer", "threshold", "membrane_norm", "trainer", "model", "dataset"):
        names = BUILTINS.names(kind)
        assert names, kind
        assert {f"Test{kind.capitalize()}_{n}" for n in names} <= suites
