"""One ``harness run`` per results directory at a time: an advisory lock on ``<results>/.lock``.

Two runs writing the same SQLite store, summaries and checkpoints would corrupt each other; the
second one is refused with who holds the lock. The lock is released when the process ends, however
it ends (the operating system drops ``flock`` locks of a dead process), so a killed run never leaves
a stale lock behind.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import IO

from harness.errors import HarnessError


class ResultsLockedError(HarnessError):
    """Another ``harness run`` is using the results directory."""


class ResultsLock:
    def __init__(self, results_dir: Path) -> None:
        self.path = Path(results_dir) / ".lock"
        self._fh: IO[str] | None = None

    def acquire(self) -> None:
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(self.path.parent, os.W_OK):
                raise PermissionError(13, "read-only")
            fh = self.path.open("a+")
        except OSError as exc:  # read-only, not a directory, no space, ...
            raise HarnessError(
                f"the results directory {self.path.parent} cannot be written ({exc.strerror or exc}): a run writes its "
                "tracking store, summaries and checkpoints there; choose another with --results"
            ) from None
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise ResultsLockedError(
                f"{self.path.parent} is in use by another harness run ({holder}); wait for it to finish, "
                "or give this run its own --results directory"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing drops the lock
            self._fh = None

    def __enter__(self) -> ResultsLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
