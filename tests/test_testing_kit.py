"""The plugin author's kit, ``harness.testing``: a strict stand-in for the hook relay, and
``run_matrix`` with a failure message that shows why; opt-in as a pytest plugin."""

from __future__ import annotations

import subprocess
import sys
import types
from importlib import metadata

import pytest
from conftest import TINY_DEFAULTS

from harness import hookimpl
from harness.testing import RecordingHook, hook_specifications, run_matrix


def test_the_recording_hook_records_calls_the_plugin_api_has_and_refuses_the_rest():
    hook = RecordingHook()
    hook.on_epoch_start(cell="c", epoch=1, num_train_batches=2, num_test_batches=1)
    assert hook.calls == [("on_epoch_start", {"cell": "c", "epoch": 1, "num_train_batches": 2, "num_test_batches": 1})]
    assert hook.names() == ["on_epoch_start"]
    with pytest.raises(AttributeError, match=r"'on_epoch_ends' is not a hook of the plugin API .*the hooks are: .*on_epoch_end"):
        hook.on_epoch_ends(cell="c", epoch=1, metrics={})
    with pytest.raises(TypeError, match=r"hook on_epoch_end takes keyword arguments only"):
        hook.on_epoch_end("c", 1, {})
    with pytest.raises(TypeError, match=r"hook on_epoch_end\(cell, epoch, metrics\) called with unknown argument\(s\) "
                                        r"metric; missing metrics"):
        hook.on_epoch_end(cell="c", epoch=1, metric={})
    assert len(hook.calls) == 1  # nothing refused was recorded
    assert set(hook_specifications()) >= {"register_normalizers", "on_cell_start", "recorded_code"}


MATRIX = 'name = "kit"\n' + TINY_DEFAULTS + '[matrix]\nnormalizer = ["vanilla_bn", "broken_norm"]\n'


def _broken_plugin():
    plugin = types.ModuleType("broken_norm_plugin")

    def broken_norm(num_features: int):
        raise RuntimeError("the normalizer's author forgot something")

    @hookimpl
    def register_normalizers(registry):
        registry.add("broken_norm", broken_norm, step_modes=("single", "sequence"))

    plugin.register_normalizers = register_normalizers
    return plugin


def test_run_matrix_gives_the_outcome_and_assert_success_shows_why_a_cell_failed(tmp_path):
    ok = run_matrix(tmp_path / "ok", 'name = "kit"\n' + TINY_DEFAULTS)
    ok.assert_success()
    assert ok.rc == 0 and [r["status"] for r in ok.summary] == ["finished"] and (ok.results / "kit" / "summary.md").exists()

    (tmp_path / "bad").mkdir()
    bad = run_matrix(tmp_path / "bad", MATRIX, plugins=((_broken_plugin(), "broken_norm_plugin"),))
    assert bad.rc == 1 and sorted(r["status"] for r in bad.summary) == ["failed", "finished"]
    with pytest.raises(AssertionError) as info:
        bad.assert_success()
    message = str(info.value)
    assert "harness run of matrix 'kit' exited 1" in message and "normalizer=broken_norm" in message
    assert "status=failed" in message and "the normalizer's author forgot something" in message


def test_the_kit_is_an_opt_in_pytest_plugin(tmp_path):
    entry_points = metadata.distribution("snn-harness").entry_points
    assert not [ep for ep in entry_points if ep.group == "pytest11"]  # never loaded by itself
    (tmp_path / "test_mine.py").write_text(
        'pytest_plugins = ["harness.testing"]\n\n'
        "def test_uses_the_kit(harness_hook, harness_run_matrix):\n"
        "    harness_hook.on_matrix_end(run=None, results=[])\n"
        "    assert harness_hook.names() == ['on_matrix_end'] and callable(harness_run_matrix)\n"
    )
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_mine.py")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout + proc.stderr
