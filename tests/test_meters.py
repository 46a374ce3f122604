"""Meters: firing rates against hand-made spikes, the saved-tensor meter against known saves,
memory in T for both trainers, membrane recording, and the runner's metrics."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from torch import nn

from harness.config import cell_id
from harness.matrix import Cell
from harness.meters.cell import CellMeters, model_size
from harness.meters.firing import FiringRateMeter, coefficient_of_variation
from harness.meters.membrane import MembraneRecorder
from harness.meters.memory import SavedTensorMeter
from harness.runner import run_cell
from harness.snn import LIFNeuron, SequenceModule, SpikingSequential, begin_sequence, end_sequence, run_sequence, set_step_mode
from snn_harness_plugins.losses import TETLoss
from snn_harness_plugins.thresholds import FixedThreshold
from snn_harness_plugins.trainers import BPTTTrainer, OnlineTrainer

from cell_support import Recorder, tiny_cell


class Replay(SequenceModule):
    """A spiking layer that ignores its input and emits given spikes ``[T, B, ...]``."""

    emits_spikes = True

    def __init__(self, spikes: torch.Tensor) -> None:
        super().__init__()
        self.spikes = spikes

    def forward_step(self, x: torch.Tensor) -> torch.Tensor:
        return self.spikes[self.t]


def _spikes(T: int, B: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(T, B, n, generator=g) < torch.linspace(0.1, 0.6, T).view(T, 1, 1)).float()


@pytest.mark.parametrize("mode", ["sequence", "single"])
def test_firing_rates_equal_hand_counts_of_known_spikes(mode):
    a, b = _spikes(4, 3, 10, seed=0), _spikes(4, 3, 6, seed=1)
    model = SpikingSequential(Replay(a), Replay(b))
    meter = FiringRateMeter(model)
    x = torch.zeros(4, 3, 1)
    with meter:
        run_sequence(model, x, mode)
        run_sequence(model, x, mode)  # two batches of the same spikes: rates unchanged, counts doubled
    m = meter.metrics("test")

    per_step = [(a[t].sum() + b[t].sum()).item() / (a[t].numel() + b[t].numel()) for t in range(4)]
    for t in range(4):
        assert m[f"test_firing_rate_t{t + 1}"] == pytest.approx(per_step[t])
    gross = (a.sum() + b.sum()).item() / (a.numel() + b.numel())  # Table 2: all spikes / all neuron-steps
    assert m["test_firing_rate"] == pytest.approx(gross)
    assert m["test_firing_rate_cv"] == pytest.approx(statistics.pstdev(per_step) / statistics.fmean(per_step))
    assert m["test_firing_rate/0"] == pytest.approx(a.mean().item())
    assert m["test_firing_rate/1"] == pytest.approx(b.mean().item())
    layer_a = [a[t].mean().item() for t in range(4)]
    assert m["test_firing_rate_cv/0"] == pytest.approx(statistics.pstdev(layer_a) / statistics.fmean(layer_a))


def test_firing_meter_reset_detach_and_lif_neurons_are_counted():
    torch.manual_seed(0)
    model = SpikingSequential(nn.Linear(3, 5), LIFNeuron(FixedThreshold(0.5)), nn.Linear(5, 2))
    meter = FiringRateMeter(model)
    assert [name for name, _ in meter.layers] == ["1"]
    x = torch.rand(3, 4, 3) * 2
    with meter:
        out_spikes = []
        hook = model[1].register_forward_hook(lambda m, i, o: out_spikes.append(o.detach()))
        run_sequence(model, x, "sequence")
        hook.remove()
    assert meter.metrics("train")["train_firing_rate"] == pytest.approx(out_spikes[0].mean().item())
    meter.reset()
    assert meter.metrics("train") == {}
    run_sequence(model, x, "sequence")  # detached: nothing counted
    assert meter.metrics("train") == {}


def test_coefficient_of_variation_edge_cases():
    assert coefficient_of_variation([0.2, 0.2, 0.2]) == pytest.approx(0.0, abs=1e-12)
    assert coefficient_of_variation([0.0, 0.0]) == 0.0
    assert math.isnan(coefficient_of_variation([]))
    assert coefficient_of_variation([1.0, 3.0]) == pytest.approx(0.5)


def test_saved_tensor_meter_counts_known_saves_once_and_frees_them():
    x = torch.randn(1000, requires_grad=True)  # 4000 bytes
    w = torch.randn(1000, requires_grad=True)
    meter = SavedTensorMeter()
    with meter:
        y = x * w  # saves x and w: 8000 bytes
        z = (y * y).sum()  # saves y twice: one storage, 4000 bytes more
        assert meter.live_bytes == 12000
        z.backward()
        assert meter.live_bytes == 0  # backward freed every save
    assert meter.peak_bytes == 12000
    with meter:
        (x.view(10, 100) * 2.0).sum().backward()  # multiplying by a Python number saves nothing
    assert meter.peak_bytes == 0 and meter.max_peak_bytes == 12000
    with meter:
        v = x.view(10, 100)
        (v * x.view(100, 10).t()).sum().backward()  # two views of one storage: counted once
    assert meter.peak_bytes == 4000


def _net(channels: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return SpikingSequential(
        nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), LIFNeuron(FixedThreshold(1.0)),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 3),
    )


def _peak(trainer, T: int, frames: bool = False) -> int:
    """Peak saved bytes of one iteration; the input is a static image repeated T times (a view,
    as the runner feeds it) or, with ``frames``, a real [T, ...] tensor."""
    net = _net()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(T, 8, 1, 8, 8, generator=g) if frames else torch.rand(8, 1, 8, 8, generator=g).expand(T, 8, 1, 8, 8)
    y = torch.randint(0, 3, (8,), generator=g)
    meter = SavedTensorMeter()
    with meter:
        trainer.train_batch(net, x, y, TETLoss(), torch.optim.SGD(net.parameters(), lr=0.0))
    return meter.peak_bytes


def test_saved_bytes_are_flat_in_T_online_and_linear_in_T_for_bptt():
    online = {T: _peak(OnlineTrainer(), T) for T in (2, 4, 8)}
    bptt = {T: _peak(BPTTTrainer(), T) for T in (2, 4, 8)}
    assert online[2] == online[4] == online[8] > 0
    # Linear: equal increments per added step (the weights are a constant offset).
    step = (bptt[4] - bptt[2]) / 2
    assert step > 0 and bptt[8] - bptt[4] == pytest.approx(4 * step, rel=0.02)
    assert online[2] < bptt[2]
    # A storage counts once, whole: with frame data the online trainer's saved conv inputs are
    # views of the one [T, B, ...] input tensor, which then grows by exactly one frame per step.
    frame_bytes = 8 * 1 * 8 * 8 * 4
    assert [_peak(OnlineTrainer(), T, frames=True) - online[T] for T in (2, 4, 8)] == [(T - 1) * frame_bytes for T in (2, 4, 8)]


def test_cell_meters_report_each_phase_and_reject_unknown_meters():
    net = _net()
    meters = CellMeters(net, torch.device("cpu"), ("firing_rate", "memory", "synops"))
    trainer = BPTTTrainer()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    x, y = torch.rand(2, 8, 1, 8, 8), torch.randint(0, 3, (8,))
    meters.begin("train")
    for _ in range(3):
        meters.data_ready(0.01)
        with meters.iteration():
            trainer.train_batch(net, x, y, TETLoss(), opt)
    train = meters.end("train", 24, 3)
    assert train["train_data_time_s"] == pytest.approx(0.03)
    assert train["train_s_per_iter"] == pytest.approx(train["train_time_s"] / 3)
    assert train["train_samples_per_s"] == pytest.approx(24 / train["train_time_s"])
    assert train["train_saved_bytes_peak"] == _peak(BPTTTrainer(), 2)
    assert 0 <= train["train_firing_rate"] <= 1 and train["peak_rss_bytes"] > 0
    assert not any(k.startswith("synops") for k in train)  # operations are counted at inference only
    meters.begin("test")
    with torch.no_grad(), meters.iteration():
        trainer.eval_batch(net, x, y, TETLoss())
    test = meters.end("test", 8, 1)
    assert test["synops"] > 0 and "train_saved_bytes_peak" not in test and "test_firing_rate_t2" in test
    meters.close()

    quiet = CellMeters(net, torch.device("cpu"), ())
    quiet.begin("train")
    assert set(quiet.end("train", 1, 1)) == {"train_samples_per_s", "train_s_per_iter", "train_data_time_s", "train_time_s"}
    with pytest.raises(ValueError, match="unknown meter.*'spikes'.*known: firing_rate, memory, synops"):
        CellMeters(net, torch.device("cpu"), ("spikes",))


def test_model_size_counts_parameters_and_buffers():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    size = model_size(net)
    assert size["num_parameters"] == 3 * 4 + 4 + 4 + 4
    assert size["model_size_bytes"] == 4 * (3 * 4 + 4 + 4 + 4) + 4 * (4 + 4) + 8  # + running stats, num_batches_tracked


def test_membrane_recorder_sees_u_before_firing_at_every_step():
    torch.manual_seed(0)
    lif = LIFNeuron(FixedThreshold(0.7), tau=2.0)
    model = SpikingSequential(nn.Linear(2, 3), lif)
    x = torch.rand(3, 4, 2)
    with MembraneRecorder(model) as rec:
        run_sequence(model, x, "single")
    assert list(rec.values) == ["1"] and len(rec.values["1"]) == 3 and rec.thresholds["1"] == [0.7] * 3
    # Recompute u[t] by hand (Eq. 2, soft reset by theta).
    with torch.no_grad():
        current = model[0].module(x)
        v, expected = torch.zeros(4, 3), []
        for t in range(3):
            u = 0.5 * v + current[t]
            expected.append(u.flatten())
            v = u - (u >= 0.7).float() * 0.7
    for got, want in zip(rec.values["1"], expected):
        assert torch.allclose(got, want)


def _cell(**kw) -> Cell:
    return tiny_cell(0, **kw)


def test_runner_logs_meter_metrics_limits_batches_and_draws_membrane_histograms(registry):
    from harness.plots import is_png

    hook = Recorder()
    result = run_cell(_cell(max_train_batches=3, max_eval_batches=2, membrane_histograms=True), registry, hook)
    assert result.status == "finished", result.error
    starts = [kw for n, kw in hook.calls if n == "on_epoch_start"]
    assert starts[0]["num_train_batches"] == 3 and starts[0]["num_test_batches"] == 2
    train = [kw for n, kw in hook.calls if n == "on_batch_end" and kw["phase"] == "train"]
    assert len(train) == 3
    m = result.metrics
    for key in ("train_firing_rate", "test_firing_rate", "test_firing_rate_cv", "test_firing_rate_t1", "test_firing_rate_t2",
                "train_saved_bytes_peak", "peak_rss_bytes", "train_samples_per_s", "test_s_per_iter", "train_data_time_s",
                "synops", "synops_mac", "num_parameters", "model_size_bytes"):
        assert key in m, key
    assert set(result.artifacts) == {"membrane_histograms.png", "membrane_values.pt"}
    png = result.artifacts["membrane_histograms.png"]
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    del is_png


def test_meters_can_be_switched_off_without_changing_the_cell(registry):
    on, off = _cell(), _cell(meters=())
    assert cell_id(on.config) == cell_id(off.config)  # what is measured is not part of the identity
    a = run_cell(off, registry, Recorder())
    b = run_cell(on, registry, Recorder())
    assert not any("firing_rate" in k or "saved" in k or k.startswith("synops") for k in a.metrics)
    assert a.metrics["test_top1"] == b.metrics["test_top1"] and a.metrics["train_loss"] == b.metrics["train_loss"]


def test_a_bad_meter_name_in_a_matrix_names_the_key(write_toml, registry):
    from harness.errors import ConfigError
    from harness.matrix import load_matrix

    path = write_toml("""
        name = "m"
        [defaults]
        dataset = "digits"
        model = "vgg_small"
        normalizer = "vanilla_bn"
        trainer = "bptt"
        epochs = 1
        batch_size = 8
        time_steps = 2
        meters = ["firing_rate", "energy"]
    """)
    with pytest.raises(ConfigError, match=r"\[defaults\]: key 'meters': expected 'firing_rate' or 'memory' or 'synops', got 'energy'"):
        load_matrix(path, registry)


def test_sequence_and_single_mode_count_the_same_spikes():
    torch.manual_seed(0)
    model = SpikingSequential(nn.Linear(3, 6), LIFNeuron(FixedThreshold(0.5)), nn.Linear(6, 4), LIFNeuron(FixedThreshold(0.5)))
    x = torch.rand(5, 7, 3) * 2
    results = []
    for mode in ("sequence", "single"):
        meter = FiringRateMeter(model)
        with meter, torch.no_grad():
            set_step_mode(model, mode)
            begin_sequence(model, 5)
            model(x) if mode == "sequence" else [model(x[t]) for t in range(5)]
            end_sequence(model)
        results.append(meter.metrics("test"))
    assert results[0] == pytest.approx(results[1])


def test_a_time_steps_axis_gives_the_memory_plot_and_online_over_bptt_ratios(write_toml, tmp_path):
    import csv

    from harness.cli import main
    from harness.plots import is_png
    from harness.report import memory_ratios

    path = write_toml("""
        name = "mem"
        [defaults]
        dataset = "digits"
        model = "vgg_small"
        normalizer = "vanilla_bn"
        epochs = 1
        batch_size = 64
        max_train_batches = 1
        max_eval_batches = 1
        meters = ["memory"]
        [options.model.vgg_small]
        channels = [4, 8]
        [matrix]
        trainer = ["online", "bptt"]
        time_steps = [2, 4]
    """)
    results = tmp_path / "results"
    assert main(["run", "--matrix", str(path), "--results", str(results)]) == 0
    rows = list(csv.DictReader((results / "mem" / "summary.csv").open()))
    saved = {(r["trainer"], r["time_steps"]): float(r["train_saved_bytes_peak"]) for r in rows}
    assert saved[("online", "2")] == saved[("online", "4")]
    ratios = memory_ratios(rows)
    assert ratios == pytest.approx({2: saved[("online", "2")] / saved[("bptt", "2")], 4: saved[("online", "4")] / saved[("bptt", "4")]})
    assert ratios[4] < ratios[2] < 1
    assert is_png(results / "mem" / "plots" / "memory_vs_time_steps.png")
    assert not any("firing_rate" in k for k in rows[0])  # only the memory meter was on


def test_synops_are_counted_at_the_last_epoch_by_default_and_at_every_one_on_request(registry):
    def epochs(**kw):
        hook = Recorder()
        result = run_cell(_cell(epochs=2, max_train_batches=2, max_eval_batches=2, **kw), registry, hook)
        assert result.status == "finished", result.error
        return [kw["metrics"] for n, kw in hook.calls if n == "on_epoch_end"], result

    last, a = epochs()
    every, b = epochs(synops_epochs="every")
    assert [("synops" in m) for m in last] == [False, True]
    assert [("synops" in m) for m in every] == [True, True]
    assert every[1]["synops"] == last[1]["synops"] > 0  # the reported (final) count does not change
    assert a.metrics["synops"] == b.metrics["synops"] and a.metrics["test_top1"] == b.metrics["test_top1"]
    assert cell_id(_cell(synops_epochs="every").config) == cell_id(_cell().config)
