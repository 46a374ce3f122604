"""The fused autograd Functions (harness/snn/fused.py) against the elementwise implementations
they replaced (tests/reference_layers.py): values, gradients, running buffers and fallback counts
in float64 to 1e-12, in both step modes; what each saves for backward; when the neuron takes its
unfused path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.snn import AvgPool, LIFNeuron, ThresholdPolicy, begin_sequence, end_sequence, run_sequence, set_step_mode
from harness.snn.fused import _AvgPool, _LIFSequence, _PerStepNorm
from reference_layers import ReferenceStepNorm, reference_lif
from snn_harness_plugins.normalizers import BatchNormThroughTime, OnlineSpikingRenormalization, VanillaBatchNorm
from snn_harness_plugins.thresholds import FixedThreshold, OnlineThresholdStabilizer

TOL = dict(rtol=1e-12, atol=1e-12)
C = 3


def _close(a, b):
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, **TOL)


def _inputs(shape, seed=0, scales=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * 1.7 + 0.4
    if scales is not None:  # per-step scales [T]: some steps far from the running statistics
        x = x * torch.tensor(scales, dtype=torch.float64).view(-1, *[1] * (len(shape) - 1))
    G = torch.randn(*shape, generator=g, dtype=torch.float64)
    return x, G


def _randomize(ours, ref, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("weight", "bias"):
            if getattr(ours, name, None) is not None:
                p = torch.randn(getattr(ours, name).shape, generator=g, dtype=torch.float64) * 0.5 + 1.0
                getattr(ours, name).copy_(p)
                getattr(ref, name).copy_(p)
        m = torch.randn(C, generator=g, dtype=torch.float64) * 0.3
        v = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
        for mod in (ours, ref):
            mod.running_mean.copy_(m)
            mod.running_var.copy_(v)


def _run(module, x, G, mode, sequences=2):
    """``sequences`` training sequences; returns the last output, x's gradient and the parameter grads."""
    module.train()
    set_step_mode(module, mode)
    for _ in range(sequences):
        xi = x.clone().requires_grad_()
        module.zero_grad(set_to_none=True)
        begin_sequence(module, x.shape[0])
        y = module(xi) if mode == "sequence" else torch.stack([module(xi[t]) for t in range(x.shape[0])])
        end_sequence(module)
        (y * G).sum().backward()
    grads = {n: p.grad for n, p in module.named_parameters()}
    return y.detach(), xi.grad, grads


NORM_SHAPES = [(4, 6, C), (4, 6, C, 5, 5)]


@pytest.mark.parametrize("shape", NORM_SHAPES)
@pytest.mark.parametrize("mode", ["single", "sequence"])
@pytest.mark.parametrize("affine", [True, False])
def test_vanilla_bn_node_equals_the_elementwise_reference(shape, mode, affine):
    ours = VanillaBatchNorm(C, affine=affine).double()
    ref = ReferenceStepNorm(C, "bn", eps=1e-4, affine=affine).double()
    _randomize(ours, ref)
    x, G = _inputs(shape)
    y, gx, gp = _run(ours, x, G, mode)
    y_ref, gx_ref, gp_ref = _run(ref, x, G, mode)
    _close(y, y_ref)
    _close(gx, gx_ref)
    assert gp.keys() == gp_ref.keys()
    for k in gp:
        _close(gp[k], gp_ref[k])
    _close(ours.running_mean, ref.running_mean)
    _close(ours.running_var, ref.running_var)
    assert int(ours.num_batches_tracked) == 2


@pytest.mark.parametrize("shape", NORM_SHAPES)
@pytest.mark.parametrize("mode", ["single", "sequence"])
@pytest.mark.parametrize("gamma_grad", ["paper", "official"])
@pytest.mark.parametrize("fallback_ratio", [None, 3.0])
def test_osr_node_equals_the_elementwise_reference(shape, mode, gamma_grad, fallback_ratio):
    ours = OnlineSpikingRenormalization(C, fallback_ratio="none" if fallback_ratio is None else fallback_ratio,
                                        gamma_grad=gamma_grad).double()
    ref = ReferenceStepNorm(C, "osr", eps=1e-4, fallback_ratio=fallback_ratio, gamma_grad=gamma_grad).double()
    _randomize(ours, ref)
    # Steps 1 and 3 are 10x and 1/10x the others' scale: with ratio 3 they fall back, the others do not.
    x, G = _inputs(shape, scales=[1.0, 10.0, 1.0, 0.1])
    y, gx, gp = _run(ours, x, G, mode)
    y_ref, gx_ref, gp_ref = _run(ref, x, G, mode)
    _close(y, y_ref)
    _close(gx, gx_ref)
    for k in gp_ref:
        _close(gp[k], gp_ref[k])
    _close(ours.running_mean, ref.running_mean)
    _close(ours.running_var, ref.running_var)
    metrics = ours.epoch_metrics()
    if fallback_ratio is None:
        assert metrics == {"osr_fallback_rate": 0.0}
    else:
        assert ref.fallback_steps == 4  # two sequences, two falling-back steps each: the case is exercised
        assert metrics == {"osr_fallback_rate": ref.fallback_steps / 8}


@pytest.mark.parametrize("mode", ["single", "sequence"])
def test_osr_linear_ablation_and_evaluation_equal_the_reference(mode):
    x, G = _inputs((4, 6, C, 5, 5))
    ours = OnlineSpikingRenormalization(C, mode="linear").double()
    ref = ReferenceStepNorm(C, "osr", eps=1e-4).double()
    _randomize(ours, ref)
    y, gx, gp = _run(ours, x, G, mode)
    ref.train()
    # the linear ablation is Eq. 8 in training: the reference's inference transform, with its statistics kept
    xi = x.clone().requires_grad_()
    ref.eval()
    y_ref = run_sequence(ref, xi, mode)
    (y_ref * G).sum().backward()
    ref_buffers = ReferenceStepNorm(C, "osr", eps=1e-4).double()
    _randomize(ref_buffers, ReferenceStepNorm(C, "osr", eps=1e-4).double())
    _run(ref_buffers, x, G, mode)
    _close(ours.running_mean, ref_buffers.running_mean)
    _close(ours.running_var, ref_buffers.running_var)
    # evaluation, for both normalizers, is the running-statistics transform
    for module, reference in ((ours, ref), (VanillaBatchNorm(C).double(), ReferenceStepNorm(C, "bn", eps=1e-4).double())):
        _randomize(module, reference, seed=9)
        module.eval()
        reference.eval()
        with torch.no_grad():
            _close(run_sequence(module, x, mode), run_sequence(reference, x, mode))


def test_bntt_node_equals_batch_norm_per_step():
    T = 3
    x_shape = (T, 6, C, 4, 4)
    ours = BatchNormThroughTime(C, T).double()
    x, G = _inputs(x_shape)
    with torch.no_grad():
        ours.weight.copy_(torch.rand(T, C, dtype=torch.float64) + 0.5)
    weight = ours.weight.detach().clone().requires_grad_()
    rm, rv = ours.running_mean.clone(), ours.running_var.clone()
    y, gx, gp = _run(ours, x, G, "single", sequences=1)
    xi = x.clone().requires_grad_()
    ref = torch.stack([nn.functional.batch_norm(xi[t], rm[t], rv[t], weight[t], None, True, 0.1, 1e-5) for t in range(T)])
    (ref * G).sum().backward()
    _close(y, ref.detach())
    _close(gx, xi.grad)
    _close(gp["weight"], weight.grad)
    _close(ours.running_mean, rm)
    _close(ours.running_var, rv)


class _LearnedThreshold(ThresholdPolicy):
    """A threshold with a learnable parameter: its theta carries gradient (unfused path)."""

    def __init__(self):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))

    def forward(self, u, t):
        return self.theta


LIF_CASES = [(reset, dr, dm) for reset in ("soft", "hard") for dr in (True, False) for dm in (False, True)]


@pytest.mark.parametrize("reset,detach_reset,detach_membrane", LIF_CASES)
@pytest.mark.parametrize("mode", ["single", "sequence"])
@pytest.mark.parametrize("policy", ["fixed", "ots"])
def test_lif_node_equals_the_elementwise_reference(reset, detach_reset, detach_membrane, mode, policy):
    T = 5
    x, G = _inputs((T, 8, C, 3, 3), seed=2)
    x = x * 0.8
    make = (lambda: FixedThreshold(0.9)) if policy == "fixed" else (lambda: OnlineThresholdStabilizer(1.0).double())
    lif = LIFNeuron(make(), tau=2.0, reset=reset, detach_reset=detach_reset, detach_membrane=detach_membrane).double()
    assert lif.fused
    lif.train()
    ref_policy = make().train()
    ref_policy.time_steps = T
    ref_policy.begin_sequence(T)
    xi = x.clone().requires_grad_()
    s = run_sequence(lif, xi, mode)
    (s * G).sum().backward() if s.requires_grad else None
    xr = x.clone().requires_grad_()
    s_ref, _ = reference_lif(xr, ref_policy, decay=0.5, reset=reset, detach_reset=detach_reset, detach_membrane=detach_membrane)
    ref_policy.end_sequence()
    (s_ref * G).sum().backward()
    assert torch.equal(s.detach(), s_ref.detach())
    assert 0.05 < float(s_ref.detach().mean()) < 0.95  # both spikes and silences: the surrogate path is exercised
    _close(xi.grad, xr.grad)
    if policy == "ots":
        _close(lif.threshold.running_theta, ref_policy.running_theta)


def test_the_membrane_gradient_crosses_fused_single_steps():
    T = 4
    x, G = _inputs((T, 5, C), seed=3)
    lif = LIFNeuron(FixedThreshold(1.0), tau=2.0, reset="soft", detach_reset=False).double()
    xi = x.clone().requires_grad_()
    (run_sequence(lif, xi, "single") * G).sum().backward()
    xr = x.clone().requires_grad_()
    s_ref, _ = reference_lif(xr, lambda u, t: 1.0, detach_reset=False)
    (s_ref * G).sum().backward()
    _close(xi.grad, xr.grad)
    assert xi.grad[0].abs().sum() > 0


def test_a_differentiable_policy_or_a_membrane_override_takes_the_unfused_path():
    T = 4
    x, G = _inputs((T, 5, C), seed=4)
    lif = LIFNeuron(_LearnedThreshold(), tau=2.0).double()
    assert not lif.fused
    xi = x.clone().requires_grad_()
    (run_sequence(lif, xi, "sequence") * G).sum().backward()
    assert lif.threshold.theta.grad is not None and lif.threshold.theta.grad != 0

    class Marked(FixedThreshold):
        differentiable = True

    assert not LIFNeuron(Marked(1.0)).fused
    assert not LIFNeuron(FixedThreshold(1.0), fuse=False).fused

    class Scaled(LIFNeuron):
        def membrane(self, u):
            return 2.0 * u

    scaled = Scaled(FixedThreshold(1.0), tau=2.0).double()
    assert not scaled.fused
    s = run_sequence(scaled, x, "sequence")
    s_ref, _ = reference_lif(x, lambda u, t: 0.5)  # at the first step 2u >= 1 <=> u >= 0.5
    assert torch.equal(s[0], s_ref[0])


def test_fused_and_unfused_neurons_agree_inside_a_network():
    from harness.snn import LayerFactory
    from snn_harness_plugins.models import vgg_small

    x, _ = _inputs((3, 4, 1, 8, 8), seed=6)
    outs = {}
    for fuse in (True, False):
        torch.manual_seed(0)
        layers = LayerFactory(lambda c: OnlineSpikingRenormalization(c, fallback_ratio="none"),
                              lambda: LIFNeuron(OnlineThresholdStabilizer(1.0), fuse=fuse))
        model = vgg_small(1, 4, (8, 8), layers, channels=[4, 6]).double()
        xi = x.clone().requires_grad_()
        out = run_sequence(model, xi, "sequence")
        out.square().sum().backward()
        outs[fuse] = (out.detach(), xi.grad, [p.grad for p in model.parameters()])
    _close(outs[True][0], outs[False][0])
    _close(outs[True][1], outs[False][1])
    for a, b in zip(outs[True][2], outs[False][2]):
        _close(a, b)


@pytest.mark.parametrize("size,k", [((8, 8), 2), ((7, 9), 2), ((9, 9), 3)])
def test_avg_pool_equals_nn_avgpool2d_and_saves_nothing(size, k):
    x, _ = _inputs((2, 3, *size), seed=7)
    xi = x.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = AvgPool(k)(xi)
    G = torch.randn_like(y)
    for _ in range(4):  # leave freed memory of the gradient's size full of NaN: rows and columns
        torch.full_like(x, float("nan"))  # beyond the last window must be written, not left as found
    (y * G).sum().backward()
    xr = x.clone().requires_grad_()
    y_ref = nn.AvgPool2d(k)(xr)
    (y_ref * G).sum().backward()
    _close(y.detach(), y_ref.detach())
    _close(xi.grad, xr.grad)
    assert saved == []
    with pytest.raises(ValueError, match="kernel_size"):
        AvgPool(0)


def _saved_by_node(fn):
    """{autograd node class name: number of saved tensors} for what ``fn()`` builds."""
    out = fn()
    counts = {}
    seen = set()
    stack = [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        name = type(node).__name__
        n = len(getattr(node, "saved_tensors", ()) or ()) if name.endswith("Backward") and "_" in name else None
        counts[name] = n
        stack.extend(f for f, _ in node.next_functions)
    return counts


def test_each_fused_node_saves_one_full_size_tensor():
    x, _ = _inputs((4, 6, C, 5, 5))
    for module in (VanillaBatchNorm(C).double(), OnlineSpikingRenormalization(C).double()):
        module.train()
        begin_sequence(module, 4)
        full = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: full.append(t.numel()) or t, lambda t: t):
            y = module(x.clone().requires_grad_())
        assert type(y.grad_fn).__name__ == "_PerStepNormBackward"
        assert sorted(full)[-1] == x.numel() and sum(n == x.numel() for n in full) == 1, full
    lif = LIFNeuron(FixedThreshold(1.0)).double()
    begin_sequence(lif, 4)
    full = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: full.append(t.numel()) or t, lambda t: t):
        s = lif(x.clone().requires_grad_())
    assert full == [x.numel()]
    assert type(s.grad_fn).__name__ == "_LIFSequenceBackward"
    assert {_PerStepNorm, _LIFSequence, _AvgPool}  # the three Functions the models use


@pytest.mark.parametrize("reset", ["soft", "hard"])
@pytest.mark.parametrize("policy", ["fixed", "ots"])
def test_lif_without_gradient_gives_the_same_spikes(reset, policy):
    x, _ = _inputs((5, 8, C, 3, 3), seed=8)
    make = (lambda: FixedThreshold(0.9)) if policy == "fixed" else (lambda: OnlineThresholdStabilizer(1.0).double())
    outs = []
    for grad in (True, False):
        lif = LIFNeuron(make(), tau=2.0, reset=reset).double()
        with torch.set_grad_enabled(grad):
            s = run_sequence(lif, x.clone().requires_grad_(grad), "single")
        outs.append(s.detach())
    assert torch.equal(outs[0], outs[1])
    assert 0 < float(outs[0].mean()) < 1


def test_ots_two_pass_statistics_equal_torch_std_in_float64():
    ots = OnlineThresholdStabilizer(1.0).double().train()
    ots.time_steps = 3
    ots.begin_sequence(3)
    us = [torch.randn(8, C, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(t)) * (1 + t) + t for t in range(3)]
    thetas = [ots(u, t) for t, u in enumerate(us)]
    r = (1.0 - us[0].mean()) / us[0].std()
    for t, u in enumerate(us[1:], 1):
        _close(thetas[t], u.mean() + u.std() * r)  # Eq. 16 with torch.std, the official statistic


def _trace_reference(module, x, a):
    """The composite OTTT synapse the fused node replaced: module(a) + module_without_bias(x - a; W detached)."""
    frozen = {name: p.detach() for name, p in module.named_parameters()}
    if "bias" in frozen and frozen["bias"] is not None:
        frozen["bias"] = torch.zeros_like(frozen["bias"])
    return module(a) + torch.func.functional_call(module, frozen, (x - a,))


@pytest.mark.parametrize("make,shape", [
    (lambda: nn.Conv2d(3, 4, 3, padding=1), (5, 3, 6, 6)),
    (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, bias=False), (5, 4, 9, 9)),
    (lambda: nn.Conv1d(3, 2, 5, padding=2), (4, 3, 11)),
    (lambda: nn.Linear(7, 3), (6, 7)),
    (lambda: nn.Linear(7, 3, bias=False), (2, 6, 7)),
])
def test_trace_synapse_node_equals_the_composite_two_call_form(make, shape):
    from harness.snn.fused import trace_synapse

    torch.manual_seed(0)
    ours = make().double()
    ref = make().double()
    ref.load_state_dict(ours.state_dict())
    g = torch.Generator().manual_seed(3)
    s = (torch.rand(shape, generator=g, dtype=torch.float64) > 0.6).double()
    a = s + 0.5 * (torch.rand(shape, generator=g, dtype=torch.float64) > 0.5).double()  # a trace: not the spikes
    xs, xr = s.clone().requires_grad_(), s.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = trace_synapse(ours, xs, a)
    y_ref = _trace_reference(ref, xr, a)
    G = torch.randn(y.shape, generator=g, dtype=torch.float64)
    (y * G).sum().backward()
    (y_ref * G).sum().backward()
    _close(y.detach(), y_ref.detach())
    _close(xs.grad, xr.grad)
    for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        _close(p.grad, q.grad)
    assert saved == [a.shape, ours.weight.shape]  # the trace and the weight, not the spikes


def test_trace_synapse_leaves_other_modules_to_the_composite_form():
    from harness.snn.fused import trace_synapse

    x = torch.rand(2, 3, 5, 5)
    assert trace_synapse(nn.Conv2d(3, 3, 3, padding="same"), x, x) is None
    assert trace_synapse(nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular"), x, x) is None
    assert trace_synapse(nn.BatchNorm2d(3), x, x) is None


@pytest.mark.parametrize("make,shape", [(lambda: nn.Conv2d(3, 4, 3, padding=1), (5, 3, 6, 6)), (lambda: nn.Linear(7, 3), (6, 7))])
def test_trace_synapse_under_cpu_bf16_autocast_matches_the_composite_form(make, shape):
    from harness.snn.fused import trace_synapse

    torch.manual_seed(0)
    ours, ref = make(), make()
    ref.load_state_dict(ours.state_dict())
    g = torch.Generator().manual_seed(4)
    s = (torch.rand(shape, generator=g) > 0.6).to(torch.bfloat16)
    a = (s.float() * 1.5).to(torch.bfloat16)
    xs, xr = s.clone().requires_grad_(), s.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = trace_synapse(ours, xs, a)
        y_ref = _trace_reference(ref, xr, a)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    y.float().sum().backward()
    y_ref.float().sum().backward()
    assert xs.grad.dtype == torch.bfloat16 and ours.weight.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(xs.grad.float(), xr.grad.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=2e-2, atol=2e-2)
