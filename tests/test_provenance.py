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


def test_each_cell_run_carries_the_checksum_of_its_data_sets_files(ran):
    from importlib.resources import files

    source = Path(str(files("sklearn.datasets.data") / "digits.csv.gz"))
    expected = provenance.data_checksum([source])
    assert expected["checksum"].startswith("sha256:") and expected["files"] == "1"
    for run in _cell_runs(ran[1]):
        tags = run.data.tags
        assert tags["harness.data.checksum"] == expected["checksum"]
        assert tags["harness.data.bytes"] == str(source.stat().st_size) and tags["harness.data.files"] == "1"


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _tree(root: Path) -> list[Path]:
    (root / "sub").mkdir(parents=True)
    (root / "train.bin").write_bytes(b"\x00\x01" * 100)
    (root / "sub" / "test.bin").write_bytes(b"test images")
    return [root / "train.bin", root / "sub" / "test.bin"]


def test_the_data_checksum_is_sha256_over_names_and_contents_wherever_the_files_lie(tmp_path):
    files = _tree(tmp_path / "a")
    hashes = provenance.FileHashes(tmp_path / "cache.json")
    got = provenance.data_checksum(files, hashes)
    names = sorted([("sub/test.bin", b"test images"), ("train.bin", b"\x00\x01" * 100)])
    expected = _sha("".join(f"{n}\0{_sha(c)}\n" for n, c in names).encode())[:16]
    assert got == {"checksum": f"sha256:{expected}", "files": "2", "bytes": str(200 + 11)}

    import shutil

    shutil.copytree(tmp_path / "a", tmp_path / "elsewhere" / "b")  # a copy in another place
    copy = [tmp_path / "elsewhere" / "b" / "train.bin", tmp_path / "elsewhere" / "b" / "sub" / "test.bin"]
    assert provenance.data_checksum(copy, hashes) == got
    copy[1].write_bytes(b"test imageS")  # one byte
    assert provenance.data_checksum(copy, hashes)["checksum"] != got["checksum"]
    copy[1].rename(copy[1].with_name("other.bin"))  # a name
    assert provenance.data_checksum([copy[0], copy[1].with_name("other.bin")], hashes)["checksum"] != got["checksum"]
    # a directory is taken whole: every file below it, named from the directory's parent
    whole = provenance.data_checksum([tmp_path / "a"], hashes)
    assert whole["files"] == "2" and whole["checksum"] == "sha256:" + _sha(
        "".join(f"a/{n}\0{_sha(c)}\n" for n, c in names).encode())[:16]
    assert provenance.data_checksum([], hashes) == {}


def test_a_files_hash_is_computed_once_and_reused_while_its_size_and_time_stay(tmp_path):
    import json
    import os

    files = _tree(tmp_path / "a")
    cache = tmp_path / "cache" / "data-checksums.json"
    first = provenance.data_checksum(files, provenance.FileHashes(cache))
    recorded = json.loads(cache.read_text())
    assert recorded[str(files[1].resolve())][2] == _sha(b"test images")

    stat = files[1].stat()
    files[1].write_bytes(b"TEST IMAGES")  # the same size, and the same time put back: the cached hash is used
    os.utime(files[1], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert provenance.data_checksum(files, provenance.FileHashes(cache)) == first
    os.utime(files[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: hashed again
    assert provenance.data_checksum(files, provenance.FileHashes(cache))["checksum"] != first["checksum"]

    cache.write_text("{not json")  # a broken cache is recomputed and written anew, never an error
    assert provenance.data_checksum(files, provenance.FileHashes(cache))["checksum"] != first["checksum"]
    assert str(files[1].resolve()) in json.loads(cache.read_text())


def test_the_cache_lives_where_the_environment_says(tmp_path, monkeypatch):
    monkeypatch.setenv(provenance.ENV_CACHE_DIR, str(tmp_path / "c"))
    assert provenance.FileHashes().path == tmp_path / "c" / "data-checksums.json"
    monkeypatch.delenv(provenance.ENV_CACHE_DIR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert provenance.cache_dir() == tmp_path / "xdg" / "snn-harness"
    files = _tree(tmp_path / "a")
    provenance.data_checksum(files)
    assert (tmp_path / "xdg" / "snn-harness" / "data-checksums.json").is_file()


def test_above_the_size_limit_only_names_and_sizes_are_hashed_and_the_value_says_so(tmp_path):
    files = _tree(tmp_path / "a")
    hashes = provenance.FileHashes(tmp_path / "cache.json")
    small = provenance.data_checksum(files, hashes, max_bytes=100)
    expected = _sha("".join(f"{n}\0{size}\n" for n, size in [("sub/test.bin", 11), ("train.bin", 200)]).encode())[:16]
    assert small == {"checksum": f"names+sizes:{expected}", "files": "2", "bytes": "211"}
    assert not (tmp_path / "cache.json").exists()  # nothing read, nothing cached
    files[0].write_bytes(b"\x00" * 201)
    assert provenance.data_checksum(files, hashes, max_bytes=100)["checksum"] != small["checksum"]


def test_a_data_file_that_cannot_be_read_is_recorded_as_such_not_an_error(tmp_path):
    files = _tree(tmp_path / "a")
    files[1].unlink()
    got = provenance.data_checksum(files, provenance.FileHashes(tmp_path / "cache.json"))
    assert got == {"checksum": f"unavailable: No such file or directory: {files[1].resolve()}"}


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
