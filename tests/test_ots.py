"""OTS against Eq. 16 (docs/method.md section 6)."""

from __future__ import annotations

import pytest
import torch

from harness.snn import LIFNeuron, run_sequence
from snn_harness_plugins.thresholds import FixedThreshold, OnlineThresholdStabilizer as OTS


class _Seen(OTS):
    """OTS that records the membrane potentials and thresholds of the last sequence."""

    def begin_sequence(self, time_steps):
        super().begin_sequence(time_steps)
        self.log = []

    def forward(self, u, t):
        theta = super().forward(u, t)
        self.log.append((u.detach().clone(), theta))
        return theta


def _drive(policy, x, mode="single"):
    lif = LIFNeuron(policy, tau=2.0)
    return lif, run_sequence(lif, x, mode)


def test_threshold_keeps_the_firing_quantile_of_step_one():
    torch.manual_seed(0)
    policy = _Seen(theta=1.0)
    x = torch.randn(5, 16, 8) * torch.linspace(0.5, 2.0, 5).view(5, 1, 1) + 0.4  # drifting statistics
    _drive(policy, x)
    (u1, theta1), *rest = policy.log
    assert float(theta1) == 1.0  # theta[1] = the base threshold
    r = (1.0 - u1.mean()) / u1.std()
    for u, theta in rest:
        assert float((theta - u.mean()) / u.std()) == pytest.approx(float(r), rel=1e-5)
    assert len({round(float(t), 6) for _, t in rest}) == len(rest)  # it really moves


def test_same_result_in_both_step_modes():
    x = torch.randn(4, 8, 6) + 0.5
    _, a = _drive(OTS(), x, "single")
    _, b = _drive(OTS(), x, "sequence")
    assert torch.equal(a, b)


def test_no_gradient_flows_into_the_statistics():
    torch.manual_seed(1)
    x = (torch.randn(3, 8, 6) + 0.8).requires_grad_(True)
    policy = _Seen()
    _, s = _drive(policy, x)
    (g_ots,) = torch.autograd.grad(s.sum(), x)
    thetas = [float(t) for _, t in policy.log]
    assert all(not torch.is_tensor(t) or not t.requires_grad for _, t in policy.log)

    class Replay(FixedThreshold):  # the same thresholds as constants
        def forward(self, u, t):
            return thetas[t]

    x2 = x.detach().clone().requires_grad_(True)
    _, s2 = _drive(Replay(), x2)
    (g_const,) = torch.autograd.grad(s2.sum(), x2)
    assert torch.equal(s, s2)
    torch.testing.assert_close(g_ots, g_const)


def test_running_thresholds_are_used_at_inference_when_asked_and_saved():
    torch.manual_seed(2)
    policy = OTS(eval_threshold="running", momentum=0.5)
    lif = LIFNeuron(policy)
    for _ in range(3):
        run_sequence(lif, torch.randn(4, 16, 8) + 0.5)
    assert policy.running_theta.shape == (4,) and float(policy.running_theta[0]) == 1.0
    trained = policy.running_theta.clone()

    lif.eval()
    log = []
    policy.register_forward_hook(lambda m, i, o: log.append(float(o)))
    for seed in (10, 11):  # two different test batches: the same thresholds
        g = torch.Generator().manual_seed(seed)
        run_sequence(lif, torch.randn(4, 5, 8, generator=g) * (seed - 8))
    assert log[:4] == log[4:] == trained.tolist()

    fresh = OTS(eval_threshold="running")
    fresh.load_state_dict(policy.state_dict())
    torch.testing.assert_close(fresh.running_theta, trained)

    dynamic = OTS(eval_threshold="dynamic")
    dynamic.load_state_dict(policy.state_dict())
    dyn_lif = LIFNeuron(dynamic).eval()
    log.clear()
    dynamic.register_forward_hook(lambda m, i, o: log.append(float(o)))
    for seed in (10, 11):
        g = torch.Generator().manual_seed(seed)
        run_sequence(dyn_lif, torch.randn(4, 5, 8, generator=g) * (seed - 8))
    assert log[1:4] != log[5:8]  # dynamic thresholds depend on the test batch


def test_running_mode_without_training_is_a_clear_error():
    lif = LIFNeuron(OTS(eval_threshold="running")).eval()
    with pytest.raises(RuntimeError, match="no running thresholds were trained"):
        run_sequence(lif, torch.randn(2, 3, 4))
