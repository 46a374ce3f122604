"""Built-in event-camera data sets: ``dvs_gesture`` (IBM DVS128 Gesture) and ``cifar10_dvs``.

Events are read with tonic's readers (``tonic.datasets.DVSGesture`` / ``CIFAR10DVS``) and binned
into the cell's ``T`` frames with ``tonic.transforms.ToFrame(sensor_size, n_time_bins=T)``; a
sample is a float tensor ``[F, 2, 48, 48]`` of event counts per polarity (``temporal=True``).

Offline first. tonic's readers download whenever their own check fails, and that check wants
the original archive *and* at least 100 (DVS-Gesture) or 1000 (CIFAR10-DVS) extracted files:
extracted data without its archive would trigger a download. These loaders check for the
files themselves and open tonic's reader with its check and download switched off: extracted
files are read as they are, an archive found without its extracted files is extracted here
(no network), and only with ``download = true`` is tonic's download called. Otherwise the
loader fails with :class:`DatasetNotFoundError` naming the layout and the source.

Frames are cached before augmentation (binning all events of a recording is slow), one
compressed ``.npz`` per sample under ``<root>/<dataset>_frames_T<T>_<W>x<H>/``, mirroring the
source files' paths; ``cache = false`` turns this off. Delete the folder to rebuild it (a cached
file older than its source is rebuilt). This is not tonic's ``DiskCachedDataset``, which would
otherwise do the job: that one keys its files by the sample's index (so a changed split or a
reordered folder reads another sample's frames), cannot tell a stale file (its docs leave a
changed transform to the user), writes in place (a killed worker leaves a torn file that the next
reader must notice) and needs h5py; this cache keys by the source file, rebuilds what is older
than its source and writes each file whole (:func:`harness.atomic.atomic_write`).

Differences from the reference code (its CIFAR10-DVS loader builds frames with SpikingJelly,
``split_by='number'``), documented where they are made: frames are binned over equal *time*
windows by default (``split_by = "events"`` gives equal event counts per frame, like SpikingJelly's
``'number'``); tonic's ToFrame does not count the
events from the end of the last whole window on (the last ``(t_last - t_first) mod T`` time units,
and always the last event) nor, with ``split_by = "events"``, the last ``N mod T`` events;
DVS-Gesture's 14-of-20 frame choice is drawn per sample, not once per batch; RandomResizedCrop
uses nearest-neighbour interpolation for both data sets (as the official CIFAR10-DVS code).
"""

from __future__ import annotations

import math
import os
import tarfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from harness import hookimpl
from harness.atomic import atomic_write
from snn_harness_plugins.augment import Cutout
from harness.data import DatasetBundle
from snn_harness_plugins.datasets import DatasetNotFoundError

SENSOR_SIZE = (128, 128, 2)  # tonic's (W, H, P) for both data sets
GESTURE_FOLDERS = {True: "ibmGestureTrain", False: "ibmGestureTest"}
CIFAR10_DVS_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
SplitBy = Literal["time", "events"]


# ---------------------------------------------------------------------------------------------
# Events -> frames
# ---------------------------------------------------------------------------------------------


def bin_events(
    events: np.ndarray, time_steps: int, sensor_size: Sequence[int] = SENSOR_SIZE, split_by: str = "time"
) -> np.ndarray:
    """Event counts ``[T, P, H, W]`` (float32) of a structured event array (fields x, y, t, p).

    ``split_by="time"``: tonic's ``ToFrame(n_time_bins=T)``, T windows of equal duration
    ``floor((t_last - t_first) / T)`` from the first event (events from the end of the last window
    on, at least the last one, are not counted). ``"events"``: ``ToFrame(n_event_bins=T)``,
    ``N // T`` events per frame. No events (a filter removed them all) gives all-zero frames;
    events outside the sensor are dropped.
    """
    from tonic.transforms import ToFrame

    w, h, p = (int(s) for s in sensor_size)
    shape = (time_steps, p, h, w)
    if len(events):
        inside = (events["x"] < w) & (events["y"] < h)
        if not inside.all():
            events = events[inside]
    if len(events) == 0:  # tonic would give (T, P, W, H) float64 zeros, or fail in a filter
        return np.zeros(shape, dtype=np.float32)
    t = events["t"]
    if np.any(t[1:] < t[:-1]):  # tonic's slicers assume time order
        events = events[np.argsort(t, kind="stable")]
    if split_by == "time":
        to_frame = ToFrame(sensor_size=(w, h, p), n_time_bins=time_steps)
    elif split_by == "events":
        to_frame = ToFrame(sensor_size=(w, h, p), n_event_bins=time_steps)
    else:
        raise ValueError(f"split_by must be 'time' or 'events', got {split_by!r}")
    frames = np.asarray(to_frame(events))
    if frames.shape != shape:
        raise ValueError(f"ToFrame gave frames of shape {frames.shape}, expected {shape}")
    return frames.astype(np.float32)


class EventFrames(Dataset):
    """Samples of a tonic event reader as frame tensors ``[T, P, H, W]``, then ``transform``.

    ``indices`` selects (and orders) the reader's samples. Frames are binned with
    :func:`bin_events` on first use and, with ``cache_dir``, stored there (before augmentation)
    so later epochs only load them. ``denoise_us > 0`` first applies tonic's ``Denoise``.
    """

    def __init__(
        self,
        reader: Any,
        indices: Sequence[int],
        *,
        time_steps: int,
        sensor_size: Sequence[int] = SENSOR_SIZE,
        cache_dir: str | Path | None = None,
        transform: Callable[[Tensor], Tensor] | None = None,
        split_by: str = "time",
        denoise_us: int = 0,
    ) -> None:
        self.reader = reader
        self.indices = list(indices)
        self.targets = [int(reader.targets[i]) for i in self.indices]
        self.time_steps = time_steps
        self.sensor_size = tuple(int(s) for s in sensor_size)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.transform = transform
        self.split_by = split_by
        self.denoise_us = denoise_us

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x = self.frames(i)
        if self.transform is not None:
            x = self.transform(x)
        return x, self.targets[i]

    def source(self, i: int) -> Path:
        return Path(self.reader.data[self.indices[i]])

    def cache_path(self, i: int) -> Path | None:
        if self.cache_dir is None:
            return None
        src = self.source(i)
        try:
            rel = src.relative_to(self.reader.location_on_system)
        except ValueError:  # not under the reader's folder: keep the name unique anyway
            rel = Path(str(src).strip(os.sep).replace(os.sep, "__"))
        return self.cache_dir / rel.with_suffix(".npz")

    def frames(self, i: int) -> Tensor:
        """The sample's frames before augmentation: from the cache, else binned (and cached)."""
        path = self.cache_path(i)
        if path is not None and path.is_file():
            try:
                if path.stat().st_mtime_ns >= self.source(i).stat().st_mtime_ns:
                    with np.load(path) as f:
                        return torch.from_numpy(f["frames"].astype(np.float32))
            except (OSError, ValueError, KeyError, zipfile.BadZipFile):
                pass  # unreadable or stale: bin again
        events, _ = self.reader[self.indices[i]]
        if self.denoise_us > 0 and len(events):
            from tonic.transforms import Denoise

            events = Denoise(filter_time=self.denoise_us)(events)
        frames = bin_events(events, self.time_steps, self.sensor_size, self.split_by)
        if path is not None:
            _save_frames(path, frames)
        return torch.from_numpy(frames)


def _save_frames(path: Path, frames: np.ndarray) -> None:
    """Write atomically (DataLoader workers may bin the same sample): counts as int16 where they fit."""
    counts = frames.astype(np.int16 if frames.max(initial=0) <= np.iinfo(np.int16).max else np.int32)
    with atomic_write(path, "wb", sync=False) as f:  # a cache: a broken file is binned again (frames())
        np.savez_compressed(f, frames=counts)


# ---------------------------------------------------------------------------------------------
# Augmentation of frame tensors [F, C, H, W]: one parameter draw per sample, all frames alike
# ---------------------------------------------------------------------------------------------


class KeepFrames:
    """Keep ``n`` of a sample's frames: a sorted random choice without replacement.

    The official DVS-Gesture code draws the choice once per batch; a Dataset draws it per
    sample (same marginal distribution, frames of one batch not aligned in time).
    """

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, x: Tensor) -> Tensor:
        if self.n <= 0 or self.n >= x.shape[0]:
            return x
        keep = torch.randperm(x.shape[0])[: self.n].sort().values
        return x[keep]


class NDA:
    """Neuromorphic Data Augmentation (Li et al., ECCV 2022) as the official code uses it
    (``function_nda`` with M = 1, N = 2): one operation chosen uniformly per sample, applied to all
    frames alike --

    * ``roll``: ``torch.roll`` by (dy, dx), each uniform in ``[-roll, roll]`` (5 px), wrapping around;
    * ``rotate``: rotation by an angle uniform in ``[-degrees, degrees]`` (30), nearest neighbour,
      zero fill, same size;
    * ``cutout``: zero the square ``[cy - L/2, cy + L/2) x [cx - L/2, cx + L/2)`` (L = 16 px), its
      centre uniform over the image and the square clipped at the border (so it is smaller there).
    """

    OPS = ("roll", "rotate", "cutout")

    def __init__(self, roll: int = 5, degrees: float = 30.0, cutout: int = 16) -> None:
        self.roll_px, self.degrees, self.cutout_px = roll, degrees, cutout

    def draw(self, height: int, width: int) -> tuple[str, tuple[float, ...]]:
        """A random operation and its parameters (torch's RNG: DataLoader workers differ)."""
        op = self.OPS[int(torch.randint(len(self.OPS), ()))]
        if op == "roll":
            dy, dx = torch.randint(-self.roll_px, self.roll_px + 1, (2,)).tolist()
            return op, (dy, dx)
        if op == "rotate":
            return op, (float(torch.empty(()).uniform_(-self.degrees, self.degrees)),)
        return op, (int(torch.randint(height, ())), int(torch.randint(width, ())))

    def apply(self, x: Tensor, op: str, args: tuple[float, ...]) -> Tensor:
        return getattr(self, op)(x, *args)

    def __call__(self, x: Tensor) -> Tensor:
        return self.apply(x, *self.draw(x.shape[-2], x.shape[-1]))

    @staticmethod
    def roll(x: Tensor, dy: int, dx: int) -> Tensor:
        return torch.roll(x, shifts=(int(dy), int(dx)), dims=(-2, -1))

    @staticmethod
    def rotate(x: Tensor, angle: float) -> Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        return F.rotate(x, angle, interpolation=InterpolationMode.NEAREST, fill=0.0)

    def cutout(self, x: Tensor, cy: int, cx: int) -> Tensor:
        return Cutout(self.cutout_px).erase(x, cy, cx)  # the static sets' square, on every frame


class RandomHorizontalFlip:
    """Flip all frames of a sample left-right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, x: Tensor) -> Tensor:
        return x.flip(-1) if float(torch.rand(())) < self.p else x


class Compose:
    def __init__(self, transforms: Sequence[Callable[[Tensor], Tensor]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: Tensor) -> Tensor:
        for t in self.transforms:
            x = t(x)
        return x


def _crop_resize(size: int, crop_scale: Sequence[float]) -> list[Callable[[Tensor], Tensor]]:
    """RandomResizedCrop to the sensor's 128 px (nearest, as the official code) then Resize(size).

    torchvision's v2 transforms treat the leading frame axis as a batch: one draw per sample.
    """
    from torchvision.transforms import InterpolationMode, v2

    return [
        v2.RandomResizedCrop(SENSOR_SIZE[0], scale=tuple(crop_scale), interpolation=InterpolationMode.NEAREST),
        v2.Resize((size, size)),
    ]


def _resize(size: int) -> Callable[[Tensor], Tensor]:
    from torchvision.transforms import v2

    return v2.Resize((size, size))


def gesture_train_transform(
    size: int = 48, crop_scale: Sequence[float] = (0.7, 1.0), rotation: float = 20.0, train_frames: int = 14
) -> Compose:
    """DVS-Gesture training: keep ``train_frames`` frames, RandomResizedCrop(128, scale 0.7-1) +
    Resize(48) + RandomRotation(20) (nearest, zero fill). Keeping frames first gives the same
    result as keeping them last (one spatial draw per sample) on fewer frames."""
    from torchvision.transforms import InterpolationMode, v2

    return Compose(
        [KeepFrames(train_frames), *_crop_resize(size, crop_scale),
         v2.RandomRotation(rotation, interpolation=InterpolationMode.NEAREST)]
    )


def cifar10_dvs_train_transform(
    size: int = 48, crop_scale: Sequence[float] = (0.7, 1.0), flip: bool = True, nda: bool = True
) -> Compose:
    """CIFAR10-DVS training: RandomResizedCrop(128) + Resize(48) + horizontal flip + NDA."""
    steps: list[Callable[[Tensor], Tensor]] = _crop_resize(size, crop_scale)
    if flip:
        steps.append(RandomHorizontalFlip())
    if nda:
        steps.append(NDA())
    return Compose(steps)


# ---------------------------------------------------------------------------------------------
# Files: offline reading, archives, the error when data are missing
# ---------------------------------------------------------------------------------------------


def _no_download() -> None:
    raise DatasetNotFoundError("internal: tonic tried to download although the files were checked")


def open_offline(cls: type, root: str | Path, **kwargs: Any) -> Any:
    """A tonic reader of class ``cls`` that never downloads: its ``_check_exists`` (archive present
    and >= 100 / 1000 extracted files) is bypassed for this instance while it lists the files."""
    reader = cls.__new__(cls)
    reader._check_exists = lambda: True  # instance attributes shadow the methods during __init__
    reader.download = _no_download
    try:
        cls.__init__(reader, str(root), **kwargs)
    finally:
        del reader._check_exists, reader.download  # a plain tonic object again (picklable)
    return reader


def _extract(archive: Path, to: Path) -> None:
    """Extract a .zip or .tar(.gz) archive offline (tar members are checked with the 'data' filter)."""
    to.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                z.extractall(to)
        else:
            with tarfile.open(archive) as t:
                t.extractall(to, filter="data")
    except (OSError, tarfile.TarError, zipfile.BadZipFile) as exc:
        raise DatasetNotFoundError(f"could not extract {archive} ({type(exc).__name__}: {exc})") from exc


def _download_with_tonic(make: Callable[[], Any], missing: Callable[[Exception | None], str]) -> None:
    try:
        make()
    except DatasetNotFoundError:
        raise
    except Exception as exc:  # no network, a proxy, a checksum error
        raise DatasetNotFoundError(missing(exc)) from exc


def _open_gesture(root: Path, download: bool) -> dict[bool, Any]:
    from tonic.datasets import DVSGesture

    base = root / "DVSGesture"

    def missing(exc: Exception | None) -> str:
        return _gesture_missing(root, exc)

    readers: dict[bool, Any] = {}
    for train, folder in GESTURE_FOLDERS.items():
        reader = open_offline(DVSGesture, root, train=train)
        if not reader.data:
            archive = base / (DVSGesture.train_filename if train else DVSGesture.test_filename)
            if archive.is_file():
                _extract(archive, base)
            elif download:
                _download_with_tonic(lambda train=train: DVSGesture(str(root), train=train), missing)
            else:
                raise DatasetNotFoundError(missing(None))
            reader = open_offline(DVSGesture, root, train=train)
            if not reader.data:
                raise DatasetNotFoundError(missing(None) + f" ({archive.name} did not hold {folder}/)")
        readers[train] = reader
    return readers


def _gesture_missing(root: Path, exc: Exception | None) -> str:
    from tonic.datasets import DVSGesture

    base = root / "DVSGesture"
    return (
        f"DVS-Gesture not found under {base}: expected the extracted files "
        f"{base / 'ibmGestureTrain'}/userNN_<lighting>/<class>.npy and {base / 'ibmGestureTest'}/... "
        f"(tonic's preprocessed release: one .npy of events [x, y, p, t in ms] per gesture), or the "
        f"archives {DVSGesture.train_filename} and {DVSGesture.test_filename} in {base} (extracted offline)"
        + (f"; tonic's download failed ({type(exc).__name__}: {exc})" if exc else "; download is off")
        + f". Get the archives from {DVSGesture.train_url} and {DVSGesture.test_url} (the original "
        "recordings: https://research.ibm.com/dvsgesture/), or set `download = true` in the data set's "
        "options to let tonic fetch them."
    )


def _open_cifar10_dvs(root: Path, download: bool) -> Any:
    from tonic.datasets import CIFAR10DVS

    base = root / "CIFAR10DVS"

    def missing(exc: Exception | None, classes: Sequence[str] = CIFAR10_DVS_CLASSES) -> str:
        return _cifar10_dvs_missing(root, classes, exc)

    def absent(reader: Any) -> list[str]:
        present = set(reader.targets)
        return [c for c in CIFAR10_DVS_CLASSES if CIFAR10DVS.classes[c] not in present]

    reader = open_offline(CIFAR10DVS, root)
    lacking = absent(reader)
    if lacking:
        inner = [base / f"{c}.zip" for c in lacking]
        outer = base / CIFAR10DVS.filename
        if all(z.is_file() for z in inner) or outer.is_file():
            if not all(z.is_file() for z in inner):
                _extract(outer, base)
            for z in inner:
                if not z.is_file():
                    raise DatasetNotFoundError(missing(None, lacking) + f" ({outer.name} did not hold {z.name})")
                _extract(z, base)
        elif download:
            _download_with_tonic(lambda: CIFAR10DVS(str(root)), missing)
        else:
            raise DatasetNotFoundError(missing(None, lacking))
        reader = open_offline(CIFAR10DVS, root)
        lacking = absent(reader)
        if lacking:
            raise DatasetNotFoundError(missing(None, lacking))
    return reader


def _cifar10_dvs_missing(root: Path, classes: Sequence[str], exc: Exception | None) -> str:
    from tonic.datasets import CIFAR10DVS

    base = root / "CIFAR10DVS"
    which = "all 10 classes" if len(classes) == len(CIFAR10_DVS_CLASSES) else "classes " + ", ".join(classes)
    return (
        f"CIFAR10-DVS not found ({which}) under {base}: expected the extracted files "
        f"{base}/<class>/*.aedat4 for the classes {', '.join(CIFAR10_DVS_CLASSES)}, or the per-class "
        f"archives <class>.zip, or the archive {CIFAR10DVS.filename}, in {base} (extracted offline)"
        + (f"; tonic's download failed ({type(exc).__name__}: {exc})" if exc else "; download is off")
        + f". Get {CIFAR10DVS.filename} from {CIFAR10DVS.url} (tonic's AEDAT4 copy of "
        "https://figshare.com/articles/dataset/CIFAR10-DVS_New/4724671), or set `download = true` in "
        "the data set's options to let tonic fetch it."
    )


def _sorted_indices(reader: Any) -> list[int]:
    """The reader's samples in file-path order (tonic lists files in directory order)."""
    return sorted(range(len(reader.data)), key=lambda i: str(reader.data[i]))


def split_per_class(reader: Any, train_fraction: float) -> tuple[list[int], list[int]]:
    """The first ``ceil(train_fraction * n)`` samples of each class (file-name order) for training.

    As SpikingJelly's ``split_to_train_test_set(0.9, dataset, 10)`` in the official code: its
    frame files are listed sorted by name (torchvision's DatasetFolder), class by class.
    """
    by_class: dict[int, list[int]] = {}
    for i in _sorted_indices(reader):
        by_class.setdefault(int(reader.targets[i]), []).append(i)
    train: list[int] = []
    test: list[int] = []
    for label in sorted(by_class):
        idx = by_class[label]
        cut = math.ceil(len(idx) * train_fraction)
        train += idx[:cut]
        test += idx[cut:]
    return train, test


def _cache_dir(root: Path, name: str, time_steps: int, split_by: str, denoise_us: int, cache: bool) -> Path | None:
    if not cache:
        return None
    w, h, _ = SENSOR_SIZE
    key = f"{name}_frames_T{time_steps}_{w}x{h}"
    if split_by != "time":
        key += f"_by{split_by}"
    if denoise_us > 0:
        key += f"_denoise{denoise_us}"
    return root / key


def _check_common(time_steps: int, split_by: str, size: int, crop_scale: Sequence[float]) -> None:
    if time_steps < 1:
        raise ValueError(f"time_steps must be >= 1, got {time_steps}")
    if split_by not in ("time", "events"):
        raise ValueError(f"split_by must be 'time' or 'events', got {split_by!r}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if len(crop_scale) != 2 or not 0 < crop_scale[0] <= crop_scale[1] <= 1:
        raise ValueError(f"crop_scale must be [low, high] with 0 < low <= high <= 1, got {list(crop_scale)}")


# ---------------------------------------------------------------------------------------------
# Factories
# ---------------------------------------------------------------------------------------------


def dvs_gesture(
    time_steps: int,
    root: str = "data",
    cache: bool = True,
    train_frames: int = 14,
    size: int = 48,
    crop_scale: tuple[float, float] = (0.7, 1.0),
    rotation: float = 20.0,
    split_by: SplitBy = "time",
    denoise_us: int = 0,
    download: bool = False,
) -> DatasetBundle:
    """IBM DVS128 Gesture (11 classes, the official train/test subjects) as T event frames (tonic's reader).

    Reads ``<root>/DVSGesture/ibmGestureTrain|ibmGestureTest/userNN_<lighting>/<class>.npy`` offline
    (or extracts the archives found there; ``download = true`` lets tonic fetch them). Events are
    binned into ``T = time_steps`` frames at 128x128 (cached under
    ``<root>/dvs_gesture_frames_T<T>_128x128``). Training: ``train_frames`` of the T frames
    (sorted random choice per sample; 0 keeps all), RandomResizedCrop(128, ``crop_scale``) +
    Resize(``size``) + RandomRotation(``rotation``); test: Resize(``size``), all T frames.
    """
    _check_common(time_steps, split_by, size, crop_scale)
    root_path = Path(root).expanduser()
    readers = _open_gesture(root_path, download)
    cache_dir = _cache_dir(root_path, "dvs_gesture", time_steps, split_by, denoise_us, cache)
    common = dict(time_steps=time_steps, cache_dir=cache_dir, split_by=split_by, denoise_us=denoise_us)
    train = EventFrames(
        readers[True], _sorted_indices(readers[True]),
        transform=gesture_train_transform(size, crop_scale, rotation, train_frames), **common,
    )
    test = EventFrames(readers[False], _sorted_indices(readers[False]), transform=_resize(size), **common)
    return DatasetBundle(train=train, test=test, in_channels=2, num_classes=11, input_size=(size, size), temporal=True,
                         files=tuple(Path(p) for r in (readers[True], readers[False]) for p in r.data))


def cifar10_dvs(
    time_steps: int,
    root: str = "data",
    cache: bool = True,
    nda: bool = True,
    flip: bool = True,
    train_fraction: float = 0.9,
    size: int = 48,
    crop_scale: tuple[float, float] = (0.7, 1.0),
    split_by: SplitBy = "time",
    denoise_us: int = 0,
    download: bool = False,
) -> DatasetBundle:
    """CIFAR10-DVS (10 x 1000 recordings, 10 classes) as T event frames (tonic's AEDAT4 reader).

    Reads ``<root>/CIFAR10DVS/<class>/*.aedat4`` offline (or extracts ``<class>.zip`` /
    ``CIFAR10DVS.zip`` found there; ``download = true`` lets tonic fetch them). No official split:
    the first ``train_fraction`` (90%, rounded up) of each class in file-name order train, the rest
    test, as the official code. Frames cached under ``<root>/cifar10_dvs_frames_T<T>_128x128``.
    Training: RandomResizedCrop(128, ``crop_scale``) + Resize(``size``) + horizontal flip + NDA
    (one of roll +-5 px, rotation +-30 deg, 16-px cutout); test: Resize(``size``).
    """
    _check_common(time_steps, split_by, size, crop_scale)
    if not 0 < train_fraction <= 1:
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
    root_path = Path(root).expanduser()
    reader = _open_cifar10_dvs(root_path, download)
    train_idx, test_idx = split_per_class(reader, train_fraction)
    cache_dir = _cache_dir(root_path, "cifar10_dvs", time_steps, split_by, denoise_us, cache)
    common = dict(time_steps=time_steps, cache_dir=cache_dir, split_by=split_by, denoise_us=denoise_us)
    train = EventFrames(reader, train_idx, transform=cifar10_dvs_train_transform(size, crop_scale, flip, nda), **common)
    test = EventFrames(reader, test_idx, transform=_resize(size), **common)
    return DatasetBundle(train=train, test=test, in_channels=2, num_classes=10, input_size=(size, size), temporal=True,
                         files=tuple(Path(p) for p in reader.data))


@hookimpl
def register_datasets(registry) -> None:
    registry.add("dvs_gesture", dvs_gesture)
    registry.add("cifar10_dvs", cifar10_dvs)


__all__ = [
    "NDA", "EventFrames", "KeepFrames", "bin_events", "cifar10_dvs", "dvs_gesture", "open_offline",
    "split_per_class", "DatasetNotFoundError",
]
