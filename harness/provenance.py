"""Where a cell's result came from: the code that produced it and the environment it ran in.

* :meth:`Provenance.code` -- for every plugin distribution a cell uses (the components it names,
  and the harness itself): ``"<version>+src.<hash>"``, the hash being a SHA-256 over the Python
  source files of the distribution's packages that hold the cell's components (for the harness,
  ``harness`` and its built-in plugins too). An edit to an editable install changes it without a
  version bump, so a finished result is never taken for one of code that has changed since.
* :func:`environment` -- Python, torch, CUDA and cuDNN versions, the device's name, the thread
  count.
* :func:`data_checksum` -- a checksum of the files the cell's data set was read from (what its
  plugin lists in ``DatasetBundle.files``): SHA-256 over their contents and names relative to
  where they lie, so a copy elsewhere gives the same value. A file's hash is computed once and
  cached (keyed by path, size and modification time) in ``$SNN_HARNESS_CACHE_DIR`` (default
  ``$XDG_CACHE_HOME/snn-harness`` or ``~/.cache/snn-harness``). Above ``max_bytes`` in all
  (16 GiB by default, ``SNN_HARNESS_DATA_CHECKSUM_MAX_BYTES``), only names and sizes are hashed,
  and the value says so (``names+sizes:...``).

Recorded as tags of the cell's run (``harness.code.<distribution>``, ``harness.env.<key>``,
``harness.data.<key>``);
``harness run`` compares a finished cell's recorded code with the installed code and lists the
cells whose code changed (``--rerun-changed`` runs them again). No torch at import.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from harness.atomic import atomic_write
from harness.config import COMPONENT_KINDS, plugin_components

HARNESS_DISTRIBUTION = "snn-harness"
KINDS = COMPONENT_KINDS  # every kind of component a cell names


class Provenance:
    """The code fingerprints of cells, for one run: a package's source hash is computed once
    (per instance; nothing is kept between runs)."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry
        self._hashes: dict[Path, str] = {}

    def code(self, config: Any) -> dict[str, str]:
        """``{distribution: "<version>+src.<hash>"}`` for the harness and every distribution
        that provides one of ``config``'s components."""
        import harness

        packages: dict[str, tuple[str, set[Path]]] = {
            HARNESS_DISTRIBUTION: (harness.__version__, {_package_dir("harness")}),
        }
        for kind, name in plugin_components(config):
            info = self.registry.info(kind, name)
            dist, _, version = info.package.rpartition(" ")
            if not dist or info.package.startswith("("):  # "(not installed)": a plugin registered from code
                dist, version = f"plugin:{info.plugin}", "unversioned"
            dist = re.sub(r"[^\w.\-:/ ]", "_", dist)  # a tag name MLflow accepts
            top = getattr(info.factory, "__module__", "").split(".")[0]
            where = _package_dir(top) if top else None
            entry = packages.setdefault(dist, (version, set()))
            if where is not None:
                entry[1].add(where)
        return {dist: f"{version}+src.{self._hash(sorted(dirs))}" for dist, (version, dirs) in sorted(packages.items())}

    def _hash(self, dirs: list[Path]) -> str:
        digest = hashlib.sha256()
        for d in dirs:
            if d not in self._hashes:
                self._hashes[d] = _source_hash(d)
            digest.update(self._hashes[d].encode())
        return digest.hexdigest()[:12]


def _package_dir(top: str) -> Path | None:
    """The directory of top-level package ``top`` (a single module: its file)."""
    module = sys.modules.get(top)
    if module is None:
        return None
    paths = list(getattr(module, "__path__", []))
    if paths:
        return Path(paths[0]).resolve()
    file = getattr(module, "__file__", None)
    return Path(file).resolve() if file else None


def _source_hash(where: Path) -> str:
    """SHA-256 over the ``.py`` files below ``where`` (their paths relative to it, and contents)."""
    digest = hashlib.sha256()
    files = [where] if where.is_file() else sorted(p for p in where.rglob("*.py") if "__pycache__" not in p.parts)
    for path in files:
        digest.update(str(path.relative_to(where.parent if where.is_file() else where)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def environment(device: Any = None) -> dict[str, str]:
    """Python, torch, CUDA, cuDNN, the device's name and the torch thread count."""
    import torch

    cuda = torch.version.cuda or "none"
    cudnn = str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none"
    name = platform.processor() or platform.machine()
    if device is not None and getattr(device, "type", "") == "cuda":
        name = torch.cuda.get_device_name(device)
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": cuda, "cudnn": cudnn,
            "device_name": name, "threads": str(torch.get_num_threads())}


ENV_CACHE_DIR = "SNN_HARNESS_CACHE_DIR"
ENV_DATA_MAX_BYTES = "SNN_HARNESS_DATA_CHECKSUM_MAX_BYTES"
DATA_MAX_BYTES = 16 * 2**30
CHUNK = 2**20


def cache_dir() -> Path:
    """Where the harness keeps what it computes once per machine (the data files' hashes)."""
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "snn-harness"


class FileHashes:
    """SHA-256 of files, cached in one JSON file: ``{path: [size, mtime_ns, hex]}``. A hash is
    reused while the file's size and modification time are those recorded. The cache is read
    once and written back (merged with what another process wrote meanwhile, atomically) by
    :meth:`save`; a cache that cannot be read or written is ignored, never an error."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path if path is not None else cache_dir() / "data-checksums.json"
        self.known = self._read()
        self.fresh: dict[str, list[Any]] = {}

    def _read(self) -> dict[str, list[Any]]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def sha256(self, path: Path, stat: os.stat_result) -> str:
        key = str(path)
        entry = self.known.get(key)
        if isinstance(entry, list) and len(entry) == 3 and entry[:2] == [stat.st_size, stat.st_mtime_ns]:
            return str(entry[2])
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                digest.update(chunk)
        self.fresh[key] = self.known[key] = [stat.st_size, stat.st_mtime_ns, digest.hexdigest()]
        return digest.hexdigest()

    def save(self) -> None:
        if not self.fresh:
            return
        try:
            merged = {**self._read(), **self.fresh}
            with atomic_write(self.path) as fh:
                json.dump(merged, fh)
            self.fresh = {}
        except OSError:
            pass


def _data_files(entries: Sequence[Path]) -> list[tuple[str, Path]]:
    """``(name, path)`` of every regular file of ``entries`` (a directory: every file below it),
    the names relative to the entries' common parent, sorted by name."""
    paths = [Path(e).resolve() for e in entries]
    base = Path(os.path.commonpath([p.parent for p in paths]))
    found: dict[str, Path] = {}
    for p in paths:
        files: Iterable[Path] = (f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            found[f.relative_to(base).as_posix()] = f
    return sorted(found.items())


def data_checksum(entries: Sequence[Path], hashes: FileHashes | None = None, max_bytes: int | None = None) -> dict[str, str]:
    """The checksum of a data set's files: ``{"checksum": "sha256:<16 hex>", "files": "<n>",
    "bytes": "<total>"}`` (``names+sizes:<16 hex>`` above ``max_bytes``); ``{}`` for no files;
    ``{"checksum": "unavailable: <reason>"}`` where a file cannot be read."""
    if not entries:
        return {}
    if max_bytes is None:
        max_bytes = int(os.environ.get(ENV_DATA_MAX_BYTES) or DATA_MAX_BYTES)
    try:
        files = [(name, path, path.stat()) for name, path in _data_files(entries)]
        total = sum(st.st_size for _, _, st in files)
        digest = hashlib.sha256()
        by_content = total <= max_bytes
        hashes = hashes if hashes is not None else (FileHashes() if by_content else None)
        for name, path, st in files:
            part = hashes.sha256(path, st) if hashes is not None and by_content else str(st.st_size)
            digest.update(f"{name}\0{part}\n".encode())
    except OSError as exc:
        return {"checksum": f"unavailable: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")}
    finally:
        if hashes is not None:
            hashes.save()
    kind = "sha256" if by_content else "names+sizes"
    return {"checksum": f"{kind}:{digest.hexdigest()[:16]}", "files": str(len(files)), "bytes": str(total)}


def changed(recorded: dict[str, str], current: dict[str, str]) -> list[str]:
    """What differs between a run's recorded code and the installed code, one line per
    distribution (``"snn-harness 0.1.0+src.aaa -> 0.1.0+src.bbb"``)."""
    return [f"{dist} {recorded.get(dist, '(none)')} -> {current.get(dist, '(none)')}"
            for dist in sorted(set(recorded) | set(current)) if recorded.get(dist) != current.get(dist)]
