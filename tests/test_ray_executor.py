"""The ``ray`` executor on a real local Ray instance (two CPUs, started once per session).

Cells run as Ray tasks, two at a time; their events stream back to the observers in this
process. What is checked: the same numbers as ``serial`` at the same thread count, one MLflow run
per cell under one parent, the events of each cell in order, a SIGKILLed worker's cell resumed
from its checkpoint (or failed with ``max_retries = 0``), Ctrl-C (a real driver process), two
nodes, and that workers never import MLflow.
"""

from __future__ import annotations

import csv
import os
import signal
import textwrap
from pathlib import Path

import pytest

from conftest import TINY_DEFAULTS

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


@pytest.fixture
def harness_run(monkeypatch):
    """``harness run`` in this process, with the slow trainer plugin and an :class:`EventLog`."""
    import harness.registry as registry_module
    from ray_plugins import SlowTrainers

    real_pm, real_observers = registry_module.get_plugin_manager, registry_module.register_observers
    monkeypatch.setattr(registry_module, "get_plugin_manager",
                        lambda **kw: real_pm(extra_plugins=[(SlowTrainers(), "test_slow")], **kw))
    executors = []

    def run(matrix: Path, results: Path, *args: str, log: EventLog | None = None) -> int:
        from harness import cli
        from harness import ray_executor

        def observers(pm):
            real_observers(pm)
            if log is not None:
                pm.register(log, "test_event_log")

        monkeypatch.setattr(registry_module, "register_observers", observers)
        real_init = ray_executor.RayExecutor.__init__

        def keep(self, *a, **kw):
            real_init(self, *a, **kw)
            self.retry_delays = (0.05,)
            executors.append(self)

        monkeypatch.setattr(ray_executor.RayExecutor, "__init__", keep)
        return cli.main(["run", "--matrix", str(matrix), "--results", str(results), *args])

    run.executors = executors
    return run


def _summary(results: Path, name: str) -> dict[str, dict]:
    with (results / name / "summary.csv").open() as fh:
        return {row["cell_id"]: row for row in csv.DictReader(fh)}


def _runs(results: Path, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    exp = client.get_experiment_by_name("snn-harness")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`harness.matrix` = '{name}'")
    return client, [r for r in runs if r.data.tags.get("harness.kind") == "matrix"], [r for r in runs if r.data.tags.get("harness.kind") == "cell"]


FOUR = """
[execution]
cpus_per_cell = 1
[matrix]
seed = [0, 1, 2, 3]
"""


def test_four_cells_two_at_a_time_give_serials_numbers_one_run_each_events_in_order(harness_run, tmp_path):
    matrix = _matrix(tmp_path, FOUR, "ray4", epochs=2, delay=0.4)  # 1.6 s a cell: they overlap
    assert harness_run(matrix, tmp_path / "serial", "--executor", "serial") == 0
    log = EventLog()
    assert harness_run(matrix, tmp_path / "ray", "--executor", "ray", "--jobs", "2", log=log) == 0

    serial, ray_rows = _summary(tmp_path / "serial", "ray4"), _summary(tmp_path / "ray", "ray4")
    assert set(serial) == set(ray_rows) and len(serial) == 4
    for cid in serial:  # the same numbers to the last digit, at the same thread count
        assert _stable(ray_rows[cid]) == _stable(serial[cid])

    client, parents, cells = _runs(tmp_path / "ray", "ray4")
    assert len(parents) == 1 and len(cells) == 4  # exactly one run per cell, under one parent
    assert {r.data.tags["mlflow.parentRunId"] for r in cells} == {parents[0].info.run_id}
    assert all(r.info.status == "FINISHED" for r in cells)
    _, _, serial_cells = _runs(tmp_path / "serial", "ray4")
    by_id = {r.data.tags["harness.cell_id"]: r for r in serial_cells}
    for run in cells:
        assert _stable(run.data.metrics) == _stable(by_id[run.data.tags["harness.cell_id"]].data.metrics)
        assert "pid" in run.data.tags["harness.worker"]  # where it ran
        assert [m.step for m in client.get_metric_history(run.info.run_id, "test_top1")] == [1, 2]

    running, most = set(), 0
    for cid in serial:  # each cell's events in order: start, (epoch start, batches, epoch end) x 2, end
        names = [(n, kw.get("epoch")) for c, n, kw in log.events if c == cid and n != "on_batch_end"]
        assert names == [("on_cell_start", None), ("on_epoch_start", 1), ("on_epoch_end", 1),
                         ("on_epoch_start", 2), ("on_epoch_end", 2), ("on_cell_end", None)]
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
    assert len(executor.reports) == 4


def _slow_cell(tmp_path: Path, extra: str = "") -> Path:
    """One cell of three epochs of two batches, 0.3 s a batch: a test acts on epoch 1 while the cell runs on."""
    return _matrix(tmp_path, f"[execution]\ncpus_per_cell = 1\n{extra}\n", "killed", epochs=3, delay=0.3)


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


def test_a_sigkilled_worker_resumes_its_cell_from_the_checkpoint_in_a_new_worker(harness_run, tmp_path, capsys):
    matrix = _slow_cell(tmp_path, "")
    assert harness_run(matrix, tmp_path / "serial", "--executor", "serial") == 0
    kills: list[int] = []
    log = EventLog(_killer(kills))
    assert harness_run(matrix, tmp_path / "ray", "--executor", "ray", log=log) == 0
    assert len(kills) == 1
    assert "worker died" in capsys.readouterr().err
    starts = [kw["info"] for _, n, kw in log.events if n == "on_cell_start"]
    assert len(starts) == 2 and starts[1]["resumed_from_epoch"] == 1 and starts[1]["worker_pid"] != kills[0]
    assert [kw["epoch"] for _, n, kw in log.events if n == "on_epoch_end"] == [1, 2, 3]  # no epoch twice

    (cid, serial), = _summary(tmp_path / "serial", "killed").items()
    assert _stable(_summary(tmp_path / "ray", "killed")[cid]) == _stable(serial)  # as if never killed
    client, _, cells = _runs(tmp_path / "ray", "killed")
    assert len(cells) == 1 and cells[0].info.status == "FINISHED"  # the same run went on
    assert [m.step for m in client.get_metric_history(cells[0].info.run_id, "test_top1")] == [1, 2, 3]
    with (tmp_path / "ray" / "killed" / "history.csv").open() as fh:
        epochs = [row["epoch"] for row in csv.DictReader(fh) if row["metric"] == "test_top1"]
    assert epochs == ["1", "2", "3"]  # the result files hold every epoch once
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
