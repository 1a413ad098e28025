"""Batch normalization in MXNet from ``mx.nd`` operations (not the ``BatchNorm`` operator).

``x`` is viewed as ``(before, C, after)``, the channel axis in the middle; per channel, over
the ``n = before * after`` values::

    mean = sum(x) / n
    var  = sum((x - mean)²) / n                (biased, two-pass)
    y    = x * scale + (beta - mean * scale)   scale = gamma / sqrt(var + eps)
    running <- convention.update_running(running, batch statistic)

Each sum is two BLAS matrix-vector products with vectors of ones (over ``after``, then over
``before``): MXNet's own reductions over several axes at once are many times slower than
memory speed. Inference uses the running statistics. float16 is computed in
float32, float64 in float64. Under ``autograd.record()`` MXNet differentiates these operations.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from mxnet import nd

from bnref._checks import check_batch_norm_args
from bnref.conventions import DEFAULT, Convention

__all__ = ["batch_norm"]

ARRAY_TYPE = "mxnet.nd.NDArray"


def _inspect(value: Any) -> tuple[tuple[int, ...], str] | None:
    if not isinstance(value, nd.NDArray):
        return None
    return tuple(value.shape), np.dtype(value.dtype).name


def compute_dtype(dtype: Any) -> str:
    return "float64" if np.dtype(dtype) == np.float64 else "float32"


def to_view(F, x, axis: int):
    """``x`` as ``(before, C, after)``: the axes before the channel axis merged, the channel
    axis, the axes after it merged. Written with reshape codes (0 copies a dimension, -3 merges
    two, -1 infers), so it works on ``mx.sym`` symbols of unknown shape as on ``mx.nd``."""
    if axis >= 0:
        if axis == 0:
            x, axis = F.expand_dims(x, axis=0), 1
        for _ in range(axis - 1):
            x = F.reshape(x, shape=(-3, -2))
        return F.reshape(x, shape=(0, 0, -1))
    for _ in range(-axis - 2):
        x = F.reshape(x, shape=(-2, -3), reverse=True)
    if axis == -1:
        return F.expand_dims(F.reshape(x, shape=(-1, 0), reverse=True), axis=2)
    return F.reshape(x, shape=(-1, 0, 0), reverse=True)


def channel_sums(F, x3):
    """Per-channel sums of a ``(before, C, after)`` view, as two matrix-vector products with
    vectors of ones: MXNet's ``sum`` over an axis runs at a fraction of memory speed, BLAS at
    full speed. Built from ``x3`` itself, so it works on symbols of unknown shape."""
    ones_after = F.reshape(F.ones_like(F.slice_axis(F.slice_axis(x3, axis=0, begin=0, end=1),
                                                    axis=1, begin=0, end=1)), shape=(-1, 1))
    ones_before = F.reshape(F.ones_like(F.slice_axis(F.slice_axis(x3, axis=1, begin=0, end=1),
                                                     axis=2, begin=0, end=1)), shape=(1, -1))
    rows = F.dot(F.reshape(x3, shape=(-3, 0)), ones_after)  # (before * C, 1)
    per_before = F.reshape_like(rows, F.slice_axis(x3, axis=2, begin=0, end=1))
    return F.reshape(F.dot(ones_before, per_before), shape=(-1,))


def moments(F, x3, count):
    """Per-channel ``(mean, biased var)`` of a ``(before, C, after)`` view, two-pass.
    ``count`` (values per channel) is a number, or a ``(1,)`` array in a graph."""
    def per_value(total):
        return total / count if isinstance(count, (int, float)) else F.broadcast_div(total, count)

    mean = per_value(channel_sums(F, x3))
    centered = F.broadcast_sub(x3, F.reshape(mean, shape=(1, -1, 1)))
    return mean, per_value(channel_sums(F, F.square(centered)))


def normalise(F, x3, mean, var, gamma, beta, eps: float):
    """``(x - mean) * gamma / sqrt(var + eps) + beta`` on the ``(before, C, after)`` view as one
    per-channel multiply-add, ``x * scale + (beta - mean * scale)``; ``F`` is ``mx.nd`` or
    ``mx.sym`` (the layer's hybridized graph)."""
    scale = F.rsqrt(var + eps)
    if gamma is not None:
        scale = scale * gamma
    shift = -mean * scale if beta is None else beta - mean * scale
    y = F.broadcast_mul(x3, F.reshape(scale, shape=(1, -1, 1)))
    return F.broadcast_add(y, F.reshape(shift, shape=(1, -1, 1)))


def batch_norm(
    x: nd.NDArray,
    gamma: nd.NDArray | None,
    beta: nd.NDArray | None,
    running_mean: nd.NDArray | None,
    running_var: nd.NDArray | None,
    *,
    training: bool,
    momentum: float = DEFAULT,  # type: ignore[assignment]
    eps: float | None = None,
    axis: int | None = None,
    convention: str | Convention = "torch",
) -> tuple[nd.NDArray, nd.NDArray | None, nd.NDArray | None]:
    """Batch-normalize ``x`` over every axis but the channel axis (see :mod:`bnref.numpy`).

    ``y = gamma * (x - mean) / sqrt(var + eps) + beta`` with the biased batch statistics in
    training (or when no running statistics are given) and the running statistics in
    inference. Returns ``(y, new_running_mean, new_running_var)`` as new arrays; the inputs
    are never written: in training the running statistics move by the convention's rule
    (torch: ``(1 - m) * old + m * batch``, variance unbiased; keras/flax/mxnet/onnx:
    ``m * old + (1 - m) * batch``, biased). ``training`` is the argument, not
    ``autograd.is_training()``; gradients flow to ``x``, ``gamma`` and ``beta`` under
    ``autograd.record()``, never through the running statistics.
    """
    args = check_batch_norm_args(x, gamma, beta, running_mean, running_var, training=training,
                                 momentum=momentum, eps=eps, axis=axis, convention=convention,
                                 inspect=_inspect, array_type=ARRAY_TYPE)
    dtype = compute_dtype(x.dtype)
    x3 = to_view(nd, x.astype(dtype, copy=False), args.axis)

    def wide(v):
        return None if v is None else v.astype(dtype, copy=False)

    if training or running_mean is None:
        mean, var = moments(nd, x3, args.count)
    else:
        mean, var = wide(running_mean), wide(running_var)
    y = normalise(nd, x3, mean, var, wide(gamma), wide(beta), args.eps)
    y = y.reshape(x.shape).astype(x.dtype, copy=False)
    if running_mean is None or not training:
        return y, running_mean, running_var
    # The momentum as an array: MXNet refuses subnormal scalars as operator parameters.
    conv, m = args.convention, nd.array([args.momentum], dtype=dtype)
    mean, var = mean.detach(), var.detach()
    new_mean = conv.update_running(wide(running_mean), mean, m)
    new_var = conv.update_running(wide(running_var), conv.running_var_estimate(var, args.count),
                                  m)
    return (y, new_mean.astype(running_mean.dtype, copy=False),
            new_var.astype(running_var.dtype, copy=False))
