"""What the MLflow UI shows, read by a real headless Chromium from a real ``harness ui`` on
127.0.0.1: the experiment is a classic one (runs, not traces), and the compare-runs link the UI
command prints shows the matrix's cells with their normalizers and ``test_top1``, and the chart
view of the cells charts their metrics. A screenshot
of the page is kept in ``results/test-artifacts/``. Skipped, with the reason, where Chromium is
not installed (the CI set-up installs Debian's ``chromium``)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import TINY_DEFAULTS, free_port

from harness.testing import run_matrix

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "results" / "test-artifacts"
CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (Debian: apt-get install chromium; the CI set-up does)")

MATRIX = 'name = "ui-check"\n' + TINY_DEFAULTS + '[matrix]\nnormalizer = ["vanilla_bn", "osr"]\n'




def _chromium(url: str, *extra: str) -> str:
    """The page's DOM after its scripts ran (and ``extra`` outputs, e.g. a screenshot)."""
    cmd = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--window-size=1600,1100", "--virtual-time-budget=15000", *extra, url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    ran = run_matrix(tmp_path_factory.mktemp("ui"), textwrap.dedent(MATRIX))
    ran.assert_success()
    matrix, results = ran.matrix, ran.results
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "harness", "ui", "--matrix", str(matrix), "--results", str(results),
                             "--port", str(port), "--no-browser"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    links: dict[str, str] = {}
    deadline = time.monotonic() + 90
    try:
        said = {"runs of experiment": "experiment", "side by side": "compare", "as charts": "charts", "best first": "cells"}
        while len(links) < len(said) and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if ": http" in line:
                (key,) = [k for text, k in said.items() if text in line]
                links[key] = line.split(": http", 1)[1].strip().join(("http", ""))
        assert len(links) == len(said), f"harness ui printed {links}; stderr: {proc.stderr.read() if proc.poll() is not None else ''}"
        yield links
    finally:
        proc.terminate()
        proc.wait(30)


def test_the_compare_link_shows_the_cells_their_normalizers_and_test_top1(ui):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "ui-compare-runs.png"
    shot.unlink(missing_ok=True)
    dom = _chromium(ui["compare"], "--dump-dom")
    _chromium(ui["compare"], f"--screenshot={shot}")
    assert shot.exists() and shot.stat().st_size > 10_000
    for text in ("normalizer=vanilla_bn", "normalizer=osr", "normalizer.name", "vanilla_bn", "osr", "test_top1"):
        assert text in dom, f"{text!r} is not on the compare-runs page ({ui['compare']})"


def test_the_experiment_opens_on_its_runs_not_on_traces(ui):
    dom = _chromium(ui["experiment"], "--dump-dom")  # the experiment's own page: MLflow picks the tab
    assert "matching runs" in dom and "ui-check" in dom, "the experiment did not open on its runs"  # the matrix's parent run
    assert "Token Usage" not in dom and "Detect Issues" not in dom  # not the GenAI overview of (no) traces
    # the cells link in the chart view: the matrix's cell runs are listed, and their metrics
    # charted (the parent run alone, or the GenAI mode, shows "Model metrics (0)")
    assert ui["charts"] == ui["cells"] + "&compareRunsMode=CHART"
    charts = _chromium(ui["charts"], "--dump-dom")
    assert "normalizer=vanilla_bn" in charts and "normalizer=osr" in charts
    text = re.sub(r"<[^>]+>", " ", charts)
    shown = re.search(r"Model metrics\s*\(\s*(\d+)\s*\)", text)
    assert shown and int(shown.group(1)) >= 10, "the chart view charts no metrics of the cells"
    assert re.search(r"osr_fallback_rate\s*\(", text)  # a section of per-layer charts
