"""Batch normalization in MXNet from ``mx.nd`` operations (not the ``BatchNorm`` operator).

``x`` is viewed as ``(before, C, after)``, the channel axis in the middle; per channel, over
the ``n = before * after`` values::

    mean = sum(x) / n
    var  = sum((x - mean)²) / n                (biased, two-pass)
    y    = (x - mean) * scale + beta           scale = gamma / sqrt(var + eps)
    running <- convention.update_running(running, batch statistic)

MXNet's reductions and broadcasts run far below memory speed, so each sum is two BLAS
matrix-vector products with vectors of ones (over ``after``, then ``before``) and each
per-channel multiply-add a depthwise 1x1 convolution where that is fast (see :func:`affine`).
In training under ``autograd.record()`` the backward is analytic (:func:`train_backward`).
Inference uses the running statistics. float16 is computed in
float32, float64 in float64. Under ``autograd.record()`` MXNet differentiates these operations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from mxnet import autograd, nd

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
    axis, the axes after it merged. An NDArray gets a view (``NDArray.reshape``; the reshape
    *operator* would copy). Symbols of unknown shape get reshape codes (0 copies a dimension,
    -3 merges two, -1 infers)."""
    if isinstance(x, nd.NDArray):
        shape, axis = x.shape, axis % x.ndim
        return x.reshape((math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])))
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


def channel_sums(x3: nd.NDArray) -> nd.NDArray:
    """Per-channel sums of a ``(before, C, after)`` view, as two matrix-vector products with
    vectors of ones: MXNet's ``sum`` over axes runs at a fraction of memory speed, BLAS at full
    speed (and sums in blocks)."""
    before, channels, after = x3.shape
    ones_after = nd.ones((after, 1), dtype=x3.dtype)
    rows = nd.dot(x3.reshape((before * channels, after)), ones_after)
    return nd.dot(nd.ones((1, before), dtype=x3.dtype),
                  rows.reshape((before, channels))).reshape((channels,))


def affine(x3: nd.NDArray, scale: nd.NDArray, shift: nd.NDArray | None,
           out: nd.NDArray | None = None) -> nd.NDArray:
    """``x3 * scale + shift`` per channel in one pass where it can be: a depthwise 1x1
    convolution (oneDNN) for float32 views with a long ``after`` axis, where MXNet's broadcast
    multiply and add take ~3x a memory pass each; broadcasting otherwise (the convolution is
    very slow with ``after`` = 1, and oneDNN has no float64). Written into ``out`` if given."""
    _, channels, after = x3.shape
    if x3.dtype == np.float32 and after >= 64:
        return nd.Convolution(x3, scale.reshape((channels, 1, 1)), shift, kernel=(1,),
                              num_filter=channels, num_group=channels, no_bias=shift is None,
                              out=out)
    if shift is None:
        return nd.broadcast_mul(x3, scale.reshape((1, -1, 1)), out=out)
    return nd.broadcast_add(nd.broadcast_mul(x3, scale.reshape((1, -1, 1))),
                            shift.reshape((1, -1, 1)), out=out)


def channel_dots(a3: nd.NDArray, b3: nd.NDArray) -> nd.NDArray:
    """Per-channel sums of ``a3 * b3``. With a long ``after`` axis, one batched dot product per
    (before, channel) row reads both once and writes no product; with a short one (where 4M
    tiny dot products crawl) the product is written and summed by BLAS."""
    before, channels, after = a3.shape
    if after < 64:
        return channel_sums(a3 * b3)
    rows = nd.batch_dot(a3.reshape((before * channels, 1, after)),
                        b3.reshape((before * channels, after, 1)))
    return nd.dot(nd.ones((1, before), dtype=a3.dtype),
                  rows.reshape((before, channels))).reshape((channels,))


@dataclass
class Saved:
    """What the analytic backward needs from a training forward."""

    centered: nd.NDArray  # x - mean, on the (before, C, after) view
    rstd: nd.NDArray  # 1 / sqrt(var + eps)
    scale: nd.NDArray  # gamma * rstd (rstd without gamma)


def train_forward(x3, gamma, beta, eps: float, out: nd.NDArray | None = None):
    """``(y, mean, biased var, saved)`` with the batch statistics, two-pass."""
    count = x3.shape[0] * x3.shape[2]
    mean = channel_sums(x3) / count
    centered = affine(x3, nd.ones_like(mean), -mean)
    var = channel_dots(centered, centered) / count
    rstd = nd.rsqrt(var + eps)
    scale = rstd if gamma is None else rstd * gamma
    return affine(centered, scale, beta, out), mean, var, Saved(centered, rstd, scale)


def train_backward(dy3, saved: Saved):
    """``(dx, dgamma, dbeta)`` of a training forward, analytically::

        dbeta  = sum(dy)            dgamma = sum(dy * x_hat)      x_hat = (x - mean) * rstd
        dx     = scale * (dy - dbeta / n - x_hat * dgamma / n)
    """
    count = dy3.shape[0] * dy3.shape[2]
    dbeta = channel_sums(dy3)
    dgamma = channel_dots(dy3, saved.centered) * saved.rstd
    dx = affine(dy3, saved.scale, -saved.scale * dbeta / count)
    dx = dx + affine(saved.centered, -saved.scale * saved.rstd * dgamma / count, None)
    return dx, dgamma, dbeta


def inference_forward(x3, gamma, beta, mean, var, eps: float, out: nd.NDArray | None = None):
    """``(y, rstd)``: ``(x - mean) * gamma * rstd + beta`` as one per-channel multiply-add."""
    rstd = nd.rsqrt(var + eps)
    scale = rstd if gamma is None else rstd * gamma
    shift = -mean * scale if beta is None else beta - mean * scale
    return affine(x3, scale, shift, out), rstd


class _Normalise(autograd.Function):
    """Training-mode normalisation with the analytic backward (MXNet's autograd of the
    forward's operations would take ~10 passes over x, with its slow broadcast reductions)."""

    def __init__(self, eps: float, has_gamma: bool, has_beta: bool) -> None:
        super().__init__()
        self.eps, self.has_gamma, self.has_beta = eps, has_gamma, has_beta

    def forward(self, x3, *affine_params):
        # Only the parameters given are inputs: MXNet misroutes gradients to inputs created
        # inside the recording (a ones vector standing in for gamma lost beta's gradient).
        params = iter(affine_params)
        gamma = next(params) if self.has_gamma else None
        beta = next(params) if self.has_beta else None
        y, self.mean, self.var, self.saved = train_forward(x3, gamma, beta, self.eps)
        return y

    def backward(self, dy3):
        dx, dgamma, dbeta = train_backward(dy3, self.saved)
        return (dx, *([dgamma] if self.has_gamma else []), *([dbeta] if self.has_beta else []))


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
        if autograd.is_recording():
            function = _Normalise(args.eps, gamma is not None, beta is not None)
            y = function(x3, *(wide(p) for p in (gamma, beta) if p is not None))
            mean, var = function.mean, function.var
        else:
            y, mean, var, _ = train_forward(x3, wide(gamma), wide(beta), args.eps)
    else:
        y, _ = inference_forward(x3, wide(gamma), wide(beta), wide(running_mean),
                                 wide(running_var), args.eps)
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
