"""The plugin is found once installed (``pip install -e examples/plugin-example``)."""

import torch

from harness import get_registry
from harness.snn import run_sequence


def test_rms_norm_is_registered_by_this_package():
    info = get_registry().normalizers.info("rms_norm")
    assert info.plugin == "example_norm"
    assert info.package.startswith("snn-harness-example-plugin ")
    assert info.step_modes == {"single", "sequence"}
    assert info.defaults() == {"eps": 1e-6}


def test_rms_norm_same_numbers_step_by_step_and_on_the_sequence():
    norm = get_registry().normalizers["rms_norm"](num_features=3)
    x = torch.randn(4, 2, 3, 5, 5)  # [T, B, C, H, W]
    y = run_sequence(norm, x, "sequence")
    torch.testing.assert_close(run_sequence(norm, x, "single"), y)
    # every sample of every step has unit RMS over C, H, W (the gain starts at one)
    torch.testing.assert_close(y.pow(2).mean(dim=(2, 3, 4)), torch.ones(4, 2), rtol=1e-4, atol=1e-4)
