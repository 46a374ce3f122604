"""MLflow tracking, as an observer on the lifecycle hooks.

One parent run per ``harness run`` (tag ``harness.kind = matrix``) and one child run per cell
(``mlflow.parentRunId``): params are every resolved config value under its dotted name, metrics
are logged per epoch in one batch, tags carry the matrix, the cell id and the status.
"""

from __future__ import annotations

import time
from typing import Any

import os
import socket

from harness import hookimpl, tracking
from harness.config import config_id, flatten
from harness.version import code_version

MAX_PARAMS_PER_BATCH = 100  # MLflow's log_batch limit
STATUS_MLFLOW = {"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}


def _param_value(value: Any) -> str:
    return str(value)[:6000]


def _process_tags() -> dict[str, str]:
    """Who is running a run: a RUNNING run whose process is gone was left by a dead process."""
    return {tracking.TAG_HOST: socket.gethostname(), tracking.TAG_PID: str(os.getpid()), tracking.TAG_CODE_VERSION: code_version()}


def _warning_tags(info: dict[str, Any]) -> dict[str, str]:
    """What the cell's start had to warn about (e.g. random states a checkpoint could not give back)."""
    warnings = info.get("warnings") or []
    return {"harness.warnings": "\n".join(map(str, warnings))[:5000]} if warnings else {}


def _provenance_tags(info: dict[str, Any]) -> dict[str, str]:
    """The code (``harness.code.<distribution>``), environment (``harness.env.<key>``) and data
    files (``harness.data.checksum``, ``.files``, ``.bytes``) the cell runs with (tags: a resumed
    run takes those of the code that finishes it)."""
    prov = info.get("provenance") or {}
    return {**{f"{tracking.TAG_CODE_PREFIX}{k}": v for k, v in prov.get("code", {}).items()},
            **{f"harness.env.{k}": v for k, v in prov.get("env", {}).items()},
            **{f"harness.data.{k}": v for k, v in prov.get("data", {}).items()}}


def _worker_tags(info: dict[str, Any]) -> dict[str, str]:
    """Where a cell run by a worker process runs (``harness.worker``: host, pid and Ray node)."""
    if "worker_host" not in info:
        return {}
    return {"harness.worker": f"{info['worker_host']} pid {info.get('worker_pid')} node {info.get('worker_node', '')}".strip()}


class MlflowTracker:
    """Logs a matrix to MLflow. One instance per invocation (created in ``register_observers``)."""

    def __init__(self) -> None:
        self.client: Any = None
        self.experiment_id: str | None = None
        self.parent_id: str | None = None
        self.runs: dict[str, str] = {}  # cell id -> child run id
        self.run: Any = None

    @hookimpl
    def on_matrix_start(self, run: Any) -> None:
        with tracking.answered(run.tracking_uri, "opening the matrix's run"):
            self._open(run)

    def _open(self, run: Any) -> None:
        """The experiment, the dead runs reconciled, and the matrix's parent run with its params."""
        from mlflow.entities import Param

        self.run = run
        self.client = tracking.client(run.tracking_uri)
        artifact_root = run.results_dir / "mlartifacts" if run.tracking_uri.startswith("sqlite:") else None
        self.experiment_id = tracking.ensure_experiment(self.client, run.experiment, artifact_root)
        self.reconciled = tracking.reconcile_dead_runs(self.client, run.experiment, run.matrix.name)
        m = run.matrix
        parent = self.client.create_run(
            self.experiment_id,
            run_name=m.name,
            tags={
                tracking.TAG_KIND: "matrix",
                tracking.TAG_MATRIX: m.name,
                tracking.TAG_MATRIX_FILE: m.path,
                tracking.TAG_AXES: ",".join(m.axes),
                "harness.argv": " ".join(run.argv)[:5000],
                **_process_tags(),
            },
        )
        self.parent_id = parent.info.run_id
        params = [Param("matrix.cells", str(len(m.cells))), Param("matrix.skipped", str(len(m.skipped)))]
        params += [Param(f"axis.{k}", _param_value(v)) for k, v in m.axes.items()]
        self.client.log_batch(self.parent_id, params=params)
        if m.skipped:
            text = "\n".join(f"[{c.label}] {c.skip_reason}" for c in m.skipped)
            self.client.log_text(self.parent_id, text + "\n", "skipped_cells.txt")

    @hookimpl
    def on_cell_start(self, cell: Any, info: dict[str, Any]) -> None:
        from mlflow.entities import Param, RunTag

        if cell.id in self.runs:  # the cell runs again in this matrix (its worker died): the same run goes on
            run_id = self.runs[cell.id]
            self.client.update_run(run_id, status="RUNNING")
            tags = {tracking.TAG_STATUS: "running", **_worker_tags(info), **_warning_tags(info), **_provenance_tags(info)}
            if info.get("resumed_from_epoch"):
                tags["harness.resumed_from_epoch"] = str(info["resumed_from_epoch"])
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])  # one write, not one per tag
            return
        if info.get("resumed_from_epoch"):
            previous = tracking.resumable_run(self.client, self.experiment_id, self.run.matrix.name, cell.id)
            if previous is not None:  # continue the killed run: one MLflow run per cell
                run_id = previous.info.run_id
                self.client.update_run(run_id, status="RUNNING")
                tags = {**_process_tags(), tracking.TAG_STATUS: "running", "mlflow.parentRunId": self.parent_id,
                        "harness.resumed_from_epoch": str(info["resumed_from_epoch"]), **_warning_tags(info),
                        **_worker_tags(info), **_provenance_tags(info)}
                self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
                self.runs[cell.id] = run_id
                return
        m = self.run.matrix
        child = self.client.create_run(
            self.experiment_id,
            run_name=cell.label,
            tags={
                "mlflow.parentRunId": self.parent_id,
                tracking.TAG_KIND: "cell",
                tracking.TAG_MATRIX: m.name,
                tracking.TAG_MATRIX_FILE: m.path,
                tracking.TAG_CELL_ID: cell.id,
                tracking.TAG_CONFIG_ID: config_id(cell.config),
                tracking.TAG_CELL_LABEL: cell.label,
                tracking.TAG_AXES: ",".join(m.axes),
                tracking.TAG_STATUS: "running",
                "harness.device": str(info.get("device", "")),
                **_process_tags(),
                **({"harness.checkpoint_discarded": str(info["checkpoint_discarded"])[:5000]} if "checkpoint_discarded" in info else {}),
                **_warning_tags(info),
                **_worker_tags(info),
                **_provenance_tags(info),
            },
        )
        run_id = child.info.run_id
        self.runs[cell.id] = run_id
        params = [Param(k, _param_value(v)) for k, v in flatten(cell.config).items()]
        params += [Param(f"info.{k}", _param_value(v)) for k, v in info.items()
                   if k not in ("device", "checkpoint_discarded", "resumed_from_epoch", "resumed_elapsed_s", "warnings", "provenance")
                   and not k.startswith("worker_")]
        for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=params[i : i + MAX_PARAMS_PER_BATCH])

    @hookimpl
    def on_epoch_end(self, cell: Any, epoch: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        run_id = self.runs.get(cell.id)
        if run_id is None:
            return
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, epoch) for k, v in metrics.items()]
        batch.append(Metric("epochs_completed", float(epoch), now, epoch))
        self.client.log_batch(run_id, metrics=batch)

    @hookimpl
    def on_cell_end(self, cell: Any, result: Any) -> None:
        run_id = self.runs.get(cell.id)
        if run_id is None:  # failed before the run existed (e.g. while loading data)
            self.on_cell_start(cell, {})
            run_id = self.runs[cell.id]
        self.client.set_tag(run_id, tracking.TAG_STATUS, result.status)
        self.client.set_tag(run_id, "harness.duration_s", f"{result.duration_s:.1f}")
        if result.error_type:
            self.client.set_tag(run_id, tracking.TAG_ERROR_TYPE, result.error_type)
        if result.error_message:
            self.client.set_tag(run_id, tracking.TAG_ERROR, result.error_message)
        if result.error:
            self.client.log_text(run_id, result.error, "traceback.txt")
        if result.artifacts:
            import tempfile
            from pathlib import Path

            with tempfile.TemporaryDirectory() as tmp:
                for name, content in result.artifacts.items():
                    (Path(tmp) / name).write_bytes(content)
                self.client.log_artifacts(run_id, tmp)
        self.client.set_terminated(run_id, status=STATUS_MLFLOW.get(result.status, "FAILED"))

    @hookimpl
    def on_matrix_end(self, run: Any, results: list[Any]) -> None:
        if self.parent_id is None:
            return
        for name in ("summary.csv", "summary.md", "history.csv"):
            if (run.output_dir / name).exists():
                self.client.log_artifact(self.parent_id, str(run.output_dir / name))
        plots = run.output_dir / "plots"
        if plots.is_dir() and any(plots.glob("*.png")):
            self.client.log_artifacts(self.parent_id, str(plots), "plots")
        if run.interrupted:
            status = "KILLED"
        elif any(r.status != "finished" for r in results):
            status = "FAILED"
        else:
            status = "FINISHED"
        self.client.set_tag(self.parent_id, tracking.TAG_STATUS, status.lower())
        self.client.set_terminated(self.parent_id, status=status)

    @hookimpl
    def recorded_code(self, matrix: Any, tracking_uri: str, experiment: str) -> dict[str, dict[str, str]]:
        with tracking.answered(tracking_uri, "reading the code the finished cells ran with"):
            return tracking.finished_code(tracking.client(tracking_uri), experiment, matrix.name)

    @hookimpl
    def finished_cells(self, matrix: Any, tracking_uri: str, experiment: str) -> list[str]:
        with tracking.answered(tracking_uri, "looking up the cells that already finished"):
            client = tracking.client(tracking_uri)
            tracking.reconcile_dead_runs(client, experiment, matrix.name)  # also when nothing is left to run
            return tracking.finished_cell_ids(client, experiment, matrix.name)


@hookimpl
def register_observers(observers: Any) -> None:
    observers.add(MlflowTracker(), "tracker")
