"""Where a cell's result came from: the code that produced it and the environment it ran in.

* :meth:`Provenance.code` -- for every plugin distribution a cell uses (the components it names,
  and the harness itself): ``"<version>+src.<hash>"``, the hash being a SHA-256 over the Python
  source files of the distribution's packages that hold the cell's components (for the harness,
  ``harness`` and its built-in plugins too). An edit to an editable install changes it without a
  version bump, so a finished result is never taken for one of code that has changed since.
* :func:`environment` -- Python, torch, CUDA and cuDNN versions, the device's name, the thread
  count.

Recorded as tags of the cell's run (``harness.code.<distribution>``, ``harness.env.<key>``);
``harness run`` compares a finished cell's recorded code with the installed code and lists the
cells whose code changed (``--rerun-changed`` runs them again). No torch at import.
"""

from __future__ import annotations

import hashlib
import platform
import re
import sys
from pathlib import Path
from typing import Any

HARNESS_DISTRIBUTION = "snn-harness"
KINDS = ("dataset", "model", "normalizer", "threshold", "trainer", "loss")


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
        for kind in KINDS:
            info = self.registry.info(kind, getattr(config, kind).name)
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


def changed(recorded: dict[str, str], current: dict[str, str]) -> list[str]:
    """What differs between a run's recorded code and the installed code, one line per
    distribution (``"snn-harness 0.1.0+src.aaa -> 0.1.0+src.bbb"``)."""
    return [f"{dist} {recorded.get(dist, '(none)')} -> {current.get(dist, '(none)')}"
            for dist in sorted(set(recorded) | set(current)) if recorded.get(dist) != current.get(dist)]
