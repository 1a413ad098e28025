"""Batch normalization in PyTorch, from primitive tensor operations.

Training, per channel over every axis but the channel axis (``n`` values each)::

    p     = the channel's first value               (a pilot from the batch itself)
    d     = x - p                                   (exact where x is near p: Sterbenz)
    delta = sum(d) / n                              (the mean is p + delta)
    var   = sum(d²) / n - delta²                    (shifted one-pass, biased)
    y     = d * scale + (beta - delta * scale)      scale = gamma / sqrt(var + eps)
    running <- convention.update_running(running, batch statistic)

computed in float32 for float16/bfloat16/float32 input. The subtraction in ``var`` is of two
terms of the size of the spread (``p`` is a value of the channel), never of the mean's size as
in E[x²]−E[x]². float64 is computed in float64. Inference uses the running statistics.
A constant channel gives ``d == 0``, so ``var == 0`` and ``y == beta`` exactly,
and the backward stays accurate when ``|mean|`` is far larger than the spread (the built-in's
error grows with ``|mean| / sigma``; working on ``x - p`` keeps it near the rounding of the
data itself). Each pass walks x in cache-sized chunks (see the kernels' notes): the forward
reads x twice and writes y, the backward reads x and dy twice and writes dx, in x's memory
format (``channels_last`` included). CPU inputs of at least a million elements run the same
passes as compiled, fused loops instead (:mod:`bnref.torch._fused`: ``torch.compile``, paid
once per process, ``BNREF_TORCH_FUSED=0`` to turn off). An empty ``x`` (a zero batch or
spatial size) gives an empty ``y`` and leaves the running statistics as they were, as
``torch.nn.BatchNorm2d`` does.

The training path is a ``torch.autograd.Function`` with the analytic backward, a forward-mode
rule (``jvp``: ``torch.func.jvp``, ``torch.autograd.forward_ad``) and a generated vmap rule
(``torch.func.vmap``, ``jacrev``, per-sample gradients). When a second derivative is asked for
(``create_graph=True``), and under ``torch.jit.trace`` (which cannot record a Python
``autograd.Function``), the same formula runs as differentiable tensor operations instead.
Never calls torch's batch-norm kernels, and never reads a tensor's value on the host, so
``torch.compile`` traces it without graph breaks and the meta device works.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from bnref._checks import BatchNormArgs, check_batch_norm_args
from bnref.conventions import DEFAULT, Convention
from bnref.torch import _fused

__all__ = ["batch_norm"]

ARRAY_TYPE = "torch.Tensor"


def _inspect(value: Any) -> tuple[tuple[int, ...], str] | None:
    if not isinstance(value, torch.Tensor):
        return None
    return tuple(value.shape), str(value.dtype).removeprefix("torch.")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_channel(vector: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return vector.view(shape)


# -- the training kernels: few passes over memory, chunk by chunk -----------------------------
#
# A training forward must read x twice (statistics, then normalisation) and write y; the
# backward reads x and dy for two sums, then both again to write dx. The kernels below keep to
# those passes over main memory: they walk the (before, C, after) view of x in chunks of
# ~2 MiB along ``before``, and every temporary of a chunk (x - pilot, a product) stays in
# cache. Per-channel sums are BLAS matrix-vector products with a vector of ones, which run at
# memory speed on every layout (torch's multi-axis ``sum`` does not on NCHW).

_CHUNK_BYTES = 1 << 21


def rows_view(t: torch.Tensor, axis: int) -> torch.Tensor | None:
    """``t`` as a ``(before, C, after)`` view sharing its memory: ``t`` contiguous (channels
    outside the innermost axis, e.g. NCHW), or contiguous with the channel axis moved last
    (``channels_last``, or channels innermost), as ``(before, C, 1)``. ``None`` otherwise."""
    channels = t.shape[axis]
    if t.is_contiguous():
        return t.view(math.prod(t.shape[:axis]), channels, math.prod(t.shape[axis + 1:]))
    moved = t.movedim(axis, -1)
    if moved.is_contiguous():
        return moved.view(-1, channels, 1)
    return None


def _chunks(view: torch.Tensor) -> list[slice]:
    before, channels, after = view.shape
    if torch.compiler.is_compiling():  # one chunk: the compiler fuses the passes itself
        return [slice(0, before)]
    step = max(1, _CHUNK_BYTES // max(1, channels * after * view.element_size()))
    return [slice(start, min(start + step, before)) for start in range(0, before, step)]


def _scratch(view: torch.Tensor, chunks: list[slice], dtype: torch.dtype) -> torch.Tensor:
    """A buffer for the largest chunk, the first (``scratch[:k]`` serves a shorter one)."""
    _, channels, after = view.shape
    return torch.empty(chunks[0].stop, channels, after, dtype=dtype, device=view.device)


class _Summer:
    """Per-channel sums of ``(k, C, after)`` chunks as matrix-vector products with ones."""

    def __init__(self, view: torch.Tensor, dtype: torch.dtype) -> None:
        after = view.shape[2]
        length = after if after > 1 else _chunks(view)[0].stop
        self.ones = torch.ones(length, dtype=dtype, device=view.device)

    def __call__(self, chunk: torch.Tensor) -> torch.Tensor:
        k, channels, after = chunk.shape
        if after > 1:  # (k * C, after) @ ones, then the k partial sums
            return torch.mv(chunk.view(k * channels, after), self.ones).view(k, channels).sum(0)
        return torch.mv(chunk.view(k, channels).t(), self.ones[:k])


def _pilot_sums(x3: torch.Tensor, dtype: torch.dtype):
    """(pilot, sum(d), sum(d²)) per channel with ``d = x - pilot``, in one pass over x.

    The pilot is the mean of the first chunk (taken about the channel's first value, so a
    constant channel's pilot is that value exactly and its ``d`` is 0): a value from the
    batch itself, within ``sigma / sqrt(chunk count)`` of the mean. Then the variance
    ``(sum(d²) - sum(d)² / n) / n`` subtracts a term far smaller than the spread, as the
    corrected two-pass algorithm does. (E[x²] - E[x]², the same formula about 0, subtracts
    terms of the mean's size and loses everything at a large mean.)"""
    summer = _Summer(x3, dtype)
    chunks = _chunks(x3)
    scratch = _scratch(x3, chunks, dtype)
    first = x3[chunks[0]]
    start = first[0, :, 0].to(dtype).view(1, -1, 1)
    d = torch.sub(first.to(dtype), start, out=scratch[:len(first)])
    pilot = start + (summer(d) / (first.shape[0] * first.shape[2])).view(1, -1, 1)
    sum_d = torch.zeros(x3.shape[1], dtype=dtype, device=x3.device)
    sum_d2 = torch.zeros_like(sum_d)
    for rows in chunks:
        chunk = x3[rows]
        d = torch.sub(chunk.to(dtype), pilot, out=scratch[:len(chunk)])
        sum_d += summer(d)
        sum_d2 += summer(d.mul_(d))
    return pilot.view(-1), sum_d, sum_d2


def pilot_moments(x: torch.Tensor, axis: int):
    """(pilot, delta, var): the batch mean is ``pilot + delta``, ``var`` the biased variance,
    both in the compute dtype, from one pass over ``x`` (see :func:`_pilot_sums`)."""
    dtype = compute_dtype(x.dtype)
    x3 = _rows_of(x, axis)
    if _fused.usable(x3):
        fused = _fused.run(_fused.moments, x3, _chunks(x3)[0].stop, dtype)
        if fused is not None:
            return fused
    n = x3.shape[0] * x3.shape[2]
    pilot, sum_d, sum_d2 = _pilot_sums(x3, dtype)
    delta = sum_d / n
    var = (sum_d2 / n - delta * delta).clamp_min(0)
    return pilot, delta, var


def _rows_of(t: torch.Tensor, axis: int) -> torch.Tensor:
    view = rows_view(t, axis)
    return view if view is not None else rows_view(t.contiguous(), axis)


def _output_like(x: torch.Tensor, x3: torch.Tensor, axis: int):
    """(out, its rows view) for a result shaped like ``x``: in ``x``'s memory format
    (``channels_last`` stays ``channels_last``, as the built-in keeps it), laid out as
    ``x3``."""
    out = torch.empty_like(x)
    out3 = rows_view(out, axis)
    if out3 is None or out3.stride() != x3.stride():  # a layout the views do not cover
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        out3 = rows_view(out, axis)
    return out, out3


def _shaped_like(x: torch.Tensor, out3: torch.Tensor, axis: int) -> torch.Tensor:
    """A contiguous ``(before, C, after)`` result of the fused kernels as a tensor shaped like
    ``x``, in the layout :func:`_output_like` gives (``x``'s own where its rows view covers it)."""
    if x.is_contiguous() or rows_view(x, axis) is None:
        return out3.view(x.shape)
    return out3.view(x.movedim(axis, -1).shape).movedim(-1, axis)


def _per_channel3(vector: torch.Tensor) -> torch.Tensor:
    return vector.view(1, -1, 1)


def normalized(x: torch.Tensor, pilot: torch.Tensor, delta: torch.Tensor,
               scale: torch.Tensor, shift: torch.Tensor, axis: int) -> torch.Tensor:
    """``y = (x - pilot) * scale + (shift - delta * scale)`` per channel (``x - mean`` scaled,
    plus ``shift``), in ``x``'s dtype and memory format, computed in the dtype of ``scale``:
    ``x - pilot`` is exact near the pilot, and ``delta`` is small against the spread."""
    dtype = scale.dtype
    x3 = _rows_of(x, axis)
    if _fused.usable(x3):
        y3 = _fused.run(_fused.normalized, x3, pilot, delta, scale, shift)
        if y3 is not None:
            return _shaped_like(x, y3, axis)
    y, y3 = _output_like(x, x3, axis)
    shift = shift - delta * scale
    pilot, scale, shift = (_per_channel3(v) for v in (pilot, scale, shift))
    chunks = _chunks(x3)
    scratch = _scratch(x3, chunks, dtype)
    for rows in chunks:
        chunk = x3[rows]
        d = torch.sub(chunk.to(dtype), pilot, out=scratch[:len(chunk)])
        if dtype == y.dtype:
            torch.addcmul(shift, d, scale, out=y3[rows])
        else:  # float16/bfloat16: computed in float32, rounded once
            y3[rows] = d.mul_(scale).add_(shift)
    return y


def gradient_sums(dy: torch.Tensor, x: torch.Tensor, pilot: torch.Tensor,
                  delta: torch.Tensor, axis: int):
    """(sum(dy), sum(dy * (x - mean))) per channel with ``mean = pilot + delta``, in the
    compute dtype, in one pass over ``x`` and ``dy``: the two sums the input gradient needs
    (summed over every worker when synchronized)."""
    dtype = pilot.dtype
    x3 = _rows_of(x, axis)
    dy3 = _rows_like(dy, x3, axis)
    if _fused.usable(x3):
        fused = _fused.run(_fused.gradient_sums, x3, dy3, pilot, delta)
        if fused is not None:
            return fused
    summer = _Summer(x3, dtype)
    sum_dy = torch.zeros(x3.shape[1], dtype=dtype, device=x.device)
    sum_dyd = torch.zeros_like(sum_dy)
    pilot3 = _per_channel3(pilot)
    chunks = _chunks(x3)
    scratch = _scratch(x3, chunks, dtype)
    for rows in chunks:
        chunk, dy_chunk = x3[rows], dy3[rows].to(dtype)
        sum_dy += summer(dy_chunk)
        d = torch.sub(chunk.to(dtype), pilot3, out=scratch[:len(chunk)])
        sum_dyd += summer(d.mul_(dy_chunk))
    return sum_dy, sum_dyd - delta * sum_dy


def _rows_like(t: torch.Tensor, x3: torch.Tensor, axis: int) -> torch.Tensor:
    """``t``'s rows view laid out as ``x3`` (``t`` copied into that layout if it differs)."""
    t3 = rows_view(t, axis)
    if t3 is not None and t3.stride() == x3.stride():
        return t3
    copy = x3.new_empty(x3.shape, dtype=t.dtype)
    if x3.shape[2] == 1 and x3.shape[1] != 1:  # channels last: (before, C) rows
        copy.view(t.movedim(axis, -1).shape).copy_(t.movedim(axis, -1))
    else:
        copy.view(t.shape).copy_(t)
    return copy


def laid_out_like(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``dy`` in ``x``'s memory format: copied once here when the two differ, so that the
    backward's two passes (:func:`gradient_sums`, :func:`input_gradient`) both read it as
    they read ``x``."""
    if dy.stride() == x.stride():
        return dy
    return torch.empty_like(x, dtype=dy.dtype).copy_(dy)


def input_gradient(dy: torch.Tensor, x: torch.Tensor, pilot: torch.Tensor,
                   gamma: torch.Tensor | None, invstd: torch.Tensor, delta: torch.Tensor,
                   sum_dy: torch.Tensor, dot: torch.Tensor, n: int, axis: int) -> torch.Tensor:
    """``dx = a * dy + b * (x - pilot) + (k - b * delta)`` per channel from the two sums over
    ``n`` values (see :func:`_analytic_backward`), in ``x``'s dtype and memory format."""
    dtype = pilot.dtype
    a = invstd if gamma is None else invstd * gamma
    b = -a * invstd * invstd * dot / n
    k = -a * sum_dy / n - b * delta
    x3 = _rows_of(x, axis)
    dy3 = _rows_like(dy, x3, axis)
    if _fused.usable(x3):
        dx3 = _fused.run(_fused.input_gradient, x3, dy3, pilot, a, b, k)
        if dx3 is not None:
            return _shaped_like(x, dx3, axis)
    dx, dx3 = _output_like(x, x3, axis)
    a, b, k, pilot3 = (_per_channel3(v) for v in (a, b, k, pilot))
    chunks = _chunks(x3)
    # Straight into dx when it has the compute dtype (its chunk stays in cache between the
    # three operations); through a scratch chunk for float16/bfloat16.
    scratch = None if dx.dtype == dtype else _scratch(x3, chunks, dtype)
    for rows in chunks:
        chunk = x3[rows]
        work = dx3[rows] if scratch is None else scratch[:len(chunk)]
        d = torch.sub(chunk.to(dtype), pilot3, out=work)
        d = torch.addcmul(k, d, b, out=d).addcmul_(dy3[rows].to(dtype), a)
        if scratch is not None:
            dx3[rows] = d
    return dx


def _wide(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def _analytic_backward(dy, x, gamma, pilot, delta, invstd, axis):
    """dx, dgamma, dbeta of y = gamma * (x - mean) * invstd + beta, batch statistics.

    With c = x - mean (mean = pilot + delta), xhat = c * invstd::

        dbeta  = sum(dy)
        dgamma = sum(dy * c) * invstd
        dx     = gamma * invstd * (dy - dbeta / n - xhat * dgamma / n)
               = a * dy + b * (x - pilot) + (k - b * delta)   a, b, k per channel

    ``x - pilot`` is exact near the pilot, and ``delta`` is small against the spread, so
    nothing cancels when ``|mean| >> sigma`` (``sum(dy * x) - mean * sum(dy)`` would lose
    ``u * |mean| / sigma``). Two passes over ``x`` and ``dy`` (:func:`gradient_sums`, then
    :func:`input_gradient`).
    """
    n = x.numel() // x.shape[axis]
    dy = laid_out_like(dy, x)
    sum_dy, dot = gradient_sums(dy, x, pilot, delta, axis)
    dx = input_gradient(dy, x, pilot, gamma, invstd, delta, sum_dy, dot, n, axis)
    return dx, dot * invstd, sum_dy


def _standardized(wide: torch.Tensor, eps: float, dims: tuple[int, ...], axis: int):
    """(c, mean, var, invstd) from differentiable operations: ``c = x - mean`` centred twice
    (``m1`` detached: any ``m1`` works, the second centring absorbs it and keeps ``c`` exact)."""
    n = wide.numel() // wide.shape[axis]
    m1 = wide.mean(dims).detach()
    c = wide - _per_channel(m1, wide.ndim, axis)
    delta = c.sum(dims) / n
    c = c - _per_channel(delta, wide.ndim, axis)
    var = (c * c).sum(dims) / n
    return c, m1 + delta, var, torch.rsqrt(var + eps)


def _composite(x, gamma, beta, eps: float, dims: tuple[int, ...], axis: int):
    """The training forward as differentiable operations (any order of derivative, tracing)."""
    dtype = compute_dtype(x.dtype)
    c, mean, var, scale = _standardized(x.to(dtype), eps, dims, axis)
    if gamma is not None:
        scale = scale * gamma.to(dtype)
    y = c * _per_channel(scale, x.ndim, axis)
    if beta is not None:
        y = y + _per_channel(beta.to(dtype), x.ndim, axis)
    return y.to(x.dtype), mean.detach(), var.detach()


class _BatchStatistics(torch.autograd.Function):
    """Normalisation with batch statistics; returns (y, mean, biased var).

    ``mean``/``var`` are returned for the running statistics and are not differentiable;
    ``pilot``, ``delta``, ``invstd`` are what the backward needs.
    """

    @staticmethod
    def forward(x, gamma, beta, eps: float, dims: tuple[int, ...], axis: int):
        pilot, delta, var = pilot_moments(x, axis)
        dtype = pilot.dtype
        invstd = torch.rsqrt(var + eps)
        scale = invstd if gamma is None else invstd * gamma.to(dtype)
        # A channel with no spread (var exactly 0: every x equals the pilot) is beta exactly,
        # so its scale is 0 there rather than a rounding of delta * scale - delta * scale.
        scale = torch.where(var > 0, scale, torch.zeros_like(scale))
        shift = torch.zeros_like(scale) if beta is None else beta.to(dtype)
        y = normalized(x, pilot, delta, scale, shift, axis)
        return y, pilot + delta, var, pilot, delta, invstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, gamma, beta, eps, dims, axis = inputs
        _, _, _, pilot, delta, invstd = output
        ctx.save_for_backward(x, gamma, pilot, delta, invstd)
        ctx.save_for_forward(x, gamma, pilot, delta, invstd)
        ctx.eps, ctx.dims, ctx.axis = eps, dims, axis
        ctx.has_beta = beta is not None
        ctx.mark_non_differentiable(*output[1:])

    @staticmethod
    def backward(ctx, dy, *_unused):
        x, gamma, pilot, delta, invstd = ctx.saved_tensors
        dtype = compute_dtype(x.dtype)
        if torch.is_grad_enabled() or _fused.is_transformed(dy):
            # create_graph=True, or a torch.func transform over the backward (batched
            # gradients, jacrev): out-of-place differentiable operations.
            return _differentiable_backward(ctx, dy, x, gamma)
        dx, dgamma, dbeta = _analytic_backward(dy, x, _wide(gamma, dtype), pilot, delta,
                                               invstd, ctx.axis)
        return (
            dx,
            None if gamma is None else dgamma.to(gamma.dtype),
            dbeta.to(gamma.dtype if gamma is not None else dtype) if ctx.has_beta else None,
            None, None, None,
        )


class _Transformable(_BatchStatistics):
    """The same Function with a forward-mode rule and a vmap rule, for eager use.

    Kept apart because Dynamo cannot trace an ``autograd.Function`` that defines ``jvp``: under
    ``torch.compile`` the plain :class:`_BatchStatistics` runs, with no graph break.
    """

    @staticmethod
    def jvp(ctx, dx, dgamma, dbeta, *_unused):
        """Forward mode: the directional derivative of y (and of mean, var) along the tangents.

        dmean = mean(dx); dvar = 2 mean(c * dx); dinvstd = -invstd³ dvar / 2;
        dy = gamma * (invstd * (dx - dmean) + c * dinvstd) + dgamma * xhat + dbeta.
        """
        x, gamma, pilot, delta, invstd = ctx.saved_tensors
        dims, axis, ndim = ctx.dims, ctx.axis, x.ndim
        dtype = compute_dtype(x.dtype)
        n = x.numel() // x.shape[axis]
        c = x.to(dtype) - _per_channel(pilot, ndim, axis) - _per_channel(delta, ndim, axis)
        xhat = c * _per_channel(invstd, ndim, axis)
        dy = torch.zeros_like(xhat)
        dmean = dvar = torch.zeros_like(invstd)
        if dx is not None:
            dx = dx.to(dtype)
            dmean = dx.sum(dims) / n
            dvar = 2 * (c * dx).sum(dims) / n
            dinvstd = -0.5 * invstd ** 3 * dvar
            dxhat = ((dx - _per_channel(dmean, ndim, axis)) * _per_channel(invstd, ndim, axis)
                     + c * _per_channel(dinvstd, ndim, axis))
            dy = dxhat if gamma is None else dxhat * _per_channel(gamma.to(dtype), ndim, axis)
        if dgamma is not None:
            dy = dy + xhat * _per_channel(dgamma.to(dtype), ndim, axis)
        if dbeta is not None:
            dy = dy + _per_channel(dbeta.to(dtype), ndim, axis)
        return dy.to(x.dtype), None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, x, gamma, beta, eps, dims, axis):
        """A batch of B independent problems is one problem with B * C channels: move the
        vmapped dimension next to the channel axis and merge the two."""
        size = info.batch_size
        x_dim, gamma_dim, beta_dim = in_dims[:3]
        if x_dim is None:
            x = x.unsqueeze(axis).expand(*x.shape[:axis], size, *x.shape[axis:])
        else:
            x = x.movedim(x_dim, axis)
        shape = x.shape
        merged = x.reshape(*shape[:axis], size * shape[axis + 1], *shape[axis + 2:])

        def per_problem(vector, dim):
            if vector is None:
                return None
            vector = vector.expand(size, -1) if dim is None else vector.movedim(dim, 0)
            return vector.reshape(-1)

        outputs = _Transformable.apply(merged, per_problem(gamma, gamma_dim),
                                         per_problem(beta, beta_dim), eps, dims, axis)
        y, *stats = outputs
        return ((y.reshape(shape), *(s.reshape(size, -1) for s in stats)),
                (axis, 0, 0, 0, 0, 0))


def _differentiable_backward(ctx, dy, x, gamma):
    """The backward from differentiable operations, for second derivatives."""
    dtype = compute_dtype(x.dtype)
    dims, axis, ndim = ctx.dims, ctx.axis, x.ndim
    n = x.numel() // x.shape[axis]
    dy = dy.to(dtype)
    c, _, _, invstd = _standardized(x.to(dtype), ctx.eps, dims, axis)
    x_hat = c * _per_channel(invstd, ndim, axis)
    sum_dy = dy.sum(dims)
    dgamma = (dy * x_hat).sum(dims)
    a = invstd if gamma is None else invstd * gamma.to(dtype)
    dx = _per_channel(a, ndim, axis) * (
        dy - _per_channel(sum_dy / n, ndim, axis) - x_hat * _per_channel(dgamma / n, ndim, axis))
    return (
        dx.to(x.dtype),
        None if gamma is None else dgamma.to(gamma.dtype),
        sum_dy.to(gamma.dtype if gamma is not None else dtype) if ctx.has_beta else None,
        None, None, None,
    )


def _check(x, gamma, beta, running_mean, running_var, *, training, momentum, eps, axis,
           convention) -> BatchNormArgs:
    return check_batch_norm_args(x, gamma, beta, running_mean, running_var, training=training,
                                 momentum=momentum, eps=eps, axis=axis, convention=convention,
                                 inspect=_inspect, array_type=ARRAY_TYPE, allow_empty=True)


def normalize(x: torch.Tensor, gamma: torch.Tensor | None, beta: torch.Tensor | None,
              running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
              args: BatchNormArgs, *, batch_stats: bool):
    """y and the statistics it used: (y, mean, var), computed in the compute dtype.

    ``mean``/``var`` are ``None`` for an empty ``x``, whose y is ``x * gamma + beta`` (empty,
    but in the autograd graph of all three, as the built-in keeps it).
    """
    dtype = compute_dtype(x.dtype)
    ndim, axis = x.ndim, args.axis
    if args.count == 0:
        y = x.to(dtype, copy=True)
        if gamma is not None:
            y = y * _per_channel(gamma.to(dtype), ndim, axis)
        if beta is not None:
            y = y + _per_channel(beta.to(dtype), ndim, axis)
        return y.to(x.dtype), None, None
    if batch_stats:
        if torch.jit.is_tracing() or torch.compiler.is_exporting():
            # A traced graph cannot hold a Python autograd.Function, and an exported one
            # inlines its forward (whose out= writes autograd refuses): differentiable ops.
            return _composite(x, gamma, beta, args.eps, args.reduce_axes, axis)
        function = _BatchStatistics if torch.compiler.is_compiling() else _Transformable
        y, mean, var, *_ = function.apply(x, gamma, beta, args.eps, args.reduce_axes,
                                                  axis)
        return y, mean, var
    mean, var = running_mean.to(dtype), running_var.to(dtype)
    scale = torch.rsqrt(var + args.eps)
    if gamma is not None:
        scale = scale * gamma.to(dtype)
    shift = -mean * scale if beta is None else beta.to(dtype) - mean * scale
    y = torch.addcmul(_per_channel(shift, ndim, axis), x.to(dtype),
                      _per_channel(scale, ndim, axis))
    return y.to(x.dtype), mean, var


def updated_running_stats(running_mean: torch.Tensor, running_var: torch.Tensor,
                          mean: torch.Tensor, var: torch.Tensor, args: BatchNormArgs,
                          momentum: float | torch.Tensor):
    """The convention's running update, new tensors in the running statistics' dtypes.

    ``momentum`` may be a tensor (the layer's cumulative average), so nothing is read on the
    host.
    """
    dtype = mean.dtype  # x's compute dtype, as the oracle does it
    conv = args.convention
    with torch.no_grad():
        new_mean = conv.update_running(running_mean.to(dtype), mean.to(dtype), momentum)
        new_var = conv.update_running(running_var.to(dtype),
                                      conv.running_var_estimate(var.to(dtype), args.count),
                                      momentum)
    return new_mean.to(running_mean.dtype), new_var.to(running_var.dtype)


def batch_norm(
    x: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    *,
    training: bool,
    momentum: float = DEFAULT,  # type: ignore[assignment]
    eps: float | None = None,
    axis: int | None = None,
    convention: str | Convention = "torch",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Batch-normalize ``x`` over every axis but the channel axis (see :mod:`bnref.numpy`).

    ``y = gamma * (x - mean) / sqrt(var + eps) + beta`` with the biased batch statistics in
    training (or when no running statistics are given) and the running statistics in
    inference. Returns ``(y, new_running_mean, new_running_var)``, new tensors: in training the
    running statistics move by the convention's rule (torch: ``(1 - m) * old + m * batch``,
    variance unbiased; keras/flax/mxnet/onnx: ``m * old + (1 - m) * batch``, biased). Inputs
    are never modified. Differentiable in ``x``, ``gamma`` and ``beta`` to any order, in
    reverse and forward mode, and under ``torch.func`` transforms. An empty ``x`` gives an
    empty ``y`` and the running statistics unchanged, as torch's own batch norm does.
    """
    args = _check(x, gamma, beta, running_mean, running_var, training=training,
                  momentum=momentum, eps=eps, axis=axis, convention=convention)
    batch_stats = training or running_mean is None
    y, mean, var = normalize(x, gamma, beta, running_mean, running_var, args,
                             batch_stats=batch_stats)
    if running_mean is None:
        return y, None, None
    if not training or mean is None:
        return y, running_mean.clone(), running_var.clone()
    new_mean, new_var = updated_running_stats(running_mean, running_var, mean, var, args,
                                              args.momentum)
    return y, new_mean, new_var
