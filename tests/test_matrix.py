"""Matrix files: validation (each bad input names file, key and expectation), expansion,
excludes, skip reasons and --only. Uses a fake catalog: the matrix needs no torch."""

from __future__ import annotations

import subprocess
import sys
from typing import Annotated, Literal

import pytest

from harness import AddedLater, Range
from harness.config import CellConfig, cell_id, flatten, from_dict, to_dict
from harness.errors import ConfigError, IncompatibleCellError
from harness.matrix import load_matrix
from harness.registry import Registrar, Registry


def _norm(num_features: int, momentum: float = 0.1, mode: Literal["renorm", "linear"] = "renorm"):
    """A normalizer that runs either way."""


def _seq_norm(num_features: int, alpha: float = 1.0):
    """A normalizer that needs the whole sequence."""


def _fixed(theta: float = 1.0):
    """Fixed threshold."""


def _bptt(max_grad_norm: float = 0.0):
    """Whole-sequence trainer."""


def _online(update: Literal["sequence", "step"] = "sequence"):
    """Step-by-step trainer."""


def _loss(mse_weight: float = 0.05):
    """Loss."""


def _net(in_channels, num_classes, input_size, layers, channels: list[int] = [8]):  # noqa: B006
    """Model."""


def _toy(root: str = "data", needed: int | None = None):
    """Data."""


@pytest.fixture
def catalog() -> Registry:
    reg = Registry()

    def add(kind, name, factory, **kw):
        Registrar(reg.table(kind), "fake", "fake-plugins 0.0").add(name, factory, **kw)

    add("normalizer", "bn", _norm)
    add("normalizer", "seqnorm", _seq_norm, step_modes={"sequence"})
    add("threshold", "fixed", _fixed)
    add("trainer", "bptt", _bptt, step_modes={"sequence"})
    add("trainer", "online", _online, step_modes={"single"})
    add("loss", "tet", _loss)
    add("model", "net", _net)
    add("dataset", "toy", _toy)
    return reg.freeze()


BASE = """
[defaults]
dataset = "toy"
model = "net"
normalizer = "bn"
trainer = "bptt"
epochs = 2
batch_size = 16
time_steps = 4
"""


def test_matrix_module_does_not_import_torch():
    code = "import sys, harness.matrix, harness.config, harness.registry; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_defaults_only_gives_one_resolved_cell(write_toml, catalog):
    m = load_matrix(write_toml(BASE), catalog)
    assert m.name == "matrix" and len(m.cells) == 1 and not m.skipped
    cfg = m.cells[0].config
    assert isinstance(cfg, CellConfig)
    assert cfg.normalizer.name == "bn" and cfg.normalizer.options == {"momentum": 0.1, "mode": "renorm"}
    assert cfg.threshold.name == "fixed" and cfg.loss.name == "tet"  # defaults
    assert cfg.optimizer.name == "sgd" and cfg.optimizer.momentum == 0.9 and cfg.lr_schedule.name == "cosine"
    assert m.cells[0].label == "default"


def test_axes_expand_as_a_product_with_stable_ids(write_toml, catalog):
    text = BASE + """
[matrix]
seed = [0, 1, 2]
time_steps = [2, 4]
"optimizer.lr" = [0.1, 0.05]
"""
    m = load_matrix(write_toml(text), catalog)
    assert len(m.cells) == 12
    assert len({c.id for c in m.cells}) == 12
    assert m.cells[0].axes == {"seed": 0, "time_steps": 2, "optimizer.lr": 0.1}
    assert m.cells[-1].config.optimizer.lr == 0.05
    again = load_matrix(write_toml(text, "copy.toml"), catalog)
    assert [c.id for c in again.cells] == [c.id for c in m.cells]  # ids are hashes of configs, not of files


def test_cell_config_is_plain_picklable_and_round_trips(write_toml, catalog):
    import pickle

    cfg = load_matrix(write_toml(BASE), catalog).cells[0].config
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert from_dict(to_dict(cfg)) == cfg
    flat = flatten(cfg)
    assert flat["normalizer.name"] == "bn" and flat["normalizer.momentum"] == 0.1 and flat["optimizer.lr"] == 0.1
    assert cell_id(cfg) == load_matrix(write_toml(BASE, "b.toml"), catalog).cells[0].id


def _catalog_with_bn(factory) -> Registry:
    reg = Registry()
    for kind, name, f, kw in [("normalizer", "bn", factory, {}), ("threshold", "fixed", _fixed, {}),
                              ("trainer", "bptt", _bptt, {"step_modes": {"sequence"}}), ("loss", "tet", _loss, {}),
                              ("model", "net", _net, {}), ("dataset", "toy", _toy, {})]:
        Registrar(reg.table(kind), "fake", "fake-plugins 0.0").add(name, f, **kw)
    return reg.freeze()


def _norm_v2(num_features: int, momentum: float = 0.1, mode: Literal["renorm", "linear"] = "renorm",
             warmup: Annotated[int, Range(0), AddedLater(0)] = 0, scale: Annotated[tuple[float, ...], AddedLater((1.0,))] = (1.0,)):
    """``_norm`` with two options added later, each marked with what the cells before it ran with."""


def _norm_v2_unmarked(num_features: int, momentum: float = 0.1, mode: Literal["renorm", "linear"] = "renorm",
                      warmup: int = 0, scale: tuple[float, ...] = (1.0,)):
    """The same options added without the mark."""


def test_an_option_marked_added_later_keeps_the_ids_of_cells_that_leave_it_at_its_original(write_toml, catalog):
    text = BASE + '[matrix]\nseed = [0, 1]\n"options.normalizer.bn.momentum" = [0.1, 0.3]\n'
    before = [c.id for c in load_matrix(write_toml(text), catalog).cells]
    v2 = _catalog_with_bn(_norm_v2)
    after = load_matrix(write_toml(text, "v2.toml"), v2).cells
    assert [c.id for c in after] == before  # finished runs and checkpoints found as they were
    assert after[0].config.normalizer.options["warmup"] == 0  # still resolved, logged and passed to the factory
    assert after[0].config.normalizer.later == {"warmup": 0, "scale": (1.0,)}
    assert v2.info("normalizer", "bn").options["warmup"].describe() == (
        "warmup: int (at least 0) = 0 (added later: cell ids leave it out at 0)")  # as `harness list` shows it
    assert "normalizer.warmup" in flatten(after[0].config)
    cfg = after[0].config
    assert from_dict(to_dict(cfg)) == cfg and cell_id(from_dict(to_dict(cfg))) == before[0]  # as Ray ships it
    # the same value given explicitly, or as a list from TOML, is the same cell
    same = load_matrix(write_toml(text + '[options.normalizer.bn]\nwarmup = 0\nscale = [1.0]\n', "v2b.toml"), v2).cells
    assert [c.id for c in same] == before
    # any other value is another cell
    other = load_matrix(write_toml(text + '[options.normalizer.bn]\nwarmup = 3\n', "v2c.toml"), v2).cells
    assert not {c.id for c in other} & set(before) and len({c.id for c in other}) == 4
    scaled = load_matrix(write_toml(text + '[options.normalizer.bn]\nscale = [1.0, 2.0]\n', "v2d.toml"), v2).cells
    assert not {c.id for c in scaled} & set(before)
    # without the mark the new options are hashed: every id changes (why the mark exists)
    unmarked = load_matrix(write_toml(text, "v2e.toml"), _catalog_with_bn(_norm_v2_unmarked)).cells
    assert not {c.id for c in unmarked} & set(before)


def _norm_bad_mark(num_features: int, warmup: Annotated[int, Range(0), AddedLater(-1)] = 0):
    """Marked with an original its own range refuses."""


def test_an_added_later_original_the_option_refuses_is_a_plugin_error():
    from harness.errors import PluginError

    with pytest.raises(PluginError, match=r"plugin 'fake': option 'warmup' of normalizer 'bn' is marked AddedLater\(-1\), "
                                          r"a value the option itself refuses: must be .*got -1"):
        _catalog_with_bn(_norm_bad_mark)


def test_added_later_compares_by_kind_true_is_not_one():
    import dataclasses

    from harness.config import Component

    cfg = CellConfig(dataset=Component("toy"), model=Component("net"), normalizer=Component("bn"),
                     trainer=Component("bptt"), epochs=1, batch_size=2, time_steps=2)
    plain = cell_id(cfg)
    for value, original in [(True, True), (0.5, 0.5), ((1, 2), (1, 2)), ([1, 2], (1, 2)), (None, None)]:
        assert cell_id(dataclasses.replace(cfg, normalizer=Component("bn", {"o": value}, {"o": original}))) == plain
    for value, original in [(1, True), (True, 1), (0, False), (0.5, 0.25), ((1,), (1, 2)), ("a", None)]:
        assert cell_id(dataclasses.replace(cfg, normalizer=Component("bn", {"o": value}, {"o": original}))) != plain, value


def test_plugin_options_and_option_axes(write_toml, catalog):
    text = BASE + """
[matrix]
"options.normalizer.bn.momentum" = [0.1, 0.3]
[options.normalizer.bn]
mode = "linear"
"""
    m = load_matrix(write_toml(text), catalog)
    assert [c.config.normalizer.options for c in m.cells] == [
        {"momentum": 0.1, "mode": "linear"},
        {"momentum": 0.3, "mode": "linear"},
    ]


def test_excludes_drop_matching_cells(write_toml, catalog):
    text = BASE + """
[matrix]
seed = [0, 1]
time_steps = [2, 4, 8]
[[exclude]]
seed = 1
time_steps = [4, 8]
"""
    m = load_matrix(write_toml(text), catalog)
    assert m.excluded == 2
    assert sorted((c.config.seed, c.config.time_steps) for c in m.cells) == [(0, 2), (0, 4), (0, 8), (1, 2)]


def test_an_option_axis_of_a_plugin_a_cell_does_not_use_still_tells_excludes_its_cells_apart(write_toml, catalog):
    """An exclude names the axis value that made the cell: the seqnorm cells of an axis of bn's
    option would otherwise resolve to one configuration twice (a skip), and the rule could not drop them."""
    text = BASE + """
[matrix]
normalizer = ["bn", "seqnorm"]
"options.normalizer.bn.momentum" = [0.1, 0.5]
[[exclude]]
normalizer = "seqnorm"
"options.normalizer.bn.momentum" = 0.5
"""
    m = load_matrix(write_toml(text), catalog)
    assert m.excluded == 1 and not m.skipped
    assert sorted((c.config.normalizer.name, c.config.normalizer.options.get("momentum")) for c in m.cells) == [
        ("bn", 0.1), ("bn", 0.5), ("seqnorm", None)]


def test_incompatible_cells_are_skipped_with_a_reason(write_toml, catalog):
    text = BASE + """
[matrix]
normalizer = ["bn", "seqnorm"]
trainer = ["bptt", "online"]
"""
    m = load_matrix(write_toml(text), catalog)
    assert len(m.cells) == 3
    (skip,) = m.skipped
    assert skip.axes == {"normalizer": "seqnorm", "trainer": "online"}
    assert skip.skip_reason == (
        "normalizer 'seqnorm' runs only on the whole sequence, but trainer 'online' runs one step at a time"
    )


def test_only_impossible_cells_is_an_error_with_the_reason(write_toml, catalog):
    text = BASE + """
[matrix]
normalizer = ["bn", "seqnorm"]
trainer = ["bptt", "online"]
"""
    with pytest.raises(IncompatibleCellError, match=r"every selected cell is impossible:\n.*normalizer 'seqnorm' runs only on the whole sequence"):
        load_matrix(write_toml(text), catalog, only=["normalizer=seqnorm", "trainer=online"])


def test_only_filters_cells(write_toml, catalog):
    text = BASE + """
[matrix]
seed = [0, 1, 2]
normalizer = ["bn", "seqnorm"]
"""
    path = write_toml(text)
    m = load_matrix(path, catalog, only=["seed=1"])
    assert [c.config.seed for c in m.cells] == [1, 1] and m.filtered_out == 4
    m = load_matrix(path, catalog, only=["seed=0", "seed=2", "normalizer=seqnorm"])
    assert sorted(c.config.seed for c in m.cells) == [0, 2] and {c.config.normalizer.name for c in m.cells} == {"seqnorm"}
    m = load_matrix(path, catalog, only=["optimizer.lr=0.1", "normalizer.momentum=0.1"])
    assert len(m.cells) == 3
    m = load_matrix(path, catalog, only=["seed=7"])
    assert m.cells == [] and m.skipped == [] and m.filtered_out == 6
    with pytest.raises(ConfigError, match=r"--only 'seed': expected key=value"):
        load_matrix(path, catalog, only=["seed"])
    with pytest.raises(ConfigError, match=r"--only 'sed=1': unknown key 'sed'"):
        load_matrix(path, catalog, only=["sed=1"])


def test_only_values_are_typed_and_list_options_can_be_matched(write_toml, catalog):
    path = write_toml(BASE + """
[matrix]
time_steps = [2, 4]
"options.model.net.channels" = [[8], [8, 16]]
"optimizer.lr" = [0.1, 0.05]
""")
    m = load_matrix(path, catalog, only=["options.model.net.channels=[8, 16]"])
    assert len(m.cells) == 4 and all(c.config.model.options["channels"] == [8, 16] for c in m.cells)
    m = load_matrix(path, catalog, only=["time_steps=4", "optimizer.lr=0.05"])
    assert [(c.config.time_steps, c.config.optimizer.lr) for c in m.cells] == [(4, 0.05), (4, 0.05)]
    assert len(load_matrix(path, catalog, only=["train_subset=none"]).cells) == 8  # None, as the cells have it
    with pytest.raises(ConfigError, match=r"--only 'time_steps=four': expected an integer, got 'four'"):
        load_matrix(path, catalog, only=["time_steps=four"])
    with pytest.raises(ConfigError, match=r"--only 'options.model.net.channels=8': expected a list of an integer, got 8"):
        load_matrix(path, catalog, only=["options.model.net.channels=8"])
    with pytest.raises(ConfigError, match=r"--only 'optimizer.lr=-1': must be more than 0, got -1"):
        load_matrix(path, catalog, only=["optimizer.lr=-1"])


def test_set_overrides_defaults_and_options_validated_like_the_file(write_toml, catalog):
    path = write_toml(BASE + "[matrix]\nseed = [0, 1]\n")
    m = load_matrix(path, catalog, sets=["epochs=1", "optimizer.lr=0.05", "options.model.net.channels=[4, 8]", "device=cpu",
                                         "options.normalizer.bn.mode=linear"])
    cfg = m.cells[0].config
    assert len(m.cells) == 2 and cfg.epochs == 1 and cfg.optimizer.lr == 0.05 and cfg.device == "cpu"
    assert cfg.model.options["channels"] == [4, 8] and cfg.normalizer.options["mode"] == "linear"
    assert cfg.optimizer.momentum == 0.9  # the rest of the table stays
    assert m.cells[0].label == "seed=0"  # a setting is not an axis
    plain = load_matrix(path, catalog)
    assert plain.cells[0].config.epochs == 2  # the file itself is unchanged
    with pytest.raises(ConfigError, match=r"--set 'epoch=1': unknown key 'epoch' \(did you mean 'epochs'\?\)"):
        load_matrix(path, catalog, sets=["epoch=1"])
    with pytest.raises(ConfigError, match=r"--set 'epochs': expected key=value"):
        load_matrix(path, catalog, sets=["epochs"])
    with pytest.raises(ConfigError, match=r"--set 'seed=3': .* varies 'seed' \(\[matrix\]\); --only seed=<value> selects"):
        load_matrix(path, catalog, sets=["seed=3"])
    with pytest.raises(ConfigError, match=r"key 'epochs': expected an integer, got 'x' \(from --set epochs=x\)"):
        load_matrix(path, catalog, sets=["epochs=x"])
    with pytest.raises(ConfigError, match=r"key 'optimizer.lr': must be more than 0, got -1.0 \(from --set optimizer.lr=-1\)"):
        load_matrix(path, catalog, sets=["optimizer.lr=-1"])
    with pytest.raises(ConfigError, match=r"option 'mode' of normalizer 'bn': expected 'renorm' or 'linear', got 'lin' "
                                          r"\(from --set options.normalizer.bn.mode=lin\)"):
        load_matrix(path, catalog, sets=["options.normalizer.bn.mode=lin"])
    seeds = write_toml(BASE.replace("[defaults]", "[defaults]\nseeds = [0, 1]"), "seeds.toml")
    with pytest.raises(ConfigError, match=r"varies 'seed' \(\[defaults\] seeds\)"):
        load_matrix(seeds, catalog, sets=["seed=0"])


# --------------------------------------------------------------------------------------------
# Each kind of bad input: the message names the file, the key and what was expected.
# --------------------------------------------------------------------------------------------

BAD = [
    (BASE + "\n[matrixx]\n", r"unknown key 'matrixx' in top level \(did you mean 'matrix'\?\)"),
    (BASE.replace("batch_size", "batch_sise"), r"unknown key 'batch_sise' in \[defaults\] \(did you mean 'batch_size'\?\)"),
    (BASE.replace("epochs = 2", 'epochs = "two"'), r"\[defaults\]: key 'epochs': expected an integer, got 'two'"),
    (BASE.replace("epochs = 2", "epochs = 0"), r"\[defaults\]: key 'epochs' must be at least 1, got 0"),
    (BASE.replace("epochs = 2\n", ""), r"\[defaults\]: missing required key 'epochs' \(an integer\)"),
    (BASE.replace('normalizer = "bn"', 'normalizer = "bm"'), r"\[defaults\]: key 'normalizer': unknown normalizer 'bm'; known normalizers: bn, seqnorm"),
    (BASE.replace('normalizer = "bn"', "normalizer = 3"), r"key 'normalizer' must be the name of a normalizer plugin, got 3"),
    (BASE + '\n[matrix]\nnormalizer = ["bn", "xx"]\n', r"\[matrix\]: key 'normalizer': unknown normalizer 'xx'"),
    (BASE + "\n[matrix]\ntime_steps = [2, 2.5]\n", r"\[matrix\]: key 'time_steps': expected an integer, got 2.5"),
    (BASE + "\n[matrix]\ntime_steps = 4\n", r"\[matrix\] axis 'time_steps' must be a non-empty list of values, got 4"),
    (BASE + "\n[matrix]\ntime_step = [4]\n", r"unknown axis 'time_step' in \[matrix\] \(did you mean 'time_steps'\?\)"),
    (BASE + "\n[defaults.optimizer]\nlr = \"fast\"\n", r"\[defaults\]: key 'optimizer.lr': expected a number, got 'fast'"),
    (BASE + "\n[defaults.optimizer]\nname = \"lions\"\n", r"key 'optimizer.name': expected 'sgd' or 'adam' or 'adamw' or .*'lion' or .*, got 'lions'"),
    (BASE + "\n[defaults.neuron]\ntaus = 2.0\n", r"\[defaults\]: unknown key 'neuron.taus' \(did you mean 'neuron.tau'\?\)"),
    (BASE + "\n[options.normalizer.bn]\nmomentun = 0.1\n", r"\[options.normalizer.bn\]: unknown option 'momentun' of normalizer 'bn' \(did you mean 'momentum'\?\); its options: momentum: float = 0.1"),
    (BASE + "\n[options.normalizer.bn]\nmode = \"both\"\n", r"\[options.normalizer.bn\]: option 'mode' of normalizer 'bn': expected 'renorm' or 'linear', got 'both'"),
    (BASE + "\n[options.normalizer.zz]\nx = 1\n", r"\[options.normalizer.zz\]: unknown normalizer 'zz'"),
    (BASE + "\n[options.normaliser.bn]\nx = 1\n", r"unknown key 'normaliser' in \[options\] \(plugin kinds\) \(did you mean 'normalizer'\?\)"),
    (BASE + "\n[[exclude]]\nseeds = 1\n", r"unknown key 'seeds' in \[\[exclude\]\] number 1"),
    (BASE + "\n[tracking]\nurl = \"x\"\n", r"\[tracking\]: unknown key 'url' \(did you mean 'uri'\?\)"),
    ("[defaults\n", r"not valid TOML"),
    ("name = 'x'\n", r"missing table \[defaults\]"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_input_names_file_key_and_expectation(write_toml, catalog, text, message):
    path = write_toml(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_matrix(path, catalog)
    assert str(path) in str(info.value)


def test_missing_file_is_a_config_error(tmp_path, catalog):
    with pytest.raises(ConfigError, match="matrix file not found"):
        load_matrix(tmp_path / "nope.toml", catalog)


def test_duplicate_cells_are_skipped_not_run_twice(write_toml, catalog):
    # An axis over an option of a plugin the cells do not use gives identical configs.
    text = BASE + '\n[matrix]\n"options.normalizer.seqnorm.alpha" = [1.0, 2.0]\n'
    m = load_matrix(write_toml(text), catalog)
    assert len(m.cells) == 1 and len(m.skipped) == 1
    assert m.skipped[0].skip_reason.startswith("same resolved configuration as cell")


def test_seeds_in_defaults_is_a_seed_axis(write_toml, catalog):
    m = load_matrix(write_toml(BASE + "seeds = [3, 4]\n"), catalog)
    assert [c.config.seed for c in m.cells] == [3, 4] and m.axes == {"seed": [3, 4]}
    with pytest.raises(ConfigError, match="'seeds' cannot be combined with 'seed'"):
        load_matrix(write_toml(BASE + "seeds = [3, 4]\nseed = 1\n"), catalog)
    with pytest.raises(ConfigError, match="'seeds' must be a non-empty list of integers"):
        load_matrix(write_toml(BASE + "seeds = 3\n"), catalog)


def test_option_axes_are_checked_like_option_tables(write_toml, catalog):
    with pytest.raises(ConfigError, match=r"\[matrix\] axis 'options.normalizer.bnn.momentum': unknown normalizer 'bnn'.*did you mean 'bn'"):
        load_matrix(write_toml(BASE + '\n[matrix]\n"options.normalizer.bnn.momentum" = [0.1, 0.2]\n'), catalog)
    with pytest.raises(ConfigError, match=r"axis 'options.normalizer.bn.momentum'.*expected a number, got 'x'"):
        load_matrix(write_toml(BASE + '\n[matrix]\n"options.normalizer.bn.momentum" = [0.1, "x"]\n'), catalog)
    with pytest.raises(ConfigError, match=r"unknown option 'momentun' of normalizer 'bn'"):
        load_matrix(write_toml(BASE + '\n[matrix]\n"options.normalizer.bn.momentun" = [0.1]\n'), catalog)


def test_exclude_rules_that_match_nothing_are_errors(write_toml, catalog):
    text = BASE + "\n[matrix]\nseed = [0, 1]\n[[exclude]]\nseed = 5\n"
    with pytest.raises(ConfigError, match=r"\[\[exclude\]\] number 1 \(seed = 5\) matches no cell of the matrix"):
        load_matrix(write_toml(text), catalog)
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer' in \[\[exclude\]\] number 1"):
        load_matrix(write_toml(BASE + "\n[matrix]\nseed = [0, 1]\n[[exclude]]\noptimizer = {lr = 0.1}\n"), catalog)


def test_a_nested_axis_over_a_scalar_default_is_a_config_error(write_toml, catalog):
    text = BASE + 'optimizer = "adam"\n[matrix]\n"optimizer.lr" = [0.1, 0.2]\n'
    with pytest.raises(ConfigError, match=r"\[defaults\] key 'optimizer' must be a table \(\[defaults.optimizer\]\) for the axis 'optimizer.lr', got 'adam'"):
        load_matrix(write_toml(text), catalog)


def test_fixed_length_tuples_are_checked(write_toml, catalog):
    with pytest.raises(ConfigError, match=r"key 'optimizer.betas': expected a list of 2 values \(a number, a number\), got \[0.9\]"):
        load_matrix(write_toml(BASE + "\n[defaults.optimizer]\nbetas = [0.9]\n"), catalog)
    m = load_matrix(write_toml(BASE + "\n[defaults.optimizer]\nbetas = [0, 0.5]\n"), catalog)
    assert m.cells[0].config.optimizer.betas == (0.0, 0.5)


def test_resolved_options_do_not_share_the_factorys_default_objects(write_toml, catalog):
    m = load_matrix(write_toml(BASE), catalog)
    channels = m.cells[0].config.model.options["channels"]
    assert channels == [8] and channels is not _net.__defaults__[0]


OVERRIDE = BASE + """
[defaults.optimizer]
lr = 0.1
weight_decay = 5e-4
[matrix]
seed = [0, 1]
normalizer = ["bn", "seqnorm"]
trainer = ["bptt", "online"]
[[exclude]]
trainer = "online"
normalizer = "seqnorm"
"""


def test_an_override_sets_values_for_the_cells_it_matches_only(write_toml, catalog):
    plain = load_matrix(write_toml(OVERRIDE), catalog)
    text = OVERRIDE + """
[[override]]  # a quoted dotted key
where = { normalizer = "bn", trainer = "online" }
"optimizer.weight_decay" = 2e-4
[[override]]  # TOML's dotted keys (nested tables), a plugin option, a list in `where`
where = { normalizer = "seqnorm", seed = [1] }
optimizer.lr = 0.05
options.normalizer.seqnorm.alpha = 2.0
"""
    m = load_matrix(write_toml(text), catalog)
    got = {c.label: (c.config.optimizer.weight_decay, c.config.optimizer.lr, c.config.normalizer.options) for c in m.cells}
    assert got == {
        "seed=0 normalizer=bn trainer=bptt": (5e-4, 0.1, {"momentum": 0.1, "mode": "renorm"}),
        "seed=0 normalizer=bn trainer=online": (2e-4, 0.1, {"momentum": 0.1, "mode": "renorm"}),
        "seed=0 normalizer=seqnorm trainer=bptt": (5e-4, 0.1, {"alpha": 1.0}),
        "seed=1 normalizer=bn trainer=bptt": (5e-4, 0.1, {"momentum": 0.1, "mode": "renorm"}),
        "seed=1 normalizer=bn trainer=online": (2e-4, 0.1, {"momentum": 0.1, "mode": "renorm"}),
        "seed=1 normalizer=seqnorm trainer=bptt": (5e-4, 0.05, {"alpha": 2.0}),
    }
    assert all(c.config.optimizer.momentum == 0.9 for c in m.cells)  # the rest of [defaults.optimizer] stays
    before = {c.label: c.id for c in plain.cells}
    for c in m.cells:  # the cells it leaves alone keep their ids; the others are other cells
        assert (c.id == before[c.label]) == (c.config.optimizer.weight_decay == 5e-4 and c.config.optimizer.lr == 0.1)
    # --only may leave out every cell an override is for
    assert [c.label for c in load_matrix(write_toml(text), catalog, only=["seed=0", "trainer=bptt"]).cells] == [
        "seed=0 normalizer=bn trainer=bptt", "seed=0 normalizer=seqnorm trainer=bptt"]


OVERRIDE_BAD = [
    ('[[override]]\n"optimizer.weight_decay" = 2e-4\n', r"\[\[override\]\] number 1 needs `where`, an inline table"),
    ('[[override]]\nwhere = { normalizer = "bn" }\n', r"\[\[override\]\] number 1 sets nothing"),
    ('[[override]]\nwhere = { normaliser = "bn" }\nepochs = 3\n', r"unknown key 'normaliser' in \[\[override\]\] number 1 `where`"),
    ('[[override]]\nwhere = { normalizer = "bn" }\n"optimizer.weight_decy" = 2e-4\n',
     r"unknown key 'optimizer.weight_decy' in \[\[override\]\] number 1 \(did you mean 'optimizer.weight_decay'\?\)"),
    ('[[override]]\nwhere = { normalizer = "bn" }\ntrainer = "online"\n', r"\[\[override\]\] number 1 sets 'trainer', an axis of \[matrix\]"),
    ('[[override]]\nwhere = { normalizer = "bm" }\nepochs = 3\n', r"\[\[override\]\] number 1 \(where normalizer = 'bm'\) matches no cell"),
    ('[[override]]\nwhere = { normalizer = "bn" }\n"optimizer.weight_decay" = "low"\n',
     r"\[\[override\]\] number 1: key 'optimizer.weight_decay': expected a number, got 'low'"),
    ('[[override]]\nwhere = { normalizer = "bn" }\n"options.normalizer.bn.mode" = "both"\n',
     r"\[\[override\]\] number 1: option 'mode' of normalizer 'bn': expected 'renorm' or 'linear', got 'both'"),
    ('[[override]]\nwhere = { normalizer = "bn" }\nepochs = 3\n[[override]]\nwhere = { trainer = "bptt" }\nepochs = 4\n',
     r"\[\[override\]\] number 1 and number 2 both set 'epochs' for the cell with seed = 0, normalizer = 'bn', trainer = 'bptt'"),
    ('[override]\nwhere = { normalizer = "bn" }\n', r"\[\[override\]\] must be an array of tables"),
]


@pytest.mark.parametrize("extra,message", OVERRIDE_BAD, ids=[f"override{i}" for i in range(len(OVERRIDE_BAD))])
def test_a_bad_override_names_the_file_the_override_and_what_is_wrong(write_toml, catalog, extra, message):
    path = write_toml(OVERRIDE + extra)
    with pytest.raises(ConfigError, match=message) as info:
        load_matrix(path, catalog)
    assert str(path) in str(info.value)
