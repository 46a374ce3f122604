"""Fused autograd Functions: one autograd node per normalizer, neuron and pooling layer.

Each Function computes its forward from a few large elementwise passes and its backward by the
closed formula, saving at most one full-size tensor: per-step batch normalization
(:func:`per_step_norm`: vanilla BN, OSR, BNTT) saves the centred input ``x - mu``; the LIF neuron
(:func:`lif_sequence`) saves the potentials ``u[t]``; average pooling (:func:`avg_pool`) saves
nothing. The same numbers as the elementwise compositions they replace (up to floating-point
order), which the tests keep as the reference (docs/method.md section 9).

They are plain device-agnostic PyTorch (CPU and CUDA alike). The bodies of ``forward`` and
``backward`` only read and write the tensors named in their docstrings, so a fused Triton or CUDA
kernel can replace a body without touching the modules that call them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from harness.snn.distributed import synced_moments

__all__ = ["LIFSpec", "NormSpec", "avg_pool", "channel_view", "lif_sequence", "per_step_norm", "trace_synapse"]

_HALF = (torch.float16, torch.bfloat16)


# -- per-step batch normalization ------------------------------------------------------------------


@dataclass
class NormSpec:
    """What :func:`per_step_norm` needs besides the tensors, and what it hands back.

    ``dims``: the statistics' dimensions (batch and space, per step); ``channel_dim``: where the
    channels are. ``kind = "bn"``: ``y = gamma * x_hat + beta``; ``kind = "osr"``: Eq. 9, ``y =
    gamma * (x_hat * ratio + shift) + beta`` with ``ratio = sqrt(var + eps) / sqrt(run_var + eps)``
    and ``shift = (mu - run_mean) / sqrt(run_var + eps)`` (no gradient), where a step whose
    largest ``max(ratio, 1 / ratio)`` over channels exceeds ``fallback_ratio`` uses ``ratio = 1,
    shift = 0`` (plain BN). ``gamma_grad = "official"`` drops the ratio from gamma's gradient.
    ``group`` (a process group, or ``None``): the statistics and the backward's two sums are those
    of the union batch of the group's processes.

    After the call, ``mean``, ``var`` (float32 at least, with singleton dimensions), ``count`` (the
    elements behind each statistic: an int, or a device tensor under a group) and ``fallback``
    (OSR: a bool tensor, one entry per step) hold the statistics of the batch.
    """

    dims: tuple[int, ...]
    channel_dim: int
    eps: float
    kind: str = "bn"
    running_mean: Tensor | None = None
    running_var: Tensor | None = None
    fallback_ratio: float | None = None
    gamma_grad: str = "paper"
    group: Any = None
    synchronized: bool = False
    mean: Tensor | None = field(default=None, repr=False)
    var: Tensor | None = field(default=None, repr=False)
    count: int | Tensor = 0
    fallback: Tensor | None = field(default=None, repr=False)


def channel_view(t: Tensor, ndim: int, channel_dim: int) -> Tensor:
    """Reshape a ``[C]`` vector to broadcast along ``channel_dim`` of an ``ndim``-d tensor."""
    shape = [1] * ndim
    shape[channel_dim] = -1
    return t.view(shape)


def _effective_ratio_shift(spec: NormSpec, mean: Tensor, var: Tensor, ndim: int, cd: int) -> tuple[Tensor, Tensor, Tensor]:
    """OSR's no-gradient ``ratio`` and ``shift`` per step and channel (Eq. 9) of a block whose
    channels are on ``cd``, set to ``1`` and ``0`` on the steps that fall back to plain batch
    statistics; and the fallback flags, one per step."""
    run_mean = channel_view(spec.running_mean, ndim, cd)
    run_std = torch.sqrt(channel_view(spec.running_var, ndim, cd) + spec.eps)
    ratio = torch.sqrt(var + spec.eps) / run_std
    shift = (mean - run_mean) / run_std
    if spec.fallback_ratio is None:
        return ratio, shift, torch.zeros((), dtype=torch.bool, device=mean.device)
    per_step = tuple(range(ndim)) if cd == 1 else tuple(range(1, ndim))  # max over all but the step
    spread = torch.maximum(ratio, 1.0 / ratio).amax(dim=per_step, keepdim=True)
    fallback = spread > spec.fallback_ratio  # var[t] = 0 gives sqrt(eps) / run_std: finite
    return torch.where(fallback, 1.0, ratio), torch.where(fallback, 0.0, shift), fallback


def _blocks(x: Tensor, spec: NormSpec) -> tuple[list[int | None], tuple[int, ...], int]:
    """How the work is cut: a whole sequence ``[T, B, C, ...]`` step by step (each step's tensors
    stay in cache through the passes; several times faster on CPU than whole-sequence reductions),
    anything else, or a synchronized sequence (one collective), at once. Returns the blocks (a step
    index, or ``None`` for the whole tensor) and the statistics' and channel dimensions of a block."""
    if spec.channel_dim == 2 and not spec.synchronized and 0 not in spec.dims:
        return list(range(x.shape[0])), tuple(d - 1 for d in spec.dims), 1
    return [None], spec.dims, spec.channel_dim


def _part(t: Tensor, block: int | None) -> Tensor:
    return t if block is None else t[block]


class _PerStepNorm(torch.autograd.Function):
    """``y = a * x_hat + b`` with ``x_hat = (x - mu) / sqrt(var + eps)`` (per step, per channel),
    ``a = gamma * ratio``, ``b = gamma * shift + beta`` (BN: ``ratio = 1, shift = 0``).

    Forward: two reductions (mean, then the centred second moment) and three elementwise passes
    (centre, square, ``y = (x - mu) * (a / std) + b``), step by step on a whole sequence. Saves the
    centred input ``x - mu`` (float32 for a 16-bit ``x``) and per-channel vectors. Backward, with ``g = dL/dy`` and ``n`` elements per statistic (the BN formula with the
    effective scale ``a``; Eqs. 10-12 for OSR, where ``a / sqrt(var + eps) = gamma /
    sqrt(run_var + eps)``)::

        dL/dx     = a / sqrt(var + eps) * (g - sum(g) / n - x_hat * sum(g * x_hat) / n)
        dL/dgamma = sum(g * (x_hat * ratio + shift))      (official: sum(g * (x_hat + shift)))
        dL/dbeta  = sum(g)

    Under a process group ``sum(g)`` and ``sum(g * x_hat)`` in ``dL/dx`` are all-reduced (the union
    batch's, as ``nn.SyncBatchNorm``), while ``gamma``'s and ``beta``'s gradients keep the local sums
    (the gradient averaging adds the processes' shares).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, spec: NormSpec) -> Tensor:  # type: ignore[override]
        xs = x.float() if x.dtype in _HALF else x
        blocks, dims, cd = _blocks(xs, spec)
        centred = torch.empty_like(xs)  # x - mu: what the backward needs (x_hat = centred / std)
        y = torch.empty_like(xs)  # the squared deviations, then the output
        stats: list[tuple[Tensor, ...]] = []
        count: int | Tensor = 0
        for block in blocks:
            xb, hb, yb = _part(xs, block), _part(centred, block), _part(y, block)
            ndim = xb.ndim
            if spec.synchronized:
                mean, var, count = synced_moments(xb, dims, group=spec.group)
                torch.sub(xb, mean, out=hb)
            else:
                mean = xb.mean(dims, keepdim=True)
                torch.sub(xb, mean, out=hb)
                var = torch.mul(hb, hb, out=yb).mean(dims, keepdim=True)
                count = math.prod(xb.shape[d] for d in dims)
            invstd = torch.rsqrt(var + spec.eps)
            w = channel_view(weight, ndim, cd) if weight is not None else None
            if spec.kind == "osr":
                ratio, shift, fallback = _effective_ratio_shift(spec, mean, var, ndim, cd)
                a = ratio if w is None else w * ratio
                b = shift if w is None else w * shift
                if bias is not None:
                    b = b + channel_view(bias, ndim, cd)
                torch.addcmul(b, hb, a * invstd, out=yb)  # a * x_hat + b
                stats.append((mean, var, invstd, ratio, shift, fallback))
            else:
                scale = invstd if w is None else w * invstd
                if bias is None:
                    torch.mul(hb, scale, out=yb)
                else:
                    torch.addcmul(channel_view(bias, ndim, cd), hb, scale, out=yb)
                stats.append((mean, var, invstd))
        # Per-step statistics with the singleton dimensions of the whole tensor ([T, 1, C, 1, ...]).
        joined = [torch.stack(col) if blocks[0] is not None else col[0] for col in zip(*stats)]
        mean, var, invstd = joined[:3]
        ratio, shift, fallback = joined[3:] if spec.kind == "osr" else (None, None, None)
        spec.mean, spec.var, spec.count, spec.fallback = mean, var, count, fallback
        ctx.save_for_backward(centred, invstd, weight, ratio, shift)
        ctx.spec, ctx.has_bias = spec, bias is not None
        return y.to(x.dtype) if y.dtype != x.dtype else y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:  # type: ignore[override]
        centred, invstd, weight, ratio, shift = ctx.saved_tensors
        spec: NormSpec = ctx.spec
        g = grad.to(centred.dtype) if grad.dtype != centred.dtype else grad
        blocks, dims, cd = _blocks(centred, spec)
        full_cd, ndim = spec.channel_dim, centred.ndim
        prod = torch.empty_like(centred)  # g * (x - mu), then the input's gradient
        sums = []
        for block in blocks:
            gb, hb = _part(g, block), _part(centred, block)
            torch.mul(gb, hb, out=_part(prod, block))
            sums.append((gb.sum(dims, keepdim=True), _part(prod, block).sum(dims, keepdim=True)))
        sum_g, sum_gc = ([torch.stack(c) for c in zip(*sums)] if blocks[0] is not None else list(sums[0]))
        sum_gx = sum_gc * invstd  # sum(g * x_hat)
        reduce_to_c = tuple(d for d in range(ndim) if d != full_cd)
        grad_w = grad_b = None
        if weight is not None and ctx.needs_input_grad[1]:
            if spec.kind == "osr":
                first = sum_gx if spec.gamma_grad == "official" else sum_gx * ratio
                grad_w = (first + sum_g * shift).sum(reduce_to_c)
            else:
                grad_w = sum_gx.sum(reduce_to_c)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = sum_g.sum(reduce_to_c)
        grad_x = None
        if ctx.needs_input_grad[0]:
            if spec.synchronized:
                both = torch.cat([sum_g, sum_gx], dim=full_cd)
                dist.all_reduce(both, group=spec.group)
                sum_g, sum_gx = both.split(sum_g.shape[full_cd], dim=full_cd)
            n = spec.count
            scale = invstd
            if weight is not None:
                scale = scale * channel_view(weight.to(scale.dtype), ndim, full_cd)
            if ratio is not None:
                scale = scale * ratio
            # a / std * (g - sum(g)/n - x_hat sum(g x_hat)/n) = g * c1 + c2 + (x - mu) * c3, in prod's buffer
            c2, c3 = scale * sum_g / -n, scale * sum_gx * invstd / -n
            for block in blocks:
                out = _part(prod, block)
                torch.addcmul(_part(c2, block), _part(g, block), _part(scale, block), out=out)
                out.addcmul_(_part(centred, block), _part(c3, block))
            grad_x = prod if prod.dtype == grad.dtype else prod.to(grad.dtype)
        return grad_x, grad_w, grad_b, None


def per_step_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, spec: NormSpec) -> Tensor:
    """Per-step batch normalization of ``x`` in training, one autograd node (:class:`_PerStepNorm`).

    ``spec`` says over which dimensions, which variant (vanilla BN or OSR) and across which
    processes; it holds the batch statistics afterwards (:class:`NormSpec`)."""
    return _PerStepNorm.apply(x, weight, bias, spec)


# -- the LIF neuron --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LIFSpec:
    """The neuron's constants: ``decay = 1 - 1/tau``, ``reset`` (``"soft"`` or ``"hard"``), the
    sigmoid surrogate's ``alpha``, whether the reset term and the membrane path between steps are
    detached, and the threshold of each step: ``threshold(u, t) -> theta`` (a float or a tensor
    that broadcasts against ``u``; called without gradient)."""

    decay: float
    reset: str
    alpha: float
    detach_reset: bool
    detach_membrane: bool
    threshold: Callable[[Tensor, int], Tensor | float]
    first_step: int = 0


def _scaled_h(u: Tensor, theta: Tensor | float, alpha: float, out: Tensor | None = None) -> Tensor:
    """``alpha * (u - theta)`` in one pass, ``(-alpha theta) + alpha u`` (the constant made on the
    device: no copy from the host)."""
    if isinstance(theta, (int, float)):
        c = torch.full((), -alpha * theta, dtype=u.dtype, device=u.device)
    else:
        c = theta * -alpha
    return torch.add(c, u, alpha=alpha, out=out) if out is not None else torch.add(c, u, alpha=alpha)


def _surrogate_grad(scaled: Tensor, alpha: float, grad: Tensor, out: Tensor | None = None) -> Tensor:
    """``grad * alpha * sig(alpha h) * (1 - sig(alpha h))`` from ``scaled = alpha h`` (the sigmoid
    surrogate's derivative times ``grad``), in ``out`` when given (which may be ``scaled``)."""
    sig = scaled.sigmoid_() if out is scaled else (torch.sigmoid(scaled, out=out) if out is not None else torch.sigmoid(scaled))
    return torch.ops.aten.sigmoid_backward.grad_input(grad, sig, grad_input=sig).mul_(alpha)


class _LIFSequence(torch.autograd.Function):
    """The LIF neuron over ``T >= 1`` steps in one node (paper Eqs. 2-4, docs/method.md section 1).

    Forward, for ``t = 0..T-1`` (``v`` the potential after the previous reset, ``None`` at the
    start of a sequence)::

        u[t] = decay * v + x[t]                   charge (Eq. 2)
        theta[t] = threshold(u[t], t)             the point between charge and fire
        h[t] = u[t] - theta[t];  s[t] = (h[t] >= 0)           fire (Eq. 3)
        v = u[t] - s[t] * theta[t]  (soft)  |  u[t] * (1 - s[t])  (hard, Eq. 4)

    Returns ``s`` ``[T, ...]`` and the last ``v``; saves ``u`` ``[T, ...]`` only (``s`` and ``h``
    follow from it and ``theta``; a lone first step saves its input, which is ``u``). Backward, in
    reverse, with ``sg[t] = alpha sig(alpha h[t]) (1 - sig(alpha h[t]))`` and ``dv`` the gradient
    reaching ``v`` after step ``t``::

        du[t] = ds[t] * sg[t] + dv * dv/du[t]      dv/du = 1 (soft, detached reset) | 1 - s[t] (hard,
                                                   detached) | 1 - theta[t] sg[t] (soft) |
                                                   1 - s[t] - u[t] sg[t] (hard)
        dx[t] = du[t];   gradient of v before step t = decay * du[t]   (0 if the membrane is detached)

    ``theta`` carries no gradient here: a threshold policy whose ``theta`` needs one runs the
    neuron's unfused path.
    """

    @staticmethod
    def forward(ctx, x: Tensor, v: Tensor | None, spec: LIFSpec) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        T = x.shape[0]
        s = torch.empty_like(x)
        # The saved potentials u[t]. A single step that starts a sequence saves its input itself
        # (u = x: nothing to copy, and the input is kept alive for this backward only).
        u_all = x if (T == 1 and v is None) else torch.empty_like(x)
        thetas: list[Tensor | float] = []
        for t in range(T):
            u = u_all[t]
            if v is None:
                if u_all is not x:
                    u.copy_(x[t])
            else:
                torch.add(x[t], v, alpha=spec.decay, out=u)  # Eq. 2
            theta = spec.threshold(u, spec.first_step + t)
            thetas.append(theta)
            torch.ge(u, theta, out=s[t])  # Eq. 3: u >= theta <=> u - theta >= 0, exactly
            if spec.reset == "soft":
                v = torch.sub(u, s[t], alpha=theta) if isinstance(theta, (int, float)) else torch.addcmul(u, s[t], theta, value=-1)
            else:
                v = torch.addcmul(u, u, s[t], value=-1)  # Eq. 4: u * (1 - s)
        ctx.save_for_backward(u_all)
        ctx.spec, ctx.thetas = spec, thetas
        ctx.set_materialize_grads(False)  # an unused potential or spike output costs no zero tensor
        return s, v

    @staticmethod
    def backward(ctx, grad_s: Tensor | None, grad_v: Tensor | None) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        (u_all,) = ctx.saved_tensors
        spec: LIFSpec = ctx.spec
        T = u_all.shape[0]
        grad_x = torch.empty_like(u_all)
        dv = grad_v
        for t in reversed(range(T)):
            u, theta, du = u_all[t], ctx.thetas[t], grad_x[t]
            scaled = _scaled_h(u, theta, spec.alpha, du)  # alpha * h[t] = alpha * (u[t] - theta[t]), in du
            if grad_s is not None:
                _surrogate_grad(scaled, spec.alpha, grad_s[t], out=du)  # ds * sg
            else:
                du.zero_()
            if dv is not None:
                if spec.reset == "soft":
                    if spec.detach_reset:
                        du.add_(dv)
                    else:  # dv * (1 - theta sg)
                        du.add_(dv).sub_(_surrogate_grad(_scaled_h(u, theta, spec.alpha), spec.alpha, dv) * theta)
                else:
                    spk = u >= theta
                    if spec.detach_reset:  # dv * (1 - s)
                        du.add_(dv.masked_fill(spk, 0))
                    else:  # dv * (1 - s - u sg)
                        du.add_(dv.masked_fill(spk, 0)).sub_(_surrogate_grad(_scaled_h(u, theta, spec.alpha), spec.alpha, dv) * u)
            dv = None if spec.detach_membrane else du * spec.decay
        grad_v0 = dv if ctx.needs_input_grad[1] else None
        return grad_x, grad_v0, None


def _lif_inference(x: Tensor, v: Tensor | None, spec: LIFSpec) -> tuple[Tensor, Tensor]:
    """The forward of :class:`_LIFSequence` without anything kept for a backward."""
    s = torch.empty_like(x)
    for t in range(x.shape[0]):
        u = x[t] if v is None else torch.add(x[t], v, alpha=spec.decay)
        theta = spec.threshold(u, spec.first_step + t)
        if isinstance(theta, (int, float)) and x.dtype in (torch.float32, torch.float64):
            torch.ge(u, theta, out=s[t])  # u >= theta <=> u - theta >= 0 (exact in IEEE arithmetic)
        else:
            torch.ge(u - theta, 0, out=s[t])
        if spec.reset == "soft":
            v = torch.sub(u, s[t], alpha=theta) if isinstance(theta, (int, float)) else torch.addcmul(u, s[t], theta, value=-1)
        else:
            v = torch.addcmul(u, u, s[t], value=-1)
    return s, v


def lif_sequence(x: Tensor, v: Tensor | None, spec: LIFSpec) -> tuple[Tensor, Tensor]:
    """Run the LIF neuron over ``x`` ``[T, ...]`` from the potential ``v`` (``None``: a new
    sequence) in one autograd node (:class:`_LIFSequence`); returns the spikes ``[T, ...]`` and
    the potential after the last step. Without gradient recording (evaluation) nothing is saved."""
    if not torch.is_grad_enabled() or not (x.requires_grad or (v is not None and v.requires_grad)):
        return _lif_inference(x, v, spec)
    return _LIFSequence.apply(x, v, spec)


# -- average pooling -------------------------------------------------------------------------------


class _AvgPool(torch.autograd.Function):
    """``k x k`` average pooling with stride ``k`` over the last two dimensions (floor mode, no
    padding): ``y[i, j] = (1/k^2) sum_{a,b < k} x[k i + a, k j + b]``, summed from strided slices.
    Backward: each input position gets ``dy / k^2`` of its window (0 for rows and columns beyond
    the last full window). Saves nothing: only the input's shape."""

    @staticmethod
    def forward(ctx, x: Tensor, k: int) -> Tensor:  # type: ignore[override]
        H, W = x.shape[-2:]
        ho, wo = H // k, W // k
        ctx.shape, ctx.k = x.shape, k
        y = None
        for a in range(k):
            for b in range(k):
                part = x[..., a : a + k * ho : k, b : b + k * wo : k]
                y = part.clone() if y is None else y.add_(part)
        return y.mul_(1.0 / (k * k))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        k, shape = ctx.k, ctx.shape
        ho, wo = grad.shape[-2:]
        share = grad * (1.0 / (k * k))
        H, W = shape[-2:]
        # k^2 strided copies (about twice as fast on CPU as one broadcast copy into a 6-d view)
        out = grad.new_empty(shape) if (H, W) == (ho * k, wo * k) else grad.new_zeros(shape)
        for a in range(k):
            for b in range(k):
                out[..., a : a + k * ho : k, b : b + k * wo : k].copy_(share)
        return out, None


def avg_pool(x: Tensor, k: int) -> Tensor:
    """``k x k`` average pooling with stride ``k`` that saves nothing for backward (:class:`_AvgPool`)."""
    return _AvgPool.apply(x, k)


# -- a synapse with the presynaptic trace (OTTT) ---------------------------------------------------


class _TraceSynapse(torch.autograd.Function):
    """``y = W * s + b`` (a convolution or linear map of the spikes ``s``) whose weight gradient
    takes the presynaptic trace ``a`` in place of ``s`` (OTTT): ``dL/dW = g a^T``,
    ``dL/db = sum g``, ``dL/ds = W^T g``. One forward and one backward of the synapse, saving
    ``a`` only; the same numbers as ``module(a) + module_without_bias(s - a; W detached)``."""

    @staticmethod
    def forward(ctx, s: Tensor, a: Tensor, weight: Tensor, bias: Tensor | None, module: Any) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(a, weight)
        ctx.module, ctx.has_bias, ctx.s_dtype = module, bias is not None, s.dtype
        if isinstance(module, torch.nn.Linear):
            return torch.nn.functional.linear(s, weight, bias)
        return module._conv_forward(s, weight, bias)  # under autocast: in the autocast precision

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, Tensor | None, Tensor | None, None]:  # type: ignore[override]
        a, weight = ctx.saved_tensors
        m = ctx.module
        need_s, _, need_w, need_b, _ = ctx.needs_input_grad
        master = weight.dtype
        if grad.dtype != weight.dtype:  # the forward ran under autocast: the backward in its precision
            a, weight = a.to(grad.dtype), weight.to(grad.dtype)
        grad_s, grad_w, grad_b = _trace_synapse_grads(m, grad, a, weight, need_s, need_w, need_b and ctx.has_bias)
        return (
            None if grad_s is None else grad_s.to(ctx.s_dtype),
            None,
            None if grad_w is None else grad_w.to(master),
            None if grad_b is None else grad_b.to(master),
            None,
        )


def _trace_synapse_grads(
    m: torch.nn.Module, grad: Tensor, a: Tensor, weight: Tensor, need_s: bool, need_w: bool, need_b: bool
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(W^T g, g a^T, sum g)`` of a linear map or a convolution, each only where needed."""
    if isinstance(m, torch.nn.Linear):
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_s = grad @ weight if need_s else None
        grad_w = g2.t() @ a.reshape(-1, a.shape[-1]) if need_w else None
        grad_b = g2.sum(0) if need_b else None
        return grad_s, grad_w, grad_b
    bias_sizes = [weight.shape[0]] if need_b else None
    grad_s, grad_w, grad_b = torch.ops.aten.convolution_backward(
        grad, a, weight, bias_sizes, list(m.stride), list(m.padding), list(m.dilation), False,
        [0] * len(m.stride), m.groups, [need_s, need_w, need_b],
    )
    return grad_s, grad_w, grad_b


def trace_synapse(module: torch.nn.Module, s: Tensor, a: Tensor) -> Tensor | None:
    """``module(s)`` whose weight gradient uses the trace ``a`` (:class:`_TraceSynapse`), for
    ``nn.Linear`` and zero-padded ``nn.Conv1d/2d/3d`` with numeric padding; ``None`` for any
    other module (the caller composes it from two calls instead)."""
    conv = isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))
    if conv and (module.padding_mode != "zeros" or isinstance(module.padding, str)):
        return None
    if not (conv or isinstance(module, torch.nn.Linear)):
        return None
    return _TraceSynapse.apply(s, a, module.weight, module.bias, module)
