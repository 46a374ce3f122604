"""The plugin in a real matrix next to a built-in, with the harness's test kit (``harness.testing``)."""

import snn_harness_example_plugin

from harness.testing import NormalizerContract

MATRIX = """
name = "rms-norm-check"
[defaults]
dataset = "digits"
model = "vgg_small"
trainer = "bptt"
epochs = 1
batch_size = 128
time_steps = 2
train_subset = 256
device = "cpu"
[options.model.vgg_small]
channels = [4, 8]
[matrix]
normalizer = ["vanilla_bn", "rms_norm"]
"""


def test_rms_norm_trains_in_a_matrix_beside_vanilla_bn(harness_run_matrix):
    outcome = harness_run_matrix(MATRIX, plugins=((snn_harness_example_plugin, "example_norm"),))
    outcome.assert_success()  # on failure: the output and the summary, with the reason of each failed cell
    assert {row["normalizer"] for row in outcome.summary} == {"vanilla_bn", "rms_norm"}


class TestRMSNormContract(NormalizerContract):
    """Every clause of the normalizer contract, on ``rms_norm`` (``pytest -rs`` shows why a clause
    is skipped: it declares no synchronized statistics, having none)."""

    name = "rms_norm"
    plugins = ((snn_harness_example_plugin, "example_norm"),)  # tested whether or not it is installed
