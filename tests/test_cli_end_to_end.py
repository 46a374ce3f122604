"""``harness run`` end to end on digits: MLflow parent/child runs, params, metrics, tags,
summary files, failure isolation, exit codes, ``report``, ``list`` and ``--dry-run``."""

from __future__ import annotations

import csv
import textwrap
from pathlib import Path

import pytest

from harness.cli import ExitCode, main
from harness.testing import run_matrix

REPO = Path(__file__).resolve().parents[1]

MATRIX = """
name = "e2e"

[defaults]
dataset = "digits"
model = "vgg_small"
normalizer = "vanilla_bn"
trainer = "bptt"
epochs = 2
batch_size = 32
time_steps = 2
device = "cpu"

[defaults.optimizer]
lr = 0.1

[options.model.vgg_small]
channels = [8, 16]

[matrix]
"optimizer.lr" = [0.1, 1e30]
seed = [0, 1]

[[exclude]]
"optimizer.lr" = 1e30
seed = 1
"""


@pytest.fixture(scope="module")
def finished_matrix(tmp_path_factory):
    """Run a 3-cell matrix once: two cells finish, the one with a huge learning rate diverges."""
    ran = run_matrix(tmp_path_factory.mktemp("e2e"), textwrap.dedent(MATRIX))  # stderr: the console, as a user reads it
    return {"code": ran.rc, "path": ran.matrix, "results": ran.results, "uri": f"sqlite:///{ran.results / 'mlflow.db'}",
            "err": ran.stderr}


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_a_failing_cell_does_not_stop_the_matrix_and_sets_exit_code_1(finished_matrix):
    assert finished_matrix["code"] == ExitCode.CELLS_FAILED
    rows = list(csv.DictReader((finished_matrix["results"] / "e2e" / "summary.csv").open()))
    status = {(r["optimizer.lr"], r["seed"]): r["status"] for r in rows}
    assert status == {("0.1", "0"): "finished", ("0.1", "1"): "finished", ("1e+30", "0"): "failed"}
    failed = next(r for r in rows if r["status"] == "failed")
    assert failed["error_type"] == "DivergedError"
    finished = [r for r in rows if r["status"] == "finished"]
    assert all(float(r["test_top1"]) > 0.3 for r in finished)  # two short epochs already learn
    assert all(r["epochs_completed"] == "2" for r in finished)
    md = (finished_matrix["results"] / "e2e" / "summary.md").read_text()
    assert "| cell | status | optimizer.lr | seed | test top-1 |" in md


def test_why_a_cell_failed_is_on_the_console_in_the_files_and_in_mlflow(finished_matrix, capsys):
    err = finished_matrix["err"]
    rows = list(csv.DictReader((finished_matrix["results"] / "e2e" / "summary.csv").open()))
    failed = next(r for r in rows if r["status"] == "failed")
    reason = failed["error"]
    assert reason.startswith("DivergedError: diverged at epoch 1, ") and ("not finite" in reason or "loss is" in reason)
    label = failed["label"]
    # when the cell ends, and again in the matrix's closing lines, with the traceback's file
    assert f"] {label}: failed, {reason} (" in err
    trace = finished_matrix["results"] / "e2e" / "cells" / failed["cell_id"] / "traceback.txt"
    closing = err[err.index("matrix e2e: 1 failed, 2 finished"):]
    assert f"  failed [{label}]: {reason}\n    traceback: {trace}\n" in closing
    assert trace.read_text().startswith("Traceback (most recent call last)") and "DivergedError" in trace.read_text()
    assert f"| {reason} |" in (finished_matrix["results"] / "e2e" / "summary.md").read_text()
    run = next(r for r in _client(finished_matrix["uri"]).search_runs(
        [_client(finished_matrix["uri"]).get_experiment_by_name("snn-harness").experiment_id]) if r.data.tags.get("harness.kind") == "cell" and r.data.tags.get("harness.status") == "failed")
    assert run.data.tags["harness.error"] == reason
    # and `report`, from MLflow alone, says it too
    assert main(["report", "--matrix", str(finished_matrix["path"]), "--results", str(finished_matrix["results"])]) == ExitCode.OK
    assert f"failed [{label}] {failed['cell_id']}: {reason}" in capsys.readouterr().err


def test_mlflow_has_one_parent_and_a_child_per_cell_with_params_metrics_and_tags(finished_matrix, monkeypatch):
    import mlflow

    uri = finished_matrix["uri"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # for mlflow's fluent API; undone after the test
    runs = mlflow.search_runs(experiment_names=["snn-harness"], output_format="pandas")
    parents = runs[runs["tags.harness.kind"] == "matrix"]
    children = runs[runs["tags.harness.kind"] == "cell"]
    assert len(parents) == 1 and len(children) == 3
    parent_id = parents.iloc[0]["run_id"]
    assert set(children["tags.mlflow.parentRunId"]) == {parent_id}
    assert parents.iloc[0]["status"] == "FAILED"  # one cell failed
    assert parents.iloc[0]["tags.harness.matrix"] == "e2e"

    ok = children[children["status"] == "FINISHED"]
    assert len(ok) == 2 and (children["status"] == "FAILED").sum() == 1
    # Params: every resolved config value under its dotted name.
    row = ok.iloc[0]
    assert row["params.normalizer.name"] == "vanilla_bn"
    assert row["params.normalizer.momentum"] == "0.1"
    assert row["params.optimizer.lr"] == "0.1"
    assert row["params.time_steps"] == "2"
    assert row["params.model.channels"] == "[8, 16]"
    assert row["params.neuron.reset"] == "soft"
    # Tags: matrix, cell id (hash of the resolved config), status.
    summary = {r["cell_id"]: r for r in csv.DictReader((finished_matrix["results"] / "e2e" / "summary.csv").open())}
    assert set(children["tags.harness.cell_id"]) == set(summary)
    assert set(ok["tags.harness.status"]) == {"finished"}
    # Metrics per epoch.
    client = _client(uri)
    history = client.get_metric_history(row["run_id"], "test_top1")
    assert [m.step for m in history] == [1, 2]
    for key in ("train_loss", "train_top1", "test_loss", "epoch_time_s"):
        assert not pd_isnan(row[f"metrics.{key}"])
    assert float(summary[row["tags.harness.cell_id"]]["test_top1"]) == pytest.approx(row["metrics.test_top1"])
    # The failed cell carries its traceback and error class.
    bad = children[children["status"] == "FAILED"].iloc[0]
    assert bad["tags.harness.error_type"] == "DivergedError"
    text = Path(mlflow.artifacts.download_artifacts(run_id=bad["run_id"], artifact_path="traceback.txt")).read_text()
    assert "DivergedError: diverged at epoch 1, step " in text and "training loss is" in text


def pd_isnan(value) -> bool:
    return value != value


def test_report_rebuilds_the_table_from_mlflow(finished_matrix, capsys):
    out_dir = finished_matrix["results"] / "e2e"
    (out_dir / "summary.md").unlink()
    code = main(["report", "--matrix", str(finished_matrix["path"]), "--results", str(finished_matrix["results"])])
    assert code == ExitCode.OK
    captured = capsys.readouterr()
    assert "matrix e2e: 3 cell(s), 1 finished configuration(s)" in captured.out
    assert "optimizer.lr=0.1" in captured.out and "seeds" in captured.out
    assert "1 cell(s) not finished" in captured.err and "DivergedError" in captured.err
    md = (out_dir / "summary.md").read_text()
    assert md.count("| finished |") == 2 and md.count("| failed |") == 1
    assert "## Comparison" in md and "| optimizer.lr=0.1 | 2 |" in md  # two seeds of one configuration


def test_report_formats_agree_with_the_summary(finished_matrix, capsys):
    import json
    import statistics

    args = ["report", "--matrix", str(finished_matrix["path"]), "--results", str(finished_matrix["results"])]
    rows = list(csv.DictReader((finished_matrix["results"] / "e2e" / "summary.csv").open()))
    acc = [100 * float(r["test_top1"]) for r in rows if r["status"] == "finished"]
    rates = [float(r["test_firing_rate"]) for r in rows if r["status"] == "finished"]

    assert main([*args, "--format", "json"]) == ExitCode.OK
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["configuration"] == "optimizer.lr=0.1" and entry["seeds"] == 2
    assert entry["test_top1"] == pytest.approx(statistics.fmean(acc))
    assert entry["test_top1_std"] == pytest.approx(statistics.stdev(acc))
    assert entry["test_firing_rate"] == pytest.approx(statistics.fmean(rates))
    assert 0 < entry["test_firing_rate"] < 1 and entry["train_saved_mib"] > 0 and entry["synops"] > 0

    assert main([*args, "--format", "csv"]) == ExitCode.OK
    (parsed,) = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert float(parsed["test_top1"]) == pytest.approx(statistics.fmean(acc))
    assert list(parsed)[:4] == ["configuration", "seeds", "test_top1", "test_top1_std"]

    assert main([*args, "--format", "markdown"]) == ExitCode.OK
    md = capsys.readouterr().out
    assert md.startswith("| configuration | seeds | test top-1 (%) |")
    assert f"{statistics.fmean(acc):.2f} ± {statistics.stdev(acc):.2f}" in md

    from harness.plots import is_png

    plots = finished_matrix["results"] / "e2e" / "plots"
    assert is_png(plots / "test_accuracy.png") and is_png(plots / "firing_rate_per_step.png")
    assert not (plots / "memory_vs_time_steps.png").exists()  # no time_steps axis in this matrix


def test_rerun_with_only_keeps_earlier_rows_and_never_overwrites_runs(finished_matrix):
    results = finished_matrix["results"]
    code = main(["run", "--matrix", str(finished_matrix["path"]), "--results", str(results), "--only", "optimizer.lr=0.1", "--only", "seed=1", "--rerun"])
    assert code == ExitCode.OK
    rows = list(csv.DictReader((results / "e2e" / "summary.csv").open()))
    assert len(rows) == 3  # the failed and the other finished cell are still listed
    runs = _client(finished_matrix["uri"]).search_runs(
        [_client(finished_matrix["uri"]).get_experiment_by_name("snn-harness").experiment_id],
        filter_string="tags.`harness.kind` = 'cell'",
    )
    assert len(runs) == 4  # 3 from the first run + 1 new; nothing overwritten


def test_exit_code_5_when_only_matches_nothing(finished_matrix, capsys):
    code = main(["run", "--matrix", str(finished_matrix["path"]), "--only", "seed=42", "--results", str(finished_matrix["results"])])
    assert code == ExitCode.NO_CELLS
    assert "--only matched no cell" in capsys.readouterr().err


def test_exit_code_4_on_a_bad_matrix_names_file_and_key(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("[defaults]\ndataset = 'digits'\nbatchsize = 3\n")
    assert main(["run", "--matrix", str(path), "--results", str(tmp_path / "r")]) == ExitCode.USAGE_ERROR
    err = capsys.readouterr().err
    assert str(path) in err and "unknown key 'batchsize' in [defaults] (did you mean 'batch_size'?)" in err
    assert not (tmp_path / "r").exists()  # nothing ran, nothing written


def test_dry_run_lists_cells_and_writes_nothing(finished_matrix, tmp_path, capsys):
    code = main(["run", "--matrix", str(finished_matrix["path"]), "--dry-run", "--results", str(tmp_path / "r")])
    assert code == ExitCode.OK
    out = capsys.readouterr().out
    assert "3 cell(s) to run, 0 skipped, 1 excluded" in out
    assert out.count("  run   ") == 3
    assert not (tmp_path / "r").exists()


def test_dry_run_shows_skipped_cells_with_reasons(tmp_path, capsys, monkeypatch):
    """A whole-sequence-only normalizer next to an online trainer: skipped, with the reason."""
    import types

    import harness.registry as registry_module
    from harness import hookimpl
    from harness.training import Trainer
    from snn_harness_plugins.normalizers import VanillaBatchNorm

    class SeqOnlyBN(VanillaBatchNorm):
        """Needs the whole sequence."""

        step_modes = frozenset({"sequence"})

    class StepTrainer(Trainer):
        """Runs one step at a time."""

        step_modes = frozenset({"single"})

    plugin = types.ModuleType("test_plugin")

    @hookimpl
    def register_normalizers(registry):
        registry.add("seq_bn", SeqOnlyBN)

    @hookimpl
    def register_trainers(registry):
        registry.add("step_trainer", StepTrainer)

    plugin.register_normalizers, plugin.register_trainers = register_normalizers, register_trainers
    real = registry_module.get_plugin_manager
    monkeypatch.setattr(registry_module, "get_plugin_manager", lambda **kw: real(extra_plugins=[(plugin, "test_plugin")], **kw))
    path = tmp_path / "m.toml"
    path.write_text(
        "[defaults]\ndataset='digits'\nmodel='vgg_small'\nnormalizer='vanilla_bn'\ntrainer='bptt'\n"
        "epochs=1\nbatch_size=8\ntime_steps=2\n[matrix]\nnormalizer=['vanilla_bn','seq_bn']\ntrainer=['bptt','step_trainer']\n"
    )
    assert main(["run", "--matrix", str(path), "--dry-run"]) == ExitCode.OK
    out = capsys.readouterr().out
    assert "3 cell(s) to run, 1 skipped" in out
    assert "skip" in out and "normalizer 'seq_bn' runs only on the whole sequence, but trainer 'step_trainer' runs one step at a time" in out
    # Asking only for the impossible cell is an error with the reason.
    code = main(["run", "--matrix", str(path), "--only", "normalizer=seq_bn", "--only", "trainer=step_trainer"])
    assert code == ExitCode.USAGE_ERROR
    assert "every selected cell is impossible" in capsys.readouterr().err


def test_list_shows_plugins_by_kind_with_their_package(capsys):
    assert main(["list"]) == ExitCode.OK
    out = capsys.readouterr().out
    for name in ("vanilla_bn", "fixed", "bptt", "tet", "vgg_small", "digits", "fashion_mnist"):
        assert name in out
    assert "snn-harness 0.1.0" in out and "normalizers" in out and "losses" in out
    assert "theta[t] = theta" in out and "channels: list[int]" in out  # brackets are text, not markup


def _table_rows(out: str, title: str) -> dict[str, list[str]]:
    """The rows of the table of ``harness list`` titled ``title``: first cell -> the other cells."""
    block = out.split(title, 1)[1].split("└", 1)[0]
    rows = {}
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if len(cells) >= 3 and cells[0] and cells[0] != "name":
            rows[cells[0]] = cells[1:]
    return rows


def test_list_shows_which_plugin_implements_which_hook_and_the_observers_a_run_registers(monkeypatch, capsys):
    from harness import hookimpl
    from harness.registry import plugin_hooks

    class Mine:
        @hookimpl
        def register_normalizers(self, registry):
            pass

        @hookimpl
        def register_observers(self, observers):
            class Watcher:
                @hookimpl
                def on_epoch_end(self, cell, epoch, metrics):
                    pass

            observers.add(Watcher(), "watcher")

    import harness.registry as registry_module

    real = registry_module.get_plugin_manager
    monkeypatch.setattr(registry_module, "get_plugin_manager", lambda **kw: real(extra_plugins=[(Mine(), "mine")], **kw))
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["list"]) == ExitCode.OK
    out = capsys.readouterr().out
    plugins = _table_rows(out, "plugins and the hooks they implement")
    assert plugins["normalizers"] == ["snn-harness 0.1.0", "register_membrane_norms, register_normalizers"]
    assert plugins["mine"] == ["(registered from code)", "register_normalizers, register_observers"]
    assert "mlflow_tracking.tracker" not in plugins
    observers = _table_rows(out, "observers (registered for each run) and the hooks they implement")
    assert observers["mine.watcher"] == ["(registered from code)", "on_epoch_end"]
    assert observers["summary.writer"] == ["snn-harness 0.1.0", "on_cell_end, on_epoch_end, on_matrix_end, on_matrix_start"]
    assert "recorded_code" in observers["mlflow_tracking.tracker"][1] and set(observers) == {
        "mine.watcher", "summary.writer", "mlflow_tracking.tracker", "progress.display"}
    assert main(["list", "--kind", "normalizer"]) == ExitCode.OK
    assert "hooks they implement" not in capsys.readouterr().out  # one kind: only its table
    builtins = plugin_hooks(real())  # before a run: the component plugins only, each with its hooks
    assert {name for name, _, _ in builtins} == set(plugins) - {"mine"} and all(hooks for _, _, hooks in builtins)


def _with_test_plugin(monkeypatch, **hooks):
    """Make the CLI's plugin manager include an extra in-process plugin."""
    import types

    import harness.registry as registry_module

    plugin = types.ModuleType("test_plugin")
    for name, fn in hooks.items():
        setattr(plugin, name, fn)
    real = registry_module.get_plugin_manager
    monkeypatch.setattr(registry_module, "get_plugin_manager", lambda **kw: real(extra_plugins=[(plugin, "test_plugin")], **kw))




def test_interrupt_marks_the_cell_killed_and_exits_2(tmp_path, monkeypatch, tiny_matrix):
    from harness import hookimpl

    ended = []

    class Interrupter:
        @hookimpl
        def on_batch_end(self, cell, phase, batch, num_batches):
            if batch == 2:
                raise KeyboardInterrupt

        @hookimpl
        def on_matrix_end(self, run, results):
            ended.append((run.interrupted, [r.status for r in results]))

    @hookimpl
    def register_observers(observers):
        observers.add(Interrupter(), "interrupter")

    _with_test_plugin(monkeypatch, register_observers=register_observers)
    path = tiny_matrix("[matrix]\nseed = [0, 1]\n")
    results = tmp_path / "results"
    assert main(["run", "--matrix", str(path), "--results", str(results)]) == ExitCode.INTERRUPTED
    client = _client(f"sqlite:///{results / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("snn-harness").experiment_id])
    by_kind = {r.data.tags["harness.kind"]: r for r in runs}
    assert len(runs) == 2  # the second cell never started
    assert by_kind["cell"].info.status == "KILLED" and by_kind["cell"].data.tags["harness.status"] == "killed"
    assert by_kind["matrix"].info.status == "KILLED"
    rows = list(csv.DictReader((results / "tiny" / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["killed"]
    assert ended == [(True, ["killed"])]  # observers learn of the killed cell


def test_a_plugin_bug_outside_cells_is_an_internal_error_exit_3(tmp_path, monkeypatch, capsys, tiny_matrix):
    from harness import hookimpl

    class Broken:
        @hookimpl
        def on_matrix_start(self, run):
            raise RuntimeError("observer bug")

    @hookimpl
    def register_observers(observers):
        observers.add(Broken(), "broken")

    _with_test_plugin(monkeypatch, register_observers=register_observers)
    path = tiny_matrix("[matrix]\nseed = [0, 1]\n")
    assert main(["run", "--matrix", str(path), "--results", str(tmp_path / "r")]) == ExitCode.INTERNAL_ERROR
    assert "RuntimeError: observer bug" in capsys.readouterr().err


def test_argparse_usage_errors_exit_4(capsys):
    assert main(["run"]) == ExitCode.USAGE_ERROR
    assert "the following arguments are required: --matrix" in capsys.readouterr().err
    assert main(["frobnicate"]) == ExitCode.USAGE_ERROR


@pytest.mark.parametrize("path", ["benchmarks.toml", *sorted(str(p.relative_to(REPO)) for p in (REPO / "benchmarks").glob("*.toml"))])
def test_every_shipped_matrix_passes_validation(path, capsys):
    assert main(["run", "--matrix", str(REPO / path), "--dry-run"]) == ExitCode.OK
    assert "cell(s) to run" in capsys.readouterr().out


def test_the_readme_matrix_example_is_valid(registry):
    import re
    import tomllib

    from harness.matrix import expand

    readme = (REPO / "README.md").read_text()
    section = readme.split("## Writing a matrix", 1)[1]
    block = re.search(r"```toml\n(.*?)```", section, re.S).group(1)
    m = expand(tomllib.loads(block), registry, source="README.md")
    assert len(m.cells) == 3 * 3 * 2 * 2 - 2 * 2 * 2 and m.excluded == 8
