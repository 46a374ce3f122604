"""Data-parallel training within a cell: with ``torch.distributed`` initialized (gloo, CPU, two
processes, each with its share of a union batch), every batch statistic of the normalizers and of
OTS is that of the union batch, so outputs, input gradients, summed parameter gradients (what DDP
averages), running statistics and OSR's fallback count equal those of one process on the union
batch (docs/method.md section 5: the official code synchronizes its statistics like SyncBatchNorm)."""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from harness.snn import LIFNeuron, SpikingSequential, collect_epoch_metrics, run_sequence
from harness.snn.distributed import batch_norm, is_synchronized, synced_moments, world_size
from snn_harness_plugins.normalizers import (
    BatchNormThroughTime,
    OnlineSpikingRenormalization,
    TemporalEffectiveBatchNorm,
    ThresholdDependentBatchNorm,
    VanillaBatchNorm,
)
from snn_harness_plugins.thresholds import OnlineThresholdStabilizer

T, B, C = 3, 8, 3
CONV = (T, B, C, 2, 2)
WORLD = 2
BATCHES = 2
# name, step mode, input shape, the batch share of rank 0 (rank 1 gets the rest)
CASES = [
    ("vanilla_bn", "single", CONV, 4),
    ("vanilla_bn", "sequence", CONV, 4),
    ("vanilla_bn", "single", (T, B, C), 5),  # after a linear synapse, uneven shares
    ("osr", "single", CONV, 4),
    ("osr", "sequence", CONV, 4),
    ("bntt", "single", CONV, 4),
    ("bntt", "sequence", CONV, 4),
    ("tdbn", "sequence", CONV, 4),
    ("tdbn", "sequence", CONV, 5),  # uneven shares: the unbiased running variance uses the union count
    ("tebn", "sequence", CONV, 4),
    ("ots", "single", (T, B, 6), 4),
    ("ots", "sequence", (T, B, 6), 4),
]


def _build(name: str) -> nn.Module:
    g = torch.Generator().manual_seed(7)
    if name == "ots":
        torch.manual_seed(7)
        model = SpikingSequential(nn.Linear(6, 5), LIFNeuron(OnlineThresholdStabilizer(eval_threshold="running")))
        return model
    model = {
        "vanilla_bn": lambda: VanillaBatchNorm(C),
        "osr": lambda: OnlineSpikingRenormalization(C, fallback_ratio=20.0),
        "bntt": lambda: BatchNormThroughTime(C, time_steps=T),
        "tdbn": lambda: ThresholdDependentBatchNorm(C, v_threshold=0.5),
        "tebn": lambda: TemporalEffectiveBatchNorm(C, time_steps=T),
    }[name]()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model


def _union(name: str, shape: tuple[int, ...], batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed union batch and upstream gradient."""
    g = torch.Generator().manual_seed(100 * batch + len(shape))
    x = torch.randn(shape, generator=g) * 2 + 0.5
    if name == "osr" and batch == 0:
        # Step 1: rank 0's samples are spread 40-fold wider. The union's step-1 scale is far from the
        # running one (0/1 at start): the whole layer falls back at that step, although rank 1 alone
        # would not; the other steps renormalize.
        x[0, :4] *= 40.0
    if name == "ots":
        x = x * 2
        shape = (*shape[:2], 5)  # the LIF layer's output
    return x, torch.randn(shape, generator=g)


def _run(name: str, mode: str, shape: tuple[int, ...], lo: int, hi: int) -> dict:
    """Two training batches on the share ``[lo, hi)`` of each union batch."""
    model = _build(name).train()
    params = list(model.parameters())
    out: dict = {"y": [], "gx": [], "gp": []}
    for batch in range(BATCHES):
        x_union, g_union = _union(name, shape, batch)
        x = x_union[:, lo:hi].clone().requires_grad_(True)
        y = run_sequence(model, x, mode)
        grads = torch.autograd.grad((y * g_union[:, lo:hi]).sum(), [x, *params])
        out["y"].append(y.detach())
        out["gx"].append(grads[0])
        out["gp"].append(list(grads[1:]))
    out["buffers"] = {k: v.clone() for k, v in model.state_dict().items() if k not in dict(model.named_parameters())}
    out["metrics"] = collect_epoch_metrics(model)
    return out


def _worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )
    try:
        assert world_size() == WORLD and is_synchronized(True) and not is_synchronized(False)
        results = {}
        for i, (name, mode, shape, share) in enumerate(CASES):
            lo, hi = (0, share) if rank == 0 else (share, shape[1])
            results[i] = _run(name, mode, shape, lo, hi)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def _close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{n}-{m}-{len(s)}d-{sh}" for n, m, s, sh in CASES])
def test_two_processes_equal_one_process_on_the_union_batch(ranks, case):
    name, mode, shape, share = CASES[case]
    ref = _run(name, mode, shape, 0, shape[1])  # this process: no process group, the whole batch
    r0, r1 = ranks[0][case], ranks[1][case]
    for batch in range(BATCHES):
        _close(torch.cat([r0["y"][batch], r1["y"][batch]], 1), ref["y"][batch])
        _close(torch.cat([r0["gx"][batch], r1["gx"][batch]], 1), ref["gx"][batch])
        # Each rank's loss is the sum over its share: the ranks' parameter gradients add up to the
        # one-process gradient of the whole sum (DDP averages them: the mean over the union batch).
        for p0, p1, p in zip(r0["gp"][batch], r1["gp"][batch], ref["gp"][batch], strict=True):
            _close(p0 + p1, p)
    assert ref["buffers"].keys() == r0["buffers"].keys() == r1["buffers"].keys() and ref["buffers"]
    for key, value in ref["buffers"].items():
        _close(r0["buffers"][key], value)
        assert torch.equal(r0["buffers"][key], r1["buffers"][key])  # identical on every process
    assert r0["metrics"] == r1["metrics"]
    assert r0["metrics"].keys() == ref["metrics"].keys()
    for key, value in ref["metrics"].items():
        assert r0["metrics"][key] == pytest.approx(value, abs=1e-9)
    if name == "osr":  # the fallback fired at step 1 of the first batch only
        assert ref["metrics"]["osr_fallback_rate"] == pytest.approx(1 / (BATCHES * T))
    if name == "ots":
        assert ref["buffers"]["1.threshold.running_theta"].shape == (T,)
        assert 0 < float(torch.cat(ref["y"]).mean()) < 1  # it spikes, not everywhere


def test_the_comparison_would_see_unsynchronized_statistics():
    """One share alone has other statistics than the union: what the test above rules out."""
    for name, mode, shape, share in CASES:
        if name in ("vanilla_bn", "osr", "ots") and mode == "single":
            union, alone = _run(name, mode, shape, 0, shape[1]), _run(name, mode, shape, share, shape[1])
            assert not torch.allclose(union["y"][0][:, share:], alone["y"][0], atol=1e-3)
            if name == "osr":  # rank 1 alone would not fall back
                assert alone["metrics"]["osr_fallback_rate"] == 0.0


def test_without_a_process_group_the_helpers_are_the_local_computation():
    assert world_size() == 1 and not is_synchronized(True)
    x = torch.randn(4, 6, 3, 5) * 3 + 1
    mean, var, n = synced_moments(x, (0, 2, 3))
    ref_mean = x.mean((0, 2, 3), keepdim=True)  # two passes: the mean, then the mean squared deviation
    ref_var = (x - ref_mean).square().mean((0, 2, 3), keepdim=True)
    assert torch.equal(mean, ref_mean) and torch.equal(var, ref_var) and n == 60
    welford_var, welford_mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0, keepdim=True)
    torch.testing.assert_close(var.double(), welford_var, rtol=1e-6, atol=1e-6)
    mean, var, n = synced_moments(x, (-1, 0), keepdim=False)
    assert mean.shape == (6, 3) and n == 20
    rm, rv, rm2, rv2 = torch.zeros(6), torch.ones(6), torch.zeros(6), torch.ones(6)
    w, b = torch.rand(6), torch.rand(6)
    assert torch.equal(batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5), F.batch_norm(x, rm2, rv2, w, b, True, 0.1, 1e-5))
    assert torch.equal(rm, rm2) and torch.equal(rv, rv2)
