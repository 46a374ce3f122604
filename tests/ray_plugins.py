"""Plugins the Ray tests ship to their workers (by value: a worker need not import this file)."""

from __future__ import annotations

import time

from harness import hookimpl
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


class SlowTrainers:
    @hookimpl
    def register_trainers(self, registry) -> None:
        registry.add("slow_bptt", SlowBPTT)
