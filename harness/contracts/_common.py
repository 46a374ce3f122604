"""What every contract suite shares: the registry it takes the component from, and comparisons."""

from __future__ import annotations

import inspect
import re
import types
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
