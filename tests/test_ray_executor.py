"""The ``ray`` executor on a real Ray cluster of two nodes on this machine (one CPU each,
started once per session; see ``conftest.ray_instance``).

Cells run as Ray tasks, two at a time, one on each node; their events stream back to the
observers in this process. What is checked: the same numbers as ``serial`` at the same thread
count, one MLflow run per cell under one parent, the events of each cell in order, a SIGKILLed
worker's cell resumed from its checkpoint (or failed with ``max_retries = 0``), Ctrl-C of a real
driver process with a local instance of its own (which listens on loopback only), storage the
nodes do not share, and that workers never import MLflow.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from conftest import REPO, TINY_DEFAULTS, start_mlflow_server

pytestmark = pytest.mark.usefixtures("ray_instance")

TIMING = ("per_s", "time", "rss", "duration", "s_per_iter")


def _stable(metrics: dict) -> dict:
    """A cell's metrics without the ones that measure the machine (speed, process memory)."""
    return {k: v for k, v in metrics.items() if not any(t in k for t in TIMING)}


def _matrix(tmp_path: Path, body: str, name: str, epochs: int, delay: float) -> Path:
    """The tiny matrix with ``epochs`` epochs of the slow trainer (``delay`` s a batch), plus ``body``."""
    path = tmp_path / f"{name}.toml"
    defaults = TINY_DEFAULTS.replace("epochs = 1", f"epochs = {epochs}").replace('trainer = "bptt"', 'trainer = "slow_bptt"')
    path.write_text(f'name = "{name}"\n' + defaults + f"[options.trainer.slow_bptt]\ndelay = {delay}\n" + textwrap.dedent(body))
    return path


class EventLog:
    """An observer of this process: every per-cell call, in the order it arrives."""

    def __init__(self, on_event=None) -> None:
        self.events: list[tuple[str, str, dict]] = []
        self.on_event = on_event

    def _log(self, name, cell, **kw):
        self.events.append((cell.id, name, kw))
        if self.on_event is not None:
            self.on_event(name, cell, kw)

    from harness import hookimpl

    @hookimpl
    def on_cell_start(self, cell, info):
        self._log("on_cell_start", cell, info=info)

    @hookimpl
    def on_epoch_start(self, cell, epoch):
        self._log("on_epoch_start", cell, epoch=epoch)

    @hookimpl
    def on_batch_end(self, cell, phase, batch, num_batches):
        self._log("on_batch_end", cell, phase=phase, batch=batch)

    @hookimpl
    def on_epoch_end(self, cell, epoch, metrics):
        self._log("on_epoch_end", cell, epoch=epoch, metrics=metrics)

    @hookimpl
    def on_cell_end(self, cell, result):
        self._log("on_cell_end", cell, result=result)


def _runner(monkeypatch):
    """``harness run`` in this process, with the slow trainer plugin and, per call, an
    :class:`EventLog` and further observers; ``run.executors`` keeps the ray executors made."""
    import harness.registry as registry_module
    from ray_plugins import RayTestPlugins

    real_pm, real_observers = registry_module.get_plugin_manager, registry_module.register_observers
    monkeypatch.setattr(registry_module, "get_plugin_manager",
                        lambda **kw: real_pm(extra_plugins=[(RayTestPlugins(), "test_slow")], **kw))
    executors = []

    def run(matrix: Path, results: Path, *args: str, log: EventLog | None = None, observers: list = ()) -> int:
        from harness import cli
        from harness import ray_executor

        def register(pm):
            real_observers(pm)
            if log is not None:
                pm.register(log, "test_event_log")
            for i, observer in enumerate(observers):
                pm.register(observer, "test_down" if i == 0 else f"test_observer_{i}")

        monkeypatch.setattr(registry_module, "register_observers", register)
        real_init = ray_executor.RayExecutor.__init__

        def keep(self, *a, **kw):
            real_init(self, *a, **kw)
            self.retry_delays = (0.05,)
            executors.append(self)

        monkeypatch.setattr(ray_executor.RayExecutor, "__init__", keep)
        try:
            return cli.main(["run", "--matrix", str(matrix), "--results", str(results), *args])
        finally:
            monkeypatch.setattr(ray_executor.RayExecutor, "__init__", real_init)

    run.executors = executors
    return run


@pytest.fixture
def harness_run(monkeypatch):
    return _runner(monkeypatch)


EPOCHS = 4
"""Every cell of these tests trains this many epochs of two batches (seeds 0 to 3)."""


@pytest.fixture(scope="session")
def serial(tmp_path_factory):
    """What ``serial`` gives for the cells of these tests (seeds 0 to 3, at one thread, no
    delay: the delay changes no number): ``(summary rows, MLflow metrics)`` by cell label."""
    tmp = tmp_path_factory.mktemp("serial")
    with pytest.MonkeyPatch.context() as monkeypatch:
        run = _runner(monkeypatch)
        matrix = _matrix(tmp, "[execution]\ncpus_per_cell = 1\n[matrix]\nseed = [0, 1, 2, 3]\n", "serial",
                         epochs=EPOCHS, delay=0.0)
        assert run(matrix, tmp / "results", "--executor", "serial") == 0
    rows = {r["label"]: _row(r) for r in _summary(tmp / "results", "serial").values()}
    runs = {r.data.tags["harness.cell_label"]: _stable(r.data.metrics) for r in _runs(tmp / "results", "serial")[2]}
    return rows, runs


def _row(row: dict) -> dict:
    """A summary row's numbers: without the machine's timings, the ids (which name the matrix)
    and the label and axis (a one-cell matrix has neither)."""
    return {k: v for k, v in _stable(row).items() if k not in ("cell_id", "config_id", "matrix", "label", "seed")}


def _summary(results: Path, name: str) -> dict[str, dict]:
    with (results / name / "summary.csv").open() as fh:
        return {row["cell_id"]: row for row in csv.DictReader(fh)}


def _runs(results: Path, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    exp = client.get_experiment_by_name("snn-harness")
    if exp is None:
        return client, [], []
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`harness.matrix` = '{name}'")
    return client, [r for r in runs if r.data.tags.get("harness.kind") == "matrix"], [r for r in runs if r.data.tags.get("harness.kind") == "cell"]


FOUR = """
[execution]
cpus_per_cell = 1
[matrix]
seed = [0, 1, 2, 3]
"""


def test_four_cells_two_at_a_time_on_two_nodes_give_serials_numbers_one_run_each_events_in_order(harness_run, serial, tmp_path, capsys):
    loads = tmp_path / "loads.txt"  # the digits again, counting its loads
    matrix = _matrix(tmp_path, FOUR + f'[options.dataset.counted_digits]\nlog = "{loads}"\n', "ray4", epochs=EPOCHS, delay=0.15)
    matrix.write_text(matrix.read_text().replace('dataset = "digits"', 'dataset = "counted_digits"', 1))  # 1.2 s a cell: they overlap
    log = EventLog()
    capsys.readouterr()
    assert harness_run(matrix, tmp_path / "ray", "--executor", "ray", "--verbose", log=log) == 0  # two wait in Ray's queue
    err = capsys.readouterr().err
    assert "harness: ray: up to 2 cell(s) at a time, 1 CPU each, on 2 node(s)" in err

    ray_rows = _summary(tmp_path / "ray", "ray4")
    assert len(ray_rows) == 4 and {r["label"]: _row(r) for r in ray_rows.values()} == serial[0]  # to the last digit

    client, parents, cells = _runs(tmp_path / "ray", "ray4")
    assert len(parents) == 1 and len(cells) == 4  # exactly one run per cell, under one parent
    assert {r.data.tags["mlflow.parentRunId"] for r in cells} == {parents[0].info.run_id}
    assert all(r.info.status == "FINISHED" for r in cells)
    for run in cells:
        assert _stable(run.data.metrics) == serial[1][run.data.tags["harness.cell_label"]]
        assert "pid" in run.data.tags["harness.worker"]  # where it ran
        assert [m.step for m in client.get_metric_history(run.info.run_id, "test_top1")] == list(range(1, EPOCHS + 1))

    running, most = set(), 0
    for cid in ray_rows:  # each cell's events in order: start, (epoch start, batches, epoch end) x 2, end
        names = [(n, kw.get("epoch")) for c, n, kw in log.events if c == cid and n != "on_batch_end"]
        epochs = [(name, e) for e in range(1, EPOCHS + 1) for name in ("on_epoch_start", "on_epoch_end")]
        assert names == [("on_cell_start", None), *epochs, ("on_cell_end", None)]
        assert any(c == cid and n == "on_batch_end" for c, n, _ in log.events)
    for cid, name, _ in log.events:
        if name == "on_cell_start":
            running.add(cid)
        elif name == "on_cell_end":
            running.discard(cid)
        most = max(most, len(running))
    assert most == 2  # two cells at a time, never more
    executor = harness_run.executors[-1]
    assert all(not r.mlflow_imported for r in executor.reports.values())  # a worker never imports MLflow
    assert len(executor.reports) == 4 and len({r.node_id for r in executor.reports.values()}) == 2  # both nodes ran cells
    # the data set was loaded once on each node, by its probe; every cell took its copy from there
    assert len(loads.read_text().split()) == 2
    assert not executor.node_data  # the copies left the object store with the run

    # Ray's cost outside the cells, measured by the driver per cell, and said with --verbose
    rows = {r["cell_id"]: float(r["duration_s"]) for r in ray_rows.values()}
    assert set(executor.timings) == set(rows)
    for t in executor.timings.values():
        assert 0 <= t.to_start_s and 0 <= t.overhead_s and 0 <= t.queued_s
    # counted from when the cell could start, not its submission: two cells found a slot, two waited in the queue
    # for the end of another, which came no sooner than that cell's own run (causal, whatever the machine's load)
    queued = sorted(executor.timings.values(), key=lambda t: t.queued_s)
    assert [t.queued_s for t in queued[:2]] == [0.0, 0.0]
    assert min(t.queued_s for t in queued[2:]) > 0.5 * min(rows.values())
    over = sorted(t.overhead_s for t in executor.timings.values())
    found = re.search(r"harness: ray: time outside the cells' own run, per cell: ([0-9.]+) s \(([0-9.]+)-([0-9.]+)\), "
                      r"of which before the cell's start [0-9.]+ s \([0-9.]+-[0-9.]+\), over 4 cell\(s\); "
                      r"the preflight \(probe, data sets, workers' start\) took ([0-9.]+) s", err)
    assert found, err
    assert [float(x) for x in found.groups()[:3]] == [round((over[1] + over[2]) / 2, 2), round(over[0], 2), round(over[3], 2)]
    assert float(found.group(4)) == round(executor.preflight_s, 2) > 0


def _slow_cell(tmp_path: Path, extra: str = "") -> Path:
    """One cell (seed 0), 0.3 s a batch: a test acts on epoch 1 while the cell runs on."""
    return _matrix(tmp_path, f"[execution]\ncpus_per_cell = 1\n{extra}\n", "killed", epochs=EPOCHS, delay=0.3)


def _killer(kills: list[int]):
    """SIGKILL the worker of a cell when its first epoch arrives (once)."""
    pids: dict[str, int] = {}

    def on_event(name, cell, kw):
        if name == "on_cell_start":
            pids[cell.id] = kw["info"]["worker_pid"]
        if name == "on_epoch_end" and kw["epoch"] == 1 and not kills:
            os.kill(pids[cell.id], signal.SIGKILL)
            kills.append(pids[cell.id])

    return on_event


def test_a_sigkilled_worker_resumes_its_cell_from_the_checkpoint_in_a_new_worker(harness_run, serial, tmp_path, capsys):
    matrix = _slow_cell(tmp_path, "")
    kills: list[int] = []
    log = EventLog(_killer(kills))
    assert harness_run(matrix, tmp_path / "ray", "--executor", "ray", log=log) == 0
    assert len(kills) == 1
    assert "worker died" in capsys.readouterr().err
    starts = [kw["info"] for _, n, kw in log.events if n == "on_cell_start"]
    assert len(starts) == 2 and starts[1]["resumed_from_epoch"] == 1 and starts[1]["worker_pid"] != kills[0]
    (end,) = [kw["result"] for _, n, kw in log.events if n == "on_cell_end"]
    assert end.earlier_s == starts[1]["resumed_elapsed_s"] > 0  # the dead worker's time up to its checkpoint
    assert end.duration_s > end.earlier_s + sum(kw["metrics"]["epoch_time_s"] for _, n, kw in log.events
                                                if n == "on_epoch_end" and kw["epoch"] > 1)
    every = list(range(1, EPOCHS + 1))
    assert [kw["epoch"] for _, n, kw in log.events if n == "on_epoch_end"] == every  # no epoch twice

    (cid, row), = _summary(tmp_path / "ray", "killed").items()
    assert _row(row) == serial[0]["seed=0"]  # as if never killed
    client, _, cells = _runs(tmp_path / "ray", "killed")
    assert len(cells) == 1 and cells[0].info.status == "FINISHED"  # the same run went on
    assert _stable(cells[0].data.metrics) == serial[1]["seed=0"]
    assert [m.step for m in client.get_metric_history(cells[0].info.run_id, "test_top1")] == every
    with (tmp_path / "ray" / "killed" / "history.csv").open() as fh:
        epochs = [int(row["epoch"]) for row in csv.DictReader(fh) if row["metric"] == "test_top1"]
    assert epochs == every  # the result files hold every epoch once
    assert not (tmp_path / "ray" / "killed" / "checkpoints" / cid).exists()  # finished: removed, by the driver


def test_with_no_retries_a_killed_worker_fails_its_cell_with_worker_died(harness_run, tmp_path):
    matrix = _slow_cell(tmp_path, "max_retries = 0")
    kills: list[int] = []
    log = EventLog(_killer(kills))
    assert harness_run(matrix, tmp_path / "ray", "--executor", "ray", log=log) == 1
    (result,) = [kw["result"] for _, n, kw in log.events if n == "on_cell_end"]
    assert result.status == "failed" and result.error_type == "WorkerDied"
    assert result.error.startswith("worker died: ") and result.epochs_completed == 1
    assert result.metrics["test_top1"] == [kw["metrics"] for _, n, kw in log.events if n == "on_epoch_end"][0]["test_top1"]
    _, _, cells = _runs(tmp_path / "ray", "killed")
    assert cells[0].info.status == "FAILED" and cells[0].data.tags["harness.error_type"] == "WorkerDied"
    assert (tmp_path / "ray" / "killed" / "checkpoints" / result.cell_id / "last.pt").exists()  # kept for the next run


def _both_cells_past_epoch_1(proc, labels: tuple[str, str], epochs: int, lines: list[str]) -> None:
    """Read the driver's output until both cells run and each has finished epoch 1 (its checkpoint
    written: the worker writes it before it tells the epoch). Either may get there first."""
    started: set[str] = set()
    done: set[str] = set()
    for line in proc.stderr:
        lines.append(line)
        for label in labels:
            if f"] {label} (" in line and "started on" in line:
                started.add(label)
            if f"[{label}] epoch 1/{epochs}" in line:
                done.add(label)
        if started == done == set(labels):
            return
    raise AssertionError("the driver ended before both cells ran:\n" + "".join(lines))


def _listening(root: int) -> list[str]:
    """The addresses the TCP sockets of process ``root`` and its descendants (or its session's
    processes) listen on, read from /proc: ``["127.0.0.1:6379", ...]``."""
    import ipaddress

    parent, session = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parent[int(entry)], session[int(entry)] = int(fields[1]), int(fields[3])
    tree = {root}
    for _ in range(len(parent)):
        grown = tree | {p for p, pp in parent.items() if pp in tree} | {p for p, sid in session.items() if sid == root}
        if grown == tree:
            break
        tree = grown
    inodes = set()
    for pid in tree:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        inodes.add(link[8:-1])
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # LISTEN
                host, port = cols[1].split(":")
                raw = bytes.fromhex(host)
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # /proc's host byte order
                address = ipaddress.ip_address(raw)
                if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                    address = address.ipv4_mapped
                found.append(f"{address}:{int(port, 16)}")
    return found


def test_ctrl_c_kills_both_running_cells_and_a_rerun_on_two_nodes_resumes_them(harness_run, serial, tmp_path):
    """A real driver process, which starts its own local Ray instance (this session's cluster,
    which Ray's own ``ray.init()`` would join, is running): it listens on loopback only; Ctrl-C (SIGINT to its process group, as a terminal sends it) while two cells run kills
    both, their checkpoints kept, exit 2. The rerun, on the two-node cluster, resumes one cell on
    each node, with the numbers of an uninterrupted run."""
    body = "[execution]\ncpus_per_cell = 1\n[matrix]\nseed = [0, 1]\n"
    matrix = _matrix(tmp_path, body, "ctrlc", epochs=EPOCHS, delay=0.5)
    driver = [sys.executable, str(REPO / "tests" / "ray_driver.py")]
    results = tmp_path / "ray"
    args = ["-m", str(matrix), "--results", str(results), "--executor", "ray"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never this session's cluster
    proc = subprocess.Popen([*driver, *args], stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=tmp_path, env=env)
    lines: list[str] = []
    watchdog = threading.Timer(120, os.killpg, (proc.pid, signal.SIGKILL))  # a driver that hangs fails the test
    watchdog.start()
    try:
        _both_cells_past_epoch_1(proc, ("seed=0", "seed=1"), EPOCHS, lines)
        listening = _listening(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)
        lines.append(proc.stderr.read())
        assert proc.wait(timeout=60) == 2, "".join(lines)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert listening and all(a.startswith("127.0.0.1:") for a in listening), listening  # Ray's servers: loopback only
    out = "".join(lines)
    assert "2 killed" in out and "(interrupted)" in out and "Traceback" not in out
    assert "raylet" not in out and "Started a local Ray instance" not in out  # Ray's own lines stay out
    assert "Ray was imported before" not in out
    _, _, cells = _runs(results, "ctrlc")
    assert sorted(r.info.status for r in cells) == ["KILLED", "KILLED"]
    assert len(list((results / "ctrlc" / "checkpoints").glob("*/last.pt"))) == 2  # both kept

    assert harness_run(matrix, results, "--executor", "ray") == 0  # this process: the two-node cluster
    client, parents, cells = _runs(results, "ctrlc")
    assert len(cells) == 2 and len(parents) == 2  # the same two cell runs went on, under the rerun's parent
    assert all(r.info.status == "FINISHED" and int(r.data.tags["harness.resumed_from_epoch"]) >= 1 for r in cells)
    nodes = {r.data.tags["harness.worker"].split(" node ")[1] for r in cells}
    assert len(nodes) == 2  # one cell on each node
    assert {r.data.tags["harness.cell_label"]: _stable(r.data.metrics) for r in cells} == {
        label: serial[1][label] for label in ("seed=0", "seed=1")}
    for run in cells:  # every epoch once, across the two driver processes
        assert [m.step for m in client.get_metric_history(run.info.run_id, "test_top1")] == list(range(1, EPOCHS + 1))


def test_a_results_directory_the_other_node_cannot_see_fails_the_preflight_with_what_to_do(harness_run, ray_instance, capsys):
    """Storage not shared: the second node runs in a mount namespace of its own, where the
    results directory (and so the checkpoint directory) is an empty tmpfs, as on another machine."""
    if ray_instance.unshared is None:
        pytest.skip("this machine cannot give a Ray node a private mount namespace (needs root or user namespaces)")
    results = ray_instance.unshared / "results"
    results.mkdir()
    matrix = _slow_cell(results.parent)
    assert harness_run(matrix, results, "--executor", "ray") == 4
    err = capsys.readouterr().err
    assert "the preflight failed on 1 of 2 node(s)" in err
    assert f"cannot read the checkpoint directory the driver wrote ({results.resolve() / 'killed' / 'checkpoints'})" in err
    assert "put the results directory on shared storage, or name a shared directory with `checkpoint_dir` in [execution]" in err
    assert not _runs(results, "killed")[2]  # nothing trained


def test_a_plugin_missing_where_the_cells_run_fails_the_preflight_naming_it(harness_run, tmp_path, monkeypatch, capsys):
    import dataclasses

    import harness.registry as registry_module

    real = registry_module.build_registry

    def without_extras(pm):  # the workers load only the entry points: the test's trainer is not there
        registry = real(pm)
        registry.plugins = dataclasses.replace(registry.plugins, extra_plugins=())
        return registry

    monkeypatch.setattr(registry_module, "build_registry", without_extras)
    matrix = _slow_cell(tmp_path)
    assert harness_run(matrix, tmp_path / "ray", "--executor", "ray") == 4
    err = capsys.readouterr().err
    assert "the preflight failed on 2 of 2 node(s)" in err
    assert "needs trainer 'slow_bptt', which no plugin provides on node" in err and "Install the plugin's package" in err
    assert not _runs(tmp_path / "ray", "killed")[2]  # nothing trained (the store itself is opened during the preflight)


def test_a_plugin_the_workers_cannot_import_fails_the_preflight_with_what_to_do(harness_run, tmp_path, monkeypatch, capsys):
    """A plugin object whose module only the driver can import (a script's directory on the
    driver's sys.path): its workers cannot unpickle the probe's arguments. A clear error, no
    Ray traceback, nothing trained."""
    import dataclasses

    import harness.registry as registry_module

    (tmp_path / "driver_only_plugin.py").write_text("class DriverOnly:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from driver_only_plugin import DriverOnly

    real = registry_module.build_registry

    def with_driver_only(pm):
        registry = real(pm)
        extra = (*registry.plugins.extra_plugins, (DriverOnly(), "driver_only"))
        registry.plugins = dataclasses.replace(registry.plugins, extra_plugins=extra)
        return registry

    monkeypatch.setattr(registry_module, "build_registry", with_driver_only)
    matrix = _slow_cell(tmp_path)
    assert harness_run(matrix, tmp_path / "ray", "--executor", "ray") == 4
    err = capsys.readouterr().err
    assert "the preflight could not start on a Ray worker" in err and "driver_only_plugin" in err, err
    assert "must be importable on every node" in err and "Traceback" not in err
    assert not _runs(tmp_path / "ray", "killed")[2]


def test_a_node_that_cannot_read_the_drivers_checkpoint_directory_is_named(tmp_path):
    from harness.ray_executor import node_probe
    from harness.registry import get_registry

    plugins = get_registry().plugins
    (host, problems, _), _ = node_probe([], plugins, str(tmp_path / "elsewhere" / ".probe-x"), "x")
    assert len(problems) == 1 and "cannot read the checkpoint directory the driver wrote" in problems[0]
    (tmp_path / ".probe-x").write_text("another run's token")
    assert "holds another run's probe file" in node_probe([], plugins, str(tmp_path / ".probe-x"), "x")[0][1][0]
    (tmp_path / ".probe-x").write_text("x")
    assert node_probe([], plugins, str(tmp_path / ".probe-x"), "x")[0][1] == []


class TrackingDown:
    """An observer whose store went away for the cell of seed 0 (it raises on that cell's epochs)."""

    from harness import hookimpl

    def __init__(self) -> None:
        self.attempts: list[int] = []

    @hookimpl
    def on_epoch_end(self, cell, epoch, metrics):
        if cell.axes["seed"] == 0:
            self.attempts.append(epoch)
            raise ConnectionError("tracking server at http://127.0.0.1:9 refused the connection")


def test_an_observer_that_stays_down_fails_its_cell_with_the_reason_and_the_other_cell_goes_on(harness_run, tmp_path):
    """A tracking server that goes away: the driver retries the write, then fails the cell that
    could not be recorded (never dropping its metrics silently); the other cell is unaffected."""
    matrix = _matrix(tmp_path, "[execution]\ncpus_per_cell = 1\n[matrix]\nseed = [0, 1]\n", "down", epochs=2, delay=0.0)
    down, log = TrackingDown(), EventLog()
    assert harness_run(matrix, tmp_path / "ray", "--executor", "ray", "--jobs", "1", log=log, observers=[down]) == 1
    order = [(n, c) for c, n, _ in log.events if n in ("on_cell_start", "on_cell_end")]
    assert [n for n, _ in order] == ["on_cell_start", "on_cell_end"] * 2  # --jobs 1: one cell at a time, though two fit
    ends = {kw["result"].label: kw["result"] for _, n, kw in log.events if n == "on_cell_end"}
    assert ends["seed=1"].status == "finished" and ends["seed=1"].epochs_completed == 2
    failed = ends["seed=0"]
    assert failed.status == "failed" and failed.error_type == "ObserverFailed"
    assert "observer 'test_down' could not record the epoch end of epoch 1 of the cell after 2 attempts" in failed.error
    assert "ConnectionError: tracking server at http://127.0.0.1:9 refused the connection" in failed.error
    assert down.attempts == [1, 1]  # tried again once (the test's retry delays), then given up
    _, _, cells = _runs(tmp_path / "ray", "down")
    assert {r.data.tags["harness.cell_label"]: r.info.status for r in cells} == {"seed=0": "FAILED", "seed=1": "FINISHED"}


def test_a_tracking_server_that_goes_away_fails_the_cells_it_cannot_record_with_the_reason(harness_run, tmp_path, monkeypatch, capsys):
    """A real ``mlflow server`` on 127.0.0.1, stopped while the cells train: the driver retries
    the writes, then fails every cell it could not record, saying why; the result files keep
    every epoch the cells finished (nothing dropped silently), and the run ends without a
    traceback."""
    server, url = start_mlflow_server(tmp_path)
    try:
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the harness's retries, not MLflow's, are under test
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")  # a loaded server's first answers take seconds; a killed one refuses at once

        def stop_server(name, cell, kw):
            if name == "on_epoch_end" and server.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()

        matrix = _matrix(tmp_path, "[execution]\ncpus_per_cell = 1\n[matrix]\nseed = [0, 1]\n", "gone", epochs=3, delay=0.2)
        log = EventLog(stop_server)
        rc = harness_run(matrix, tmp_path / "results", "--executor", "ray", "--tracking-uri", url, log=log)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err[-4000:]
    ends = [kw["result"] for _, n, kw in log.events if n == "on_cell_end"]
    assert sorted(r.status for r in ends) == ["failed", "failed"] and {r.error_type for r in ends} == {"ObserverFailed"}
    assert all("observer 'mlflow_tracking.tracker' could not record the" in r.error for r in ends)
    assert "; the cell is stopped" in err and "observer 'mlflow_tracking.tracker' failed at the end of the matrix" in err
    with (tmp_path / "results" / "gone" / "history.csv").open() as fh:  # what the cells finished is kept
        recorded = {(row["label"], row["epoch"]) for row in csv.DictReader(fh) if row["metric"] == "test_top1"}
    labels = {r.cell_id: r.label for r in ends}
    told = {(labels[c], str(kw["epoch"])) for c, n, kw in log.events if n == "on_epoch_end"}
    assert recorded == told and told  # every epoch the observers were told of is in the files
    assert {r["status"] for r in _summary(tmp_path / "results", "gone").values()} == {"failed"}


def test_a_data_set_that_cannot_travel_is_left_to_its_cells_and_each_cell_gets_its_own_copy(registry, tiny_matrix):
    """What a node's probe keeps for its cells: each data set pickled, or left out with why (it
    cannot be pickled, or is too large); a cell unpickles a copy of its own data set."""
    import dataclasses
    import threading

    import torch
    from ray import cloudpickle

    import ray
    from harness.matrix import load_matrix
    from harness.ray_executor import _node_data, pack_data
    from harness.session import PreloadedData, check_data

    cells = load_matrix(tiny_matrix("[matrix]\ntime_steps = [2, 3]\n"), registry).cells
    loaded = PreloadedData()
    check_data(load_matrix(tiny_matrix(name="one"), registry), registry, loaded)
    (key, bundle), = loaded.items()
    locked = dataclasses.replace(bundle, train=[threading.Lock()])  # an open handle, say
    loaded.put(cells[1].config, locked)
    packed = pack_data(loaded)
    assert list(packed.bundles) == [key] and cloudpickle.loads(packed.bundles[key]).files == bundle.files
    (why,) = packed.left_out.values()
    assert why.startswith("it cannot be pickled (TypeError:") and "lock" in why
    assert pack_data(loaded, limit=100).left_out[key].endswith("is larger than 0 MiB")

    ref = ray.put(packed)
    first, again = _node_data(ref, cells[0]), _node_data(ref, cells[0])
    a, b = first.take(cells[0].config), again.take(cells[0].config)
    assert a is not b and a.train is not b.train  # a copy each: a cell's bundle is its own
    assert torch.equal(a.train[0][0], bundle.train[0][0]) and len(a.test) == len(bundle.test)
    assert _node_data(ref, cells[1]) is None  # left out: this cell loads it
    assert _node_data(None, cells[0]) is None  # no probe on this node (it joined later)


class MatrixEnd:
    """An observer that notes when the matrix's end reaches it, and what Ray was doing then."""

    from harness import hookimpl

    def __init__(self, calls: list, ended: threading.Event) -> None:
        self.calls, self.ended = calls, ended

    @hookimpl
    def on_matrix_end(self, run, results):
        self.calls.append(("on_matrix_end", [r.status for r in results]))
        self.ended.set()


def test_a_local_instance_stops_in_the_background_while_the_observers_end_the_matrix(harness_run, tmp_path, monkeypatch):
    """The instance the executor started is shut down as the last cell ends, in a thread of its
    own, while the matrix's end is recorded; ``close`` waits for it. (Here the executor is made
    to own this session's cluster, whose shutdown is only noted.)"""
    import ray
    from harness import ray_executor

    calls: list = []
    ended = threading.Event()

    def shutdown(**kw):  # lasts until the observers have ended the matrix: they do not wait for it
        calls.append(("shutdown", threading.current_thread() is threading.main_thread()))
        calls.append(("shut down", ended.wait(timeout=20)))

    monkeypatch.setattr(ray, "shutdown", shutdown)
    real_start = ray_executor.RayExecutor.start

    def start(self):
        real_start(self)
        self.owns_ray = True

    monkeypatch.setattr(ray_executor.RayExecutor, "start", start)
    matrix = _matrix(tmp_path, "[execution]\ncpus_per_cell = 1\n", "stops", epochs=1, delay=0.0)
    assert harness_run(matrix, tmp_path / "ray", "--executor", "ray", observers=[MatrixEnd(calls, ended)]) == 0
    assert calls[0] == ("shutdown", False)  # begun in another thread, before the matrix's end
    assert calls[1:] == [("on_matrix_end", ["finished"]), ("shut down", True)]  # meanwhile; and waited for
    assert harness_run.executors[-1].owns_ray is False


def test_a_cell_that_raises_is_failed_with_its_traceback_as_under_serial(harness_run, tmp_path):
    matrix = _matrix(tmp_path, "[execution]\ncpus_per_cell = 1\n", "raises", epochs=1, delay=-1.0)  # sleep(-1) raises
    log = EventLog()
    assert harness_run(matrix, tmp_path / "ray", "--executor", "ray", log=log) == 1
    (result,) = [kw["result"] for _, n, kw in log.events if n == "on_cell_end"]
    assert result.status == "failed" and result.error_type == "ValueError"
    assert result.error.startswith("Traceback (most recent call last):") and "sleep length must be non-negative" in result.error
    assert "in train_batch" in result.error  # the worker's own frames: where it failed
