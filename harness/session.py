"""One ``harness run``: fire the matrix hooks around an executor running the cells."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.executor import CellJob, Executor, SerialExecutor
from harness.matrix import Matrix
from harness.registry import Registry

DEFAULT_EXPERIMENT = "snn-harness"


@dataclass
class MatrixRun:
    """What observers get in ``on_matrix_start``/``on_matrix_end``."""

    matrix: Matrix
    results_dir: Path  # results/ (the matrix writes into results_dir / matrix.name)
    tracking_uri: str
    experiment: str
    argv: list[str] = field(default_factory=list)
    interrupted: bool = False
    checkpoint_root: Path | None = None  # [execution] checkpoint_dir: shared storage for multi-node runs
    already_finished: list[Any] = field(default_factory=list)  # cells skipped: finished in an earlier run

    @property
    def checkpoint_dir(self) -> Path:
        """Where cells checkpoint: ``[execution] checkpoint_dir / <matrix>``, or ``<results>/<matrix>/checkpoints``."""
        if self.checkpoint_root is not None:
            return self.checkpoint_root / self.matrix.name
        return self.output_dir / "checkpoints"

    @property
    def output_dir(self) -> Path:
        return self.results_dir / self.matrix.name


def resolve_tracking_uri(results_dir: Path, *, cli: str | None = None, matrix: Matrix | None = None) -> str:
    """``--tracking-uri`` > ``[tracking] uri`` > ``$MLFLOW_TRACKING_URI`` > ``sqlite:///<results>/mlflow.db``.

    Always explicit: MLflow 3 silently falls back to a ``./mlruns`` file store otherwise.
    """
    uri = cli or (matrix.tracking.uri if matrix else None) or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
        return uri
    return "sqlite:///" + str((results_dir / "mlflow.db").resolve())


def run_matrix(
    run: MatrixRun, registry: Registry, hook: Any, executor: Executor | None = None, preloaded: PreloadedData | None = None
) -> list[Any]:
    """Run every runnable cell of ``run.matrix``; returns one result per cell that started.
    ``preloaded``: the preflight's data sets, used by an executor that runs cells in this process.

    ``KeyboardInterrupt`` ends the matrix: ``run.interrupted`` is set, ``on_matrix_end`` still
    fires (with the results so far, the killed cells' included), and the interrupt propagates.
    """
    run.output_dir.mkdir(parents=True, exist_ok=True)
    executor = executor or SerialExecutor()
    job = CellJob(registry=registry, hook=hook, checkpoint_dir=run.checkpoint_dir,
                  preloaded=preloaded if getattr(executor, "in_process", False) else None)
    results: list[Any] = []
    hook.on_matrix_start(run=run)
    cells = executor.run(run.matrix.cells, job)
    try:
        for result in cells:
            results.append(result)
    except KeyboardInterrupt as exc:
        run.interrupted = True
        if not hasattr(exc, "results"):  # it struck here, between two cells: the executor stops its own
            try:
                cells.throw(exc)
            except KeyboardInterrupt as stopped:
                exc = stopped
        results.extend(getattr(exc, "results", ()))  # CellsInterrupted carries the killed cells
        raise exc from None
    finally:
        _matrix_end(run, hook, results)
    return results


def _matrix_end(run: MatrixRun, hook: Any, results: list[Any]) -> None:
    """``on_matrix_end`` for every observer, whichever fails (a tracking server that went away
    must not cost the summary files or the final report); a failure is said, not raised: the
    cells it concerns are already recorded as failed, and the files hold every result."""
    import sys

    from harness.events import call_each

    for plugin, exc in call_each(hook.on_matrix_end, run=run, results=results):
        print(f"harness: observer {plugin!r} failed at the end of the matrix ({type(exc).__name__}: {exc}); "
              f"every cell's results are in {run.output_dir} (summary.csv, history.csv)", file=sys.stderr)


class PreloadedData:
    """The data sets the preflight loaded, each handed to the first cell of this process that
    needs it, so that cell does not load it again; later cells load their own (a cell's bundle is
    its own while it runs). Owned by one run, not shared between processes."""

    def __init__(self) -> None:
        self._bundles: dict[str, Any] = {}

    @staticmethod
    def key(config: Any) -> str:
        ds = config.dataset
        return f"{ds.name} {sorted(ds.options.items())!r} {config.time_steps}"

    def put(self, config: Any, bundle: Any) -> None:
        self._bundles[self.key(config)] = bundle

    def take(self, config: Any) -> Any | None:
        """The bundle loaded for ``config``'s data set, once; ``None`` when there is none (left)."""
        return self._bundles.pop(self.key(config), None)

    def items(self) -> list[tuple[str, Any]]:
        """``(key, bundle)`` of every data set still held."""
        return list(self._bundles.items())

    def __len__(self) -> int:
        return len(self._bundles)


def check_data(matrix: Matrix, registry: Registry, keep: PreloadedData | None = None) -> None:
    """Load every data set the cells need once (under data parallelism every process does, since
    each node reads its own files); with ``keep``, the loaded bundles are kept there for the
    cells that run in this process.

    :raises HarnessError: a data set cannot be loaded, with the first cell that needs it.
    """
    from harness.errors import HarnessError
    from harness.runner import load_dataset

    seen: set[str] = set()
    for cell in matrix.cells:
        ds = cell.config.dataset
        key = PreloadedData.key(cell.config)
        if key in seen:
            continue
        seen.add(key)
        try:
            bundle = load_dataset(cell.config, registry)
        except Exception as exc:
            raise HarnessError(f"data set {ds.name!r} (first needed by cell [{cell.label}]) cannot be loaded: {exc}") from exc
        if keep is not None:
            keep.put(cell.config, bundle)


def check_devices(matrix: Matrix, *, cuda: bool = True) -> None:
    """Every cell's ``device`` exists in this process: the local machine (under torchrun, this
    process's own GPU). ``cuda=False`` leaves CUDA devices to the caller (a Ray worker that probes
    its node holds no GPU; the driver checks them against the cluster's).

    :raises HarnessError: the first cell whose device is not there, and why.
    """
    from harness.build import resolve_device
    from harness.errors import HarnessError

    seen: set[str] = set()
    for cell in matrix.cells:
        name = cell.config.device
        if name in seen or (not cuda and name.split(":")[0] == "cuda"):
            continue
        seen.add(name)
        try:
            resolve_device(name)
        except HarnessError as exc:
            raise HarnessError(f"cell [{cell.label}]: {exc}") from None


def check_tracking(uri: str, timeout: float = 5.0) -> None:
    """An HTTP tracking server must answer ``/health``; a SQLite store's directory must be writable."""
    import urllib.error
    import urllib.request

    from harness.errors import HarnessError

    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
                pass
        except urllib.error.HTTPError as exc:
            raise HarnessError(f"tracking server {uri} answered /health with HTTP {exc.code}: is it an MLflow server?") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise HarnessError(
                f"tracking server {uri} is not reachable ({reason}). Start it (e.g. `mlflow server --host 127.0.0.1 "
                "--port 5000`), or point the run elsewhere with --tracking-uri, [tracking] uri or MLFLOW_TRACKING_URI"
            ) from None
    elif uri.startswith("sqlite:///"):
        db = sqlite_path(uri)
        directory = db.parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HarnessError(f"cannot create the directory of the tracking store {uri}: {exc}") from None
        if not os.access(directory, os.W_OK):
            raise HarnessError(f"the directory of the tracking store {uri} is not writable")
        if db.exists():
            check_sqlite_store(db)


def store_to_read(uri: str) -> Path | None:
    """For a command that only reads the store (``report``, ``ui``): ``None`` when the store is
    usable (a SQLite store is checked; a server is asked elsewhere), else the SQLite file that
    does not exist, so nothing was recorded there (and nothing is created).

    :raises HarnessError: the SQLite file is not a usable MLflow store.
    """
    if not uri.startswith("sqlite:///"):
        return None
    db = sqlite_path(uri)
    if not db.is_file():
        return db
    check_sqlite_store(db)
    return None


def sqlite_path(uri: str) -> Path:
    """The database file of a ``sqlite:///`` tracking URI."""
    return Path(uri[len("sqlite:///"):])


def check_sqlite_store(db: Path) -> None:
    """``db`` is an intact SQLite database holding an MLflow store (or empty, for MLflow to set
    up); read only, nothing is changed.

    :raises HarnessError: which file, what is wrong with it, and what to do (it is never
        overwritten).
    """
    import sqlite3

    from harness.errors import HarnessError

    advice = (f"it is not a usable MLflow store, and the harness will not overwrite it: move it aside "
              f"(mv {db} {db}.broken) to start a new store there, or name another with --tracking-uri")
    try:
        with db.open("rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise HarnessError(f"the tracking store {db} cannot be read ({exc.strerror or exc})") from None
    if head and head != b"SQLite format 3\x00":
        raise HarnessError(f"{db} is not a SQLite database: {advice}")
    if not head:
        return
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            verdict = con.execute("PRAGMA quick_check").fetchone()[0]
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        raise HarnessError(f"{db} is a damaged SQLite database ({exc}): {advice}") from None
    if verdict != "ok":
        raise HarnessError(f"{db} is a damaged SQLite database (integrity check: {verdict}): {advice}")
    if tables and "experiments" not in tables:
        raise HarnessError(f"{db} is a SQLite database of something else (no MLflow experiments table): {advice}")
