"""Two CPU processes joined by a gloo process group, kept for a test session: the contract of
synchronized statistics runs a normalizer in both, each on its share of a batch."""

from __future__ import annotations

import datetime
import os
import queue
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

WORLD = 2
JOB_TIMEOUT_S = 120.0


def _serve(rank: int, store: str, jobs: Any, results: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=60))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
        return
    try:
        while True:
            job = jobs.get()
            if job is None:
                break
            fn, args = job
            try:
                results.put((rank, True, fn(rank, *args)))
            except BaseException:
                results.put((rank, False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class GlooPair:
    """``pair.run(fn, *args)`` calls ``fn(rank, *args)`` in both processes (``fn`` and ``args``
    picklable: ``fn`` a module-level function) and returns their two results, by rank. Started on
    the first call; a failed or hung job ends the pair (the next call starts a fresh one)."""

    def __init__(self) -> None:
        self._procs: list[Any] = []
        self._jobs: list[Any] = []
        self._results: Any = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    def _start(self) -> None:
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        self._dir = tempfile.TemporaryDirectory(prefix="harness-gloo-")
        store = os.path.join(self._dir.name, "store")
        self._results = ctx.Queue()
        self._jobs = [ctx.Queue() for _ in range(WORLD)]
        self._procs = [ctx.Process(target=_serve, args=(r, store, self._jobs[r], self._results), daemon=True)
                       for r in range(WORLD)]
        for p in self._procs:
            p.start()

    def run(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        if not self._procs:
            self._start()
        for q in self._jobs:
            q.put((fn, args))
        out: dict[int, Any] = {}
        errors: list[str] = []
        for _ in range(WORLD):
            try:
                rank, ok, value = self._results.get(timeout=JOB_TIMEOUT_S)
            except queue.Empty:
                errors.append(f"no answer within {JOB_TIMEOUT_S:.0f} s (a collective waiting on the other process?)")
                break
            if ok:
                out[rank] = value
            else:
                errors.append(f"process {rank}:\n{value}")
                break  # the other may wait in a collective forever: end the pair
        if errors:
            self.close()
            raise RuntimeError("in the two gloo processes: " + "\n".join(errors))
        return [out[r] for r in range(WORLD)]

    def close(self) -> None:
        for q in self._jobs:
            try:
                q.put(None)
            except Exception:
                pass
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._procs, self._jobs, self._results = [], [], None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
