"""Names -> factories, filled only through the pluggy registration hooks.

``get_registry()`` builds a fresh plugin manager, loads every plugin of the ``snn_harness``
entry-point group (the built-ins included), calls the ``register_*`` hooks once per plugin
and returns a frozen :class:`Registry`. Nothing here imports torch.
"""

from __future__ import annotations

import copy
import inspect
import os
import sys
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pluggy

from harness import hookspecs, validate
from harness.errors import PluginError, UnknownNameError

KINDS: dict[str, str] = {
    # kind -> registration hook
    "normalizer": "register_normalizers",
    "threshold": "register_thresholds",
    "membrane_norm": "register_membrane_norms",
    "trainer": "register_trainers",
    "loss": "register_losses",
    "model": "register_models",
    "dataset": "register_datasets",
}

STEP_MODES = frozenset({"single", "sequence"})

# Arguments the harness passes itself; they are not user options of the factory.
INJECTED: dict[str, frozenset[str]] = {
    "normalizer": frozenset({"num_features", "time_steps", "v_threshold"}),
    "threshold": frozenset(),
    "membrane_norm": frozenset({"num_features", "time_steps"}),
    "trainer": frozenset(),
    "loss": frozenset(),
    "model": frozenset({"in_channels", "num_classes", "input_size", "layers"}),
    "dataset": frozenset({"time_steps"}),  # frame-based data sets bin events into the cell's T frames
}

BUILTIN_DISTRIBUTION = "snn-harness"
ENV_DISABLE_AUTOLOAD = "SNN_HARNESS_DISABLE_PLUGIN_AUTOLOAD"
ENV_BLOCK = "SNN_HARNESS_BLOCK_PLUGINS"
ENV_TRACE = "SNN_HARNESS_TRACE_PLUGINS"


@dataclass(frozen=True)
class OptionInfo:
    """One user option of a factory, read from its signature."""

    name: str
    annotation: Any  # a type hint, or inspect.Parameter.empty when the factory gives none
    default: Any  # inspect.Parameter.empty when required

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty

    def describe(self) -> str:
        ann = "" if self.annotation is inspect.Parameter.empty else f": {_type_name(self.annotation)}"
        default = "" if self.required else f" = {self.default!r}"
        marked, original = validate.later_original(self.annotation)
        later = f" (added later: cell ids leave it out at {original!r})" if marked else ""
        return f"{self.name}{ann}{default}{later}"


@dataclass(frozen=True)
class ComponentInfo:
    """What the registry knows about one named factory."""

    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str  # the plugin (entry-point) name that registered it
    package: str  # "distribution version" that provides the plugin, or "(not installed)"
    step_modes: frozenset[str]
    options: Mapping[str, OptionInfo]
    accepts_any_option: bool  # the factory takes **kwargs
    description: str
    injected: frozenset[str] = frozenset()  # the harness-provided arguments the factory takes

    def takes(self, argument: str) -> bool:
        """Whether the factory takes the harness-provided ``argument`` (e.g. ``time_steps``)."""
        return argument in self.injected or self.accepts_any_option

    def defaults(self) -> dict[str, Any]:
        """Fresh copies of the factory's defaults (a cell must not share the signature's list objects)."""
        return {o.name: copy.deepcopy(o.default) for o in self.options.values() if not o.required}


class ComponentTable(Mapping[str, Callable[..., Any]]):
    """The factories of one kind, by name. ``table[name]`` raises a listing error if unknown."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, ComponentInfo] = {}
        self._frozen = False

    def __getitem__(self, name: str) -> Callable[..., Any]:
        return self.info(name).factory

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def info(self, name: str) -> ComponentInfo:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, self._entries) from None

    def _add(self, entry: ComponentInfo) -> None:
        if self._frozen:
            raise PluginError(f"the registry is frozen; cannot add {self.kind} {entry.name!r}")
        existing = self._entries.get(entry.name)
        if existing is not None:
            raise PluginError(
                f"{self.kind} {entry.name!r} is registered twice: by plugin {existing.plugin!r} "
                f"({existing.package}) and by plugin {entry.plugin!r} ({entry.package})"
            )
        self._entries[entry.name] = entry


class Registry:
    """All named factories, by kind: ``registry.normalizers["vanilla_bn"](num_features=64)``."""

    def __init__(self) -> None:
        self._tables = {kind: ComponentTable(kind) for kind in KINDS}
        self.plugins = PluginSettings()  # how the plugins were loaded: what a worker rebuilds this from

    normalizers = property(lambda self: self._tables["normalizer"])
    thresholds = property(lambda self: self._tables["threshold"])
    membrane_norms = property(lambda self: self._tables["membrane_norm"])
    trainers = property(lambda self: self._tables["trainer"])
    losses = property(lambda self: self._tables["loss"])
    models = property(lambda self: self._tables["model"])
    datasets = property(lambda self: self._tables["dataset"])

    def table(self, kind: str) -> ComponentTable:
        try:
            return self._tables[kind]
        except KeyError:
            raise UnknownNameError("plugin kind", kind, self._tables) from None

    def info(self, kind: str, name: str) -> ComponentInfo:
        return self.table(kind).info(name)

    def names(self, kind: str) -> list[str]:
        return list(self.table(kind))

    def entries(self) -> Iterator[ComponentInfo]:
        for kind in KINDS:
            for name in self._tables[kind]:
                yield self._tables[kind].info(name)

    def freeze(self) -> Registry:
        for table in self._tables.values():
            table._frozen = True
        return self


class Registrar:
    """Handed to a ``register_*`` hook, bound to the plugin that implements it."""

    def __init__(self, table: ComponentTable, plugin: str, package: str) -> None:
        self._table, self.plugin, self.package = table, plugin, package

    @property
    def kind(self) -> str:
        return self._table.kind

    def add(
        self,
        name: str,
        factory: Callable[..., Any],
        *,
        step_modes: typing.Iterable[str] | None = None,
        description: str | None = None,
    ) -> None:
        """Register ``factory`` under ``name``.

        :param step_modes: ``{"single", "sequence"}`` or a subset; defaults to the factory's
            ``step_modes`` attribute, else both.
        :param description: one line for ``harness list``; defaults to the docstring's first line.
        """
        if not isinstance(name, str) or not name.isidentifier():
            raise PluginError(
                f"plugin {self.plugin!r}: {self.kind} name {name!r} must be a Python identifier "
                "(letters, digits, underscores)"
            )
        if not callable(factory):
            raise PluginError(f"plugin {self.plugin!r}: {self.kind} {name!r} factory is not callable")
        modes = frozenset(step_modes if step_modes is not None else getattr(factory, "step_modes", STEP_MODES))
        if not modes or not modes <= STEP_MODES:
            raise PluginError(
                f"plugin {self.plugin!r}: {self.kind} {name!r} has step_modes {sorted(modes)}; "
                f"expected a non-empty subset of {sorted(STEP_MODES)}"
            )
        options, any_option, injected = _options_of(factory, INJECTED[self.kind])
        if "name" in options:
            raise PluginError(f"plugin {self.plugin!r}: {self.kind} {name!r} may not take an option called 'name'")
        for option in options.values():
            marked, original = validate.later_original(option.annotation)
            if marked:
                try:
                    validate.check(original, option.annotation)
                except (TypeError, ValueError) as exc:
                    raise PluginError(
                        f"plugin {self.plugin!r}: option {option.name!r} of {self.kind} {name!r} is marked "
                        f"AddedLater({original!r}), a value the option itself refuses: {exc}") from None
        doc = description if description is not None else " ".join((inspect.getdoc(factory) or "").split("\n\n")[0].split())
        self._table._add(
            ComponentInfo(
                kind=self.kind,
                name=name,
                factory=factory,
                plugin=self.plugin,
                package=self.package,
                step_modes=modes,
                options=options,
                accepts_any_option=any_option,
                description=doc,
                injected=injected,
            )
        )


class ObserverRegistrar:
    """Handed to ``register_observers``: registers observer objects for this invocation."""

    def __init__(self, pm: pluggy.PluginManager, plugin: str) -> None:
        self._pm, self.plugin = pm, plugin

    def add(self, observer: object, name: str) -> None:
        _register(self._pm, observer, f"{self.plugin}.{name}")


# ---------------------------------------------------------------------------------------------
# Plugin manager
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PluginSettings:
    """How a plugin manager was loaded, as a plain picklable value: a worker process (another
    node, even) rebuilds the same registry from it with :meth:`plugin_manager`."""

    autoload: bool = True  # third-party entry points too, not only the built-in ones
    blocked: tuple[str, ...] = ()
    extra_plugins: tuple[tuple[object, str], ...] = ()  # (plugin, name) registered besides the entry points

    def plugin_manager(self) -> HarnessPluginManager:
        return get_plugin_manager(autoload=self.autoload, blocked=self.blocked, extra_plugins=self.extra_plugins)


class HarnessPluginManager(pluggy.PluginManager):
    """A pluggy manager that remembers which distribution provided each entry-point plugin, and
    the settings it was loaded with (:class:`PluginSettings`)."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT_NAME)
        self.packages: dict[str, str] = {}  # plugin name -> "distribution version"
        self.settings = PluginSettings()
        self.broken: dict[str, str] = {}  # plugin name -> why it could not be imported (keep_going only)


def get_plugin_manager(
    *,
    autoload: bool | None = None,
    blocked: typing.Iterable[str] = (),
    extra_plugins: typing.Iterable[tuple[object, str]] = (),
    keep_going: bool = False,
) -> HarnessPluginManager:
    """A fresh plugin manager with the ``snn_harness`` entry points loaded.

    :param autoload: load third-party entry points too. Defaults to true unless the environment
        variable ``SNN_HARNESS_DISABLE_PLUGIN_AUTOLOAD`` is set, in which case only the built-in
        plugins (entry points of the ``snn-harness`` distribution) are loaded.
    :param blocked: plugin names never to load (also ``SNN_HARNESS_BLOCK_PLUGINS=a,b``).
    :param extra_plugins: ``(plugin, name)`` pairs to register besides the entry points (tests).
    :param keep_going: a plugin whose import raises is left out and recorded in ``pm.broken``
        (``harness list`` shows it) instead of failing with :class:`PluginError`.
    """
    pm = HarnessPluginManager()
    pm.add_hookspecs(hookspecs)
    if autoload is None:
        autoload = os.environ.get(ENV_DISABLE_AUTOLOAD, "").strip().lower() in ("", "0", "false", "no")
    names = list(dict.fromkeys(b.strip() for b in [*blocked, *os.environ.get(ENV_BLOCK, "").split(",")] if b.strip()))
    for name in names:
        pm.set_blocked(name)
    extra_plugins = tuple(extra_plugins)
    pm.settings = PluginSettings(autoload=autoload, blocked=tuple(names), extra_plugins=extra_plugins)
    _load_entry_points(pm, autoload, keep_going)
    for plugin, name in extra_plugins:
        check_api(plugin, name)
        _register(pm, plugin, name)
    _check_pending(pm)  # a misspelled hook fails at start-up, naming the plugin
    if os.environ.get(ENV_TRACE):
        pm.trace.root.setwriter(lambda msg: sys.stderr.write(msg))
        pm.enable_tracing()
    return pm


def _load_entry_points(pm: HarnessPluginManager, third_party: bool, keep_going: bool = False) -> None:
    from importlib import metadata

    seen: set[str] = set()
    for dist in metadata.distributions():
        dist_name = dist.metadata["name"] or "?"
        # The first distribution of a name on sys.path wins, as in importlib.metadata.entry_points()
        # (a stale egg-info in the working directory must not shadow-duplicate the installed one).
        if _normalize(dist_name) in seen:
            continue
        seen.add(_normalize(dist_name))
        for ep in dist.entry_points:
            if ep.group != hookspecs.PROJECT_NAME:
                continue
            if not third_party and _normalize(dist_name) != _normalize(BUILTIN_DISTRIBUTION):
                continue
            if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
                if pm.is_blocked(ep.name):
                    continue
                owner = _package_of(pm, pm.get_plugin(ep.name))
                raise PluginError(
                    f"two plugins are named {ep.name!r}: one from {owner} and one from "
                    f"{dist_name} {dist.version}; entry-point names must be unique"
                )
            try:
                plugin = ep.load()
            except Exception as exc:  # re-raise naming the culprit, like pytest does
                why = f"{type(exc).__name__}: {exc}"
                if keep_going:
                    pm.broken[ep.name] = f"{dist_name} {dist.version} ({ep.value}): {why}"
                    continue
                raise PluginError(
                    f"error importing plugin {ep.name!r} ({ep.value}) from {dist_name} {dist.version}: {why}. "
                    f"Block it with {ENV_BLOCK}={ep.name} (e.g. `{ENV_BLOCK}={ep.name} harness run ...`), or uninstall it "
                    f"(pip uninstall {dist_name}); `harness list` shows every plugin that loads"
                ) from exc
            try:
                check_api(plugin, ep.name, f" from {dist_name} {dist.version}")
            except PluginError as exc:
                if keep_going:
                    pm.broken[ep.name] = f"{dist_name} {dist.version} ({ep.value}): {exc}"
                    continue
                raise
            _register(pm, plugin, ep.name, f" from {dist_name} {dist.version}")
            pm.packages[ep.name] = f"{dist_name} {dist.version}"


def check_api(plugin: object, name: str, origin: str = "") -> None:
    """Refuse a plugin that declares (``SNN_HARNESS_API = "MAJOR.MINOR"``) a plugin API this
    harness does not provide: another major version, or a newer minor one.

    :raises PluginError: what the plugin needs, what this harness has, and what to do.
    """
    from harness import API_VERSION, __version__

    wanted = getattr(plugin, "SNN_HARNESS_API", None)
    if wanted is None:
        return
    have = tuple(int(p) for p in API_VERSION.split("."))
    try:
        need = tuple(int(p) for p in str(wanted).split("."))
        if len(need) != 2:
            raise ValueError
    except ValueError:
        raise PluginError(f"plugin {name!r}{origin}: SNN_HARNESS_API = {wanted!r} is not a version \"MAJOR.MINOR\" "
                          f"(this harness's plugin API is {API_VERSION})") from None
    if need[0] != have[0] or need[1] > have[1]:
        advice = ("a newer snn-harness" if need > have else "an older snn-harness, or a version of the plugin for API "
                  f"{have[0]}.x")
        raise PluginError(f"plugin {name!r}{origin} is written for plugin API {wanted}; snn-harness {__version__} has "
                          f"API {API_VERSION}: install {advice} (docs/plugins.md, \"Versions\")")


def _register(pm: pluggy.PluginManager, plugin: object, name: str, origin: str = "") -> None:
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {name!r}{origin}: {exc}") from exc
    except ValueError as exc:  # registered twice under one name
        raise PluginError(f"plugin {name!r}{origin}: {exc}") from exc


def _check_pending(pm: pluggy.PluginManager) -> None:
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        name = pm.get_name(exc.plugin) or repr(exc.plugin)
        what = str(exc).replace(f" in plugin {exc.plugin!r}", "")
        raise PluginError(f"plugin {name!r}: {what} (not a hook of snn_harness; see docs/plugins.md)") from exc


def _normalize(dist_name: str) -> str:
    return dist_name.lower().replace("_", "-").replace(".", "-")


def _package_of(pm: HarnessPluginManager, plugin: object) -> str:
    return pm.packages.get(pm.get_name(plugin) or "", "(not installed)")


def build_registry(pm: HarnessPluginManager) -> Registry:
    """Call every ``register_*`` hook once per plugin, each with a registrar bound to that plugin."""
    registry = Registry()
    registry.plugins = getattr(pm, "settings", PluginSettings())
    for kind, hook_name in KINDS.items():
        hook = getattr(pm.hook, hook_name)
        for impl in hook.get_hookimpls():
            others = [p for p in pm.get_plugins() if p is not impl.plugin]
            caller = pm.subset_hook_caller(hook_name, remove_plugins=others)
            registrar = Registrar(registry.table(kind), impl.plugin_name, _package_of(pm, impl.plugin))
            caller(registry=registrar)
    return registry.freeze()


def register_observers(pm: pluggy.PluginManager) -> None:
    """Let each plugin add its observer objects to ``pm`` (once per invocation)."""
    for impl in pm.hook.register_observers.get_hookimpls():
        others = [p for p in pm.get_plugins() if p is not impl.plugin]
        pm.subset_hook_caller("register_observers", remove_plugins=others)(
            observers=ObserverRegistrar(pm, impl.plugin_name)
        )
    _check_pending(pm)  # a misspelled lifecycle hook on an observer fails here, not silently


def plugin_hooks(pm: pluggy.PluginManager) -> list[tuple[str, str, list[str]]]:
    """``(plugin name, distribution, hooks it implements)`` for every plugin registered in
    ``pm``, observers included once :func:`register_observers` ran (their name is
    ``<plugin>.<name>``), in registration order; the distribution (``"name version"``) is the one
    whose entry point loaded it (an observer: its plugin's), else ``"(registered from code)"``."""
    dists: dict[str, str] = dict(getattr(pm, "packages", {}))  # what get_plugin_manager loaded
    rows = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:  # blocked
            continue
        hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])
        dist = dists.get(name) or dists.get(name.split(".", 1)[0]) or "(registered from code)"
        rows.append((name, dist, hooks))
    return rows


def get_registry(**kwargs: Any) -> Registry:
    """The registry of every installed plugin (a fresh one per call). See :func:`get_plugin_manager`."""
    return build_registry(get_plugin_manager(**kwargs))


# ---------------------------------------------------------------------------------------------
# Factory signatures -> user options
# ---------------------------------------------------------------------------------------------


def _options_of(
    factory: Callable[..., Any], injected: frozenset[str]
) -> tuple[dict[str, OptionInfo], bool, frozenset[str]]:
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return {}, True, frozenset()
    try:
        hints = typing.get_type_hints(target, include_extras=True)  # Annotated constraints kept
    except Exception:  # unresolved forward references: no type checks, names still checked
        hints = {}
    options: dict[str, OptionInfo] = {}
    any_option = False
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            any_option = True
            continue
        if p.kind is p.VAR_POSITIONAL or p.name in injected:
            continue
        options[p.name] = OptionInfo(p.name, hints.get(p.name, inspect.Parameter.empty), p.default)
    return options, any_option, frozenset(injected & set(sig.parameters))


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Annotated:  # float, in (0, 1]
        from harness.validate import Constraint

        base, *meta = typing.get_args(annotation)
        said = [m.describe() for m in meta if isinstance(m, Constraint)]
        return _type_name(base) + (f" ({', '.join(said)})" if said else "")
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if isinstance(annotation, type) and typing.get_origin(annotation) is None:
        return annotation.__name__
    return str(annotation).replace("typing.", "")
