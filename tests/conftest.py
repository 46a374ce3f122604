from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

# Our own tests see only the built-in plugins, whatever else is installed.
os.environ["SNN_HARNESS_DISABLE_PLUGIN_AUTOLOAD"] = "1"
os.environ.pop("MLFLOW_TRACKING_URI", None)

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


@pytest.fixture(scope="session")
def ray_instance():
    """One local Ray instance for the whole session (2 CPUs, loopback only, as the harness
    starts its own); tests that use it run the ``ray`` executor in this process, which joins it.
    The Ray tests' plugins (``ray_plugins``) travel to the workers by value."""
    from harness.ray_executor import LOOPBACK_ENV

    os.environ.setdefault(LOOPBACK_ENV, "0")
    import ray
    import ray_plugins

    ray.cloudpickle.register_pickle_by_value(ray_plugins)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()
