"""Contract suites: what a plugin's component must do, as pytest classes to subclass.

``class TestMyNorm(NormalizerContract): name = "my_norm"`` runs every clause of the normalizer
contract on the registered ``my_norm`` (docs/plugins.md, "Testing a plugin"). Enable the kit in
the test module (or a conftest) with ``pytest_plugins = ["harness.testing"]``: it provides the
fixtures some clauses need.
"""

from harness.contracts.dataset import DatasetContract
from harness.contracts.membrane_norm import MembraneNormContract
from harness.contracts.model import ModelContract, TrainerContract
from harness.contracts.normalizer import NormalizerContract
from harness.contracts.threshold import ThresholdContract

CONTRACTS = {
    "normalizer": NormalizerContract,
    "threshold": ThresholdContract,
    "membrane_norm": MembraneNormContract,
    "trainer": TrainerContract,
    "model": ModelContract,
    "dataset": DatasetContract,
}
"""The contract suite of each kind of component (losses have none yet)."""

__all__ = ["CONTRACTS", "DatasetContract", "MembraneNormContract", "ModelContract", "NormalizerContract", "ThresholdContract", "TrainerContract"]
