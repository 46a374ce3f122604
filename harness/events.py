"""A cell's lifecycle as plain values, for cells that run away from the observers.

Where cells run in another process (a Ray worker, another node), the observers (tracking, the
summary files, the progress display) still run in the driver only: one process writes the
tracking store and the result files. The worker's cell is given an :class:`EventSender` in
place of the hook relay; every lifecycle call becomes a :class:`CellEvent` (cell id, hook name,
keyword arguments without the cell), which is picklable and travels to the driver, where
:class:`Delivery` calls the observers with what they would have got in-process, in the same
order per cell.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

LIFECYCLE = ("on_cell_start", "on_epoch_start", "on_batch_end", "on_epoch_end", "on_cell_end")
"""The per-cell hooks of :mod:`harness.hookspecs`, the names an event carries."""


@dataclass(frozen=True)
class CellEvent:
    """One lifecycle call of one cell: ``hook.<name>(cell=<the cell>, **payload)``."""

    cell_id: str
    name: str  # one of LIFECYCLE
    payload: dict[str, Any] = field(default_factory=dict)

    @property
    def epoch(self) -> int | None:
        return self.payload.get("epoch")


@dataclass
class CellResult:
    """What a cell ended with: the payload of ``on_cell_end``, and what an executor yields."""

    cell_id: str
    label: str
    status: str  # "finished" | "failed" | "killed"
    metrics: dict[str, float] = field(default_factory=dict)  # final epoch's metrics + best_test_top1
    epochs_completed: int = 0
    duration_s: float = 0.0  # seconds in the cell, a resumed cell's earlier sittings included
    error: str | None = None  # traceback text of a failed cell
    error_type: str | None = None
    error_message: str | None = None  # why, in a line or two: "ValueError: Invalid learning rate: -0.1"
    artifacts: dict[str, bytes] = field(default_factory=dict)  # file name -> content (observers store them)
    earlier_s: float = 0.0  # of duration_s, earlier sittings' (up to the checkpoint it resumed from); 0 unless resumed


def error_message(exc: BaseException, *, lines: int = 2, chars: int = 400) -> str:
    """What a console line says of a failure: ``"<type>: <message>"``, the message cut to its
    first ``lines`` non-empty lines and ``chars`` characters (the whole text is in the traceback)."""
    text = " / ".join([line.strip() for line in str(exc).splitlines() if line.strip()][:lines])
    if len(text) > chars:
        text = text[: chars - 3].rstrip() + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def checkpoint_done(result: CellResult) -> bool:
    """Whether a cell that ended so no longer needs its checkpoint: finished, or diverged (it
    would diverge again); a killed cell, or one that failed otherwise, keeps it."""
    return result.status == "finished" or result.error_type == "DivergedError"



class EventSender:
    """Stands in for the hook relay in a worker: each lifecycle call is handed to ``send`` as a
    :class:`CellEvent`. Batch events are throttled to one per ``batch_interval`` seconds per
    pass (the last batch of a pass is always sent); every cell and epoch event is sent.
    ``extra_info`` is added to the ``on_cell_start`` info (e.g. which worker runs the cell).

    ``observers_elsewhere``: the observers hear an event only once the driver delivers it, so the
    worker never notes an epoch as told (a driver stopped with the event still in flight would
    leave that epoch out of the history for good); the driver notes it after delivering it.
    """

    observers_elsewhere = True

    def __init__(self, send: Callable[[CellEvent], None], batch_interval: float = 0.25,
                 extra_info: dict[str, Any] | None = None) -> None:
        self._send = send
        self.batch_interval = batch_interval
        self.extra_info = dict(extra_info or {})
        self._last_batch = -float("inf")

    def _emit(self, name: str, cell: Any, **payload: Any) -> None:
        self._send(CellEvent(cell.id, name, payload))

    def on_cell_start(self, cell: Any, info: dict[str, Any]) -> None:
        self._emit("on_cell_start", cell, info={**info, **self.extra_info})

    def on_epoch_start(self, cell: Any, epoch: int, num_train_batches: int, num_test_batches: int) -> None:
        self._emit("on_epoch_start", cell, epoch=epoch, num_train_batches=num_train_batches, num_test_batches=num_test_batches)

    def on_batch_end(self, cell: Any, phase: str, batch: int, num_batches: int) -> None:
        now = time.monotonic()
        if batch < num_batches and now - self._last_batch < self.batch_interval:
            return
        self._last_batch = now
        self._emit("on_batch_end", cell, phase=phase, batch=batch, num_batches=num_batches)

    def on_epoch_end(self, cell: Any, epoch: int, metrics: dict[str, float]) -> None:
        self._emit("on_epoch_end", cell, epoch=epoch, metrics=dict(metrics))

    def on_cell_end(self, cell: Any, result: Any) -> None:
        self._emit("on_cell_end", cell, result=result)


class ObserverFailed(Exception):
    """An observer kept failing on a cell's event (e.g. the tracking server went away)."""


@dataclass
class CellRecord:
    """What the driver delivered of one cell so far."""

    last_epoch: int = 0  # the last epoch whose on_epoch_end the observers got
    metrics: dict[str, float] = field(default_factory=dict)  # that epoch's metrics
    failed_observers: set[str] = field(default_factory=set)
    earlier_s: float = 0.0  # a resumed cell's earlier sittings (its on_cell_start's resumed_elapsed_s)


class Delivery:
    """Calls the observers with a cell's events in the driver, one observer at a time.

    An observer that raises is called again after ``retry_delays`` (a tracking server that is
    restarting); if it still fails, :class:`ObserverFailed` names it and the event, and that
    observer gets no more events of the cell but its end. An epoch event for an epoch the
    observers already have (a retried cell repeating its last epoch) is dropped: the history
    never holds an epoch twice.
    """

    def __init__(self, hook: Any, cells: dict[str, Any], retry_delays: tuple[float, ...] = (1.0, 2.0, 4.0),
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.hook, self.cells = hook, cells
        self.retry_delays = retry_delays
        self.sleep = sleep
        self.records: dict[str, CellRecord] = {cid: CellRecord() for cid in cells}

    def deliver(self, event: CellEvent) -> None:
        """Hand ``event`` to the observers. :raises ObserverFailed: one kept failing."""
        record = self.records[event.cell_id]
        if event.name in ("on_epoch_start", "on_epoch_end") and (event.epoch or 0) <= record.last_epoch:
            return
        if event.name == "on_batch_end" and record.failed_observers:
            return
        if event.name == "on_epoch_end":
            record.last_epoch, record.metrics = int(event.payload["epoch"]), dict(event.payload["metrics"])
        if event.name == "on_cell_start":
            record.earlier_s = float((event.payload.get("info") or {}).get("resumed_elapsed_s", 0.0))
        self.call(event.cell_id, event.name, **event.payload)

    def call(self, cell_id: str, name: str, *, best_effort: bool = False, **payload: Any) -> None:
        """Call hook ``name`` of every observer for cell ``cell_id``, in the relay's order."""
        record = self.records[cell_id]
        kwargs = {"cell": self.cells[cell_id], **payload}
        failure: ObserverFailed | None = None
        for plugin, fn in _targets(getattr(self.hook, name)):
            already = plugin in record.failed_observers  # it failed on this cell before: only its end, once
            if already and name != "on_cell_end":
                continue
            error = self._attempt(fn, kwargs, retry=not best_effort and not already)
            if error is None or already:
                continue
            record.failed_observers.add(plugin)
            if failure is None and not best_effort:
                what = name[3:].replace("_", " ")
                at = f" of epoch {payload['epoch']}" if "epoch" in payload else ""
                failure = ObserverFailed(
                    f"observer {plugin!r} could not record the {what}{at} of the cell after "
                    f"{1 + len(self.retry_delays)} attempts: {type(error).__name__}: {error}"
                )
                failure.__cause__ = error
                failure.detail = "".join(traceback.format_exception(error))  # type: ignore[attr-defined]
        if failure is not None:
            raise failure

    def _attempt(self, fn: Callable[..., Any], kwargs: dict[str, Any], retry: bool) -> Exception | None:
        """Call ``fn``, again after each retry delay while it raises; the last error, or None."""
        for delay in (*(self.retry_delays if retry else ()), None):
            try:
                fn(**kwargs)
                return None
            except Exception as exc:
                if delay is None:
                    return exc
                self.sleep(delay)
        return None


def call_each(caller: Any, **kwargs: Any) -> list[tuple[str, Exception]]:
    """Call every implementation of one hook (pluggy's order), each whatever the others do;
    returns ``(plugin, error)`` for those that raised."""
    failures = []
    for plugin, fn in _targets(caller):
        try:
            fn(**kwargs)
        except Exception as exc:
            failures.append((plugin, exc))
    return failures


def _targets(caller: Any) -> list[tuple[str, Callable[..., Any]]]:
    """A hook relay's implementations as ``(plugin, function)``, in pluggy's call order; a relay
    that is not pluggy's (a test's recorder), or one with wrappers, as one call."""
    impls = caller.get_hookimpls() if hasattr(caller, "get_hookimpls") else None
    if impls is None or any(i.hookwrapper or i.wrapper for i in impls):
        return [("observers", caller)]
    return [(impl.plugin_name, _bound(impl)) for impl in reversed(impls)]


def _bound(impl: Any) -> Callable[..., Any]:
    """A pluggy hook implementation as a function of the hook's keyword arguments (it may take fewer)."""
    names = tuple(impl.argnames)

    def call(**kwargs: Any) -> Any:
        return impl.function(*[kwargs[k] for k in names])

    return call


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM while the block runs, then raise ``KeyboardInterrupt``: an event
    is recorded by every observer or by none (the tracker runs after the progress display, and a
    cell resumed after an epoch its tracker never got would lose that epoch). Outside the main
    thread (a worker's cell) signals do not arrive anyway: the block just runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:
        raise KeyboardInterrupt
