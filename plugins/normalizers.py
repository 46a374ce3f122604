"""Built-in normalizers: ``vanilla_bn`` (per-step batch normalization, docs/method.md section 4),
``osr`` (Online Spiking Renormalization, paper Eqs. 8-15, Algorithms 1-2, docs/method.md section 5) and
the baselines ``bntt``, ``tdbn``, ``tebn`` (docs/method.md section 7) and ``tab`` (Jiang et al. 2024);
and the membrane normalizations, which act inside the neuron step: ``none`` (the plain LIF) and
``mpbn`` (Membrane Potential Batch Normalization, Guo et al. 2023; docs/method.md section 10).

Under data-parallel training (``torch.distributed`` initialized with more than one process) every
batch statistic is computed over the union of the processes' batches, like ``nn.SyncBatchNorm``,
gradients included (:mod:`harness.snn.distributed`): W processes with B/W samples each give the
numbers of one process with B samples. Single-process results are unchanged, bit for bit."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from torch import Tensor, nn

from harness import Range, hookimpl
from harness.snn import MembraneNorm, SequenceModule
from harness.snn.distributed import batch_norm, is_synchronized, stats_group, synced_moments
from harness.snn.fused import NormSpec, channel_view, per_step_norm

# Option constraints, checked when a matrix is loaded (harness.validate)
Eps = Annotated[float, Range(0.0, low_open=True)]
Momentum = Annotated[float, Range(0.0, 1.0, low_open=True)]  # run += momentum * (new - run)


def _inference_affine(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, channel_dim: int
) -> Tensor:
    """``gamma * (x - mean) / sqrt(var + eps) + beta`` as one pass, ``x * a + b`` (statistics in
    float32; the output in ``x``'s precision)."""
    a = torch.rsqrt(var + eps)
    b = -mean * a
    if weight is not None:
        a = a * weight
        b = b * weight
    if bias is not None:
        b = b + bias
    y = torch.addcmul(channel_view(b, x.ndim, channel_dim), x, channel_view(a, x.ndim, channel_dim))
    return y.to(x.dtype) if y.dtype != x.dtype else y


class _StepStatisticsNorm(SequenceModule):
    """Shared by ``vanilla_bn`` and ``osr``: per-channel affine parameters, running buffers, and
    the per-step batch statistics accumulated over a sequence, applied once at ``t = T`` with
    ``run += momentum * (new - run)`` (PyTorch's momentum 0.1 is the paper's 0.9).

    Subclasses say what is accumulated: ``_second_moment(mean, var)`` per step (vanilla BN: the
    variance; OSR: ``var + mean^2``, Eq. 15) and how the sequence variance follows from the sums
    (``_sequence_var``)."""

    synchronized_statistics = True  # statistics of the union batch under torch.distributed (harness.snn.distributed)

    def __init__(self, num_features: int, eps: float, momentum: float, affine: bool) -> None:
        super().__init__()
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self._sum_mean: Tensor | None = None  # sum_t mu[t] / T (Eq. 14)
        self._sum_second: Tensor | None = None  # sum_t _second_moment(mu[t], var[t]) / T

    def _second_moment(self, mean: Tensor, var: Tensor) -> Tensor:
        raise NotImplementedError

    def _sequence_var(self, sum_mean: Tensor, sum_second: Tensor) -> Tensor:
        raise NotImplementedError

    def begin_sequence(self, time_steps: int) -> None:
        self._sum_mean = self._sum_second = None  # Alg. 2: at t = 1, the sums are 0

    def end_sequence(self) -> None:
        if self.training and self._sum_mean is not None:
            with torch.no_grad():  # Alg. 2, step 3, at t = T
                momentum = self._momentum()
                self.running_mean.lerp_(self._sum_mean, momentum)
                self.running_var.lerp_(self._sequence_var(self._sum_mean, self._sum_second), momentum)
                self.num_batches_tracked += 1
        self._sum_mean = self._sum_second = None

    def _momentum(self) -> float | Tensor:
        """The momentum of this update of the running statistics."""
        return self.momentum

    def _accumulate(self, mean: Tensor, var: Tensor) -> None:
        # mean/var keep singleton dims; per-step stats are [C] (one step) or [T, C] (sequence).
        mu = mean.reshape(-1, self.num_features)
        v = var.reshape(-1, self.num_features)
        m = mu.sum(0) / self.time_steps
        second = self._second_moment(mu, v).sum(0) / self.time_steps
        self._sum_mean = m if self._sum_mean is None else self._sum_mean + m
        self._sum_second = second if self._sum_second is None else self._sum_second + second


class VanillaBatchNorm(_StepStatisticsNorm):
    """Per-step batch normalization, the paper's online baseline (Appendix C, docs/method.md section 4).

    Training, at every step ``t``: ``Ĩ[t] = gamma * (I[t] - mu[t]) / sqrt(var[t] + eps) + beta``
    with the batch mean and biased variance of that step only (per channel, over batch and
    space). Running statistics: ``M = sum_t mu[t] / T``, ``V = sum_t var[t] / T``, applied once per
    sequence at ``t = T``: ``run += momentum * (new - run)`` (PyTorch's momentum 0.1 is the
    paper's 0.9). Inference uses the running statistics. eps = 1e-4, the official code's value for
    both of its BN modes (PyTorch's 1e-5 before).

    Works on ``[B, C]`` (after a linear synapse) and ``[B, C, ...]`` (after a conv), one step at a
    time or on the whole sequence ``[T, B, C, ...]`` (same numbers either way).
    """

    def __init__(self, num_features: int, eps: Eps = 1e-4, momentum: Momentum = 0.1, affine: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.weight is not None}"

    def _second_moment(self, mean: Tensor, var: Tensor) -> Tensor:
        return var  # Appendix C: V = sum_t var[t] / T

    def _sequence_var(self, sum_mean: Tensor, sum_second: Tensor) -> Tensor:
        return sum_second

    def _normalize(self, x: Tensor, channel_dim: int, stat_dims: tuple[int, ...]) -> Tensor:
        # Statistics and arithmetic in float32 at least (16-bit inputs under mixed precision are
        # promoted); the output has the input's precision.
        if not self.training:
            return _inference_affine(x, self.running_mean, self.running_var, self.weight, self.bias, self.eps, channel_dim)
        spec = NormSpec(stat_dims, channel_dim, self.eps, synchronized=is_synchronized(True), group=stats_group())
        y = per_step_norm(x, self.weight, self.bias, spec)  # one autograd node; across processes under DDP
        self._accumulate(spec.mean, spec.var)
        return y

    def forward_step(self, x: Tensor) -> Tensor:
        # x: [B, C, ...]; statistics over batch and space.
        return self._normalize(x, 1, (0, *range(2, x.ndim)))

    def forward_sequence(self, x: Tensor) -> Tensor:
        # x: [T, B, C, ...]; statistics of each step over its batch and space, all steps at once.
        return self._normalize(x, 2, (1, *range(3, x.ndim)))


class OnlineSpikingRenormalization(_StepStatisticsNorm):
    """Online Spiking Renormalization, OSR (paper Eqs. 8-15, Algorithms 1-2; docs/method.md section 5).

    Training, at each step ``t``, with ``mu[t]``, ``var[t]`` the per-channel batch mean and biased
    variance of ``I[t]`` (Eq. 13) and ``Î[t] = (I[t] - mu[t]) / sqrt(var[t] + eps)``::

        Ĩ[t] = gamma * ( Î[t] * ng(sqrt(var[t] + eps) / sqrt(run_var + eps))
                         + ng((mu[t] - run_mean) / sqrt(run_var + eps)) ) + beta      (Eq. 9)

    ``ng`` = no gradient. The value equals the inference transform
    ``gamma * (I[t] - run_mean) / sqrt(run_var + eps) + beta`` (Eq. 8); the gradient flows
    through the batch normalization ``Î[t]`` (Eqs. 10-12). All-time statistics online
    (Eqs. 14-15): ``M += mu[t]/T``, ``S += (var[t] + mu[t]^2)/T``; at ``t = T``: ``S -= M^2`` and
    ``run += momentum * (new - run)`` (PyTorch's 0.1 is the paper's 0.9).

    Options:

    * ``fallback_ratio``: the official code normalizes a whole layer at one step with the plain
      batch statistics while running and batch standard deviations are more than this many
      times apart (20 for static images, 50 for DVS data; ``"none"`` disables it). Here the
      backward of such a step is that of plain BN (the official code keeps the OSR backward).
      The fraction of steps that fell back is reported per epoch (:meth:`epoch_metrics`).
    * ``mode = "linear"``: the "linear transformation only" ablation (Appendix E): Eq. 8 in
      training with no batch normalization inside (trains badly, as the paper reports).
    * ``gamma_grad = "official"``: the official CUDA path's gamma gradient, which omits the factor
      ``sqrt(var[t]+eps)/sqrt(run_var+eps)`` on its first term; ``"paper"`` (autograd of Alg. 1).

    Deviations from the paper, off by default (the paper's running statistics have momentum 0.9,
    PyTorch's 0.1). Since OSR's training forward has the running statistics' value (Eq. 8), they
    lag the batch statistics early in training, while the network changes fast, and slow it down:

    * ``momentum``: another PyTorch-style momentum for the whole run (e.g. 0.5);
    * ``momentum_warmup_batches = N > 0``: the momentum of the k-th update (k = 0, 1, ...; the
      layer's ``num_batches_tracked``, kept in checkpoints) is
      ``momentum_start + (momentum - momentum_start) * min(k, N) / N``: from ``momentum_start``
      (0.5) at the first training batch linearly to ``momentum`` at batch N, and ``momentum``
      from then on (the paper's value by default). Counted in the layer's own updates (the
      batches it trained on, not epochs: a normalizer does not see epochs).

    Running buffers start at mean 0, variance 1 (official code); eps = 1e-4 (official code).
    Under DDP, ``mu[t]`` and ``var[t]`` are those of the union batch (the official code
    synchronizes them too): the all-time statistics, the fallback decision and its count are the
    same on every process.
    """

    def __init__(
        self,
        num_features: int,
        eps: Eps = 1e-4,
        momentum: Momentum = 0.1,
        fallback_ratio: Annotated[float, Range(1.0, low_open=True)] | Literal["none"] = 20.0,
        mode: Literal["renorm", "linear"] = "renorm",
        gamma_grad: Literal["paper", "official"] = "paper",
        affine: bool = True,
        momentum_warmup_batches: Annotated[int, Range(0)] = 0,
        momentum_start: Momentum = 0.5,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine)
        if momentum_warmup_batches < 0:
            raise ValueError(f"momentum_warmup_batches must be >= 0, got {momentum_warmup_batches}")
        if not 0.0 < momentum_start <= 1.0:
            raise ValueError(f"momentum_start must be in (0, 1], got {momentum_start}")
        self.momentum_warmup_batches, self.momentum_start = int(momentum_warmup_batches), float(momentum_start)
        if fallback_ratio != "none" and not (isinstance(fallback_ratio, (int, float)) and fallback_ratio > 1.0):
            raise ValueError(f"fallback_ratio must be a number > 1 or 'none', got {fallback_ratio!r}")
        if mode not in ("renorm", "linear"):
            raise ValueError(f"mode must be 'renorm' or 'linear', got {mode!r}")
        if gamma_grad not in ("paper", "official"):
            raise ValueError(f"gamma_grad must be 'paper' or 'official', got {gamma_grad!r}")
        self.fallback_ratio = None if fallback_ratio == "none" else float(fallback_ratio)
        self.mode, self.gamma_grad = mode, gamma_grad
        self._fallback_steps: Tensor | int = 0  # a device tensor while training: no sync per step
        self._steps = 0

    def extra_repr(self) -> str:
        warmup = (f", momentum_warmup_batches={self.momentum_warmup_batches}, momentum_start={self.momentum_start}"
                  if self.momentum_warmup_batches else "")
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, fallback_ratio={self.fallback_ratio}, "
            f"mode={self.mode!r}, gamma_grad={self.gamma_grad!r}{warmup}"
        )

    def _momentum(self) -> float | Tensor:
        """``momentum``, or during the warm-up its linear ramp from ``momentum_start``, as a tensor
        on the buffers' device (computed there from ``num_batches_tracked``: no host sync)."""
        n = self.momentum_warmup_batches
        if not n:
            return self.momentum
        done = self.num_batches_tracked.clamp(max=n).to(self.running_mean.dtype) / n
        return self.momentum_start + (self.momentum - self.momentum_start) * done

    # -- all-time statistics (Eqs. 14-15, Alg. 2) -----------------------------------------------
    def _second_moment(self, mean: Tensor, var: Tensor) -> Tensor:
        return var + mean.square()  # S += (var[t] + mu[t]^2) / T

    def _sequence_var(self, sum_mean: Tensor, sum_second: Tensor) -> Tensor:
        return sum_second - sum_mean.square()  # at t = T: S -= M^2

    def epoch_metrics(self) -> dict[str, float]:
        """Fraction of training steps since the last call that fell back to batch statistics."""
        out = {"osr_fallback_rate": float(self._fallback_steps) / self._steps} if self._steps else {}
        self._fallback_steps = self._steps = 0
        return out

    # -- forward ------------------------------------------------------------------------------
    def forward_step(self, x: Tensor) -> Tensor:
        return self._forward(x, 1, (0, *range(2, x.ndim)))  # x: [B, C, ...]

    def forward_sequence(self, x: Tensor) -> Tensor:
        return self._forward(x, 2, (1, *range(3, x.ndim)))  # x: [T, B, C, ...]: stats per step

    def _forward(self, x: Tensor, channel_dim: int, stat_dims: tuple[int, ...]) -> Tensor:
        # Statistics and arithmetic in float32 at least (16-bit inputs under mixed precision are
        # promoted by the float32 buffers); the output has the input's precision.
        if not self.training or self.mode == "linear":
            if self.training:  # Appendix E ablation: Eq. 8 in training, no BN inside; statistics still kept
                with torch.no_grad():
                    mean, var, _ = synced_moments(x, stat_dims)  # Eq. 13, across processes under DDP
                self._accumulate(mean, var)
                self._steps += self._count_steps(x, channel_dim)
            # Eq. 8 / Alg. 1, inference
            return _inference_affine(x, self.running_mean, self.running_var, self.weight, self.bias, self.eps, channel_dim)

        spec = NormSpec(
            stat_dims, channel_dim, self.eps, kind="osr", running_mean=self.running_mean, running_var=self.running_var,
            fallback_ratio=self.fallback_ratio, gamma_grad=self.gamma_grad,
            synchronized=is_synchronized(True), group=stats_group(),
        )
        # Eq. 9 in one autograd node: the value of Eq. 8, the gradient of BN (Eqs. 10-12); the
        # statistics of Eq. 13 across processes under DDP. Official code: where running and batch
        # scales are > N-fold apart, plain batch statistics for the whole layer at that step.
        y = per_step_norm(x, self.weight, self.bias, spec)
        self._accumulate(spec.mean, spec.var)
        if self.fallback_ratio is not None:
            self._fallback_steps = self._fallback_steps + spec.fallback.sum()  # stays on the device
        self._steps += self._count_steps(x, channel_dim)
        return y

    @staticmethod
    def _count_steps(x: Tensor, channel_dim: int) -> int:
        return 1 if channel_dim == 1 else x.shape[0]


class BatchNormThroughTime(SequenceModule):
    """BNTT (Kim & Panda 2021): one batch normalization per time step,
    ``Ĩ[t] = gamma_t * (I[t] - mu[t]) / sqrt(var[t] + eps)`` with a separate ``gamma_t`` [C] per
    step, **no beta**, and separate running statistics per step (PyTorch BN semantics: EMA with
    ``momentum``, unbiased running variance) used at inference. Works one step at a time; a
    sequence may be shorter than the ``time_steps`` it was built for, never longer.
    SpikingJelly: ``layer.BatchNormThroughTime2d(T, num_features)``.
    """

    synchronized_statistics = True  # statistics of the union batch under torch.distributed (harness.snn.distributed)

    def __init__(self, num_features: int, time_steps: int, eps: Eps = 1e-5, momentum: Momentum = 0.1) -> None:
        super().__init__()
        self.num_features, self.steps, self.eps, self.momentum = num_features, time_steps, eps, momentum
        self.weight = nn.Parameter(torch.ones(time_steps, num_features))
        self.register_buffer("running_mean", torch.zeros(time_steps, num_features))
        self.register_buffer("running_var", torch.ones(time_steps, num_features))

    def extra_repr(self) -> str:
        return f"{self.num_features}, time_steps={self.steps}, eps={self.eps}, momentum={self.momentum}"

    def forward_step(self, x: Tensor) -> Tensor:
        t = self.t
        if t >= self.steps:
            raise ValueError(f"bntt was built for {self.steps} time steps; step {t + 1} has no statistics of its own")
        if not self.training:
            return _inference_affine(x, self.running_mean[t], self.running_var[t], self.weight[t], None, self.eps, 1)
        spec = NormSpec((0, *range(2, x.ndim)), 1, self.eps, synchronized=is_synchronized(True), group=stats_group())
        y = per_step_norm(x, self.weight[t], None, spec)  # one autograd node
        with torch.no_grad():  # PyTorch BN semantics: EMA, unbiased running variance
            n = spec.count  # an int, or a device tensor under DDP (the union count)
            unbiased = spec.var.flatten() * (n / max(n - 1, 1) if isinstance(n, int) else n / (n - 1).clamp_min(1))
            self.running_mean[t].lerp_(spec.mean.flatten().to(self.running_mean.dtype), self.momentum)
            self.running_var[t].lerp_(unbiased.to(self.running_var.dtype), self.momentum)
        return y


class _WholeSequenceBatchNorm(SequenceModule):
    """Batch normalization with statistics over (T, B, space) at once: the sequence is folded into
    the batch (PyTorch BN semantics: running statistics updated once per sequence, EMA with
    ``momentum``, unbiased running variance). Needs the whole sequence."""

    synchronized_statistics = True  # statistics of the union batch under torch.distributed (harness.snn.distributed)

    step_modes = frozenset({"sequence"})

    def __init__(self, num_features: int, eps: Eps = 1e-5, momentum: Momentum = 0.1) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _bn(self, x: Tensor) -> Tensor:
        """In float32 at least (a 16-bit input is promoted); the caller casts to ``x``'s dtype."""
        x32 = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        y = batch_norm(
            x32.flatten(0, 1), self.running_mean, self.running_var, self.weight, self.bias, self.training, self.momentum, self.eps
        )
        return y.unflatten(0, x.shape[:2])


class ThresholdDependentBatchNorm(_WholeSequenceBatchNorm):
    """tdBN (Zheng et al. 2021): statistics over (T, B, H, W) at once,
    ``Ĩ = lambda * (I - mu) / sqrt(var + eps) + beta`` with the scale ``lambda`` initialised to
    ``alpha * V_th`` (the cell's threshold, passed by the harness as ``v_threshold``; ``alpha`` = 1,
    or 1/sqrt(2) before a residual addition). Needs the whole sequence.
    SpikingJelly: ``layer.ThresholdDependentBatchNorm2d(alpha, v_th, num_features)``.
    """

    def __init__(self, num_features: int, v_threshold: float = 1.0, alpha: Annotated[float, Range(0.0, low_open=True)] = 1.0,
                 eps: Eps = 1e-5, momentum: Momentum = 0.1) -> None:
        super().__init__(num_features, eps, momentum)
        self.alpha, self.v_threshold = alpha, v_threshold
        nn.init.constant_(self.weight, alpha * v_threshold)

    def forward_sequence(self, x: Tensor) -> Tensor:
        return self._bn(x).to(x.dtype)


class TemporalEffectiveBatchNorm(_WholeSequenceBatchNorm):
    """TEBN (Duan et al. 2022): statistics over (T, B, H, W) with shared ``gamma``, ``beta`` [C],
    then a learnable scale per step, ``Ĩ[t] = p[t] * (gamma * Î[t] + beta)``, ``p`` one scalar per
    step shared by the channels (initialised to 1). Needs the whole sequence.
    SpikingJelly: ``layer.TemporalEffectiveBatchNorm2d(T, num_features)``.
    """

    def __init__(self, num_features: int, time_steps: int, eps: Eps = 1e-5, momentum: Momentum = 0.1) -> None:
        super().__init__(num_features, eps, momentum)
        self.scale = nn.Parameter(torch.ones(time_steps))

    def forward_sequence(self, x: Tensor) -> Tensor:
        T = x.shape[0]
        if T > self.scale.numel():
            raise ValueError(f"tebn was built for {self.scale.numel()} time steps, got a sequence of {T}")
        return (self._bn(x) * self.scale[:T].view(T, *[1] * (x.ndim - 1))).to(x.dtype)


class TemporalAccumulatedBatchNorm(SequenceModule):
    """TAB, Temporal Accumulated Batch Normalization (Jiang et al., ICLR 2024), as the authors'
    code computes it (``TAB_Layer`` in ``models.py`` of github.com/HaiyanJiang/SNN-TAB, commit
    f9b94ce): step ``t`` is normalized with the statistics of the steps seen so far,

        Ĩ[t] = p[t]^2 * ( gamma[t] * (I[t] - mu[1..t]) / sqrt(var[1..t] + eps) + beta[t] )

    ``mu[1..t]``, ``var[1..t]``: per channel over the steps ``1..t``, the batch and space (biased
    variance); ``gamma[t]``, ``beta[t]`` and running statistics of its own per step (the authors
    keep one BatchNorm per step; PyTorch BN semantics: EMA with ``momentum``, unbiased running
    variance, here of the statistics over ``1..t``); ``p[t]`` one learnable scalar per step,
    initialised to 1 and squared. Inference: ``p[t]^2 * (gamma[t] * (I[t] - run_mean[t]) /
    sqrt(run_var[t] + eps) + beta[t])``.

    The forward is causal (step ``t`` reads steps ``1..t``), but the gradient of step ``t`` runs
    through its statistics into every earlier step's input: online training, which frees a step's
    graph before the next, cannot give it. So TAB runs on the whole sequence (BPTT) only, and the
    matrix skips it under the online trainer with that reason. Works on ``[T, B, C]`` as well as
    ``[T, B, C, ...]`` (the authors' layer takes images only).
    """

    synchronized_statistics = True  # statistics of the union batch under torch.distributed (harness.snn.distributed)

    step_modes = frozenset({"sequence"})

    def __init__(self, num_features: int, time_steps: int, eps: Eps = 1e-5, momentum: Momentum = 0.1) -> None:
        super().__init__()
        self.num_features, self.steps, self.eps, self.momentum = num_features, time_steps, eps, momentum
        self.weight = nn.Parameter(torch.ones(time_steps, num_features))
        self.bias = nn.Parameter(torch.zeros(time_steps, num_features))
        self.p = nn.Parameter(torch.ones(time_steps))
        self.register_buffer("running_mean", torch.zeros(time_steps, num_features))
        self.register_buffer("running_var", torch.ones(time_steps, num_features))

    def extra_repr(self) -> str:
        return f"{self.num_features}, time_steps={self.steps}, eps={self.eps}, momentum={self.momentum}"

    def forward_sequence(self, x: Tensor) -> Tensor:
        T = x.shape[0]
        if T > self.steps:
            raise ValueError(f"tab was built for {self.steps} time steps, got a sequence of {T}")
        x32 = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        out = []
        for t in range(T):  # the window of steps 1..t, folded into the batch; its last step is step t's output
            window = x32[: t + 1].flatten(0, 1)
            y = batch_norm(window, self.running_mean[t], self.running_var[t], self.weight[t], self.bias[t],
                           self.training, self.momentum, self.eps)
            out.append(y[t * x.shape[1]:])
        y = torch.stack(out) * self.p[:T].square().view(T, *[1] * (x.ndim - 1))
        return y.to(x.dtype)


class MembranePotentialBatchNorm(MembraneNorm):
    """MPBN, Membrane Potential Batch Normalization (Guo et al., ICCV 2023; docs/method.md
    section 10): a second batch normalization, on the membrane potential after charging and before
    firing.

    At every step ``t``, ``n[t] = gamma * (u[t] - mu) / sqrt(var + eps) + beta``, per channel.
    Training: ``mu``, ``var`` are the batch mean and biased variance of ``u[t]`` (over batch and
    space), and the running statistics are updated at every step, ``run = (1 - momentum) * run +
    momentum * new`` with the unbiased variance (PyTorch's ``BatchNorm`` called once per step, as
    SpikingJelly's ``MPBNLIFNode`` and the authors' code do: ``T`` updates per batch, one
    ``num_batches_tracked`` count per step). Evaluation: the running statistics. One ``gamma``,
    ``beta`` and one set of running statistics serve every step.

    ``carry``: the potential the neuron goes on with after the reset. ``"normalized"`` (default):
    ``n[t]``, as SpikingJelly's ``MPBNLIFNode`` (any reset). ``"raw"``: ``u[t]``, as the authors'
    code (``mem = mem * (1 - spike)`` on the potential before the BN; hard reset only). With
    ``"raw"`` the BN only decides who fires, so in evaluation, where it is a fixed affine map,
    it folds into a per-channel threshold: ``n[t] >= theta`` is ``u[t] >= theta'`` with
    ``theta' = mu + (theta - beta) sqrt(var + eps) / gamma`` for ``gamma > 0``
    (:meth:`folded_threshold`), a plain LIF at inference.

    :param eps: added to the variance (PyTorch's and SpikingJelly's 1e-5).
    :param momentum: of the running statistics, per step (PyTorch's 0.1).
    :param affine: learn ``gamma`` (initialised to 1) and ``beta`` (0).
    :param carry: ``"normalized"`` or ``"raw"``, as above.
    """

    synchronized_statistics = True  # statistics of the union batch under torch.distributed (harness.snn.distributed)

    def __init__(
        self,
        num_features: int,
        eps: Eps = 1e-5,
        momentum: Momentum = 0.1,
        affine: bool = True,
        carry: Literal["normalized", "raw"] = "normalized",
    ) -> None:
        super().__init__()
        if carry not in ("normalized", "raw"):
            raise ValueError(f"carry must be 'normalized' or 'raw', got {carry!r}")
        self.num_features, self.eps, self.momentum, self.carry = num_features, eps, momentum, carry
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.weight is not None}, "
                f"carry={self.carry!r}")

    def forward(self, u: Tensor, t: int) -> Tensor:
        # u: [B, C] or [B, C, H, W]; statistics over all but the channel dimension
        if self.training:
            with torch.no_grad():
                self.num_batches_tracked += 1
        return batch_norm(u, self.running_mean, self.running_var, self.weight, self.bias, self.training, self.momentum,
                          self.eps, group=stats_group())

    @torch.no_grad()
    def folded_threshold(self, theta: float | Tensor = 1.0) -> Tensor:
        """The per-channel threshold ``theta' = mu + (theta - beta) sqrt(var + eps) / gamma`` on
        the raw potential that the evaluation-mode BN followed by threshold ``theta`` amounts to
        (running statistics; exact where ``gamma > 0``).

        :raises ValueError: some ``gamma <= 0`` (there the comparison turns or is constant).
        """
        gamma = self.weight if self.weight is not None else torch.ones_like(self.running_mean)
        beta = self.bias if self.bias is not None else torch.zeros_like(self.running_mean)
        if bool((gamma <= 0).any()):
            raise ValueError(f"{int((gamma <= 0).sum())} channel(s) have gamma <= 0: the BN does not fold into a threshold there")
        return self.running_mean + (theta - beta) * torch.sqrt(self.running_var + self.eps) / gamma


def no_membrane_norm(num_features: int) -> None:
    """No normalization inside the neuron: the plain LIF (which keeps its fused path)."""
    return None


@hookimpl
def register_membrane_norms(registry) -> None:
    registry.add("none", no_membrane_norm)
    registry.add("mpbn", MembranePotentialBatchNorm)


@hookimpl
def register_normalizers(registry) -> None:
    registry.add("vanilla_bn", VanillaBatchNorm)
    registry.add("osr", OnlineSpikingRenormalization)
    registry.add("bntt", BatchNormThroughTime)
    registry.add("tdbn", ThresholdDependentBatchNorm)
    registry.add("tebn", TemporalEffectiveBatchNorm)
    registry.add("tab", TemporalAccumulatedBatchNorm)
