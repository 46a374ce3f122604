"""LIF dynamics against hand-computed traces, the surrogate gradient, the step protocol,
vanilla BN (docs/method.md section 4) and the TET loss against its formula (Eq. 5)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from harness.snn import (
    LayerFactory,
    LIFNeuron,
    begin_sequence,
    end_sequence,
    run_sequence,
    set_step_mode,
    spike,
)
from snn_harness_plugins.losses import TETLoss
from snn_harness_plugins.models import vgg_small
from snn_harness_plugins.normalizers import VanillaBatchNorm
from snn_harness_plugins.thresholds import FixedThreshold

X = [0.6, 0.6, 0.6, 1.5, 0.2]
# tau = 2 (decay 0.5), theta = 1, u starts at 0, computed by hand:
#   soft: u = .6, .9, 1.05 (fire, v=.05), 1.525 (fire, v=.525), .4625
#   hard: u = .6, .9, 1.05 (fire, v=0),   1.5   (fire, v=0),    .2
TRACES = {
    "soft": ([0.6, 0.9, 1.05, 1.525, 0.4625], [0, 0, 1, 1, 0]),
    "hard": ([0.6, 0.9, 1.05, 1.5, 0.2], [0, 0, 1, 1, 0]),
}


def _lif(reset: str, **kw) -> LIFNeuron:
    return LIFNeuron(FixedThreshold(1.0), tau=2.0, reset=reset, **kw)


class _Recorder(FixedThreshold):
    """Fixed threshold that records the membrane potential it is shown (after charging)."""

    def begin_sequence(self, time_steps):
        self.seen = []

    def forward(self, u, t):
        self.seen.append(u.detach().clone())
        return super().forward(u, t)


@pytest.mark.parametrize("reset", ["soft", "hard"])
@pytest.mark.parametrize("mode", ["single", "sequence"])
def test_lif_matches_hand_computed_trace(reset, mode):
    policy = _Recorder(1.0)
    lif = LIFNeuron(policy, tau=2.0, reset=reset)
    x = torch.tensor(X).view(5, 1, 1)
    out = run_sequence(lif, x, mode)
    u_expected, s_expected = TRACES[reset]
    assert out.flatten().tolist() == s_expected
    assert torch.allclose(torch.stack(policy.seen).flatten(), torch.tensor(u_expected), atol=1e-6)


def test_lif_state_resets_at_each_sequence():
    lif = _lif("soft")
    x = torch.full((3, 2, 4), 0.8)
    first = run_sequence(lif, x)
    second = run_sequence(lif, x)
    assert torch.equal(first, second)


def test_single_step_requires_begin_sequence():
    lif = _lif("soft")
    set_step_mode(lif, "single")
    with pytest.raises(RuntimeError, match="call harness.snn.begin_sequence"):
        lif(torch.zeros(2, 3))


def test_sigmoid_surrogate_gradient():
    x = torch.linspace(-2, 2, 9, requires_grad=True)
    s = spike(x, alpha=4.0)
    assert s.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1]
    s.sum().backward()
    sg = torch.sigmoid(4.0 * x.detach())
    assert torch.allclose(x.grad, 4.0 * sg * (1 - sg))


def test_gradient_through_membrane_and_detached_variants():
    # d s[2] / d x[1] flows through u[1] -> u[2] unless the membrane is detached (online, Eq. 6).
    def grad_first_input(**kw):
        lif = LIFNeuron(FixedThreshold(1.0), tau=2.0, **kw)
        x = torch.tensor([[0.5], [0.7]], requires_grad=True)
        s = run_sequence(lif, x, "single")
        s[1].sum().backward()
        return x.grad[0].item()

    u2 = 0.5 * 0.5 + 0.7
    sg = torch.sigmoid(torch.tensor(4.0 * (u2 - 1.0))).item()
    assert grad_first_input() == pytest.approx(0.5 * 4.0 * sg * (1 - sg), rel=1e-5)
    assert grad_first_input(detach_membrane=True) == 0.0


@pytest.mark.parametrize("x0", [1.2, 0.4])  # fires at t = 1, or not
def test_detach_reset_removes_the_reset_terms_surrogate_gradient(x0):
    def grad(detach_reset):
        lif = LIFNeuron(FixedThreshold(1.0), tau=2.0, detach_reset=detach_reset)
        x = torch.tensor([[x0], [0.5]], requires_grad=True)
        run_sequence(lif, x)[1].sum().backward()
        return x.grad[0].item()

    def sg(v):
        s = torch.sigmoid(torch.tensor(4.0 * v)).item()
        return 4.0 * s * (1 - s)

    # Soft reset v1 = u1 - s1*theta, u2 = 0.5*v1 + 0.5, s2 = H(u2 - 1).
    u1 = x0
    u2 = 0.5 * (u1 - (1.0 if u1 >= 1.0 else 0.0)) + 0.5
    assert grad(True) == pytest.approx(sg(u2 - 1) * 0.5, rel=1e-5)  # dv1/du1 = 1
    assert grad(False) == pytest.approx(sg(u2 - 1) * 0.5 * (1 - sg(u1 - 1)), rel=1e-5)  # dv1/du1 = 1 - sg*theta


def test_lif_rejects_bad_parameters():
    with pytest.raises(ValueError, match="reset must be 'soft' or 'hard'"):
        LIFNeuron(FixedThreshold(), reset="zero")
    with pytest.raises(ValueError, match="tau must be >= 1"):
        LIFNeuron(FixedThreshold(), tau=0.5)


# ---------------------------------------------------------------------------------------------
# Vanilla BN in the online setting (docs/method.md section 4)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 8, 4), (3, 8, 4, 5, 5)])
def test_vanilla_bn_training_uses_each_steps_own_statistics(shape):
    torch.manual_seed(0)
    bn = VanillaBatchNorm(4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    x = torch.randn(shape) * 3 + 1
    y = run_sequence(bn, x, "sequence")
    dims = (0, *range(2, len(shape) - 1))
    for t in range(shape[0]):
        ref = F.batch_norm(x[t], None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
        assert torch.allclose(y[t], ref, atol=1e-5)
    # Running statistics: once per sequence, the step-averaged mean and biased variance, momentum 0.1.
    means = torch.stack([x[t].mean(dim=dims) for t in range(shape[0])]).mean(0)
    vars_ = torch.stack([x[t].var(dim=dims, unbiased=False) for t in range(shape[0])]).mean(0)
    assert torch.allclose(bn.running_mean, 0.1 * means, atol=1e-6)
    assert torch.allclose(bn.running_var, 0.9 + 0.1 * vars_, atol=1e-6)


def test_vanilla_bn_eps_is_the_official_codes_1e_4():
    """A channel whose variance is of the order of eps tells 1e-4 from PyTorch's 1e-5."""
    bn = VanillaBatchNorm(2)
    assert bn.eps == 1e-4
    x = torch.randn(2, 16, 2) * torch.tensor([1e-2, 1.0])  # [T, B, C]: channel 0 has variance ~1e-4
    y = run_sequence(bn, x, "sequence")
    for t in range(2):
        mean, var = x[t].mean(0), x[t].var(0, unbiased=False)
        torch.testing.assert_close(y[t], (x[t] - mean) / torch.sqrt(var + 1e-4), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(y[t][:, 0], ((x[t] - mean) / torch.sqrt(var + 1e-5))[:, 0], atol=1e-2)
    assert bn.num_batches_tracked.item() == 1


def test_vanilla_bn_same_numbers_in_both_step_modes_and_updates_only_at_the_end():
    torch.manual_seed(1)
    x = torch.randn(4, 6, 3, 5, 5, requires_grad=True)
    a, b = VanillaBatchNorm(3), VanillaBatchNorm(3)
    ya = run_sequence(a, x, "sequence")
    set_step_mode(b, "single")
    begin_sequence(b, 4)
    yb = []
    for t in range(4):
        yb.append(b(x[t]))
        assert torch.equal(b.running_mean, torch.zeros(3))  # not before t = T
    end_sequence(b)
    yb = torch.stack(yb)
    assert torch.allclose(ya, yb, atol=1e-6)
    assert torch.allclose(a.running_mean, b.running_mean) and torch.allclose(a.running_var, b.running_var)
    ga = torch.autograd.grad(ya.square().sum(), x)[0]
    gb = torch.autograd.grad(yb.square().sum(), x)[0]
    assert torch.allclose(ga, gb, atol=1e-5)


def test_vanilla_bn_eval_uses_running_statistics():
    bn = VanillaBatchNorm(2)
    bn.running_mean.copy_(torch.tensor([1.0, -1.0]))
    bn.running_var.copy_(torch.tensor([4.0, 0.25]))
    bn.eval()
    x = torch.randn(3, 5, 2)
    y = run_sequence(bn, x)
    expected = (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
    assert torch.allclose(y, expected, atol=1e-6)
    assert bn.num_batches_tracked.item() == 0  # eval never updates


# ---------------------------------------------------------------------------------------------
# TET loss (Eq. 5)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("w", [0.0, 0.05, 0.5])
def test_tet_loss_matches_direct_formula(w):
    torch.manual_seed(0)
    T, B, K = 4, 6, 5
    o = torch.randn(T, B, K)
    y = torch.randint(0, K, (B,))
    total = 0.0
    for t in range(T):
        for b in range(B):
            logp = o[t, b, y[b]].item() - math.log(sum(math.exp(v) for v in o[t, b].tolist()))
            ce = -logp
            mse = sum((o[t, b, k].item() - (1.0 if k == y[b] else 0.0)) ** 2 for k in range(K)) / K
            total += (1 - w) * ce + w * mse
    expected = total / (T * B)
    loss = TETLoss(mse_weight=w)
    assert loss(o, y).item() == pytest.approx(expected, rel=1e-5)
    per_step = torch.stack([loss.step(o[t], y) for t in range(T)]).mean()
    assert per_step.item() == pytest.approx(expected, rel=1e-5)


def test_tet_rejects_bad_weight():
    with pytest.raises(ValueError, match=r"mse_weight must be in \[0, 1\]"):
        TETLoss(mse_weight=2.0)


# ---------------------------------------------------------------------------------------------
# A whole network: the two step modes agree
# ---------------------------------------------------------------------------------------------


def _net(reset="soft"):
    layers = LayerFactory(
        normalizer=lambda c: VanillaBatchNorm(c),
        neuron=lambda: LIFNeuron(FixedThreshold(1.0), reset=reset),
    )
    return vgg_small(1, 10, (8, 8), layers, channels=[4, 8])


def test_network_gives_the_same_outputs_and_gradients_in_both_step_modes():
    torch.manual_seed(0)
    net = _net()
    x = torch.randn(3, 5, 1, 8, 8)
    net.train()
    out_seq = run_sequence(net, x, "sequence")
    g_seq = torch.autograd.grad(out_seq.sum(), list(net.parameters()))
    out_single = run_sequence(net, x, "single")
    g_single = torch.autograd.grad(out_single.sum(), list(net.parameters()))
    assert out_seq.shape == (3, 5, 10)
    assert torch.allclose(out_seq, out_single, atol=1e-5)
    for a, b in zip(g_seq, g_single):
        assert torch.allclose(a, b, atol=1e-5)


def test_synapses_run_once_on_the_folded_sequence_in_sequence_mode():
    net = _net()
    conv = net[0].module
    calls = []
    conv.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    run_sequence(net, torch.randn(3, 5, 1, 8, 8), "sequence")
    assert calls == [torch.Size([15, 1, 8, 8])]
    calls.clear()
    run_sequence(net, torch.randn(3, 5, 1, 8, 8), "single")
    assert calls == [torch.Size([5, 1, 8, 8])] * 3


def test_sequence_only_module_refuses_single_step_mode():
    class SeqOnly(VanillaBatchNorm):
        step_modes = frozenset({"sequence"})

    layers = LayerFactory(normalizer=lambda c: SeqOnly(c), neuron=lambda: LIFNeuron(FixedThreshold()))
    net = vgg_small(1, 10, (8, 8), layers, channels=[4])
    with pytest.raises(ValueError, match=r"SeqOnly supports step modes \['sequence'\], not 'single' \(it needs the whole sequence at once\)"):
        run_sequence(net, torch.randn(2, 3, 1, 8, 8), "single")


def test_spiking_sequential_refuses_plain_containers_of_neurons():
    from torch import nn

    from harness.snn import SpikingSequential

    with pytest.raises(TypeError, match="Sequential holds stateful spiking modules but is not a SpikingSequential"):
        SpikingSequential(nn.Sequential(nn.Linear(2, 2), _lif("soft")))
    nested = SpikingSequential(SpikingSequential(nn.Linear(2, 2), _lif("soft")), nn.Linear(2, 3))
    assert run_sequence(nested, torch.randn(4, 5, 2)).shape == (4, 5, 3)


def test_a_sequence_only_threshold_policy_still_loops_over_time():
    class SeqOnlyPolicy(FixedThreshold):
        step_modes = frozenset({"sequence"})

    lif = LIFNeuron(SeqOnlyPolicy(1.0), tau=2.0)
    assert lif.step_modes == frozenset({"sequence"})
    out = run_sequence(lif, torch.tensor(X).view(5, 1, 1), "sequence")
    assert out.flatten().tolist() == TRACES["soft"][1]
