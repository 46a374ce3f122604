"""MLflow store helpers shared by the MLflow observer plugin and the ``report``/``ui`` commands.

The training loop never imports this module: tracking happens in an observer plugin.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness.errors import HarnessError

TAG_KIND = "harness.kind"  # "matrix" (parent run) or "cell" (child run)
TAG_MATRIX = "harness.matrix"
TAG_MATRIX_FILE = "harness.matrix_file"
TAG_CELL_ID = "harness.cell_id"
TAG_CELL_LABEL = "harness.cell_label"
TAG_CONFIG_ID = "harness.config_id"  # the configuration without its seed
TAG_STATUS = "harness.status"
TAG_ERROR_TYPE = "harness.error_type"
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # MLflow 3 opens such an experiment on its runs, not on traces
WORKFLOW = "machine_learning"  # the UI's "Model training" mode (its default is "genai")
TAG_ERROR = "harness.error"  # why a cell failed, in a line or two (the traceback is the run's traceback.txt)
TAG_AXES = "harness.axes"  # comma-separated axis names of the matrix
TAG_HOST = "harness.host"
TAG_PID = "harness.pid"
TAG_CODE_VERSION = "harness.code_version"


# MLflow's INFO lines while it sets up a store ("Creating initial MLflow database tables...",
# alembic's migrations): noise between the progress display's lines, never news to the user.
QUIET_LOGGERS = ("mlflow.store.db.utils", "mlflow.store.tracking.sqlalchemy_store", "alembic")


def client(uri: str) -> Any:
    import logging

    from mlflow.tracking import MlflowClient

    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri)


@contextlib.contextmanager
def answered(uri: str, doing: str) -> Iterator[None]:
    """Say plainly what went wrong when the tracking server at ``uri`` fails a request made while
    ``doing`` (before any cell ran): no answer (a refused connection, a timeout: a ``requests``
    connection error or timeout behind MLflow's error), or an answer that is not the MLflow API's
    (an HTTP error page, a body that is not JSON: a proxy, a login, a wrong path) each become a
    :class:`HarnessError`; an error the MLflow API itself returned is left as it is.
    """
    try:
        yield
    except Exception as exc:
        from mlflow.exceptions import MlflowException

        if not isinstance(exc, MlflowException):
            raise
        message = str(exc.message)
        if _network_failure(exc):
            raise HarnessError(
                f"the tracking server {uri} did not answer while {doing}, so no cell was run: {message} "
                "(MLflow waits MLFLOW_HTTP_REQUEST_TIMEOUT seconds per request and retries "
                "MLFLOW_HTTP_REQUEST_MAX_RETRIES times); run again once it answers"
            ) from None
        if message.startswith("API request to endpoint"):  # it answered, but not as the MLflow API does
            raise HarnessError(
                f"the tracking server {uri} answered a request made while {doing} with something other than the "
                f"MLflow API's reply, so no cell was run: {message[:500]}. Is {uri} an MLflow server's address "
                "(not a proxy's or a login page's), and does it need credentials (MLFLOW_TRACKING_TOKEN, "
                "MLFLOW_TRACKING_USERNAME / _PASSWORD)?"
            ) from None
        raise


def _network_failure(exc: BaseException) -> bool:
    """Whether a ``requests`` connection error, timeout or exhausted retry is behind ``exc``
    (MLflow wraps them; the timeout explicitly, the others as the context of its own error)."""
    import requests

    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                              requests.exceptions.RetryError)):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def ensure_experiment(mlflow_client: Any, name: str, artifact_root: Path | None) -> str:
    """The id of experiment ``name``, created (with artifacts under ``artifact_root``) if missing.

    Called once in the parent process: a fresh SQLite store must not be created concurrently.
    """
    exp = mlflow_client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise HarnessError(f"MLflow experiment {name!r} is deleted; restore it or set [tracking] experiment")
        if TAG_EXPERIMENT_KIND not in exp.tags:  # an older store: a user's own choice is kept
            mlflow_client.set_experiment_tag(exp.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
        return exp.experiment_id
    location = artifact_root.resolve().as_uri() if artifact_root is not None else None
    return mlflow_client.create_experiment(name, artifact_location=location, tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND})


def ui_links(uri: str, experiment: str, matrix_name: str | None, base: str) -> dict[str, str]:
    """Where the MLflow UI at ``base`` shows the harness's runs: ``experiment`` (its runs page),
    and for a matrix ``cells`` (its cell runs only, best test accuracy first), ``charts`` (the
    same runs in the chart view: each metric per epoch, one line per cell) and ``compare``
    (MLflow's compare-runs view of its cells: params and metrics side by side, with plots).
    Empty when the experiment does not exist."""
    import json
    from urllib.parse import quote, urlencode

    mlflow_client = client(uri)
    exp = mlflow_client.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    # MLflow 3's UI opens every experiment as a GenAI one (traces) unless the link names the
    # "Model training" workflow; it then keeps that choice for the pages that follow.
    mode = f"workflowType={WORKFLOW}"
    links = {"experiment": f"{base}/#/experiments/{exp.experiment_id}?{mode}"}
    if matrix_name is None:
        return links
    latest: dict[str, str] = {}  # cell id -> its latest run
    for run in cell_runs(mlflow_client, experiment, matrix_name):
        latest[run.data.tags.get(TAG_CELL_ID, run.info.run_id)] = run.info.run_id
    search = urlencode({"searchFilter": f"tags.`{TAG_MATRIX}` = '{matrix_name}' and tags.`{TAG_KIND}` = 'cell'",
                        "orderByKey": "metrics.`test_top1`", "orderByAsc": "false"}, quote_via=quote)
    links["cells"] = f"{base}/#/experiments/{exp.experiment_id}/runs?{search}&{mode}"
    links["charts"] = f"{links['cells']}&compareRunsMode=CHART"
    if latest:
        runs, exps = json.dumps(sorted(latest.values())), json.dumps([exp.experiment_id])
        links["compare"] = f"{base}/#/compare-runs?runs={quote(runs, safe='')}&experiments={quote(exps, safe='')}&{mode}"
    return links


def cell_runs(mlflow_client: Any, experiment: str, matrix_name: str) -> list[Any]:
    exp = mlflow_client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return mlflow_client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{TAG_MATRIX}` = '{matrix_name}' and tags.`{TAG_KIND}` = 'cell'",
        order_by=["attributes.start_time ASC"],
        max_results=50000,
    )


def finished_cell_ids(mlflow_client: Any, experiment: str, matrix_name: str) -> list[str]:
    """Cell ids of the matrix with a FINISHED run in the experiment."""
    return sorted({r.data.tags.get(TAG_CELL_ID, "") for r in cell_runs(mlflow_client, experiment, matrix_name)
                   if r.info.status == "FINISHED"} - {""})


TAG_CODE_PREFIX = "harness.code."  # + distribution: the code a cell ran with (harness.provenance)


def finished_code(mlflow_client: Any, experiment: str, matrix_name: str) -> dict[str, dict[str, str]]:
    """Cell id -> the code its latest FINISHED run recorded (``{distribution: version+src}``;
    empty for a run made before the harness recorded it)."""
    out: dict[str, dict[str, str]] = {}
    for run in cell_runs(mlflow_client, experiment, matrix_name):  # oldest first: the latest wins
        cid = run.data.tags.get(TAG_CELL_ID)
        if cid and run.info.status == "FINISHED":
            out[cid] = {k[len(TAG_CODE_PREFIX):]: v for k, v in run.data.tags.items() if k.startswith(TAG_CODE_PREFIX)}
    return out


def resumable_run(mlflow_client: Any, experiment_id: str, matrix_name: str, cell_id: str) -> Any:
    """The latest KILLED, FAILED (or dead RUNNING) run of a cell, which a resumed cell continues."""
    runs = mlflow_client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_MATRIX}` = '{matrix_name}' and tags.`{TAG_CELL_ID}` = '{cell_id}'",
        order_by=["attributes.start_time DESC"],
        max_results=10,
    )
    for run in runs:
        if run.info.status in ("KILLED", "FAILED", "RUNNING"):
            return run
        if run.info.status == "FINISHED":
            return None
    return None


def _process_alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def reconcile_dead_runs(mlflow_client: Any, experiment: str, matrix_name: str) -> list[str]:
    """Mark KILLED the runs of this matrix that are RUNNING although the process that ran them
    (same host, by its pid tag) is gone -- MLflow itself leaves a SIGKILL'd run RUNNING forever.
    Returns their run ids."""
    import os
    import socket

    exp = mlflow_client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = mlflow_client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{TAG_MATRIX}` = '{matrix_name}' and attributes.status = 'RUNNING'", max_results=50000
    )
    host, me = socket.gethostname(), os.getpid()
    dead = []
    for run in runs:
        tags = run.data.tags
        try:
            pid = int(tags.get(TAG_PID, ""))
        except ValueError:
            continue
        if tags.get(TAG_HOST) != host or pid == me or _process_alive(pid):
            continue
        mlflow_client.set_tag(run.info.run_id, TAG_STATUS, "killed")
        mlflow_client.set_tag(run.info.run_id, "harness.reconciled", "the process running it was gone")
        mlflow_client.set_terminated(run.info.run_id, status="KILLED")
        dead.append(run.info.run_id)
    return dead


def report_rows(uri: str, experiment: str, matrix_name: str) -> list[dict[str, Any]]:
    """Summary rows for a matrix from MLflow: the latest run of each cell (a finished run wins
    over a later failed one)."""
    from harness.summary import merge, row_for

    rows = []
    for run in cell_runs(client(uri), experiment, matrix_name):
        tags, data = run.data.tags, run.data
        axes_names = [a for a in tags.get(TAG_AXES, "").split(",") if a]
        axes = {a: data.params.get(_param_for_axis(a), "") for a in axes_names}
        metrics = dict(data.metrics)
        if "harness.duration_s" in tags:
            metrics["duration_s"] = tags["harness.duration_s"]
        rows.append(
            row_for(
                tags.get(TAG_CELL_ID, run.info.run_id),
                tags.get(TAG_CELL_LABEL, run.info.run_name or ""),
                tags.get(TAG_STATUS, run.info.status.lower()),
                axes,
                metrics,
                error_type=tags.get(TAG_ERROR_TYPE, ""),
                error=tags.get(TAG_ERROR, ""),
                config_id=tags.get(TAG_CONFIG_ID, ""),
                run_id=run.info.run_id,
            )
        )
    return merge([], rows)


def matrix_axes(uri: str, experiment: str, matrix_name: str) -> list[str]:
    """The axes of a matrix, from the tag its latest cell run carries."""
    runs = cell_runs(client(uri), experiment, matrix_name)
    for run in reversed(runs):
        axes = run.data.tags.get(TAG_AXES)
        if axes is not None:
            return [a for a in axes.split(",") if a]
    return []


def report_history(uri: str, rows: list[dict[str, Any]], metrics: tuple[str, ...]) -> list[dict[str, Any]]:
    """``history.csv``-style rows (cell id, label, epoch, metric, value) from the runs' metric histories."""
    c = client(uri)
    out = []
    for row in rows:
        run_id = row.get("run_id")
        if not run_id:
            continue
        for metric in metrics:
            for m in c.get_metric_history(run_id, metric):
                out.append({"cell_id": row["cell_id"], "label": row.get("label", ""), "epoch": m.step, "metric": metric, "value": m.value})
    return out


def _param_for_axis(axis: str) -> str:
    from harness.config import COMPONENT_KINDS

    if axis in COMPONENT_KINDS:
        return f"{axis}.name"
    if axis.startswith("options."):
        _, kind, _plugin, opt = axis.split(".", 3)
        return f"{kind}.{opt}"
    return axis


def launch_ui(uri: str, host: str, port: int, workers: int = 1) -> subprocess.Popen:
    """Start ``mlflow ui`` on the store at ``uri`` with ``workers`` worker processes, in its own
    process group; returns the process. Stop it with :func:`stop_process_group`."""
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port),
           "--workers", str(workers)]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=sys.stderr)  # the harness's stdout carries the links
    time.sleep(0.5)
    if proc.poll() is not None:
        raise HarnessError(f"mlflow ui exited at once with code {proc.returncode}: {' '.join(cmd)}")
    return proc


def stop_process_group(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate ``proc`` and every process it started (its process group), then reap it."""
    import os
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            continue
