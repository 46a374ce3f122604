"""The registry: built-ins arrive through the entry points, names are checked, errors list names."""

from __future__ import annotations

import types
import typing

import pytest
import torch
from torch import nn

from harness import get_registry, hookimpl
from harness.errors import PluginError, UnknownNameError
from harness.registry import build_registry, get_plugin_manager


def test_builtins_are_registered_through_the_entry_point_group(registry):
    assert "vanilla_bn" in registry.normalizers
    assert "fixed" in registry.thresholds
    assert "bptt" in registry.trainers
    assert "tet" in registry.losses
    assert "vgg_small" in registry.models
    assert {"digits", "fashion_mnist"} <= set(registry.datasets)
    info = registry.normalizers.info("vanilla_bn")
    assert info.plugin == "normalizers"
    assert info.package.startswith("snn-harness ")


def test_normalizer_factory_builds_a_module_with_options(registry):
    bn = registry.normalizers["vanilla_bn"](num_features=64, momentum=0.2)
    assert isinstance(bn, nn.Module)
    assert bn.running_mean.shape == (64,) and bn.momentum == 0.2


def test_unknown_name_lists_known_names_and_suggests(registry):
    with pytest.raises(UnknownNameError, match=r"unknown normalizer 'vanila_bn'; known normalizers: bntt, osr, tab, tdbn, tebn, vanilla_bn.*did you mean 'vanilla_bn'"):
        registry.normalizers["vanila_bn"]
    with pytest.raises(KeyError):  # a mapping still behaves like one
        registry.trainers["nope"]


def test_options_are_read_from_the_factory_signature(registry):
    info = registry.normalizers.info("vanilla_bn")
    assert set(info.options) == {"eps", "momentum", "affine"}  # num_features is injected
    momentum = info.options["momentum"].annotation
    assert typing.get_args(momentum)[0] is float and typing.get_args(momentum)[1].describe() == "in (0, 1]"  # Annotated
    assert info.options["momentum"].describe() == "momentum: float (in (0, 1]) = 0.1"
    assert info.defaults() == {"eps": 1e-4, "momentum": 0.1, "affine": True}
    assert registry.trainers.info("bptt").step_modes == frozenset({"sequence"})


def _plugin(name: str, **hooks):
    module = types.ModuleType(name)
    for hook_name, fn in hooks.items():
        setattr(module, hook_name, fn)
    return module


def test_duplicate_name_is_an_error_naming_both_plugins():
    @hookimpl
    def register_normalizers(registry):
        registry.add("vanilla_bn", nn.Identity)

    pm = get_plugin_manager(extra_plugins=[(_plugin("dup", register_normalizers=register_normalizers), "my_dup_plugin")])
    with pytest.raises(PluginError, match=r"normalizer 'vanilla_bn' is registered twice: by plugin '(normalizers|my_dup_plugin)'.*and by plugin '(normalizers|my_dup_plugin)'"):
        build_registry(pm)


def test_bad_registrations_are_rejected():
    @hookimpl
    def register_thresholds(registry):
        registry.add("not valid!", nn.Identity)

    pm = get_plugin_manager(extra_plugins=[(_plugin("bad", register_thresholds=register_thresholds), "bad")])
    with pytest.raises(PluginError, match=r"plugin 'bad': threshold name 'not valid!' must be a Python identifier"):
        build_registry(pm)

    @hookimpl
    def register_normalizers(registry):
        registry.add("weird", nn.Identity, step_modes=["sometimes"])

    pm = get_plugin_manager(extra_plugins=[(_plugin("bad2", register_normalizers=register_normalizers), "bad2")])
    with pytest.raises(PluginError, match=r"step_modes \['sometimes'\]"):
        build_registry(pm)


def test_misspelled_hook_fails_at_start_up():
    @hookimpl
    def register_normalisers(registry):  # British spelling: not a hook
        pass

    with pytest.raises(PluginError, match=r"plugin 'typo': unknown hook 'register_normalisers'.*not a hook of snn_harness"):
        get_plugin_manager(extra_plugins=[(_plugin("typo", register_normalisers=register_normalisers), "typo")])


def test_registry_is_frozen_and_fresh_per_call():
    a, b = get_registry(), get_registry()
    assert a is not b
    with pytest.raises(PluginError, match="frozen"):
        from harness.registry import Registrar

        Registrar(a.normalizers, "late", "?").add("late_bn", nn.Identity)


def test_blocking_a_plugin_by_name(monkeypatch):
    monkeypatch.setenv("SNN_HARNESS_BLOCK_PLUGINS", "thresholds")
    reg = get_registry()
    assert len(reg.thresholds) == 0
    assert "vanilla_bn" in reg.normalizers


def test_registry_entries_are_usable_end_to_end(registry):
    from harness.snn import LayerFactory, LIFNeuron, run_sequence

    layers = LayerFactory(
        normalizer=lambda c: registry.normalizers["vanilla_bn"](num_features=c),
        neuron=lambda: LIFNeuron(registry.thresholds["fixed"]()),
    )
    model = registry.models["vgg_small"](in_channels=1, num_classes=10, input_size=(8, 8), layers=layers, channels=[4, 8])
    out = run_sequence(model, torch.randn(3, 5, 1, 8, 8))
    assert out.shape == (3, 5, 10)


def test_a_second_copy_of_a_distribution_on_sys_path_is_not_a_duplicate(tmp_path):
    """A stale ``*.egg-info`` of the project in the working directory shadows, never duplicates."""
    import subprocess
    import sys
    from importlib import metadata

    info = tmp_path / "snn_harness-0.0.0.dist-info"
    info.mkdir()
    info.joinpath("METADATA").write_text("Metadata-Version: 2.1\nName: snn-harness\nVersion: 0.0.0\n")
    info.joinpath("entry_points.txt").write_text(
        metadata.distribution("snn-harness").read_text("entry_points.txt")
    )
    code = "from harness import get_registry; print(sorted(get_registry(autoload=True).normalizers))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "vanilla_bn" in out.stdout


def test_hook_calls_can_be_traced(monkeypatch, capsys):
    monkeypatch.setenv("SNN_HARNESS_TRACE_PLUGINS", "1")
    get_registry()
    err = capsys.readouterr().err
    assert "register_normalizers" in err and "register_datasets" in err


def test_misspelled_observer_hook_is_reported_not_ignored():
    from harness.registry import register_observers

    class Observer:
        @hookimpl
        def on_epoch_ended(self, cell, epoch, metrics):  # not a hook: on_epoch_end
            pass

    @hookimpl
    def register_observers_impl(observers):
        observers.add(Observer(), "watcher")

    plugin = _plugin("obs")
    plugin.register_observers = register_observers_impl
    pm = get_plugin_manager(extra_plugins=[(plugin, "obs")])
    with pytest.raises(PluginError, match=r"on_epoch_ended.*not a hook of snn_harness"):
        register_observers(pm)


@pytest.mark.parametrize("value,third_party", [("1", False), ("yes", False), ("0", True), ("false", True), ("", True)])
def test_disable_autoload_values(monkeypatch, value, third_party):
    import harness.registry as reg

    seen = {}
    monkeypatch.setattr(reg, "_load_entry_points", lambda pm, tp, keep_going=False: seen.setdefault("third_party", tp))
    monkeypatch.setenv("SNN_HARNESS_DISABLE_PLUGIN_AUTOLOAD", value)
    get_plugin_manager()
    assert seen["third_party"] is third_party


def test_normalizers_that_take_time_steps_receive_the_cells_T(registry):
    from harness.config import CellConfig, Component
    from harness.registry import Registry, Registrar
    from harness.runner import build_model
    from snn_harness_plugins.datasets import digits

    built = []

    class PerStepBN(nn.Module):
        """Normalizer with per-step parameters."""

        def __init__(self, num_features: int, time_steps: int, eps: float = 1e-5):
            super().__init__()
            built.append(time_steps)

        def forward(self, x):
            return x

    reg = Registry()
    for kind in ("threshold", "model", "dataset", "trainer", "loss"):
        for name in registry.table(kind):
            info = registry.info(kind, name)
            Registrar(reg.table(kind), info.plugin, info.package).add(name, info.factory)
    Registrar(reg.normalizers, "t", "t").add("per_step", PerStepBN)
    info = reg.normalizers.info("per_step")
    assert set(info.options) == {"eps"} and info.takes("time_steps") and not info.takes("num_classes")
    cfg = CellConfig(dataset=Component("digits"), model=Component("vgg_small", {"channels": [4, 8]}),
                     normalizer=Component("per_step", {"eps": 1e-5}), trainer=Component("bptt"),
                     epochs=1, batch_size=4, time_steps=6)
    build_model(cfg, reg, digits())
    assert built == [6, 6]


def _declaring(api):
    import types

    from harness import hookimpl

    plugin = types.ModuleType("versioned_plugin")
    plugin.SNN_HARNESS_API = api

    @hookimpl
    def register_normalizers(registry):
        pass

    plugin.register_normalizers = register_normalizers
    return plugin


def test_a_plugin_declaring_the_plugin_api_loads_when_the_major_agrees_and_its_minor_is_not_newer():
    import harness
    from harness import PluginError, get_plugin_manager

    major, minor = (int(p) for p in harness.API_VERSION.split("."))
    for ok in (f"{major}.0", harness.API_VERSION):
        pm = get_plugin_manager(extra_plugins=[(_declaring(ok), "versioned")])
        assert pm.get_plugin("versioned") is not None
    with pytest.raises(PluginError, match=rf"plugin 'versioned' is written for plugin API {major + 1}\.0; snn-harness "
                                          rf"{harness.__version__} has API {harness.API_VERSION}: install a newer snn-harness"):
        get_plugin_manager(extra_plugins=[(_declaring(f"{major + 1}.0"), "versioned")])
    with pytest.raises(PluginError, match=rf"written for plugin API {major}\.{minor + 1};.*install a newer snn-harness"):
        get_plugin_manager(extra_plugins=[(_declaring(f"{major}.{minor + 1}"), "versioned")])
    if major > 0:
        with pytest.raises(PluginError, match=rf"install an older snn-harness, or a version of the plugin for API {major}\.x"):
            get_plugin_manager(extra_plugins=[(_declaring(f"{major - 1}.9"), "versioned")])
    with pytest.raises(PluginError, match=r"SNN_HARNESS_API = 'one' is not a version \"MAJOR.MINOR\""):
        get_plugin_manager(extra_plugins=[(_declaring("one"), "versioned")])


def test_an_installed_plugin_for_another_api_is_listed_as_broken_with_the_reason(tmp_path, monkeypatch):
    import harness
    from harness import get_plugin_manager

    site = tmp_path / "site"
    info = site / "future_plugin-3.0.dist-info"
    info.mkdir(parents=True)
    info.joinpath("METADATA").write_text("Metadata-Version: 2.1\nName: future-plugin\nVersion: 3.0\n")
    info.joinpath("entry_points.txt").write_text("[snn_harness]\nfuture = future_module\n")
    major = int(harness.API_VERSION.split(".")[0])
    site.joinpath("future_module.py").write_text(f'SNN_HARNESS_API = "{major + 1}.0"\n')
    monkeypatch.syspath_prepend(str(site))
    pm = get_plugin_manager(autoload=True, keep_going=True)
    assert pm.get_plugin("future") is None
    assert pm.broken["future"].startswith("future-plugin 3.0 (future_module): plugin 'future' from future-plugin 3.0 "
                                          f"is written for plugin API {major + 1}.0")
    with pytest.raises(harness.PluginError, match="is written for plugin API"):
        get_plugin_manager(autoload=True)
