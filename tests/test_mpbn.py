"""MPBN (membrane potential batch normalization, the ``mpbn`` membrane_norm plugin) against
SpikingJelly's ``MPBNLIFNode`` (live), against a transcription of its authors' neuron step, folded
into a threshold at inference, and in cells (matrix key, online and BPTT, exact resume)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness import get_registry
from harness.config import CellConfig, Component, NeuronConfig, cell_id
from harness.errors import ConfigError, HarnessError
from harness.runner import run_cell
from harness.snn import LIFNeuron, SpikingSequential, ThresholdPolicy, run_sequence, spike

from cell_support import Recorder, interrupted_then_resumed, tiny_cell

T, B, C = 4, 6, 3


@pytest.fixture(scope="module")
def registry():
    return get_registry()


def _mpbn(registry, seed: int = 0, **options):
    mn = registry.membrane_norms["mpbn"](num_features=C, **options)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # not 1 and 0: a wrong affine map or a missing gradient must show
        mn.weight.copy_(torch.rand(C, generator=g) + 0.5)
        mn.bias.copy_(torch.randn(C, generator=g) * 0.3)
    return mn


def _inputs(shape, seed):
    g = torch.Generator().manual_seed(100 + seed)
    return torch.randn(shape, generator=g) * 1.5 + 0.5, torch.randn(shape, generator=g)


def _train(net, x, gout, run):
    x = x.clone().requires_grad_(True)
    s = run(x)
    (s * gout).sum().backward()
    return s.detach(), x.grad


SHAPES = {"image": (T, B, C, 4, 4), "vector": (T, B, C)}


@pytest.mark.parametrize("mode", ["sequence", "single"])
@pytest.mark.parametrize("detach_reset", [True, False])
@pytest.mark.parametrize("reset", ["hard", "soft"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_matches_spikingjelly_mpbn_lif_node(registry, shape, reset, detach_reset, mode):
    """Spikes, input and gamma/beta gradients, running statistics and their count over three
    training sequences, then evaluation: SpikingJelly's MPBNLIFNode (tau 2, sigmoid surrogate 4,
    v_reset 0 for the hard reset, None for the soft) against LIF + mpbn, to 1e-5."""
    sj_neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
    from spikingjelly.activation_based import functional, surrogate

    size = SHAPES[shape]
    sj = sj_neuron.MPBNLIFNode(tau=2.0, decay_input=False, v_threshold=1.0, v_reset=0.0 if reset == "hard" else None,
                               surrogate_function=surrogate.Sigmoid(alpha=4.0), detach_reset=detach_reset, step_mode="m",
                               **({"out_channels": C} if shape == "image" else {"out_features": C}))
    mn = _mpbn(registry)
    with torch.no_grad():
        sj.vbn.weight.copy_(mn.weight)
        sj.vbn.bias.copy_(mn.bias)
    ours = SpikingSequential(LIFNeuron(registry.thresholds["fixed"](), tau=2.0, reset=reset, detach_reset=detach_reset,
                                       membrane_norm=mn))
    assert not ours[0].fused  # the membrane normalization runs in the unfused step
    for seq in range(3):
        x, gout = _inputs(size, seq)
        functional.reset_net(sj)
        sj.train(), ours.train()
        s_ref, gx_ref = _train(sj, x, gout, sj)
        s, gx = _train(ours, x, gout, lambda v: run_sequence(ours, v, mode))
        where = f"sequence {seq + 1}"
        assert torch.equal(s, s_ref), f"{where}: spikes"
        torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{where}, input gradient: {m}")
        for name in ("weight", "bias"):
            torch.testing.assert_close(getattr(mn, name).grad, getattr(sj.vbn, name).grad, rtol=1e-5, atol=1e-5)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(mn, name), getattr(sj.vbn, name), rtol=1e-5, atol=1e-5)
        for p in (mn.weight, mn.bias, sj.vbn.weight, sj.vbn.bias):
            p.grad = None
    assert int(mn.num_batches_tracked) == 3 * T  # a running-statistics update per step
    x, _ = _inputs(size, 9)
    functional.reset_net(sj)
    sj.eval(), ours.eval()
    with torch.no_grad():
        assert torch.equal(run_sequence(ours, x, mode), sj(x)), "evaluation spikes"


class _Recording(ThresholdPolicy):
    """A fixed threshold of 1 that keeps the potentials it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, u, t):
        self.seen.append(u.detach().clone())
        return 1.0


def _authors_step(bn: nn.BatchNorm2d, x, mem, decay, theta=1.0):
    """The authors' ``mem_update`` (github.com/yfguo91/MPBN, models/spike_layer.py) with the
    harness's spike function: charge, BN, fire, and the hard reset of the potential *before* the BN."""
    mem = mem * decay + x
    mem2 = bn(mem)
    s = spike(mem2 - theta, 4.0)
    return mem * (1 - s.detach()), s


def test_raw_carry_is_the_authors_neuron_step(registry):
    """carry = "raw": spikes, gradients and running statistics of the authors' step (their BN
    normalizes, the reset and the next step use the potential before it), over two sequences."""
    mn = _mpbn(registry, carry="raw")
    bn = nn.BatchNorm2d(C)
    with torch.no_grad():
        bn.weight.copy_(mn.weight)
        bn.bias.copy_(mn.bias)
    policy = _Recording()
    ours = SpikingSequential(LIFNeuron(policy, tau=2.0, reset="hard", membrane_norm=mn))
    for seq in range(2):
        x, gout = _inputs(SHAPES["image"], seq)
        s, gx = _train(ours.train(), x, gout, lambda v: run_sequence(ours, v, "sequence"))
        xr = x.clone().requires_grad_(True)
        mem, out = torch.zeros_like(x[0]), []
        for t in range(T):
            mem, st = _authors_step(bn.train(), xr[t], mem, 0.5)
            out.append(st)
        s_ref = torch.stack(out)
        (s_ref * gout).sum().backward()
        assert torch.equal(s, s_ref.detach())
        torch.testing.assert_close(gx, xr.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mn.weight.grad, bn.weight.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mn.running_var, bn.running_var, rtol=1e-5, atol=1e-5)
        for p in (mn.weight, mn.bias, bn.weight, bn.bias):
            p.grad = None
    # the threshold policy sees the normalized potential: at step 1, BN of the input itself
    policy.seen.clear()
    x, _ = _inputs(SHAPES["image"], 5)
    with torch.no_grad():
        run_sequence(ours.eval(), x, "sequence")
    expected = F.batch_norm(x[0], mn.running_mean, mn.running_var, mn.weight, mn.bias, False, 0.0, mn.eps)
    torch.testing.assert_close(policy.seen[0], expected)


class _PerChannel(ThresholdPolicy):
    def __init__(self, theta: torch.Tensor) -> None:
        super().__init__()
        self.theta = theta

    def forward(self, u, t):
        return self.theta.view(1, -1, *[1] * (u.ndim - 2))


def test_raw_carry_folds_into_a_per_channel_threshold_at_inference(registry):
    """In evaluation, LIF + mpbn (carry "raw", hard reset) fires exactly as a plain LIF whose
    threshold is folded_threshold() per channel; a gamma <= 0 refuses to fold."""
    mn = _mpbn(registry, carry="raw")
    net = SpikingSequential(LIFNeuron(registry.thresholds["fixed"](), tau=2.0, reset="hard", membrane_norm=mn))
    for seq in range(2):
        run_sequence(net.train(), _inputs(SHAPES["image"], seq)[0], "sequence")
    net = net.double()  # both sides in float64: the comparison is of the maps, not of roundings
    folded = SpikingSequential(LIFNeuron(_PerChannel(mn.folded_threshold(1.0)), tau=2.0, reset="hard"))
    x = _inputs(SHAPES["image"], 7)[0].double()
    with torch.no_grad():
        s = run_sequence(net.eval(), x, "sequence")
        s_folded = run_sequence(folded.eval(), x, "sequence")
    assert s.sum() > 0 and (1 - s).sum() > 0
    assert torch.equal(s, s_folded)
    with torch.no_grad():
        mn.weight[1] = -0.5
    with pytest.raises(ValueError, match="1 channel.*gamma <= 0"):
        mn.folded_threshold()


def test_raw_carry_refuses_the_soft_reset(registry):
    with pytest.raises(ValueError, match=r"carry = 'raw'.*needs the hard reset.*neuron.reset = \"hard\""):
        LIFNeuron(registry.thresholds["fixed"](), reset="soft", membrane_norm=_mpbn(registry, carry="raw"))


def test_a_raw_carry_cell_with_the_soft_reset_is_skipped_at_load_with_the_reason(registry, tiny_matrix):
    from harness.matrix import load_matrix

    path = tiny_matrix("""
    [defaults.neuron]
    reset = "soft"
    [options.membrane_norm.mpbn]
    carry = "raw"
    [matrix]
    membrane_norm = ["mpbn"]
    "neuron.reset" = ["soft", "hard"]
    """)
    m = load_matrix(path, registry)
    assert [c.config.neuron.reset for c in m.cells] == ["hard"]
    (skip,) = m.skipped
    assert skip.config.neuron.reset == "soft"
    assert "membrane_norm 'mpbn' with carry = 'raw' needs the hard reset" in skip.skip_reason


def test_composes_with_ots_in_both_step_modes(registry):
    """OTS sees the normalized potential and the neuron runs (and agrees) one step at a time
    and on the whole sequence."""
    outs = {}
    for mode in ("single", "sequence"):
        net = SpikingSequential(LIFNeuron(registry.thresholds["ots"](), tau=2.0, membrane_norm=_mpbn(registry)))
        x, g = _inputs(SHAPES["image"], 1)
        outs[mode] = _train(net.train(), x, g, lambda v, net=net, mode=mode: run_sequence(net, v, mode))
    assert torch.equal(outs["single"][0], outs["sequence"][0])
    torch.testing.assert_close(outs["single"][1], outs["sequence"][1])


# -- in cells --------------------------------------------------------------------------------


def _mpbn_cell(trainer: str = "bptt", epochs: int = 1, **options):
    cell = tiny_cell(0, epochs=epochs, batch_size=64)
    cfg = dataclasses.replace(cell.config, trainer=Component(trainer), membrane_norm=Component("mpbn", options),
                              neuron=NeuronConfig(reset="hard" if options.get("carry") == "raw" else "soft"))
    return dataclasses.replace(cell, config=cfg)


@pytest.mark.parametrize("trainer", ["bptt", "online"])
def test_a_cell_with_mpbn_trains_and_resumes_exactly(registry, trainer, tmp_path):
    cell = _mpbn_cell(trainer, epochs=2)
    straight = run_cell(cell, registry, Recorder())
    assert straight.status == "finished", straight.error
    plain = run_cell(dataclasses.replace(cell, config=dataclasses.replace(cell.config, membrane_norm=Component("none"))),
                     registry, Recorder())
    assert straight.metrics["train_loss"] != plain.metrics["train_loss"]  # the BN in the neuron is there
    resumed = interrupted_then_resumed(cell, registry, tmp_path)
    for key in ("train_loss", "train_top1", "test_top1", "test_loss"):
        assert resumed.metrics[key] == straight.metrics[key], key


def test_a_model_that_builds_neurons_without_channels_gets_a_clear_error(registry):
    import types

    from harness import hookimpl
    from harness.build import build_model
    from harness.data import DatasetBundle

    def old_model(in_channels, num_classes, input_size, layers):
        """A model of an older plugin: layers.neuron() without the number of channels."""
        return SpikingSequential(nn.Flatten(), nn.Linear(64, 8), layers.neuron())

    plugin = types.ModuleType("old_models")
    plugin.register_models = hookimpl(lambda registry: registry.add("old_model", old_model))
    reg = get_registry(extra_plugins=[(plugin, "old_models")])
    cfg = dataclasses.replace(_mpbn_cell().config, model=Component("old_model"))
    data = DatasetBundle(train=None, test=None, in_channels=1, num_classes=10, input_size=(8, 8))
    with pytest.raises(HarnessError, match=r"membrane_norm 'mpbn'.*model 'old_model'.*layers.neuron\(C\)"):
        build_model(cfg, reg, data)
    plain = dataclasses.replace(cfg, membrane_norm=Component("none"))
    assert isinstance(build_model(plain, reg, data)[2], LIFNeuron)  # still fine without a membrane normalization


def test_the_matrix_key_its_options_and_unchanged_ids(registry, tiny_matrix):
    from harness.matrix import load_matrix

    m = load_matrix(tiny_matrix("""
        [matrix]
        membrane_norm = ["none", "mpbn"]
        [options.membrane_norm.mpbn]
        momentum = 0.2
        """), registry)
    by_name = {c.config.membrane_norm.name: c for c in m.cells}
    assert set(by_name) == {"none", "mpbn"}
    assert by_name["mpbn"].config.membrane_norm.options == {"eps": 1e-5, "momentum": 0.2, "affine": True, "carry": "normalized"}
    # a cell without a membrane normalization keeps the id it had before the key existed
    plain = by_name["none"].config
    assert cell_id(plain) == _id_without_the_key(plain)
    assert cell_id(by_name["mpbn"].config) != cell_id(plain)
    with pytest.raises(ConfigError, match=r"key 'membrane_norm'.*'mpbm'.*mpbn, none"):
        load_matrix(tiny_matrix('[matrix]\nmembrane_norm = ["mpbm"]\n'), registry)
    with pytest.raises(ConfigError, match=r"unknown option 'carri' of membrane_norm 'mpbn'"):
        load_matrix(tiny_matrix('[matrix]\nmembrane_norm = ["mpbn"]\n[options.membrane_norm.mpbn]\ncarri = "raw"\n'), registry)


def _id_without_the_key(config: CellConfig) -> str:
    import hashlib
    import json

    from harness.config import LATER_KEYS, OBSERVATION_KEYS, flatten

    flat = {k: v for k, v in flatten(config).items() if not k.startswith("membrane_norm.")
            and k not in OBSERVATION_KEYS and not (k in LATER_KEYS and v == LATER_KEYS[k])}
    text = json.dumps(flat, sort_keys=True, default=repr, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def test_the_fashion_mnist_study_matrix_has_mpbn_beside_vanilla_bn(registry):
    from pathlib import Path

    from harness.matrix import load_matrix

    m = load_matrix(Path(__file__).resolve().parents[1] / "benchmarks" / "ablation-fmnist-full.toml", registry)
    mpbn = [c.config for c in m.cells if c.config.membrane_norm.name == "mpbn"]
    assert {(c.trainer.name, c.normalizer.name, c.threshold.name, c.seed) for c in mpbn} == {
        (tr, "vanilla_bn", "fixed", s) for tr in ("online", "bptt") for s in (0, 1, 2)}
    assert all(c.membrane_norm.options["carry"] == "normalized" for c in mpbn)
