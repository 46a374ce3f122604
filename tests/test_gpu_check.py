"""The one-shot GPU check (scripts/gpu-check.sh) passes its dry run on the CPU, without MLflow or
tonic, also where the project is not installed, and reports a failing check as FAIL."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def without_mlflow_and_tonic(tmp_path_factory) -> Path:
    """A directory that, first on PYTHONPATH, makes ``import mlflow`` and ``import tonic`` fail, as
    on the GPU machine."""
    root = tmp_path_factory.mktemp("absent")
    for name in ("mlflow", "tonic"):
        (root / name).mkdir()
        (root / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed on this machine')\n")
    return root


def _run(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "scripts" / "gpu-check.sh"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_the_dry_run_passes_every_check_without_mlflow_or_tonic(tmp_path, without_mlflow_and_tonic):
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(without_mlflow_and_tonic), "OMP_NUM_THREADS": "1"}
    done = _run(["--device", "cpu", "--out", str(tmp_path)], env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    names = [c["name"] for c in report["checks"]]
    assert names == ["environment", "host_syncs", "resume", "cpu_parity", "memory", "same_seed", "autocast", "speed", "device_choice"]
    assert {c["name"]: c["status"] for c in report["checks"]} == dict.fromkeys(names, "PASS")
    resume = next(c for c in report["checks"] if c["name"] == "resume")["detail"]["cells"]
    assert all(cell["abs_diff"]["test_loss"] == 0 for cell in resume.values())
    md = (tmp_path / "gpu-check.md").read_text()
    assert "| resume | PASS |" in md and "**PASS**: 9 of 9 checks passed." in md
    speed = next(c for c in report["checks"] if c["name"] == "speed")["detail"]
    assert speed["vgg_small"]["x_ann"]["bptt T=2"] > 0 and speed["vggsnn"]["x_ann"]["online T=2"] > 0
    assert (tmp_path / "speed-vggsnn" / "speed.md").is_file()


@pytest.mark.slow
def test_it_installs_the_working_tree_where_the_project_is_not_installed(tmp_path, without_mlflow_and_tonic):
    # A Python with PyTorch and the rest, but not this project (as on the GPU machine).
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "py")], check=True)
    site = Path(subprocess.run([str(tmp_path / "py" / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # its .pth files stay unread
    python = str(tmp_path / "py" / "bin" / "python")
    absent = subprocess.run([python, "-c", "import snn_harness_plugins"], capture_output=True, text=True)
    assert absent.returncode != 0  # the project is not importable there
    env = {**os.environ, "PYTHON": python, "PYTHONPATH": str(without_mlflow_and_tonic), "TMPDIR": str(tmp_path)}
    done = _run(["--device", "cpu", "--out", str(tmp_path / "out"), "--only", "environment", "--only", "cpu_parity"], env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "linking the working tree" in done.stderr
    report = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert [(c["name"], c["status"]) for c in report["checks"]] == [("environment", "PASS"), ("cpu_parity", "PASS")]


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_failing_or_broken_check_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    gpu_check = _module()

    def broken(ctx):
        raise RuntimeError("CUDA error: an illegal memory access")

    monkeypatch.setattr(gpu_check, "CHECKS", [
        ("environment", gpu_check.check_environment, False),
        ("wrong", lambda ctx: {"ok": False, "why": "online memory grows with T"}, False),
        ("broken", broken, False),
    ])
    assert gpu_check.main(["--device", "cpu", "--out", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert [(c["name"], c["status"]) for c in report["checks"]] == [("environment", "PASS"), ("wrong", "FAIL"), ("broken", "ERROR")]
    assert "CUDA error: an illegal memory access" in report["checks"][2]["detail"]["error"]
    md = (tmp_path / "gpu-check.md").read_text()
    assert "| wrong | FAIL |" in md and "**FAIL**: 1 of 3 checks passed." in md


def test_without_cuda_the_gpu_run_says_how_to_dry_run(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert _module().main(["--out", str(tmp_path)]) == 4
    assert "run with --device cpu for the dry run" in capsys.readouterr().err
