"""Data parallelism within a cell: the sampler's shards, gradient averaging, and a whole cell on
two gloo processes equal to one process on the union batch."""

from __future__ import annotations

import csv
import os
import textwrap
from pathlib import Path

import dataclasses

import pytest
from conftest import free_port
import torch
import torch.multiprocessing as mp
from torch import nn

from harness import hookimpl, parallel
from harness.config import Component
from harness.snn import SpikingSequential

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


def _exit_worker() -> None:
    """End a worker as ``harness.cli.entry`` ends a real run (no interpreter finalization)."""
    parallel.exit_process(0)




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
    _exit_worker()


def test_gradients_are_averaged_across_processes_before_the_step(tmp_path):
    mp.spawn(_grad_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    w0, w1 = torch.load(tmp_path / "w0.pt"), torch.load(tmp_path / "w1.pt")
    assert torch.equal(w0, w1) and torch.allclose(w0, -1.5 * torch.tensor([1.0, 2.0, 3.0]))


def _overlap_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from harness import get_registry
    from harness.parallel import GradientAveragingOptimizer
    from harness.snn import LayerFactory, LIFNeuron

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    registry = get_registry()
    report = {}
    for trainer_name in ("bptt", "online"):
        nets, optimizers = [], []
        for bucket_bytes in (512, None):  # small buckets: several all-reduces while backward runs
            torch.manual_seed(0)
            layers = LayerFactory(normalizer=lambda c: registry.normalizers["vanilla_bn"](num_features=c),
                                  neuron=lambda: LIFNeuron(registry.thresholds["fixed"]()))
            net = registry.models["vgg_small"](in_channels=1, num_classes=3, input_size=(8, 8), layers=layers, channels=[4, 8])
            opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
            nets.append(net)
            optimizers.append(GradientAveragingOptimizer(opt, bucket_bytes) if bucket_bytes else GradientAveragingOptimizer(opt))
        overlapped, plain = optimizers
        launched_in_backward = []
        real_launch = overlapped._launch
        overlapped.__dict__["_launch"] = lambda k: (launched_in_backward.append(overlapped._armed), real_launch(k))[1]
        trainer = registry.trainers[trainer_name]()
        loss_fn = registry.losses["tet"]()
        g = torch.Generator().manual_seed(rank)
        for _ in range(3):
            x, y = torch.rand(3, 6, 1, 8, 8, generator=g), torch.randint(0, 3, (6,), generator=g)
            trainer.train_batch(nets[0], x, y, loss_fn, overlapped)
            # The reference: a trainer that does not say which backward is the last one.
            nets[1].train()
            from harness.snn import run_sequence

            if trainer_name == "bptt":
                plain.zero_grad(set_to_none=True)
                loss_fn(run_sequence(nets[1], x, "sequence"), y).backward()
                plain.step()
            else:
                trainer.train_batch(nets[1], x, y, loss_fn, _Plain(plain))
        report[trainer_name] = {
            "buckets": len(overlapped._buckets),
            "all_in_backward": all(launched_in_backward) and len(launched_in_backward) == 3 * len(overlapped._buckets),
            "equal": all(torch.equal(a, b) for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values())),
        }
    torch.save(report, f"{out}/overlap{rank}.pt")
    dist.destroy_process_group()
    _exit_worker()


class _Plain:
    """The optimizer as a third party's trainer sees it, without ``last_backward``."""

    def __init__(self, opt) -> None:
        self.opt = opt

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.opt.step()


def test_gradients_averaged_while_backward_runs_equal_those_averaged_after_it(tmp_path):
    mp.spawn(_overlap_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        report = torch.load(tmp_path / f"overlap{rank}.pt")
        for trainer, r in report.items():
            assert r["buckets"] > 1 and r["all_in_backward"], (trainer, r)  # every bucket started inside backward
            assert r["equal"], trainer  # the same parameters, bit for bit


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
device = "cpu"
[defaults.optimizer]
lr = 0.05
[options.model.vgg_small]
channels = [4, 8]
"""


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
    double.mkdir()
    mp.spawn(_cli_worker, args=(2, free_port(), str(path), str(double)), nprocs=2)
    assert (double / "code0").read_text() == (double / "code1").read_text() == "0 False"
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

    class FailingTracker(Recorder):  # process 0's observers: the tracking store goes down
        def __init__(self, when: str) -> None:
            super().__init__()
            self.when, self.epoch = when, 0

        def on_epoch_start(self, **kw):
            self.epoch = kw["epoch"]

        def on_batch_end(self, **kw):  # in the middle of epoch 2's training pass
            if rank == 0 and self.when == "batch" and self.epoch == 2 and kw["phase"] == "train":
                raise ConnectionError("tracking store is down")

        def on_epoch_end(self, **kw):  # at the end of the last epoch: no training step follows
            if rank == 0 and self.when == "epoch":
                raise ConnectionError("tracking store is down")

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    registry = get_registry()
    first = run_cell(tiny_cell(0, epochs=3), registry, FailingTracker("batch"))
    last = run_cell(tiny_cell(0, epochs=1), registry, FailingTracker("epoch"))  # after the last training step
    after = run_cell(tiny_cell(1, epochs=1), registry, Recorder())  # the next cell still pairs up
    Path(out, f"r{rank}.json").write_text(json.dumps({
        "first": [first.status, first.error_type, first.error, first.epochs_completed],
        "last": [last.status, last.error_type, last.error],
        "after": [after.status, after.metrics.get("train_loss"), after.metrics.get("test_top1")],
    }))
    dist.destroy_process_group()
    _exit_worker()


@pytest.mark.slow
def test_an_observer_error_in_one_process_stops_the_cell_in_every_process(tmp_path):
    import json
    import time

    ctx = mp.spawn(_observer_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:  # what the bug looks like: one process waits forever
            for p in ctx.processes:
                p.kill()
            pytest.fail("the processes hung after an observer error in process 0")
    r0, r1 = (json.loads((tmp_path / f"r{r}.json").read_text()) for r in (0, 1))
    status, kind, error, epochs = r0["first"]  # stopped by the divergence check's all-reduce
    assert (status, kind, epochs) == ("failed", "ObserverError", 1)
    assert "ConnectionError: tracking store is down" in error and "every process stopped the cell at epoch 2" in error
    status, kind, error, epochs = r1["first"]
    assert (status, kind, epochs) == ("failed", "ObserverError", 1)
    assert "an observer failed in another process; stopped at epoch 2" in error
    # After the last training step (the epoch is told after its checkpoint) the processes still
    # meet after training: both fail it.
    assert r0["last"][:2] == ["failed", "ObserverError"] and "ConnectionError: tracking store is down" in r0["last"][2]
    assert "every process stopped the cell after training" in r0["last"][2]
    assert r1["last"][:2] == ["failed", "ProcessFailed"]
    assert "process 0 of 2 failed after training (ObserverError: an observer failed" in r1["last"][2]
    assert r0["after"][0] == r1["after"][0] == "finished"
    assert r0["after"][1:] == r1["after"][1:]  # the same union-batch loss: the collectives paired up


class DdpPlugins:
    """Plugins whose failures strike one process only, as a node's own problems do."""

    @hookimpl
    def register_models(self, registry):
        def tiny_dropout(in_channels: int, num_classes: int, input_size: tuple, layers, dropout: float = 0.3,
                         fail_on_rank: int = -1):
            """conv-norm-LIF with neuron dropout (each process draws its own masks)."""
            from snn_harness_plugins.models_paper import SequenceDropout

            if fail_on_rank == parallel.current().rank:
                raise RuntimeError(f"cannot build the model on process {fail_on_rank}")
            return SpikingSequential(nn.Conv2d(in_channels, 4, 3, padding=1), layers.normalizer(4), layers.neuron(),
                                     SequenceDropout(dropout), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))

        registry.add("tiny_dropout", tiny_dropout)

    @hookimpl
    def register_trainers(self, registry):
        from snn_harness_plugins.trainers import BPTTTrainer

        class Failing(BPTTTrainer):
            def __init__(self, fail_on_rank: int = 1, phase: str = "eval") -> None:
                super().__init__()
                self.fail_on_rank, self.phase, self.batches = fail_on_rank, phase, 0

            def train_batch(self, *args, **kwargs):
                self.batches += 1
                if self.phase == "train" and self.batches == 2 and parallel.current().rank == self.fail_on_rank:
                    raise RuntimeError(f"a data file is corrupt on process {self.fail_on_rank}")
                return super().train_batch(*args, **kwargs)

            def eval_batch(self, *args, **kwargs):
                if self.phase == "eval" and parallel.current().rank == self.fail_on_rank:
                    raise RuntimeError(f"evaluation failed on process {self.fail_on_rank}")
                return super().eval_batch(*args, **kwargs)

        def failing(fail_on_rank: int = 1, phase: str = "eval") -> Failing:
            """BPTT that fails on one process, in its training steps or its evaluation."""
            return Failing(fail_on_rank, phase)

        registry.add("failing", failing, step_modes={"sequence"})

    @hookimpl
    def register_datasets(self, registry):
        from snn_harness_plugins.datasets import digits

        def node_local(missing_on_rank: int = 1):
            """digits, whose files are missing on one process's node."""
            if int(os.environ.get("RANK", "0")) == missing_on_rank:
                raise FileNotFoundError(f"/data/digits is missing on the node of process {missing_on_rank}")
            return digits()

        registry.add("node_local", node_local)


def _ddp_cell(seed: int = 0, *, model: dict | None = None, trainer: tuple[str, dict] = ("bptt", {}), epochs: int = 1):
    from cell_support import tiny_cell

    cell = tiny_cell(seed, epochs=epochs, max_train_batches=4, meters=())
    cfg = dataclasses.replace(cell.config, model=Component("tiny_dropout", {"dropout": 0.3, "fail_on_rank": -1, **(model or {})}),
                              trainer=Component(trainer[0], trainer[1]))
    return dataclasses.replace(cell, config=cfg)


def _agreement_worker(rank: int, world: int, port: int, out: str) -> None:
    import json

    import torch.distributed as dist

    from cell_support import Recorder
    from harness import get_registry
    from harness.runner import CellInterrupted, run_cell

    class StopAt(Recorder):  # Ctrl-C on every process at the end of epoch 2 (before its checkpoint)
        def on_epoch_end(self, **kw):
            if kw["epoch"] == 2:
                raise KeyboardInterrupt

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    registry = get_registry(extra_plugins=[(DdpPlugins(), "test-ddp")])
    report = {}
    built = run_cell(_ddp_cell(0, model={"fail_on_rank": 1}), registry, Recorder())
    report["build"] = [built.status, built.error_type, built.error.strip().splitlines()[-1]]
    evaluated = run_cell(_ddp_cell(0, trainer=("failing", {"fail_on_rank": 1, "phase": "eval"})), registry, Recorder())
    report["eval"] = [evaluated.status, evaluated.error_type, evaluated.error.strip().splitlines()[-1]]
    # Resume: every process continues its own random stream (dropout masks), as if never stopped.
    uninterrupted = run_cell(_ddp_cell(3, epochs=3), registry, Recorder(), Path(out, "a"))
    try:
        run_cell(_ddp_cell(3, epochs=3), registry, StopAt(), Path(out, "b"))
    except CellInterrupted:
        pass
    resumed = run_cell(_ddp_cell(3, epochs=3), registry, Recorder(), Path(out, "b"))
    keys = ("train_loss", "test_loss", "test_top1")
    report["resume"] = [[uninterrupted.metrics[k] for k in keys], [resumed.metrics[k] for k in keys], resumed.status]
    after = run_cell(_ddp_cell(1), registry, Recorder())
    report["after"] = [after.status, after.metrics.get("train_loss")]
    Path(out, f"r{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()
    _exit_worker()


def _join(ctx, seconds: float, what: str) -> None:
    import time

    deadline = time.monotonic() + seconds
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the processes hung: {what}")


@pytest.mark.slow
def test_a_failure_on_one_process_outside_the_training_step_fails_the_cell_on_every_process(tmp_path):
    import json

    _join(mp.spawn(_agreement_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=False), 240,
          "after a failure on one process")
    r0, r1 = (json.loads((tmp_path / f"r{r}.json").read_text()) for r in (0, 1))
    assert r1["build"] == ["failed", "RuntimeError", "RuntimeError: cannot build the model on process 1"]
    assert r0["build"][:2] == ["failed", "ProcessFailed"]
    assert "process 1 of 2 failed while building the cell (RuntimeError: cannot build the model on process 1); every process stopped the cell" in r0["build"][2]
    assert r1["eval"] == ["failed", "RuntimeError", "RuntimeError: evaluation failed on process 1"]
    assert r0["eval"][:2] == ["failed", "ProcessFailed"] and "failed at the end of epoch 1 (RuntimeError: evaluation failed" in r0["eval"][2]
    for r in (r0, r1):
        uninterrupted, resumed, status = r["resume"]
        assert status == "finished" and resumed == uninterrupted  # bit for bit, dropout masks included
        assert r["after"][0] == "finished"
    assert r0["after"] == r1["after"]  # the next cell's collectives still pair up


DDP_MATRIX = """
name = "ddp"
[defaults]
dataset = "{dataset}"
model = "vgg_small"
normalizer = "vanilla_bn"
trainer = "{trainer}"
epochs = 2
batch_size = 32
time_steps = 2
device = "cpu"
max_train_batches = 4
meters = []
[options.model.vgg_small]
channels = [4, 8]
"""


def _cli_worker(rank: int, world: int, port: int, matrix: str, results: str) -> None:
    import contextlib

    import torch.distributed as dist

    import harness.registry as plugin_registry

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ["SNN_HARNESS_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    torch.set_num_threads(1)
    real = plugin_registry.get_plugin_manager
    plugin_registry.get_plugin_manager = lambda **kw: real(extra_plugins=[(DdpPlugins(), "test-ddp")], **kw)
    from harness.cli import main

    with open(Path(results, f"err{rank}"), "w") as err, contextlib.redirect_stderr(err):
        code = main(["run", "--matrix", matrix, "--results", results])
    Path(results, f"code{rank}").write_text(f"{code} {dist.is_initialized()}")
    _exit_worker()


def _run_cli(tmp_path: Path, text: str, seconds: float = 120) -> tuple[list[str], list[str]]:
    path = tmp_path / "ddp.toml"
    path.write_text(text)
    results = tmp_path / "results"
    results.mkdir()
    _join(mp.spawn(_cli_worker, args=(2, free_port(), str(path), str(results)), nprocs=2, join=False), seconds, text)
    return [(results / f"code{r}").read_text() for r in (0, 1)], [(results / f"err{r}").read_text() for r in (0, 1)]


@pytest.mark.slow
def test_data_missing_on_one_node_stops_every_process_before_the_first_cell(tmp_path):
    codes, errors = _run_cli(tmp_path, textwrap.dedent(DDP_MATRIX.format(dataset="node_local", trainer="bptt")))
    assert codes == ["4 False", "4 False"]  # a usage error on both, and both left the process group
    assert "data set 'node_local'" in errors[1] and "is missing on the node of process 1" in errors[1]
    assert "process 1 of 2 failed before the first cell (HarnessError: data set 'node_local'" in errors[0]
    assert "no process ran any cell" in errors[0]
    assert not (tmp_path / "results" / "ddp").exists()  # nothing trained, nothing written


@pytest.mark.slow
def test_a_failure_inside_a_training_step_of_one_process_ends_the_run_on_every_process(tmp_path):
    from mlflow.tracking import MlflowClient

    matrix = textwrap.dedent(DDP_MATRIX.format(dataset="digits", trainer="failing")) + '[options.trainer.failing]\nphase = "train"\n'
    codes, errors = _run_cli(tmp_path, matrix)
    codes = [c.split()[0] for c in codes]
    results = tmp_path / "results"
    assert codes == ["1", "1"]
    assert "process 1 of 2 failed in a training step of epoch 1" in errors[1] and "a data file is corrupt on process 1" in errors[1]
    assert "torchrun stops them" in errors[1]
    client = MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    exp = client.get_experiment_by_name("snn-harness")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`harness.kind` = 'cell'")
    assert run.info.status == "FAILED" and run.data.tags["harness.error_type"] == "GroupBroken"  # recorded before leaving
