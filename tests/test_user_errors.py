"""Ordinary mistakes end in a clear message and the documented exit code, never a raw traceback,
and lose nothing: a matrix path that is a directory, a broken tracking store (never overwritten),
read-only results, an unreachable tracking server for ``report``, ``report`` where nothing ran
(it creates nothing), and an installed plugin whose import raises."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import TINY_DEFAULTS

from harness.cli import ExitCode, main

MATRIX = 'name = "oops"\n' + TINY_DEFAULTS


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """One finished run of the tiny matrix: a real store and results to break copies of."""
    tmp = tmp_path_factory.mktemp("ran")
    path = tmp / "oops.toml"
    path.write_text(MATRIX)
    assert main(["run", "--matrix", str(path), "--results", str(tmp / "results")]) == ExitCode.OK
    return {"path": path, "results": tmp / "results"}


@contextlib.contextmanager
def read_only(directory: Path):
    """``directory`` and what it holds cannot be written, even by root (``chattr +i``), for the
    duration; skipped with the reason where that cannot be arranged."""
    paths = [directory, *[p for p in directory.rglob("*") if p.is_dir()]]
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in paths}
        for p in paths:
            p.chmod(0o555)
        undo = lambda: [p.chmod(m) for p, m in modes.items()]  # noqa: E731
    else:
        chattr = shutil.which("chattr")
        done = []
        for p in paths:
            if chattr is None or subprocess.run([chattr, "+i", str(p)], capture_output=True).returncode != 0:
                for q in done:
                    subprocess.run([chattr, "-i", str(q)], capture_output=True)
                pytest.skip("running as root where `chattr +i` is not available: a read-only directory cannot be made")
            done.append(p)
        undo = lambda: [subprocess.run([chattr, "-i", str(p)], capture_output=True) for p in done]  # noqa: E731
    try:
        probe = directory / ".probe"
        try:
            probe.write_text("x")
        except OSError:
            pass
        else:
            probe.unlink()
            pytest.skip(f"{directory} stays writable here")
        yield directory
    finally:
        undo()


def test_a_matrix_path_that_is_a_directory_or_not_text(tmp_path, capsys):
    (tmp_path / "a.toml").write_text(MATRIX)
    assert main(["run", "--matrix", str(tmp_path), "--dry-run"]) == ExitCode.USAGE_ERROR
    err = capsys.readouterr().err
    assert f"harness: error: {tmp_path} is a directory, not a matrix file; its TOML files: a.toml" in err
    (tmp_path / "b.toml").write_bytes(b"\xff\xfe\x00binary")
    assert main(["run", "--matrix", str(tmp_path / "b.toml"), "--dry-run"]) == ExitCode.USAGE_ERROR
    assert "not a text (UTF-8) file, not a matrix" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["random", "zeroed_pages", "other_database"])
def test_a_broken_tracking_store_is_named_and_never_overwritten(ran, tmp_path, damage, capsys):
    import sqlite3

    results = tmp_path / "results"
    results.mkdir()
    db = results / "mlflow.db"
    if damage == "random":
        db.write_bytes(os.urandom(64 * 1024))
    elif damage == "zeroed_pages":
        shutil.copy(ran["results"] / "mlflow.db", db)
        with db.open("r+b") as fh:
            fh.seek(4096 * 2)
            fh.write(b"\0" * 4096 * 4)
    else:
        con = sqlite3.connect(db)
        con.execute("create table notes (x text)")
        con.commit()
        con.close()
    before = db.read_bytes()
    for command in (["run", "--matrix", str(ran["path"]), "--results", str(results)],
                    ["report", "--matrix", str(ran["path"]), "--results", str(results)]):
        assert main(command) == ExitCode.USAGE_ERROR
        err = capsys.readouterr().err
        assert f"harness: error: {db} is " in err and f"move it aside (mv {db} {db}.broken)" in err, err
        assert "Traceback" not in err
    assert db.read_bytes() == before
    assert sorted(p.name for p in results.iterdir() if p.name != ".lock") == ["mlflow.db"]  # nothing else written either


def test_read_only_results_for_run_and_report(ran, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(ran["results"], copy)
    with read_only(copy):
        assert main(["run", "--matrix", str(ran["path"]), "--results", str(copy), "--rerun"]) == ExitCode.USAGE_ERROR
        err = capsys.readouterr().err
        assert f"the results directory {copy} cannot be written" in err and "--results" in err and "Traceback" not in err
        args = ["report", "--matrix", str(ran["path"]), "--results", str(copy)]
        assert main(args) == ExitCode.USAGE_ERROR
        err = capsys.readouterr().err
        assert f"cannot write the report into {copy / 'oops'}" in err and "--out DIR" in err and "--no-write" in err
        assert main([*args, "--no-write"]) == ExitCode.OK
        out = capsys.readouterr()
        assert "matrix oops: 1 cell(s)" in out.out and "wrote" not in out.err
        assert main([*args, "--out", str(tmp_path / "elsewhere")]) == ExitCode.OK
    assert (tmp_path / "elsewhere" / "oops" / "summary.md").exists()


def test_report_with_an_unreachable_server_fails_within_seconds(ran, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    code = main(["report", "--matrix", str(ran["path"]), "--tracking-uri", f"http://127.0.0.1:{port}"])
    assert time.monotonic() - t0 < 15
    err = capsys.readouterr().err
    assert code == ExitCode.USAGE_ERROR and f"tracking server http://127.0.0.1:{port} is not reachable" in err
    assert "Traceback" not in err


def test_report_where_nothing_ran_creates_nothing(ran, tmp_path, capsys):
    typo = tmp_path / "resluts"
    assert main(["report", "--matrix", str(ran["path"]), "--results", str(typo)]) == ExitCode.NO_CELLS
    assert f"nothing recorded: there is no tracking store at {typo / 'mlflow.db'}" in capsys.readouterr().err
    assert not typo.exists()
    other = tmp_path / "never.toml"
    other.write_text(MATRIX.replace('name = "oops"', 'name = "never"'))
    before = sorted(p.relative_to(ran["results"]) for p in ran["results"].rglob("*"))
    assert main(["report", "--matrix", str(other), "--results", str(ran["results"])]) == ExitCode.NO_CELLS
    assert "no runs of matrix 'never'" in capsys.readouterr().err
    assert sorted(p.relative_to(ran["results"]) for p in ran["results"].rglob("*")) == before


def test_a_plugin_whose_import_raises_is_listed_and_named_with_the_way_out(tmp_path):
    site = tmp_path / "site"
    info = site / "broken_plugin-1.2.dist-info"
    info.mkdir(parents=True)
    info.joinpath("METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.2\n")
    info.joinpath("entry_points.txt").write_text("[snn_harness]\nbroken = broken_module\n")
    site.joinpath("broken_module.py").write_text("raise ImportError('needs libfoo 2')\n")
    matrix = tmp_path / "m.toml"
    matrix.write_text(textwrap.dedent(MATRIX))
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("SNN_HARNESS_DISABLE_PLUGIN_AUTOLOAD", None)
    harness = [sys.executable, "-m", "harness"]

    listing = subprocess.run([*harness, "list", "--kind", "normalizer"], capture_output=True, text=True, env=env, timeout=120)
    assert listing.returncode == 0, listing.stderr
    out = " ".join(listing.stdout.split())
    assert "vanilla_bn" in out and "plugins that could not be imported" in out
    assert "broken-plugin 1.2 (broken_module): ImportError: needs libfoo 2" in out
    assert "SNN_HARNESS_BLOCK_PLUGINS=broken" in listing.stderr

    run = subprocess.run([*harness, "run", "--matrix", str(matrix), "--dry-run"], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == ExitCode.USAGE_ERROR and "Traceback" not in run.stderr
    assert "error importing plugin 'broken' (broken_module) from broken-plugin 1.2: ImportError: needs libfoo 2" in run.stderr
    assert "Block it with SNN_HARNESS_BLOCK_PLUGINS=broken" in run.stderr and "pip uninstall broken-plugin" in run.stderr

    blocked = subprocess.run([*harness, "run", "--matrix", str(matrix), "--dry-run"], capture_output=True, text=True,
                             env={**env, "SNN_HARNESS_BLOCK_PLUGINS": "broken"}, timeout=120)
    assert blocked.returncode == 0, blocked.stderr


def test_a_new_tracking_store_is_set_up_without_mlflows_info_lines(tmp_path):
    matrix = tmp_path / "m.toml"
    matrix.write_text(MATRIX)
    proc = subprocess.run([sys.executable, "-m", "harness", "run", "--matrix", str(matrix), "--results", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "r" / "mlflow.db").exists()  # a new store was made, by this run
    assert "Creating initial MLflow database tables" not in proc.stderr and "alembic" not in proc.stderr.lower()
    assert "[cell 1/1]" in proc.stderr and "finished" in proc.stderr


def test_a_store_that_fails_a_read_is_asked_again_then_named_in_a_clear_error(monkeypatch, ran, capsys):
    from mlflow.exceptions import MlflowException

    from harness import cli, tracking

    calls = []

    def flaky(*args):
        calls.append(args)
        if len(calls) < 3:
            raise MlflowException("API request to endpoint /api/2.0/mlflow/runs/search failed with error code 503")
        return ["rows"]

    monkeypatch.setattr(time, "sleep", lambda s: None)
    assert cli._ask_the_store("http://127.0.0.1:5000", "for runs", flaky, "x") == ["rows"] and len(calls) == 3
    calls.clear()
    with pytest.raises(cli.HarnessError, match=r"tracking server http://127.0.0.1:1 did not answer for runs after 2 tries "
                                           r"\(MlflowException: API request .* 503\).*--tracking-uri"):
        cli._ask_the_store("http://127.0.0.1:1", "for runs", flaky, tries=2)

    def broken(*args):
        raise MlflowException("no such table: runs")

    monkeypatch.setattr(tracking, "report_rows", broken)
    assert main(["report", "--matrix", str(ran["path"]), "--results", str(ran["results"])]) == ExitCode.USAGE_ERROR
    err = capsys.readouterr().err
    assert "the tracking store sqlite:///" in err and "could not be read for the matrix's runs: MlflowException: no such table" in err
    assert "Traceback" not in err
