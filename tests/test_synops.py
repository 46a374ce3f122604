"""SynOpsMeter (harness/meters/synops.py) against hand counts, a brute-force loop over output
positions and taps, NeuroBench's own procedure (a binarized copy of the layer), and across the
two step modes."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

from harness.meters.synops import SynOpsMeter
from harness.snn import LIFNeuron, SpikingSequential, run_sequence
from snn_harness_plugins.thresholds import FixedThreshold


class _Heaviside(nn.Module):
    def forward(self, x):
        return (x > 0).float()


def _run(model, x, num_samples=None):
    meter = SynOpsMeter(model)
    with meter, torch.no_grad():
        model(x)
    return meter.metrics(num_samples if num_samples is not None else x.shape[0])


# ---------------------------------------------------------------------------------------------
# Hand counts
# ---------------------------------------------------------------------------------------------


def _two_layer_net():
    lin1, lin2 = nn.Linear(4, 3), nn.Linear(3, 2)
    with torch.no_grad():
        lin1.weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 1.0, -1.0], [-1.0, -1.0, -1.0, -1.0]]))
        lin1.bias.zero_()
        lin2.weight.copy_(torch.tensor([[0.5, -0.5, 2.0], [1.0, 1.0, -1.0]]))
    return nn.Sequential(lin1, _Heaviside(), lin2)


# Two samples, 3 nonzeros in all (real-valued: MACs).
#   sample 0: x = [.5, 0, -2, 0]  -> y = [-1.5, -1.5, 1.5] -> spikes [0, 0, 1]
#   sample 1: x = [0, 0, 0, 1.5]  -> y = [1.5, -1.5, -1.5] -> spikes [1, 0, 0]
X_HAND = torch.tensor([[0.5, 0.0, -2.0, 0.0], [0.0, 0.0, 0.0, 1.5]])


def test_hand_count_two_linear_layers():
    net = _two_layer_net()
    m = _run(net, X_HAND)
    # layer 0: 3 nonzero inputs x 3 outputs = 9 MACs over 2 samples; layer 2: 2 spikes x 2 outputs = 4 ACs
    assert m["synops_mac/0"] == 4.5 and m["synops_ac/0"] == 0.0
    assert m["synops_ac/2"] == 2.0 and m["synops_mac/2"] == 0.0
    assert m["synops_mac"] == 4.5 and m["synops_ac"] == 2.0 and m["synops"] == 6.5
    # Dense: (2 x 4 x 3 + 2 x 3 x 2) / 2 samples
    assert m["synops_dense"] == 18.0


def test_zero_weights_do_not_count_and_bias_is_not_an_operation():
    # NeuroBench binarizes the weights too: a spike reaching a zero weight costs nothing.
    net = _two_layer_net()
    with torch.no_grad():
        net[2].weight[0, 0] = 0.0  # sample 1's spike (feature 0) now feeds one output
        net[2].bias.fill_(3.0)
    m = _run(net, X_HAND)
    assert m["synops_ac/2"] == 1.5  # (2 + 1) / 2
    assert m["synops_dense"] == 18.0  # Dense ignores weight sparsity


def test_ac_or_mac_follows_neurobench_spiking_test():
    lin = nn.Linear(3, 5)
    # -1, 0 and 1 only: spiking (NeuroBench's binary_inputs admits -1) -> ACs
    m = _run(lin, torch.tensor([[1.0, -1.0, 0.0]]))
    assert (m["synops_ac"], m["synops_mac"]) == (10.0, 0.0)
    # one graded value makes the whole call MACs
    m = _run(lin, torch.tensor([[1.0, 0.5, 0.0], [1.0, 0.0, 0.0]]), num_samples=2)
    assert (m["synops_ac"], m["synops_mac"]) == (0.0, 7.5)
    # silence costs nothing
    m = _run(lin, torch.zeros(4, 3))
    assert (m["synops_ac"], m["synops_mac"], m["synops_dense"]) == (0.0, 0.0, 15.0)


# ---------------------------------------------------------------------------------------------
# Convolutions against a brute-force count
# ---------------------------------------------------------------------------------------------


def _brute_force_conv(conv: nn.Conv2d, x: torch.Tensor, dense: bool = False) -> int:
    """Loop over output positions and taps; count (output element, tap) pairs whose input lies
    inside the image and is nonzero (all of them if ``dense``) and whose weight is nonzero."""
    b, c_in, h, w = x.shape
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = conv.kernel_size, conv.stride, conv.dilation, conv.padding
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    per_group_in, per_group_out = c_in // conv.groups, conv.out_channels // conv.groups
    xs, ws = (x != 0).tolist(), (conv.weight != 0).tolist()
    n = 0
    for s in range(b):
        for o in range(conv.out_channels):
            g = o // per_group_out
            for c_local in range(per_group_in):
                c = g * per_group_in + c_local
                for ky in range(kh):
                    for kx in range(kw):
                        if not (ws[o][c_local][ky][kx] or dense):
                            continue
                        for oy in range(ho):
                            iy = oy * sh - ph + ky * dh
                            if not 0 <= iy < h:
                                continue
                            for ox in range(wo):
                                ix = ox * sw - pw + kx * dw
                                if 0 <= ix < w and (dense or xs[s][c][iy][ix]):
                                    n += 1
    return n


CONVS = {
    "pad1": dict(padding=1),
    "stride2": dict(padding=1, stride=2),
    "dilation2": dict(padding=1, dilation=2),
    "groups2": dict(padding=1, groups=2),
    "all": dict(padding=(2, 1), stride=(2, 1), dilation=(1, 2), groups=2),
}


@pytest.mark.parametrize("kw", CONVS.values(), ids=CONVS.keys())
def test_conv_matches_brute_force(kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, **kw)
    with torch.no_grad():
        conv.weight[conv.weight.abs() < 0.05] = 0.0  # a few pruned weights
    assert (conv.weight == 0).any()
    x = (torch.rand(2, 4, 7, 6) < 0.4).float()
    x[:, :, 0, 0] = 1.0  # a corner spike: borders must be right
    expected = _brute_force_conv(conv, x)
    m = _run(conv, x)
    assert m["synops_ac"] * 2 == expected and m["synops_mac"] == 0.0
    # Graded values at the same positions: the same count, as MACs.
    m = _run(conv, x * torch.rand_like(x).add(0.1))
    assert m["synops_mac"] * 2 == expected and m["synops_ac"] == 0.0


@pytest.mark.parametrize("kw", CONVS.values(), ids=CONVS.keys())
def test_dense_is_the_mac_count_ignoring_sparsity(kw):
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, **kw)
    with torch.no_grad():
        conv.weight[0] = 0.0  # Dense also ignores weight sparsity
    x = (torch.rand(3, 4, 7, 6) < 0.2).float()
    m = _run(conv, x)
    ones = torch.ones(3, 4, 7, 6)
    assert m["synops_dense"] * 3 == _brute_force_conv(conv, ones, dense=True)
    # With all-ones input and weights, the effective count is the dense one.
    dense_weights = copy.deepcopy(conv)
    with torch.no_grad():
        dense_weights.weight.fill_(0.5)
    m_ones = _run(dense_weights, ones * 0.5)
    assert m_ones["synops_mac"] == m["synops_dense"] == m_ones["synops_dense"]


def _neurobench_reference(layer: nn.Module, x: torch.Tensor, total: bool = False) -> float:
    """NeuroBench's stateless_layer_macs: run a copy of the layer with nonzero weights and inputs
    set to 1 (all to 1 if ``total``), bias zeroed, and sum its outputs."""
    binary = copy.deepcopy(layer)
    with torch.no_grad():
        binary.weight.copy_(torch.ones_like(binary.weight) if total else (binary.weight != 0).float())
        if binary.bias is not None:
            binary.bias.zero_()
        xb = torch.ones_like(x) if total else (x != 0).float()
        return float(binary(xb).sum())


NB_LAYERS = {
    "conv1d": lambda: nn.Conv1d(3, 4, 5, padding=2, stride=2),
    "conv1d_same_dil": lambda: nn.Conv1d(3, 4, 4, padding="same", dilation=2),
    "conv2d_same": lambda: nn.Conv2d(3, 4, (3, 4), padding="same"),
    "conv2d_reflect": lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
    "conv2d_circular": lambda: nn.Conv2d(4, 4, 3, padding=2, stride=2, groups=4, padding_mode="circular"),
    "conv2d_replicate": lambda: nn.Conv2d(3, 2, 5, padding=2, padding_mode="replicate", bias=False),
    "linear_3d_input": lambda: nn.Linear(6, 3),
}
NB_INPUTS = {"conv1d": (2, 3, 11), "conv1d_same_dil": (2, 3, 9), "linear_3d_input": (2, 5, 6)}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("name", NB_LAYERS)
def test_matches_neurobench_procedure(name):
    torch.manual_seed(2)
    layer = NB_LAYERS[name]()
    with torch.no_grad():
        layer.weight[layer.weight.abs() < 0.1] = 0.0
    x = torch.randn(NB_INPUTS.get(name, (2, 3 if "circular" not in name else 4, 6, 7)))
    x[x.abs() < 0.7] = 0.0
    m = _run(layer, x, num_samples=1)
    assert m["synops_mac"] == _neurobench_reference(layer, x) and m["synops_ac"] == 0.0
    assert m["synops_dense"] == _neurobench_reference(layer, x, total=True)


def test_unbatched_conv_input():
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x = (torch.rand(2, 5, 5) < 0.5).float()
    m = _run(conv, x, num_samples=1)
    assert m["synops_ac"] == _brute_force_conv(conv, x[None])


# ---------------------------------------------------------------------------------------------
# Step modes, per-sample normalisation, attach / detach / reset
# ---------------------------------------------------------------------------------------------


def _snn():
    torch.manual_seed(3)
    return SpikingSequential(
        nn.Conv2d(1, 4, 3, padding=1),
        LIFNeuron(FixedThreshold(0.5)),
        nn.Conv2d(4, 4, 3, padding=1, stride=2),
        LIFNeuron(FixedThreshold(0.2)),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
    )


def _run_snn(net, x_seq, mode):
    meter = SynOpsMeter(net)
    with meter, torch.no_grad():
        run_sequence(net, x_seq, mode)
    return meter.metrics(x_seq.shape[1])


def test_sequence_and_single_modes_give_the_same_counts():
    net = _snn().eval()
    x = torch.randn(4, 3, 1, 8, 8)  # T = 4, B = 3
    seq, single = _run_snn(net, x, "sequence"), _run_snn(net, x, "single")
    assert seq == single
    assert seq["synops_mac/0.module"] > 0 and seq["synops_ac/0.module"] == 0  # real-valued input
    assert seq["synops_ac/2.module"] > 0 and seq["synops_mac/2.module"] == 0  # spikes
    assert seq["synops_ac/5.module"] > 0
    # Dense, per sample summed over T = 4 steps. Valid (output, tap) pairs per axis: conv0 (8 -> 8,
    # pad 1) 8 + 7 + 7 = 22; conv2 (8 -> 4, stride 2, pad 1) 3 + 4 + 4 = 11.
    one_step = 22 * 22 * 1 * 4 + 11 * 11 * 4 * 4 + 64 * 5
    assert seq["synops_dense"] == 4 * one_step


def test_counts_are_per_sample():
    net = _snn().eval()
    x = torch.randn(4, 1, 1, 8, 8)
    once = _run_snn(net, x, "sequence")
    repeated = _run_snn(net, x.expand(4, 5, 1, 8, 8).contiguous(), "sequence")
    assert once == pytest.approx(repeated, rel=1e-12)


def test_detach_reset_and_keys():
    net = _snn().eval()
    x = torch.randn(2, 3, 1, 8, 8)
    meter = SynOpsMeter(net)
    keys = {"synops", "synops_ac", "synops_mac", "synops_dense"}
    for layer in ("0.module", "2.module", "5.module"):
        keys |= {f"synops_ac/{layer}", f"synops_mac/{layer}"}
    assert set(meter.metrics(0)) == keys and not any(meter.metrics(0).values())

    meter.attach()
    meter.attach()  # idempotent: no double counting
    with torch.no_grad():
        run_sequence(net, x, "sequence")
    first = meter.metrics(3)
    assert set(first) == keys and first["synops"] > 0
    with torch.no_grad():
        run_sequence(net, x, "sequence")
    assert meter.metrics(6) == pytest.approx(first)

    meter.detach()
    with torch.no_grad():
        run_sequence(net, x, "sequence")
    assert meter.metrics(6) == pytest.approx(first)  # nothing added while detached

    meter.reset()
    assert not any(meter.metrics(3).values())
    with meter, torch.no_grad():
        run_sequence(net, x, "sequence")
    assert meter.metrics(3) == pytest.approx(first)
    assert not meter._handles  # the context manager detached


def test_hooks_keep_no_input_alive():
    conv = nn.Conv2d(2, 3, 3, padding=1)
    meter = SynOpsMeter(conv)
    x = torch.rand(2, 2, 5, 5)
    ref = weakref.ref(x)
    with meter, torch.no_grad():
        conv(x)
    del x
    gc.collect()
    assert ref() is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_counts_match_cpu_and_hooks_never_sync():
    net = _snn().eval()
    x = torch.randn(3, 2, 1, 8, 8)
    cpu = _run_snn(net, x, "single")
    net_gpu, x_gpu = net.cuda(), x.cuda()
    assert _run_snn(net_gpu, x_gpu, "single") == pytest.approx(cpu)
    # The hook body alone, under CUDA's sync checker (the model's own ops are not under test).
    meter = SynOpsMeter(net_gpu)
    inputs = {"0.module": torch.randn(2, 1, 8, 8), "2.module": (torch.rand(2, 4, 8, 8) < 0.3).float()}
    inputs["5.module"] = (torch.rand(2, 64) < 0.3).float()
    inputs = {k: v.cuda() for k, v in inputs.items()}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for layer in meter.layers:
            layer.count(inputs[layer.name])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    m = meter.metrics(2)
    assert m["synops_mac/0.module"] > 0 and m["synops_ac/2.module"] > 0 and m["synops_ac/5.module"] > 0
