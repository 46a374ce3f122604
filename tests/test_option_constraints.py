"""Value ranges of options, declared with ``typing.Annotated`` (``harness.Range``,
``harness.Length``) by the harness's settings and by plugins alike, checked when a matrix is
loaded (so ``--dry-run`` reports them with file and key); and the devices, checked before the
first cell where the cells will run."""

from __future__ import annotations

import math
from typing import Annotated, Literal

import pytest

from harness import Length, Range
from harness.errors import ConfigError, HarnessError
from harness.matrix import load_matrix
from harness.registry import Registrar, Registry
from harness.validate import ConstraintError, check, describe

BASE = """
[defaults]
dataset = "digits"
model = "vgg_small"
normalizer = "vanilla_bn"
trainer = "bptt"
epochs = 1
batch_size = 16
time_steps = 2
device = "cpu"
"""


def test_range_ends_open_and_closed_lists_and_nan():
    unit = Range(0.0, 1.0, low_open=True)
    assert unit.describe() == "in (0, 1]"
    for ok in (1e-9, 0.5, 1.0):
        unit.check(ok)
    for bad in (0.0, -0.1, 1.0000001, math.nan):
        with pytest.raises(ConstraintError, match=r"must be in \(0, 1\]"):
            unit.check(bad)
    assert Range(1).describe() == "at least 1" and Range(0, low_open=True).describe() == "more than 0"
    assert Range(high=1, high_open=True).describe() == "less than 1" and Range(high=2).describe() == "at most 2"
    Range(1).check([1, 2, 3])
    with pytest.raises(ConstraintError, match=r"every item must be at least 1, got \[8, 0\]"):
        Range(1).check([8, 0])
    Range(1).check(None)  # an omitted optional value
    with pytest.raises(ValueError, match="low 2 is above high 1"):
        Range(2, 1)


def test_length_and_annotated_hints_through_check():
    hint = Annotated[list[int], Length(min=1), Range(1)]
    assert describe(hint) == "a list of an integer (at least 1 item, at least 1)"  # the type, then each constraint
    assert check([4, 8], hint) == [4, 8]
    with pytest.raises(ConstraintError, match=r"must have at least 1 item, got \[\]"):
        check([], hint)
    with pytest.raises(TypeError, match="expected a list of an integer"):  # the type is checked first
        check("8", hint)
    assert Length(2, 2).describe() == "exactly 2 items" and Length(1, 3).describe() == "1 to 3 items"
    ratio = Annotated[float, Range(1.0, low_open=True)] | Literal["none"]  # a constraint inside a union
    assert check("none", ratio) == "none" and check(20, ratio) == 20.0
    with pytest.raises(ConstraintError, match="must be more than 1, got 0.5"):
        check(0.5, ratio)


def _third_party_norm(num_features: int, momentum: Annotated[float, Range(0.0, 1.0)] = 0.1,
                      groups: Annotated[int, Range(1, 8)] = 2):
    """A plugin's normalizer with declared ranges."""


def test_a_third_party_plugins_declared_ranges_are_checked_at_load(write_toml):
    from harness.registry import get_registry

    real = get_registry()
    reg = Registry()
    for kind in ("dataset", "model", "threshold", "trainer", "loss"):
        for name in real.table(kind):
            info = real.info(kind, name)
            Registrar(reg.table(kind), info.plugin, info.package).add(name, info.factory, step_modes=info.step_modes)
    Registrar(reg.table("normalizer"), "my_plugin", "my-plugin 1.0").add("group_norm", _third_party_norm)
    reg.freeze()
    text = BASE.replace('"vanilla_bn"', '"group_norm"')
    path = write_toml(text + "[options.normalizer.group_norm]\ngroups = 9\n")
    with pytest.raises(ConfigError) as err:
        load_matrix(path, reg)
    assert str(err.value) == (f"{path} [options.normalizer.group_norm]: option 'groups' of normalizer 'group_norm': "
                              "must be in [1, 8], got 9")
    axis = write_toml(text + '[matrix]\n"options.normalizer.group_norm.momentum" = [0.5, 1.5]\n', "axis.toml")
    with pytest.raises(ConfigError, match=r"axis.toml \[matrix\] axis 'options.normalizer.group_norm.momentum': option 'momentum' of normalizer 'group_norm': must be in \[0, 1\], got 1.5"):
        load_matrix(axis, reg)
    assert load_matrix(write_toml(text + "[options.normalizer.group_norm]\ngroups = 8\n", "ok.toml"), reg).cells[0].config.normalizer.options["groups"] == 8


@pytest.mark.parametrize(("extra", "message"), [
    ("[options.normalizer.vanilla_bn]\nmomentum = 5.0\n",
     r"\[options.normalizer.vanilla_bn\]: option 'momentum' of normalizer 'vanilla_bn': must be in \(0, 1\], got 5.0"),
    ("[defaults.optimizer]\nlr = -0.1\n", r"\[defaults\]: key 'optimizer.lr': must be more than 0, got -0.1"),
    ("[options.model.vgg_small]\nchannels = []\n",
     r"\[options.model.vgg_small\]: option 'channels' of model 'vgg_small': must have at least 1 item, got \[\]"),
    ("[options.model.vgg_small]\nchannels = [8, 0]\n", r"option 'channels' of model 'vgg_small': every item must be at least 1"),
    ("[defaults.neuron]\ntau = 0.5\n", r"key 'neuron.tau': must be at least 1, got 0.5"),
    ("[options.threshold.ots]\ntheta = 0\n", r"option 'theta' of threshold 'ots': must be more than 0, got 0"),
    ("[options.normalizer.osr]\nfallback_ratio = 0.5\n", r"option 'fallback_ratio' of normalizer 'osr': must be more than 1, got 0.5"),
    ("[options.loss.tet]\nmse_weight = 2\n", r"option 'mse_weight' of loss 'tet': must be in \[0, 1\], got 2"),
])
def test_the_built_in_plugins_ranges_name_file_section_and_key(write_toml, extra, message):
    from harness.registry import get_registry

    with pytest.raises(ConfigError, match=message):
        load_matrix(write_toml(BASE + extra), get_registry())


def test_dry_run_reports_a_range_with_exit_4_and_list_shows_the_ranges(write_toml, capsys):
    from harness.cli import ExitCode, main

    path = write_toml(BASE + "[options.normalizer.vanilla_bn]\nmomentum = 5.0\n")
    assert main(["run", "--matrix", str(path), "--dry-run"]) == ExitCode.USAGE_ERROR
    err = capsys.readouterr().err
    assert f"{path} [options.normalizer.vanilla_bn]: option 'momentum'" in err and "Traceback" not in err
    assert main(["list", "--kind", "normalizer"]) == ExitCode.OK
    out = " ".join(capsys.readouterr().out.split())
    assert "momentum: float (in (0, 1]) = 0.1" in out.replace("│ ", "").replace(" │", "")


def test_a_device_that_is_not_here_fails_the_preflight_before_any_cell(write_toml, tmp_path, capsys):
    from harness.cli import main
    from harness.registry import get_registry
    from harness.session import check_devices

    path = write_toml(BASE.replace('device = "cpu"', 'device = "cuda:7"') + "[matrix]\nseed = [0, 1]\n")
    matrix = load_matrix(path, get_registry())
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a GPU cuda:7")
    with pytest.raises(HarnessError, match=r"cell \[seed=0\]: device 'cuda:7' requested but"):
        check_devices(matrix)
    check_devices(matrix, cuda=False)  # a Ray node probe leaves CUDA to the driver
    code = main(["run", "--matrix", str(path), "--results", str(tmp_path / "results"), "--executor", "serial"])
    err = capsys.readouterr().err
    assert code != 0 and "cell [seed=0]: device 'cuda:7' requested but" in err and "Traceback" not in err
    assert not list((tmp_path / "results").glob("*/summary.csv"))  # no cell started
