"""Plugins the Ray tests ship to their workers (by value: a worker need not import this file)."""

from __future__ import annotations

import os
import time

from harness import hookimpl
from snn_harness_plugins.datasets import digits
from snn_harness_plugins.trainers import BPTTTrainer


class SlowBPTT(BPTTTrainer):
    """BPTT that waits ``delay`` seconds after every training batch: a cell slow enough that a
    test can act on its first epoch while the cell is still running (the numbers are BPTT's)."""

    def __init__(self, max_grad_norm: float = 0.0, delay: float = 0.05) -> None:
        super().__init__(max_grad_norm=max_grad_norm)
        self.delay = delay

    def train_batch(self, *args, **kwargs):
        out = super().train_batch(*args, **kwargs)
        time.sleep(self.delay)
        return out


def counted_digits(log: str = ""):
    """The digits data set, which appends the loading process's pid to the file ``log`` (when
    given) every time it is loaded: a test counts the loads."""
    if log:
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\n")
    return digits()


class RayTestPlugins:
    @hookimpl
    def register_trainers(self, registry) -> None:
        registry.add("slow_bptt", SlowBPTT)

    @hookimpl
    def register_datasets(self, registry) -> None:
        registry.add("counted_digits", counted_digits)
