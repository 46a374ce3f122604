"""OSR against the paper's equations (Eqs. 8-15, Algorithms 1-2; docs/method.md section 5)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness.snn import begin_sequence, collect_epoch_metrics, end_sequence, run_sequence, set_step_mode
from snn_harness_plugins.normalizers import OnlineSpikingRenormalization as OSR

torch.set_default_dtype(torch.float32)
C = 3
RUN_MEAN = torch.tensor([0.5, -0.2, 0.1])
RUN_VAR = torch.tensor([2.0, 0.5, 1.5])


def _osr(**kw) -> OSR:
    torch.manual_seed(0)
    n = OSR(C, fallback_ratio=kw.pop("fallback_ratio", "none"), **kw)
    n.running_mean.copy_(RUN_MEAN)
    n.running_var.copy_(RUN_VAR)
    with torch.no_grad():
        n.weight.uniform_(0.5, 2.0)
        n.bias.uniform_(-1.0, 1.0)
    return n


def _view(t, ndim, dim):
    shape = [1] * ndim
    shape[dim] = -1
    return t.view(shape)


def _inputs(shape=(4, 8, C, 5, 5), seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 2 + 0.3


@pytest.mark.parametrize("shape", [(4, 8, C, 5, 5), (4, 8, C)])
@pytest.mark.parametrize("mode", ["single", "sequence"])
def test_training_output_equals_the_inference_transform(shape, mode):
    n = _osr()
    x = _inputs(shape)
    y = run_sequence(n, x, mode)
    ref = _view(n.weight, x.ndim, 2) * (x - _view(RUN_MEAN, x.ndim, 2)) / torch.sqrt(_view(RUN_VAR, x.ndim, 2) + n.eps) + _view(n.bias, x.ndim, 2)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)  # Eq. 8 == Eq. 9 in value


def _hand_gradients(x, G, gamma, run_var, eps, factor=True):
    """Eqs. 10-12 at one step: x [B, C, H, W], upstream gradient G = dL/dĨ."""
    dims = (0, 2, 3)
    mu = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    std = torch.sqrt(var + eps)
    x_hat = (x - mu) / std
    r = std / torch.sqrt(_view(run_var, 4, 1) + eps)
    shift = (mu - _view(RUN_MEAN, 4, 1)) / torch.sqrt(_view(run_var, 4, 1) + eps)
    g_hat = G * _view(gamma, 4, 1) * (r if factor else 1.0)  # dL/dÎ
    dx = (g_hat - g_hat.mean(dims, keepdim=True) - x_hat * (g_hat * x_hat).mean(dims, keepdim=True)) / std
    dgamma = (G * (x_hat * r + shift)).sum(dims)
    dbeta = G.sum(dims)
    return dx, dgamma, dbeta


def test_gradients_follow_eqs_10_to_12_and_differ_from_plain_bn():
    n = _osr()
    x = _inputs((1, 8, C, 5, 5))[0].requires_grad_(True)
    G = torch.randn_like(x)
    set_step_mode(n, "single")
    begin_sequence(n, 1)
    (n(x) * G).sum().backward()
    end_sequence(n)
    dx, dgamma, dbeta = _hand_gradients(x.detach(), G, n.weight.detach(), RUN_VAR, n.eps)
    torch.testing.assert_close(x.grad, dx, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(n.weight.grad, dgamma, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(n.bias.grad, dbeta, atol=1e-4, rtol=1e-4)
    # Plain BN's input gradient lacks the factor sqrt(var+eps)/sqrt(run_var+eps).
    xb = x.detach().clone().requires_grad_(True)
    (F.batch_norm(xb, None, None, n.weight.detach(), n.bias.detach(), True, 0.0, n.eps) * G).sum().backward()
    assert not torch.allclose(xb.grad, x.grad, atol=1e-3)


def test_official_gamma_gradient_variant_drops_the_ratio_on_its_first_term():
    n = _osr(gamma_grad="official")
    x = _inputs((1, 8, C, 5, 5))[0].requires_grad_(True)
    G = torch.randn_like(x)
    y = run_sequence(n, x.unsqueeze(0), "single")[0]
    (y * G).sum().backward()
    dims = (0, 2, 3)
    xd = x.detach()
    mu, var = xd.mean(dims, keepdim=True), xd.var(dims, unbiased=False, keepdim=True)
    x_hat = (xd - mu) / torch.sqrt(var + n.eps)
    shift = (mu - _view(RUN_MEAN, 4, 1)) / torch.sqrt(_view(RUN_VAR, 4, 1) + n.eps)
    torch.testing.assert_close(n.weight.grad, (G * (x_hat + shift)).sum(dims), atol=1e-4, rtol=1e-4)
    dx, _, _ = _hand_gradients(xd, G, n.weight.detach(), RUN_VAR, n.eps)
    torch.testing.assert_close(x.grad, dx, atol=1e-5, rtol=1e-4)  # input gradient unchanged
    ref = _osr()
    torch.testing.assert_close(y, run_sequence(ref, x.detach().unsqueeze(0), "single")[0], atol=1e-6, rtol=1e-6)


def test_all_time_statistics_equal_those_of_the_stacked_sequence_and_update_once_at_T():
    n = _osr()
    x = _inputs()
    set_step_mode(n, "single")
    begin_sequence(n, x.shape[0])
    for t in range(x.shape[0]):
        n(x[t])
        assert torch.equal(n.running_mean, RUN_MEAN) and torch.equal(n.running_var, RUN_VAR)  # not before T
    end_sequence(n)
    stacked = x.transpose(0, 2).reshape(C, -1)  # all T*B*H*W elements of each channel
    torch.testing.assert_close(n.running_mean, 0.9 * RUN_MEAN + 0.1 * stacked.mean(1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(n.running_var, 0.9 * RUN_VAR + 0.1 * stacked.var(1, unbiased=False), atol=1e-5, rtol=1e-5)
    assert n.num_batches_tracked.item() == 1


def test_both_execution_modes_give_identical_outputs_gradients_and_buffers():
    a, b = _osr(fallback_ratio=20.0), _osr(fallback_ratio=20.0)
    x = _inputs().requires_grad_(True)
    G = torch.randn_like(x)
    ya = run_sequence(a, x, "sequence")
    ga = torch.autograd.grad((ya * G).sum(), [x, a.weight, a.bias])
    yb = run_sequence(b, x, "single")
    gb = torch.autograd.grad((yb * G).sum(), [x, b.weight, b.bias])
    torch.testing.assert_close(ya, yb, atol=1e-6, rtol=1e-6)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.running_mean, b.running_mean)
    torch.testing.assert_close(a.running_var, b.running_var)


def test_eval_uses_running_statistics_only():
    n = _osr()
    n.eval()
    x1, x2 = _inputs(seed=1), _inputs(seed=2)
    y1 = run_sequence(n, x1)
    ref = _view(n.weight, 5, 2) * (x1 - _view(RUN_MEAN, 5, 2)) / torch.sqrt(_view(RUN_VAR, 5, 2) + n.eps) + _view(n.bias, 5, 2)
    torch.testing.assert_close(y1, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run_sequence(n, x2)[:, :1], run_sequence(n, torch.cat([x2[:, :1], x1[:, 1:]], 1))[:, :1])
    assert n.num_batches_tracked.item() == 0 and torch.equal(n.running_mean, RUN_MEAN)


def test_fallback_switches_exactly_at_the_ratio_bound():
    x = _inputs((1, 8, C, 5, 5))
    std = torch.sqrt(x[0].var((0, 2, 3), unbiased=False) + 1e-4)
    spread = torch.maximum(std / torch.sqrt(RUN_VAR + 1e-4), torch.sqrt(RUN_VAR + 1e-4) / std).max().item()
    plain = None
    for bound, falls_back in ((spread * (1 + 1e-4), False), (spread * (1 - 1e-4), True)):
        n = _osr(fallback_ratio=bound)
        y = run_sequence(n, x, "single")
        if plain is None:
            plain = F.batch_norm(x[0], None, None, n.weight, n.bias, True, 0.0, n.eps).detach()
        osr_value = _osr()
        expected = plain if falls_back else run_sequence(osr_value, x, "single")[0]
        torch.testing.assert_close(y[0].detach(), expected.detach(), atol=1e-5, rtol=1e-5)
        assert collect_epoch_metrics(n) == {"osr_fallback_rate/model": float(falls_back), "osr_fallback_rate": float(falls_back)}


def test_zero_variance_step_is_finite_and_falls_back():
    n = _osr(fallback_ratio=20.0)
    x = torch.ones(2, 4, C, 3, 3).requires_grad_(True)  # a deep layer before anything spiked: only the bias
    y = run_sequence(n, x, "single")
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all() and torch.isfinite(n.weight.grad).all()
    torch.testing.assert_close(y.detach(), _view(n.bias.detach(), 5, 2).expand_as(y))  # plain BN of a constant
    assert n.epoch_metrics() == {"osr_fallback_rate": 1.0}
    assert torch.isfinite(n.running_var).all()


def test_linear_only_ablation_passes_gradients_through_the_affine_map():
    n = _osr(mode="linear")
    x = _inputs((2, 8, C, 5, 5)).requires_grad_(True)
    y = run_sequence(n, x, "single")
    y.sum().backward()
    expected = (n.weight.detach() / torch.sqrt(RUN_VAR + n.eps)).view(1, 1, C, 1, 1).expand_as(x)
    torch.testing.assert_close(x.grad, expected)
    assert n.num_batches_tracked.item() == 1  # it still tracks the all-time statistics


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="fallback_ratio must be a number > 1 or 'none'"):
        OSR(4, fallback_ratio=0.5)
    with pytest.raises(ValueError, match="mode must be 'renorm' or 'linear'"):
        OSR(4, mode="batch")


# -- the running-statistics momentum warm-up (a deviation from the paper, off by default) -------


def _train(n, batches):
    for x in batches:
        run_sequence(n, x, "sequence")


def test_the_momentum_warm_up_ramps_from_its_start_to_the_papers_value_then_stays():
    """Update k (0-based) of N = 4: momentum 0.5 + (0.1 - 0.5) * min(k, 4) / 4, i.e. 0.5, 0.4,
    0.3, 0.2, then 0.1 (the paper's) for every later one."""
    batches = [_inputs(seed=s) for s in range(7)]
    n = _osr(momentum_warmup_batches=4)
    run_mean, run_var = RUN_MEAN.clone(), RUN_VAR.clone()
    for k, x in enumerate(batches):
        run_sequence(n, x, "sequence")
        m = [0.5, 0.4, 0.3, 0.2][k] if k < 4 else 0.1
        stacked = x.transpose(0, 2).reshape(C, -1)
        run_mean = (1 - m) * run_mean + m * stacked.mean(1)
        run_var = (1 - m) * run_var + m * stacked.var(1, unbiased=False)
        torch.testing.assert_close(n.running_mean, run_mean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(n.running_var, run_var, atol=1e-5, rtol=1e-5)
    assert n.num_batches_tracked.item() == 7
    paper = _osr()  # off by default: the paper's 0.1 from the first batch, bit for bit as before
    assert paper.momentum_warmup_batches == 0 and paper._momentum() == 0.1
    _train(paper, batches[:1])
    stacked = batches[0].transpose(0, 2).reshape(C, -1)
    torch.testing.assert_close(paper.running_mean, 0.9 * RUN_MEAN + 0.1 * stacked.mean(1), atol=1e-6, rtol=1e-6)


def test_a_warm_up_interrupted_by_a_checkpoint_continues_where_it_was():
    batches = [_inputs(seed=s) for s in range(5)]
    whole = _osr(momentum_warmup_batches=3, momentum_start=0.7, momentum=0.2)
    _train(whole, batches)
    first = _osr(momentum_warmup_batches=3, momentum_start=0.7, momentum=0.2)
    _train(first, batches[:2])
    resumed = OSR(C, fallback_ratio="none", momentum_warmup_batches=3, momentum_start=0.7, momentum=0.2)
    resumed.load_state_dict(first.state_dict())  # num_batches_tracked travels with the buffers
    _train(resumed, batches[2:])
    assert torch.equal(resumed.running_mean, whole.running_mean) and torch.equal(resumed.running_var, whole.running_var)
    assert "momentum_warmup_batches=3, momentum_start=0.7" in repr(whole)


def test_the_warm_up_options_are_checked_where_the_matrix_is_read():
    from harness import ConfigError, get_registry
    from harness.matrix import expand

    def matrix(opts):
        return {"defaults": {"dataset": "digits", "model": "vgg_small", "normalizer": "osr", "trainer": "online",
                             "epochs": 1, "batch_size": 8, "time_steps": 2},
                "options": {"normalizer": {"osr": opts}}}

    registry = get_registry()
    (cell,) = expand(matrix({"momentum_warmup_batches": 200}), registry, source="m.toml").cells
    assert cell.config.normalizer.options["momentum_warmup_batches"] == 200
    assert cell.config.normalizer.options["momentum_start"] == 0.5
    with pytest.raises(ConfigError, match=r"option 'momentum_warmup_batches' of normalizer 'osr'.*at least 0"):
        expand(matrix({"momentum_warmup_batches": -1}), registry, source="m.toml")
    with pytest.raises(ConfigError, match=r"option 'momentum_start' of normalizer 'osr'.*in \(0, 1\]"):
        expand(matrix({"momentum_start": 0.0}), registry, source="m.toml")
    with pytest.raises(ValueError, match=r"momentum_start must be in \(0, 1\]"):
        OSR(4, momentum_start=1.5)
