"""The paper's architectures (plugins/models_paper.py; docs/method.md section 8): parameter counts
against independent formulas and torchvision, shapes and step-mode equality, the per-sequence
neuron dropout, the SEW ADD and NF (analog shortcut) blocks, and any normalizer fitting."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from harness.snn import LayerFactory, LIFNeuron, begin_sequence, end_sequence, run_sequence, set_step_mode
from snn_harness_plugins import models_paper as mp
from snn_harness_plugins.models_paper import Residual, SequenceDropout

NAMES = ("vggsnn", "resnet19", "sew_resnet34", "nf_resnet34")


@pytest.fixture(scope="module")
def reg():
    return mp._registry()


@pytest.fixture(scope="module")
def bn_layers(reg):
    """Plain BatchNorm2d and a LIF neuron with a fixed threshold."""
    return LayerFactory(normalizer=lambda c: nn.BatchNorm2d(c), neuron=lambda: LIFNeuron(reg.thresholds["fixed"](theta=1.0)))


def registry_layers(reg, normalizer: str, time_steps: int = 2, theta: float = 1.0) -> LayerFactory:
    """A LayerFactory made from registry names the way harness.runner.build_model does."""
    info = reg.normalizers.info(normalizer)
    extra = {k: v for k, v in {"time_steps": time_steps, "v_threshold": theta}.items() if info.takes(k)}
    return LayerFactory(
        normalizer=lambda c: reg.normalizers[normalizer](num_features=c, **extra),
        neuron=lambda: LIFNeuron(reg.thresholds["fixed"](theta=theta)),
    )


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv(c_in: int, c_out: int, k: int, bias: bool = True) -> int:
    return c_in * c_out * k * k + (c_out if bias else 0)


def bn(c: int) -> int:
    return 2 * c


def fc(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def binary(t: torch.Tensor) -> bool:
    return bool(((t == 0) | (t == 1)).all())


def capture(module: nn.Module, store: dict, key: str, what: str = "output"):
    """Record ``module``'s output (or first input) on every call: one call per sequence in
    sequence mode, one per step in single mode (read back with :func:`got`)."""

    def hook(_m, inputs, output):
        store.setdefault(key, []).append((inputs[0] if what == "input" else output).detach().clone())

    return module.register_forward_hook(hook)


def got(store: dict, key: str) -> torch.Tensor:
    """``[T, B, ...]`` from what :func:`capture` recorded, in either step mode."""
    seen = store[key]
    return seen[0] if len(seen) == 1 else torch.stack(seen)


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------


def test_registered_with_options_and_both_step_modes(reg):
    for name in NAMES:
        info = reg.info("model", name)
        assert info.step_modes == frozenset({"single", "sequence"})
        assert info.injected == frozenset({"in_channels", "num_classes", "input_size", "layers"})
        assert info.options["dropout"].default == 0.0
    assert reg.info("model", "vggsnn").options["classifier"].default == ()
    assert reg.info("model", "sew_resnet34").options["stem"].default == "auto"


def test_too_small_inputs_are_refused(bn_layers):
    with pytest.raises(ValueError, match="at least 8x8"):
        mp.vggsnn(3, 10, (4, 4), bn_layers)


# ---------------------------------------------------------------------------------------------
# Parameter counts
# ---------------------------------------------------------------------------------------------

VGG_CHANNELS = (64, 128, 256, 256, 512, 512, 512, 512)


def vgg_expected(c_in: int, classes: int, hidden: tuple[int, ...] = ()) -> int:
    total, c = 0, c_in
    for v in VGG_CHANNELS:  # C3 = conv3x3 (bias) + BN
        total += conv(c, v, 3) + bn(v)
        c = v
    for h in hidden:  # FC + BN (+ LIF, dropout: no parameters)
        total += fc(c, h) + bn(h)
        c = h
    return total + fc(c, classes)


def test_vggsnn_parameter_count(bn_layers):
    assert n_params(mp.vggsnn(3, 10, (32, 32), bn_layers)) == vgg_expected(3, 10) == 9_231_114
    assert n_params(mp.vggsnn(3, 100, (32, 32), bn_layers)) == vgg_expected(3, 100)
    # DVS-Gesture: 2 polarity channels, FC 512-1024-1024-11
    dvs = mp.vggsnn(2, 11, (48, 48), bn_layers, dropout=0.05, classifier=(1024, 1024))
    assert n_params(dvs) == vgg_expected(2, 11, (1024, 1024)) == 10_815_691
    linears = [m for m in dvs.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 1024), (1024, 1024), (1024, 11)]
    assert all(abs(m.weight.std().item() - 0.01) < 0.002 and not m.bias.any() for m in linears[:2])


def resnet19_expected(classes: int, c_in: int = 3, bias: bool = True) -> int:
    total = conv(c_in, 128, 3, bias) + bn(128)  # stem
    c = 128
    for planes, blocks in ((128, 3), (256, 3), (512, 2)):
        for i in range(blocks):
            total += conv(c, planes, 3, bias) + bn(planes) + conv(planes, planes, 3, bias) + bn(planes)  # bn after add
            if c != planes:  # first block of stages 2 and 3: conv1x1/2 + BN shortcut
                total += conv(c, planes, 1, bias) + bn(planes)
            c = planes
    return total + fc(512 * 4 * 4, 256) + bn(256) + fc(256, classes)  # AvgPool2 -> 8192 -> 256 -> BN -> classes


def test_resnet19_parameter_count(bn_layers):
    model = mp.resnet19(3, 10, (32, 32), bn_layers)
    assert n_params(model) == resnet19_expected(10) == 14_669_834
    assert n_params(mp.resnet19(3, 100, (32, 32), bn_layers)) == resnet19_expected(100)
    assert n_params(mp.resnet19(3, 10, (32, 32), bn_layers, bias=False)) == resnet19_expected(10, bias=False)
    head_fc = [m for m in model[-1].modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in head_fc] == [(8192, 256), (256, 10)]


@pytest.mark.parametrize("name", ["sew_resnet34", "nf_resnet34"])
def test_resnet34_parameters_match_torchvision(name, bn_layers):
    ann = torchvision.models.resnet34(num_classes=1000)
    ann_shapes = sorted(tuple(p.shape) for p in ann.parameters())
    conv_biases = sum(m.out_channels for m in ann.modules() if isinstance(m, nn.Conv2d))
    assert n_params(ann) == 21_797_672

    plain = mp.MODELS[name](3, 1000, (224, 224), bn_layers, bias=False)
    assert n_params(plain) == 21_797_672
    assert sorted(tuple(p.shape) for p in plain.parameters()) == ann_shapes  # same conv/BN/FC layers
    del plain
    official = mp.MODELS[name](3, 1000, (224, 224), bn_layers)  # conv bias = True, as the official code
    assert n_params(official) == 21_797_672 + conv_biases == 21_806_184


# ---------------------------------------------------------------------------------------------
# Shapes and step modes
# ---------------------------------------------------------------------------------------------

FORWARD_CASES = [
    ("vggsnn", (16, 16), {}),
    ("vggsnn", (8, 8), {"classifier": (32, 32)}),
    ("resnet19", (16, 16), {}),
    ("sew_resnet34", (64, 64), {}),
    ("nf_resnet34", (64, 64), {}),
    ("sew_resnet34", (16, 16), {"stem": "cifar"}),
    ("nf_resnet34", (16, 16), {"stem": "cifar"}),
]


@pytest.mark.parametrize(("name", "size", "options"), FORWARD_CASES)
def test_forward_shapes_and_sequence_equals_single(name, size, options, bn_layers):
    torch.manual_seed(0)
    T, B, classes = 2, 2, 7
    model = mp.MODELS[name](3, classes, size, bn_layers, **options).eval()
    x = torch.rand(T, B, 3, *size) * 3
    spikes = []
    neurons = [m for m in model.modules() if isinstance(m, LIFNeuron)]
    hooks = [m.register_forward_hook(lambda _m, _i, out: spikes.append(out.sum().item())) for m in neurons]
    with torch.no_grad():
        out_seq = run_sequence(model, x, "sequence")
        out_single = run_sequence(model, x, "single")
        set_step_mode(model, "single")
        begin_sequence(model, T)
        one_step = model(x[0])
        end_sequence(model)
    for h in hooks:
        h.remove()
    assert out_seq.shape == (T, B, classes)
    assert one_step.shape == (B, classes)
    assert sum(spikes) > 0  # the comparison is not between silent networks
    torch.testing.assert_close(out_seq, out_single, rtol=0, atol=1e-5)


def test_stems(bn_layers):
    """ImageNet stem: 224 -> 112 (conv7x7/2) -> 56 (maxpool); CIFAR stem keeps the size;
    ``stem = "auto"`` picks the ImageNet stem from 64x64 up."""
    x224 = torch.rand(1, 1, 3, 224, 224)
    for name in ("sew_resnet34", "nf_resnet34"):
        model = mp.MODELS[name](3, 1000, (224, 224), bn_layers).eval()
        with torch.no_grad():
            assert run_sequence(model[0], x224).shape == (1, 1, 64, 56, 56)
        assert any(isinstance(m, nn.MaxPool2d) for m in model[0].modules())
        small = mp.MODELS[name](3, 10, (32, 32), bn_layers)
        assert not any(isinstance(m, nn.MaxPool2d) for m in small[0].modules())
        with torch.no_grad():
            assert run_sequence(small[0].eval(), torch.rand(1, 1, 3, 32, 32)).shape == (1, 1, 64, 32, 32)
    assert any(isinstance(m, LIFNeuron) for m in mp.sew_resnet34(3, 10, (64, 64), bn_layers)[0].modules())


# ---------------------------------------------------------------------------------------------
# Neuron dropout
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["single", "sequence"])
def test_dropout_mask_fixed_within_a_sequence_new_between(mode):
    p, T = 0.25, 4
    drop = SequenceDropout(p).train()
    x = torch.ones(T, 8, 50)
    first = run_sequence(drop, x, mode)
    for t in range(1, T):
        assert torch.equal(first[t], first[0])  # the same mask at every step
    assert torch.equal(first.unique(), torch.tensor([0.0, 1.0 / (1.0 - p)]))  # kept units scaled by 1/(1-p)
    second = run_sequence(drop, x, mode)
    assert not torch.equal(first[0], second[0])  # a fresh mask for the next sequence
    y = torch.randn(T, 8, 50)
    drop.eval()
    assert torch.equal(run_sequence(drop, y, mode), y)  # off in eval mode
    assert torch.equal(run_sequence(SequenceDropout(0.0).train(), y, mode), y)


def test_dropout_same_masks_in_both_modes():
    drop = SequenceDropout(0.5).train()
    x = torch.randn(3, 4, 6, 5, 5)
    torch.manual_seed(7)
    a = run_sequence(drop, x, "sequence")
    torch.manual_seed(7)
    b = run_sequence(drop, x, "single")
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="dropout"):
        SequenceDropout(1.0)


def test_dropout_follows_every_neuron(bn_layers):
    def count(model):
        modules = list(model.modules())
        return sum(isinstance(m, SequenceDropout) for m in modules), sum(isinstance(m, LIFNeuron) for m in modules)

    assert count(mp.vggsnn(3, 10, (8, 8), bn_layers)) == (0, 8)
    assert count(mp.vggsnn(3, 10, (8, 8), bn_layers, dropout=0.1)) == (8, 8)
    dvs = mp.vggsnn(2, 11, (8, 8), bn_layers, dropout=0.05, classifier=(16, 16))
    assert [m.p for m in dvs.modules() if isinstance(m, SequenceDropout)] == [0.05] * 8 + [0.5] * 2
    modules = list(dvs.modules())
    for i, m in enumerate(modules):  # a dropout right after each neuron
        if isinstance(m, LIFNeuron):
            assert isinstance(modules[i + 2], SequenceDropout)  # i + 1 is the neuron's threshold policy
    r19 = mp.resnet19(3, 10, (8, 8), bn_layers, dropout=0.1)
    n_drop, n_lif = count(r19)
    assert n_drop == n_lif == 1 + 2 * 8


def test_vggsnn_train_mode_dropout_same_in_both_modes(reg):
    """Train mode, per-step BN (vanilla_bn) and neuron dropout: with the same random state both
    step modes draw the same masks and give the same logits."""
    torch.manual_seed(0)
    model = mp.vggsnn(3, 5, (8, 8), registry_layers(reg, "vanilla_bn"), dropout=0.2, classifier=(16,)).train()
    x = torch.rand(2, 4, 3, 8, 8) * 3
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    out_seq = run_sequence(model, x, "sequence")
    model.load_state_dict(state)
    torch.manual_seed(1)
    out_single = run_sequence(model, x, "single")
    torch.testing.assert_close(out_seq, out_single, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Residual blocks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sequence", "single"])
def test_sew_add_is_branch_spikes_plus_identity_spikes(mode, bn_layers):
    torch.manual_seed(0)
    model = mp.sew_resnet34(3, 10, (64, 64), bn_layers).train()
    x = (torch.rand(2, 2, 64, 16, 16) < 0.3).float()  # spikes, as a SEW block receives them

    plain = model[1][0]  # stage 1, block 1: identity shortcut
    assert isinstance(plain, Residual) and plain.shortcut is None and plain.post is None
    assert isinstance(plain.branch[-1], LIFNeuron)
    seen: dict = {}
    h = capture(plain.branch[-1], seen, "branch")
    out = run_sequence(plain, x, mode)
    h.remove()
    branch = got(seen, "branch")
    assert branch.shape == x.shape and binary(branch) and branch.sum() > 0
    torch.testing.assert_close(out, branch + x, rtol=0, atol=0)
    assert out.max() == 2  # ADD, not OR/AND: both spikes count


def test_sew_downsample_adds_spiking_shortcut(bn_layers):
    torch.manual_seed(0)
    model = mp.sew_resnet34(3, 10, (64, 64), bn_layers).train()
    block = model[2][0]  # stage 2, block 1: conv1x1/2 -> norm -> LIF shortcut
    assert isinstance(block.shortcut[-1], LIFNeuron)
    x = (torch.rand(2, 2, 64, 16, 16) < 0.3).float()
    seen: dict = {}
    hooks = [capture(block.branch[-1], seen, "branch"), capture(block.shortcut[-1], seen, "shortcut")]
    out = run_sequence(block, x, "sequence")
    for h in hooks:
        h.remove()
    assert out.shape == (2, 2, 128, 8, 8)
    assert binary(got(seen, "branch")) and binary(got(seen, "shortcut")) and got(seen, "shortcut").sum() > 0
    torch.testing.assert_close(out, got(seen, "branch") + got(seen, "shortcut"), rtol=0, atol=0)


def test_nf_block_carries_the_analog_stream(bn_layers):
    torch.manual_seed(0)
    model = mp.nf_resnet34(3, 10, (64, 64), bn_layers).train()
    assert not any(isinstance(m, LIFNeuron) for m in model[0].modules())  # stem without neuron

    block = model[1][0]
    assert block.shortcut is None and isinstance(block.branch[0], LIFNeuron)  # pre-activation
    x = torch.randn(2, 2, 64, 16, 16)  # analog (membrane) stream
    seen: dict = {}
    hooks = [
        capture(block.branch[1], seen, "conv_in", "input"),  # what the first conv sees
        capture(block.branch[-1], seen, "branch"),  # the last normalizer's output
    ]
    out = run_sequence(block, x, "sequence")
    for h in hooks:
        h.remove()
    assert binary(got(seen, "conv_in")) and got(seen, "conv_in").sum() > 0  # the branch sees spikes
    torch.testing.assert_close(out, got(seen, "branch") + x, rtol=0, atol=0)  # the shortcut, the analog x

    # By construction: silence the branch's last normalizer and the block is the identity on x.
    norm = block.branch[-1].module
    with torch.no_grad():
        norm.weight.zero_()
        norm.bias.zero_()
    assert torch.equal(run_sequence(block, x, "single"), x)

    down = model[2][0]  # conv1x1/2 -> norm on the analog input, no neuron
    assert not any(isinstance(m, LIFNeuron) for m in down.shortcut.modules())
    seen.clear()
    h = capture(down.shortcut[0], seen, "shortcut_in", "input")
    run_sequence(down, x, "sequence")
    h.remove()
    torch.testing.assert_close(got(seen, "shortcut_in"), x, rtol=0, atol=0)


def test_stage_inputs_analog_in_nf_spikes_in_sew(bn_layers):
    torch.manual_seed(0)
    x = torch.rand(2, 2, 3, 64, 64) * 3
    for name, spiking in (("nf_resnet34", False), ("sew_resnet34", True)):
        model = mp.MODELS[name](3, 10, (64, 64), bn_layers).eval()
        seen: dict = {}
        h = capture(model[1], seen, "stage1_in", "input")
        with torch.no_grad():
            run_sequence(model, x, "sequence")
        h.remove()
        assert binary(got(seen, "stage1_in")) is spiking


def test_resnet19_normalizer_after_the_add(bn_layers):
    torch.manual_seed(0)
    model = mp.resnet19(3, 10, (16, 16), bn_layers).train()
    block = model[2][0]  # 128 -> 256, stride 2: conv1x1 -> norm shortcut
    assert isinstance(block.post[-1], LIFNeuron) and not isinstance(block.branch[-1], LIFNeuron)
    x = (torch.rand(2, 2, 128, 16, 16) < 0.3).float()
    seen: dict = {}
    hooks = [
        capture(block.branch, seen, "branch"),
        capture(block.shortcut, seen, "shortcut"),
        capture(block.post[0], seen, "norm_in", "input"),
    ]
    out = run_sequence(block, x, "sequence")
    for h in hooks:
        h.remove()
    assert out.shape == (2, 2, 256, 8, 8) and binary(out)
    torch.testing.assert_close(got(seen, "norm_in"), got(seen, "branch") + got(seen, "shortcut"))


# ---------------------------------------------------------------------------------------------
# Any normalizer fits
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("normalizer", "mode"), [("osr", "single"), ("tdbn", "sequence"), ("tebn", "sequence"), ("bntt", "single")]
)
def test_registry_normalizers_fit(reg, normalizer, mode):
    torch.manual_seed(0)
    model = mp.vggsnn(3, 5, (8, 8), registry_layers(reg, normalizer), dropout=0.1, classifier=(16,)).train()
    out = run_sequence(model, torch.rand(2, 4, 3, 8, 8) * 3, mode)
    assert out.shape == (2, 4, 5) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_build_by_name(reg):
    model = mp.build(
        "resnet19", input_size=(8, 8), num_classes=4, normalizer="tdbn", threshold_options={"theta": 0.5}, registry=reg
    )
    tdbn = [m for m in model.modules() if type(m).__name__ == "ThresholdDependentBatchNorm"]
    assert len(tdbn) == 1 + 2 * 8 + 2 + 1  # stem, two per block, two shortcuts, head
    assert all(torch.all(m.weight == 0.5) for m in tdbn)  # v_threshold injected from theta
    with torch.no_grad():
        out = run_sequence(model.eval(), torch.rand(2, 2, 3, 8, 8), "sequence")
    assert out.shape == (2, 2, 4)
    with pytest.raises(ValueError, match="supports step modes"):
        set_step_mode(model, "single")  # tdbn needs the whole sequence
