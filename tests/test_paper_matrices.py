"""The ready paper matrices carry Table 3's hyperparameters and the rows of Tables 1 and 4."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.matrix import load_matrix

REPO = Path(__file__).resolve().parents[1]

# data set: (epochs, batch, lr, weight decay, TET mse weight, neuron dropout, T)  -- docs/method.md section 8
TABLE3 = {
    "paper-cifar10": (300, 128, 0.1, 5e-4, 0.05, 0.0, 4),
    "paper-cifar100": (300, 128, 0.1, 5e-4, 0.05, 0.0, 4),
    "paper-dvs-gesture": (300, 128, 0.01, 5e-4, 0.001, 0.05, 20),
    "paper-cifar10-dvs": (300, 128, 0.1, 5e-4, 0.001, 0.1, 10),
    "paper-imagenet": (100, 256, 0.1, 2e-5, 0.05, 0.0, 4),
}
ROWS = {
    "paper-cifar10": {("vggsnn", "online", "vanilla_bn", "fixed"), ("vggsnn", "online", "osr", "fixed"), ("vggsnn", "online", "osr", "ots"),
                      ("resnet19", "online", "osr", "ots"), ("vggsnn", "bptt", "vanilla_bn", "fixed"), ("vggsnn", "bptt", "tdbn", "fixed"),
                      ("vggsnn", "bptt", "tebn", "fixed")},
    "paper-dvs-gesture": {("vggsnn", "online", "osr", "ots"), ("vggsnn", "online", "vanilla_bn", "fixed"), ("vggsnn", "bptt", "vanilla_bn", "fixed")},
    "paper-imagenet": {("sew_resnet34", "online", "vanilla_bn", "fixed"), ("sew_resnet34", "online", "osr", "fixed"),
                       ("sew_resnet34", "online", "osr", "ots"), ("nf_resnet34", "online", "osr", "ots")},
}
ROWS["paper-cifar100"] = ROWS["paper-cifar10"]
ROWS["paper-cifar10-dvs"] = ROWS["paper-dvs-gesture"]
# Table 4's weight decay where it differs from Table 3's: (model, normalizer, threshold) -> weight decay
TABLE4_WD = {
    "paper-cifar10": {("vggsnn", "osr", "fixed"): 2e-4, ("resnet19", "osr", "ots"): 2e-5},
    "paper-cifar100": {("vggsnn", "osr", "fixed"): 2e-4, ("resnet19", "osr", "ots"): 2e-4},
    "paper-imagenet": {("sew_resnet34", "osr", "fixed"): 0.0},
}


@pytest.mark.parametrize("name", sorted(TABLE3))
def test_paper_matrix_has_table_3_hyperparameters_and_the_paper_rows(name, registry):
    m = load_matrix(REPO / "benchmarks" / f"{name}.toml", registry)
    assert m.name == name and not m.skipped
    epochs, batch, lr, wd, mse, dropout, T = TABLE3[name]
    for cell in m.cells:
        c = cell.config
        wd_cell = TABLE4_WD.get(name, {}).get((c.model.name, c.normalizer.name, c.threshold.name), wd)
        assert (c.epochs, c.batch_size, c.optimizer.lr, c.optimizer.weight_decay, c.time_steps) == (epochs, batch, lr, wd_cell, T)
        assert c.lr_schedule.warmup_epochs == 0  # cosine without warm-up, as the paper had it
        assert c.optimizer.name == "sgd" and c.optimizer.momentum == 0.9 and c.lr_schedule.name == "cosine"
        assert c.loss.name == "tet" and c.loss.options["mse_weight"] == mse
        assert c.model.options.get("dropout", 0.0) == dropout
        assert c.seed == 1  # the official code's seed
    rows = {(c.config.model.name, c.config.trainer.name, c.config.normalizer.name, c.config.threshold.name) for c in m.cells}
    assert rows == ROWS[name]


@pytest.mark.parametrize("path", ["benchmarks.toml", "benchmarks/ablation-fmnist-full.toml", "benchmarks/ablation-fmnist-long.toml"])
def test_the_ablation_matrices_train_osr_without_ots_at_the_lower_weight_decay(path, registry):
    m = load_matrix(REPO / path, registry)
    for cell in m.cells:
        c = cell.config
        osr_alone = c.normalizer.name == "osr" and c.threshold.name == "fixed"
        assert c.optimizer.weight_decay == (2e-4 if osr_alone else 5e-4), cell.label
    assert any(c.config.normalizer.name == "osr" and c.config.threshold.name == "fixed" for c in m.cells)
    assert "OSR without OTS at 2e-4" in (REPO / path).read_text().split("\nname =")[0]  # said in the header


def test_the_long_ablation_is_the_default_recipe_trained_four_times_as_long(registry):
    """ablation-fmnist-long.toml: the default matrix's configurations it shares, cell for cell the
    same but for 20 epochs (so the default matrix is its 5-epoch control), plus OSR + OTS with the
    fast-tracking running statistics (the labelled deviation), and its [[difference]] tables."""
    import dataclasses

    from harness.matrix import cell_id

    long = load_matrix(REPO / "benchmarks" / "ablation-fmnist-long.toml", registry)
    short = {c.id: c for c in load_matrix(REPO / "benchmarks.toml", registry).cells}
    assert len(long.cells) == 18 and not long.skipped
    fast = [c for c in long.cells if c.config.normalizer.options.get("momentum_warmup_batches")]
    plain = [c for c in long.cells if c not in fast]
    for cell in plain:
        control = cell_id(dataclasses.replace(cell.config, epochs=5))
        assert control in short, f"{cell.label}: no cell of benchmarks.toml with this recipe at 5 epochs"
        assert cell.config.epochs == 20
    got = {(c.config.trainer.name, c.config.normalizer.name, c.config.threshold.name) for c in plain}
    assert got == {("online", n, t) for n in ("vanilla_bn", "osr") for t in ("fixed", "ots")} | {("bptt", "vanilla_bn", "fixed")}
    assert sorted(c.config.seed for c in plain) == sorted([0, 1, 2] * 5)
    assert len(fast) == 3
    for cell in fast:
        c = cell.config
        assert (c.trainer.name, c.normalizer.name, c.threshold.name) == ("online", "osr", "ots")
        assert (c.normalizer.options["momentum_warmup_batches"], c.normalizer.options["momentum_start"]) == (938, 0.5)
        twin = next(p for p in plain if p.config.seed == c.seed and p.config.normalizer.name == "osr" and p.config.threshold.name == "ots")
        other = dict(c.normalizer.options, momentum_warmup_batches=twin.config.normalizer.options["momentum_warmup_batches"])
        assert dataclasses.replace(c, normalizer=dataclasses.replace(c.normalizer, options=other)) == twin.config
    header = (REPO / "benchmarks" / "ablation-fmnist-long.toml").read_text().split("\nname =")[0]
    assert "DEVIATION from the paper" in header and "938 batches" in header
    assert [d.name for d in long.differences] == [
        "osr_minus_vanilla_bn", "osr_ots_minus_osr", "osr_ots_minus_vanilla_bn", "fast_stats_minus_paper_stats",
        "online_minus_bptt_vanilla_bn"]


def test_tab_and_mpbn_run_the_default_recipe(registry):
    """fmnist-tab-mpbn.toml: each cell is a vanilla-BN cell of benchmarks.toml (same trainer and
    seed) with TAB as the normalizer or MPBN inside the neuron, so its numbers sit beside the
    default matrix's."""
    import dataclasses

    extra = load_matrix(REPO / "benchmarks" / "fmnist-tab-mpbn.toml", registry)
    default = load_matrix(REPO / "benchmarks.toml", registry)
    plain = {(c.config.trainer.name, c.config.seed): c.config for c in default.cells
             if c.config.normalizer.name == "vanilla_bn" and c.config.threshold.name == "fixed"}
    got = set()
    for cell in extra.cells:
        c = cell.config
        base = plain[(c.trainer.name, c.seed)]
        assert dataclasses.replace(base, normalizer=c.normalizer, membrane_norm=c.membrane_norm) == c, cell.label
        got.add((c.trainer.name, c.normalizer.name, c.membrane_norm.name))
    assert got == {("bptt", "tab", "none"), ("bptt", "vanilla_bn", "mpbn"), ("online", "vanilla_bn", "mpbn")}
    assert len(extra.cells) == 9 and not extra.skipped
