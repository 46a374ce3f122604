"""Summary files, the tracking-URI rules, and a real ``mlflow server`` as the store."""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, start_mlflow_server, wait_http

from harness.summary import merge, write_summary
from harness.session import resolve_tracking_uri
from harness.tracking import stop_process_group


def test_summary_merge_never_lets_a_failure_replace_a_finished_row(tmp_path):
    first = [
        {"cell_id": "a", "label": "seed=0", "status": "finished", "test_top1": 0.9},
        {"cell_id": "b", "label": "seed=1", "status": "failed", "error_type": "ValueError"},
    ]
    write_summary(tmp_path, first)
    write_summary(tmp_path, [
        {"cell_id": "a", "label": "seed=0", "status": "failed", "error_type": "OOM"},
        {"cell_id": "b", "label": "seed=1", "status": "finished", "test_top1": 0.8},
        {"cell_id": "c", "label": "seed=2", "status": "finished", "test_top1": 0.7},
    ])
    rows = {r["cell_id"]: r for r in csv.DictReader((tmp_path / "summary.csv").open())}
    assert rows["a"]["status"] == "finished" and rows["a"]["test_top1"] == "0.9"
    assert rows["b"]["status"] == "finished" and rows["c"]["status"] == "finished"
    md = (tmp_path / "summary.md").read_text()
    assert "| a | finished | 90.00% |" in md
    assert merge([], [{"cell_id": "x", "status": "killed"}]) == [{"cell_id": "x", "status": "killed"}]


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(tmp_path) == f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_tracking_uri(tmp_path) == "http://127.0.0.1:1"
    assert resolve_tracking_uri(tmp_path, cli="http://h:2") == "http://h:2"
    from harness.matrix import Matrix, TrackingConfig

    matrix = Matrix("m", "m.toml", "", {}, [], [], 0, 0, TrackingConfig(uri="http://from-toml:3"))
    assert resolve_tracking_uri(tmp_path, matrix=matrix) == "http://from-toml:3"  # the TOML beats the environment
    assert resolve_tracking_uri(tmp_path, cli="http://h:2", matrix=matrix) == "http://h:2"  # the flag beats both
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(tmp_path, cli="sqlite:///rel/m.db") == f"sqlite:///{tmp_path.resolve()}/rel/m.db"


@pytest.fixture(scope="module")
def mlflow_server_process(tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1 with its own SQLite store and artifact root: the
    process (a test may pause it) and its URL."""
    proc, url = start_mlflow_server(tmp_path_factory.mktemp("server"))
    try:
        yield proc, url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGCONT)
        stop_process_group(proc)


@pytest.fixture(scope="module")
def mlflow_server(mlflow_server_process):
    """The URL of a real ``mlflow server`` on 127.0.0.1."""
    return mlflow_server_process[1]


def test_tracking_uri_in_the_toml_points_a_run_at_a_real_server(mlflow_server, tmp_path, tiny_matrix):
    from mlflow.tracking import MlflowClient

    from harness.cli import main

    path = tiny_matrix(f"""
        [tracking]
        uri = "{mlflow_server}"
        experiment = "served-experiment"
    """, name="served")
    assert main(["run", "--matrix", str(path), "--results", str(tmp_path / "results")]) == 0
    assert not (tmp_path / "results" / "mlflow.db").exists()  # nothing went to the local default
    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("served-experiment")
    runs = client.search_runs([exp.experiment_id])
    kinds = sorted(r.data.tags["harness.kind"] for r in runs)
    assert kinds == ["cell", "matrix"]
    cell = next(r for r in runs if r.data.tags["harness.kind"] == "cell")
    assert cell.info.status == "FINISHED" and "test_top1" in cell.data.metrics
    # The result files and plots were uploaded through the server as artifacts of the parent run.
    parent = next(r for r in runs if r.data.tags["harness.kind"] == "matrix")
    assert [a.path for a in client.list_artifacts(parent.info.run_id)] == ["history.csv", "plots", "summary.csv", "summary.md"]
    plots = [a.path for a in client.list_artifacts(parent.info.run_id, "plots")]
    assert plots == ["plots/firing_rate_per_step.png", "plots/test_accuracy.png"]


@pytest.mark.parametrize("rerun", [False, True], ids=["looking-up-finished-cells", "opening-the-matrix-run"])
def test_a_tracking_server_that_stops_answering_before_the_first_cell_is_said_plainly(
        mlflow_server_process, tmp_path, tiny_matrix, monkeypatch, capsys, rerun):
    """The server answers ``/health``, then hangs (SIGSTOP): the next request times out, and the
    run ends with a sentence that names the server and what the harness was doing (the look-up
    of finished cells; with ``--rerun``, which skips it, the opening of the matrix's run), not
    with a traceback; no cell ran."""
    import harness.session as session
    from harness.cli import ExitCode, main

    proc, url = mlflow_server_process
    real = session.check_tracking

    def answer_then_hang(uri, *args, **kwargs):
        real(uri, timeout=60)  # the previous case's stale request may still hold the server up
        os.killpg(proc.pid, signal.SIGSTOP)

    monkeypatch.setattr(session, "check_tracking", answer_then_hang)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    path = tiny_matrix(name="hung")
    try:
        rc = main(["run", "--matrix", str(path), "--results", str(tmp_path / "r"), "--tracking-uri", url,
                   *(["--rerun"] if rerun else [])])
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGCONT)
    err = capsys.readouterr().err
    assert rc == ExitCode.USAGE_ERROR and "Traceback" not in err, err[-3000:]
    doing = "opening the matrix's run" if rerun else "looking up the cells that already finished"
    assert f"harness: error: the tracking server {url} did not answer while {doing}, so no cell was run: API request to" in err
    assert "timeout" in err and "MLFLOW_HTTP_REQUEST_TIMEOUT" in err
    assert not (tmp_path / "r" / "hung" / "history.csv").exists() or "test_top1" not in (tmp_path / "r" / "hung" / "history.csv").read_text()


def test_a_tracking_address_that_answers_but_not_as_mlflow_is_said_plainly(tmp_path, tiny_matrix, capsys):
    """A login page in front of the server (``/health`` passes, the API answers 401 with HTML):
    the run ends with a sentence saying the answer was not the MLflow API's and what to check,
    not with a traceback, nor with "did not answer"."""
    import http.server
    import threading

    from harness.cli import ExitCode, main

    class LoginWall(http.server.BaseHTTPRequestHandler):
        def _reply(self):
            ok = self.path == "/health"
            self.send_response(200 if ok else 401)
            self.end_headers()
            self.wfile.write(b"OK" if ok else b"<html>please log in</html>")

        do_GET = do_POST = _reply

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), LoginWall)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        rc = main(["run", "--matrix", str(tiny_matrix(name="walled")), "--results", str(tmp_path / "r"), "--tracking-uri", url])
    finally:
        server.shutdown()
    err = capsys.readouterr().err
    assert rc == ExitCode.USAGE_ERROR and "Traceback" not in err, err[-3000:]
    assert (f"harness: error: the tracking server {url} answered a request made while looking up the cells that already "
            "finished with something other than the MLflow API's reply, so no cell was run:") in err
    assert "failed with error code 401 != 200" in err and "MLFLOW_TRACKING_TOKEN" in err and "did not answer" not in err


def test_ui_command_serves_the_store(tmp_path):
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").create_experiment("snn-harness")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness", "ui", "--results", str(tmp_path), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        line = proc.stdout.readline()  # printed once the UI answers
        assert f"MLflow UI on http://127.0.0.1:{port}" in line and "mlflow.db" in line
        assert proc.stdout.readline().strip().startswith(f"runs of experiment 'snn-harness': http://127.0.0.1:{port}/#/experiments/")
        wait_http(f"http://127.0.0.1:{port}/health", proc)
        ui_pid = _child_pids(proc.pid)
        assert ui_pid, "harness ui started no mlflow process"
        cmdline = Path(f"/proc/{ui_pid[0]}/cmdline").read_text().split("\0")
        assert cmdline[cmdline.index("--workers") + 1] == "1"  # one worker by default: half MLflow's start-up
    finally:
        proc.terminate()  # SIGTERM to `harness ui`: it must take the MLflow UI and its workers down
        proc.wait(30)
    time.sleep(1)
    assert not [p for p in ui_pid if _alive(p)], "mlflow ui processes outlived `harness ui`"


def test_ui_where_nothing_was_recorded_creates_no_store(tmp_path, capsys):
    from harness.cli import ExitCode, main

    assert main(["ui", "--results", str(tmp_path / "nothing"), "--no-browser"]) == ExitCode.NO_CELLS
    assert "nothing recorded: there is no tracking store at" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()
    assert main(["ui", "--compare"]) == ExitCode.USAGE_ERROR
    assert "--compare needs --matrix" in capsys.readouterr().err
    assert main(["ui", "--workers", "0"]) == ExitCode.USAGE_ERROR
    assert "--workers: expected a whole number of at least 1, got '0'" in capsys.readouterr().err


def _child_pids(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(state) and not state.startswith("Z")


def test_what_a_resume_could_not_restore_is_a_tag_of_the_cell_run_not_a_param(tmp_path):
    from harness.config import CellConfig, Component
    from harness.matrix import Cell, Matrix
    from harness.session import MatrixRun
    from snn_harness_plugins.mlflow_tracking import MlflowTracker

    cfg = CellConfig(dataset=Component("digits"), model=Component("vgg_small"), normalizer=Component("vanilla_bn"),
                     trainer=Component("bptt"), epochs=1, batch_size=8, time_steps=2)
    cell = Cell(id="abc123", index=0, config=cfg, axes={"seed": 0})
    matrix = Matrix(name="m", path="m.toml", description="", axes={"seed": [0]}, cells=[cell], skipped=[], excluded=0, filtered_out=0)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker()
    tracker.on_matrix_start(MatrixRun(matrix=matrix, results_dir=tmp_path, tracking_uri=uri, experiment="e"))
    tracker.on_cell_start(cell, {"device": "cuda:0", "num_parameters": 10, "warnings": ["restored those of cuda:0..cuda:1", "second"]})
    run = tracker.client.get_run(tracker.runs["abc123"])
    assert run.data.tags["harness.warnings"] == "restored those of cuda:0..cuda:1\nsecond"
    assert "info.warnings" not in run.data.params and run.data.params["info.num_parameters"] == "10"
