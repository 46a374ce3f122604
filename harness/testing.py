"""The plugin author's test kit (an opt-in pytest plugin): ``pytest_plugins = ["harness.testing"]``.

Never loaded through ``pytest11``: a project's tests enable it themselves. What it holds:

* Contract suites (:mod:`harness.contracts`), one class per kind of component, to subclass with
  one line: ``class TestMyNorm(NormalizerContract): name = "my_norm"``. Every clause is a test;
  a failure says which promise is broken and by how much. :func:`contract_suites` makes the
  suites of every registered name of a registry (the harness runs its built-ins that way).

* :class:`RecordingHook` -- stands in for the plugin manager's hook relay (``pm.hook``) where a
  test calls the runner or a trainer directly. It records every call, and refuses what the real
  relay would not deliver to a plugin: a hook name that is not in :mod:`harness.hookspecs`,
  positional arguments, and arguments the specification does not have or that it lacks.
* :func:`plugin_manager` -- the built-in plugins and the given ones, autoload off (whatever
  else is installed stays out).
* :func:`run_matrix` -- ``harness run`` of a TOML text in a temporary directory, in this
  process; :class:`MatrixOutcome` has the exit code, the output, the summary rows and
  :meth:`MatrixOutcome.assert_success`, whose failure message shows the output and the summary.

Fixtures: ``harness_hook`` (a fresh :class:`RecordingHook`), ``harness_run_matrix``
(:func:`run_matrix` in the test's ``tmp_path``) and ``harness_gloo`` (two CPU processes in a gloo
group, for the clause of synchronized statistics; started once per session, when first needed).
"""

from __future__ import annotations

import contextlib
import csv
import inspect
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from harness import hookspecs
from harness.contracts import (
    CONTRACTS,
    DatasetContract,
    MembraneNormContract,
    ModelContract,
    NormalizerContract,
    ThresholdContract,
    TrainerContract,
)

__all__ = [
    "CONTRACTS", "DatasetContract", "MatrixOutcome", "MembraneNormContract", "ModelContract", "NormalizerContract", "RecordingHook",
    "ThresholdContract", "TrainerContract", "contract_suites", "hook_specifications", "plugin_manager", "run_matrix",
]


def hook_specifications() -> dict[str, inspect.Signature]:
    """Every hook of the plugin API with its signature, from :mod:`harness.hookspecs`."""
    marker = f"{hookspecs.PROJECT_NAME}_spec"
    return {name: inspect.signature(obj) for name, obj in vars(hookspecs).items()
            if inspect.isfunction(obj) and getattr(obj, marker, None) is not None}


class RecordingHook:
    """A strict stand-in for ``pm.hook``: ``hook.on_epoch_end(cell=..., epoch=..., metrics=...)``
    appends ``("on_epoch_end", {...})`` to :attr:`calls` and returns None.

    :raises AttributeError: a hook the plugin API does not have (the known ones are listed).
    :raises TypeError: positional arguments, or arguments other than the specification's.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self._specs = hook_specifications()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        specs = self.__dict__.get("_specs") or hook_specifications()
        if name not in specs:
            raise AttributeError(f"{name!r} is not a hook of the plugin API (harness.hookspecs); the hooks are: "
                                 + ", ".join(sorted(specs)))
        wanted = list(specs[name].parameters)

        def call(*args: Any, **kwargs: Any) -> None:
            if args:
                raise TypeError(f"hook {name} takes keyword arguments only, as pluggy's hooks do ({', '.join(wanted)})")
            unknown, missing = sorted(set(kwargs) - set(wanted)), [w for w in wanted if w not in kwargs]
            if unknown or missing:
                raise TypeError(f"hook {name}({', '.join(wanted)}) called with "
                                + "; ".join(filter(None, [f"unknown argument(s) {', '.join(unknown)}" if unknown else "",
                                                          f"missing {', '.join(missing)}" if missing else ""])))
            self.calls.append((name, kwargs))

        return call

    def names(self) -> list[str]:
        """The hooks called, in order."""
        return [name for name, _ in self.calls]


def contract_suites(kind: str, names: list[str], *, plugins: tuple[tuple[object, str], ...] = (),
                    autoload: bool | None = None, settings: dict[str, dict[str, Any]] | None = None,
                    prefix: str = "Test") -> dict[str, type]:
    """One contract suite per name: ``{"TestNormalizer_my_norm": <class>}``, to put in a test
    module's globals so that pytest collects them. ``settings[name]`` sets further class
    attributes of one suite (``options``, sizes, or methods such as a data set's ``present``)."""
    base = CONTRACTS[kind]
    suites = {}
    for name in names:
        cls_name = f"{prefix}{kind.capitalize()}_{name}"
        attrs = {"name": name, "plugins": tuple(plugins), "autoload": autoload, **(settings or {}).get(name, {})}
        suites[cls_name] = type(cls_name, (base,), attrs)
    return suites


def plugin_manager(*plugins: tuple[object, str]) -> Any:
    """A plugin manager with the built-in plugins and ``plugins`` (``(plugin, name)`` pairs),
    third-party autoload off."""
    from harness.registry import get_plugin_manager

    return get_plugin_manager(autoload=False, extra_plugins=list(plugins))


@dataclass
class MatrixOutcome:
    """What :func:`run_matrix` gives: exit code, output, and where the results are."""

    rc: int
    stdout: str
    stderr: str
    matrix: Path  # the matrix file written
    results: Path
    name: str
    summary: list[dict[str, str]] = field(default_factory=list)

    def assert_success(self) -> None:
        """Every cell finished and ``harness run`` exited 0; else fail showing the output and the summary."""
        bad = [row for row in self.summary if row.get("status") != "finished"]
        if self.rc == 0 and self.summary and not bad:
            return
        rows = "\n".join(", ".join(f"{k}={v}" for k, v in row.items() if k in ("label", "status", "error", "test_top1"))
                         for row in self.summary) or "(no summary rows)"
        raise AssertionError(f"harness run of matrix {self.name!r} exited {self.rc}; summary:\n{rows}\n"
                             f"--- stderr ---\n{self.stderr[-4000:]}\n--- stdout ---\n{self.stdout[-2000:]}")


def run_matrix(tmp_path: Path, toml_text: str, *args: str, plugins: tuple[tuple[object, str], ...] = ()) -> MatrixOutcome:
    """``harness run`` of ``toml_text`` (written to ``tmp_path/matrix.toml``) with results in
    ``tmp_path/results``, in this process, third-party autoload off, ``plugins`` registered
    besides the built-ins; ``args`` are further ``harness run`` flags (e.g. ``"--executor", "serial"``)."""
    import tomllib

    from harness import cli
    from harness import registry as registry_module

    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    matrix = tmp_path / "matrix.toml"
    matrix.write_text(toml_text)
    name = str(tomllib.loads(toml_text).get("name", matrix.stem))
    results = tmp_path / "results"
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        real = registry_module.get_plugin_manager
        mp.setattr(registry_module, "get_plugin_manager",
                   lambda **kw: real(**{**kw, "autoload": False, "extra_plugins": [*kw.get("extra_plugins", ()), *plugins]}))
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = int(cli.main(["run", "--matrix", str(matrix), "--results", str(results), *args]))
    summary_csv = results / name / "summary.csv"
    rows = list(csv.DictReader(summary_csv.open())) if summary_csv.exists() else []
    return MatrixOutcome(rc, out.getvalue(), err.getvalue(), matrix, results, name, rows)


@pytest.fixture
def harness_hook() -> RecordingHook:
    """A fresh :class:`RecordingHook`."""
    return RecordingHook()


@pytest.fixture
def harness_run_matrix(tmp_path: Path) -> Any:
    """:func:`run_matrix` in this test's ``tmp_path``: ``harness_run_matrix(toml_text, *args, plugins=())``."""

    def run(toml_text: str, *args: str, plugins: tuple[tuple[object, str], ...] = ()) -> MatrixOutcome:
        return run_matrix(tmp_path, toml_text, *args, plugins=plugins)

    return run


@pytest.fixture(scope="session")
def harness_gloo() -> Any:
    """Two CPU processes in one gloo process group, started at the first use and kept for the
    session (:class:`harness.contracts.gloo.GlooPair`): the contract of synchronized statistics."""
    from harness.contracts.gloo import GlooPair

    pair = GlooPair()
    yield pair
    pair.close()
