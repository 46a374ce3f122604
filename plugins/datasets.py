"""Built-in data sets: ``digits`` (scikit-learn's bundled 8x8 digits) and ``fashion_mnist``."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from harness import hookimpl
from harness.atomic import atomic_write
from harness.data import DatasetBundle
from harness.errors import DatasetNotFoundError

FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def digits(test_fraction: float = 0.2, split_seed: int = 0) -> DatasetBundle:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), for tests and demos.

    A fixed stratified split (``split_seed``) keeps ``test_fraction`` of the images for testing;
    pixel values 0..16 are scaled to [0, 1].
    """
    from importlib.resources import files

    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    source = Path(str(files("sklearn.datasets.data") / "digits.csv.gz"))  # what load_digits reads
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        range(len(y)), test_size=test_fraction, random_state=split_seed, stratify=data.target
    )
    return DatasetBundle(
        train=TensorDataset(x[train_idx], y[train_idx]),
        test=TensorDataset(x[test_idx], y[test_idx]),
        in_channels=1,
        num_classes=10,
        input_size=(8, 8),
        files=(source,),
    )


def fashion_mnist(
    root: str = "data",
    search_dirs: list[str] = [DEBIAN_FASHION_MNIST],  # noqa: B006 - read-only default
    download: bool = True,
) -> DatasetBundle:
    """Fashion-MNIST (60k/10k 28x28 grey images, 10 classes), read with torchvision's reader.

    Looks in ``<root>/FashionMNIST/raw``, then in ``search_dirs`` (Debian's package
    ``dataset-fashion-mnist`` installs the files in /usr/share/datasets/fashion-mnist; they are
    copied under ``root``), then tries torchvision's download when ``download`` is true.
    Inputs are normalized with the training set's mean 0.2860 and std 0.3530.
    """
    from torchvision.datasets import FashionMNIST

    raw = Path(root) / "FashionMNIST" / "raw"
    if not all((raw / f).exists() for f in FASHION_MNIST_FILES):
        for d in map(Path, search_dirs):
            if _copy_idx_files(d, raw):
                break
        else:
            if not download:
                raise DatasetNotFoundError(_fashion_mnist_missing(root, search_dirs, None))
            try:
                FashionMNIST(root, train=True, download=True)
                FashionMNIST(root, train=False, download=True)
            except Exception as exc:  # no network, a proxy, a checksum error
                raise DatasetNotFoundError(_fashion_mnist_missing(root, search_dirs, exc)) from exc
    train, test = FashionMNIST(root, train=True), FashionMNIST(root, train=False)

    def tensors(ds: FashionMNIST) -> TensorDataset:
        x = ds.data.unsqueeze(1).float().div_(255.0).sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)
        return TensorDataset(x, ds.targets.long())

    return DatasetBundle(train=tensors(train), test=tensors(test), in_channels=1, num_classes=10, input_size=(28, 28),
                         files=tuple(raw / f for f in FASHION_MNIST_FILES))


def _copy_idx_files(src: Path, raw: Path) -> bool:
    """Copy (and un-gzip) the four idx files from ``src`` into ``raw``; false if any is missing."""
    sources = {}
    for name in FASHION_MNIST_FILES:
        for candidate in (src / name, src / f"{name}.gz"):
            if candidate.is_file():
                sources[name] = candidate
                break
        else:
            return False
    raw.mkdir(parents=True, exist_ok=True)
    for name, path in sources.items():
        # cells that start at once (processes or threads) each put a whole file in place
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fin, atomic_write(raw / name, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    return True


def _fashion_mnist_missing(root: str, search_dirs: list[str], exc: Exception | None) -> str:
    looked = [str(Path(root) / "FashionMNIST" / "raw")] + list(search_dirs)
    msg = (
        "Fashion-MNIST not found: looked in "
        + ", ".join(looked)
        + (f"; torchvision's download failed ({type(exc).__name__}: {exc})" if exc else "; download is off")
        + ". To get it: `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; files in "
        f"{DEBIAN_FASHION_MNIST}), or put {', '.join(f + '.gz' for f in FASHION_MNIST_FILES)} in "
        f"{Path(root) / 'FashionMNIST' / 'raw'}."
    )
    return msg


@hookimpl
def register_datasets(registry) -> None:
    registry.add("digits", digits)
    registry.add("fashion_mnist", fashion_mnist)
