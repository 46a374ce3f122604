"""The ``tab`` normalizer (TAB, Jiang et al. 2024) against its authors' code: fixture tensors that
``tests/fixtures/make_tab_reference.py`` wrote by running the authors' ``TAB_Layer`` at a pinned
commit (training and evaluation values, gradients, running statistics); the formula by hand on
``[T, B, C]`` inputs; the whole-sequence declaration that keeps it out of online training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness.snn import run_sequence
from snn_harness_plugins.normalizers import TemporalAccumulatedBatchNorm as TAB

REFERENCE = torch.load(Path(__file__).parent / "fixtures" / "tab_reference.pt", weights_only=True)


def _tm(x: torch.Tensor) -> torch.Tensor:
    """The authors' [N, T, ...] as the harness's [T, N, ...] (and back: it is its own inverse)."""
    return x.transpose(0, 1)


def _ours() -> TAB:
    init = REFERENCE["init"]
    tab = TAB(init["weight"].shape[1], time_steps=init["weight"].shape[0]).double()
    with torch.no_grad():
        tab.weight.copy_(init["weight"])
        tab.bias.copy_(init["bias"])
        tab.p.copy_(init["p"])
    return tab


def test_training_and_evaluation_match_the_authors_code():
    ref = REFERENCE
    assert ref["commit"] == "f9b94ceb5cd3428e580e22a6cda27c6d7362d329"
    tab = _ours().train()
    y1 = run_sequence(tab, _tm(ref["x1"]), "sequence")
    torch.testing.assert_close(_tm(y1), ref["y1"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((tab.running_mean, tab.running_var), ref["running1"], rtol=1e-5, atol=1e-5)
    x2 = _tm(ref["x2"]).clone().requires_grad_(True)
    y2 = run_sequence(tab, x2, "sequence")
    (_tm(y2) * ref["grad"]).sum().backward()
    torch.testing.assert_close(_tm(y2.detach()), ref["y2"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((tab.running_mean, tab.running_var), ref["running2"], rtol=1e-5, atol=1e-5)
    grads = ref["grads"]
    torch.testing.assert_close(_tm(x2.grad), grads["x"], rtol=1e-5, atol=1e-5)
    for name in ("weight", "bias", "p"):
        torch.testing.assert_close(getattr(tab, name).grad, grads[name], rtol=1e-5, atol=1e-5, msg=name)
    assert grads["x"][:, 0].abs().sum() > 0  # step 1's input gets gradient from every later step's statistics
    tab.eval()
    with torch.no_grad():
        y3 = run_sequence(tab, _tm(ref["x3"]), "sequence")
    torch.testing.assert_close(_tm(y3), ref["y3"], rtol=1e-5, atol=1e-5)


def test_step_t_is_normalized_with_the_statistics_of_steps_1_to_t_on_linear_features():
    torch.manual_seed(0)
    tab = TAB(5, time_steps=3)
    with torch.no_grad():
        tab.weight.uniform_(0.5, 1.5)
        tab.bias.uniform_(-1, 1)
        tab.p.uniform_(0.5, 1.5)
    x = torch.randn(3, 16, 5) * torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1)  # [T, B, C]
    y = run_sequence(tab.train(), x, "sequence")
    for t in range(3):
        window = x[: t + 1].flatten(0, 1)
        mean, var = window.mean(0), window.var(0, unbiased=False)
        expected = tab.p[t] ** 2 * (tab.weight[t] * (x[t] - mean) / torch.sqrt(var + tab.eps) + tab.bias[t])
        torch.testing.assert_close(y[t], expected, rtol=1e-5, atol=1e-5)
        n = window.shape[0]
        torch.testing.assert_close(tab.running_var[t], 0.9 + 0.1 * var * n / (n - 1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="tab was built for 3 time steps, got a sequence of 4"):
        run_sequence(tab, torch.randn(4, 2, 5), "sequence")


def test_tab_is_a_plugin_of_the_whole_sequence_and_the_matrix_says_why_not_online(tmp_path):
    from harness import get_registry
    from harness.matrix import expand

    registry = get_registry()
    info = registry.info("normalizer", "tab")
    assert set(info.options) == {"eps", "momentum"} and info.step_modes == frozenset({"sequence"})  # time_steps is injected
    m = expand({"defaults": {"dataset": "digits", "model": "vgg_small", "normalizer": "tab", "epochs": 1, "batch_size": 8,
                             "time_steps": 2}, "matrix": {"trainer": ["bptt", "online"]}}, registry, source="m.toml")
    assert [c.config.trainer.name for c in m.cells] == ["bptt"]
    (skipped,) = m.skipped
    assert skipped.skip_reason == "normalizer 'tab' runs only on the whole sequence, but trainer 'online' runs one step at a time"
