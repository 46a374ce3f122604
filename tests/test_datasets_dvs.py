"""Event-camera data sets (DVS-Gesture, CIFAR10-DVS) through their real loading code, offline.

The tests write tiny data in the on-disk formats tonic 1.7 reads after extraction:

* DVS-Gesture: ``DVSGesture/ibmGestureTrain|ibmGestureTest/userNN_<lighting>/<class>.npy``, each an
  unstructured ``[N, 4]`` array with columns x, y, p, t (t in ms; tonic multiplies by 1000), as in
  tonic's own tests (``structured_to_unstructured`` of ``DVSGesture.dtype``).
* CIFAR10-DVS: ``CIFAR10DVS/<class>/*.aedat4``, read by ``tonic.io.read_aedat4`` with the ``aedat``
  package's Rust decoder. The files are written here byte by byte (AEDAT 4.0: magic line, a
  size-prefixed ``IOHE`` flatbuffer whose XML description declares one ``EVTS`` stream, then
  packets ``stream id, size, size-prefixed EventPacket flatbuffer``), no reader is mocked.

Every test that loads data runs with the network blocked and records any download attempt.
"""

from __future__ import annotations

import io
import pickle
import socket
import struct
import tarfile
import urllib.request
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import snn_harness_plugins.datasets_dvs as dvs
from harness.data import to_sequence
from snn_harness_plugins.datasets import DatasetNotFoundError

GESTURE_TRAIN_URL = "https://figshare.com/ndownloader/files/38022171"
CIFAR10_DVS_URL = "https://figshare.com/ndownloader/files/38023437"
EVENT_DTYPE = np.dtype([("x", np.int16), ("y", np.int16), ("p", bool), ("t", np.int64)])


# ---------------------------------------------------------------------------------------------
# Fixtures: no network, the registry
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    """Block sockets, urllib and tonic's download helpers; returns the list of attempts."""
    import tonic.dataset
    import tonic.download_utils

    attempts: list[str] = []

    def refuse(what):
        def _refuse(*args, **kwargs):
            attempts.append(f"{what}{args[:2]!r}")
            raise OSError(f"network access attempted in a test: {what}")

        return _refuse

    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(socket, "create_connection", refuse("socket.create_connection"))
    monkeypatch.setattr(urllib.request, "urlopen", refuse("urlopen"))
    monkeypatch.setattr(tonic.download_utils, "download_url", refuse("tonic.download_url"))
    monkeypatch.setattr(tonic.dataset, "download_and_extract_archive", refuse("tonic.download_and_extract_archive"))
    return attempts


@pytest.fixture(scope="module")
def registry():
    """The registry with this plugin: from its entry point once registered, else added here."""
    from harness import get_registry

    reg = get_registry()
    if "dvs_gesture" in reg.names("dataset"):
        return reg
    return get_registry(extra_plugins=[(dvs, "dvs")])


# ---------------------------------------------------------------------------------------------
# Writing the files
# ---------------------------------------------------------------------------------------------


def _events(rows) -> np.ndarray:
    """Structured events from (x, y, p, t) rows."""
    out = np.zeros(len(rows), dtype=EVENT_DTYPE)
    for i, (x, y, p, t) in enumerate(rows):
        out[i] = (x, y, bool(p), t)
    return out


def _random_rows(rng, n=400, duration=1000):
    t = np.sort(rng.integers(0, duration, n))
    return list(zip(rng.integers(0, 128, n), rng.integers(0, 128, n), rng.integers(0, 2, n), t, strict=True))


def _write_gesture_npy(path: Path, rows_ms) -> None:
    """One DVS-Gesture sample as tonic's preprocessed release stores it: [N, 4] = x, y, p, t (ms)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.array(rows_ms, dtype=np.int64).reshape(-1, 4)
    np.save(path, arr)


def _fake_gesture(root: Path, seed=0, extra: dict | None = None) -> dict[str, list]:
    """Train: two users x three classes; test: one user x three classes. ``extra``: {relpath: rows}."""
    rng = np.random.default_rng(seed)
    written = {}
    base = root / "DVSGesture"
    for folder, users in (("ibmGestureTrain", ("user01_fluorescent", "user02_led")), ("ibmGestureTest", ("user24_led",))):
        for user in users:
            for label in (0, 1, 2):
                rel = f"{folder}/{user}/{label}.npy"
                written[rel] = _random_rows(rng)
                _write_gesture_npy(base / rel, written[rel])
    for rel, rows in (extra or {}).items():
        written[rel] = rows
        _write_gesture_npy(base / rel, rows)
    return written


# --- AEDAT 4.0 -------------------------------------------------------------------------------

AEDAT4_DESCRIPTION = (
    '<dv version="2.0"><node name="outInfo" path="/mainModule/outInfo/">'
    '<node name="0" path="/mainModule/outInfo/0/">'
    '<attr key="compression" type="string">NONE</attr>'
    '<attr key="originalModuleName" type="string">capture</attr>'
    '<attr key="originalOutputName" type="string">events</attr>'
    '<attr key="typeDescription" type="string">Array of events (polarity ON/OFF).</attr>'
    '<attr key="typeIdentifier" type="string">EVTS</attr>'
    '<node name="info" path="/mainModule/outInfo/0/info/">'
    '<attr key="sizeX" type="int">128</attr><attr key="sizeY" type="int">128</attr>'
    "</node></node></node></dv>"
)


def _aedat4_ioheader(description: str) -> bytes:
    """The IOHeader flatbuffer (file identifier IOHE): compression and file_data_position left at
    their defaults (none, -1: packets run to the end of the file), description = the XML."""
    text = description.encode()
    buf = struct.pack("<I", 20) + b"IOHE"  # root table at 20
    buf += struct.pack("<HHHHH", 10, 8, 0, 0, 4) + b"\0\0"  # vtable at 8: 3 fields, only description
    buf += struct.pack("<iI", 20 - 8, 4)  # table at 20: its vtable, then the string's offset (-> 28)
    buf += struct.pack("<I", len(text)) + text + b"\0"
    return buf + b"\0" * (-len(buf) % 4)


def _aedat4_event_packet(events: np.ndarray) -> bytes:
    """A size-prefixed EventPacket flatbuffer (identifier EVTS): a vector of Event structs
    {t: int64, x: int16, y: int16, on: bool}, 16 bytes each (8-byte alignment)."""
    body = struct.pack("<I", 16) + b"EVTS"  # root table at 20 (offset from position 4)
    body += struct.pack("<HHH", 6, 8, 4) + b"\0\0"  # vtable at 12: one field, at table + 4
    body += struct.pack("<iI", 20 - 12, 4)  # table at 20: its vtable, the vector's offset (-> 28)
    body += struct.pack("<I", len(events))  # vector at 28, elements from 32 (8-aligned)
    for e in events:
        body += struct.pack("<qhh?3x", int(e["t"]), int(e["x"]), int(e["y"]), bool(e["p"]))
    return struct.pack("<I", len(body)) + body


def write_aedat4(path: Path, events: np.ndarray, packet_size: int = 50) -> None:
    """An uncompressed AEDAT 4.0 file of one polarity-event stream (id 0), several packets."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = _aedat4_ioheader(AEDAT4_DESCRIPTION)
    data = b"#!AER-DAT4.0\r\n" + struct.pack("<I", len(header)) + header
    for start in range(0, len(events), packet_size):
        packet = _aedat4_event_packet(events[start : start + packet_size])
        data += struct.pack("<II", 0, len(packet)) + packet
    path.write_bytes(data)


def _fake_cifar10_dvs(base: Path, per_class=2, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    written = {}
    for c in dvs.CIFAR10_DVS_CLASSES:
        for k in range(per_class):
            ev = _events(_random_rows(rng, n=120, duration=50_000))
            rel = f"{c}/cifar10_{c}_{k}.aedat4"
            write_aedat4(base / rel, ev)
            written[rel] = ev
    return written


# ---------------------------------------------------------------------------------------------
# ToFrame binning and the empty-events guard
# ---------------------------------------------------------------------------------------------


def test_bin_events_puts_known_events_in_the_expected_frame_and_pixel():
    # t from 1000 to 1400 in T = 4 bins: windows of floor(400 / 4) = 100 from the first event.
    ev = _events([
        (3, 5, 1, 1000), (3, 5, 1, 1050),  # frame 0, ON, y=5 x=3: count 2
        (7, 2, 0, 1150),                    # frame 1, OFF
        (0, 0, 1, 1299),                    # frame 2 (just before 1300)
        (9, 4, 0, 1300),                    # frame 3 (its first instant)
        (1, 1, 1, 1400),                    # at the end of the last window: tonic does not count it
    ])
    frames = dvs.bin_events(ev, 4, sensor_size=(10, 6, 2))  # W=10, H=6: non-square catches x/y swaps
    assert frames.shape == (4, 2, 6, 10) and frames.dtype == np.float32
    expected = np.zeros((4, 2, 6, 10), np.float32)
    expected[0, 1, 5, 3] = 2
    expected[1, 0, 2, 7] = 1
    expected[2, 1, 0, 0] = 1
    expected[3, 0, 4, 9] = 1
    np.testing.assert_array_equal(frames, expected)

    # Equal event counts per frame instead: 5 events // 4 frames = 1 event each (the 5th dropped).
    by_events = dvs.bin_events(ev, 4, sensor_size=(10, 6, 2), split_by="events")
    assert by_events.sum(axis=(1, 2, 3)).tolist() == [1, 1, 1, 1]
    assert by_events[0, 1, 5, 3] == 1 and by_events[1, 1, 5, 3] == 1 and by_events[2, 0, 2, 7] == 1


def test_bin_events_sorts_unordered_events_and_drops_events_outside_the_sensor():
    ev = _events([(2, 1, 1, 300), (1, 1, 0, 0), (50, 1, 1, 100), (0, 0, 1, 400)])
    frames = dvs.bin_events(ev, 2, sensor_size=(4, 3, 2))
    assert frames[0, 0, 1, 1] == 1 and frames[1, 1, 1, 2] == 1 and frames.sum() == 2


def test_empty_events_give_zero_frames_of_the_right_shape():
    empty = np.zeros(0, dtype=EVENT_DTYPE)
    for split_by in ("time", "events"):
        frames = dvs.bin_events(empty, 5, sensor_size=(10, 6, 2), split_by=split_by)
        assert frames.shape == (5, 2, 6, 10) and frames.dtype == np.float32 and not frames.any()
    # Only events outside the sensor: nothing left either.
    assert not dvs.bin_events(_events([(99, 99, 1, 5)]), 3, sensor_size=(10, 6, 2)).any()


def test_a_sample_whose_events_are_all_filtered_out_loads_as_zeros(tmp_path, no_network, registry):
    isolated = [(10, 10, 1, 0), (100, 100, 0, 500), (60, 20, 1, 900)]  # no neighbours in space
    _fake_gesture(tmp_path, extra={
        "ibmGestureTest/user25_natural/5.npy": [],  # an empty recording
        "ibmGestureTest/user25_natural/6.npy": isolated,  # all removed by tonic's Denoise
    })
    factory = registry.datasets["dvs_gesture"]
    bundle = factory(time_steps=6, root=str(tmp_path), denoise_us=50)
    names = [bundle.test.source(i).name for i in range(len(bundle.test))]
    for name in ("5.npy", "6.npy"):
        x, y = bundle.test[names.index(name)]
        assert x.shape == (6, 2, 48, 48) and not x.any() and y == int(name[0])
        assert bundle.test.frames(names.index(name)).shape == (6, 2, 128, 128)
    x, _ = bundle.train[0]  # and the augmentation copes with zero frames
    assert x.shape == (6, 2, 48, 48)
    # Without the filter the isolated events are counted (the last one is past the last window).
    plain = factory(time_steps=6, root=str(tmp_path), cache=False)
    assert plain.test.frames(names.index("6.npy")).sum() == 2
    assert no_network == []


# ---------------------------------------------------------------------------------------------
# DVS-Gesture through the registry
# ---------------------------------------------------------------------------------------------


def test_registry_lists_both_data_sets_with_toml_options_and_the_injected_time_steps(registry):
    for name in ("dvs_gesture", "cifar10_dvs"):
        info = registry.info("dataset", name)
        assert info.takes("time_steps") and "time_steps" not in info.options
        assert {"root", "cache", "download", "split_by"} <= set(info.options)
        assert info.defaults()["download"] is False and info.defaults()["root"] == "data"
    assert registry.info("dataset", "dvs_gesture").defaults()["train_frames"] == 14
    assert registry.info("dataset", "cifar10_dvs").defaults()["nda"] is True


def test_dvs_gesture_loads_offline_with_train_frames_and_known_events(tmp_path, no_network, registry):
    known = [(3, 5, 1, 0), (3, 5, 1, 1), (120, 7, 0, 10), (64, 100, 1, 19), (0, 0, 0, 20)]  # ms
    written = _fake_gesture(tmp_path, extra={"ibmGestureTest/user29_led/10.npy": known})
    bundle = registry.datasets["dvs_gesture"](time_steps=20, root=str(tmp_path))
    assert (bundle.in_channels, bundle.num_classes, bundle.input_size, bundle.temporal) == (2, 11, (48, 48), True)
    assert len(bundle.train) == 6 and len(bundle.test) == 4
    assert sorted(bundle.train.targets) == [0, 0, 1, 1, 2, 2]
    base = tmp_path / "DVSGesture"  # every recording read, and only those (not the frame cache)
    assert sorted(f.relative_to(base).as_posix() for f in bundle.files) == sorted(
        p.relative_to(base).as_posix() for p in base.rglob("*.npy"))

    x, y = bundle.train[0]
    assert x.shape == (14, 2, 48, 48) and x.dtype == torch.float32 and isinstance(y, int)
    x, y = bundle.test[0]
    assert x.shape == (20, 2, 48, 48)

    # Known events (t in ms -> us): 20 bins of floor(20000 / 20) = 1000 us.
    i = [str(bundle.test.source(k)) for k in range(len(bundle.test))].index(
        str(tmp_path / "DVSGesture" / "ibmGestureTest" / "user29_led" / "10.npy"))
    assert bundle.test.targets[i] == 10
    frames = bundle.test.frames(i)
    assert frames.shape == (20, 2, 128, 128)
    assert frames[0, 1, 5, 3] == 1 and frames[1, 1, 5, 3] == 1 and frames[10, 0, 7, 120] == 1
    assert frames[19, 1, 100, 64] == 1 and frames.sum() == 4  # the event at 20 ms ends the last window

    # A random sample equals tonic's events binned directly.
    k = 3
    rel = bundle.train.source(k).relative_to(tmp_path / "DVSGesture").as_posix()
    rows = np.array(written[rel], dtype=np.int64)
    ev = _events([(r[0], r[1], r[2], r[3] * 1000) for r in rows])
    np.testing.assert_array_equal(bundle.train.frames(k).numpy(), dvs.bin_events(ev, 20))

    # Batches through the runner's sequence conversion: 14 steps in training, 20 in test.
    loader = torch.utils.data.DataLoader(bundle.train, batch_size=3)
    xb, yb = next(iter(loader))
    assert xb.shape == (3, 14, 2, 48, 48) and yb.dtype == torch.long
    assert to_sequence(xb, 20, True).shape == (14, 3, 2, 48, 48)
    xb, _ = next(iter(torch.utils.data.DataLoader(bundle.test, batch_size=2)))
    assert to_sequence(xb, 20, True).shape == (20, 2, 2, 48, 48)
    pickle.loads(pickle.dumps(bundle.train))  # DataLoader workers started with spawn
    assert no_network == []


def test_train_augmentation_is_random_and_test_is_deterministic(tmp_path, no_network, registry):
    _fake_gesture(tmp_path)
    torch.manual_seed(0)
    bundle = registry.datasets["dvs_gesture"](time_steps=20, root=str(tmp_path), train_frames=14)
    a, b = bundle.train[1][0], bundle.train[1][0]
    assert a.shape == b.shape == (14, 2, 48, 48) and not torch.equal(a, b)
    assert torch.equal(bundle.test[1][0], bundle.test[1][0])
    # The test transform is Resize(48) of the cached frames, nothing else.
    from torchvision.transforms import v2

    assert torch.allclose(bundle.test[1][0], v2.Resize((48, 48))(bundle.test.frames(1)))
    # train_frames = 0 keeps all T frames.
    whole = registry.datasets["dvs_gesture"](time_steps=20, root=str(tmp_path), train_frames=0)
    assert whole.train[0][0].shape == (20, 2, 48, 48)
    assert no_network == []


def test_keep_frames_is_a_sorted_random_choice():
    x = torch.arange(20.0).view(20, 1, 1, 1).expand(20, 2, 3, 3)
    keep = dvs.KeepFrames(14)
    torch.manual_seed(0)
    choices = set()
    for _ in range(20):
        out = keep(x)
        kept = out[:, 0, 0, 0]
        assert out.shape == (14, 2, 3, 3) and torch.all(kept[1:] > kept[:-1])  # sorted, no repeats
        assert torch.equal(out, kept.view(14, 1, 1, 1).expand_as(out))  # whole frames kept
        choices.add(tuple(kept.tolist()))
    assert len(choices) > 1
    assert torch.equal(dvs.KeepFrames(14)(x[:10]), x[:10])  # fewer frames than asked: all kept


def test_augmentation_draws_once_per_sample_for_all_frames():
    x = torch.rand(1, 2, 128, 128).expand(6, 2, 128, 128).contiguous()  # six identical frames
    for t in (dvs.gesture_train_transform(train_frames=0), dvs.cifar10_dvs_train_transform()):
        out = t(x)
        assert out.shape == (6, 2, 48, 48)
        assert all(torch.equal(out[0], out[k]) for k in range(1, 6))


# ---------------------------------------------------------------------------------------------
# The frame cache
# ---------------------------------------------------------------------------------------------


def test_second_epoch_reads_the_cache_without_binning_again(tmp_path, no_network, registry, monkeypatch):
    _fake_gesture(tmp_path)
    real_bin = dvs.bin_events
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return real_bin(*args, **kwargs)

    monkeypatch.setattr(dvs, "bin_events", counting)
    bundle = registry.datasets["dvs_gesture"](time_steps=8, root=str(tmp_path))
    n = len(bundle.train) + len(bundle.test)
    for epoch in range(2):
        for ds in (bundle.train, bundle.test):
            for i in range(len(ds)):
                ds[i]
        assert len(calls) == n, f"epoch {epoch + 1}: {len(calls)} binning calls for {n} samples"

    cache = tmp_path / "dvs_gesture_frames_T8_128x128"
    assert (cache / "ibmGestureTrain" / "user01_fluorescent" / "0.npz").is_file()
    assert len(list(cache.rglob("*.npz"))) == n
    # Cached frames equal freshly binned ones.
    for ds in (bundle.train, bundle.test):
        for i in range(len(ds)):
            events, _ = ds.reader[ds.indices[i]]
            np.testing.assert_array_equal(ds.frames(i).numpy(), real_bin(events, 8))
    assert len(calls) == n

    # A new loader (next run) and another T: the T=8 cache is reused, T=5 gets its own.
    again = registry.datasets["dvs_gesture"](time_steps=8, root=str(tmp_path))
    again.train[0]
    assert len(calls) == n
    other = registry.datasets["dvs_gesture"](time_steps=5, root=str(tmp_path))
    assert other.train.frames(0).shape == (5, 2, 128, 128) and len(calls) == n + 1
    assert (tmp_path / "dvs_gesture_frames_T5_128x128").is_dir()

    # cache = false: binned every time, nothing written.
    nocache_root = tmp_path / "nocache"
    _fake_gesture(nocache_root)
    plain = registry.datasets["dvs_gesture"](time_steps=8, root=str(nocache_root), cache=False)
    calls.clear()
    plain.test[0], plain.test[0]
    assert len(calls) == 2 and not list(nocache_root.glob("*_frames_*"))
    assert no_network == []


# ---------------------------------------------------------------------------------------------
# Missing files, archives, download only when asked
# ---------------------------------------------------------------------------------------------


def test_missing_dvs_gesture_names_layout_and_source_and_never_downloads(tmp_path, no_network, registry):
    with pytest.raises(DatasetNotFoundError) as err:
        registry.datasets["dvs_gesture"](time_steps=20, root=str(tmp_path))
    msg = str(err.value)
    for part in ("DVS-Gesture not found", str(tmp_path / "DVSGesture" / "ibmGestureTrain"),
                 "userNN_<lighting>/<class>.npy", "ibmGestureTrain.tar.gz", "ibmGestureTest.tar.gz",
                 GESTURE_TRAIN_URL, "download = true", "download is off"):
        assert part in msg, part
    assert no_network == []
    # Fewer than tonic's 100 files and no archive: tonic itself would download; we read them.
    _fake_gesture(tmp_path)
    assert len(registry.datasets["dvs_gesture"](time_steps=4, root=str(tmp_path)).train) == 6
    assert no_network == []


def test_missing_cifar10_dvs_names_layout_and_source_and_never_downloads(tmp_path, no_network, registry):
    with pytest.raises(DatasetNotFoundError) as err:
        registry.datasets["cifar10_dvs"](time_steps=10, root=str(tmp_path))
    msg = str(err.value)
    for part in ("CIFAR10-DVS not found", "all 10 classes", "<class>/*.aedat4", "CIFAR10DVS.zip",
                 CIFAR10_DVS_URL, "download = true"):
        assert part in msg, part
    # Some classes only: the error names the missing ones.
    write_aedat4(tmp_path / "CIFAR10DVS" / "airplane" / "cifar10_airplane_0.aedat4", _events([(1, 1, 1, 0)]))
    with pytest.raises(DatasetNotFoundError, match="classes automobile, bird,"):
        registry.datasets["cifar10_dvs"](time_steps=10, root=str(tmp_path))
    assert no_network == []


def test_download_is_passed_to_tonic_only_when_set(tmp_path, monkeypatch, registry):
    import tonic.dataset

    calls = []

    def fake_download(url, download_root, filename=None, md5=None, **kwargs):
        calls.append((url, filename))
        raise urllib.error.URLError("no network here")

    monkeypatch.setattr(tonic.dataset, "download_and_extract_archive", fake_download)
    with pytest.raises(DatasetNotFoundError, match="download is off"):
        registry.datasets["dvs_gesture"](time_steps=4, root=str(tmp_path))
    assert calls == []
    with pytest.raises(DatasetNotFoundError, match="tonic's download failed \\(URLError"):
        registry.datasets["dvs_gesture"](time_steps=4, root=str(tmp_path), download=True)
    assert calls == [(GESTURE_TRAIN_URL, "ibmGestureTrain.tar.gz")]
    with pytest.raises(DatasetNotFoundError, match="tonic's download failed"):
        registry.datasets["cifar10_dvs"](time_steps=4, root=str(tmp_path), download=True)
    assert calls[-1] == (CIFAR10_DVS_URL, "CIFAR10DVS.zip")


def test_archives_on_disk_are_extracted_offline(tmp_path, no_network, registry):
    # DVS-Gesture: the two .tar.gz archives as tonic downloads them, nothing extracted.
    src = tmp_path / "src"
    _fake_gesture(src)
    root = tmp_path / "data"
    (root / "DVSGesture").mkdir(parents=True)
    for folder in ("ibmGestureTrain", "ibmGestureTest"):
        with tarfile.open(root / "DVSGesture" / f"{folder}.tar.gz", "w:gz") as tar:
            tar.add(src / "DVSGesture" / folder, arcname=folder)
    bundle = registry.datasets["dvs_gesture"](time_steps=4, root=str(root))
    assert len(bundle.train) == 6 and len(bundle.test) == 3

    # CIFAR10-DVS: CIFAR10DVS.zip holding one <class>.zip per class, as tonic downloads it.
    csrc = tmp_path / "csrc"
    _fake_cifar10_dvs(csrc, per_class=2)
    outer = io.BytesIO()
    with zipfile.ZipFile(outer, "w") as zo:
        for c in dvs.CIFAR10_DVS_CLASSES:
            inner = io.BytesIO()
            with zipfile.ZipFile(inner, "w") as zi:
                for f in sorted((csrc / c).iterdir()):
                    zi.write(f, arcname=f"{c}/{f.name}")
            zo.writestr(f"{c}.zip", inner.getvalue())
    (root / "CIFAR10DVS").mkdir()
    (root / "CIFAR10DVS" / "CIFAR10DVS.zip").write_bytes(outer.getvalue())
    c10 = registry.datasets["cifar10_dvs"](time_steps=4, root=str(root), train_fraction=0.5)
    assert len(c10.train) == 10 and len(c10.test) == 10
    assert no_network == []


# ---------------------------------------------------------------------------------------------
# CIFAR10-DVS: AEDAT4 files, the per-class split, NDA
# ---------------------------------------------------------------------------------------------


def test_written_aedat4_files_read_back_with_tonic(tmp_path):
    from tonic.io import read_aedat4

    ev = _events([(3, 5, 1, 10), (127, 0, 0, 20), (0, 127, 1, 2**40)] + [(k % 128, 7, k % 2, 100 + k) for k in range(120)])
    write_aedat4(tmp_path / "a.aedat4", ev, packet_size=50)  # three packets
    back = read_aedat4(str(tmp_path / "a.aedat4"))
    assert len(back) == len(ev)
    assert back.dtype.names[:3] == ("t", "x", "y")
    for field, name in (("t", "t"), ("x", "x"), ("y", "y"), ("p", back.dtype.names[3])):
        np.testing.assert_array_equal(back[name].astype(np.int64), ev[field].astype(np.int64))


def test_cifar10_dvs_loads_offline_splits_per_class_and_augments(tmp_path, no_network, registry):
    written = _fake_cifar10_dvs(tmp_path / "CIFAR10DVS", per_class=2)
    torch.manual_seed(0)
    bundle = registry.datasets["cifar10_dvs"](time_steps=10, root=str(tmp_path), train_fraction=0.5)
    assert (bundle.in_channels, bundle.num_classes, bundle.input_size, bundle.temporal) == (2, 10, (48, 48), True)
    assert len(bundle.train) == 10 and len(bundle.test) == 10
    assert [bundle.train.source(i).name for i in range(10)] == [f"cifar10_{c}_0.aedat4" for c in dvs.CIFAR10_DVS_CLASSES]
    assert [bundle.test.source(i).name for i in range(10)] == [f"cifar10_{c}_1.aedat4" for c in dvs.CIFAR10_DVS_CLASSES]
    assert bundle.train.targets == list(range(10)) == bundle.test.targets
    assert sorted(f.relative_to(tmp_path / "CIFAR10DVS").as_posix() for f in bundle.files) == sorted(written)

    x, y = bundle.train[4]
    assert x.shape == (10, 2, 48, 48) and y == 4
    assert not torch.equal(bundle.train[4][0], bundle.train[4][0])
    assert torch.equal(bundle.test[4][0], bundle.test[4][0])
    # The frames are the written events binned (read back through aedat + tonic).
    rel = bundle.test.source(7).relative_to(tmp_path / "CIFAR10DVS").as_posix()
    np.testing.assert_array_equal(bundle.test.frames(7).numpy(), dvs.bin_events(written[rel], 10))
    assert bundle.test.frames(7).sum() > 0
    assert (tmp_path / "cifar10_dvs_frames_T10_128x128" / "horse" / "cifar10_horse_1.npz").is_file()
    # No NDA and no flip: the train transform is crop + resize only (still random).
    plain = registry.datasets["cifar10_dvs"](time_steps=10, root=str(tmp_path), train_fraction=0.5, nda=False, flip=False)
    assert not any(isinstance(t, (dvs.NDA, dvs.RandomHorizontalFlip)) for t in plain.train.transform.transforms)
    assert any(isinstance(t, dvs.NDA) for t in bundle.train.transform.transforms)
    assert no_network == []


def test_split_is_the_first_90_percent_of_each_class_in_file_name_order():
    names = [f"c{label}/s{k:02d}.aedat4" for label, n in ((0, 20), (1, 10), (2, 7)) for k in range(n)]
    order = np.random.default_rng(0).permutation(len(names))  # tonic lists files in directory order
    reader = SimpleNamespace(data=[names[i] for i in order], targets=[int(names[i][1]) for i in order])
    train, test = dvs.split_per_class(reader, 0.9)
    train_names = [reader.data[i] for i in train]
    test_names = [reader.data[i] for i in test]
    assert train_names == [f"c0/s{k:02d}.aedat4" for k in range(18)] + [f"c1/s{k:02d}.aedat4" for k in range(9)] + [
        f"c2/s{k:02d}.aedat4" for k in range(7)  # ceil(6.3) = 7: SpikingJelly rounds up
    ]
    assert test_names == ["c0/s18.aedat4", "c0/s19.aedat4", "c1/s09.aedat4"]


def test_nda_operations_do_what_they_say():
    nda = dvs.NDA()
    # roll: a single event moves by (dy, dx), wrapping around, in every frame and channel.
    x = torch.zeros(3, 2, 8, 8)
    x[:, :, 2, 3] = 1
    rolled = nda.roll(x, 1, -4)
    assert rolled[:, :, 3, 7].eq(1).all() and rolled.sum() == x.sum()
    # cutout: zeroes the 16 x 16 square around the centre, nothing else.
    ones = torch.ones(2, 2, 48, 48)
    cut = nda.cutout(ones, 20, 30)
    assert not cut[:, :, 12:28, 22:38].any()
    assert cut.sum() == ones.sum() - 2 * 2 * 16 * 16
    corner = nda.cutout(ones, 0, 0)  # clipped at the border, as the official code
    assert not corner[:, :, :8, :8].any() and corner.sum() == ones.sum() - 2 * 2 * 8 * 8
    # rotate: same shape; 90 degrees (counter-clockwise) moves a pixel exactly.
    img = torch.zeros(2, 2, 9, 9)
    img[:, :, 4, 8] = 1  # right of the centre
    turned = nda.rotate(img, 90.0)
    assert turned.shape == img.shape and turned[:, :, 0, 4].eq(1).all() and turned.sum() == img.sum()
    assert nda.rotate(torch.rand(4, 2, 48, 48), 17.0).shape == (4, 2, 48, 48)

    # The draw: one of the three, uniformly; roll within +-5 px, angles within +-30 deg, centre inside.
    torch.manual_seed(0)
    seen: dict[str, int] = {}
    for _ in range(300):
        op, args = nda.draw(48, 48)
        seen[op] = seen.get(op, 0) + 1
        if op == "roll":
            assert all(-5 <= a <= 5 for a in args)
        elif op == "rotate":
            assert -30 <= args[0] <= 30
        else:
            assert 0 <= args[0] < 48 and 0 <= args[1] < 48
    assert set(seen) == {"roll", "rotate", "cutout"} and min(seen.values()) > 60
    assert nda(torch.rand(5, 2, 48, 48)).shape == (5, 2, 48, 48)
