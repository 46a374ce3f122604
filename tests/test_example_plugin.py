"""Third parties need no back door: ``examples/plugin-example`` is installed like any package
(into a temporary directory, never into this environment) and is found through its entry point.

Every check runs in a subprocess whose ``PYTHONPATH`` starts with the install directory, so
this process and the rest of the suite never see the example plugin.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "plugin-example"
EXAMPLE_DIST = "snn-harness-example-plugin"
EXAMPLE_PLUGIN = "example_norm"  # its entry-point name

LOOKUP = textwrap.dedent(
    """
    import json
    import torch
    from harness import get_registry

    registry = get_registry()
    norm = registry.normalizers["rms_norm"](num_features=4)
    info = registry.normalizers.info("rms_norm")
    y = norm(torch.randn(2, 3, 4, 5, 5))  # sequence mode: [T, B, C, H, W]
    print(json.dumps({"plugin": info.plugin, "package": info.package, "module": type(norm).__module__,
                      "shape": list(y.shape), "normalizers": list(registry.normalizers)}))
    """
)


def _pip_install(target: Path, *projects: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
           "--disable-pip-version-check", "--target", str(target), *map(str, projects)]
    proc = subprocess.run(cmd, cwd=target.parent, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"pip install failed:\n{proc.stdout}\n{proc.stderr}"


def _copy_project(src: Path, dest: Path) -> Path:
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources it builds.
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".pytest_cache"))
    return dest


def _env(site: Path, *, autoload: bool = True) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
    for var in ("SNN_HARNESS_DISABLE_PLUGIN_AUTOLOAD", "SNN_HARNESS_BLOCK_PLUGINS", "MLFLOW_TRACKING_URI"):
        env.pop(var, None)
    if not autoload:
        env["SNN_HARNESS_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    return env


def _python(site: Path, *args: str, cwd: Path, autoload: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    # cwd is a scratch directory, not the repository root: `python -c`/`-m` put the cwd on sys.path,
    # and a `snn_harness.egg-info` left there by an editable install makes snn-harness appear twice
    # to importlib.metadata, which the plugin loader rejects ("two plugins are named ...").
    return subprocess.run([sys.executable, *args], cwd=cwd, env=_env(site, autoload=autoload),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example plugin, pip-installed into a temporary directory (once for this module)."""
    root = tmp_path_factory.mktemp("example-plugin")
    target = root / "site"
    _pip_install(target, _copy_project(EXAMPLE, root / "plugin-example"))
    assert (target / "snn_harness_example_plugin.py").is_file()
    return target


def test_installed_plugin_is_found_through_its_entry_point(site: Path, tmp_path: Path) -> None:
    proc = _python(site, "-c", LOOKUP, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["plugin"] == EXAMPLE_PLUGIN
    assert found["package"] == f"{EXAMPLE_DIST} 0.1.0"
    assert found["module"] == "snn_harness_example_plugin"
    assert found["shape"] == [2, 3, 4, 5, 5]
    assert {"rms_norm", "vanilla_bn"} <= set(found["normalizers"])


def test_matrix_runs_the_plugin_normalizer_next_to_a_builtin(site: Path, tmp_path: Path) -> None:
    matrix = tmp_path / "plugin-matrix.toml"
    matrix.write_text(
        textwrap.dedent(
            """
            name = "example-plugin"

            [defaults]
            dataset = "digits"
            model = "vgg_small"
            trainer = "bptt"
            epochs = 1
            batch_size = 128
            time_steps = 2
            train_subset = 256

            [options.model.vgg_small]
            channels = [4, 8]

            [matrix]
            normalizer = ["vanilla_bn", "rms_norm"]
            """
        )
    )
    results = tmp_path / "results"
    proc = _python(site, "-m", "harness", "run", "--matrix", str(matrix), "--results", str(results), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    with (results / "example-plugin" / "summary.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["normalizer"]: r["status"] for r in rows} == {"vanilla_bn": "finished", "rms_norm": "finished"}


def test_disabling_autoload_hides_the_plugin(site: Path, tmp_path: Path) -> None:
    proc = _python(site, "-c", LOOKUP, cwd=tmp_path, autoload=False)
    assert proc.returncode != 0
    assert "unknown normalizer 'rms_norm'" in proc.stderr
    assert "vanilla_bn" in proc.stderr.split("unknown normalizer 'rms_norm'", 1)[1]  # the known ones are listed


def test_two_plugins_registering_the_same_name_is_an_error_naming_both(tmp_path: Path) -> None:
    dup = tmp_path / "dup-plugin"
    (dup / "src").mkdir(parents=True)
    (dup / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [build-system]
            requires = ["setuptools>=64"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "snn-harness-dup-plugin"
            version = "0.2.0"

            [project.entry-points.snn_harness]
            dup_norm = "snn_harness_dup_plugin"

            [tool.setuptools]
            package-dir = { "" = "src" }
            py-modules = ["snn_harness_dup_plugin"]
            """
        )
    )
    (dup / "src" / "snn_harness_dup_plugin.py").write_text(
        textwrap.dedent(
            """
            from torch import nn
            from harness import hookimpl

            @hookimpl
            def register_normalizers(registry):
                registry.add("rms_norm", nn.Identity)
            """
        )
    )
    target = tmp_path / "site"
    _pip_install(target, _copy_project(EXAMPLE, tmp_path / "plugin-example"), dup)

    script = textwrap.dedent(
        """
        from harness import get_registry
        from harness.errors import PluginError

        try:
            get_registry()
        except PluginError as exc:
            print(exc)
        else:
            raise SystemExit("get_registry() accepted two plugins registering 'rms_norm'")
        """
    )
    proc = _python(target, "-c", script, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    message = proc.stdout.strip()
    assert "normalizer 'rms_norm' is registered twice" in message
    assert f"plugin '{EXAMPLE_PLUGIN}' ({EXAMPLE_DIST} 0.1.0)" in message
    assert "plugin 'dup_norm' (snn-harness-dup-plugin 0.2.0)" in message


def test_the_examples_own_tests_pass_with_the_harness_test_kit(site: Path, tmp_path: Path) -> None:
    tests = _copy_project(EXAMPLE / "tests", tmp_path / "tests")
    proc = _python(site, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tests), cwd=tmp_path, timeout=300)
    # The kit's matrix test, the installed-plugin tests, and the normalizer contract's clauses (one
    # skipped: rms_norm takes no batch statistics, so there is nothing to synchronize).
    counts = re.search(r"(\d+) passed, (\d+) skipped", proc.stdout)
    assert proc.returncode == 0 and counts and int(counts[1]) >= 10 and counts[2] == "1", proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "nothing to synchronize" in proc.stdout
