"""Spiking building blocks and the step protocol (see ``docs/plugins.md``)."""

from harness.snn.neuron import LayerFactory, LIFNeuron, MembraneNorm, SigmoidSurrogateSpike, ThresholdPolicy, spike
from harness.snn.protocol import (
    STEP_MODES,
    AvgPool,
    GlobalAvgPool,
    SequenceAware,
    SequenceModule,
    SpikingSequential,
    TimeDistributed,
    begin_sequence,
    collect_epoch_metrics,
    end_sequence,
    run_sequence,
    sequence_modules,
    set_step_mode,
    step_modes_of,
)

__all__ = [
    "STEP_MODES",
    "AvgPool",
    "GlobalAvgPool",
    "LIFNeuron",
    "LayerFactory",
    "MembraneNorm",
    "SequenceAware",
    "SequenceModule",
    "SigmoidSurrogateSpike",
    "SpikingSequential",
    "ThresholdPolicy",
    "TimeDistributed",
    "begin_sequence",
    "collect_epoch_metrics",
    "end_sequence",
    "run_sequence",
    "sequence_modules",
    "set_step_mode",
    "spike",
    "step_modes_of",
]
