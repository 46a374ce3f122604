"""Mixed precision (the cell's ``precision = "bfloat16"``: trainer steps under ``torch.autocast``),
checked with CPU bf16 autocast: every normalizer and OTS compute their statistics in float32
whatever the input's precision, keep float32 running buffers, and give outputs in the input's
precision; a whole cell trains and evaluates under autocast."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from cell_support import Recorder, interrupted_then_resumed, tiny_cell
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

    path = tiny_matrix('[matrix]\nprecision = ["float32", "half"]\n')
    with pytest.raises(ConfigError, match=r"key 'precision'.*expected 'float32' or 'bfloat16' or 'float16', got 'half'"):
        load_matrix(path, REGISTRY)


# -- every normalizer and the neuron under CPU bf16 autocast: float32's numbers within bf16 rounding


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize(("name", "mode"), CASES)
def test_every_normalizers_values_and_gradients_under_bf16_autocast_are_float32s_within_bf16_rounding(name, mode):
    """conv -> normalizer -> loss, once in float32 and once under CPU bf16 autocast from the same
    weights and input: outputs, the input's gradient and the parameters' gradient agree to 1e-2
    (relative, over the whole tensor; the parameters' as one vector, since the conv bias's
    gradient is zero up to rounding in front of a normalizer), what bf16's 8-bit mantissa leaves."""
    torch.manual_seed(3)
    conv, norm = torch.nn.Conv2d(2, C, 3, padding=1), _normalizer(name)
    conv16, norm16 = torch.nn.Conv2d(2, C, 3, padding=1), _normalizer(name)
    conv16.load_state_dict(conv.state_dict())
    norm16.load_state_dict(norm.state_dict())
    x = torch.randn(T, B, 2, 5, 5)
    G = torch.randn(T, B, C, 5, 5)
    runs = []
    for c, n, low in ((conv, norm, False), (conv16, norm16, True)):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
            y = _sequence(n.train(), c(xi.flatten(0, 1)).unflatten(0, (T, B)), mode)
        (y.float() * G).sum().backward()
        runs.append((y, xi.grad, [p.grad for p in (*c.parameters(), *n.parameters())]))
    (y32, gx32, gp32), (y16, gx16, gp16) = runs
    assert y16.dtype == torch.bfloat16
    assert _relative(y16, y32) < 1e-2 and _relative(gx16, gx32) < 1e-2
    assert _relative(torch.cat([g.flatten() for g in gp16]), torch.cat([g.flatten() for g in gp32])) < 1e-2


@pytest.mark.parametrize("threshold", ["fixed", "ots"])
def test_the_neurons_membrane_and_surrogate_gradient_under_bf16_are_float32s_within_bf16_rounding(threshold):
    torch.manual_seed(4)
    factory = REGISTRY.thresholds[threshold]
    current = torch.randn(T, B, 16) + 0.6
    runs = []
    for low in (False, True):
        lif = LIFNeuron(factory())
        u_seen: list[torch.Tensor] = []
        lif.threshold.register_forward_hook(lambda m, i, o: u_seen.append(i[0].detach().float()))
        xi = (current.to(torch.bfloat16) if low else current).float().clone().requires_grad_(True)
        s = run_sequence(lif, xi.to(torch.bfloat16) if low else xi, "sequence")
        (s.float() * torch.linspace(-1, 1, 16)).sum().backward()
        runs.append((torch.stack(u_seen), s.float(), xi.grad))
    (u32, s32, g32), (u16, s16, g16) = runs
    assert _relative(u16, u32) < 1e-2 and _relative(g16, g32) < 1e-2
    assert (s16 != s32).float().mean() < 0.02  # spikes flip only where u sits at the threshold within rounding


# -- float16 with loss scaling: the mechanism, on the CPU (a forced GradScaler; no GPU here) ------


def _forced_scaler(monkeypatch, made: list):
    import harness.scaling as scaling

    real = scaling.loss_scaler

    def force(precision, device, *, force=False):
        scaler = real(precision, device, force=True)
        made.append(scaler)
        return scaler

    monkeypatch.setattr(scaling, "loss_scaler", force)


@pytest.mark.parametrize("trainer", [("bptt", {"max_grad_norm": 1.0}), ("online", {"update": "step", "max_grad_norm": 1.0})],
                         ids=["bptt", "online"])
def test_a_loss_scaled_float32_cell_is_the_unscaled_one_bit_for_bit_and_resumes_with_its_scale(trainer, monkeypatch, tmp_path):
    """Scaling by a power of two, clipping the unscaled gradient and stepping on it gives the very
    numbers of no scaling; the scaler's state travels in the checkpoint."""
    cell = tiny_cell(0, epochs=2, max_train_batches=3, max_eval_batches=2)
    cell = dataclasses.replace(cell, config=dataclasses.replace(cell.config, trainer=Component(*trainer)))
    plain = run_cell(cell, REGISTRY, Recorder())
    made: list = []
    _forced_scaler(monkeypatch, made)
    scaled = run_cell(cell, REGISTRY, Recorder())
    assert plain.status == scaled.status == "finished", scaled.error
    stable = [k for k in plain.metrics if not any(t in k for t in ("time", "per_s", "per_iter", "rss"))]
    assert {k: scaled.metrics[k] for k in stable} == {k: plain.metrics[k] for k in stable}
    assert made and made[-1].get_scale() == 2.0**16 and made[-1]._get_growth_tracker() == (6 if trainer[0] == "bptt" else 12)

    resumed = interrupted_then_resumed(cell, REGISTRY, tmp_path)
    assert {k: resumed.metrics[k] for k in stable} == {k: plain.metrics[k] for k in stable}
    assert made[-1]._get_growth_tracker() == (6 if trainer[0] == "bptt" else 12)  # the good steps counted on from the checkpoint


def test_a_step_with_an_inf_gradient_is_skipped_and_the_scale_halved():
    from harness.scaling import ScaledLoss, ScaledOptimizer

    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    opt = ScaledOptimizer(torch.optim.SGD([w], lr=0.1), scaler)

    tet = REGISTRY.losses["tet"](mse_weight=0.0)
    logits = torch.stack([w, -w]).unsqueeze(1)  # [T=2, B=1, K=2]
    value = ScaledLoss(tet, scaler)(logits, torch.tensor([0]))
    (true_grad,) = torch.autograd.grad(tet(logits, torch.tensor([0])), w)
    value.backward()
    torch.testing.assert_close(value.detach(), tet(logits.detach(), torch.tensor([0])))  # the loss's value
    torch.testing.assert_close(w.grad, 8.0 * true_grad)  # its gradient times the scale
    w.grad[0] = float("inf")
    opt.step()
    assert torch.equal(w.detach(), torch.tensor([1.0, 2.0])) and scaler.get_scale() == 4.0  # skipped, halved


def test_float16_on_the_cpu_is_a_clear_error_naming_what_to_use():
    from harness.devices import autocast
    from harness.errors import HarnessError

    with pytest.raises(HarnessError, match=r"precision 'float16' needs a CUDA device .* on the CPU use 'bfloat16' or 'float32'"):
        autocast("float16", torch.device("cpu"))
    cell = tiny_cell(0, precision="float16")
    result = run_cell(cell, REGISTRY, Recorder())
    assert result.status == "failed" and "needs a CUDA device" in result.error_message
