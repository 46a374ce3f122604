"""BNTT, tdBN and TEBN (docs/method.md section 7) against SpikingJelly's implementations, to 1e-5:
outputs in training and eval mode, running statistics after several batches, and gradients with
respect to input and parameters, for conv ([T, B, C, H, W]) and linear ([T, B, C]) inputs."""

from __future__ import annotations

import pytest
import torch
from spikingjelly.activation_based import functional as sj_functional
from spikingjelly.activation_based import layer as sj_layer

from harness.snn import run_sequence
from snn_harness_plugins.normalizers import (
    BatchNormThroughTime,
    TemporalEffectiveBatchNorm,
    ThresholdDependentBatchNorm,
    VanillaBatchNorm,
)

T, B, C = 4, 6, 3
SHAPES = {"conv": (T, B, C, 5, 5), "linear": (T, B, C)}
SJ = {
    ("bntt", "conv"): lambda: sj_layer.BatchNormThroughTime2d(T, C),
    ("bntt", "linear"): lambda: sj_layer.BatchNormThroughTime1d(T, C),
    ("tdbn", "conv"): lambda: sj_layer.ThresholdDependentBatchNorm2d(1.0, 0.5, C),
    ("tdbn", "linear"): lambda: sj_layer.ThresholdDependentBatchNorm1d(1.0, 0.5, C),
    ("tebn", "conv"): lambda: sj_layer.TemporalEffectiveBatchNorm2d(T, C),
    ("tebn", "linear"): lambda: sj_layer.TemporalEffectiveBatchNorm1d(T, C),
}
OURS = {
    "bntt": lambda: BatchNormThroughTime(C, time_steps=T),
    "tdbn": lambda: ThresholdDependentBatchNorm(C, v_threshold=0.5, alpha=1.0),
    "tebn": lambda: TemporalEffectiveBatchNorm(C, time_steps=T),
}


def _sync(name, ours, ref):
    """Give both the same (non-trivial) parameters."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        if name == "bntt":
            ours.weight.copy_(torch.rand(T, C, generator=g) + 0.5)
            for t, bn in enumerate(ref.bn_list):
                bn.weight.copy_(ours.weight[t])
        else:
            ours.weight.copy_(torch.rand(C, generator=g) + 0.5)
            ours.bias.copy_(torch.rand(C, generator=g) - 0.5)
            ref.weight.copy_(ours.weight)
            ref.bias.copy_(ours.bias)
            if name == "tebn":
                ours.scale.copy_(torch.rand(T, generator=g) + 0.5)
                ref.scale.copy_(ours.scale)


def _ref_forward(name, ref, x):
    if name == "bntt":  # single-step module: one call per step
        out = torch.stack([ref(x[t]) for t in range(x.shape[0])])
        sj_functional.reset_net(ref)
        return out
    return ref(x)


def _ours_forward(name, ours, x):
    return run_sequence(ours, x, "single" if name == "bntt" else "sequence")


def _ref_params(name, ref):
    if name == "bntt":
        return [torch.stack([bn.weight for bn in ref.bn_list])]
    return [ref.weight, ref.bias] + ([ref.scale] if name == "tebn" else [])


def _ref_stats(name, ref):
    if name == "bntt":
        return torch.stack([bn.running_mean for bn in ref.bn_list]), torch.stack([bn.running_var for bn in ref.bn_list])
    return ref.running_mean, ref.running_var


@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.parametrize("name", list(OURS))
def test_matches_spikingjelly(name, kind):
    ours, ref = OURS[name](), SJ[(name, kind)]()
    _sync(name, ours, ref)
    for batch in range(3):  # running statistics after several batches
        g = torch.Generator().manual_seed(10 + batch)
        x = (torch.randn(SHAPES[kind], generator=g) * 2 + 0.5).requires_grad_(True)
        x_ref = x.detach().clone().requires_grad_(True)
        y, y_ref = _ours_forward(name, ours, x), _ref_forward(name, ref, x_ref)
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        G = torch.randn_like(y)
        ours_params = [ours.weight] + ([ours.bias] if name != "bntt" else []) + ([ours.scale] if name == "tebn" else [])
        grads = torch.autograd.grad((y * G).sum(), [x, *ours_params])
        ref_leaves = [x_ref] + ([bn.weight for bn in ref.bn_list] if name == "bntt" else _ref_params(name, ref))
        ref_grads = torch.autograd.grad((y_ref * G).sum(), ref_leaves)
        if name == "bntt":
            ref_grads = (ref_grads[0], torch.stack(ref_grads[1:]))
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    mean, var = _ref_stats(name, ref)
    torch.testing.assert_close(ours.running_mean, mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.running_var, var, atol=1e-6, rtol=1e-5)
    ours.eval()
    ref.eval()
    x = torch.randn(SHAPES[kind]) * 2 + 0.5
    torch.testing.assert_close(_ours_forward(name, ours, x), _ref_forward(name, ref, x), atol=1e-5, rtol=1e-5)


def test_tdbn_initial_scale_is_alpha_times_the_cells_threshold(registry):
    from harness.config import CellConfig, Component
    from harness.runner import build_model
    from snn_harness_plugins.datasets import digits

    assert torch.equal(ThresholdDependentBatchNorm(4, v_threshold=0.5, alpha=0.7071).weight, torch.full((4,), 0.5 * 0.7071))
    cfg = CellConfig(
        dataset=Component("digits"), model=Component("vgg_small", {"channels": [4]}),
        normalizer=Component("tdbn", {"alpha": 1.0, "eps": 1e-5, "momentum": 0.1}),
        threshold=Component("fixed", {"theta": 0.25}), trainer=Component("bptt"), epochs=1, batch_size=4, time_steps=2,
    )
    model = build_model(cfg, registry, digits())
    (tdbn,) = [m for m in model.modules() if isinstance(m, ThresholdDependentBatchNorm)]
    assert torch.equal(tdbn.weight.detach(), torch.full((4,), 0.25))  # the cell's theta sets the scale


def test_vanilla_bn_differs_from_spikingjelly_single_step_bn_only_in_running_statistics():
    """Ours (the paper's Appendix C) updates running statistics once per sequence with the step
    average of the biased variances; SpikingJelly's single-step BatchNorm2d updates at every step
    (unbiased). Training outputs are the same: each step normalized with its own statistics."""
    ours, ref = VanillaBatchNorm(C), sj_layer.BatchNorm2d(C, eps=1e-4)  # the official code's eps, ours
    x = torch.randn(T, B, C, 5, 5) * 2 + 0.5
    y = run_sequence(ours, x, "single")
    y_ref = torch.stack([ref(x[t]) for t in range(T)])
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    assert ours.num_batches_tracked.item() == 1 and ref.num_batches_tracked.item() == T
    expected = torch.zeros(C)
    for t in range(T):
        expected = 0.9 * expected + 0.1 * x[t].mean((0, 2, 3))
    torch.testing.assert_close(ref.running_mean, expected)  # T updates
    torch.testing.assert_close(ours.running_mean, 0.1 * x.mean((0, 1, 3, 4)))  # one update with the step average
    assert not torch.allclose(ours.running_mean, ref.running_mean)


def test_bntt_refuses_more_steps_than_it_was_built_for():
    bntt = BatchNormThroughTime(C, time_steps=2)
    with pytest.raises(ValueError, match="bntt was built for 2 time steps; step 3 has no statistics of its own"):
        run_sequence(bntt, torch.randn(3, B, C), "single")
    bntt.eval()
    assert run_sequence(bntt, torch.randn(1, B, C), "single").shape == (1, B, C)  # shorter is fine


def test_whole_sequence_normalizers_are_skipped_under_the_online_trainer(registry, tiny_matrix):
    from harness.matrix import load_matrix

    path = tiny_matrix("""
        [matrix]
        normalizer = ["vanilla_bn", "osr", "bntt", "tdbn", "tebn"]
        trainer = ["bptt", "online"]
    """)
    m = load_matrix(path, registry)
    assert len(m.cells) == 8
    assert sorted(c.skip_reason for c in m.skipped) == [
        f"normalizer '{n}' runs only on the whole sequence, but trainer 'online' runs one step at a time" for n in ("tdbn", "tebn")
    ]
