"""What every contract suite shares: the registry it takes the component from, and comparisons."""

from __future__ import annotations

import copy
import inspect
import re
import types
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor

from harness import validate
from harness.registry import ComponentInfo, Registry, get_registry


class Contract:
    """The base of the contract suites: a subclass names its component in one line.

    Class attributes a subclass may set:

    * ``name`` -- the registered name (required).
    * ``options`` -- options for the factory, as a matrix file would give them.
    * ``plugins`` -- ``(plugin, name)`` pairs to register besides the installed plugins; when
      given, third-party autoload is off (the plugin is tested whether or not it is installed).
    * ``autoload`` -- load installed third-party plugins (default: when ``plugins`` is empty).
    * ``rtol``, ``atol`` -- the tolerances of the comparisons.
    """

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    options: ClassVar[dict[str, Any]] = {}
    plugins: ClassVar[tuple[tuple[object, str], ...]] = ()
    autoload: ClassVar[bool | None] = None
    rtol: ClassVar[float] = 1e-5
    atol: ClassVar[float] = 1e-5

    @classmethod
    def uses_autoload(cls) -> bool:
        return cls.autoload if cls.autoload is not None else not cls.plugins

    @pytest.fixture(scope="class")
    @classmethod
    def contract_registry(cls) -> Registry:
        """The registry the component is taken from (built once per suite)."""
        if not cls.name:
            pytest.fail(f"{cls.__name__}: set the class attribute name = '<the registered {cls.kind} name>'")
        return get_registry(autoload=cls.uses_autoload(), extra_plugins=list(cls.plugins))

    @pytest.fixture(scope="class")
    @classmethod
    def contract_info(cls, contract_registry: Registry) -> ComponentInfo:
        """What the registry knows of the component: its factory, step modes and options."""
        return contract_registry.info(cls.kind, cls.name)

    def test_options_match_the_signature(self, contract_info: ComponentInfo) -> None:
        """Option metadata matches the factory's signature: its options are named (no ``**kwargs``,
        which ``harness list`` cannot show nor the matrix check), every default passes its own
        type hint and constraints (what the matrix loader would check of a user's value), and every
        ``:param x:`` of the docstring is an argument of the factory."""
        assert not contract_info.accepts_any_option, (
            f"{self.kind} {self.name!r}: the factory takes **kwargs, so its options are unknown to `harness list` "
            "and to the matrix's checks; spell them out as keyword arguments with defaults")
        for option in contract_info.options.values():
            if option.required:
                continue
            try:
                validate.check(option.default, option.annotation)
            except (TypeError, ValueError) as exc:
                pytest.fail(f"{self.kind} {self.name!r}: the default of option {option.name!r} ({option.default!r}) "
                            f"is refused by its own type hint {validate.describe(option.annotation)}: {exc}")
        documented = set(re.findall(r":param\s+(\w+)\s*:", _docstrings(contract_info.factory)))
        arguments = set(inspect.signature(contract_info.factory).parameters)
        stale = sorted(documented - arguments)
        assert not stale, (f"{self.kind} {self.name!r}: the docstring documents {', '.join(stale)}, which the factory "
                           f"does not take (its arguments: {', '.join(sorted(arguments))})")


def _docstrings(factory: Any) -> str:
    doc = inspect.getdoc(factory) or ""
    if inspect.isclass(factory) and factory.__init__ is not object.__init__:
        doc += "\n" + (inspect.getdoc(factory.__init__) or "")
    return doc


def draw_parameters(module: torch.nn.Module, seed: int) -> None:
    """Every floating-point parameter of ``module`` drawn uniformly from [0.6, 1.4) from ``seed``:
    not 1 and 0, so that a missing gradient or a wrong affine transform shows."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point():
                p.copy_(torch.rand(p.shape, generator=g) * 0.8 + 0.6)


def assert_close(actual: Any, expected: Any, what: str, rtol: float, atol: float) -> None:
    """``torch.testing.assert_close`` whose failure message starts with ``what``."""
    try:
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
    except AssertionError as exc:
        raise AssertionError(f"{what}: {exc}") from None


def assert_finite(t: Tensor | None, what: str) -> None:
    if t is None:
        return
    bad = ~torch.isfinite(t)
    if bad.any():
        raise AssertionError(f"{what}: {int(bad.sum())} of {t.numel()} values are not finite")


# A suite's run of its component over one sequence: (module, potentials [T, ...], training) ->
# one value per step (the output, the threshold).
Run = Callable[[torch.nn.Module, Tensor, bool], Sequence[Any]]


def check_state_dict_round_trip(suite: Any, registry: Registry, run: Run) -> None:
    """A fresh module (``suite.build(registry, seed=3)``) loaded with the ``state_dict`` of one
    trained on two sequences gives the same values in evaluation and in the next training
    sequence, and the same state after it: a resumed cell continues exactly."""
    trained = suite.build(registry)
    for seq in range(2):
        run(trained, suite.potentials(seed=seq), True)
    fresh = suite.build(registry, seed=3)
    fresh.load_state_dict(copy.deepcopy(trained.state_dict()))
    u = suite.potentials(seed=4)
    for training in (False, True):
        for t, (a, b) in enumerate(zip(run(fresh, u, training), run(trained, u, training), strict=True)):
            assert_close(a, b, f"{suite.name}: after load_state_dict, {'training' if training else 'evaluation'} step {t + 1}",
                         suite.rtol, suite.atol)
    for (key, a), (_, b) in zip(fresh.state_dict().items(), trained.state_dict().items(), strict=True):
        assert_close(a, b, f"{suite.name}: state {key} after the next training sequence", suite.rtol, suite.atol)


def check_dtype_and_device(suite: Any, registry: Registry, run: Run, what: str,
                           as_tensor: Callable[[Any, Tensor], Tensor] = lambda value, like: value) -> None:
    """After ``.to(torch.float64)`` a float64 potential gives float64 values (the float32 ones up
    to rounding); after ``.to(device)`` (CUDA, else ``meta``) the values are made there. A value
    that is a plain number (a threshold may be) has no dtype or device to check; ``as_tensor``
    makes it comparable."""
    ref = suite.build(registry)
    u = suite.potentials()
    wide = copy.deepcopy(ref).to(torch.float64)
    for training in (True, False):
        for t, (a, b) in enumerate(zip(run(ref, u, training), run(wide, u.double(), training), strict=True)):
            if isinstance(b, Tensor):
                assert b.dtype == torch.float64, f"{suite.name}: float64 potential, {what} is {b.dtype} (step {t + 1})"
            assert_close(as_tensor(b, u).double(), as_tensor(a, u).double(),
                         f"{suite.name}: float64 against float32 {what}, step {t + 1}", 1e-4, 1e-4)
    device = other_device()
    moved = copy.deepcopy(ref).to(device)
    for training in (True, False):
        try:
            values = run(moved, u.to(device), training)
        except (RuntimeError, NotImplementedError) as exc:
            pytest.fail(f"{suite.name} on {device}: {type(exc).__name__}: {exc}")
        for t, value in enumerate(values):
            assert not isinstance(value, Tensor) or value.device.type == device.type, (
                f"{suite.name}: on {device}, the {what} of step {t + 1} is on {value.device}")


def other_device() -> torch.device:
    """CUDA when there is one, else ``meta`` (no data, but every same-device rule enforced)."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("meta")


def portable_plugins(plugins: tuple[tuple[object, str], ...]) -> tuple[tuple[object, str], ...]:
    """``plugins`` with modules replaced by their import names (a module does not pickle)."""
    return tuple(((("module", p.__name__) if isinstance(p, types.ModuleType) else p), n) for p, n in plugins)


def restore_plugins(plugins: tuple[tuple[object, str], ...]) -> tuple[tuple[object, str], ...]:
    import importlib

    return tuple(((importlib.import_module(p[1]) if isinstance(p, tuple) and p[:1] == ("module",) else p), n)
                 for p, n in plugins)
