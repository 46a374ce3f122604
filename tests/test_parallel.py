"""Data parallelism within a cell: the sampler's shards, gradient averaging, and a whole cell on
two gloo processes equal to one process on the union batch."""

from __future__ import annotations

import csv
import os
import socket
import textwrap
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from harness.data import EpochShuffle


def test_the_shards_of_each_batch_together_are_the_single_process_batch():
    n, B, world = 103, 8, 2
    single = list(EpochShuffle(n, seed=5))
    shards = [list(EpochShuffle(n, seed=5, rank=r, world=world)) for r in range(world)]
    assert sorted(single) == list(range(n)) and len(shards[0]) == len(shards[1]) == n // world
    b = B // world
    for i in range(len(shards[0]) // b):
        union = {j for r in range(world) for j in shards[r][i * b:(i + 1) * b]}
        assert union == set(single[i * B:(i + 1) * B])
    again = EpochShuffle(n, seed=5)
    assert list(again) == single  # a function of (seed, epoch) only
    again.set_epoch(1)
    assert list(again) != single


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _grad_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from harness.parallel import GradientAveragingOptimizer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    w = torch.nn.Parameter(torch.zeros(3))
    opt = GradientAveragingOptimizer(torch.optim.SGD([w], lr=1.0))
    (w * torch.tensor([1.0, 2.0, 3.0]) * (rank + 1)).sum().backward()  # grads (r+1) * [1, 2, 3]
    opt.step()
    torch.save(w.detach(), f"{out}/w{rank}.pt")
    dist.destroy_process_group()


def test_gradients_are_averaged_across_processes_before_the_step(tmp_path):
    mp.spawn(_grad_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    w0, w1 = torch.load(tmp_path / "w0.pt"), torch.load(tmp_path / "w1.pt")
    assert torch.equal(w0, w1) and torch.allclose(w0, -1.5 * torch.tensor([1.0, 2.0, 3.0]))


MATRIX = """
name = "ddp"
[defaults]
dataset = "digits"
model = "vgg_small"
normalizer = "{normalizer}"
threshold = "{threshold}"
trainer = "{trainer}"
epochs = 2
batch_size = 32
time_steps = 2
max_train_batches = 6
meters = []
[defaults.optimizer]
lr = 0.05
[options.model.vgg_small]
channels = [4, 8]
"""


def _cell_worker(rank: int, world: int, port: int, matrix: str, results: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ["SNN_HARNESS_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    torch.set_num_threads(1)
    from harness.cli import main

    code = main(["run", "--matrix", matrix, "--results", results])
    Path(results, f"code{rank}").write_text(str(code))


@pytest.mark.slow
def test_a_cell_on_two_processes_equals_one_process_on_the_union_batch(tmp_path):
    # OSR and OTS under the online trainer: synchronized per-step and all-time statistics, layer
    # thresholds, and gradients averaged after per-step backward passes (the normalizers' sync is
    # tested one by one in test_distributed.py).
    normalizer, threshold, trainer = "osr", "ots", "online"
    from harness.cli import main

    path = tmp_path / "ddp.toml"
    path.write_text(textwrap.dedent(MATRIX.format(normalizer=normalizer, threshold=threshold, trainer=trainer)))
    single = tmp_path / "single"
    assert main(["run", "--matrix", str(path), "--results", str(single)]) == 0
    double = tmp_path / "double"
    mp.spawn(_cell_worker, args=(2, _free_port(), str(path), str(double)), nprocs=2)
    assert (double / "code0").read_text() == (double / "code1").read_text() == "0"
    (a,) = csv.DictReader((single / "ddp" / "summary.csv").open())
    (b,) = csv.DictReader((double / "ddp" / "summary.csv").open())  # process 0 alone wrote results
    for key in ("train_loss", "test_loss", "train_top1", "test_top1"):
        assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-4, abs=1e-5), key
    assert not (double / "ddp" / "history.csv").read_text().count("\n") > (single / "ddp" / "history.csv").read_text().count("\n")


def _observer_worker(rank: int, world: int, port: int, out: str) -> None:
    import json

    import torch.distributed as dist

    from cell_support import Recorder, tiny_cell
    from harness import get_registry
    from harness.runner import run_cell

    class FailingTracker(Recorder):  # process 0's observers: the tracking store goes down after epoch 1
        def on_epoch_end(self, **kw):
            if rank == 0 and kw["epoch"] == 1:
                raise ConnectionError("tracking store is down")

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    registry = get_registry()
    first = run_cell(tiny_cell(0, epochs=3), registry, FailingTracker())
    last = run_cell(tiny_cell(0, epochs=1), registry, FailingTracker())  # fails after the last collective
    after = run_cell(tiny_cell(1, epochs=1), registry, Recorder())  # the next cell still pairs up
    Path(out, f"r{rank}.json").write_text(json.dumps({
        "first": [first.status, first.error_type, first.error, first.epochs_completed],
        "last": [last.status, last.error_type, last.error],
        "after": [after.status, after.metrics.get("train_loss"), after.metrics.get("test_top1")],
    }))
    dist.destroy_process_group()


@pytest.mark.slow
def test_an_observer_error_in_one_process_stops_the_cell_in_every_process(tmp_path):
    import json
    import time

    ctx = mp.spawn(_observer_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:  # what the bug looks like: one process waits forever
            for p in ctx.processes:
                p.kill()
            pytest.fail("the processes hung after an observer error in process 0")
    r0, r1 = (json.loads((tmp_path / f"r{r}.json").read_text()) for r in (0, 1))
    status, kind, error, epochs = r0["first"]
    assert (status, kind, epochs) == ("failed", "ObserverError", 1)
    assert "ConnectionError: tracking store is down" in error and "every process stopped the cell at epoch 2" in error
    status, kind, error, epochs = r1["first"]
    assert (status, kind, epochs) == ("failed", "ObserverError", 1)
    assert "an observer failed in another process; stopped at epoch 2" in error
    # In the last epoch no collective follows: process 0 fails the cell it records, the others finish.
    assert r0["last"][:2] == ["failed", "ObserverError"] and "ConnectionError: tracking store is down" in r0["last"][2]
    assert r1["last"][0] == "finished"
    assert r0["after"][0] == r1["after"][0] == "finished"
    assert r0["after"][1:] == r1["after"][1:]  # the same union-batch loss: the collectives paired up
