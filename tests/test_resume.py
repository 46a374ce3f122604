"""A matrix that survives (issue: resume, isolation, divergence, determinism, safe checkpoints):
SIGKILL and resume, skipping finished cells, the results lock, reconciling dead runs, corrupt or
unsafe checkpoints, divergence, and failing fast before anything trains."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from harness import hookimpl
from harness.cli import ExitCode, main

REPO = Path(__file__).resolve().parents[1]

MATRIX = """
name = "{name}"

[defaults]
dataset = "digits"
model = "vgg_small"
normalizer = "vanilla_bn"
trainer = "{trainer}"
epochs = {epochs}
batch_size = 16
time_steps = 2
meters = []
device = "cpu"

[defaults.optimizer]
lr = 0.05

[options.model.vgg_small]
channels = [4, 8]

[matrix]
seed = {seeds}
"""


def _matrix(tmp_path: Path, name: str = "surv", epochs: int = 4, seeds: str = "[0]", trainer: str = "bptt", extra: str = "") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(textwrap.dedent(MATRIX.format(name=name, epochs=epochs, seeds=seeds, trainer=trainer)) + textwrap.dedent(extra))
    return path


def _client(results: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")


def _cell_runs(results: Path) -> list:
    client = _client(results)
    exp = client.get_experiment_by_name("snn-harness")
    return client.search_runs([exp.experiment_id], filter_string="tags.`harness.kind` = 'cell'")


def _summary(results: Path, name: str) -> list[dict]:
    return list(csv.DictReader((results / name / "summary.csv").open()))


FINAL = ("test_top1", "test_loss", "train_loss", "train_top1", "best_test_top1")


def _final(rows: list[dict]) -> dict:
    return {r["seed"]: {k: r[k] for k in FINAL} for r in rows}


def _run(path: Path, results: Path, *extra: str) -> int:
    return main(["run", "--matrix", str(path), "--results", str(results), *extra])


@pytest.mark.slow
def test_a_sigkilled_cell_resumes_into_the_same_run_with_the_uninterrupted_result(tmp_path):
    path = _matrix(tmp_path, epochs=6)
    reference = tmp_path / "reference"
    assert _run(path, reference) == ExitCode.OK

    results = tmp_path / "results"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))}
    child = subprocess.Popen(
        [sys.executable, "-m", "harness", "run", "--matrix", str(path), "--results", str(results)],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    checkpoints = results / "surv" / "checkpoints"
    deadline = time.monotonic() + 120
    while not any(checkpoints.glob("*/last.pt")):
        assert child.poll() is None, f"the child ended before its first checkpoint: {child.stderr.read()}"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)  # no clean-up at all: a power cut, as far as the run can tell
    child.wait()
    (dead,) = _cell_runs(results)
    assert dead.info.status == "RUNNING"  # what MLflow leaves behind

    assert _run(path, results) == ExitCode.OK  # reconciles, then resumes from the checkpoint
    runs = _cell_runs(results)
    assert len(runs) == 1 and runs[0].info.run_id == dead.info.run_id  # the same MLflow run, continued
    run = runs[0]
    assert run.info.status == "FINISHED" and int(run.data.tags["harness.resumed_from_epoch"]) >= 1
    steps = {m.step for m in _client(results).get_metric_history(run.info.run_id, "test_top1")}
    assert steps == {1, 2, 3, 4, 5, 6}
    assert _final(_summary(results, "surv")) == _final(_summary(reference, "surv"))  # bit-identical on CPU
    assert not any(checkpoints.glob("*/last.pt"))  # a finished cell leaves no checkpoint
    parents = _client(results).search_runs(
        [run.info.experiment_id], filter_string="tags.`harness.kind` = 'matrix'", order_by=["attributes.start_time ASC"]
    )
    assert [p.info.status for p in parents] == ["KILLED", "FINISHED"]  # the dead parent was reconciled


class StopAfter:
    """An observer that interrupts the cell after ``epoch`` epochs, like Ctrl-C."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    @hookimpl
    def on_epoch_end(self, cell, epoch, metrics):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def _with_plugins(monkeypatch, *plugins):
    import harness.registry as registry

    real = registry.get_plugin_manager
    monkeypatch.setattr(registry, "get_plugin_manager", lambda **kw: real(extra_plugins=[(p, f"test-{i}") for i, p in enumerate(plugins)], **kw))


class _Observers:
    def __init__(self, *observers) -> None:
        self.observers = observers

    @hookimpl
    def register_observers(self, observers):
        for i, o in enumerate(self.observers):
            observers.add(o, f"o{i}")


class Ends:
    """An observer that keeps each cell's result and each epoch's time."""

    def __init__(self) -> None:
        self.results, self.epoch_times = [], {}

    @hookimpl
    def on_epoch_end(self, cell, epoch, metrics):
        self.epoch_times[(cell.id, epoch)] = metrics["epoch_time_s"]

    @hookimpl
    def on_cell_end(self, cell, result):
        self.results.append(result)


def test_an_interrupted_cell_is_killed_then_resumes_with_the_same_result(tmp_path, monkeypatch, capsys):
    path = _matrix(tmp_path, epochs=3, seeds="[0, 1]", trainer="online")
    reference = tmp_path / "reference"
    assert _run(path, reference) == ExitCode.OK

    results = tmp_path / "results"
    first, second = Ends(), Ends()
    with monkeypatch.context() as m:
        _with_plugins(m, _Observers(StopAfter(epoch=2), first))
        assert _run(path, results) == ExitCode.INTERRUPTED
    err = capsys.readouterr().err
    assert "1 killed" in err and "(interrupted)" in err
    (killed,) = _cell_runs(results)
    assert killed.info.status == "KILLED" and killed.data.tags["harness.status"] == "killed"

    with monkeypatch.context() as m:
        _with_plugins(m, _Observers(second))
        assert _run(path, results) == ExitCode.OK
    err = capsys.readouterr().err
    assert "resumed after epoch 2" in err, err  # told of epoch 2 after its checkpoint was written
    runs = _cell_runs(results)
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert _final(_summary(results, "surv")) == _final(_summary(reference, "surv"))

    # The resumed cell's time is both sittings': the first up to its epoch-2 checkpoint (which
    # holds its two epochs), then the second's (which holds epoch 3).
    (stopped,) = first.results
    resumed = next(r for r in second.results if r.cell_id == stopped.cell_id)
    before = first.epoch_times[(stopped.cell_id, 1)] + first.epoch_times[(stopped.cell_id, 2)]
    assert before < resumed.earlier_s <= stopped.duration_s
    assert resumed.duration_s >= resumed.earlier_s + second.epoch_times[(stopped.cell_id, 3)]
    row = next(r for r in _summary(results, "surv") if r["cell_id"] == stopped.cell_id)
    assert float(row["duration_s"]) == pytest.approx(resumed.duration_s, abs=0.01)  # written to 0.01 s
    fresh = next(r for r in second.results if r.cell_id != stopped.cell_id)
    assert fresh.earlier_s == 0.0 and fresh.duration_s > 0


def test_a_rerun_skips_finished_cells_and_rerun_forces_them(tmp_path, capsys):
    path = _matrix(tmp_path, epochs=1, seeds="[0, 1]")
    results = tmp_path / "results"
    assert _run(path, results) == ExitCode.OK
    assert _run(path, results) == ExitCode.OK
    assert "2 cell(s) already finished" in capsys.readouterr().err
    assert len(_cell_runs(results)) == 2  # nothing duplicated
    assert _run(path, results, "--rerun", "--only", "seed=1") == ExitCode.OK
    assert len(_cell_runs(results)) == 3
    rows = _summary(results, "surv")
    assert len(rows) == 2 and {r["status"] for r in rows} == {"finished"}


class RaisingTrainer:
    """A trainer plugin with a bug that shows in epoch 2."""

    @hookimpl
    def register_trainers(self, registry):
        from snn_harness_plugins.trainers import BPTTTrainer

        class Buggy(BPTTTrainer):
            calls = 0

            def train_batch(self, *args, **kwargs):
                Buggy.calls += 1
                if Buggy.calls > 2:
                    raise RuntimeError("plugin bug in epoch 2")
                return super().train_batch(*args, **kwargs)

        def buggy() -> Buggy:
            """Raises on its third batch."""
            Buggy.calls = 0
            return Buggy()

        registry.add("buggy", buggy, step_modes={"sequence"})


def test_a_plugin_that_raises_in_epoch_2_fails_its_cell_and_the_matrix_goes_on(tmp_path, monkeypatch, capsys):
    _with_plugins(monkeypatch, RaisingTrainer())
    path = _matrix(tmp_path, epochs=3)
    path.write_text(path.read_text().replace('trainer = "bptt"', 'trainer = "bptt"\nmax_train_batches = 2').replace(
        "seed = [0]", 'seed = [0]\ntrainer = ["buggy", "bptt"]'))
    results = tmp_path / "results"
    assert _run(path, results) == ExitCode.CELLS_FAILED
    rows = {r["trainer"]: r for r in _summary(results, "surv")}
    assert rows["buggy"]["status"] == "failed" and rows["buggy"]["error_type"] == "RuntimeError"
    assert rows["buggy"]["epochs_completed"] == "1"
    assert rows["bptt"]["status"] == "finished"
    assert "failed [seed=0 trainer=buggy]: RuntimeError" in capsys.readouterr().err
    bad = next(r for r in _cell_runs(results) if r.data.tags["harness.cell_label"].endswith("buggy"))
    assert bad.info.status == "FAILED" and bad.data.tags["harness.error_type"] == "RuntimeError"
    text = _client(results).download_artifacts(bad.info.run_id, "traceback.txt", str(tmp_path))
    assert "plugin bug in epoch 2" in Path(text).read_text()
    # A failure that is not a divergence may be transient: the checkpoint of epoch 1 is kept, and
    # the next run continues the failed cell from it, in the same MLflow run.
    assert len(list((results / "surv" / "checkpoints").glob("*/last.pt"))) == 1
    capsys.readouterr()
    assert _run(path, results) == ExitCode.CELLS_FAILED  # the bug is still there, in epoch 3 now
    assert "trainer=buggy" in (err := capsys.readouterr().err) and "resumed after epoch 1" in err
    buggy = [r for r in _cell_runs(results) if r.data.tags["harness.cell_label"].endswith("buggy")]
    assert [r.info.run_id for r in buggy] == [bad.info.run_id]
    assert {r["trainer"]: r["epochs_completed"] for r in _summary(results, "surv")}["buggy"] == "2"


def test_a_second_run_on_the_same_results_directory_is_refused(tmp_path, capsys):
    results = tmp_path / "results"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from harness.lock import ResultsLock; "
         f"lock = ResultsLock({str(results)!r}); lock.acquire(); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert _run(_matrix(tmp_path), results) == ExitCode.USAGE_ERROR
        err = capsys.readouterr().err
        assert "is in use by another harness run (pid" in err and "--results" in err
        assert not (results / "surv").exists()  # nothing was touched
    finally:
        holder.kill()
        holder.wait()
    assert _run(_matrix(tmp_path, epochs=1), results) == ExitCode.OK  # the dead holder's lock is gone


def _cell_id(path: Path) -> str:
    from harness import get_registry
    from harness.matrix import load_matrix

    return load_matrix(path, get_registry()).cells[0].id


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize("content", ["garbage", "pickle", "mismatch"])
def test_a_corrupt_or_unsafe_checkpoint_is_discarded_and_the_cell_starts_from_scratch(tmp_path, content, capsys):
    path = _matrix(tmp_path, epochs=2)
    reference = tmp_path / "reference"
    assert _run(path, reference) == ExitCode.OK
    results = tmp_path / "results"
    ckpt = results / "surv" / "checkpoints" / _cell_id(path) / "last.pt"
    ckpt.parent.mkdir(parents=True)
    if content == "garbage":
        ckpt.write_bytes(b"\x00not a checkpoint")
    elif content == "pickle":  # a pickle that would run code if loaded without weights_only
        torch.save({"format": 1, "cell_id": _cell_id(path), "epoch": 1, "payload": Evil()}, ckpt)
    else:  # readable, but written for another network (the code changed since)
        torch.save({"format": 1, "cell_id": _cell_id(path), "epoch": 1, "best": 0.5, "metrics": {},
                    "model": {"bogus": torch.zeros(1)}, "optimizer": {}, "scheduler": {}, "rng": {}}, ckpt)
    assert _run(path, results) == ExitCode.OK
    err = capsys.readouterr().err
    assert ("does not fit the cell" if content == "mismatch" else "cannot be read") in err
    assert "weights_only" not in err and "Re-running" not in err  # never the advice to load it unsafely
    (run,) = _cell_runs(results)
    assert "starting from scratch" in run.data.tags["harness.checkpoint_discarded"]
    assert _final(_summary(results, "surv")) == _final(_summary(reference, "surv"))


def test_runs_left_running_by_a_dead_process_are_marked_killed(tmp_path):
    import socket

    path = _matrix(tmp_path, epochs=1)
    results = tmp_path / "results"
    assert _run(path, results) == ExitCode.OK
    client = _client(results)
    exp = client.get_experiment_by_name("snn-harness")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = client.create_run(exp.experiment_id, tags={
        "harness.kind": "cell", "harness.matrix": "surv", "harness.cell_id": "x", "harness.status": "running",
        "harness.host": socket.gethostname(), "harness.pid": gone.stdout.strip(),
    })
    alive = client.create_run(exp.experiment_id, tags={
        "harness.kind": "cell", "harness.matrix": "surv", "harness.cell_id": "y", "harness.status": "running",
        "harness.host": socket.gethostname(), "harness.pid": str(os.getpid()),
    })
    assert _run(path, results) == ExitCode.OK  # nothing to run, but the matrix starts: reconcile happens
    assert client.get_run(stale.info.run_id).info.status == "KILLED"
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"  # its process is alive (this one)


def test_divergence_guard_reports_the_step_and_a_non_finite_parameter():
    from torch import nn

    from harness.runner import DivergedError, DivergenceGuard

    net = nn.Linear(2, 2)
    guard = DivergenceGuard(net, every=4)
    guard.start(3)
    for step, value in enumerate([1.0, 2.0, float("inf"), 1.0], 1):
        if step < 4:
            guard.step(step, torch.tensor(value))
    with pytest.raises(DivergedError, match=r"diverged at epoch 3, step 3: training loss is inf"):
        guard.step(4, torch.tensor(1.0))
    guard.start(1)
    guard.step(1, torch.tensor(0.5))
    with torch.no_grad():
        net.weight[0, 0] = float("nan")
    with pytest.raises(DivergedError, match=r"diverged at epoch 1, by step 1: parameter 'weight' is not finite"):
        guard.check()


def test_an_unreachable_tracking_server_fails_before_anything_trains(tmp_path, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    results = tmp_path / "results"
    code = _run(_matrix(tmp_path), results, "--tracking-uri", f"http://127.0.0.1:{port}")
    assert code == ExitCode.USAGE_ERROR
    err = capsys.readouterr().err
    assert f"tracking server http://127.0.0.1:{port} is not reachable" in err and "mlflow server" in err
    assert not (results / "surv").exists()


def test_a_missing_dataset_fails_before_the_first_cell_trains(tmp_path, capsys):
    path = _matrix(tmp_path, seeds="[0, 1]")
    path.write_text(path.read_text().replace("seed = [0, 1]", f'''dataset = ["digits", "fashion_mnist"]
seed = [0, 1]

[options.dataset.fashion_mnist]
root = "{tmp_path / 'empty'}"
search_dirs = []
download = false
'''))
    results = tmp_path / "results"
    assert _run(path, results) == ExitCode.USAGE_ERROR
    err = capsys.readouterr().err
    assert "data set 'fashion_mnist'" in err and "Fashion-MNIST not found" in err
    assert not (results / "surv").exists()  # not one cell trained


def test_a_stop_signal_that_lands_in_a_destructor_is_delivered_again(monkeypatch):
    """Python ignores exceptions raised in __del__; the saved-tensor meter runs one many times per step."""
    import threading

    from harness import cli

    sent = []
    monkeypatch.setattr(threading, "Timer", lambda delay, fn, args: type("T", (), {"start": lambda self: sent.append((fn, args))})())

    class Dying:
        def __del__(self):
            cli._raise_interrupt(signal.SIGTERM, sys._getframe())  # returns: no exception to lose

    Dying()  # the destructor runs here
    assert sent == [(os.kill, (os.getpid(), signal.SIGTERM))]
    with pytest.raises(KeyboardInterrupt):
        cli._raise_interrupt(signal.SIGTERM, sys._getframe())
