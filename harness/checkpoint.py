"""Per-cell checkpoints: everything needed to continue a cell exactly where it stopped.

A checkpoint is written at the end of every epoch to ``<dir>/last.pt`` (a temporary file, then
``os.replace``: a kill while writing leaves the previous checkpoint intact). It holds the model,
optimizer and scheduler states, the epoch, the best metric, the last epoch's metrics and every
random state the rest of the run draws from (Python, NumPy, torch CPU and CUDA, and the
generator that seeds the data-loading workers; the training order is a function of the seed and
the epoch). A data-parallel cell's checkpoint holds every process's random states
(``rng_ranks``, by rank; ``rng`` is process 0's). It is read with
``torch.load(weights_only=True)``: loading a checkpoint never executes code.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.atomic import atomic_write, write_text
from harness.errors import HarnessError

FORMAT = 1
FILE = "last.pt"
TOLD = "told"  # the last epoch the observers heard of: the checkpoint's, unless a kill came in between


class CheckpointError(HarnessError):
    """A checkpoint exists but cannot be used (corrupt, or written for another cell)."""


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "data": generator.get_state(),
    }


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> list[str]:
    """Restore what :func:`rng_state` saved; returns warnings about what could not be restored.

    CUDA states are restored for the GPUs that are visible now: a checkpoint written on a
    machine with more (or fewer) visible GPUs keeps the states that fit, and says so, instead of
    failing (``torch.cuda.set_rng_state_all`` raises for the extra states).
    """
    warnings: list[str] = []
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    saved = list(state["cuda"])
    if saved:
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        for index, cuda_state in enumerate(saved[:visible]):
            torch.cuda.set_rng_state(cuda_state, index)
        if len(saved) != visible:
            kept = min(len(saved), visible)
            warnings.append(
                f"the checkpoint holds CUDA random states of {len(saved)} GPU(s) and {visible} are visible now: "
                + (f"restored those of cuda:0..cuda:{kept - 1}" if kept else "none restored")
                + (", the other GPUs keep their own" if visible > kept else "")
                + "; random draws on the GPU (dropout masks) differ from an uninterrupted run"
            )
    generator.set_state(state["data"])
    return warnings


def save(directory: Path, cell_id: str, state: dict[str, Any]) -> Path:
    """Write ``state`` (plus the format and the cell id) atomically; returns the file."""
    path = directory / FILE
    with atomic_write(path, "wb") as fh:
        torch.save({"format": FORMAT, "cell_id": cell_id, **state}, fh)
    return path


def load(directory: Path, cell_id: str) -> dict[str, Any] | None:
    """The checkpoint of ``cell_id`` in ``directory``, or None if there is none.

    :raises CheckpointError: the file is unreadable or belongs to another cell.
    """
    path = directory / FILE
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, garbage, or not a weights-only file
        raise CheckpointError(f"checkpoint {path} cannot be read ({_load_error(exc)})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("cell_id") != cell_id:
        raise CheckpointError(f"checkpoint {path} is not a format-{FORMAT} checkpoint of cell {cell_id}")
    return state


def _load_error(exc: BaseException) -> str:
    """``torch.load``'s error, without its advice to load with ``weights_only=False`` (which
    would run whatever code the file holds: never for a checkpoint that failed to read)."""
    text = str(exc)
    if "Weights only load failed" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0] if "WeightsUnpickler error:" in text else ""
        return "not a checkpoint of plain tensors and values: " + (_sentence(detail) or "the weights-only reader refused it")
    return f"{type(exc).__name__}: {_sentence(text)}"


def _sentence(text: str) -> str:
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return first.split(". ", 1)[0][:300]


def mark_told(directory: Path, epoch: int) -> None:
    """Note that the observers were told of ``epoch`` (the checkpoint's), after they were."""
    write_text(directory / TOLD, str(epoch))


def told(directory: Path) -> int | None:
    """The last epoch the observers were told of (:func:`mark_told`), if any."""
    try:
        return int((directory / TOLD).read_text())
    except (OSError, ValueError):
        return None


def remove(directory: Path) -> None:
    """Delete the cell's checkpoint files (the directory too, when empty)."""
    if not directory.exists():
        return
    for p in directory.iterdir():
        if p.name in (FILE, TOLD) or p.name.startswith((f".{FILE}.", f".{TOLD}.")):
            p.unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError:
        pass
