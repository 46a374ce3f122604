from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, NamedTuple

import pytest

pytest_plugins = ["harness.testing"]  # the plugin author's kit: its fixtures, and the contract suites' fixtures

# Our own tests see only the built-in plugins, whatever else is installed.
os.environ["SNN_HARNESS_DISABLE_PLUGIN_AUTOLOAD"] = "1"
os.environ.pop("MLFLOW_TRACKING_URI", None)
# What the harness caches per machine (data files' hashes) goes to a directory of this session's.
os.environ["SNN_HARNESS_CACHE_DIR"] = tempfile.mkdtemp(prefix="snn-harness-test-cache-")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_ambient_tracking_uri(monkeypatch):
    """A test that points MLflow somewhere must not redirect the next test's runs."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="session")
def registry():
    from harness import get_registry

    return get_registry()


@pytest.fixture
def tiny_matrix(tmp_path):
    """Write a tiny digits matrix (one epoch, two batches) plus ``extra`` TOML; returns its path."""

    def write(extra: str = "", name: str = "tiny") -> Path:
        path = tmp_path / f"{name}.toml"
        path.write_text(f'name = "{name}"\n' + TINY_DEFAULTS + textwrap.dedent(extra))
        return path

    return write


@pytest.fixture
def write_toml(tmp_path):
    """Write a TOML file from a dedented string; returns its path."""

    def write(text: str, name: str = "matrix.toml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for servers a test starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# MLflow's server imports for tens of seconds on a loaded two-core machine (over 60 s has been
# seen): a test waits this long for one, and fails at once if the process has exited.
SERVER_START_S = 240.0


def wait_http(url: str, proc: subprocess.Popen, timeout: float = SERVER_START_S) -> None:
    """Wait until ``url`` answers 200; raise if ``proc`` exits first or ``timeout`` passes."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")
        time.sleep(0.3)


def start_mlflow_server(root: Path) -> tuple[subprocess.Popen, str]:
    """A real ``mlflow server`` on 127.0.0.1 (one worker, its own SQLite store and artifact
    root under ``root``), in its own process group, answering; returns it and its URL."""
    import contextlib

    port = free_port()
    log = root / "server.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination", str(root / "artifacts"),
             "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=fh, start_new_session=True,
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc)
    except (RuntimeError, TimeoutError) as exc:
        with contextlib.suppress(ProcessLookupError):  # it may have exited (and been reaped) already
            os.killpg(proc.pid, 9)
        proc.wait()
        raise RuntimeError(f"{exc}; the server's log ends:\n{log.read_text(errors='replace')[-3000:]}") from None
    return proc, f"http://127.0.0.1:{port}"


TINY_DEFAULTS = """
# A tiny matrix: digits, one epoch of two batches, a one-stage network. Tests add axes to it.
[defaults]
dataset = "digits"
model = "vgg_small"
normalizer = "vanilla_bn"
trainer = "bptt"
epochs = 1
batch_size = 128
time_steps = 2
train_subset = 256
device = "cpu"  # bit-identical comparisons: never cuDNN or TF32, even where CUDA exists

[options.model.vgg_small]
channels = [4, 8]
"""


class RayCluster(NamedTuple):
    """The Ray tests' cluster: ``ray`` (joined by this process), its ``address``, and ``unshared``:
    a directory the second node cannot see (None where this machine cannot make one)."""

    ray: Any
    address: str
    unshared: Path | None


def _can_hide(directory: Path) -> bool:
    """Whether a process here can have a private mount namespace with a tmpfs over ``directory``
    (root, or a user namespace allowing it)."""
    if shutil.which("unshare") is None:
        return False
    probe = f"mount -t tmpfs none {shlex.quote(str(directory))} && umount {shlex.quote(str(directory))}"
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", probe],
                          capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def ray_instance(tmp_path_factory):
    """One Ray cluster of two nodes for the whole session (one CPU each, loopback only, as the
    harness starts its own): the head in this process, the second node in a process of its own,
    where possible in a private mount namespace that hides ``unshared`` (storage the nodes do not
    share). Tests run the ``ray`` executor in this process, which joins it. The Ray tests'
    plugins (``ray_plugins``) travel to the workers by value."""
    from harness.ray_executor import LOOPBACK_ENV

    os.environ.setdefault(LOOPBACK_ENV, "0")
    import ray
    import ray_plugins
    from ray.cluster_utils import Cluster

    ray.cloudpickle.register_pickle_by_value(ray_plugins)
    unshared = tmp_path_factory.mktemp("unshared")
    hide = _can_hide(unshared)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    node = [sys.executable, str(REPO / "tests" / "ray_node.py"), cluster.address]
    if hide:
        mount = f"mount -t tmpfs none {shlex.quote(str(unshared))} && exec {shlex.join(node)}"
        node = ["unshare", "-m", "--propagation", "private", "sh", "-c", mount]
    second = subprocess.Popen(node, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    deadline = time.monotonic() + 60
    while sum(n["Alive"] for n in ray.nodes()) < 2:
        assert second.poll() is None and time.monotonic() < deadline, "the second Ray node did not start"
        time.sleep(0.1)
    yield RayCluster(ray, cluster.address, unshared if hide else None)
    ray.shutdown()
    second.stdin.close()
    try:
        second.wait(timeout=30)
    except subprocess.TimeoutExpired:
        second.kill()
    cluster.shutdown()
