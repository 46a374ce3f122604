"""The training recipe on timm: optimizers and learning-rate schedules by name, checked against
torch's own classes and the schedules' formulas, in a cell and across a resume."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from harness import hookimpl
from harness.build import build_optimizer, build_scheduler, load_scheduler_state, scheduler_state
from harness.config import OPTIMIZERS, SCHEDULES, Component, EmaConfig, MixupConfig, OptimizerConfig, ScheduleConfig
from harness.errors import ConfigError
from harness.matrix import Cell
from harness.registry import get_registry
from harness.runner import run_cell
from snn_harness_plugins.trainers import BPTTTrainer

from cell_support import Recorder, interrupted_then_resumed, tiny_cell


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 4))


def _steps(model: nn.Module, optimizer: torch.optim.Optimizer, n: int = 3) -> list[torch.Tensor]:
    torch.manual_seed(1)
    for _ in range(n):
        optimizer.zero_grad()
        model(torch.randn(5, 2, 4, 4)).square().mean().backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_is_torchs_sgd_step_for_step(nesterov):
    cfg = OptimizerConfig(lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=nesterov)
    ours, theirs = _net(), _net()
    optimizer = build_optimizer(ours, cfg)
    assert type(optimizer) is torch.optim.SGD and len(optimizer.param_groups) == 1
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == (0.05, 0.9, 5e-4, nesterov)
    reference = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=nesterov)
    for a, b in zip(_steps(ours, optimizer), _steps(theirs, reference)):
        assert torch.equal(a, b)


def test_adamw_takes_betas_and_eps_and_is_torchs_adamw():
    cfg = OptimizerConfig(name="adamw", lr=1e-3, weight_decay=0.05, betas=(0.8, 0.99), eps=1e-6)
    ours, theirs = _net(), _net()
    optimizer = build_optimizer(ours, cfg)
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.param_groups[0]["betas"] == (0.8, 0.99) and optimizer.param_groups[0]["eps"] == 1e-6
    reference = torch.optim.AdamW(theirs.parameters(), lr=1e-3, weight_decay=0.05, betas=(0.8, 0.99), eps=1e-6)
    for a, b in zip(_steps(ours, optimizer), _steps(theirs, reference)):
        assert torch.equal(a, b)


def test_filter_bias_and_bn_takes_weight_decay_off_every_1d_parameter():
    model = _net()
    optimizer = build_optimizer(model, OptimizerConfig(weight_decay=5e-4, filter_bias_and_bn=True))
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert len(decay) == len(list(model.parameters()))  # every parameter, once
    for name, p in model.named_parameters():
        assert decay[id(p)] == (0.0 if p.ndim <= 1 else 5e-4), name  # BN scale and shift, the bias: none
    plain = build_optimizer(_net(), OptimizerConfig(weight_decay=5e-4))
    assert [g["weight_decay"] for g in plain.param_groups] == [5e-4]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_a_cell_may_name_is_built_by_timm_and_trains(name):
    from timm.optim import list_optimizers

    assert name in list_optimizers()
    model = _net()
    before = [p.detach().clone() for p in model.parameters()]
    after = _steps(model, build_optimizer(model, OptimizerConfig(name=name, lr=1e-2)), n=2)
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after)), name


def _lrs(cfg: ScheduleConfig, epochs: int, updates_per_epoch: int = 0, lr: float = 0.1, metrics=None) -> list[float]:
    """The learning rate of every epoch (or update, ``per_iteration``), driven as the runner does."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = build_scheduler(optimizer, cfg, epochs, updates_per_epoch)
    out = []
    if cfg.per_iteration:
        for n in range(epochs * updates_per_epoch):
            out.append(optimizer.param_groups[0]["lr"])
            scheduler.step_update(num_updates=n + 1)
        return out
    for epoch in range(1, epochs + 1):
        out.append(optimizer.param_groups[0]["lr"])
        scheduler.step(epoch, (metrics or [0.0] * epochs)[epoch - 1])
    return out


def test_cosine_is_torchs_cosine_annealing_and_the_formula():
    got = _lrs(ScheduleConfig(min_lr=1e-3), epochs=6)
    assert got == pytest.approx([1e-3 + (0.1 - 1e-3) * (1 + math.cos(math.pi * t / 6)) / 2 for t in range(6)], rel=1e-12)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    torch_cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=6, eta_min=1e-3)
    reference = []
    for _ in range(6):
        reference.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        torch_cosine.step()
    assert got == pytest.approx(reference, rel=1e-12)


def test_warmup_rises_linearly_from_warmup_lr_then_the_cosine_takes_over():
    got = _lrs(ScheduleConfig(warmup_epochs=2, warmup_lr=0.01), epochs=6)
    assert got[:3] == pytest.approx([0.01, 0.055, 0.1 * (1 + math.cos(math.pi * 2 / 6)) / 2])
    assert got[3:] == pytest.approx([0.1 * (1 + math.cos(math.pi * t / 6)) / 2 for t in (3, 4, 5)])


def test_per_iteration_advances_at_every_optimizer_step_over_all_of_them():
    got = _lrs(ScheduleConfig(per_iteration=True, warmup_epochs=1, warmup_lr=0.0), epochs=3, updates_per_epoch=4)
    assert len(got) == 12 and got[:5] == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1 * (1 + math.cos(math.pi * 4 / 12)) / 2])
    assert got[5:] == pytest.approx([0.1 * (1 + math.cos(math.pi * t / 12)) / 2 for t in range(5, 12)])
    with pytest.raises(Exception, match="updates_per_epoch"):
        _lrs(ScheduleConfig(per_iteration=True), epochs=3)


def test_step_multistep_constant_and_plateau():
    assert _lrs(ScheduleConfig(name="step", step_size=2, gamma=0.5), epochs=5) == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])
    # timm's milestones count epochs from 1: milestone 2 gives epoch 2 the decayed rate
    assert _lrs(ScheduleConfig(name="multistep", milestones=(2, 3), gamma=0.1), epochs=4) == pytest.approx([0.1, 0.01, 0.001, 0.001])
    assert _lrs(ScheduleConfig(name="constant"), epochs=3) == [0.1, 0.1, 0.1]
    # plateau watches the test top-1: two epochs without a better one (patience 1) halve the rate
    got = _lrs(ScheduleConfig(name="plateau", patience=1, gamma=0.5), epochs=5, metrics=[50.0, 60.0, 60.0, 60.0, 70.0])
    assert got == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.05])


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_resumes_from_its_checkpointed_state_exactly(name):
    """Half the epochs, the state through a checkpoint (torch.save, loaded weights-only as the
    resume does), then the rest on a fresh optimizer and scheduler: the same rates as straight through."""
    import io

    cfg = ScheduleConfig(name=name, warmup_epochs=1, step_size=2, milestones=(2, 4), patience=1, gamma=0.5, per_iteration=False)
    metrics = [10.0, 20.0, 20.0, 20.0, 30.0, 30.0]  # plateau: one epoch without a better one before the checkpoint, one after
    straight = _lrs(cfg, epochs=6, metrics=metrics)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = build_scheduler(optimizer, cfg, 6)
    for epoch in (1, 2, 3):
        scheduler.step(epoch, metrics[epoch - 1])
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler_state(scheduler)}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = build_scheduler(optimizer, cfg, 6)
    optimizer.load_state_dict(state["optimizer"])
    load_scheduler_state(scheduler, state["scheduler"])
    rest = []
    for epoch in (4, 5, 6):
        rest.append(optimizer.param_groups[0]["lr"])
        scheduler.step(epoch, metrics[epoch - 1])
    assert rest == straight[3:], (straight, rest)


def test_an_unknown_optimizer_or_schedule_name_is_a_config_error_listing_the_known_ones(tmp_path, registry):
    from harness.matrix import load_matrix

    from conftest import TINY_DEFAULTS

    for table, wrong, known in (("optimizer", "adamx", "adamw"), ("lr_schedule", "cosin", "cosine")):
        path = tmp_path / "m.toml"
        path.write_text('name = "m"\n' + TINY_DEFAULTS + f'[defaults.{table}]\nname = "{wrong}"\n')
        with pytest.raises(ConfigError, match=rf"m.toml \[defaults\]: key '{table}.name': expected .*'{known}' or"):
            load_matrix(path, registry)
    path.write_text('name = "m"\n' + TINY_DEFAULTS + "[defaults.lr_schedule]\nwarmup_epochs = -1\n")
    with pytest.raises(ConfigError, match=r"key 'lr_schedule.warmup_epochs'"):
        load_matrix(path, registry)
    path.write_text('name = "m"\n' + TINY_DEFAULTS + '[defaults.lr_schedule]\nname = "plateau"\nper_iteration = true\n')
    with pytest.raises(ConfigError, match=r"m.toml \[defaults\]: key 'lr_schedule.per_iteration': the plateau schedule"):
        load_matrix(path, registry)


class LrSpy:
    """A BPTT trainer plugin that notes the optimizer's learning rate at every training batch."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    @hookimpl
    def register_trainers(self, registry) -> None:
        spy = self

        class Spied(BPTTTrainer):
            def train_batch(self, model, inputs, target, loss_fn, optimizer):
                spy.lrs.append(optimizer.param_groups[0]["lr"])
                return super().train_batch(model, inputs, target, loss_fn, optimizer)

        registry.add("lr_spy", Spied)


def _spied_cell(schedule: ScheduleConfig, epochs: int = 3, **kw) -> tuple[Cell, LrSpy, object]:
    spy = LrSpy()
    registry = get_registry(extra_plugins=[(spy, "test_lr_spy")])
    cell = tiny_cell(0, epochs=epochs, batch_size=128, **kw)  # 384 samples: 3 batches an epoch
    config = dataclasses.replace(cell.config, trainer=dataclasses.replace(cell.config.trainer, name="lr_spy"), lr_schedule=schedule)
    return Cell(cell.id, 0, config, cell.axes), spy, registry


def test_a_cell_with_a_per_iteration_warmup_schedule_steps_the_rate_at_every_batch():
    cell, spy, registry = _spied_cell(ScheduleConfig(per_iteration=True, warmup_epochs=1, warmup_lr=0.0))
    result = run_cell(cell, registry, Recorder())
    assert result.status == "finished", result.error
    base = cell.config.optimizer.lr
    expected = [base * t / 3 for t in range(3)] + [base * (1 + math.cos(math.pi * t / 9)) / 2 for t in range(3, 9)]
    assert spy.lrs == pytest.approx(expected, rel=1e-12)


def test_a_resumed_cell_with_every_new_option_on_ends_as_an_uninterrupted_one(tmp_path):
    """Warm-up, per-iteration cosine, AdamW without weight decay on 1-D parameters, a model EMA
    with its warm-up, mixup and CutMix, OSR with its momentum warm-up and OTS: killed after epoch
    1 (its checkpoint kept), the cell resumes to the uninterrupted run's metrics exactly."""
    schedule = ScheduleConfig(per_iteration=True, warmup_epochs=1, warmup_lr=1e-4, min_lr=1e-4)
    optimizer = OptimizerConfig(name="adamw", lr=3e-3, weight_decay=0.05, filter_bias_and_bn=True, eps=1e-7)
    cell, spy, registry = _spied_cell(schedule, epochs=3)
    cell = Cell(cell.id, 0, dataclasses.replace(
        cell.config, optimizer=optimizer, ema=EmaConfig(decay=0.6, warmup=True),
        mixup=MixupConfig(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1),
        normalizer=Component("osr", {"momentum_warmup_batches": 4}), threshold=Component("ots")), cell.axes)
    straight = run_cell(cell, registry, Recorder())
    assert straight.status == "finished", straight.error

    _, resumed_spy, registry = _spied_cell(schedule)
    resumed = interrupted_then_resumed(cell, registry, tmp_path)
    assert resumed.status == "finished" and resumed.epochs_completed == 3, resumed.error
    stable = {k: v for k, v in straight.metrics.items() if not any(t in k for t in ("time", "per_s", "per_iter", "rss"))}
    assert {k: resumed.metrics[k] for k in stable} == stable
    assert {"ema_test_top1", "best_ema_test_top1", "ema_test_firing_rate"} <= set(stable)  # the average, resumed too
    assert resumed_spy.lrs == spy.lrs  # every batch at the rate of the uninterrupted run


# -- the model's moving average (timm's ModelEmaV3) --------------------------------------------


@pytest.mark.parametrize("buffers", ["average", "copy"])
def test_the_moving_average_follows_the_weights_and_its_buffers_as_chosen(buffers):
    """After every training batch: ema = d * ema + (1 - d) * model (the first update a copy).
    Running statistics and OTS's thresholds (sized at the first step) are averaged the same way,
    or copied from the model; integer counters are copied either way."""
    from harness.build import build_cell
    from harness.data import to_sequence
    from harness.runner import _averaged

    registry = get_registry()
    cell = tiny_cell(0, batch_size=32)
    cfg = dataclasses.replace(cell.config, normalizer=Component("osr", {}), threshold=Component("ots"),
                              ema=EmaConfig(decay=0.75, buffers=buffers))
    data = registry.datasets["digits"](**cfg.dataset.options)
    torch.manual_seed(0)
    parts = build_cell(cfg, registry, data)
    model, ema = parts.model, parts.ema
    step = _averaged(lambda x, y: parts.trainer.train_batch(model, x, y, parts.loss_fn, parts.optimizer), ema, model, 0)
    snapshots = []
    for i in range(3):
        x = torch.stack([data.train[j][0] for j in range(32 * i, 32 * i + 32)])
        y = torch.tensor([data.train[j][1] for j in range(32 * i, 32 * i + 32)])
        step(to_sequence(x, cfg.time_steps, False), y)
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    got = ema.module.state_dict()
    params, moved = {name for name, _ in model.named_parameters()}, set()
    assert any("threshold" in k for k in got)  # OTS's lazily sized buffers are in the average
    for key, value in got.items():
        if not value.is_floating_point() or (buffers == "copy" and key not in params):
            assert torch.equal(value, snapshots[-1][key]), key
            continue
        expected = snapshots[0][key]  # update 1: a copy
        for snap in snapshots[1:]:
            expected = 0.75 * expected + 0.25 * snap[key]
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7, msg=key)
        if not all(torch.equal(s[key], snapshots[-1][key]) for s in snapshots):  # it moved: an average, not the model
            assert not torch.allclose(value, snapshots[-1][key]), key
            moved.add(key)
    assert any("running_mean" in k for k in moved) == (buffers == "average")


def test_no_moving_average_unless_asked_and_its_keys_are_checked(tmp_path, registry):
    from harness.build import build_cell
    from harness.matrix import load_matrix

    from conftest import TINY_DEFAULTS

    data = registry.datasets["digits"](test_fraction=0.2, split_seed=0)
    assert build_cell(tiny_cell(0).config, registry, data).ema is None
    path = tmp_path / "m.toml"
    for body, message in [("decay = 1.0", r"key 'ema.decay'.*in \[0, 1\)"), ('buffers = "mean"', r"key 'ema.buffers'.*'average' or 'copy'"),
                          ("decy = 0.9", r"unknown key 'ema.decy' \(did you mean 'ema.decay'\?\)")]:
        path.write_text('name = "m"\n' + TINY_DEFAULTS + f"[defaults.ema]\n{body}\n")
        with pytest.raises(ConfigError, match=message):
            load_matrix(path, registry)
    path.write_text('name = "m"\n' + TINY_DEFAULTS)
    plain = load_matrix(path, registry).cells[0]
    path.write_text('name = "m"\n' + TINY_DEFAULTS + "[defaults.ema]\ndecay = 0.0\n")
    assert load_matrix(path, registry).cells[0].id == plain.id  # off: the id of a cell from before the option
