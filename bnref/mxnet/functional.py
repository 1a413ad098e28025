"""Batch normalization in MXNet from ``mx.nd`` operations (not the ``BatchNorm`` operator).

``x`` is viewed as ``(before, C, after)``, the channel axis in the middle; per channel, over
the ``n = before * after`` values::

    mean = sum(x) / n
    var  = sum((x - mean)²) / n                (biased, two-pass)
    y    = (x - mean) * scale + beta           scale = gamma / sqrt(var + eps)
    running <- convention.update_running(running, batch statistic)

MXNet's reductions over an axis and its broadcasts run far below memory speed, so each
full-size step is the operator that runs fastest for it. Measured on (64, 64, 56, 56) float32,
2 cores, in units of one copy of the array (best of 15): oneDNN inner product with a vector of
ones (a row sum) 0.5; depthwise 1x1 convolution (a per-channel multiply-add) 1.9-2.0; global
L2 pooling (row sums of squares) 1.6-1.7; batched 8x8 Gram blocks (row dot products) 2.2-2.5;
``elemwise_mul``/``elemwise_add`` 2.0-2.8; ``linalg.gemm`` of 2x2 diagonal blocks adding into
its output 1.8; ``broadcast_mul`` + ``broadcast_add`` 7-8; ``sum`` over an axis 9-12.

So with long rows (float32, ``after >= 64``) a training forward is 4 operators and 6 passes
over the data: row sums (read x), ``x - mean`` (read x, write it), its L2 pooling (read it), the
affine convolution (read it, write y). The backward is 4 operators and 8 passes: row sums of dy,
Gram blocks of dy and ``x - mean``, ``dx = slope * (x - mean) + shift`` by convolution, and
``dx += scale * dy`` by the in-place block product. With short rows (where the convolution
crawls: ~400 copies at ``after = 1``) or float64 (which oneDNN lacks), sums are BLAS products
with vectors of ones over ``before`` then ``after``, and multiply-adds broadcasts. Vectors of
ones and other constants are made once per shape, dtype and context. Inference uses the
running statistics: one multiply-add. float16 is computed in float32, float64 in float64.
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

# From this many values per (before, channel) row on, float32 takes the oneDNN path (inner
# products, L2 pooling, depthwise convolutions); below it the convolution is slow (with
# after = 1 it takes ~400 copies of the array) and BLAS products and broadcasts are used.
LONG_ROWS = 64
# Rows per block in the batched products of :func:`channel_dots`.
_BLOCK = 8


def _inspect(value: Any) -> tuple[tuple[int, ...], str] | None:
    if not isinstance(value, nd.NDArray):
        return None
    return tuple(value.shape), np.dtype(value.dtype).name


def compute_dtype(dtype: Any) -> str:
    return "float64" if np.dtype(dtype) == np.float64 else "float32"


# -- constants, made once ---------------------------------------------------------------------

_CONSTANTS: dict[tuple, nd.NDArray] = {}


def _cached(key: tuple, make) -> nd.NDArray:
    array = _CONSTANTS.get(key)
    if array is None:
        if len(_CONSTANTS) > 512:  # many distinct shapes: start afresh rather than grow
            _CONSTANTS.clear()
        array = _CONSTANTS[key] = make()
    return array


def constant(value: float, shape: tuple[int, ...], dtype: Any, ctx: Any) -> nd.NDArray:
    """A read-only array filled with ``value``, made once per (value, shape, dtype, context):
    creating one is an operator call (and for :func:`nd.array` a blocking copy from the host)
    that would otherwise run on every step. Never write into the result."""
    dtype = np.dtype(dtype).name
    # From the host: MXNet refuses subnormal scalars as operator parameters.
    return _cached(("full", value, shape, dtype, str(ctx)),
                   lambda: nd.array(np.full(shape, value), ctx=ctx, dtype=dtype))


def _ones(shape: tuple[int, ...], like: nd.NDArray) -> nd.NDArray:
    return constant(1.0, shape, like.dtype, like.context)


def _eye(size: int, like: nd.NDArray) -> nd.NDArray:
    dtype = np.dtype(like.dtype).name
    return _cached(("eye", size, dtype, str(like.context)),
                   lambda: nd.array(np.eye(size)[None], ctx=like.context, dtype=dtype))


def running_weights(conv: Convention, momentum: float, dtype: Any, ctx: Any
                    ) -> tuple[nd.NDArray, nd.NDArray]:
    """``(w_old, w_new)`` with ``conv.update_running(old, new, m) == w_old * old + w_new *
    new``, made once per convention rule, momentum, dtype and context by the convention's own
    formula (``w_old = update_running(1, 0, m)``: exact, the terms being products with 1 and 0).
    ``w_old * old + w_new * new`` then takes the same operations as the formula itself."""
    m = constant(momentum, (1,), dtype, ctx)
    return _cached(("weights", conv.name, conv.momentum_weights, momentum, np.dtype(dtype).name,
                    str(ctx)),
                   lambda: (conv.update_running(1.0, 0.0, m), conv.update_running(0.0, 1.0, m)))


def update_running_into(running: nd.NDArray, batch: nd.NDArray,
                        weights: tuple[nd.NDArray, nd.NDArray]) -> None:
    """``running <- w_old * running + w_new * batch`` in place (:func:`running_weights`)."""
    nd.broadcast_add(nd.broadcast_mul(weights[0], running), nd.broadcast_mul(weights[1], batch),
                     out=running)


def _long(x3: nd.NDArray) -> bool:
    """Whether ``x3`` takes the oneDNN path (float32, long rows)."""
    return x3.dtype == np.float32 and x3.shape[2] >= LONG_ROWS


# -- the (before, C, after) view --------------------------------------------------------------


def to_view(F, x, axis: int):
    """``x`` as ``(before, C, after)``: the axes before the channel axis merged, the channel
    axis, the axes after it merged. An NDArray gets a view (``NDArray.reshape``; the reshape
    *operator* would copy). Symbols of unknown shape get reshape codes (0 copies a dimension,
    -3 merges two, -1 infers)."""
    if isinstance(x, nd.NDArray):
        return x.reshape(view_shape(x.shape, axis))
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


def view_shape(shape: tuple[int, ...], axis: int) -> tuple[int, int, int]:
    axis = axis % len(shape)
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])


# -- per-channel reductions and multiply-adds -------------------------------------------------


def _over_before(rows: nd.NDArray, before: int, channels: int,
                 out: nd.NDArray | None = None) -> nd.NDArray:
    """``(before * C)`` per-row values summed over ``before``: a new ``(C,)`` (or ``out``)."""
    sums = nd.dot(_ones((1, before), rows), rows.reshape((before, channels)),
                  out=None if out is None else out.reshape((1, channels)))
    return sums.reshape((channels,))


def channel_sums(x3: nd.NDArray, out: nd.NDArray | None = None) -> nd.NDArray:
    """Per-channel sums of a ``(before, C, after)`` view (written into ``out`` if given). Long
    rows: one oneDNN inner product per row with a vector of ones (reads ``x3`` once at memory
    speed), then a small product over ``before``. Short rows: a BLAS product with ones over
    ``before`` first (MXNet's ``sum`` over axes runs at a fraction of memory speed), then over
    ``after``."""
    before, channels, after = x3.shape
    if _long(x3):
        rows = nd.FullyConnected(x3.reshape((before * channels, after)), _ones((1, after), x3),
                                 no_bias=True, num_hidden=1, flatten=False)
        return _over_before(rows, before, channels, out)
    if after == 1:
        return _over_before(x3, before, channels, out)
    flat = x3.reshape((before, channels * after))
    sums = flat if before == 1 else nd.dot(_ones((1, before), x3), flat)
    return nd.dot(sums.reshape((channels, after)), _ones((after, 1), x3),
                  out=None if out is None else out.reshape((channels, 1))).reshape((channels,))


def channel_sums_of_squares(x3: nd.NDArray, work: nd.NDArray | None = None) -> nd.NDArray:
    """Per-channel sums of ``x3²``. Long rows: a global L2 pooling per row (reads ``x3`` once,
    writes nothing of its size), squared back, then summed over ``before``. Otherwise the
    squares are written (into ``work`` if given) and summed."""
    before, channels, after = x3.shape
    if _long(x3):
        norms = nd.Pooling(x3.reshape((before, channels, 1, after)), kernel=(1, 1),
                           pool_type="lp", p_value=2, global_pool=True)
        return _over_before(nd.square(norms), before, channels)
    return channel_sums(nd.square(x3, out=work))


def channel_dots(a3: nd.NDArray, b3: nd.NDArray, work: nd.NDArray | None = None) -> nd.NDArray:
    """Per-channel sums of ``a3 * b3``. Long rows, in blocks of 8: a batched product of each
    block of 8 rows of ``a3`` with the same 8 of ``b3``, whose diagonals are the row dot
    products (reads both once, writes nothing of their size: 2.2-2.5 copies' time, against
    2.5-3 for writing the product and summing it, and 4 for a batched product per row).
    Otherwise the product is written
    (into ``work`` if given) and summed as :func:`channel_sums` does."""
    before, channels, after = a3.shape
    rows = before * channels
    if _long(a3) and rows % _BLOCK == 0:
        blocks = (rows // _BLOCK, _BLOCK, after)
        grams = nd.batch_dot(a3.reshape(blocks), b3.reshape(blocks), transpose_b=True)
        return _over_before(nd.diag(grams, axis1=1, axis2=2), before, channels)
    return channel_sums(nd.elemwise_mul(a3, b3, out=work))


def affine(x3: nd.NDArray, scale: nd.NDArray, shift: nd.NDArray | None,
           out: nd.NDArray | None = None) -> nd.NDArray:
    """``x3 * scale + shift`` per channel, written into ``out`` if given. Long rows: one
    depthwise 1x1 convolution (oneDNN), one pass. Otherwise ``broadcast_mul`` then an in-place
    ``broadcast_add``."""
    _, channels, _ = x3.shape
    if _long(x3):
        if out is None:
            # Left to itself the convolution writes oneDNN's blocked layout, which every
            # later reader but a convolution first converts back (measured: twice the time).
            out = nd.empty(x3.shape, ctx=x3.context, dtype=x3.dtype)
        return nd.Convolution(x3, scale.reshape((channels, 1, 1)), shift, kernel=(1,),
                              num_filter=channels, num_group=channels, no_bias=shift is None,
                              out=out)
    y = nd.broadcast_mul(x3, scale.reshape((1, channels, 1)), out=out)
    if shift is None:
        return y
    return nd.broadcast_add(y, shift.reshape((1, channels, 1)), out=y)


def add_scaled(x3: nd.NDArray, scale: nd.NDArray, out: nd.NDArray) -> nd.NDArray | None:
    """``out += x3 * scale`` per channel in one pass, or ``None`` (and ``out`` untouched)
    where this has no fast form. Long rows: ``out`` and ``x3`` in blocks of 2 rows,
    ``out_block = diag(scale of its 2 rows) @ x3_block + out_block``, a batched BLAS product
    that adds into ``out`` in place (measured: the time of one convolution, where a second
    convolution and an ``elemwise_add`` take 2.3 times as long)."""
    before, channels, after = x3.shape
    rows = before * channels
    if not _long(x3) or rows % 2:
        return None
    diagonals = nd.broadcast_mul(_eye(2, x3), nd.tile(scale, reps=(before,)).reshape((-1, 2, 1)))
    blocks = (rows // 2, 2, after)
    nd.linalg.gemm(diagonals, x3.reshape(blocks), out.reshape(blocks), alpha=1.0, beta=1.0,
                   out=out.reshape(blocks))
    return out


def center(x3: nd.NDArray, mean: nd.NDArray) -> nd.NDArray:
    """``x3 - mean`` per channel, as a new array (one pass)."""
    _, channels, _ = x3.shape
    if _long(x3):
        return affine(x3, _ones((channels,), x3), -mean)
    return nd.broadcast_sub(x3, mean.reshape((1, channels, 1)))


# -- training and inference -------------------------------------------------------------------


@dataclass
class Saved:
    """What the analytic backward needs from a training forward."""

    centered: nd.NDArray  # x - mean, on the (before, C, after) view
    rstd: nd.NDArray  # 1 / sqrt(var + eps)
    scale: nd.NDArray  # gamma * rstd (rstd without gamma)


def train_forward(x3, gamma, beta, eps: float, out: nd.NDArray | None = None):
    """``(y, mean, biased var, saved)`` with the batch statistics, two-pass: the mean, then
    ``x - mean`` (kept for the backward) and its sum of squares. ``y`` is written into ``out``
    if given. Four passes over the data: read, read and write ``x - mean``, read it, read it
    and write ``y``."""
    count = x3.shape[0] * x3.shape[2]
    mean = channel_sums(x3) / count
    centered = center(x3, mean)
    var = channel_sums_of_squares(centered, work=out) / count
    rstd = nd.rsqrt(var + eps)
    scale = rstd if gamma is None else rstd * gamma
    return affine(centered, scale, beta, out), mean, var, Saved(centered, rstd, scale)


def train_backward(dy3, saved: Saved, out: nd.NDArray | None = None, need_dx: bool = True,
                   grads: tuple[nd.NDArray | None, nd.NDArray | None] = (None, None)):
    """``(dx, dgamma, dbeta)`` of a training forward, analytically::

        dbeta  = sum(dy)            dgamma = sum(dy * x_hat)      x_hat = (x - mean) * rstd
        dx     = scale * (dy - dbeta / n - x_hat * dgamma / n)

    ``dx`` (``None`` without ``need_dx``) is written into ``out`` if given, which also serves
    as the work buffer of ``dy * (x - mean)``: ``out`` must not hold ``dy``. ``dgamma`` and
    ``dbeta`` are written into ``grads`` where given."""
    count = dy3.shape[0] * dy3.shape[2]
    dbeta = channel_sums(dy3, out=grads[1])
    dgamma = nd.elemwise_mul(channel_dots(dy3, saved.centered, work=out), saved.rstd,
                             out=grads[0])
    if not need_dx:
        return None, dgamma, dbeta
    per_value = saved.scale * (-1.0 / count)
    shift, slope = per_value * dbeta, per_value * saved.rstd * dgamma
    # dx = scale * dy + slope * (x - mean) + shift: one convolution and an in-place product
    # where that runs; else two multiply-adds and a sum.
    dx = affine(saved.centered, slope, shift, out)
    if add_scaled(dy3, saved.scale, dx) is None:
        dx = nd.elemwise_add(dx, affine(dy3, saved.scale, None), out=dx)
    return dx, dgamma, dbeta


def inference_forward(x3, gamma, beta, mean, var, eps: float, out: nd.NDArray | None = None):
    """``(y, rstd)``: ``(x - mean) * gamma * rstd + beta`` as one per-channel multiply-add."""
    rstd = nd.rsqrt(var + eps)
    scale = rstd if gamma is None else rstd * gamma
    shift = -mean * scale if beta is None else beta - mean * scale
    return affine(x3, scale, shift, out), rstd


class _Normalise(autograd.Function):
    """Training-mode normalisation with the analytic backward (MXNet's autograd of the
    forward's operations would take ~10 passes over x, with its slow broadcast reductions).
    It takes ``x`` as it is and views it inside, where nothing is recorded: a reshape recorded
    around it would copy the whole gradient in backward, once on each side."""

    def __init__(self, axis: int, eps: float, has_gamma: bool, has_beta: bool) -> None:
        super().__init__()
        self.axis, self.eps, self.has_gamma, self.has_beta = axis, eps, has_gamma, has_beta

    def forward(self, x, *affine_params):
        # Only the parameters given are inputs: MXNet misroutes gradients to inputs created
        # inside the recording (a ones vector standing in for gamma lost beta's gradient).
        params = iter(affine_params)
        gamma = next(params) if self.has_gamma else None
        beta = next(params) if self.has_beta else None
        x3 = to_view(nd, x, self.axis)
        y3, self.mean, self.var, self.saved = train_forward(x3, gamma, beta, self.eps)
        return y3.reshape(x.shape)

    def backward(self, dy):
        dy3 = dy.reshape(self.saved.centered.shape)
        dx3, dgamma, dbeta = train_backward(dy3, self.saved)
        return (dx3.reshape(dy.shape), *([dgamma] if self.has_gamma else []),
                *([dbeta] if self.has_beta else []))


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
    wide_x = x.astype(dtype, copy=False)

    def wide(v):
        return None if v is None else v.astype(dtype, copy=False)

    if training or running_mean is None:
        if autograd.is_recording():
            function = _Normalise(args.axis, args.eps, gamma is not None, beta is not None)
            y = function(wide_x, *(wide(p) for p in (gamma, beta) if p is not None))
            mean, var = function.mean, function.var
        else:
            y3, mean, var, _ = train_forward(to_view(nd, wide_x, args.axis), wide(gamma),
                                             wide(beta), args.eps)
            y = y3.reshape(x.shape)
    else:
        y3, _ = inference_forward(to_view(nd, wide_x, args.axis), wide(gamma), wide(beta),
                                  wide(running_mean), wide(running_var), args.eps)
        y = y3.reshape(x.shape)
    y = y.astype(x.dtype, copy=False)
    if running_mean is None or not training:
        return y, running_mean, running_var
    conv, m = args.convention, constant(args.momentum, (1,), dtype, x.context)
    mean, var = mean.detach(), var.detach()
    new_mean = conv.update_running(wide(running_mean), mean, m)
    new_var = conv.update_running(wide(running_var), conv.running_var_estimate(var, args.count),
                                  m)
    return (y, new_mean.astype(running_mean.dtype, copy=False),
            new_var.astype(running_var.dtype, copy=False))
