"""Built-in threshold policies: ``fixed`` (a constant threshold theta, Eq. 3) and ``ots``
(Online Threshold Stabilizer, Eq. 16, Algorithm 1 step 4; docs/method.md section 6)."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from torch import Tensor

from harness import Range, hookimpl

Theta = Annotated[float, Range(0.0, low_open=True)]
from harness.snn import ThresholdPolicy
from harness.snn.distributed import is_synchronized, synced_moments


class FixedThreshold(ThresholdPolicy):
    """A constant firing threshold: ``theta[t] = theta`` for every step (official code: 1.0)."""

    def __init__(self, theta: Theta = 1.0) -> None:
        super().__init__()
        if theta <= 0:
            raise ValueError(f"theta must be positive, got {theta}")
        self.theta = theta

    def extra_repr(self) -> str:
        return f"theta={self.theta}"

    def forward(self, u: Tensor, t: int) -> float:
        return self.theta


class OnlineThresholdStabilizer(ThresholdPolicy):
    """Online Threshold Stabilizer, OTS (Eq. 16; docs/method.md section 6).

    The membrane potential of a layer at step ``t`` (after charging, before firing) is taken as
    Gaussian with layer-wide scalar mean ``mu[t]`` and standard deviation ``sigma[t]`` (over all
    neurons and the batch, computed without gradient; the unbiased standard deviation, ``torch.std``,
    as in the official code).
    The firing quantile is kept constant across the steps of a sequence::

        theta[1] = theta,   r = (theta - mu[1]) / sigma[1],   theta[t] = mu[t] + sigma[t] * r

    ``eval_threshold = "dynamic"`` (the official code) recomputes thresholds from each test
    batch; ``"running"`` keeps per-step running thresholds (EMA with ``momentum`` over training
    sequences, in the state dict) and uses them at inference, so a test result does not depend
    on the test batch (Appendix E). Steps beyond the trained ``T`` use the last running threshold.

    Under DDP (training), ``mu[t]`` and ``sigma[t]`` are those of the union batch, so thresholds
    and running thresholds are the same on every process. Dynamic thresholds at inference use each
    process's own test batch (no collective in evaluation).

    Device-resident: thresholds, running thresholds and their count never leave the device (no
    host synchronization per step or per sequence), and a checkpoint loads onto the module's own
    device. Statistics of a 16-bit membrane potential (mixed precision) are taken in float32.
    """

    def __init__(
        self,
        theta: Theta = 1.0,
        eval_threshold: Literal["dynamic", "running"] = "dynamic",
        momentum: Annotated[float, Range(0.0, 1.0, low_open=True)] = 0.1,
        min_std: Annotated[float, Range(0.0)] = 1e-6,
    ) -> None:
        super().__init__()
        if theta <= 0:
            raise ValueError(f"theta must be positive, got {theta}")
        if eval_threshold not in ("dynamic", "running"):
            raise ValueError(f"eval_threshold must be 'dynamic' or 'running', got {eval_threshold!r}")
        self.theta, self.eval_threshold, self.momentum, self.min_std = theta, eval_threshold, momentum, min_std
        self.register_buffer("running_theta", torch.zeros(0))  # [T] once trained
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self._r: Tensor | None = None
        self._thetas: list[Tensor] = []

    def extra_repr(self) -> str:
        return f"theta={self.theta}, eval_threshold={self.eval_threshold!r}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        key = prefix + "running_theta"
        if key in state_dict:  # its length is the trained T, unknown at construction
            # Resized where this module lives (a checkpoint is read onto the CPU), then copied into.
            shape = state_dict[key].shape
            self.running_theta = torch.empty(shape, dtype=self.running_theta.dtype, device=self.running_theta.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def begin_sequence(self, time_steps: int) -> None:
        self._r = None
        self._thetas = []

    def end_sequence(self) -> None:
        if self.training and self._thetas and len(self._thetas) == self.time_steps:
            with torch.no_grad():
                thetas = torch.stack(self._thetas).to(self.running_theta.dtype)
                if self.running_theta.numel() != thetas.numel():  # the first sequence, or another T
                    self.running_theta = thetas.clone()
                    self.num_batches_tracked.zero_()
                else:  # a count of 0 (a reset) restarts the average: decided on the device, no host sync
                    restart = self.num_batches_tracked == 0
                    self.running_theta.copy_(torch.where(restart, thetas, self.running_theta.lerp(thetas, self.momentum)))
                self.num_batches_tracked += 1
        self._thetas = []

    @torch.no_grad()
    def forward(self, u: Tensor, t: int) -> Tensor:
        if not self.training and self.eval_threshold == "running":
            if self.running_theta.numel() == 0:
                raise RuntimeError("ots: eval_threshold = 'running' but no running thresholds were trained")
            return self.running_theta[min(t, self.running_theta.numel() - 1)]
        u = u.detach()
        if u.dtype in (torch.float16, torch.bfloat16):  # statistics in float32 under mixed precision
            u = u.float()
        if is_synchronized(self.training):  # DDP: statistics of the union batch, same theta everywhere
            mu, var, n = synced_moments(u, tuple(range(u.ndim)), keepdim=False)
            sigma = torch.sqrt(var * (n / (n - 1).clamp_min(1))).clamp_min(self.min_std)  # unbiased, as torch.std
        else:  # two passes, as torch.std computes it but several times cheaper on the CPU
            mu = u.mean()
            if u.numel() > 1:
                d = u - mu
                sigma = (d.mul_(d).sum() / (u.numel() - 1)).sqrt().clamp_min(self.min_std)  # unbiased, as torch.std
            else:
                sigma = torch.full_like(mu, self.min_std)
        if t == 0 or self._r is None:
            self._r = (self.theta - mu) / sigma  # the quantile of theta[1] = theta
            theta = torch.full_like(mu, self.theta)  # made on the device: no copy from the host
        else:
            theta = mu + sigma * self._r  # Eq. 16
        if self.training:
            self._thetas.append(theta)
        return theta


@hookimpl
def register_thresholds(registry) -> None:
    registry.add("fixed", FixedThreshold)
    registry.add("ots", OnlineThresholdStabilizer)
