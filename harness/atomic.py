"""Files written whole or not at all: the one way the harness and its plugins replace a file.

Every file a reader may open while it is being written (the summary, a checkpoint, a plot the
MLflow UI shows, a cached sample a DataLoader worker reads) is written to a temporary file of its
own next to the target and renamed over it (``os.replace``: atomic on one filesystem), so a reader
sees the old file or the new one, never half of one, and a kill while writing leaves the old one.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", *, sync: bool = True, **open_kw: Any) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; when the block ends without an error it
    replaces ``path`` (missing parent directories are made), on an error it is removed and
    ``path`` is untouched.

    ``mode``: ``"w"`` (text, UTF-8 unless ``encoding`` is given) or ``"wb"``. The temporary name
    holds the process id and a random part, so threads and processes writing the same target at
    once never share one (the last rename wins, each a whole file). It is created with ``"x"``
    (never clobbering anything) and the process's umask, as the target would be. ``sync``: the
    data reaches the disk before the rename (``fsync``), so a crash of the machine cannot leave
    an empty target; off for caches whose readers rebuild a bad entry.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes a file anew: mode 'w' or 'wb', not {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    if mode == "w":
        open_kw.setdefault("encoding", "utf-8")
    try:
        with open(tmp, mode.replace("w", "x"), **open_kw) as fh:
            yield fh
            fh.flush()
            if sync:
                os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str, *, sync: bool = True) -> Path:
    """:func:`atomic_write` of one string; returns ``Path(path)``."""
    with atomic_write(path, "w", sync=sync) as fh:
        fh.write(text)
    return Path(path)
