"""Lifecycle events as values (``harness.events``) and the ``[execution]`` table, without Ray."""

from __future__ import annotations

import pickle

import pytest

from harness import hookimpl
from harness.errors import ConfigError
from harness.events import CellEvent, CellResult, Delivery, EventSender, ObserverFailed
from harness.matrix import ExecutionConfig, load_matrix
from harness.registry import get_plugin_manager


class _Cell:
    def __init__(self, cid: str) -> None:
        self.id, self.label = cid, cid


def test_the_sender_turns_every_call_into_a_picklable_event_and_thins_batches():
    sent: list[CellEvent] = []
    sender = EventSender(sent.append, batch_interval=3600, extra_info={"worker_pid": 7})
    cell = _Cell("c1")
    sender.on_cell_start(cell=cell, info={"device": "cpu"})
    sender.on_epoch_start(cell=cell, epoch=1, num_train_batches=3, num_test_batches=1)
    for b in (1, 2, 3):
        sender.on_batch_end(cell=cell, phase="train", batch=b, num_batches=3)
    sender.on_epoch_end(cell=cell, epoch=1, metrics={"test_top1": 0.5})
    sender.on_cell_end(cell=cell, result=CellResult("c1", "c1", "finished", {"test_top1": 0.5}, 1))
    assert [(e.name, e.payload.get("batch")) for e in sent] == [
        ("on_cell_start", None), ("on_epoch_start", None), ("on_batch_end", 1), ("on_batch_end", 3),  # 2 thinned, the last kept
        ("on_epoch_end", None), ("on_cell_end", None)]
    assert sent[0].payload["info"] == {"device": "cpu", "worker_pid": 7}
    assert pickle.loads(pickle.dumps(sent)) == sent  # plain values: they travel between processes


class Observer:
    def __init__(self, name: str, log: list, fail: int = 0) -> None:
        self.name, self.log, self.fail = name, log, fail

    @hookimpl
    def on_epoch_end(self, cell, epoch, metrics):
        if self.fail:
            self.fail -= 1
            raise ConnectionError(f"{self.name} down")
        self.log.append((self.name, epoch))

    @hookimpl
    def on_cell_end(self, cell, result):
        self.log.append((self.name, "end"))


def _delivery(*observers, delays=(0.0, 0.0)):
    pm = get_plugin_manager(autoload=False)
    for obs in observers:
        pm.register(obs, obs.name)
    return Delivery(pm.hook, {"c1": _Cell("c1")}, retry_delays=delays, sleep=lambda s: None)


def test_an_observer_that_recovers_is_retried_alone_and_others_are_called_once():
    log: list = []
    delivery = _delivery(Observer("a", log), Observer("flaky", log, fail=2), Observer("b", log))
    delivery.deliver(CellEvent("c1", "on_epoch_end", {"epoch": 1, "metrics": {}}))
    assert sorted(log) == [("a", 1), ("b", 1), ("flaky", 1)]  # each once: no duplicate rows elsewhere
    assert [n for n, _ in log] == ["b", "flaky", "a"]  # pluggy's order (last registered first)
    delivery.deliver(CellEvent("c1", "on_epoch_end", {"epoch": 1, "metrics": {}}))  # a repeated epoch: dropped
    assert len(log) == 3 and delivery.records["c1"].last_epoch == 1


def test_an_observer_that_stays_down_is_named_and_then_gets_only_the_end():
    log: list = []
    delivery = _delivery(Observer("a", log), Observer("down", log, fail=99))
    with pytest.raises(ObserverFailed, match=r"observer 'down' could not record the epoch end of epoch 2 of the cell "
                       r"after 3 attempts: ConnectionError: down down"):
        delivery.deliver(CellEvent("c1", "on_epoch_end", {"epoch": 2, "metrics": {}}))
    assert log == [("a", 2)]
    delivery.deliver(CellEvent("c1", "on_epoch_end", {"epoch": 3, "metrics": {}}))  # no more epochs for 'down'
    delivery.call("c1", "on_cell_end", result=CellResult("c1", "c1", "failed"))
    assert log == [("a", 2), ("a", 3), ("down", "end"), ("a", "end")]


def test_the_driver_keeps_a_resumed_cells_earlier_time_for_the_results_it_builds_itself():
    """A worker's on_cell_start says how long the cell's earlier sittings took; a result the
    driver makes up itself (the cell killed by Ctrl-C, its worker dead) starts from it."""
    from harness.ray_executor import RayExecutor

    delivery = _delivery()
    assert delivery.records["c1"].earlier_s == 0.0
    delivery.deliver(CellEvent("c1", "on_cell_start", {"info": {"resumed_from_epoch": 3, "resumed_elapsed_s": 125.5}}))
    assert delivery.records["c1"].earlier_s == 125.5
    assert RayExecutor._so_far(delivery, _Cell("c1"))["earlier_s"] == 125.5
    delivery.deliver(CellEvent("c1", "on_cell_start", {"info": {}}))  # run again from scratch (no checkpoint)
    assert delivery.records["c1"].earlier_s == 0.0


BASE = ('name = "x"\n[defaults]\ndataset = "digits"\nmodel = "vgg_small"\nnormalizer = "vanilla_bn"\ntrainer = "bptt"\n'
        'epochs = 1\nbatch_size = 8\ntime_steps = 2\n[execution]\n')


def test_the_execution_table_is_read_and_flags_override_it(write_toml, registry):
    path = write_toml(BASE + 'executor = "ray"\ncpus_per_cell = 1\ngpus_per_cell = 0.25\nmax_retries = 0\n')
    execution = load_matrix(path, registry).execution
    assert execution == ExecutionConfig(executor="ray", cpus_per_cell=1, gpus_per_cell=0.25, max_retries=0)
    assert execution.override(executor="serial", max_concurrent=3, address=None) == ExecutionConfig(
        executor="serial", cpus_per_cell=1, gpus_per_cell=0.25, max_retries=0, max_concurrent=3)


@pytest.mark.parametrize("table, message", [
    ("cpus = 2", r"matrix.toml \[execution\]: unknown key 'cpus'; expected one of: executor, address, max_concurrent"),
    ('executor = "rya"', r"matrix.toml \[execution\]: executor 'rya' is not known \(did you mean 'ray'\?\)"),
    ("gpus_per_cell = 2", r"\[execution\]: gpus_per_cell = 2.0: a cell uses at most one GPU .* runs under torchrun"),
    ("max_retries = -1", r"\[execution\]: max_retries must be 0 or more"),
    ("cpus_per_cell = 0", r"\[execution\]: cpus_per_cell must be at least 1"),
    ('address = "ray://head:10001"', r"\[execution\]: address 'ray://head:10001': Ray Client \(ray://\) cannot stream"),
])
def test_a_bad_execution_table_names_the_file_and_the_key(write_toml, registry, table, message):
    with pytest.raises(ConfigError, match=message):
        load_matrix(write_toml(BASE + table + "\n"), registry)


def test_a_worker_never_notes_an_epoch_as_told_the_driver_does_once_it_delivered_it(registry, tmp_path):
    """The worker's cell sends its epochs and checkpoints them, but leaves the "told" note to the
    driver: a driver stopped with an epoch's event in flight must have the resume tell it again."""
    from harness import checkpoint
    from harness.matrix import ExecutionConfig
    from harness.ray_executor import RayExecutor
    from harness.runner import run_cell

    from cell_support import tiny_cell

    cell = tiny_cell(0, epochs=2)
    sent: list = []
    result = run_cell(cell, registry, EventSender(sent.append), checkpoint_dir=tmp_path, remove_checkpoint=False)
    assert result.status == "finished", result.error
    assert [e.payload["epoch"] for e in sent if e.name == "on_epoch_end"] == [1, 2]
    directory = tmp_path / cell.id
    assert checkpoint.load(directory, cell.id)["epoch"] == 1 and checkpoint.told(directory) is None
    executor = RayExecutor(ExecutionConfig(executor="ray"))
    executor.checkpoint_dir = tmp_path
    executor._mark_told(cell, 1)
    assert checkpoint.told(directory) == 1
