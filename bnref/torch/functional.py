"""Batch normalization in PyTorch, from primitive tensor operations.

Training, per channel over every axis but the channel axis (``n`` values each)::

    mean = sum(x) / n
    var  = sum((x - mean)²) / n                (biased, two-pass)
    y    = (x - mean) * scale + beta           scale = gamma / sqrt(var + eps)
    running  <- convention.update_running(running, batch statistic)

Inference uses the running statistics. float16/bfloat16 inputs are computed in float32,
float64 in float64. The training path is a ``torch.autograd.Function`` with the analytic
backward (the same formula as ``bnref.numpy.batch_norm_backward``); when a second derivative is
asked for (``create_graph=True``), the backward is computed from differentiable operations.
Never calls torch's batch-norm kernels. (``torch.var_mean`` would be stable too, but its
Welford reduction is several times slower on CPU than a mean and a sum of squares.)
"""

from __future__ import annotations

from typing import Any

import torch

from bnref._checks import check_batch_norm_args
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


def _analytic_backward(dy, x, gamma, mean, invstd, dims, axis):
    """dx, dgamma, dbeta of y = gamma * (x - mean) * invstd + beta, batch statistics.

    dx = gamma * invstd * (dy - sum(dy) / n - xhat * sum(dy * xhat) / n), written as the
    per-channel affine map dx = a * dy + b * x + c so it takes two passes over the data.
    """
    n = x.numel() // x.shape[axis]
    sum_dy = dy.sum(dims)
    # sum(dy * (x - mean)) = sum(dy * x) - mean * sum(dy): one product, then one correction
    # per channel (its cancellation costs u * |mean| / sigma, what centring x costs anyway).
    work = dy * x
    sum_dy_xmu = work.sum(dims) - mean * sum_dy
    dgamma = sum_dy_xmu * invstd
    a = invstd if gamma is None else invstd * gamma
    b = -a * invstd * invstd * sum_dy_xmu / n
    c = -a * sum_dy / n - b * mean
    # Into the product's memory: no second full-size buffer.
    dx = _affine(dy, _per_channel(a, x.ndim, axis), _per_channel(c, x.ndim, axis), out=work)
    dx.addcmul_(x, _per_channel(b, x.ndim, axis))
    return dx, dgamma, sum_dy


def _differentiable_backward(dy, x, gamma, eps, dims, axis):
    """The same gradient from differentiable operations (for second derivatives)."""
    n = x.numel() // x.shape[axis]
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    invstd = torch.rsqrt(var + eps)
    x_hat = (x - _per_channel(mean, x.ndim, axis)) * _per_channel(invstd, x.ndim, axis)
    sum_dy = dy.sum(dims)
    dgamma = (dy * x_hat).sum(dims)
    a = invstd if gamma is None else invstd * gamma
    dx = _per_channel(a, x.ndim, axis) * (
        dy - _per_channel(sum_dy / n, x.ndim, axis)
        - x_hat * _per_channel(dgamma / n, x.ndim, axis))
    return dx, dgamma, sum_dy


class _BatchStatistics(torch.autograd.Function):
    """Normalisation with batch statistics; returns (y, mean, biased var)."""

    @staticmethod
    def forward(ctx, x, gamma, beta, eps: float, dims: tuple[int, ...], axis: int):
        dtype = compute_dtype(x.dtype)
        wide = x.to(dtype)
        mean = wide.mean(dims)
        centered = wide - _per_channel(mean, x.ndim, axis)
        var = torch.mul(centered, centered).mean(dims)
        invstd = torch.rsqrt(var + eps)
        scale = invstd if gamma is None else invstd * gamma.to(dtype)
        shift = None if beta is None else _per_channel(beta.to(dtype), x.ndim, axis)
        # In place: no third full-size buffer.
        y = _affine(centered, _per_channel(scale, x.ndim, axis), shift, out=centered)
        y = y.to(x.dtype)
        ctx.save_for_backward(x, gamma, mean, invstd)
        ctx.eps, ctx.dims, ctx.axis = eps, dims, axis
        ctx.has_beta = beta is not None
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        x, gamma, mean, invstd = ctx.saved_tensors
        dtype = compute_dtype(x.dtype)
        wide_gamma = None if gamma is None else gamma.to(dtype)
        if torch.is_grad_enabled():  # create_graph=True: keep the backward differentiable
            dx, dgamma, dbeta = _differentiable_backward(
                dy.to(dtype), x.to(dtype), wide_gamma, ctx.eps, ctx.dims, ctx.axis)
        else:
            dx, dgamma, dbeta = _analytic_backward(dy.to(dtype), x.to(dtype), wide_gamma,
                                                   mean, invstd, ctx.dims, ctx.axis)
        return (
            dx.to(x.dtype),
            None if gamma is None else dgamma.to(gamma.dtype),
            dbeta.to(gamma.dtype if gamma is not None else dtype) if ctx.has_beta else None,
            None, None, None,
        )


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
    are never modified. Differentiable (twice) in ``x``, ``gamma`` and ``beta``.
    """
    args = check_batch_norm_args(x, gamma, beta, running_mean, running_var, training=training,
                                 momentum=momentum, eps=eps, axis=axis, convention=convention,
                                 inspect=_inspect, array_type=ARRAY_TYPE)
    dtype = compute_dtype(x.dtype)
    if training or running_mean is None:
        y, mean, var = _BatchStatistics.apply(x, gamma, beta, args.eps, args.reduce_axes,
                                              args.axis)
    else:
        mean, var = running_mean.to(dtype), running_var.to(dtype)
        scale = torch.rsqrt(var + args.eps)
        if gamma is not None:
            scale = scale * gamma.to(dtype)
        shift = -mean * scale if beta is None else beta.to(dtype) - mean * scale
        y = torch.addcmul(_per_channel(shift, x.ndim, args.axis), x.to(dtype),
                          _per_channel(scale, x.ndim, args.axis)).to(x.dtype)
    if running_mean is None:
        return y, None, None
    if not training:
        return y, running_mean.clone(), running_var.clone()
    conv, m = args.convention, args.momentum
    with torch.no_grad():
        new_mean = conv.update_running(running_mean.to(dtype), mean, m)
        new_var = conv.update_running(running_var.to(dtype),
                                      conv.running_var_estimate(var, args.count), m)
    return y, new_mean.to(running_mean.dtype), new_var.to(running_var.dtype)

