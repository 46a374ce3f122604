"""Batch statistics synchronized across processes, for data-parallel training (DDP) of one cell.

When ``torch.distributed`` is initialized with more than one process, a normalizer that
computes statistics over the batch must compute them over the *union* of the processes'
batches (as ``nn.SyncBatchNorm`` does), so that ``W`` processes with ``B/W`` samples each give
the numbers of one process with ``B`` samples. The helpers here do that:

* :func:`synced_moments` returns the mean and biased variance of ``x`` over ``dims`` and the
  element count, all over the union batch, differentiably: the backward of the gather sums the
  gradient terms of every process (like ``SyncBatchNorm``'s backward), so input and parameter
  gradients are those of the one-process run on the union batch.
* :func:`batch_norm` is ``F.batch_norm`` (PyTorch BN semantics: EMA running statistics with an
  unbiased running variance) with synchronized statistics in training.

Without a process group, or with a group of one process, both are the plain local computation
(two-pass moments / ``F.batch_norm``), bit for bit. Call them in training only: in evaluation a
normalizer uses its running statistics, and a collective there would hang when only one process
evaluates.

Numerics: each process computes its local mean and biased variance (two passes: the mean,
then the mean squared deviation), one ``all_gather`` collects ``(mean_i, var_i, n_i)`` of every process, and Chan's
combination ``mean = sum_i n_i mean_i / N``, ``var = sum_i n_i (var_i + (mean_i - mean)^2) / N``
gives the union statistics without the cancellation of ``E[x^2] - E[x]^2``. One collective per
call, no host synchronization (counts travel as tensors). Every process gets the same gathered
bytes and runs the same operations on them, so the statistics, and whatever is decided from them
(running buffers, OSR's fallback, OTS thresholds), are identical on all processes. Statistics of
16-bit inputs are computed, reduced and returned in float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = ["batch_norm", "is_synchronized", "set_stats_group", "stats_group", "synced_moments", "world_size"]

_STATS_GROUP: Any = None  # None: the default (WORLD) process group


def set_stats_group(group: Any) -> None:
    """Synchronize statistics over ``group`` (a ``torch.distributed`` process group; ``None``
    restores the default group). For a runner that trains several cells side by side, each on
    its own group of processes."""
    global _STATS_GROUP
    _STATS_GROUP = group


def stats_group() -> Any:
    """The process group statistics are synchronized over (``None``: the default group)."""
    return _STATS_GROUP


def world_size(group: Any = None) -> int:
    """Processes in ``group`` (default: :func:`stats_group`); 1 when ``torch.distributed`` is not
    initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group if group is not None else _STATS_GROUP)


def is_synchronized(training: bool = True, group: Any = None) -> bool:
    """Whether a module in ``training`` mode synchronizes its batch statistics now."""
    return training and world_size(group) > 1


class _AllGather(torch.autograd.Function):
    """``[*shape] -> [W, *shape]``: every process's tensor; the backward sums each process's
    gradient with respect to this process's entry (all-reduce of the gradient, then its row).

    The gather is an all-reduce of a zero tensor holding this process's row (exact: ``x + 0``),
    the one collective every backend and PyTorch version has in the same form (the gather
    collectives' tensor APIs differ between versions and backends); the tensors are tiny."""

    @staticmethod
    def forward(ctx, x: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        ctx.group = group
        ctx.rank = dist.get_group_rank(group, dist.get_rank()) if group is not None else dist.get_rank()
        out = x.new_zeros((dist.get_world_size(group), *x.shape))
        out[ctx.rank] = x
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None


def _normalize_dims(dims: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    out = tuple(sorted({d % ndim for d in dims})) if ndim else ()
    if len(out) != len(dims):
        raise ValueError(f"dims {dims} repeat a dimension of a {ndim}-d tensor")
    return out


def _two_pass_moments(x: Tensor, dims: tuple[int, ...], keepdim: bool) -> tuple[Tensor, Tensor]:
    """Mean and biased variance by two passes, ``mean(x)`` then ``mean((x - mean)^2)``: exact, and on
    CPU far cheaper than ``torch.var_mean`` (its Welford kernel)."""
    mean = x.mean(dims, keepdim=True)
    xc = x - mean
    var = torch.mul(xc, xc).mean(dims, keepdim=keepdim)
    return (mean if keepdim else mean.squeeze(dims)), var


def synced_moments(
    x: Tensor, dims: int | Sequence[int], *, keepdim: bool = True, group: Any = None
) -> tuple[Tensor, Tensor, int | Tensor]:
    """Mean and biased variance of ``x`` over ``dims``, and the number of elements each covers,
    over the union of the processes' ``x`` (their other dimensions must agree; the sizes along
    ``dims`` may differ). Differentiable with respect to ``x``.

    Not synchronized (no process group, or one process): the two-pass mean and biased variance
    (``torch.var_mean(x, dims, correction=0, keepdim=keepdim)`` up to rounding) and the count as an ``int``, exactly as a local module
    computes them. Synchronized: the union statistics (see the module notes) and the count as a
    0-d tensor on ``x``'s device (no host synchronization).

    Statistics of a 16-bit ``x`` (mixed precision) are computed and returned in float32, so that
    running buffers (float32) and ratios of standard deviations keep their precision.
    """
    group = group if group is not None else _STATS_GROUP
    dims = _normalize_dims(dims, x.ndim)
    n_local = math.prod(x.shape[d] for d in dims)
    xs = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # statistics in float32 at least
    if world_size(group) <= 1:
        mean, var = _two_pass_moments(xs, dims, keepdim)
        return mean, var, n_local
    if n_local > 0:
        mean_l, var_l = _two_pass_moments(xs, dims, True)
    else:  # an empty share of the batch: it adds nothing (and no NaN)
        mean_l = var_l = xs.sum(dim=dims, keepdim=True)
    k = mean_l.numel()
    packed = torch.cat([mean_l.reshape(-1), var_l.reshape(-1), xs.new_full((1,), float(n_local))])
    gathered = _AllGather.apply(packed, group)  # [W, 2k + 1]
    means, variances, counts = gathered[:, :k], gathered[:, k : 2 * k], gathered[:, 2 * k :]
    n = counts.sum(0)
    weights = counts / n  # n_i / N
    mean = (weights * means).sum(0)
    var = (weights * (variances + (means - mean).square())).sum(0)  # Chan et al.: no cancellation
    shape = mean_l.shape if keepdim else tuple(s for i, s in enumerate(mean_l.shape) if i not in dims)
    return mean.reshape(shape), var.reshape(shape), n.reshape(())


def batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    group: Any = None,
) -> Tensor:
    """``F.batch_norm`` (channels on dimension 1, statistics over the others) whose training
    statistics are synchronized across processes (:func:`synced_moments`), running statistics
    included (``run = (1 - momentum) * run + momentum * new``, unbiased running variance over the
    union count). Not synchronized, or in evaluation: ``F.batch_norm`` itself. A 16-bit ``x``
    (mixed precision) is normalized in float32 and the output returned in its precision."""
    if not is_synchronized(training, group):
        if x.dtype in (torch.float16, torch.bfloat16):  # float32 statistics, as a float32 input gets
            return F.batch_norm(x.float(), running_mean, running_var, weight, bias, training, momentum, eps).to(x.dtype)
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    dims = (0, *range(2, x.ndim))
    mean, var, n = synced_moments(x, dims, keepdim=True, group=group)
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            running_mean.mul_(1.0 - momentum).add_(mean.detach().flatten().to(running_mean.dtype), alpha=momentum)
            unbiased = var.detach().flatten() * (n / (n - 1).clamp_min(1))
            running_var.mul_(1.0 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    shape = [1] * x.ndim
    shape[1] = -1
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y.to(x.dtype)  # statistics in float32, output in the input's precision (as F.batch_norm)
