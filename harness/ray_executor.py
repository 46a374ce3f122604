"""The ``ray`` executor: every cell a Ray task, as many at a time as the cluster's resources allow.

The driver (the ``harness run`` process) submits one streaming-generator task per cell with
``num_gpus = gpus_per_cell`` and ``num_cpus = cpus_per_cell``. In the worker the cell runs in a
thread and its lifecycle calls become :class:`harness.events.CellEvent` values that the task
yields as they happen; the driver hands them to the observers (:class:`harness.events.Delivery`)
while the other cells go on, so tracking, the summary files and the progress display live in
the driver alone, and a worker never imports MLflow.

Faults: a worker that dies (killed, out of memory, its node lost) has its cell submitted again,
up to ``max_retries`` times; the cell continues from its last checkpoint. Past that the cell is
FAILED with "worker died: ...". Ctrl-C cancels the running cells (KILLED, checkpoints kept).

Ray is started on loopback only when the harness starts it (no address): every server of the
instance listens on 127.0.0.1, Ray's token authentication is on (Ray's default for local
instances), and there is no dashboard unless ``dashboard = true``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.config import plugin_components
from harness.errors import ConfigError, HarnessError
from harness.events import (CellEvent, CellResult, Delivery, EventSender, ObserverFailed, checkpoint_done, error_message,
                            interrupts_deferred)
from harness.executor import CellJob, CellsInterrupted
from harness.matrix import ExecutionConfig

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Set to 0 before Ray is imported, Ray's node address is 127.0.0.1 and its servers bind there only."""


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs besides the cell (plain values: it travels with every task)."""

    plugins: Any  # harness.registry.PluginSettings: the worker loads the driver's plugins
    checkpoint_dir: str | None
    threads: int  # torch threads of the cell: its cpus_per_cell
    batch_interval: float = 0.25  # seconds between two batch progress events of a cell
    data: dict[str, Any] = dataclasses.field(default_factory=dict)  # node id -> ObjectRef of its probe's NodeData


@dataclass(frozen=True)
class WorkerReport:
    """Sent by the task before the cell's end: where it ran and what that process imported."""

    host: str
    pid: int
    node_id: str
    mlflow_imported: bool


class _Done:
    pass


def cell_task(cell: Any, spec: WorkerSpec) -> Iterator[Any]:
    """The body of a cell's Ray task: yields the cell's events, then a :class:`WorkerReport`
    just before the cell's ``on_cell_end`` event, which is the last item."""
    import ray

    facts = {"worker_host": socket.gethostname(), "worker_pid": os.getpid(), "worker_node": ray.get_runtime_context().get_node_id()}
    events: queue.SimpleQueue[Any] = queue.SimpleQueue()
    done = _Done()
    thread = threading.Thread(target=_work, args=(cell, spec, events.put, facts, done), name=f"cell-{cell.id}", daemon=True)
    thread.start()
    end = None
    while (item := events.get()) is not done:
        if isinstance(item, CellEvent) and item.name == "on_cell_end":
            end = item  # sent last, after the report
            continue
        yield item
    thread.join()
    yield WorkerReport(facts["worker_host"], facts["worker_pid"], facts["worker_node"], "mlflow" in sys.modules)
    yield end


def _work(cell: Any, spec: WorkerSpec, send: Any, facts: dict[str, Any], done: _Done) -> None:
    sender = EventSender(send, spec.batch_interval, extra_info=facts)
    try:
        import torch

        from harness.registry import build_registry
        from harness.runner import run_cell

        torch.set_num_threads(spec.threads)
        try:
            registry = build_registry(spec.plugins.plugin_manager())
            missing_plugins(cell, registry)
        except Exception as exc:
            sender.on_cell_end(cell=cell, result=_failed_result(cell, exc, traceback.format_exc()))
            return
        ckpt = Path(spec.checkpoint_dir) if spec.checkpoint_dir else None
        preloaded = _node_data(spec.data.get(facts["worker_node"]), cell)
        run_cell(cell, registry, sender, checkpoint_dir=ckpt, remove_checkpoint=False, preloaded=preloaded)
    except BaseException as exc:  # noqa: BLE001 - whatever happens, the driver hears of it
        sender.on_cell_end(cell=cell, result=_failed_result(cell, exc, traceback.format_exc()))
    finally:
        send(done)


@dataclass(frozen=True)
class NodeData:
    """The data sets a node's probe loaded, pickled (``PreloadedData.key`` -> bytes), for the
    cells that run on that node: each cell unpickles its own copy instead of loading the data set
    again. ``left_out`` says why a data set is not here (its cells load it themselves)."""

    bundles: dict[str, bytes]
    left_out: dict[str, str]


MAX_SHARED_BUNDLE_BYTES = 2 << 30
"""A data set whose pickle is larger stays out of the object store: its cells load it themselves."""


def pack_data(preloaded: Any, limit: int = MAX_SHARED_BUNDLE_BYTES) -> NodeData:
    """Pickle each bundle of ``preloaded`` (:class:`harness.session.PreloadedData`) with Ray's
    cloudpickle; one that cannot be pickled, or is larger than ``limit``, is left out with why."""
    from ray import cloudpickle

    bundles, left_out = {}, {}
    for key, bundle in preloaded.items():
        try:
            data = cloudpickle.dumps(bundle)
        except Exception as exc:  # noqa: BLE001 - e.g. an open file handle: the cells load it
            left_out[key] = f"it cannot be pickled ({type(exc).__name__}: {exc})"
            continue
        if len(data) > limit:
            left_out[key] = f"its pickle ({len(data) / 2**20:.0f} MiB) is larger than {limit / 2**20:.0f} MiB"
            continue
        bundles[key] = data
    return NodeData(bundles, left_out)


def _node_data(ref: Any, cell: Any) -> Any:
    """A :class:`harness.session.PreloadedData` holding ``cell``'s data set as the probe of this
    node loaded it (``ref``: the probe's :class:`NodeData`), or None where there is none: the cell
    then loads the data set itself, as it would without the probe."""
    if ref is None:
        return None
    import ray
    from ray import cloudpickle

    from harness.session import PreloadedData

    try:
        node = ray.get(ref, timeout=60)
        data = node.bundles.get(PreloadedData.key(cell.config))
        if data is None:
            return None
        preloaded = PreloadedData()
        preloaded.put(cell.config, cloudpickle.loads(data))
        return preloaded
    except Exception:  # noqa: BLE001 - the object was lost (its node restarted) or will not load: load it afresh
        return None


def node_probe(cells: list[Any], plugins: Any, probe: str, token: str) -> tuple[tuple[str, list[str], dict[str, str]], NodeData]:
    """Run on one node before the first cell: ``((host, problems, left_out), data)``. Loads the
    node's plugins and each data set the cells need (``data``: the loaded data sets, for the cells
    that run on this node; ``left_out``: those that are not in it, and why), and reads the
    driver's probe file in the checkpoint directory."""
    from harness.registry import build_registry
    from harness.session import PreloadedData, check_data, check_devices

    host, problems = socket.gethostname(), []
    loaded = PreloadedData()
    _warm_imports()  # this worker runs a cell next
    try:
        text = Path(probe).read_text()
        if text != token:
            problems.append(f"the checkpoint directory {Path(probe).parent} holds another run's probe file: not the driver's directory")
    except OSError as exc:
        problems.append(f"cannot read the checkpoint directory the driver wrote ({Path(probe).parent}): {exc.strerror or exc}")
    try:
        registry = build_registry(plugins.plugin_manager())
        for cell in cells:
            missing_plugins(cell, registry)
        check_devices(_Cells(cells), cuda=False)  # this worker holds no GPU: the driver checks CUDA devices
        check_data(_Cells(cells), registry, loaded)
    except Exception as exc:
        problems.append(str(exc))
    data = pack_data(loaded) if not problems else NodeData({}, {})
    return (host, problems, data.left_out), data


def warm_worker(plugins: Any) -> None:
    """Start a worker up before the cells (Python, torch, the runner and the plugins imported):
    run during the probe, so that cells begin on workers that are ready, not one after another."""
    from harness.registry import build_registry

    _warm_imports()
    build_registry(plugins.plugin_manager())


def _warm_imports() -> None:
    """What every cell imports, imported once per worker before the first cell starts: torch and
    the training loop, timm's optimizer and scheduler factories (timm imports its models with
    them), and ``torch._dynamo``, which the first optimizer of a process imports (``torch.optim``
    guards its constructors with it; seconds of a cell's start otherwise)."""
    import importlib

    for module in ("harness.runner", "timm.optim", "timm.scheduler", "torch._dynamo"):
        importlib.import_module(module)


@dataclass(frozen=True)
class _Cells:
    cells: list[Any]


def missing_plugins(cell: Any, registry: Any) -> None:
    """:raises HarnessError: a component the cell names has no plugin in this process (e.g. a
    plugin package installed on the driver's machine but not on this node)."""
    from harness.errors import UnknownNameError

    cfg = cell.config
    for kind, name in plugin_components(cfg):
        try:
            registry.info(kind, name)
        except UnknownNameError as exc:
            raise HarnessError(
                f"cell [{cell.label}] needs {kind} {name!r}, which no plugin provides on node {socket.gethostname()} "
                f"({exc}). Install the plugin's package on every node of the cluster, in the same environment as the harness"
            ) from None


def _failed_result(cell: Any, exc: BaseException, text: str, **kw: Any) -> CellResult:
    return CellResult(cell.id, cell.label, "failed", error=text, error_type=type(exc).__name__, error_message=error_message(exc), **kw)


@dataclass
class _Running:
    cell: Any
    attempt: int
    started: float  # submitted (time.perf_counter())
    first_item: float | None = None  # the first item of its stream arrived
    ready: float | None = None  # it could start: submitted, or the end that freed the slot it waited for (see CellTiming)
    end_item: float | None = None  # its on_cell_end arrived


@dataclass(frozen=True)
class CellTiming:
    """Ray's cost for a cell, seen from the driver, counted from the moment the cell could start:
    its submission, or for a cell submitted while every slot of the cluster was taken (it waits in
    Ray's queue), the arrival of the end that freed a slot for it, first come first served.
    ``to_start_s``: from there to the arrival of its first event (scheduling, a worker's start
    where none was ready, the registry and the data set in the worker). ``overhead_s``: from there to the arrival of its end, minus
    the cell's own time in this sitting (``duration_s - earlier_s``): the time its slot spent on
    it outside the cell itself.
    ``queued_s``: from its submission to the moment it could start (0 for a cell that found a
    free slot), counted in neither of the others."""

    to_start_s: float
    overhead_s: float
    queued_s: float = 0.0


class RayExecutor:
    """Runs cells as Ray tasks; see the module's docstring."""

    in_process = False

    def __init__(self, config: ExecutionConfig, *, verbose: bool = False, retry_delays: tuple[float, ...] = (1.0, 2.0, 4.0),
                 stream: Any = None) -> None:
        self.config = config
        self.verbose = verbose
        self.retry_delays = retry_delays
        self.stream = stream or sys.stderr
        self.owns_ray = False
        self.reports: dict[str, WorkerReport] = {}  # cell id -> where its last attempt ran
        self.attempts: dict[str, int] = {}  # cell id -> attempts made
        self.node_data: dict[str, Any] = {}  # node id -> ObjectRef of the NodeData its probe loaded
        self.timings: dict[str, CellTiming] = {}  # cell id -> its last attempt's times outside the cell
        self.preflight_s: float | None = None  # the preflight's wall time: probe, data sets, workers' start
        self._queued: list[_Running] = []  # cells submitted while every slot was taken, in order, not yet given one
        self._stopping: threading.Thread | None = None  # the local instance's shutdown, once every cell ended
        self.checkpoint_dir: Path | None = None  # the cells' checkpoints (shared by every node), while running
        if config.address is None:  # before any method imports Ray: its address is read at import
            os.environ.setdefault(LOOPBACK_ENV, "0")

    # -- the Ray instance ---------------------------------------------------------------------
    def start(self) -> None:
        """Join the cluster at ``address``, or start a local instance on loopback (or use the one
        this process already joined)."""
        if self.config.address is None:
            os.environ.setdefault(LOOPBACK_ENV, "0")
        import ray

        _quiet_ray_errors(self.verbose)
        if ray.is_initialized():
            return
        quiet = {"logging_level": "INFO" if self.verbose else "ERROR", "log_to_driver": self.verbose}
        try:
            if self.config.address is not None:
                ray.init(address=self.config.address, **quiet)
            else:
                from ray._private import ray_constants

                if getattr(ray_constants, "ENABLE_RAY_CLUSTER", False):  # Ray was imported before the loopback setting
                    print(f"harness: warning: Ray was imported before the harness could keep its local instance on "
                          f"127.0.0.1 (set {LOOPBACK_ENV}=0 before importing Ray): it listens on this machine's network "
                          "address", file=self.stream)
                with _terminal_interrupts_ignored():  # Ray's own processes inherit it
                    # "local": a new instance, even where RAY_ADDRESS or a `ray start` on this machine names one
                    ray.init(address="local", include_dashboard=self.config.dashboard, dashboard_host="127.0.0.1", **quiet)
                self.owns_ray = True
        except ConnectionError as exc:
            raise HarnessError(
                f"cannot join the Ray cluster at {self.config.address!r} ({exc}). Start it first (`ray start --head` on the "
                "head node, `ray start --address=<head>:6379` on the others), with the same RAY_AUTH_MODE and token on every "
                "node and here"
            ) from None
        except Exception as exc:  # e.g. no space for Ray's session files or object store
            where = f"join the Ray cluster at {self.config.address!r}" if self.config.address else "start a local Ray instance"
            raise HarnessError(f"cannot {where} ({type(exc).__name__}: {exc}); --verbose shows Ray's own log, "
                               "--executor serial runs the cells without Ray") from exc

    def close(self) -> None:
        """Stop the local instance this executor started (a joined cluster stays up), or wait
        for the shutdown :meth:`run` began when the last cell ended."""
        self.node_data = {}  # the data sets leave the object store of a cluster that stays up
        if self._stopping is not None:
            self._stopping.join()
            self._stopping = None
        if self.owns_ray:
            self._stop_ray()

    def _stop_ray(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        self.owns_ray = False

    def _stop_soon(self) -> None:
        """Every cell has ended: stop the local instance in a thread of its own while the
        observers finish the matrix (summary, plots, tracking), since Ray takes a second or two
        to stop its processes one after another; :meth:`close` waits for it."""
        if self.owns_ray and self._stopping is None:
            self.node_data = {}
            self._stopping = threading.Thread(target=self._stop_ray, name="harness-ray-shutdown")
            self._stopping.start()

    def resources(self, cell: Any = None) -> tuple[int, float]:
        """``(cpus_per_cell, gpus_per_cell)`` of ``cell`` (of a GPU cell when None): the
        configured ones, or one cell per GPU where the cluster has GPUs (with its share of the
        CPUs; a cell whose device is the CPU takes no GPU), else one CPU per cell."""
        import ray

        total = ray.cluster_resources()
        gpus_total, cpus_total = float(total.get("GPU", 0)), float(total.get("CPU", 1))
        gpus = self.config.gpus_per_cell
        if gpus is None:
            on_cpu = cell is not None and str(cell.config.device).split(":")[0] in ("cpu", "meta")
            gpus = 1.0 if gpus_total > 0 and not on_cpu else 0.0
        cpus = self.config.cpus_per_cell
        if cpus is None:
            cpus = max(1, int(cpus_total // gpus_total)) if gpus_total > 0 and gpus > 0 else 1
        if gpus > gpus_total:
            raise ConfigError(f"execution gpus_per_cell = {gpus}, but the Ray cluster has {gpus_total:g} GPU(s)")
        if cpus > cpus_total:
            raise ConfigError(f"execution cpus_per_cell = {cpus}, but the Ray cluster has {cpus_total:g} CPU(s)")
        return cpus, gpus

    def check_device(self, cell: Any) -> None:
        """A CUDA cell needs a GPU share from Ray, and sees only the GPU Ray gives it, as ``cuda``
        (``cuda:0``): ``cuda:N`` for N > 0 names a GPU no cell can see.

        :raises ConfigError: why the cell cannot run on the cluster, and what to set instead.
        """
        import ray

        device = str(cell.config.device)
        kind, _, index = device.partition(":")
        if kind != "cuda":
            return
        if not float(ray.cluster_resources().get("GPU", 0)):
            raise ConfigError(f"cell [{cell.label}] has device = {device!r}, but the Ray cluster has no GPU: "
                              'use device = "auto" (the GPU where there is one) or "cpu"')
        if self.resources(cell)[1] <= 0:
            raise ConfigError(f"cell [{cell.label}] has device = {device!r}, but gpus_per_cell = 0 gives it no GPU")
        if index not in ("", "0"):
            raise ConfigError(f"cell [{cell.label}] has device = {device!r}: under ray a cell sees only the GPU Ray "
                              'assigns it; use device = "cuda" (or "auto"), and gpus_per_cell to share GPUs')

    # -- before the first cell ----------------------------------------------------------------
    def preflight(self, matrix: Any, registry: Any, checkpoint_dir: Path) -> None:
        """Check on every node that can run a cell what the cells will need there: the plugins,
        every data set (loaded once per node, and kept in the node's object store: the cells that
        run there unpickle it instead of loading it again, see :class:`NodeData`), and that the
        checkpoint directory the driver writes is the one the node reads (shared storage).

        :raises HarnessError: what failed, on which node, and what to do.
        """
        import uuid

        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.start()
        began = time.perf_counter()
        for cell in matrix.cells:
            self.check_device(cell)
        needs = {self.resources(cell) for cell in matrix.cells}
        nodes = [n for n in ray.nodes() if n.get("Alive") and any(
            n["Resources"].get("CPU", 0) >= cpus and n["Resources"].get("GPU", 0) >= gpus for cpus, gpus in needs)]
        if not nodes:
            cpus, gpus = min(needs)
            raise HarnessError(f"no node of the Ray cluster has {cpus} CPU(s)" + (f" and {gpus:g} GPU(s)" if gpus else "")
                               + " for a cell: lower cpus_per_cell / gpus_per_cell")
        checkpoint_dir = checkpoint_dir.resolve()  # the same path on every node: shared storage, mounted alike
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        probe = checkpoint_dir / f".probe-{token}"
        probe.write_text(token)
        # the probe's data sets stay in the node's object store for its cells (no retries: a probe
        # re-run to rebuild a lost copy could wait on a node that is gone; a cell loads its own then)
        probe_task, warm_task = ray.remote(num_returns=2, max_retries=0)(node_probe), ray.remote(warm_worker)
        cpus = min(needs)[0]
        futures, warming = [], []
        try:
            for n in nodes:  # the probe, and meanwhile one worker per further cell slot of the node starts up
                on_node = NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
                answer, data = (probe_task.options(num_cpus=cpus, scheduling_strategy=on_node)
                                .remote(list(matrix.cells), registry.plugins, str(probe), token))
                futures.append(answer)
                self.node_data[n["NodeID"]] = data
                slots = min(int(n["Resources"].get("CPU", 0) // cpus), self.config.max_concurrent or len(matrix.cells),
                            len(matrix.cells))
                warming += [warm_task.options(num_cpus=cpus, scheduling_strategy=on_node).remote(registry.plugins)
                            for _ in range(slots - 1)]
            try:
                answers = ray.get(futures)
                ray.get(warming)
            except ray.exceptions.RayError as exc:  # before the probe's body: its arguments did not unpickle there
                self.node_data = {}
                first = next((line for line in str(exc).splitlines() if "Error" in line), str(exc).strip()[:300])
                raise HarnessError(
                    f"the preflight could not start on a Ray worker ({type(exc).__name__}: {first.strip()}). Every plugin "
                    "must be importable on every node, from the environment the workers run in: install the plugin's "
                    "package there (a plugin given as an object must be defined in an importable module, not in a "
                    "script or a notebook)"
                ) from exc
        finally:
            probe.unlink(missing_ok=True)
        self.preflight_s = time.perf_counter() - began
        hosts = [host for host, _, _ in answers]
        names = [host if hosts.count(host) == 1 else f"{host} ({n['NodeID'][:8]})" for host, n in zip(hosts, nodes)]
        problems = [f"  - node {name}: {problem}" for name, (_, found, _) in zip(names, answers) for problem in found]
        if self.verbose:
            for key, why in {key: why for _, _, left_out in answers for key, why in left_out.items()}.items():
                print(f"harness: ray: data set {key.split()[0]!r} is loaded by each of its cells: {why}", file=self.stream)
        if problems:
            self.node_data = {}
            several = len(nodes) > 1
            raise HarnessError(
                f"the preflight failed on {sum(1 for _, found, _ in answers if found)} of {len(nodes)} node(s):\n" + "\n".join(problems)
                + ("\nEvery node must read the checkpoints the others write: put the results directory on shared storage, "
                   "or name a shared directory with `checkpoint_dir` in [execution]" if several and any("checkpoint" in p for p in problems) else "")
            )

    # -- running cells ----------------------------------------------------------------------
    def run(self, cells: Sequence[Any], job: CellJob) -> Iterator[CellResult]:
        import ray

        self.start()
        checkpoints = str(Path(job.checkpoint_dir).resolve()) if job.checkpoint_dir is not None else None
        self.checkpoint_dir = Path(checkpoints) if checkpoints else None
        task = ray.remote(max_retries=0)(cell_task)
        delivery = Delivery(job.hook, {c.id: c for c in cells}, retry_delays=self.retry_delays)
        pending = list(cells)
        running: dict[Any, _Running] = {}
        limit = self.config.max_concurrent or len(cells)
        fit = self._fit(cells) if cells else 0
        self._queued = []
        if cells:
            print(f"harness: ray: {self._describe(cells, min(limit, fit))}", file=self.stream)
        try:
            while pending or running:
                while pending and len(running) < limit:
                    cell = pending.pop(0)
                    attempt = self.attempts.get(cell.id, 0) + 1
                    self.attempts[cell.id] = attempt
                    cpus, gpus = self.resources(cell)
                    spec = WorkerSpec(plugins=job.registry.plugins, threads=cpus, checkpoint_dir=checkpoints, data=self.node_data)
                    try:
                        gen = task.options(name=f"cell {cell.label}"[:100], num_cpus=cpus, num_gpus=gpus).remote(cell, spec)
                    except (TypeError, ValueError, AttributeError) as exc:  # what pickling raises
                        raise HarnessError(
                            f"cannot send cell [{cell.label}] to a Ray worker ({type(exc).__name__}: {exc}): the cell's "
                            "config and the plugins given as extra_plugins must be picklable"
                        ) from exc
                    state = running[gen] = _Running(cell, attempt, time.perf_counter())
                    if len(running) > fit:  # it waits in Ray's queue for a slot
                        self._queued.append(state)
                    else:
                        state.ready = state.started
                ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
                for gen in ready:
                    state = running[gen]
                    outcome = self._advance(gen, state, delivery)
                    if outcome is None:
                        continue
                    del running[gen]
                    self._slot_freed(state)
                    if outcome == "retry":
                        pending.insert(0, state.cell)
                        continue
                    result, interrupted = self._finish(outcome, state, delivery, job)
                    if not pending and not running:
                        self._stop_soon()
                    yield result
                    if interrupted:  # Ctrl-C came while the observers recorded the end
                        raise KeyboardInterrupt
            if self.verbose and self.timings:
                print(f"harness: ray: {self._timing_line()}", file=self.stream)
        except KeyboardInterrupt:  # also thrown in by the session at a yield
            killed = []
            for gen, state in running.items():
                ray.cancel(gen, force=True)
                record = delivery.records[state.cell.id]
                result = CellResult(state.cell.id, state.cell.label, "killed", metrics=dict(record.metrics),
                                    epochs_completed=record.last_epoch, earlier_s=record.earlier_s,
                                    duration_s=record.earlier_s + time.perf_counter() - state.started)
                with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C: the others are still recorded
                    self._end(result, delivery)
                killed.append(result)
            raise CellsInterrupted(killed) from None

    def _describe(self, cells: Sequence[Any], limit: int) -> str:
        """How many cells run at once, with what, on how many nodes."""
        import ray

        cpus, gpus = self.resources(cells[0])
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        each = f"{cpus} CPU" + (f" and {gpus:g} GPU" if gpus else "")
        return f"up to {min(limit, len(cells))} cell(s) at a time, {each} each, on {nodes} node(s)"

    def _fit(self, cells: Sequence[Any]) -> int:
        """How many of the cells the cluster's resources hold at once (Ray queues the rest)."""
        import ray

        total = ray.cluster_resources()
        cpus, gpus = self.resources(cells[0])
        fit = int(total.get("CPU", 0) // cpus)
        if gpus:
            fit = min(fit, int(total.get("GPU", 0) // gpus))
        return max(fit, 1)

    def _slot_freed(self, state: _Running) -> None:
        """A cell left its slot: the first cell still waiting in Ray's queue could start from now."""
        if state in self._queued:  # it never had a slot (e.g. its worker died before its start): it freed none
            self._queued.remove(state)
            return
        if self._queued:
            self._queued.pop(0).ready = time.perf_counter()

    def _timing_line(self) -> str:
        """Ray's cost outside the cells (``--verbose``): median and range over the cells."""
        import statistics

        def spread(values: list[float]) -> str:
            return f"{statistics.median(values):.2f} s ({min(values):.2f}-{max(values):.2f})"

        over = [t.overhead_s for t in self.timings.values()]
        start = [t.to_start_s for t in self.timings.values()]
        line = (f"time outside the cells' own run, per cell: {spread(over)}, of which before the cell's start "
                f"{spread(start)}, over {len(over)} cell(s)")
        if self.preflight_s is not None:
            line += f"; the preflight (probe, data sets, workers' start) took {self.preflight_s:.2f} s"
        return line

    def _advance(self, gen: Any, state: _Running, delivery: Delivery) -> CellResult | str | None:
        """Take the next item of a cell's stream: ``None`` while the cell goes on, its result
        when it ended, ``"retry"`` when its worker died and it is to run again."""
        import ray

        cell = state.cell
        try:
            item = ray.get(next(gen))
        except StopIteration:
            return self._died(gen, state, "the task ended without the cell's end", delivery)
        except ray.exceptions.RayTaskError as exc:  # the task body itself raised (not the cell: run_cell catches)
            return _failed_result(cell, exc, str(exc), **self._so_far(delivery, cell))
        except ray.exceptions.RayError as exc:  # the worker process or its node is gone
            return self._died(gen, state, f"{type(exc).__name__}: {exc}", delivery)
        now = time.perf_counter()
        if state.first_item is None:
            state.first_item = now
            if state.ready is None:  # it started before the driver saw a slot freed: Ray had more room than counted
                self._queued.remove(state)
                state.ready = state.started
        if isinstance(item, WorkerReport):
            self.reports[cell.id] = item
            return None
        if item.name == "on_cell_end":
            state.end_item = now
            return item.payload["result"]
        try:
            with interrupts_deferred():  # Ctrl-C waits until every observer has the event
                delivery.deliver(item)
                if item.name == "on_epoch_end":
                    self._mark_told(cell, int(item.payload["epoch"]))
        except ObserverFailed as exc:  # e.g. the tracking server stayed away: the cell stops, recorded as failed
            ray.cancel(gen, force=True)
            print(f"harness: cell [{cell.label}]: {exc}; the cell is stopped", file=self.stream)
            result = _failed_result(cell, exc, f"{exc}\n\n{getattr(exc, 'detail', '')}", **self._so_far(delivery, cell))
            return result
        return None

    def _mark_told(self, cell: Any, epoch: int) -> None:
        """Every observer has the epoch: a resume of the cell need not tell it again (the worker
        leaves this to the driver, see :class:`harness.events.EventSender`)."""
        if self.checkpoint_dir is None:
            return
        from harness import checkpoint

        directory = self.checkpoint_dir / cell.id
        if directory.is_dir():
            checkpoint.mark_told(directory, epoch)

    def _died(self, gen: Any, state: _Running, why: str, delivery: Delivery) -> CellResult | str:
        cell = state.cell
        retries = self.config.max_retries
        first = why.strip().splitlines()[0][:300]
        if state.attempt <= retries:
            print(f"harness: cell [{cell.label}]: worker died ({first}); running it again from its checkpoint "
                  f"(retry {state.attempt} of {retries})", file=self.stream)
            return "retry"
        tried = f" after {state.attempt} attempt(s)" if retries else ""
        exc = WorkerDied(f"worker died{tried}: {why}")
        return CellResult(cell.id, cell.label, "failed", error=str(exc), error_type="WorkerDied", error_message=error_message(exc),
                          **self._so_far(delivery, cell))

    @staticmethod
    def _so_far(delivery: Delivery, cell: Any) -> dict[str, Any]:
        record = delivery.records[cell.id]
        return {"metrics": dict(record.metrics), "epochs_completed": record.last_epoch, "earlier_s": record.earlier_s}

    def _finish(self, result: CellResult, state: _Running, delivery: Delivery, job: CellJob) -> tuple[CellResult, bool]:
        """Record a cell's end; returns the result and whether a Ctrl-C came meanwhile."""
        if state.end_item is not None and state.first_item is not None and state.ready is not None:  # the worker's own end
            self.timings[result.cell_id] = CellTiming(
                state.first_item - state.ready, state.end_item - state.ready - (result.duration_s - result.earlier_s),
                state.ready - state.started)
        if not result.duration_s:  # the driver's own result (the worker died): this attempt, after the earlier sittings
            result = dataclasses.replace(result, duration_s=result.earlier_s + time.perf_counter() - state.started)
        interrupted = False
        try:
            self._end(result, delivery)
        except KeyboardInterrupt:
            interrupted = True
        if job.checkpoint_dir is not None and checkpoint_done(result):  # recorded: the checkpoint can go
            from harness import checkpoint

            checkpoint.remove(job.checkpoint_dir / result.cell_id)
        return result, interrupted

    def _end(self, result: CellResult, delivery: Delivery) -> None:
        try:
            with interrupts_deferred():
                delivery.call(result.cell_id, "on_cell_end", result=result)
        except ObserverFailed as exc:
            print(f"harness: cell [{result.label}]: {exc}", file=self.stream)


@contextlib.contextmanager
def _terminal_interrupts_ignored() -> Iterator[None]:
    """Ignore SIGINT while Ray starts its processes: they share the driver's process group, and a
    Ctrl-C at the terminal, which reaches the whole group, must stop the driver (which cancels the
    cells and shuts Ray down in order), not kill Ray's servers under it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _quiet_ray_errors(verbose: bool) -> None:
    """Ray prints what it knows of a dead worker to the driver's terminal; the harness reports
    that itself, in the cell's failure reason and its retry line. Shown with ``--verbose``."""
    from ray._private import worker

    real = getattr(worker, "_harness_print_to_stdstream", None) or getattr(worker, "print_to_stdstream", None)
    if real is None:
        return
    worker._harness_print_to_stdstream = real

    def printer(data: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        if verbose or data.get("pid") != "raylet":
            real(data, *args, **kwargs)

    worker.print_to_stdstream = printer


class WorkerDied(HarnessError):
    """The process running a cell ended without the cell's end (killed, out of memory, node lost)."""
