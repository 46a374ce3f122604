"""One ``harness run`` per results directory at a time: a lock on ``<results>/.lock``.

Two runs writing the same SQLite store, summaries and checkpoints would corrupt each other; the
second one is refused with who holds the lock (``<results>/.lock.holder``: process, host, since
when). The lock is ``filelock``'s: an ``flock`` where the filesystem has it, which the operating
system drops when the process ends however it ends, so a killed run never leaves a stale lock
behind; on a filesystem without ``flock`` (some network mounts) filelock's marker-file lock.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from harness.atomic import write_text
from harness.errors import HarnessError


class ResultsLockedError(HarnessError):
    """Another ``harness run`` is using the results directory."""


class ResultsLock:
    def __init__(self, results_dir: Path) -> None:
        self.path = Path(results_dir) / ".lock"
        self.holder = self.path.with_name(".lock.holder")
        self._lock = None

    def acquire(self) -> None:
        from filelock import FileLock, Timeout

        lock = FileLock(self.path, timeout=0, thread_local=False)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(self.path.parent, os.W_OK):
                raise PermissionError(13, "read-only")
            lock.acquire()
        except Timeout:
            try:
                holder = self.holder.read_text().strip()
            except OSError:
                holder = ""
            raise ResultsLockedError(
                f"{self.path.parent} is in use by another harness run ({holder or 'another process'}); wait for it to "
                "finish, or give this run its own --results directory"
            ) from None
        except OSError as exc:  # read-only, not a directory, no space, ...
            raise HarnessError(
                f"the results directory {self.path.parent} cannot be written ({exc.strerror or exc}): a run writes its "
                "tracking store, summaries and checkpoints there; choose another with --results"
            ) from None
        self._lock = lock
        write_text(self.holder, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n",
                   sync=False)

    def release(self) -> None:
        if self._lock is not None:
            self.holder.unlink(missing_ok=True)
            self._lock.release()
            self._lock = None

    def __enter__(self) -> ResultsLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
