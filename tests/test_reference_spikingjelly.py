"""Our online gradients against SpikingJelly's reference implementations (test-only dependency):
the ``trace`` rule against ``OTTTLIFNode`` + ``OTTTSequential``, the ``spatial`` rule against
``SLTTLIFNode``, with SpikingJelly's options set to ours (tau 2, input not decayed, soft reset,
sigmoid surrogate alpha 4, detached reset)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from harness.snn import LIFNeuron, SpikingSequential
from snn_harness_plugins.losses import TETLoss
from snn_harness_plugins.thresholds import FixedThreshold
from snn_harness_plugins.trainers import OnlineTrainer

from spikingjelly.activation_based import functional as sj_functional
from spikingjelly.activation_based import layer as sj_layer
from spikingjelly.activation_based import neuron as sj_neuron
from spikingjelly.activation_based import surrogate as sj_surrogate

THETA, TAU, T = 0.5, 2.0, 4


def _ours():
    torch.manual_seed(7)
    return SpikingSequential(
        nn.Linear(3, 6), LIFNeuron(FixedThreshold(THETA), tau=TAU), nn.Linear(6, 5),
        LIFNeuron(FixedThreshold(THETA), tau=TAU), nn.Linear(5, 2),
    )


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.rand(T, 8, 3, generator=g) * 1.5, torch.randint(0, 2, (8,), generator=g)


def _reference_grads(seq: nn.Module, x, y) -> list[torch.Tensor]:
    loss_fn = TETLoss(0.05)
    seq.train()
    for t in range(T):
        out = seq(x[t])
        (loss_fn.step(out, y) / T).backward()
    sj_functional.reset_net(seq)
    return [m.weight.grad for m in seq if isinstance(m, nn.Linear)]


def _our_grads(gradient: str, net: nn.Module, x, y) -> list[torch.Tensor]:
    OnlineTrainer(gradient=gradient).train_batch(net, x, y, TETLoss(0.05), torch.optim.SGD(net.parameters(), lr=0.0))
    return [m.module.weight.grad for m in net if hasattr(m, "module") and isinstance(m.module, nn.Linear)]


def _linears(net):
    return [copy.deepcopy(m.module) for m in net if hasattr(m, "module") and isinstance(m.module, nn.Linear)]


def _sj_node(cls, **kw):
    return cls(tau=TAU, decay_input=False, v_threshold=THETA, v_reset=None,
               surrogate_function=sj_surrogate.Sigmoid(alpha=4.0), detach_reset=True, step_mode="s", **kw)


def test_trace_rule_matches_spikingjelly_ottt():
    net = _ours()
    l1, l2, l3 = _linears(net)
    reference = sj_layer.OTTTSequential(l1, _sj_node(sj_neuron.OTTTLIFNode), l2, _sj_node(sj_neuron.OTTTLIFNode), l3)
    x, y = _data()
    ref = _reference_grads(reference, x, y)
    ours = _our_grads("trace", net, x, y)
    assert all(g.abs().sum() > 0 for g in ref)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_spatial_rule_matches_spikingjelly_sltt():
    net = _ours()
    l1, l2, l3 = _linears(net)
    reference = nn.Sequential(l1, _sj_node(sj_neuron.SLTTLIFNode), l2, _sj_node(sj_neuron.SLTTLIFNode), l3)
    x, y = _data()
    ref = _reference_grads(reference, x, y)
    ours = _our_grads("spatial", net, x, y)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # The two rules really differ on this network.
    net2 = _ours()
    trace = _our_grads("trace", net2, x, y)
    assert not torch.allclose(trace[1], ours[1])
