"""The online trainer: Eq. 7 gradients, per-step updates, memory flat in T, OTTT trace gradients."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
from torch import nn

from harness.snn import LayerFactory, LIFNeuron, SpikingSequential, run_sequence
from snn_harness_plugins.losses import TETLoss
from snn_harness_plugins.models import vgg_small
from snn_harness_plugins.normalizers import OnlineSpikingRenormalization, VanillaBatchNorm
from snn_harness_plugins.thresholds import FixedThreshold, OnlineThresholdStabilizer
from snn_harness_plugins.trainers import BPTTTrainer, OnlineTrainer

NORMS = {"vanilla_bn": VanillaBatchNorm, "osr": OnlineSpikingRenormalization}
POLICIES = {"fixed": lambda: FixedThreshold(0.5), "ots": lambda: OnlineThresholdStabilizer(0.5)}


def _net(norm="vanilla_bn", policy="fixed", channels=(4, 8)):
    torch.manual_seed(0)
    layers = LayerFactory(normalizer=lambda c: NORMS[norm](c), neuron=lambda: LIFNeuron(POLICIES[policy]()))
    return vgg_small(1, 10, (8, 8), layers, channels=list(channels))


def _batch(T=3, B=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, 1, 8, 8, generator=g)
    return x.unsqueeze(0).expand(T, *x.shape), torch.randint(0, 10, (B,), generator=g)


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("policy", list(POLICIES))
def test_accumulated_gradients_equal_bptt_with_the_membrane_detached(norm, policy):
    online_net = _net(norm, policy)
    bptt_net = copy.deepcopy(online_net)
    inputs, target = _batch()
    loss_fn = TETLoss(0.05)
    OnlineTrainer().train_batch(online_net, inputs, target, loss_fn, torch.optim.SGD(online_net.parameters(), lr=0.0))

    for m in bptt_net.modules():  # Eq. 7: BPTT without the temporal path through u
        if isinstance(m, LIFNeuron):
            m.detach_membrane = True
    bptt_net.train()
    loss_fn(run_sequence(bptt_net, inputs, "sequence"), target).backward()
    grads = [(n, p.grad) for n, p in online_net.named_parameters()]
    assert all(g is not None and g.abs().sum() > 0 for _, g in grads)
    for (name, g_online), p in zip(grads, bptt_net.parameters()):
        torch.testing.assert_close(g_online, p.grad, atol=1e-5, rtol=1e-4, msg=name)
    # and differ from full BPTT, which keeps the temporal path
    full = copy.deepcopy(online_net)
    for p in full.parameters():
        p.grad = None
    full.train()
    for m in full.modules():
        if isinstance(m, LIFNeuron):
            m.detach_membrane = False
    loss_fn(run_sequence(full, inputs, "sequence"), target).backward()
    assert any(not torch.allclose(a, p.grad, atol=1e-6) for (_, a), p in zip(grads, full.parameters()))


class _CountingSGD(torch.optim.SGD):
    steps = 0

    def step(self, closure=None):
        type(self).steps += 1
        return super().step(closure)


@pytest.mark.parametrize("update,expected", [("sequence", 1), ("step", 4)])
def test_update_schedule(update, expected):
    net = _net()
    inputs, target = _batch(T=4)
    _CountingSGD.steps = 0
    before = [p.detach().clone() for p in net.parameters()]
    result = OnlineTrainer(update=update).train_batch(net, inputs, target, TETLoss(), _CountingSGD(net.parameters(), lr=0.1))
    assert _CountingSGD.steps == expected
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert result.count == 16 and torch.isfinite(result.loss)


class _SavedBytes:
    """Peak bytes of tensors saved for backward that are alive at once (packed objects freed with the graph)."""

    def __init__(self) -> None:
        self.live = self.peak = 0

    def _free(self, n: int) -> None:
        self.live -= n

    def pack(self, t: torch.Tensor):
        n = t.numel() * t.element_size()
        self.live += n
        self.peak = max(self.peak, self.live)
        box = _Box(t)
        weakref.finalize(box, self._free, n)
        return box

    @staticmethod
    def unpack(box):
        return box.t


class _Box:
    def __init__(self, t):
        self.t = t


def _peak_saved_bytes(trainer, T: int) -> int:
    net = _net(channels=(4,))
    inputs, target = _batch(T=T, B=8)
    meter = _SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        trainer.train_batch(net, inputs, target, TETLoss(), torch.optim.SGD(net.parameters(), lr=0.0))
    return meter.peak


def test_online_memory_is_flat_in_T_while_bptt_grows_linearly():
    online = {T: _peak_saved_bytes(OnlineTrainer(), T) for T in (2, 4, 8)}
    bptt = {T: _peak_saved_bytes(BPTTTrainer(), T) for T in (2, 4, 8)}
    assert online[8] <= online[2] * 1.05
    assert bptt[8] >= 3.5 * bptt[2] and bptt[4] >= 1.8 * bptt[2]
    assert online[2] < bptt[2]


def test_trace_gradient_matches_a_hand_computed_two_layer_example():
    torch.manual_seed(3)
    net = SpikingSequential(nn.Linear(3, 4), LIFNeuron(FixedThreshold(0.5), tau=2.0), nn.Linear(4, 2))
    x = torch.rand(3, 5, 3).mul(2.0)  # [T, B, 3]
    y = torch.randint(0, 2, (5,))
    loss_fn = TETLoss(0.0)
    OnlineTrainer(gradient="trace").train_batch(net, x, y, loss_fn, torch.optim.SGD(net.parameters(), lr=0.0))
    lin1, lif, lin2 = net[0].module, net[1], net[2].module

    # By hand: spikes of layer 1, their trace a[t] = 0.5 a[t-1] + s[t], the readout gradient per step.
    with torch.no_grad():
        u, v, s_seq = None, None, []
        for t in range(3):
            i1 = lin1(x[t])
            u = i1 if u is None else 0.5 * v + i1
            s = (u >= 0.5).float()
            v = u - s * 0.5
            s_seq.append(s)
    a, grad_w2, grad_w2_spatial, grad_b2 = None, 0, 0, 0
    for t in range(3):
        a = s_seq[t] if a is None else 0.5 * a + s_seq[t]
        o = lin2(s_seq[t]).detach().requires_grad_(True)
        (g_o,) = torch.autograd.grad(loss_fn.step(o, y) / 3, o)
        grad_w2 = grad_w2 + g_o.T @ a
        grad_w2_spatial = grad_w2_spatial + g_o.T @ s_seq[t]
        grad_b2 = grad_b2 + g_o.sum(0)
    assert any(s.sum() > 0 for s in s_seq)
    torch.testing.assert_close(lin2.weight.grad, grad_w2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lin2.bias.grad, grad_b2, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(grad_w2, grad_w2_spatial)  # the trace really changes the rule

    # The spatial rule on the same weights gives the instantaneous-spike gradient.
    for p in net.parameters():
        p.grad = None
    OnlineTrainer(gradient="spatial").train_batch(net, x, y, loss_fn, torch.optim.SGD(net.parameters(), lr=0.0))
    torch.testing.assert_close(lin2.weight.grad, grad_w2_spatial, atol=1e-6, rtol=1e-5)


def test_online_evaluation_runs_one_step_at_a_time_like_bptt_evaluation():
    net = _net("osr", "ots")
    inputs, target = _batch()
    loss_fn = TETLoss()
    OnlineTrainer().train_batch(net, inputs, target, loss_fn, torch.optim.SGD(net.parameters(), lr=0.05))
    a = OnlineTrainer().eval_batch(net, inputs, target, loss_fn)
    b = BPTTTrainer().eval_batch(net, inputs, target, loss_fn)
    torch.testing.assert_close(a.loss, b.loss)
    assert int(a.correct) == int(b.correct)
