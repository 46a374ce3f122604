"""The package builds (``python -m build``: a wheel and an sdist) and what it builds installs and
runs in a fresh virtual environment; the version is written in one place."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_the_version_is_single_sourced():
    import tomllib

    from harness import __version__

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "version" not in project and project["dynamic"] == ["version"]
    text = (REPO / "harness" / "__init__.py").read_text()
    assert re.findall(r'^__version__ = "([^"]+)"$', text, re.M) == [__version__]
    assert (REPO / "LICENSE").read_text().startswith("MIT License") and project["license"] == "MIT"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    pytest.importorskip("build", reason="the dev extras (`pip install -e .[dev]`) bring `build`")
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = out.glob("snn_harness-*.whl")
    (sdist,) = out.glob("snn_harness-*.tar.gz")
    return wheel, sdist


def test_the_wheel_and_sdist_hold_the_code_the_plugins_and_the_license(built):
    from harness import __version__

    wheel, sdist = built
    assert wheel.name.startswith(f"snn_harness-{__version__}-") and sdist.name == f"snn_harness-{__version__}.tar.gz"
    names = zipfile.ZipFile(wheel).namelist()
    assert "harness/cli.py" in names and "snn_harness_plugins/normalizers.py" in names and "harness/snn/fused.py" in names
    assert not any(n.startswith(("tests/", "plugins/")) for n in names)  # the plugins install under their own name
    for module in (REPO / "harness").rglob("*.py"):  # every subpackage is listed in pyproject.toml's packages
        assert module.relative_to(REPO).as_posix() in names, f"{module.relative_to(REPO)} is not in the wheel"
    meta = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "normalizers = snn_harness_plugins.normalizers" in zipfile.ZipFile(wheel).read(meta).decode()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    members = tarfile.open(sdist).getnames()
    assert f"snn_harness-{__version__}/LICENSE" in members and f"snn_harness-{__version__}/plugins/trainers.py" in members


def _fresh_venv(where: Path) -> Path:
    """A new virtual environment whose only extra path is this environment's dependencies (no
    editable install of the project: its finder lives in a .pth file that a plain path skips)."""
    venv.create(where, with_pip=False)
    python = where / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "deps-of-the-test-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.mark.parametrize("artifact", ["wheel", "sdist"])
def test_what_is_built_installs_and_runs_in_a_fresh_environment(built, artifact, tmp_path):
    from harness import __version__

    python = _fresh_venv(tmp_path / "env")
    target = built[0] if artifact == "wheel" else built[1]
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--no-build-isolation",
                              "--disable-pip-version-check", "-q", str(target)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SNN_HARNESS_DISABLE_PLUGIN_AUTOLOAD")}
    where = subprocess.run([str(python), "-c", "import harness, snn_harness_plugins; print(harness.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, check=True).stdout
    assert str(tmp_path / "env") in where  # the installed copy, not the checkout
    listing = subprocess.run([str(python), "-m", "harness", "list", "--kind", "normalizer"], capture_output=True, text=True,
                             env=env, cwd=tmp_path, timeout=120)
    assert listing.returncode == 0, listing.stderr
    assert all(name in listing.stdout for name in ("vanilla_bn", "osr", "bntt", "tdbn", "tebn"))
    version = subprocess.run([str(python), "-m", "harness", "--version"], capture_output=True, text=True, env=env,
                             cwd=tmp_path, timeout=120)
    assert version.returncode == 0 and version.stdout.startswith(f"snn-harness {__version__}\nplugins:\n"), version.stdout
    assert f"snn-harness {__version__}: datasets, " in version.stdout
