"""Read a matrix TOML file, validate it, and expand it into cells. Pure: no torch import.

Schema (every key is checked; errors name the file, the section, the key and what was expected)::

    name = "fmnist"                 # optional; defaults to the file name without .toml
    description = "..."             # optional

    [defaults]                      # one value per CellConfig field (see harness.config);
                                    # `seeds = [0, 1, 2]` is shorthand for a seed axis
    dataset = "fashion_mnist"
    model = "vgg_small"
    normalizer = "vanilla_bn"
    trainer = "bptt"
    epochs = 3
    batch_size = 64
    time_steps = 4
    device = "auto"                 # "cpu", "cuda", "cuda:1"; precision = "float32" | "bfloat16" | "float16";
                                    # deterministic = false; cudnn_benchmark = true; compile = false
    [defaults.optimizer]            # name (timm's: sgd, adamw, lamb, ...), lr, momentum, weight_decay,
                                    # nesterov, betas, eps, filter_bias_and_bn
    [defaults.lr_schedule]          # name = "cosine" | "step" | "multistep" | "plateau" | ..., min_lr,
                                    # warmup_epochs, warmup_lr, per_iteration, ...
    [defaults.neuron]               # tau, reset, surrogate_alpha, detach_reset
    [defaults.ema]                  # decay (0: none), warmup, buffers = "average" | "copy"
    [defaults.mixup]                # mixup_alpha, cutmix_alpha (both 0: none), prob, switch_prob, mode, label_smoothing

    [matrix]                        # axes: any default (dotted for nested) or a plugin option
    normalizer = ["vanilla_bn", "osr"]
    seed = [0, 1, 2]
    "optimizer.lr" = [0.1, 0.05]
    "options.normalizer.osr.momentum" = [0.1, 0.2]

    [[exclude]]                     # drop every cell matching all keys (a list matches any of its values)
    normalizer = "osr"
    seed = 2

    [[override]]                    # other values for the cells matching `where` (as [[exclude]] matches)
    where = { normalizer = "osr", threshold = "fixed" }
    "optimizer.weight_decay" = 2e-4 # keys as the axes name them; not an axis of [matrix]

    [[difference]]                  # a paired comparison `harness report` makes (harness.differences)
    name = "osr_minus_vanilla"      # a - b by seed, its 95% interval and verdict, the gap per epoch
    a = { normalizer = "osr" }      # each side: axis values that pick one configuration
    b = { normalizer = "vanilla_bn" }

    [options.normalizer.osr]        # options of one plugin, checked against its factory's signature
    momentum = 0.1

    [tracking]
    uri = "http://127.0.0.1:5000"   # default: sqlite:///<results>/mlflow.db (or $MLFLOW_TRACKING_URI)
    experiment = "snn-harness"

    [execution]                     # how the cells run (flags of `harness run` override these)
    executor = "ray"                # "serial" (default) | "ray"
    cpus_per_cell = 1               # ray: also the cell's torch threads
    gpus_per_cell = 0.5             # ray: two cells per GPU
    max_concurrent = 8              # ray: cells in flight at once (--jobs)
    max_retries = 2                 # ray: retries of a cell whose worker died, from its checkpoint
    address = "auto"                # ray: join the running cluster (default: start a local instance)

Values are checked against the type hints of :class:`harness.config.CellConfig` and of the plugin
factories, ``typing.Annotated`` constraints included (:class:`harness.validate.Range`,
:class:`harness.validate.Length`: a momentum in (0, 1], a positive learning rate, a non-empty
channel list). On the command line, ``--only key=value`` selects cells and ``--set key=value``
overrides ``[defaults]`` / ``[options...]``; both take the keys the axes take, read the value as
TOML (a bare word is a string) and check it as the file's values are checked.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import tomllib
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from harness import validate
from harness.config import (
    COMPONENT_KINDS,
    CellConfig,
    Component,
    cell_id,
    flatten,
    plugin_components,
)
from harness.errors import ConfigError, IncompatibleCellError, UnknownNameError, close_matches
from harness.differences import Difference, check_against, read_differences

TOP_KEYS = ("name", "description", "defaults", "matrix", "exclude", "override", "difference", "options", "tracking", "execution")
NESTED = {f.name: f.type for f in dataclasses.fields(CellConfig) if f.name in ("optimizer", "lr_schedule", "neuron", "ema", "mixup")}
_HINTS = typing.get_type_hints(CellConfig, include_extras=True)
_DEFAULT_COMPONENTS = {"threshold": "fixed", "membrane_norm": "none", "loss": "tet"}
_POSITIVE = ("epochs", "batch_size", "time_steps", "train_subset", "eval_batch_size", "max_train_batches", "max_eval_batches")
_MODE_WORDS = {"single": "one step at a time", "sequence": "on the whole sequence"}


class Catalog(Protocol):
    """What the matrix needs to know of the plugins (``harness.registry.Registry`` is one)."""

    def info(self, kind: str, name: str) -> Any: ...

    def names(self, kind: str) -> list[str]: ...


@dataclass(frozen=True)
class TrackingConfig:
    uri: str | None = None
    experiment: str = "snn-harness"


EXECUTORS = ("ray", "serial")


@dataclass(frozen=True)
class ExecutionConfig:
    """How the cells run: ``[execution]`` in the matrix file; ``harness run`` flags override it.

    ``serial`` runs them one after another in this process; ``ray`` runs each as a Ray task,
    as many at a time as the resources allow (``gpus_per_cell`` and ``cpus_per_cell`` each, at
    most ``max_concurrent``), on a local Ray instance or the cluster at ``address``.
    """

    executor: str = "serial"
    address: str | None = None  # ray: "auto" or "<head>:6379" joins a cluster (not ray://); unset starts a local instance
    max_concurrent: int | None = None  # ray: cells in flight at once (default: as many as fit)
    gpus_per_cell: float | None = None  # ray: default 1 where the cluster has GPUs, else 0; fractions share a GPU
    cpus_per_cell: int | None = None  # ray: CPUs (and torch threads) per cell; default 1, or the CPUs per GPU
    max_retries: int = 2  # ray: a cell whose worker died is retried this often, from its checkpoint
    checkpoint_dir: str | None = None  # where cells checkpoint; default <results>/<matrix>/checkpoints
    dashboard: bool = False  # ray: start the Ray dashboard (on 127.0.0.1) with the local instance

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            hint = close_matches(self.executor, EXECUTORS)
            raise ConfigError(f"executor {self.executor!r} is not known" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                              + f"; known executors: {', '.join(EXECUTORS)}")
        for key in ("max_concurrent", "cpus_per_cell"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{key} must be at least 1, got {value}")
        if self.max_retries < 0:
            raise ConfigError(f"max_retries must be 0 or more, got {self.max_retries}")
        if self.address is not None and self.address.startswith("ray://"):
            raise ConfigError(
                f"address {self.address!r}: Ray Client (ray://) cannot stream a cell's events back; run `harness run` on "
                "a node of the cluster with address = \"auto\" (or the head's <host>:6379)"
            )
        if self.gpus_per_cell is not None:
            if not 0 <= self.gpus_per_cell <= 1:
                raise ConfigError(
                    f"gpus_per_cell = {self.gpus_per_cell}: a cell uses at most one GPU (a fraction such as "
                    "0.25 lets four cells share one); a cell spanning several GPUs runs under torchrun with the serial executor"
                )

    def override(self, **flags: Any) -> ExecutionConfig:
        """This config with the flags that were given (not None) put over it."""
        return dataclasses.replace(self, **{k: v for k, v in flags.items() if v is not None})


@dataclass(frozen=True)
class Cell:
    """One point of the matrix: a resolved config, its id, and why it is skipped (if it is)."""

    id: str
    index: int
    config: CellConfig
    axes: dict[str, Any]  # the axis values that made this cell
    skip_reason: str | None = None

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.axes.items()) or "default"


@dataclass(frozen=True)
class Matrix:
    name: str
    path: str
    description: str
    axes: dict[str, list[Any]]
    cells: list[Cell]  # runnable, after excludes and filters
    skipped: list[Cell]  # impossible combinations, each with its reason
    excluded: int  # cells dropped by [[exclude]]
    filtered_out: int  # cells dropped by --only
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    differences: list[Difference] = field(default_factory=list)  # [[difference]]: what `harness report` pairs


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: matrix file not found") from None
    except IsADirectoryError:
        found = sorted(p.name for p in path.glob("*.toml"))[:5]
        raise ConfigError(f"{path} is a directory, not a matrix file" + (
            f"; its TOML files: {', '.join(found)}" if found else "")) from None
    except PermissionError:
        raise ConfigError(f"{path}: the matrix file cannot be read (permission denied)") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text (UTF-8) file, not a matrix: {exc.reason} at byte {exc.start}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _later_options(info: Any) -> dict[str, Any]:
    """The options ``info``'s factory marks ``AddedLater``, with their original values."""
    later = {}
    for option in getattr(info, "options", {}).values():
        marked, original = validate.later_original(option.annotation)
        if marked:
            later[option.name] = original
    return later


def load_matrix(path: str | Path, catalog: Catalog, only: Sequence[str] = (), sets: Sequence[str] = ()) -> Matrix:
    """Read, validate and expand the matrix file at ``path``.

    :param only: ``key=value`` filters (``--only``); the same key given twice matches either value.
        Values are read as TOML and checked against the key's type (``time_steps=four`` is an error).
    :param sets: ``key=value`` settings (``--set``) over the file's ``[defaults]`` and
        ``[options...]``, keys as the matrix's axes name them (``epochs``, ``optimizer.lr``,
        ``options.model.vgg_small.channels``), values read as TOML and checked as the file's are.
    :raises ConfigError: bad file, key, type, option or plugin name (nothing has trained yet).
    :raises IncompatibleCellError: every selected cell is impossible.
    """
    data = read_toml(path)
    if not sets:
        return expand(data, catalog, source=str(path), only=only)
    data = apply_sets(data, sets, str(path))
    try:
        return expand(data, catalog, source=str(path), only=only)
    except ConfigError as exc:  # a bad value from --set: say where it came from
        culprit = next((item for item in sets if _names(str(exc), item.partition("=")[0].strip())), None)
        if culprit is None:
            raise
        raise ConfigError(f"{exc} (from --set {culprit})") from None


def _names(message: str, key: str) -> bool:
    parts = key.split(".")
    if parts[0] == "options" and len(parts) == 4:
        return f"option {parts[3]!r} of {parts[1]} {parts[2]!r}" in message
    return f"key {key!r}" in message or f"axis {key!r}" in message


def apply_sets(data: dict[str, Any], sets: Sequence[str], source: str) -> dict[str, Any]:
    """``data`` with each ``key=value`` of ``sets`` written into ``[defaults]`` (or the plugin's
    ``[options.<kind>.<plugin>]``); a copy, the file's tables unchanged.

    :raises ConfigError: a malformed item, an unknown key, or a key the ``[matrix]`` varies.
    """
    data = copy.deepcopy(data)
    defaults = data.setdefault("defaults", {})
    if not isinstance(defaults, dict):
        return data  # expand() names the problem
    axes = set(_read_axes(data.get("matrix", {}), source))
    for item in sets:
        key, text = _key_value("--set", item, "epochs=1")
        if not _axis_path_ok(key):
            hint = close_matches(key, [*_axis_paths_hint().split(", ")])
            raise ConfigError(f"--set {item!r}: unknown key {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                              + f"; a key is one of: {_axis_paths_hint()}")
        if key in axes or (key == "seed" and "seeds" in defaults):
            where = "[defaults] seeds" if key == "seed" and key not in axes else "[matrix]"
            raise ConfigError(f"--set {item!r}: {source} varies {key!r} ({where}); --only {key}=<value> "
                              "selects among its values")
        value = parse_cli_value(text)
        parts = key.split(".")
        if parts[0] == "options":
            table = data.setdefault("options", {})
            for part in parts[1:3]:
                table = table.setdefault(part, {}) if isinstance(table, dict) else table
            if not isinstance(table, dict):
                raise ConfigError(f"--set {item!r}: {source} [options.{parts[1]}.{parts[2]}] is not a table")
            table[parts[3]] = value
        elif len(parts) == 2:
            table = defaults.setdefault(parts[0], {})
            if not isinstance(table, dict):
                raise ConfigError(f"--set {item!r}: {source} [defaults] key {parts[0]!r} is {table!r}, not a table")
            table[parts[1]] = value
        else:
            defaults[key] = value
    return data


def expand(data: dict[str, Any], catalog: Catalog, *, source: str, only: Sequence[str] = ()) -> Matrix:
    _check_keys(data, TOP_KEYS, f"{source}", "top level")
    name = data.get("name", Path(source).stem)
    if not isinstance(name, str) or not name or any(c in name for c in "/\\"):
        raise ConfigError(f"{source}: key 'name' must be a non-empty string without slashes, got {name!r}")
    defaults = data.get("defaults")
    if not isinstance(defaults, dict):
        raise ConfigError(f"{source}: missing table [defaults] (dataset, model, normalizer, trainer, epochs, ...)")
    _check_keys(defaults, [f.name for f in dataclasses.fields(CellConfig)] + ["seeds"], source, "[defaults]")

    axes = _read_axes(data.get("matrix", {}), source)
    if "seeds" in defaults:  # shorthand: `seeds = [0, 1, 2]` in [defaults] is a seed axis
        defaults = dict(defaults)
        seeds = defaults.pop("seeds")
        if "seed" in defaults or "seed" in axes:
            raise ConfigError(f"{source}: [defaults] key 'seeds' cannot be combined with 'seed' in [defaults] or [matrix]")
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise ConfigError(f"{source}: [defaults] key 'seeds' must be a non-empty list of integers, got {seeds!r}")
        axes = {"seed": seeds, **axes}
    excludes = _read_excludes(data.get("exclude", []), source)
    overrides_rules = _read_overrides(data.get("override", []), source, axes)
    differences = read_differences(data.get("difference"), source, axes)
    options = _read_options(data.get("options", {}), catalog, source)
    for key, values in axes.items():  # an option axis names a real plugin and option, with good values
        if key.startswith("options."):
            _, kind, plugin, opt = key.split(".", 3)
            try:
                info = catalog.info(kind, plugin)
            except UnknownNameError as exc:
                raise ConfigError(f"{source}: [matrix] axis {key!r}: {exc}") from None
            for value in values:
                _check_option(info, opt, value, f"{source} [matrix] axis {key!r}")
    filters = _parse_only(only, catalog)
    tracking = validate.build_dataclass(TrackingConfig, data.get("tracking", {}), f"{source} [tracking]")
    try:
        execution = validate.build_dataclass(ExecutionConfig, data.get("execution", {}), f"{source} [execution]")
    except ConfigError as exc:
        if str(exc).startswith(source):
            raise
        raise ConfigError(f"{source} [execution]: {exc}") from None

    cells: list[Cell] = []
    skipped: list[Cell] = []
    seen: dict[str, Cell] = {}
    excluded = filtered = 0
    rule_hits = [0] * len(excludes)
    override_hits = [0] * len(overrides_rules)
    for index, combo in enumerate(itertools.product(*axes.values()) if axes else [()]):
        overrides = dict(zip(axes, combo))
        raw, raw_options = copy.deepcopy(defaults), copy.deepcopy(options)
        _set_values(raw, raw_options, overrides, source, "axis")
        config = _resolve(raw, raw_options, catalog, source, set(axes))
        flat = flatten(config)
        matching = [i for i, rule in enumerate(overrides_rules) if all(_matches(flat, k, v, overrides) for k, v in rule.where.items())]
        if matching:  # matched on the cell as the axes make it; then its values are replaced
            setters: dict[str, int] = {}
            for i in matching:
                override_hits[i] += 1
                for key in overrides_rules[i].values:
                    if key in setters:
                        raise ConfigError(
                            f"{source}: [[override]] number {setters[key] + 1} and number {i + 1} both set {key!r} "
                            f"for the cell with {_combo_text(overrides)}: make their `where` exclusive")
                    setters[key] = i
                _set_values(raw, raw_options, overrides_rules[i].values, source, f"[[override]] number {i + 1} key")
            sections = {key: f"[[override]] number {i + 1}" for key, i in setters.items()}
            config = _resolve(raw, raw_options, catalog, source, set(axes), sections)
            flat = flatten(config)
        hits = [all(_matches(flat, k, v, overrides) for k, v in rule.items()) for rule in excludes]
        for i, hit in enumerate(hits):
            rule_hits[i] += hit
        if any(hits):
            excluded += 1
            continue
        if not all(any(_is(flat, k, v) for v in values) for k, values in filters.items()):
            filtered += 1
            continue
        cid = cell_id(config)
        reason = _incompatibility(config, catalog)
        if cid in seen:
            reason = f"same resolved configuration as cell [{seen[cid].label}]"
        cell = Cell(id=cid, index=index, config=config, axes=overrides, skip_reason=reason)
        seen.setdefault(cid, cell)
        (skipped if reason else cells).append(cell)

    for i, hits in enumerate(rule_hits, 1):
        if not hits:  # a typo in a rule would otherwise train the cells it meant to drop
            raise ConfigError(f"{source}: [[exclude]] number {i} ({_rule_text(excludes[i - 1])}) matches no cell of the matrix")
    for i, hits in enumerate(override_hits, 1):
        if not hits and not filters:  # (with --only, the cells it is for may just not be selected)
            raise ConfigError(f"{source}: [[override]] number {i} (where {_rule_text(overrides_rules[i - 1].where)}) "
                              "matches no cell of the matrix")
    matrix = Matrix(
        name=name,
        path=source,
        description=str(data.get("description", "")),
        axes=axes,
        cells=cells,
        skipped=skipped,
        excluded=excluded,
        filtered_out=filtered,
        tracking=tracking,
        execution=execution,
        differences=differences,
    )
    if differences and not filters:  # (with --only, a side's cells may just not be selected)
        check_against(differences, [c.axes for c in cells], source)
    if not cells and skipped:
        reasons = "\n".join(f"  - [{c.label}]: {c.skip_reason}" for c in skipped)
        raise IncompatibleCellError(f"{source}: every selected cell is impossible:\n{reasons}")
    return matrix


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


def _check_keys(table: Any, allowed: Iterable[str], source: str, section: str) -> None:
    allowed = list(allowed)
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: {section} must be a table, got {table!r}")
    for key in table:
        if key not in allowed:
            hint = close_matches(key, allowed)
            raise ConfigError(
                f"{source}: unknown key {key!r} in {section}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f"; expected one of: {', '.join(allowed)}"
            )


def _axis_path_ok(path: str) -> bool:
    parts = path.split(".")
    if len(parts) == 1:
        return parts[0] in {f.name for f in dataclasses.fields(CellConfig)}
    if parts[0] == "options":
        return len(parts) == 4 and parts[1] in COMPONENT_KINDS
    if len(parts) == 2 and parts[0] in NESTED:
        return parts[1] in {f.name for f in dataclasses.fields(_HINTS[parts[0]])}
    return False


def _axis_paths_hint() -> str:
    nested = [f"{n}.{f.name}" for n in NESTED for f in dataclasses.fields(_HINTS[n])]
    top = [f.name for f in dataclasses.fields(CellConfig)]
    return ", ".join(top + nested) + ", options.<kind>.<plugin>.<option>"


def _read_axes(table: Any, source: str) -> dict[str, list[Any]]:
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [matrix] must be a table of axes, got {table!r}")
    axes: dict[str, list[Any]] = {}
    for key, values in table.items():
        if isinstance(values, dict):  # [matrix.optimizer] lr = [...]  -> "optimizer.lr"
            for sub, v in values.items():
                axes.update(_read_axes({f"{key}.{sub}": v}, source))
            continue
        if not _axis_path_ok(key):
            hint = close_matches(key, _axis_paths_hint().split(", "))
            raise ConfigError(
                f"{source}: unknown axis {key!r} in [matrix]"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f"; an axis is one of: {_axis_paths_hint()}"
            )
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{source}: [matrix] axis {key!r} must be a non-empty list of values, got {values!r}")
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"{source}: [matrix] axis {key!r} repeats a value: {values!r}")
        axes[key] = values
    return axes


def _read_excludes(rules: Any, source: str, what: str = "") -> list[dict[str, list[Any]]]:
    if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
        raise ConfigError(f"{source}: [[exclude]] must be an array of tables, got {rules!r}")
    out = []
    for i, rule in enumerate(rules, 1):
        section = what or f"[[exclude]] number {i}"
        if not rule:
            raise ConfigError(f"{source}: {section} is empty (it would exclude every cell)")
        for key in rule:
            if key in NESTED or not _axis_path_ok(key) and key.split(".")[0] not in COMPONENT_KINDS:
                raise ConfigError(
                    f"{source}: unknown key {key!r} in {section}; a key is one of: {_axis_paths_hint()}"
                )
        out.append({k: v if isinstance(v, list) else [v] for k, v in rule.items()})
    return out


@dataclass(frozen=True)
class _Override:
    where: dict[str, list[Any]]  # as an [[exclude]] rule
    values: dict[str, Any]  # axis path -> value


def _read_overrides(rules: Any, source: str, axes: dict[str, list[Any]]) -> list[_Override]:
    """``[[override]]`` tables: ``where`` (an inline table matched as ``[[exclude]]`` matches) and
    the values to set, keyed as the axes are (``"optimizer.weight_decay"``, or nested tables)."""
    if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
        raise ConfigError(f"{source}: [[override]] must be an array of tables, got {rules!r}")
    out = []
    for i, rule in enumerate(rules, 1):
        section = f"[[override]] number {i}"
        rule = dict(rule)
        where = rule.pop("where", None)
        if not isinstance(where, dict) or not where:
            raise ConfigError(f"{source}: {section} needs `where`, an inline table of what the cells to change match "
                              '(e.g. where = { normalizer = "osr", threshold = "fixed" })')
        (matched,) = _read_excludes([where], source, what=f"{section} `where`")
        if not rule:
            raise ConfigError(f"{source}: {section} sets nothing: add the keys to set, named as the axes are")
        values: dict[str, Any] = {}
        for key, value in _flat_keys(rule):
            if not _axis_path_ok(key) or key == "seed":
                hint = close_matches(key, _axis_paths_hint().split(", "))
                raise ConfigError(
                    f"{source}: unknown key {key!r} in {section}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                    + f"; a key is one of: {_axis_paths_hint()} (not seed)")
            if key in axes:
                raise ConfigError(f"{source}: {section} sets {key!r}, an axis of [matrix]: an override cannot replace "
                                  "an axis's values (it would make cells the axis already has); exclude cells instead")
            values[key] = value
        out.append(_Override(matched, values))
    return out


def _flat_keys(table: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    """``{"optimizer": {"weight_decay": 2e-4}}`` (TOML's reading of a dotted key) as
    ``("optimizer.weight_decay", 2e-4)``; a quoted dotted key is already flat. (A table is never
    a value here: ``optimizer = {...}`` sets its keys, it does not replace [defaults.optimizer].)"""
    for key, value in table.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flat_keys(value, path + ".")
        else:
            yield path, value


def _set_values(raw: dict[str, Any], raw_options: dict[str, Any], values: dict[str, Any], source: str, what: str) -> None:
    """Put axis-path values into a cell's raw ``[defaults]`` and ``[options]`` before resolution."""
    for key, value in values.items():
        if key.startswith("options."):
            _, kind, plugin, opt = key.split(".", 3)
            raw_options.setdefault(kind, {}).setdefault(plugin, {})[opt] = value
        elif "." in key:
            head, sub = key.split(".", 1)
            if not isinstance(raw.setdefault(head, {}), dict):
                raise ConfigError(
                    f"{source}: [defaults] key {head!r} must be a table ([defaults.{head}]) "
                    f"for the {what} {key!r}, got {raw[head]!r}"
                )
            raw[head][sub] = value
        else:
            raw[key] = value


def _combo_text(combo: dict[str, Any]) -> str:
    return ", ".join(f"{k} = {v!r}" for k, v in combo.items()) or "the defaults"


def _rule_text(rule: dict[str, list[Any]]) -> str:
    return ", ".join(f"{k} = {v[0]!r}" if len(v) == 1 else f"{k} = {v!r}" for k, v in rule.items())


def _read_options(table: Any, catalog: Catalog, source: str) -> dict[str, dict[str, dict[str, Any]]]:
    _check_keys(table, COMPONENT_KINDS, source, "[options] (plugin kinds)")
    for kind, plugins in table.items():
        if not isinstance(plugins, dict):
            raise ConfigError(f"{source}: [options.{kind}] must hold one table per {kind} name")
        for plugin, opts in plugins.items():
            section = f"[options.{kind}.{plugin}]"
            try:
                info = catalog.info(kind, plugin)
            except UnknownNameError as exc:
                raise ConfigError(f"{source}: {section}: {exc}") from None
            if not isinstance(opts, dict):
                raise ConfigError(f"{source}: {section} must be a table of options, got {opts!r}")
            for key, value in opts.items():
                _check_option(info, key, value, f"{source} {section}")
    return table


def _check_option(info: Any, key: str, value: Any, where: str) -> Any:
    opt = info.options.get(key)
    if opt is None:
        if info.accepts_any_option:
            return value
        known = ", ".join(o.describe() for o in info.options.values()) or "(it takes no options)"
        hint = close_matches(key, info.options)
        raise ConfigError(
            f"{where}: unknown option {key!r} of {info.kind} {info.name!r}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + f"; its options: {known}"
        )
    try:
        return validate.check(value, opt.annotation)
    except (TypeError, validate.ConstraintError) as exc:
        raise ConfigError(f"{where}: option {key!r} of {info.kind} {info.name!r}: {exc}") from None


def _resolve(
    raw: dict[str, Any], options: dict[str, Any], catalog: Catalog, source: str, axes: set[str],
    sections: dict[str, str] | None = None,
) -> CellConfig:
    """``sections``: keys set by an ``[[override]]`` -> its name, for the error messages."""
    sections = sections or {}

    def where(key: str) -> str:
        for k, section in sections.items():
            if k == key or k.startswith(key + "."):
                return f"{source} {section}"
        from_axis = any(a == key or a.startswith(key + ".") for a in axes)
        return f"{source} [{'matrix' if from_axis else 'defaults'}]"

    kwargs: dict[str, Any] = {}
    for kind in COMPONENT_KINDS:
        name = raw.get(kind, _DEFAULT_COMPONENTS.get(kind))
        if kind == "membrane_norm" and name == "none" and "none" not in catalog.names(kind):
            kwargs[kind] = Component("none")  # the plain LIF, also where the built-in plugins are not loaded
            continue
        if name is None:
            raise ConfigError(f"{where(kind)}: missing required key {kind!r} (the name of a {kind} plugin)")
        if not isinstance(name, str):
            raise ConfigError(f"{where(kind)}: key {kind!r} must be the name of a {kind} plugin, got {name!r}")
        try:
            info = catalog.info(kind, name)
        except UnknownNameError as exc:
            raise ConfigError(f"{where(kind)}: key {kind!r}: {exc}") from None
        user = options.get(kind, {}).get(name, {})
        resolved = info.defaults()
        for key, value in user.items():
            path = f"options.{kind}.{name}.{key}"
            from_axis = path in axes
            section = f"{source} {sections[path]}" if path in sections else (
                f"{source} [{'matrix' if from_axis else f'options.{kind}.{name}'}]")
            resolved[key] = _check_option(info, key, value, section)
        missing = [o.name for o in info.options.values() if o.required and o.name not in resolved]
        if missing:
            raise ConfigError(
                f"{source}: {kind} {name!r} needs option(s) {', '.join(map(repr, missing))}: "
                f"set them in [options.{kind}.{name}]"
            )
        kwargs[kind] = Component(name, resolved, _later_options(info))

    for key, value in raw.items():
        if key in COMPONENT_KINDS:
            continue
        hint = _HINTS[key]
        if key in NESTED:
            kwargs[key] = validate.build_dataclass(hint, value, where(key), prefix=f"{key}.")
            if key == "lr_schedule" and kwargs[key].name == "plateau" and kwargs[key].per_iteration:
                raise ConfigError(f"{where(key)}: key 'lr_schedule.per_iteration': the plateau schedule watches the test "
                                  "top-1, once an epoch: it cannot advance per iteration")
            continue
        try:
            kwargs[key] = validate.check(value, hint)
        except (TypeError, validate.ConstraintError) as exc:
            raise ConfigError(f"{where(key)}: key {key!r}: {exc}") from None
        if key in _POSITIVE and kwargs[key] is not None and kwargs[key] < 1:
            raise ConfigError(f"{where(key)}: key {key!r} must be at least 1, got {kwargs[key]!r}")
    for f in dataclasses.fields(CellConfig):
        if f.name not in kwargs and f.default is dataclasses.MISSING:
            raise ConfigError(f"{source} [defaults]: missing required key {f.name!r} ({validate.describe(_HINTS[f.name])})")
    return CellConfig(**kwargs)


def _incompatibility(config: CellConfig, catalog: Catalog) -> str | None:
    infos = {kind: catalog.info(kind, name) for kind, name in plugin_components(config)
             if kind in ("trainer", "normalizer", "threshold", "membrane_norm", "model")}
    kinds = [k for k in ("normalizer", "threshold", "membrane_norm", "model") if k in infos]
    modes = set(infos["trainer"].step_modes)
    for kind in kinds:
        info = infos[kind]
        if not modes & set(info.step_modes):
            need = " or ".join(_MODE_WORDS[m] for m in sorted(info.step_modes))
            runs = " or ".join(_MODE_WORDS[m] for m in sorted(infos["trainer"].step_modes))
            return f"{kind} {info.name!r} runs only {need}, but trainer {infos['trainer'].name!r} runs {runs}"
        modes &= set(info.step_modes)
    return _carry_needs_hard_reset(config, infos.get("membrane_norm")) or _mixing_needs_soft_targets(config, catalog)


def _declared(info: Any, options: dict[str, Any], key: str, default: Any) -> Any:
    """A component's setting: the cell's option, else the option's default, else the factory's
    class attribute, else ``default`` (known without building the component)."""
    if key in options:
        return options[key]
    option = info.options.get(key)
    if option is not None and not option.required:
        return option.default
    return getattr(info.factory, key, default)


def _carry_needs_hard_reset(config: CellConfig, info: Any) -> str | None:
    if info is None:
        return None
    carry = _declared(info, config.membrane_norm.options, "carry", "normalized")
    if carry == "raw" and config.neuron.reset == "soft":
        return (f"membrane_norm {info.name!r} with carry = 'raw' needs the hard reset (the neuron goes on with the "
                "potential before the normalization; a soft reset would subtract a threshold of the normalized scale "
                "from it), but neuron.reset is 'soft'")
    return None


def _mixing_needs_soft_targets(config: CellConfig, catalog: Catalog) -> str | None:
    if not (config.mixup.mixup_alpha or config.mixup.cutmix_alpha):
        return None
    factory = catalog.info("loss", config.loss.name).factory
    if isinstance(factory, type) and not getattr(factory, "soft_targets", False):
        return (f"mixup/cutmix give soft targets, but loss {config.loss.name!r} does not take them "
                "(a SequenceLoss declares soft_targets = True)")
    return None


# ---------------------------------------------------------------------------------------------
# Filters
# ---------------------------------------------------------------------------------------------

_MISSING = object()


def lookup(flat: dict[str, Any], path: str) -> Any:
    """The value at ``path`` (an axis path or a flattened name) in a flattened config."""
    if path in COMPONENT_KINDS:
        return flat[f"{path}.name"]
    if path.startswith("options."):
        _, kind, plugin, opt = (path.split(".", 3) + ["", "", ""])[:4]
        if flat.get(f"{kind}.name") != plugin:
            return _MISSING
        return flat.get(f"{kind}.{opt}", _MISSING)
    return flat.get(path, _MISSING)


def _matches(flat: dict[str, Any], path: str, wanted: Any, axes: dict[str, Any] | None = None) -> bool:
    """The cell has ``wanted`` (or one of a list) at ``path``: the value its axis gave it where
    ``path`` is an axis (so an option axis of a plugin the cell does not use still tells its cells
    apart), its resolved value otherwise."""
    if axes is not None and path in axes:
        values = wanted if isinstance(wanted, list) else [wanted]
        return any(validate.same_value(axes[path], w) for w in values)
    value = lookup(flat, path)
    if value is _MISSING:
        return False
    values = wanted if isinstance(wanted, list) else [wanted]
    return any(validate.same_value(value, w) for w in values)


def _is(flat: dict[str, Any], path: str, wanted: Any) -> bool:
    """The cell's value at ``path`` is ``wanted`` (one value: a list is a list, not alternatives)."""
    value = lookup(flat, path)
    return value is not _MISSING and validate.same_value(value, wanted)


def parse_cli_value(text: str) -> Any:
    """A value given on the command line, read as TOML (``4``, ``0.1``, ``true``, ``[8, 16]``,
    ``"a b"``); a bare word that is not TOML is the string itself (``osr``, ``cpu``)."""
    text = text.strip()
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def hint_of(path: str, catalog: Catalog) -> Any:
    """The type hint of an axis path (``time_steps``, ``optimizer.lr``,
    ``options.model.vgg_small.channels``), or ``Any`` where the path does not fix one."""
    parts = path.split(".")
    if len(parts) == 1:
        return str if path in COMPONENT_KINDS else _HINTS.get(path, Any)
    if parts[0] == "options" and len(parts) == 4:
        try:
            opt = catalog.info(parts[1], parts[2]).options.get(parts[3])
        except UnknownNameError:
            return Any
        return opt.annotation if opt is not None else Any
    if len(parts) == 2 and parts[0] in NESTED:
        return typing.get_type_hints(_HINTS[parts[0]], include_extras=True).get(parts[1], Any)
    return Any  # normalizer.momentum: whichever normalizer the cell has


def _typed(text: str, hint: Any) -> Any:
    value = parse_cli_value(text)
    if isinstance(value, str) and value.lower() == "none":
        try:
            return validate.check(None, hint)
        except (TypeError, validate.ConstraintError):
            pass
    return validate.check(value, hint)


def _key_value(flag: str, item: str, example: str) -> tuple[str, str]:
    """``key=value`` of a command-line ``flag`` as ``(key, value text)``."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{flag} {item!r}: expected key=value, e.g. {flag} {example}")
    return key.strip(), value


def _parse_only(only: Sequence[str], catalog: Catalog) -> dict[str, list[Any]]:
    filters: dict[str, list[Any]] = {}
    for item in only:
        key, value = _key_value("--only", item, "normalizer=vanilla_bn")
        if not _axis_path_ok(key) and key.split(".")[0] not in COMPONENT_KINDS:
            raise ConfigError(f"--only {item!r}: unknown key {key!r}; a key is one of: {_axis_paths_hint()}")
        hint = hint_of(key, catalog)
        if hint is Any:
            filters.setdefault(key, []).append(value.strip())  # matched as the cell's value reads
            continue
        try:
            typed = _typed(value, hint)
        except (TypeError, validate.ConstraintError) as exc:
            raise ConfigError(f"--only {item!r}: {exc}") from None
        filters.setdefault(key, []).append(typed)
    return filters
