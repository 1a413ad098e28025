"""Batch normalization in PyTorch, from primitive tensor operations.

Training, per channel over every axis but the channel axis (``n`` values each)::

    m1    = sum(x) / n                          (float32 for float16/bfloat16/float32 input)
    c     = x - m1                              (exact where x is near m1: Sterbenz)
    delta = sum(c) / n                          (the first pass's rounding error: the mean
    var   = sum(c²) / n - delta²                 is m1 + delta; corrected two-pass, biased)
    y     = c * scale + (beta - delta * scale)  scale = gamma / sqrt(var + eps)
    running <- convention.update_running(running, batch statistic)

Inference uses the running statistics. float16/bfloat16 inputs are computed in float32, float64
in float64. The corrected mean makes a constant channel give ``y == beta`` exactly (``c`` is
then exactly 0) and keeps the backward accurate when ``|mean|`` is far larger than the spread
(the built-in's error grows with ``|mean| / sigma``; the correction keeps it near the rounding
of the data itself). An empty ``x`` (a zero batch or spatial size) gives an empty ``y`` and
leaves the running statistics as they were, as ``torch.nn.BatchNorm2d`` does.

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


def _affine(t: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None,
            out: torch.Tensor) -> torch.Tensor:
    """out = t * scale + shift with per-channel scale/shift, in the fastest form for the layout.

    With the channels innermost one ``addcmul`` pass is fastest; with channels outside the
    innermost axis (NCHW) torch's three-operand broadcast is slow on CPU, and a multiply then
    an add (both in place) is faster, measured in benchmarks/bench_torch.py.
    """
    if shift is None:
        return torch.mul(t, scale, out=out)
    if scale.shape[-1] != 1 or t.ndim == 1:  # channels on the innermost axis
        return torch.addcmul(shift, t, scale, out=out)
    return torch.mul(t, scale, out=out).add_(shift)


def _sum_of_squares(c: torch.Tensor, axis: int, dims: tuple[int, ...]) -> torch.Tensor:
    """Per-channel sum(c²).

    Contiguous with the channels outside the innermost axis (NCHW): a 2-norm over the innermost
    block of a (before, C, after) view, then a sum over ``before``; it reads ``c`` once with no
    full-size temporary (8 ms against 69 ms for square-then-sum on (64, 64, 56, 56)) and is as
    accurate. (A norm over several axes at once accumulates sequentially: 3e-6 relative error
    at 64 * 16 * 16 values, against 1e-7 this way.) Otherwise square-then-sum.
    """
    after = math.prod(c.shape[axis + 1:])
    if after > 1 and c.is_contiguous():
        view = c.view(math.prod(c.shape[:axis]), c.shape[axis], after)
        return torch.linalg.vector_norm(view, dim=2).square().sum(0)
    return torch.mul(c, c).sum(dims)


def _centered_moments(wide: torch.Tensor, dims: tuple[int, ...], axis: int):
    """(c, m1, delta, var): ``c = x - m1`` in a fresh buffer, mean ``m1 + delta``, var biased.

    The corrected two-pass algorithm: ``delta = mean(x - m1)`` is the first pass's rounding
    error, and ``var = mean(c²) - delta²`` subtracts a term that is tiny against the spread,
    so nothing cancels (this is not E[x²]−E[x]², whose subtraction is of two terms of size
    ``mean²``). On a constant channel ``c`` is n copies of one small multiple of ulp(m1):
    its sum and its sum of squares are exact, so ``delta`` is that value and ``var`` exactly 0.
    """
    n = wide.numel() // wide.shape[axis]
    m1 = wide.mean(dims)
    c = torch.sub(wide, _per_channel(m1, wide.ndim, axis))
    delta = c.sum(dims) / n
    var = (_sum_of_squares(c, axis, dims) / n - delta * delta).clamp_min(0)
    return c, m1, delta, var


def _wide(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def _is_transformed(t: torch.Tensor) -> bool:
    """Whether ``t`` is wrapped by a torch.func transform, or batched by the legacy vmap
    that gradcheck's batched-gradient check uses: batched tensors cannot be written through
    ``out=``."""
    if torch.compiler.is_compiling():  # Dynamo cannot trace these queries (and needs none)
        return False
    functorch = torch._C._functorch
    return functorch.is_functorch_wrapped_tensor(t) or functorch.is_legacy_batchedtensor(t)


def _analytic_backward(dy, x, gamma, m1, delta, invstd, dims, axis):
    """dx, dgamma, dbeta of y = gamma * (x - mean) * invstd + beta, batch statistics.

    With c = x - mean (mean = m1 + delta), xhat = c * invstd::

        dbeta  = sum(dy)
        dgamma = sum(dy * c) * invstd
        dx     = gamma * invstd * (dy - dbeta / n - xhat * dgamma / n)
               = a * dy + b * (x - m1) + (k - b * delta)   a, b, k per channel

    ``x - m1`` is exact near the mean, and ``delta`` is tiny, so nothing cancels when
    ``|mean| >> sigma`` (``sum(dy * x) - mean * sum(dy)`` would lose ``u * |mean| / sigma``).
    """
    n = x.numel() // x.shape[axis]
    centered, work, sum_dy, dot = gradient_sums(dy, x, m1, delta, dims, axis)
    dx = input_gradient(dy, centered, work, gamma, invstd, delta, sum_dy, dot, n, axis)
    return dx, dot * invstd, sum_dy


def gradient_sums(dy, x, m1, delta, dims, axis):
    """(x - m1, a scratch buffer, sum(dy), sum(dy * (x - mean))) with mean = m1 + delta: the
    two per-channel sums the input gradient needs (summed over every worker when
    synchronized)."""
    centered = torch.sub(x, _per_channel(m1, x.ndim, axis))  # x's memory format
    sum_dy = dy.sum(dims)
    work = torch.mul(centered, dy, out=torch.empty_like(centered))
    return centered, work, sum_dy, work.sum(dims) - delta * sum_dy


def input_gradient(dy, centered, work, gamma, invstd, delta, sum_dy, dot, n, axis):
    """dx = a * dy + b * (x - m1) + (k - b * delta) from the sums over ``n`` values, written
    into ``work`` (see :func:`_analytic_backward`)."""
    ndim = dy.ndim
    a = invstd if gamma is None else invstd * gamma
    b = -a * invstd * invstd * dot / n
    k = -a * sum_dy / n - b * delta
    dx = _affine(centered, _per_channel(b, ndim, axis), _per_channel(k, ndim, axis), out=work)
    return dx.addcmul_(dy, _per_channel(a, ndim, axis))


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
    ``m1``, ``delta``, ``invstd`` are what the backward needs.
    """

    @staticmethod
    def forward(x, gamma, beta, eps: float, dims: tuple[int, ...], axis: int):
        dtype = compute_dtype(x.dtype)
        c, m1, delta, var = _centered_moments(x.to(dtype), dims, axis)
        invstd = torch.rsqrt(var + eps)
        scale = invstd if gamma is None else invstd * gamma.to(dtype)
        # y = (c - delta) * scale + beta in one pass over c: shift = beta - delta * scale. A
        # channel with no spread (var exactly 0: every c equals delta) is beta exactly, so
        # its scale is 0 there rather than a rounding of delta * scale - delta * scale.
        scale = torch.where(var > 0, scale, torch.zeros_like(scale))
        shift = -delta * scale if beta is None else beta.to(dtype) - delta * scale
        y = _affine(c, _per_channel(scale, x.ndim, axis), _per_channel(shift, x.ndim, axis),
                    out=c)  # in place
        return y.to(x.dtype), m1 + delta, var, m1, delta, invstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, gamma, beta, eps, dims, axis = inputs
        _, _, _, m1, delta, invstd = output
        ctx.save_for_backward(x, gamma, m1, delta, invstd)
        ctx.save_for_forward(x, gamma, m1, delta, invstd)
        ctx.eps, ctx.dims, ctx.axis = eps, dims, axis
        ctx.has_beta = beta is not None
        ctx.mark_non_differentiable(*output[1:])

    @staticmethod
    def backward(ctx, dy, *_unused):
        x, gamma, m1, delta, invstd = ctx.saved_tensors
        dtype = compute_dtype(x.dtype)
        if torch.is_grad_enabled() or _is_transformed(dy):
            # create_graph=True, or a torch.func transform over the backward (batched
            # gradients, jacrev): out-of-place differentiable operations.
            return _differentiable_backward(ctx, dy, x, gamma)
        dx, dgamma, dbeta = _analytic_backward(dy.to(dtype), x.to(dtype), _wide(gamma, dtype),
                                               m1, delta, invstd, ctx.dims, ctx.axis)
        return (
            dx.to(x.dtype),
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
        x, gamma, m1, delta, invstd = ctx.saved_tensors
        dims, axis, ndim = ctx.dims, ctx.axis, x.ndim
        dtype = compute_dtype(x.dtype)
        n = x.numel() // x.shape[axis]
        c = x.to(dtype) - _per_channel(m1, ndim, axis) - _per_channel(delta, ndim, axis)
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
