"""Built-in threshold policies: ``fixed`` (a constant threshold theta, Eq. 3)."""

from __future__ import annotations

from torch import Tensor

from harness import hookimpl
from harness.snn import ThresholdPolicy


class FixedThreshold(ThresholdPolicy):
    """A constant firing threshold: ``theta[t] = theta`` for every step (official code: 1.0)."""

    def __init__(self, theta: float = 1.0) -> None:
        super().__init__()
        if theta <= 0:
            raise ValueError(f"theta must be positive, got {theta}")
        self.theta = theta

    def extra_repr(self) -> str:
        return f"theta={self.theta}"

    def forward(self, u: Tensor, t: int) -> float:
        return self.theta


@hookimpl
def register_thresholds(registry) -> None:
    registry.add("fixed", FixedThreshold)
