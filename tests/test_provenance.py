"""Where a result came from: the code (distribution versions and a hash of their sources) and the
environment are tags of each cell's run; a finished cell whose code changed since is listed, not
skipped in silence, and ``--rerun-changed`` runs it again."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY_DEFAULTS

from harness import provenance
from harness.cli import ExitCode, main
from harness.matrix import load_matrix
from harness.registry import get_registry

MATRIX = 'name = "prov"\n' + TINY_DEFAULTS + "[matrix]\nseed = [0, 1]\n"


def test_the_code_of_a_cell_names_each_distribution_with_a_hash_of_its_sources(tmp_path, write_toml):
    registry = get_registry()
    cell = load_matrix(write_toml(MATRIX), registry).cells[0]
    code = provenance.Provenance(registry).code(cell.config)
    from harness import __version__

    assert list(code) == ["snn-harness"] and code["snn-harness"].startswith(f"{__version__}+src.")
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text("x = 1\n")
    first = provenance._source_hash(package)
    assert provenance._source_hash(package) == first  # stable
    (package / "a.py").write_text("x = 2\n")
    assert provenance._source_hash(package) != first  # an edit, without a version bump, changes it
    assert provenance.changed({"d": "1+src.a", "e": "2"}, {"d": "1+src.b", "e": "2"}) == ["d 1+src.a -> 1+src.b"]


def test_the_environment_is_recorded():
    import platform

    import torch

    env = provenance.environment()
    assert env["python"] == platform.python_version() and env["torch"] == torch.__version__
    assert set(env) == {"python", "torch", "cuda", "cudnn", "device_name", "threads"} and int(env["threads"]) >= 1


@pytest.fixture
def ran(tmp_path):
    path = tmp_path / "prov.toml"
    path.write_text(MATRIX)
    results = tmp_path / "results"
    assert main(["run", "--matrix", str(path), "--results", str(results)]) == ExitCode.OK
    return path, results


def _cell_runs(results: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    exp = client.get_experiment_by_name("snn-harness")
    return [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("harness.kind") == "cell"]


def test_each_cell_run_carries_its_code_and_environment(ran):
    runs = _cell_runs(ran[1])
    assert len(runs) == 2
    for run in runs:
        tags = run.data.tags
        assert tags["harness.code.snn-harness"].count("+src.") == 1
        assert tags["harness.env.torch"] and tags["harness.env.python"] and tags["harness.env.threads"]
        assert not any(k.startswith("info.provenance") for k in run.data.params)  # tags, not params


def test_a_finished_cell_whose_code_changed_is_listed_and_rerun_changed_runs_it(ran, monkeypatch, capsys):
    path, results = ran
    capsys.readouterr()
    assert main(["run", "--matrix", str(path), "--results", str(results)]) == ExitCode.OK
    out = capsys.readouterr().err
    assert "2 cell(s) already finished" in out and "other code" not in out  # unchanged code: skipped, nothing to say

    real = provenance.Provenance.code
    monkeypatch.setattr(provenance.Provenance, "code", lambda self, cfg: {
        k: v.split("+src.")[0] + "+src.0123456789ab" for k, v in real(self, cfg).items()})  # as if a plugin was edited
    assert main(["run", "--matrix", str(path), "--results", str(results)]) == ExitCode.OK
    out = capsys.readouterr().err
    assert "harness: 2 finished cell(s) ran with other code than is installed now: skipped as finished; --rerun-changed" in out
    assert "[seed=0] snn-harness " in out and "-> 0.1.0+src.0123456789ab" in out
    assert len(_cell_runs(results)) == 2  # nothing ran

    assert main(["run", "--matrix", str(path), "--results", str(results), "--rerun-changed"]) == ExitCode.OK
    out = capsys.readouterr().err
    assert "running them again (--rerun-changed)" in out and "2 finished" in out
    runs = _cell_runs(results)
    assert len(runs) == 4 and sum(r.data.tags["harness.code.snn-harness"].endswith("0123456789ab") for r in runs) == 2


def test_a_plugin_registered_from_code_is_named_by_its_plugin_in_a_tag_name_mlflow_accepts():
    import re
    from types import SimpleNamespace

    def factory():
        """From a test module, not an installed distribution."""

    infos = {"normalizer": SimpleNamespace(package="(not installed)", plugin="test-0 (extra)", factory=factory)}
    builtin = SimpleNamespace(package="snn-harness 0.1.0", plugin="normalizers", factory=provenance.environment)
    registry = SimpleNamespace(info=lambda kind, name: infos.get(kind, builtin))
    config = SimpleNamespace(**{kind: SimpleNamespace(name="x") for kind in provenance.KINDS})
    code = provenance.Provenance(registry).code(config)
    assert set(code) == {"snn-harness", "plugin:test-0 _extra_"}
    assert all(re.fullmatch(r"[\w.\-:/ ]+", k) for k in code)  # MLflow's rule for tag names
    assert code["plugin:test-0 _extra_"].startswith("unversioned+src.")
