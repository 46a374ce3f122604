"""The plugin API of snn-harness: every hook specification, in one module.

Plugins implement these with ``@harness.hookimpl`` and are found through the
``snn_harness`` entry-point group (the built-in plugins are found the same way).

Three families of hooks:

* **Registration hooks** (``register_*``) are called once per plugin when the registry is
  built. Each receives a :class:`~harness.registry.Registrar` bound to the calling plugin;
  the plugin calls ``registry.add(name, factory)`` for each component it contributes. An
  implementation is picked by the name written in the matrix file, never by hook order; two
  plugins giving the same name is an error naming both.
* **Queries** (``finished_cells``) ask observers what they know before a matrix runs; the
  answers of all implementations are combined.
* **Lifecycle hooks** (``on_*``) are broadcasts to observers (MLflow tracking, the progress
  display, the summary writer are all observers). They return nothing and must not change
  what they are given. Observers run in the ``harness run`` process only: a cell that runs in
  another process (the ``ray`` executor) sends its calls there as events
  (:mod:`harness.events`), in the same order per cell.

Pluggy lets an implementation accept fewer arguments than the specification, so arguments
are only ever added to these hooks, never removed or renamed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from harness.registry import ObserverRegistrar, Registrar
    from harness.events import CellResult
    from harness.session import MatrixRun
    from harness.matrix import Cell, Matrix

PROJECT_NAME = "snn_harness"
"""The pluggy project name and the entry-point group of the plugin API."""

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# ---------------------------------------------------------------------------------------------
# Registration: named factories
# ---------------------------------------------------------------------------------------------


@hookspec
def register_normalizers(registry: Registrar) -> None:
    """Contribute normalizers: ``factory(num_features: int, **options) -> nn.Module``.

    A factory that also takes a ``time_steps`` argument receives the cell's ``T`` (for
    normalizers with per-step parameters), and one that takes ``v_threshold`` receives the base
    threshold of the cell's threshold policy (its ``theta`` option; tdBN scales by it).

    The module sits between a synapse and its neuron and follows the step protocol
    (:class:`harness.snn.SequenceModule`): ``forward_step`` on ``[B, C, ...]`` and/or
    ``forward_sequence`` on ``[T, B, C, ...]``. Its class attribute ``step_modes`` declares
    which it supports (``{"single", "sequence"}``, or ``{"sequence"}`` for normalizers that
    need all time steps at once, such as tdBN and TEBN).

    :param registry: call ``registry.add(name, factory)`` once per normalizer.
    """


@hookspec
def register_thresholds(registry: Registrar) -> None:
    """Contribute threshold policies: ``factory(**options) -> ThresholdPolicy``.

    A policy (:class:`harness.snn.ThresholdPolicy`) maps the membrane potential of one
    layer at one step, after charging and before firing, to the threshold ``theta[t]``.

    :param registry: call ``registry.add(name, factory)`` once per policy.
    """


@hookspec
def register_membrane_norms(registry: Registrar) -> None:
    """Contribute membrane normalizations: ``factory(num_features: int, **options) -> MembraneNorm | None``.

    A membrane normalization (:class:`harness.snn.MembraneNorm`, e.g. MPBN) acts *inside* the
    neuron step, on the membrane potential after charging and before firing: the threshold
    policy sees its output and the neuron fires on it. The cell chooses one with the key
    ``membrane_norm`` (default ``"none"``: the plain LIF, whose factory returns ``None``). A
    factory that takes ``time_steps`` receives the cell's ``T``. ``num_features`` is what the
    model passes to ``layers.neuron(C)``. The module's ``step_modes`` and ``carry`` (which
    potential the neuron goes on with after the reset) are declared as class or instance
    attributes.

    :param registry: call ``registry.add(name, factory)`` once per membrane normalization.
    """


@hookspec
def register_trainers(registry: Registrar) -> None:
    """Contribute trainers: ``factory(**options) -> Trainer`` (:class:`harness.training.Trainer`).

    A trainer owns one batch: the forward schedule (whole sequence or one step at a time), the
    loss and the backward/optimizer schedule. Its ``step_modes`` (``{"sequence"}`` or ``{"single"}``)
    decide which normalizers and thresholds a matrix cell may combine it with.

    :param registry: call ``registry.add(name, factory)`` once per trainer.
    """


@hookspec
def register_losses(registry: Registrar) -> None:
    """Contribute losses: ``factory(**options) -> SequenceLoss`` (:class:`harness.training.SequenceLoss`).

    :param registry: call ``registry.add(name, factory)`` once per loss.
    """


@hookspec
def register_models(registry: Registrar) -> None:
    """Contribute models: ``factory(in_channels, num_classes, input_size, layers, **options)``.

    ``layers`` is a :class:`harness.snn.LayerFactory`: ``layers.normalizer(C)`` and
    ``layers.neuron(C)`` build the matrix cell's normalizer and LIF neuron (with its threshold
    policy and membrane normalization) for ``C`` channels, so that any normalizer, threshold
    policy and membrane normalization fit in any model (``layers.neuron()`` without ``C`` serves
    only cells without a membrane normalization). The factory returns an
    ``nn.Module`` that follows the step protocol, usually a :class:`harness.snn.SpikingSequential`.

    :param registry: call ``registry.add(name, factory)`` once per model.
    """


@hookspec
def register_datasets(registry: Registrar) -> None:
    """Contribute data sets: ``factory(**options) -> DatasetBundle`` (:class:`harness.data.DatasetBundle`).

    A factory must not download at import time, and downloads only under an option the user can
    turn off; when files are missing it fails with one clear error naming the expected files and
    how to get them.

    :param registry: call ``registry.add(name, factory)`` once per data set.
    """


@hookspec
def register_observers(observers: ObserverRegistrar) -> None:
    """Add stateful observer objects for one harness invocation.

    Observers implement the lifecycle hooks below. They are created afresh for every
    invocation (no module-level state): ``observers.add(MyObserver(), "name")``.

    :param observers: registers objects with this invocation's plugin manager.
    """


# ---------------------------------------------------------------------------------------------
# Queries: asked of observers before a matrix runs
# ---------------------------------------------------------------------------------------------


@hookspec
def finished_cells(matrix: Matrix, tracking_uri: str, experiment: str) -> list[str]:
    """Ids of the matrix's cells that already finished in the tracking store.

    ``harness run`` skips them (``--rerun`` runs them again): a finished result is never
    duplicated. Called before ``on_matrix_start``; every implementation's ids are combined.

    :param matrix: the loaded matrix (its ``cells`` are the ones about to run).
    :param tracking_uri: the resolved tracking URI.
    :param experiment: the tracking experiment's name.
    """


@hookspec(firstresult=True)
def recorded_code(matrix: Matrix, tracking_uri: str, experiment: str) -> dict[str, dict[str, str]]:
    """For each of the matrix's finished cells, the code its result was produced with, as the
    tracking store recorded it: ``{cell id: {distribution: "<version>+src.<hash>"}}``
    (:mod:`harness.provenance`; an empty mapping for a result recorded without it).

    ``harness run`` compares it with the installed code and lists the finished cells whose code
    changed (``--rerun-changed`` runs them again). The first implementation that answers wins.

    :param matrix: the loaded matrix.
    :param tracking_uri: the resolved tracking URI.
    :param experiment: the tracking experiment's name.
    """


# ---------------------------------------------------------------------------------------------
# Lifecycle: matrix
# ---------------------------------------------------------------------------------------------


@hookspec
def on_matrix_start(run: MatrixRun) -> None:
    """A matrix is about to run; called in the parent process before any cell starts.

    :param run: the matrix, its runnable and skipped cells, results directory and tracking settings.
    """


@hookspec
def on_matrix_end(run: MatrixRun, results: list[CellResult]) -> None:
    """A matrix has ended (all cells ran, or it was interrupted: see ``run.interrupted``).

    :param run: the matrix run.
    :param results: one result per cell that started, in order.
    """


# ---------------------------------------------------------------------------------------------
# Lifecycle: cell
# ---------------------------------------------------------------------------------------------


@hookspec
def on_cell_start(cell: Cell, info: dict[str, Any]) -> None:
    """A cell starts training.

    :param cell: the cell (its ``config`` is the fully resolved configuration).
    :param info: facts known once the cell is built: ``device``, ``num_parameters``, ``model_size_bytes``,
        ``train_size``, ``test_size``; ``resumed_from_epoch`` when the cell continues from its
        checkpoint (the epochs up to it ran in an earlier process), with ``resumed_elapsed_s``
        (the seconds those earlier sittings took up to it); ``checkpoint_discarded`` (the
        reason) when a checkpoint was there but unusable and the cell starts from scratch;
        ``warnings`` (a list of sentences) when the resume could not restore everything (e.g. the
        random states of GPUs that are not visible now); under the ``ray`` executor
        ``worker_host``, ``worker_pid`` and ``worker_node``. A cell run again after its worker
        died starts again, without an ``on_cell_end`` in between.
    """


@hookspec
def on_cell_end(cell: Cell, result: CellResult) -> None:
    """A cell ended: ``result.status`` is ``"finished"``, ``"failed"`` or ``"killed"``.

    It can come without an ``on_cell_start`` when the cell failed or was stopped before it was
    built (e.g. while loading its data).

    :param cell: the cell.
    :param result: final metrics, status, the error text of a failed cell, and
        ``artifacts`` (file name -> bytes) the cell produced.
    """


# ---------------------------------------------------------------------------------------------
# Lifecycle: epoch and batch
# ---------------------------------------------------------------------------------------------


@hookspec
def on_epoch_start(cell: Cell, epoch: int, num_train_batches: int, num_test_batches: int) -> None:
    """An epoch starts (``epoch`` counts from 1).

    :param cell: the cell.
    :param epoch: the epoch number, from 1.
    :param num_train_batches: batches in this epoch's training pass.
    :param num_test_batches: batches in this epoch's evaluation pass.
    """


@hookspec
def on_batch_end(cell: Cell, phase: str, batch: int, num_batches: int) -> None:
    """A batch of ``phase`` (``"train"``, ``"test"``, or ``"ema_test"``: the evaluation of the
    model's moving average, where the cell keeps one) ended; ``batch`` counts from 1.

    Called in the hot loop: implementations must be cheap and never synchronize a device.
    """


@hookspec
def on_epoch_end(cell: Cell, epoch: int, metrics: dict[str, float]) -> None:
    """An epoch ended, with its metrics (``train_loss``, ``train_top1``, ``test_loss``,
    ``test_top1``, ``best_test_top1``, ``epoch_time_s``, ``lr``, and whatever plugins add).

    :param cell: the cell.
    :param epoch: the epoch number, from 1.
    :param metrics: metric name to value.
    """
