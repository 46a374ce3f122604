"""Data-set plugins through their real loading code: digits from scikit-learn, Fashion-MNIST
from tiny files written in the idx format (gzipped like Debian's package ships them)."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from harness.data import to_sequence, train_subset
from snn_harness_plugins.datasets import DatasetNotFoundError, digits, fashion_mnist


def _write_idx(path, array: np.ndarray, gz: bool) -> None:
    dtype_code = 0x08  # unsigned byte
    header = struct.pack(">HBB", 0, dtype_code, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def _fake_fashion_mnist(folder, n_train=12, n_test=5, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, (n_train,)),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, (n_test,)),
    }
    for name, arr in arrays.items():
        _write_idx(folder / name, arr, gz)
    return arrays


def test_fashion_mnist_from_a_system_directory_of_gzipped_idx_files(tmp_path):
    system = tmp_path / "usr-share"
    arrays = _fake_fashion_mnist(system)
    bundle = fashion_mnist(root=str(tmp_path / "data"), search_dirs=[str(system)], download=False)
    assert (bundle.in_channels, bundle.num_classes, bundle.input_size, bundle.temporal) == (1, 10, (28, 28), False)
    assert len(bundle.train) == 12 and len(bundle.test) == 5
    x, y = bundle.train[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    expected = (torch.tensor(arrays["train-images-idx3-ubyte"][3], dtype=torch.float32) / 255 - 0.2860) / 0.3530
    assert torch.allclose(x[0], expected, atol=1e-6)
    assert y.item() == arrays["train-labels-idx1-ubyte"][3]
    # Copied (un-gzipped) under root: the next load needs no search.
    assert (tmp_path / "data" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").exists()
    again = fashion_mnist(root=str(tmp_path / "data"), search_dirs=[], download=False)
    assert torch.equal(again.test[4][0], bundle.test[4][0])


def test_cells_that_copy_fashion_mnist_at_once_do_not_collide(tmp_path):
    # Two cells starting together (parallel executors) both find the files missing under root and
    # copy them from the system directory at the same moment.
    from concurrent.futures import ThreadPoolExecutor

    system = tmp_path / "usr-share"
    arrays = _fake_fashion_mnist(system, n_train=300)
    root = str(tmp_path / "data")
    with ThreadPoolExecutor(4) as pool:
        bundles = list(pool.map(lambda _: fashion_mnist(root=root, search_dirs=[str(system)], download=False), range(4)))
    for b in bundles:
        assert len(b.train) == 300 and b.train[299][1].item() == arrays["train-labels-idx1-ubyte"][299]
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    assert not list(raw.glob(".*partial"))  # no half-written file left behind


def test_fashion_mnist_from_uncompressed_files_in_root(tmp_path):
    _fake_fashion_mnist(tmp_path / "FashionMNIST" / "raw", gz=False, n_train=7)
    bundle = fashion_mnist(root=str(tmp_path), search_dirs=[], download=False)
    assert len(bundle.train) == 7
    raw = tmp_path / "FashionMNIST" / "raw"  # the files read, for the checksum the cell's run records
    assert bundle.files == tuple(raw / f for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                                   "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))


def test_fashion_mnist_missing_gives_one_clear_error(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"Fashion-MNIST not found: looked in .*FashionMNIST/raw, .*nowhere; download is off\. To get it: `sudo apt-get install dataset-fashion-mnist`"):
        fashion_mnist(root=str(tmp_path), search_dirs=[str(tmp_path / "nowhere")], download=False)


def test_fashion_mnist_incomplete_search_dir_is_not_used(tmp_path):
    system = tmp_path / "partial"
    _fake_fashion_mnist(system)
    (system / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError):
        fashion_mnist(root=str(tmp_path / "data"), search_dirs=[str(system)], download=False)


def test_digits_split_is_fixed_and_stratified():
    a, b = digits(), digits()
    assert len(a.train) + len(a.test) == 1797
    assert len(a.test) == 360
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])
    counts = torch.bincount(a.test.tensors[1], minlength=10)
    assert counts.min() >= 35  # every class is in the test split
    assert a.train.tensors[0].max() <= 1.0 and a.input_size == (8, 8)
    (source,) = a.files  # the file load_digits reads
    assert source.name == "digits.csv.gz" and source.is_file()


def test_train_subset_is_fixed_and_independent_of_the_cell_seed():
    data = digits().train
    s1, s2 = train_subset(data, 100), train_subset(data, 100)
    assert len(s1) == 100 and s1.indices == s2.indices
    assert train_subset(data, None) is data and train_subset(data, 10**6) is data


def test_static_images_are_repeated_at_every_step_without_copy():
    x = torch.randn(4, 1, 8, 8)
    seq = to_sequence(x, 3, temporal=False)
    assert seq.shape == (3, 4, 1, 8, 8) and seq.data_ptr() == x.data_ptr()
    assert all(torch.equal(seq[t], x) for t in range(3))
    frames = torch.randn(4, 3, 2, 8, 8)  # [B, T, C, H, W]
    assert torch.equal(to_sequence(frames, 3, temporal=True)[1], frames[:, 1])
    assert to_sequence(frames, 5, temporal=True).shape == (3, 4, 2, 8, 8)  # fewer frames: a training augmentation dropped some
    with pytest.raises(ValueError, match="gives 3 frames per sample but time_steps = 2"):
        to_sequence(frames, 2, temporal=True)
