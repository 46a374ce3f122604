"""Mixed precision (the cell's ``precision = "bfloat16"``: trainer steps under ``torch.autocast``),
checked with CPU bf16 autocast: every normalizer and OTS compute their statistics in float32
whatever the input's precision, keep float32 running buffers, and give outputs in the input's
precision; a whole cell trains and evaluates under autocast."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from cell_support import Recorder, tiny_cell
from harness import get_registry
from harness.config import Component
from harness.runner import run_cell
from harness.snn import LIFNeuron, begin_sequence, end_sequence, run_sequence, set_step_mode

T, B, C = 3, 8, 4
REGISTRY = get_registry()


def _normalizer(name: str) -> torch.nn.Module:
    info = REGISTRY.normalizers.info(name)
    extra = {k: v for k, v in {"time_steps": T, "v_threshold": 1.0}.items() if info.takes(k)}
    return REGISTRY.normalizers[name](num_features=C, **extra)


CASES = [(name, mode) for name in REGISTRY.names("normalizer") for mode in ("single", "sequence")
         if mode in REGISTRY.normalizers.info(name).step_modes]


def _sequence(module: torch.nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    set_step_mode(module, mode)
    begin_sequence(module, x.shape[0])
    y = module(x) if mode == "sequence" else torch.stack([module(x[t]) for t in range(x.shape[0])])
    end_sequence(module)
    return y


@pytest.mark.parametrize(("name", "mode"), CASES)
def test_statistics_of_16_bit_input_are_float32_statistics(name, mode):
    """A bf16 input gives the running buffers a float32 run gets from the same values, and the
    float32 result rounded to bf16 as output: statistics and arithmetic in float32."""
    torch.manual_seed(0)
    x = (torch.randn(T, B, C, 3, 3) * 3 + 1).to(torch.bfloat16)
    low, full = _normalizer(name), _normalizer(name)
    full.load_state_dict(low.state_dict())
    for _ in range(2):  # the second sequence normalizes with running statistics the first one set
        y_low = _sequence(low.train(), x, mode)
        y_full = _sequence(full.train(), x.float(), mode)
    assert y_low.dtype == torch.bfloat16
    torch.testing.assert_close(y_low, y_full.to(torch.bfloat16), rtol=0, atol=0)
    for (key, a), b in zip(low.state_dict().items(), full.state_dict().values()):
        assert a.dtype == b.dtype and (a.dtype != torch.bfloat16), key
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)
    y_eval = _sequence(low.eval(), x, mode)
    assert y_eval.dtype == torch.bfloat16
    torch.testing.assert_close(y_eval, _sequence(full.eval(), x.float(), mode).to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize(("name", "mode"), CASES)
def test_every_normalizer_trains_under_cpu_bf16_autocast(name, mode):
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(2, C, 3, padding=1)
    norm = _normalizer(name)
    x = torch.randn(T, B, 2, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        current = conv(x.flatten(0, 1)).unflatten(0, (T, B))
        assert current.dtype == torch.bfloat16  # what the normalizer receives under autocast
        y = _sequence(norm.train(), current, mode)
        loss = y.float().square().mean()
    loss.backward()
    assert math.isfinite(loss.item()) and y.dtype == torch.bfloat16
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in [*conv.parameters(), *norm.parameters()])
    assert all(b.dtype in (torch.float32, torch.int64) and torch.isfinite(b.float()).all() for b in norm.buffers())


@pytest.mark.parametrize("mode", ["single", "sequence"])
def test_ots_thresholds_of_a_bf16_membrane_are_float32_statistics_of_it(mode):
    torch.manual_seed(2)
    x = (torch.randn(T, B, 6) + 0.5).to(torch.bfloat16)
    lif = LIFNeuron(REGISTRY.thresholds["ots"](eval_threshold="running"))
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    lif.threshold.register_forward_hook(lambda m, i, o: seen.append((i[0].detach().clone(), o)))
    s = run_sequence(lif, x, mode)
    assert s.dtype == torch.bfloat16 and [u.dtype for u, _ in seen] == [torch.bfloat16] * T
    assert all(theta.dtype == torch.float32 for _, theta in seen)
    u0 = seen[0][0].float()
    r = (1.0 - u0.mean()) / u0.std().clamp_min(1e-6)  # Eq. 16 in float32 on the bf16 membrane's values
    for u, theta in seen[1:]:
        u = u.float()
        assert torch.equal(theta, u.mean() + u.std().clamp_min(1e-6) * r)
    assert lif.threshold.running_theta.dtype == torch.float32


@pytest.mark.parametrize(("normalizer", "threshold", "trainer"), [("osr", "ots", "online"), ("vanilla_bn", "fixed", "bptt"), ("tebn", "ots", "bptt")])
def test_a_cell_trains_and_evaluates_in_bfloat16(normalizer, threshold, trainer):
    cell = tiny_cell(0, epochs=1, max_train_batches=3, max_eval_batches=2, precision="bfloat16")
    cfg = dataclasses.replace(
        cell.config,
        normalizer=Component(normalizer, REGISTRY.normalizers.info(normalizer).defaults()),
        threshold=Component(threshold, REGISTRY.thresholds.info(threshold).defaults()),
        trainer=Component(trainer, REGISTRY.trainers.info(trainer).defaults()),
    )
    result = run_cell(dataclasses.replace(cell, config=cfg), REGISTRY, Recorder())
    assert result.status == "finished", result.error
    assert math.isfinite(result.metrics["train_loss"]) and math.isfinite(result.metrics["test_loss"])
    assert 0.0 <= result.metrics["test_top1"] <= 1.0


def test_an_unknown_precision_is_a_clear_error_when_the_matrix_loads(tiny_matrix):
    from harness.errors import ConfigError
    from harness.matrix import load_matrix

    path = tiny_matrix('[matrix]\nprecision = ["float32", "float16"]\n')
    with pytest.raises(ConfigError, match=r"key 'precision'.*expected 'float32' or 'bfloat16', got 'float16'"):
        load_matrix(path, REGISTRY)
