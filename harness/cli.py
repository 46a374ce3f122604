"""The ``harness`` command: run, list, report, ui.

Exit codes follow pytest's convention: 0 every cell finished, 1 some cell failed,
2 interrupted, 3 internal error, 4 usage or configuration error, 5 the filters matched no cell.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import enum
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from harness.errors import ConfigError, HarnessError, IncompatibleCellError, PluginError


class ExitCode(enum.IntEnum):
    OK = 0
    CELLS_FAILED = 1
    INTERRUPTED = 2
    INTERNAL_ERROR = 3
    USAGE_ERROR = 4
    NO_CELLS = 5


class _ArgumentParser(argparse.ArgumentParser):
    """Usage errors exit with 4 (argparse's own 2 means "interrupted" here)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{message}\n{self.format_usage().strip()}")


class _Version(argparse.Action):
    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(version_text())
        parser.exit()


def version_text() -> str:
    """``harness --version``: the harness (and its code version), then every plugin distribution
    with its version and the plugins it provides (and any that cannot be imported)."""
    from harness import __version__
    from harness.registry import get_plugin_manager
    from harness.version import code_version

    pm = get_plugin_manager(keep_going=True)
    by_dist: dict[str, list[str]] = {}
    for plugin, dist in pm.packages.items():
        by_dist.setdefault(dist, []).append(plugin)
    lines = [f"snn-harness {__version__}" + (f" (code {code_version()})" if code_version() != __version__ else ""), "plugins:"]
    lines += [f"  {dist}: {', '.join(sorted(names))}" for dist, names in sorted(by_dist.items())]
    lines += [f"  {name}: cannot be imported: {why}" for name, why in sorted(pm.broken.items())]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = _ArgumentParser(prog="harness", description="Benchmark harness for spiking neural networks.")
    p.add_argument("--version", action=_Version, help="print the harness's version and the installed plugins' and exit")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)

    def common(sp: argparse.ArgumentParser, matrix_required: bool = True) -> None:
        sp.add_argument("--matrix", "-m", required=matrix_required, help="the matrix TOML file")
        sp.add_argument("--results", default="results", help="results directory (default: %(default)s)")
        sp.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: [tracking] uri, "
                        "$MLFLOW_TRACKING_URI, or sqlite:///<results>/mlflow.db)")

    run = sub.add_parser("run", help="run every cell of a matrix")
    common(run)
    run.add_argument("--dry-run", action="store_true", help="print the cells (and skipped ones, with reasons) and exit")
    run.add_argument("--only", action="append", default=[], metavar="KEY=VALUE",
                     help="run only cells whose KEY equals VALUE (repeatable; a repeated key matches any of its values; "
                     "VALUE is read as TOML and checked against the key's type)")
    run.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE",
                     help="set KEY to VALUE over the file's [defaults] / [options...] (repeatable; keys as in the matrix: "
                     "epochs=1, optimizer.lr=0.05, options.model.vgg_small.channels=[8,16]; VALUE read as TOML)")
    run.add_argument("--executor", default=None, choices=("serial", "ray"),
                     help="how cells run: one after another here (serial), or as Ray tasks, in parallel (ray); "
                     "default: [execution] executor, else serial")
    run.add_argument("--jobs", "-j", type=int, default=None, metavar="N",
                     help="ray: at most N cells at a time (default: [execution] max_concurrent, else as many as fit)")
    run.add_argument("--address", default=None,
                     help="ray: join this cluster ('auto' on a node of it, or the head's host:6379) instead of starting a local instance")
    run.add_argument("--verbose", "-v", action="store_true", help="show Ray's own log lines")
    run.add_argument("--rerun", action="store_true",
                     help="run cells again that already finished in the tracking store (default: skip them)")
    run.add_argument("--rerun-changed", action="store_true",
                     help="run finished cells again whose recorded code differs from the installed code")

    lst = sub.add_parser("list", help="list the installed plugins by kind")
    lst.add_argument("--kind", default=None, help="only this kind (normalizer, threshold, membrane_norm, trainer, loss, model, dataset)")

    rep = sub.add_parser("report", help="comparison table of a matrix from MLflow (also writes summary.md/csv and plots)")
    common(rep)
    rep.add_argument("--format", default="table", choices=("table", "markdown", "csv", "json"),
                     help="how to print the comparison (default: %(default)s)")
    rep.add_argument("--out", default=None, metavar="DIR",
                     help="write summary.md/csv and the plots under DIR/<matrix> (default: the results directory)")
    rep.add_argument("--no-write", action="store_true", help="only print the comparison: write no file (e.g. on read-only results)")
    rep.add_argument("--difference", nargs=2, action="append", default=[], metavar=("A", "B"),
                     help="the paired difference A - B by seed, with its 95%% interval, verdict and gap per epoch; "
                          "A and B are axis=value[,axis=value] picking one configuration each "
                          "(with the matrix file's [[difference]] tables; repeatable)")

    ui = sub.add_parser("ui", help="start the MLflow UI on the configured store (with --matrix: links to its cells)")
    common(ui, matrix_required=False)
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--workers", type=_positive_int, default=1,
                    help="MLflow UI worker processes (default: %(default)s; one serves a researcher's browser and starts "
                         "about a third faster than MLflow's default of four)")
    ui.add_argument("--compare", action="store_true", help="open MLflow's compare-runs view of the matrix's cells (needs --matrix)")
    ui.add_argument("--no-browser", action="store_true", help="print the links, open no browser")
    return p


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = _parser().parse_args(argv)
        handler = {"run": cmd_run, "list": cmd_list, "report": cmd_report, "ui": cmd_ui}[args.command]
        return int(handler(args, argv))
    except (ConfigError, IncompatibleCellError, PluginError) as exc:
        print(f"harness: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE_ERROR
    except KeyboardInterrupt:
        print("harness: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except BrokenPipeError:  # `harness run --dry-run | head`: the reader has gone, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.OK
    except HarnessError as exc:  # deliberate errors about the set-up (a deleted experiment, no CUDA, ...)
        print(f"harness: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE_ERROR
    except Exception:  # a bug: show everything
        traceback.print_exc()
        return ExitCode.INTERNAL_ERROR


def entry() -> None:
    """The ``harness`` console command and ``python -m harness``: :func:`main`, then exit.

    A process that took part in data parallelism ends with :func:`harness.parallel.exit_process`:
    at interpreter finalization the process group's threads can abort the process (SIGABRT), which
    ``torchrun`` would report as a failed run after a successful one."""
    code = main()
    from harness import parallel

    if parallel.took_part():
        parallel.exit_process(code)
    sys.exit(code)


def _raise_interrupt(signum: int, frame: Any) -> None:
    """SIGTERM (and Ctrl-C) stop the run as a ``KeyboardInterrupt``. Python ignores an exception
    raised inside a destructor or a finalizer (the saved-tensor meter releases saves in one many
    times per step), so a signal that lands there is delivered again a moment later."""
    f = frame
    while f is not None:
        if f.f_code.co_name == "__del__" or f.f_code.co_filename.endswith("weakref.py"):
            threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
            return
        f = f.f_back
    raise KeyboardInterrupt


def cmd_run(args: argparse.Namespace, argv: list[str]) -> int:
    from harness.matrix import load_matrix
    from harness.registry import build_registry, get_plugin_manager
    from harness.session import DEFAULT_EXPERIMENT, resolve_tracking_uri

    if args.jobs is not None and args.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {args.jobs}")
    pm = get_plugin_manager()
    registry = build_registry(pm)
    matrix = load_matrix(args.matrix, registry, only=args.only, sets=args.sets)
    if not matrix.cells and not matrix.skipped:
        why = "--only matched no cell" if args.only else "every cell is excluded by [[exclude]]"
        print(f"harness: {args.matrix}: {why} ({matrix.filtered_out} filtered out, {matrix.excluded} excluded)", file=sys.stderr)
        return ExitCode.NO_CELLS
    if args.dry_run:
        print(describe_matrix(matrix))
        return ExitCode.OK

    results_dir = Path(args.results)
    tracking_uri = resolve_tracking_uri(results_dir, cli=args.tracking_uri, matrix=matrix)
    experiment = matrix.tracking.experiment or DEFAULT_EXPERIMENT
    from harness import parallel

    execution = matrix.execution.override(executor=args.executor, address=args.address, max_concurrent=args.jobs)
    if execution.executor != "serial" and parallel.from_environment().enabled:
        raise ConfigError(f"--executor {execution.executor} under torchrun: a data-parallel cell runs with the serial executor")
    par = parallel.init_from_environment()  # torchrun: every process runs the same cells together
    try:
        results = _run_cells(args, argv, pm, registry, matrix, par, results_dir, tracking_uri, experiment, execution)
    except parallel.GroupBroken as exc:  # the processes cannot meet again: leave without a goodbye
        print(f"harness: error: {exc}", file=sys.stderr)
        return ExitCode.CELLS_FAILED
    except Exception:  # an agreed error (every process raises it): leave the group together
        parallel.shutdown()
        raise
    parallel.shutdown()
    if results is None:
        return ExitCode.OK
    return ExitCode.OK if all(r.status == "finished" for r in results) else ExitCode.CELLS_FAILED


def _run_cells(args: argparse.Namespace, argv: list[str], pm: Any, registry: Any, matrix: Any, par: Any,
               results_dir: Path, tracking_uri: str, experiment: str, execution: Any) -> list[Any] | None:
    """Lock the results, check what the cells need, skip finished cells and run the rest; None if
    nothing was left to run. Under data parallelism every process checks its own data files and
    process 0 the rest; they agree on the outcome before the first cell (a failure on any process
    stops all of them with its reason, none waits for another). An executor that runs cells
    elsewhere checks the data sets where the cells will run."""
    from harness import parallel
    from harness.executor import make_executor
    from harness.lock import ResultsLock
    from harness.registry import register_observers
    from harness.session import MatrixRun, PreloadedData, check_data, check_devices, check_tracking, run_matrix

    executor = make_executor(execution, verbose=args.verbose)
    checkpoint_root = Path(execution.checkpoint_dir).resolve() if execution.checkpoint_dir else None
    with contextlib.ExitStack() as stack:
        error: Exception | None = None
        finished_ids: list[str] = []
        preloaded = PreloadedData()  # the preflight's data sets, for the cells run in this process
        try:
            if par.is_main:  # one run per results directory: a second one is refused
                stack.enter_context(ResultsLock(results_dir))
                check_tracking(tracking_uri)
                register_observers(pm)  # only process 0 tracks, writes and displays

            def finished_cells() -> list[str]:
                if not par.is_main or args.rerun:
                    return []
                done = {cid for ids in pm.hook.finished_cells(matrix=matrix, tracking_uri=tracking_uri, experiment=experiment) for cid in ids}
                return [c.id for c in matrix.cells if c.id in done]

            if executor.in_process:
                check_devices(matrix)
                check_data(matrix, registry, preloaded)
                finished_ids = finished_cells()
            else:
                stack.callback(executor.close)
                probe_dir = MatrixRun(matrix=matrix, results_dir=results_dir, tracking_uri=tracking_uri, experiment=experiment,
                                      checkpoint_root=checkpoint_root).checkpoint_dir
                # the tracking store's look-up (seconds: MLflow's imports, a new store's tables) is made
                # while the executor's preflight waits for its cluster
                with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="harness-finished-cells") as pool:
                    lookup = pool.submit(finished_cells)
                    executor.preflight(matrix, registry, probe_dir)
                finished_ids = lookup.result()
            if par.is_main and finished_ids:
                finished_ids = _changed_code(pm, registry, matrix, finished_ids, tracking_uri, experiment, args.rerun_changed)
        except Exception as exc:
            if not par.enabled:
                raise
            error = exc
        finished_ids = parallel.agree(error, par, "before the first cell", finished_ids, then="no process ran any cell")[0]
        finished = [c for c in matrix.cells if c.id in set(finished_ids)]
        if finished:
            matrix = dataclasses.replace(matrix, cells=[c for c in matrix.cells if c.id not in set(finished_ids)])
            if par.is_main:
                print(f"harness: {len(finished)} cell(s) already finished in {experiment!r} at {tracking_uri}: skipped "
                      "(--rerun runs them again)", file=sys.stderr)
        if not matrix.cells:
            if par.is_main:
                print("harness: nothing to run: every cell of the matrix has finished", file=sys.stderr)
            return None
        run = MatrixRun(matrix=matrix, results_dir=results_dir, tracking_uri=tracking_uri, experiment=experiment,
                        argv=["harness", *argv], already_finished=finished, checkpoint_root=checkpoint_root)
        previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}  # both stop cleanly
        try:
            return run_matrix(run, registry, pm.hook, executor, preloaded)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _changed_code(pm: Any, registry: Any, matrix: Any, finished_ids: list[str], uri: str, experiment: str,
                  rerun_changed: bool) -> list[str]:
    """The finished cells to skip. Those whose recorded code differs from the installed code
    (:mod:`harness.provenance`) are listed, never skipped in silence; with ``rerun_changed``
    they run again."""
    from harness.provenance import Provenance, changed

    recorded = pm.hook.recorded_code(matrix=matrix, tracking_uri=uri, experiment=experiment) or {}
    provenance, cells = Provenance(registry), {c.id: c for c in matrix.cells}
    differ: dict[str, list[str]] = {}
    unknown = 0
    for cid in finished_ids:
        code = recorded.get(cid)
        if not code:
            unknown += 1
            continue
        diff = changed(code, provenance.code(cells[cid].config))
        if diff:
            differ[cid] = diff
    if differ:
        what = ("running them again (--rerun-changed)" if rerun_changed else
                "skipped as finished; --rerun-changed runs them again (--rerun: every cell)")
        print(f"harness: {len(differ)} finished cell(s) ran with other code than is installed now: {what}", file=sys.stderr)
        for cid, diff in list(differ.items())[:10]:
            print(f"  [{cells[cid].label}] {'; '.join(diff)}", file=sys.stderr)
        if len(differ) > 10:
            print(f"  ... and {len(differ) - 10} more", file=sys.stderr)
    if unknown:
        print(f"harness: {unknown} finished cell(s) have no recorded code version (recorded by an older harness): "
              "skipped as finished; --rerun runs them again", file=sys.stderr)
    return [cid for cid in finished_ids if not (rerun_changed and cid in differ)]


def describe_matrix(matrix: Any) -> str:
    from harness.config import flatten

    lines = [f"matrix {matrix.name} ({matrix.path}): {len(matrix.cells)} cell(s) to run, "
             f"{len(matrix.skipped)} skipped, {matrix.excluded} excluded, {matrix.filtered_out} filtered out"]
    for c in matrix.cells:
        flat = flatten(c.config)
        lines.append(
            f"  run   {c.id}  [{c.label}]  {flat['dataset.name']}/{flat['model.name']} "
            f"normalizer={flat['normalizer.name']} threshold={flat['threshold.name']} trainer={flat['trainer.name']} "
            f"T={c.config.time_steps} epochs={c.config.epochs} seed={c.config.seed}"
        )
    for c in matrix.skipped:
        lines.append(f"  skip  {c.id}  [{c.label}]  {c.skip_reason}")
    return "\n".join(lines)


def cmd_list(args: argparse.Namespace, argv: list[str]) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from harness.registry import KINDS, build_registry, get_plugin_manager

    pm = get_plugin_manager(keep_going=True)  # a plugin that cannot be imported is shown, not fatal
    registry = build_registry(pm)
    kinds = [args.kind] if args.kind else list(KINDS)
    console = Console(soft_wrap=False, width=200 if not sys.stdout.isatty() else None)
    for kind in kinds:
        table = Table(title={"loss": "losses", "membrane_norm": "membrane normalizations (membrane_norm)"}.get(kind, f"{kind}s"),
                      title_justify="left", show_lines=False)
        for col in ("name", "plugin", "package", "step modes", "options", "description"):
            table.add_column(col, overflow="fold")
        for name in registry.table(kind):
            info = registry.info(kind, name)
            cells = (
                name,
                info.plugin,
                info.package,
                ",".join(sorted(info.step_modes)),
                ", ".join(o.describe() for o in info.options.values()) + (", **options" if info.accepts_any_option else ""),
                info.description,
            )
            table.add_row(*map(escape, cells))  # descriptions hold equations like o[t]: not markup
        console.print(table)
    if args.kind is None:  # which plugin implements which hook; the observers a run registers
        from harness.registry import plugin_hooks, register_observers

        components = {name for name, _, _ in plugin_hooks(pm)}
        register_observers(pm)
        for title, rows in (("plugins and the hooks they implement", [r for r in plugin_hooks(pm) if r[0] in components]),
                            ("observers (registered for each run) and the hooks they implement",
                             [r for r in plugin_hooks(pm) if r[0] not in components])):
            table = Table(title=title, title_justify="left")
            for col in ("name", "package", "hooks"):
                table.add_column(col, overflow="fold")
            for name, dist, hooks in rows:
                table.add_row(escape(name), escape(dist), escape(", ".join(hooks)))
            console.print(table)
    if pm.broken:
        from harness.registry import ENV_BLOCK

        table = Table(title="plugins that could not be imported (left out)", title_justify="left")
        table.add_column("plugin")
        table.add_column("error", overflow="fold")
        for name, why in sorted(pm.broken.items()):
            table.add_row(escape(name), escape(why))
        console.print(table)
        print(f"harness: {len(pm.broken)} plugin(s) could not be imported: every other command stops on them; block them "
              f"with {ENV_BLOCK}={','.join(sorted(pm.broken))}, or uninstall their packages", file=sys.stderr)
    return ExitCode.OK


def cmd_report(args: argparse.Namespace, argv: list[str]) -> int:
    from harness import differences, report, summary, tracking
    from harness.matrix import read_toml
    from harness.session import DEFAULT_EXPERIMENT, check_tracking, resolve_tracking_uri, store_to_read

    data = read_toml(args.matrix)
    name = data.get("name", Path(args.matrix).stem)
    tracking_cfg = data.get("tracking", {}) if isinstance(data.get("tracking", {}), dict) else {}
    results_dir = Path(args.results)
    uri = resolve_tracking_uri(results_dir, cli=args.tracking_uri or tracking_cfg.get("uri"))
    experiment = tracking_cfg.get("experiment", DEFAULT_EXPERIMENT)
    if (missing := store_to_read(uri)) is not None:  # reading creates nothing: no store, nothing recorded
        print(f"harness: nothing recorded: there is no tracking store at {missing} (has matrix {name!r} run with "
              f"--results {results_dir}? --tracking-uri names another store)", file=sys.stderr)
        return ExitCode.NO_CELLS
    if uri.startswith(("http://", "https://")):
        check_tracking(uri)  # seconds, not MLflow's minutes of retries
    rows = _ask_the_store(uri, "for the matrix's runs", tracking.report_rows, uri, experiment, name)
    if not rows:
        print(f"harness: no runs of matrix {name!r} in experiment {experiment!r} at {uri}", file=sys.stderr)
        return ExitCode.NO_CELLS
    axes = _ask_the_store(uri, "for the matrix's axes", tracking.matrix_axes, uri, experiment, name)
    entries = report.compare(rows, axes)
    wanted = differences.read_differences(data.get("difference"), str(args.matrix), axes) + [
        differences.Difference(name=f"{a} - {b}", a=differences.parse_side(a), b=differences.parse_side(b))
        for a, b in args.difference]
    for diff in wanted:
        for side in (diff.a, diff.b):
            if unknown := [k for k in side if k not in axes]:
                raise ConfigError(f"difference {diff.name!r}: {unknown[0]!r} is not an axis of matrix {name!r}; "
                                  f"its axes: {', '.join(a for a in axes if a != 'seed')}")
    written: list[Path] = []
    out = (Path(args.out) if args.out else results_dir) / name
    compared = [differences.paired_difference(rows, d) for d in wanted]
    if not args.no_write:
        try:
            summary.write_summary(out, rows, merge_existing=False, title=f"Matrix {name} (from MLflow)")
            metrics = tuple(dict.fromkeys(["test_top1", *(d.metric for d in wanted)]))
            history = _ask_the_store(uri, "for the epoch history", tracking.report_history, uri, rows, metrics)
            written = [out / "summary.md", out / "summary.csv", *report.write_plots(out, rows, history, axes)]
            if wanted:
                written += differences.write_differences(out, rows, history, wanted)[1]
        except OSError as exc:
            raise HarnessError(f"cannot write the report into {out} ({exc.strerror or exc}): --out DIR writes it "
                               "elsewhere, --no-write only prints it") from None
    if args.format == "table":
        _print_comparison(entries, f"matrix {name}: {len(rows)} cell(s), {len(entries)} finished configuration(s)")
    else:
        print(report.format_comparison(entries, args.format))
    if compared:
        print("\npaired differences (a - b by seed; 95% Student-t interval; 'unresolved' when it spans 0):")
        print(differences.format_differences(compared, "csv" if args.format == "csv" else "markdown"))
    failed = [r for r in rows if r.get("status") != "finished"]
    if failed:
        print(f"{len(failed)} cell(s) not finished:", file=sys.stderr)
        for r in failed:
            why = r.get("error") or r.get("error_type") or ""
            print(f"  {r.get('status')} [{r.get('label', '')}] {r['cell_id']}" + (f": {why}" if why else ""), file=sys.stderr)
    if written:
        print("wrote " + ", ".join(map(str, written)), file=sys.stderr)
    return ExitCode.OK


def _ask_the_store(uri: str, what: str, call: Any, *args: Any, tries: int = 3, pause_s: float = 2.0) -> Any:
    """``call(*args)``, a read of the tracking store. A server that is busy or still starting
    (MLflow's request errors, a connection reset) is asked again, ``tries`` times in all; what it
    still refuses, and any error of a local store, ends as a :class:`HarnessError` that says
    which store and what failed, not a traceback."""
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException

    remote = uri.startswith(("http://", "https://"))
    for attempt in range(1, tries + 1):
        try:
            return call(*args)
        except (MlflowException, RequestException, OSError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            if not remote:
                raise HarnessError(f"the tracking store {uri} could not be read {what}: {type(exc).__name__}: {reason}") from None
            if attempt == tries:
                raise HarnessError(
                    f"the tracking server {uri} did not answer {what} after {tries} tries ({type(exc).__name__}: {reason}); "
                    "it may be overloaded or still starting: try again, or name another store with --tracking-uri") from None
            time.sleep(pause_s * attempt)
    raise AssertionError("unreachable")  # pragma: no cover


_SHORT_TITLES = {  # the terminal table's headers (the files keep the long ones)
    "test_top1": "top-1 %", "best_test_top1": "best %", "test_firing_rate": "rate", "test_firing_rate_cv": "rate CV",
    "train_saved_mib": "saved MiB", "train_cuda_peak_mib": "CUDA MiB", "train_samples_per_s": "train/s",
    "test_samples_per_s": "test/s", "synops": "SynOps", "synops_mac": "MACs", "num_parameters": "params",
}


def _print_comparison(entries: list[dict], title: str) -> None:
    """The comparison as tables that fit the terminal (``$COLUMNS`` when not one): a column per
    axis that varies between configurations (the fixed ones in the title), then the metrics; no
    value is cut or broken: metrics that do not fit go to a further table, with the axes again."""
    import shutil

    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from harness import report

    varying, fixed = report.varying_axes(entries)
    if fixed:
        title += "; the same in all: " + ", ".join(f"{a}={v}" for a, v in fixed.items())
    metrics = [c for c in report.comparison_columns(entries) if c != "configuration"]
    leads = varying or ["configuration"]
    rows = [[str(e["axes"].get(a, "")) for a in varying] if varying else [e["configuration"]] for e in entries]
    width = None if sys.stdout.isatty() else shutil.get_terminal_size((100, 24)).columns
    console = Console(width=width, soft_wrap=False)

    def table(columns: list[str], heading: str | None) -> Table:
        t = Table(title=escape(heading) if heading else None, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        for a in leads:
            t.add_column(escape(a.removeprefix("options.")), no_wrap=True)
        for c in columns:
            t.add_column(_SHORT_TITLES.get(c, report.TITLES.get(c, c)), justify="right", no_wrap=True)
        for lead, e in zip(rows, entries):
            t.add_row(*map(escape, lead), *(report._cell(c, e) for c in columns))
        return t

    ruler = Console(width=100_000)  # measures a table's natural width
    heading: str | None = title
    while metrics:
        take = len(metrics)  # as many metrics as fit beside the axes (at least one)
        while take > 1 and ruler.measure(table(metrics[:take], None)).maximum > console.width:
            take -= 1
        console.print(table(metrics[:take], heading))
        metrics, heading = metrics[take:], None


def cmd_ui(args: argparse.Namespace, argv: list[str]) -> int:
    """The MLflow UI on the store, and where in it to look: the experiment's runs, and with
    ``--matrix`` the matrix's cells (best first) and MLflow's compare-runs view of them, which is
    opened in a browser where there is one (``--no-browser``: only printed)."""
    import urllib.request

    from harness import tracking
    from harness.matrix import read_toml
    from harness.session import DEFAULT_EXPERIMENT, resolve_tracking_uri, store_to_read

    if args.compare and not args.matrix:
        raise ConfigError("--compare needs --matrix: the matrix whose cells to compare")
    uri, experiment, name = args.tracking_uri, DEFAULT_EXPERIMENT, None
    if args.matrix:
        data = read_toml(args.matrix)
        name = data.get("name", Path(args.matrix).stem)
        cfg = data.get("tracking", {}) if isinstance(data.get("tracking", {}), dict) else {}
        uri = uri or cfg.get("uri")
        experiment = cfg.get("experiment", DEFAULT_EXPERIMENT)
    uri = resolve_tracking_uri(Path(args.results), cli=uri)
    if (missing := store_to_read(uri)) is not None:  # the UI only reads: no store, nothing to show (none is made)
        print(f"harness: nothing recorded: there is no tracking store at {missing} (run a matrix first, or name the "
              "store with --results / --tracking-uri)", file=sys.stderr)
        return ExitCode.NO_CELLS
    base = f"http://{args.host}:{args.port}"
    proc = tracking.launch_ui(uri, args.host, args.port, workers=args.workers)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        deadline = time.monotonic() + 60
        while True:  # links are printed (and opened) once the UI answers
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None:
                    raise HarnessError(f"the MLflow UI stopped at once (exit code {proc.returncode}); is port {args.port} "
                                       "in use? --port chooses another") from None
                if time.monotonic() > deadline:
                    raise HarnessError(f"the MLflow UI did not answer on {base} within 60 s") from None
                time.sleep(0.3)
        links = tracking.ui_links(uri, experiment, name, base)
        print(f"MLflow UI on {base}  (store: {uri}); Ctrl-C to stop", flush=True)
        said = {"experiment": f"runs of experiment {experiment!r}", "cells": f"the cells of matrix {name!r}, best first",
                "charts": f"the cells of matrix {name!r} as charts (each metric per epoch)",
                "compare": f"the cells of matrix {name!r} side by side (params, metrics, plots)"}
        for key, url in links.items():
            print(f"  {said[key]}: {url}", flush=True)
        if name is not None and "compare" not in links:
            print(f"  (matrix {name!r} has no cell runs in experiment {experiment!r} yet)", flush=True)
        target = links.get("compare") if (args.compare or name) else None
        target = target or links.get("cells") or links.get("experiment")
        if target and not args.no_browser and _has_browser():
            import webbrowser

            webbrowser.open(target)
        return proc.wait()
    except KeyboardInterrupt:
        return ExitCode.OK
    finally:
        tracking.stop_process_group(proc)  # the UI's own workers too
        signal.signal(signal.SIGTERM, previous)


def _has_browser() -> bool:
    """A graphical browser can open: on macOS and Windows, or under X11/Wayland (never a text
    browser taking over the terminal of a server)."""
    return sys.platform in ("darwin", "win32") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


if __name__ == "__main__":
    sys.exit(main())
