"""The runner without MLflow: seeding makes a cell reproducible, hooks fire in order."""

from __future__ import annotations

from harness.config import CellConfig, Component, OptimizerConfig
from harness.matrix import Cell
from harness.runner import run_cell

from cell_support import Recorder, tiny_cell


def _cell(seed: int, **kw) -> Cell:
    return tiny_cell(seed, epochs=2, batch_size=64, **kw)


def test_same_seed_gives_identical_metrics_and_another_seed_differs(registry):
    a = run_cell(_cell(0), registry, Recorder())
    b = run_cell(_cell(0), registry, Recorder())
    c = run_cell(_cell(1), registry, Recorder())
    assert a.status == b.status == c.status == "finished", a.error
    keys = ("train_loss", "train_top1", "test_loss", "test_top1")
    assert [a.metrics[k] for k in keys] == [b.metrics[k] for k in keys]
    assert [a.metrics[k] for k in keys] != [c.metrics[k] for k in keys]


def test_hooks_fire_in_order_with_metrics(registry):
    hook = Recorder()
    result = run_cell(_cell(0), registry, hook)
    names = [n for n, _ in hook.calls]
    assert names[0] == "on_cell_start" and names[-1] == "on_cell_end"
    assert names.count("on_epoch_start") == names.count("on_epoch_end") == 2
    train_batches = [kw for n, kw in hook.calls if n == "on_batch_end" and kw["phase"] == "train"]
    assert len(train_batches) == 2 * 6 and train_batches[-1]["batch"] == train_batches[-1]["num_batches"] == 6
    epoch_metrics = [kw["metrics"] for n, kw in hook.calls if n == "on_epoch_end"]
    assert [m["lr"] for m in epoch_metrics] == [0.05, 0.025]  # cosine over 2 epochs, logged per epoch
    assert epoch_metrics[-1]["test_top1"] == result.metrics["test_top1"]
    assert hook.calls[0][1]["info"]["train_size"] == 384 and hook.calls[0][1]["info"]["num_parameters"] > 0


def test_an_exception_in_a_cell_is_a_failed_result_with_its_traceback(registry):
    hook = Recorder()
    bad = _cell(0)
    bad = Cell(bad.id, 0, CellConfig(**{**bad.config.__dict__, "model": Component("vgg_small", {"channels": []})}), bad.axes)
    result = run_cell(bad, registry, hook)
    assert result.status == "failed" and result.error_type == "ValueError"
    assert "vgg_small needs at least one stage" in result.error
    assert hook.calls[-1][0] == "on_cell_end" and hook.calls[-1][1]["result"] is result


def test_online_cells_with_osr_and_ots_train_and_report_the_fallback_rate(registry):
    import dataclasses

    base = _cell(0).config
    cfg = dataclasses.replace(
        base,
        normalizer=Component("osr", registry.normalizers.info("osr").defaults()),
        threshold=Component("ots", registry.thresholds.info("ots").defaults() | {"eval_threshold": "running"}),
        trainer=Component("online", registry.trainers.info("online").defaults()),
        model=Component("vgg_small", {"channels": [16, 32]}),
        optimizer=OptimizerConfig(lr=0.1),
        epochs=3, batch_size=32, time_steps=4, train_subset=None,
    )
    hook = Recorder()
    result = run_cell(Cell("online", 0, cfg, {}), registry, hook)
    assert result.status == "finished", result.error
    assert result.metrics["test_top1"] > 0.6  # three short epochs on digits already learn
    assert 0.0 <= result.metrics["osr_fallback_rate"] <= 1.0
    assert any(k.startswith("osr_fallback_rate/") for k in result.metrics)  # per layer too


def test_the_preflights_data_set_is_handed_to_the_first_cell_not_loaded_again(registry, tiny_matrix, tmp_path, monkeypatch):
    import harness.runner as runner
    from cell_support import Recorder
    from harness.executor import SerialExecutor
    from harness.matrix import load_matrix
    from harness.session import MatrixRun, PreloadedData, check_data, run_matrix

    matrix = load_matrix(tiny_matrix('[matrix]\nseed = [0, 1]\n'), registry)
    loads = []
    real = runner.load_dataset

    def counting(config, reg):
        loads.append(config.seed)
        return real(config, reg)

    monkeypatch.setattr(runner, "load_dataset", counting)
    preloaded = PreloadedData()
    check_data(matrix, registry, preloaded)
    assert loads == [0] and len(preloaded) == 1  # one data set for both cells
    run = MatrixRun(matrix=matrix, results_dir=tmp_path, tracking_uri="sqlite:///unused", experiment="x")
    results = run_matrix(run, registry, Recorder(), SerialExecutor(), preloaded)
    assert [r.status for r in results] == ["finished", "finished"]
    assert loads == [0, 1] and len(preloaded) == 0  # the first cell took the preflight's; the second loaded its own
    alone = runner.run_cell(matrix.cells[0], registry, Recorder())  # loads its own: the same numbers
    assert alone.metrics["test_loss"] == results[0].metrics["test_loss"]
    assert alone.metrics["train_loss"] == results[0].metrics["train_loss"]
