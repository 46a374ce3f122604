"""What data parallelism adds to a cell's loop, behind one object: :class:`Engine`.

The training loop (:mod:`harness.runner`) calls the engine at named points and has no branch of
its own for ``torchrun``: with one process every part below does the plain thing (errors raise
where they happen, the optimizer is the optimizer, the process writes its own checkpoints).
With several processes:

* **gradient averaging**: the trainer steps :class:`harness.parallel.GradientAveragingOptimizer`;
* **metric reduction**: the training pass's loss and accuracy are those of the union batch;
* **process-0 I/O**: only process 0 reads (and sends the others) and writes checkpoints;
* **held observer errors**: process 0's observer errors (:class:`HeldHook`) and errors outside
  the training step (:class:`Meetings`) are held until the processes meet, where every process
  stops the cell together; an error inside a step becomes :class:`harness.parallel.GroupBroken`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness import checkpoint, parallel
from harness.build import CellParts, load_scheduler_state, seed_process
from harness.config import CellConfig
from harness.errors import HarnessError


class DivergedError(HarnessError):
    """The loss or a parameter became non-finite."""


class ObserverError(HarnessError):
    """An observer (tracking, progress, ...) or a checkpoint write failed during a data-parallel cell."""


class HeldHook:
    """The hook relay of a data-parallel cell: an error in one process's observers (only process 0
    has any) or checkpoint writes is held back instead of raised, until the next point where the
    processes meet anyway (the :class:`DivergenceGuard`'s all-reduce, or a :class:`Meetings`
    settle at the end of the epoch). There every process stops the cell together; raising at once
    would leave the others waiting in a collective, or pair their collectives with those of the
    next cell. After an error the remaining calls are skipped.
    """

    def __init__(self, hook: Any) -> None:
        self._hook = hook
        self.error: Exception | None = None

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self._hook, name)
        return lambda **kw: self.run(fn, **kw)

    def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if self.error is not None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            self.error = exc
            return None


class DivergenceGuard:
    """Stops a cell whose training loss or parameters become non-finite.

    Losses are collected on the device and checked every ``every`` steps (and at the end of the
    epoch) with one host sync, together with every parameter: a diverged cell stops within
    ``every`` steps, with the step where the loss first went non-finite. In a data-parallel cell the
    same all-reduce also carries whether ``held`` holds an observer's error, so that every process
    stops then.
    """

    def __init__(self, model: nn.Module, every: int = 25, held: HeldHook | None = None) -> None:
        self.held = held
        self.params = [(n, p) for n, p in model.named_parameters()]
        self.every = every
        self.epoch = 0
        self.pending: list[torch.Tensor] = []
        self.last_step = 0

    def start(self, epoch: int) -> None:
        self.epoch, self.pending, self.last_step = epoch, [], 0

    def step(self, step: int, loss: torch.Tensor) -> None:
        self.pending.append(loss.detach().reshape(()).float())
        self.last_step = step
        if len(self.pending) >= self.every:
            self.check()

    def check(self) -> None:
        if not self.pending:
            return
        losses = torch.stack(self.pending)
        flags = torch.isfinite(losses)
        if self.params:
            flags = torch.cat([flags, torch.stack([torch.isfinite(p.detach()).all() for _, p in self.params]).to(flags.device)])
        ok = flags.all().float().reshape(1)
        if parallel.current().enabled:  # every process stops together, or none does
            observers_ok = 0.0 if self.held is not None and self.held.error is not None else 1.0
            both = torch.cat([ok, torch.full((1,), observers_ok, device=ok.device)])  # no copy from the host
            torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MIN)
            finite, observed = both.tolist()  # the one host sync
            if not observed:
                if self.held is not None and self.held.error is not None:
                    raise ObserverError(
                        f"an observer failed ({type(self.held.error).__name__}: {self.held.error}); "
                        f"every process stopped the cell at epoch {self.epoch}, by step {self.last_step}"
                    ) from self.held.error
                raise ObserverError(f"an observer failed in another process; stopped at epoch {self.epoch}, by step {self.last_step}")
            ok = torch.tensor([finite])
        if bool(ok.item()):  # the one host sync
            self.pending.clear()
            return
        if bool(flags.all()):
            raise DivergedError(f"diverged at epoch {self.epoch}, by step {self.last_step}, in another process")
        n = len(self.pending)
        first = self.last_step - n + 1
        bad = (~flags[:n]).nonzero()
        if len(bad):
            j = int(bad[0])
            raise DivergedError(f"diverged at epoch {self.epoch}, step {first + j}: training loss is {losses[j].item()}")
        k = int((~flags[n:]).nonzero()[0])
        raise DivergedError(
            f"diverged at epoch {self.epoch}, by step {self.last_step}: parameter {self.params[k][0]!r} is not finite"
        )


class Meetings:
    """Where the processes of a data-parallel cell meet outside the training step and agree on
    the cell's outcome: after building it, after restoring its checkpoint, at the end of every
    epoch and after training (:func:`harness.parallel.agree`, one object all-gather each).

    ``with meetings.hold():`` runs a block whose error (a data file one node cannot read, an
    evaluation error, an observer's error held by :class:`HeldHook`) is held, not raised, until
    ``meetings.settle(where)``, where every process stops the cell together if any process
    failed. With one process, errors are raised where they happen and ``settle`` only returns
    ``[payload]``.
    """

    def __init__(self, par: parallel.Parallel, held: HeldHook | None) -> None:
        self.par, self.held = par, held
        self.error: Exception | None = None

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            if not self.par.enabled:
                raise
            self.error = self.error or exc

    def settle(self, where: str, payload: Any = None) -> list[Any]:
        """Agree with the other processes; returns every process's ``payload``, by rank."""
        error, self.error = self.error, None
        if error is None and self.held is not None and self.held.error is not None:
            error = ObserverError(f"an observer failed ({parallel.describe(self.held.error)}); every process stopped the cell {where}")
            error.__cause__ = self.held.error
        return parallel.agree(error, self.par, where, payload)


def read_checkpoint(ckpt: Path | None, cell_id: str, par: parallel.Parallel) -> tuple[dict[str, Any] | None, str | None]:
    """Process 0 reads the cell's checkpoint and sends it to the others (their nodes need not see
    the file). Returns the state (None: start from scratch) and why a checkpoint was discarded."""
    state, discarded, error = None, None, None
    if ckpt is not None and par.is_main:
        try:
            state = checkpoint.load(ckpt, cell_id)
        except checkpoint.CheckpointError as exc:  # never fatal: the cell starts from scratch
            discarded = f"{exc}; starting from scratch"
            checkpoint.remove(ckpt)
        except Exception as exc:  # e.g. an unreadable directory: fail the cell on every process
            error = exc
    if par.enabled:
        state, discarded, text = parallel.broadcast_object((state, discarded, None if error is None else parallel.describe(error)), par)
        if text is not None and error is None:
            raise parallel.ProcessFailed(f"process 0 could not read the checkpoint of cell {cell_id} ({text})")
    if error is not None:
        raise error
    return state, discarded


def restore(state: dict[str, Any], parts: CellParts, generator: torch.Generator, cfg: CellConfig, par: parallel.Parallel) -> list[str]:
    """Load a checkpoint's states into ``parts``; returns warnings. Under data parallelism every
    process restores its own random states (``rng_ranks``); a checkpoint of another number of
    processes restarts each process's own stream from the seed and the epoch instead of giving
    every process process 0's."""
    parts.model.load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    load_scheduler_state(parts.scheduler, state["scheduler"])
    if parts.ema is not None:
        if "ema" not in state:
            raise KeyError("the checkpoint holds no moving average of the model, which this cell keeps")
        parts.ema.module.load_state_dict(state["ema"])
    if parts.scaler is not None:
        if "scaler" not in state:
            raise KeyError("the checkpoint holds no loss scale, which this float16 cell keeps")
        parts.scaler.load_state_dict(state["scaler"])
    ranks = state.get("rng_ranks") or []
    if par.enabled and len(ranks) == par.world_size:
        return checkpoint.set_rng_state(ranks[par.rank], generator)
    warnings = checkpoint.set_rng_state(state["rng"], generator)
    if par.enabled:
        warnings.append(
            f"the checkpoint holds the random states of {max(len(ranks), 1)} process(es), this run has {par.world_size}: "
            "each process's random stream restarts from the seed and the epoch"
        )
        if par.rank:
            seed_process(cfg.seed, par.rank, generator, int(state["epoch"]))
    return warnings


class Engine:
    """One cell's place among the processes of a ``torchrun`` launch (one process: all no-ops).

    ``engine.hook`` is the hook relay the loop calls (process 0's observers' errors held under
    data parallelism); ``hold()``/``settle(where)`` bracket code whose errors all processes agree
    on; the other methods are the named points of the loop.
    """

    def __init__(self, hook: Any) -> None:
        self.par = parallel.current()
        self.observers_elsewhere = bool(getattr(hook, "observers_elsewhere", False))  # a worker's EventSender
        self.hook = HeldHook(hook) if self.par.enabled else hook
        self.held = self.hook if isinstance(self.hook, HeldHook) else None
        self.meetings = Meetings(self.par, self.held)

    @property
    def is_main(self) -> bool:
        return self.par.is_main

    def hold(self) -> contextlib.AbstractContextManager[None]:
        return self.meetings.hold()

    def settle(self, where: str, payload: Any = None) -> list[Any]:
        return self.meetings.settle(where, payload)

    def check(self, config: CellConfig) -> None:
        """:raises HarnessError: the batch does not split evenly over the processes."""
        if config.batch_size % self.par.world_size:
            raise HarnessError(f"batch_size {config.batch_size} does not split evenly over {self.par.world_size} processes")
        if config.precision == "float16" and self.par.enabled:
            raise HarnessError("precision 'float16' under data parallelism is not supported yet (the processes would "
                               "have to agree on the steps the loss scaling skips): use 'bfloat16'")

    def prepare(self, parts: CellParts, config: CellConfig, generator: torch.Generator) -> CellParts:
        """After building: the trainer steps the gradient-averaging optimizer; every process but
        0 (same initial weights everywhere) draws its own augmentations and dropout masks."""
        if self.par.enabled:
            parts.step_optimizer = parallel.GradientAveragingOptimizer(parts.optimizer)
        if self.par.rank:
            seed_process(config.seed, self.par.rank, generator)
        return parts

    def guard(self, model: nn.Module) -> DivergenceGuard:
        return DivergenceGuard(model, held=self.held)

    def reduce_pass(self, loss_sum: torch.Tensor, correct: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The training pass's totals over every process: the union batch's loss and accuracy."""
        if not self.par.enabled:
            return loss_sum, correct, count
        totals = torch.stack([loss_sum, correct.double(), torch.full((), float(count), device=loss_sum.device, dtype=torch.float64)])
        parallel.all_reduce_sum(totals)
        return totals[0], totals[1], int(totals[2].item())

    def training_pass(self, run: Callable[[], dict[str, float]], cell: Any, epoch: int) -> dict[str, float]:
        """The epoch's training pass. Under data parallelism the processes meet inside every step
        (statistics, gradients), so an error that strikes one process there cannot be agreed on: it
        becomes :class:`harness.parallel.GroupBroken` and ends the run. Divergence and observer
        errors are agreed in the divergence check and stop the cell on every process together."""
        try:
            return run()
        except (DivergedError, ObserverError):
            raise
        except Exception as exc:
            par = self.par
            if not par.enabled:
                raise
            raise parallel.GroupBroken(
                f"process {par.rank} of {par.world_size} failed in a training step of epoch {epoch} of cell [{cell.label}] "
                f"({parallel.describe(exc)}). The other processes may be waiting for it inside a collective, so the run "
                "ends here (torchrun stops them); the next run resumes the cell from its last checkpoint. A broken "
                "connection means that another process failed first: its own message says why"
            ) from exc

    def read_checkpoint(self, ckpt: Path | None, cell_id: str) -> tuple[dict[str, Any] | None, str | None]:
        return read_checkpoint(ckpt, cell_id, self.par)

    def save_checkpoint(self, ckpt: Path, cell_id: str, snapshot: Callable[[], dict[str, Any]]) -> None:
        """Process 0 writes ``snapshot()``; a failed write under data parallelism is held like an
        observer's error (it must not stop process 0 alone)."""
        if not self.is_main:
            return
        if self.held is not None:
            self.held.run(lambda: checkpoint.save(ckpt, cell_id, snapshot()))
        else:
            checkpoint.save(ckpt, cell_id, snapshot())

    def mark_told(self, ckpt: Path | None, epoch: int) -> None:
        """After the observers heard of ``epoch``: a resume need not tell them again. Where the
        observers are in another process (a Ray worker's cell), the driver notes it instead,
        once it has delivered the event."""
        if ckpt is not None and self.is_main and not self.observers_elsewhere and ckpt.is_dir():
            if self.held is not None:
                self.held.run(checkpoint.mark_told, ckpt, epoch)
            else:
                checkpoint.mark_told(ckpt, epoch)

    def remove_checkpoint(self, ckpt: Path) -> None:
        if self.is_main:
            checkpoint.remove(ckpt)

    def restore(self, state: dict[str, Any], parts: CellParts, generator: torch.Generator, config: CellConfig) -> list[str]:
        return restore(state, parts, generator, config, self.par)

    def rng_ranks(self, states: list[Any]) -> dict[str, Any]:
        """What a checkpoint holds of the random states gathered at the end of an epoch."""
        return {"rng": states[0], **({"rng_ranks": states} if self.par.enabled else {})}
