"""Batch normalization in numpy: the oracle every other backend is compared with.

Training, per channel ``c`` over every axis but the channel axis (``n`` values each)::

    mean_c = sum(x) / n
    var_c  = sum((x - mean_c) ** 2) / n                    (biased, two-pass)
    y      = gamma_c * (x - mean_c) / sqrt(var_c + eps) + beta_c
    running_mean_c <- update(running_mean_c, mean_c)
    running_var_c  <- update(running_var_c, var_c * n / (n - 1) if unbiased else var_c)

where ``update`` and ``unbiased`` come from the convention (see :mod:`bnref.conventions`).
Inference uses the running statistics instead of the batch ones.

Numerics: statistics are accumulated in float32 for float16/bfloat16/float32 inputs and in
float64 for float64 inputs. The variance is never E[x²]−E[x]² (in float32 that returns negative
variances at offset 1e4): each cache-sized block is reduced two-pass and blocks are merged with
Chan, Golub & LeVeque's pairwise update, which keeps the two-pass accuracy while reading ``x``
from memory once. The output is then ``x * scale + shift`` per channel (``scale = gamma /
sqrt(var + eps)``, ``shift = beta - mean * scale``): the same rounding order of magnitude as
``(x - mean) * scale + beta`` (both lose ``u * |mean| * scale``), one pass fewer.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from bnref._checks import BatchNormArgs, check_batch_norm_args, check_like
from bnref.conventions import DEFAULT, Convention

__all__ = ["batch_norm", "batch_norm_backward"]

ARRAY_TYPE = "numpy.ndarray"
_BLOCK_BYTES = 1 << 20  # a block of work stays in cache between the passes over it
_MAX_RUN = 1 << 14  # the most values of one channel a block sums in one loop


def _inspect(value: Any) -> tuple[tuple[int, ...], str] | None:
    return (value.shape, value.dtype.name) if isinstance(value, np.ndarray) else None


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """float64 stays float64; float16/bfloat16/float32 are computed in float32."""
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def _as_3d(x: np.ndarray, axis: int) -> np.ndarray:
    """View ``x`` as (outer, C, inner): the channel axis in the middle, the rest flattened."""
    outer = int(np.prod(x.shape[:axis], dtype=np.int64))
    inner = int(np.prod(x.shape[axis + 1:], dtype=np.int64))
    return np.ascontiguousarray(x).reshape(outer, x.shape[axis], inner)


def _blocks(shape3: tuple[int, int, int], itemsize: int) -> Iterator[tuple[slice, slice, slice]]:
    """Split (outer, C, inner) into contiguous blocks of about _BLOCK_BYTES.

    Whole rows when they fit; else runs of whole channels of one row; else pieces of one
    channel. Contiguous blocks keep numpy's inner loops on their fast, unit-stride paths, and
    no block sums more than _MAX_RUN values of one channel in a single einsum loop.
    """
    outer, channels, inner = shape3
    everything = slice(None)
    if inner <= _MAX_RUN and channels * inner * itemsize <= _BLOCK_BYTES:
        rows = max(1, min(_BLOCK_BYTES // (channels * inner * itemsize), _MAX_RUN // inner))
        for start in range(0, outer, rows):
            yield slice(start, start + rows), everything, everything
    elif inner <= _MAX_RUN:
        run = max(1, _BLOCK_BYTES // (inner * itemsize))
        for row in range(outer):
            for start in range(0, channels, run):
                yield slice(row, row + 1), slice(start, start + run), everything
    else:
        for row in range(outer):
            for channel in range(channels):
                for start in range(0, inner, _MAX_RUN):
                    yield slice(row, row + 1), slice(channel, channel + 1), slice(
                        start, start + _MAX_RUN)


def _channel_sums(block: np.ndarray, other: np.ndarray | None = None) -> np.ndarray:
    """Per-channel sum of ``block`` (or of ``block * other``) over its rows and inner axis.

    einsum's summation loop is several times faster than ``ndarray.sum`` here but adds
    sequentially (in SIMD lanes) rather than pairwise, so blocks cap each channel's run at
    _MAX_RUN values; Chan's update merges the blocks.
    """
    rows, channels, inner = block.shape
    if inner == 1:
        flat = block.reshape(rows, channels)
        return (np.einsum("rc->c", flat) if other is None
                else np.einsum("rc,rc->c", flat, other.reshape(rows, channels)))
    flat = block.reshape(rows * channels, inner)
    per_row = (np.einsum("ri->r", flat) if other is None
               else np.einsum("ri,ri->r", flat, other.reshape(rows * channels, inner)))
    return per_row.reshape(rows, channels).sum(axis=0)


def channel_moments(x3: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance of (outer, C, inner) data, in ``dtype``.

    Each block is reduced two-pass (mean, then the sum of squared deviations from it) while
    it sits in cache; blocks are merged with Chan, Golub & LeVeque's pairwise update.
    """
    channels = x3.shape[1]
    mean = np.zeros(channels, dtype)
    m2 = np.zeros(channels, dtype)
    seen = np.zeros(channels, dtype)
    scratch = np.empty(min(x3.size, _BLOCK_BYTES // dtype.itemsize), dtype)
    for rows, chans, cols in _blocks(x3.shape, dtype.itemsize):
        block = x3[rows, chans, cols]
        work = scratch[: block.size].reshape(block.shape)
        np.copyto(work, block)  # float16/bfloat16 widen to float32 here
        count = block.shape[0] * block.shape[2]
        block_mean = _channel_sums(work) / dtype.type(count)
        # In place: numpy's in-place broadcast subtract is ~2x its out-of-place one.
        np.subtract(work, block_mean[None, :, None], out=work)
        block_m2 = _channel_sums(work, work)
        # Chan et al.: merge (seen, mean, m2) with (count, block_mean, block_m2).
        before = seen[chans]
        total = before + count
        delta = block_mean - mean[chans]
        mean[chans] += delta * (count / total)
        m2[chans] += block_m2 + delta * delta * (before * (count / total))
        seen[chans] = total
    return mean, m2 / seen


def _normalize(x3: np.ndarray, scale: np.ndarray, shift: np.ndarray, out3: np.ndarray) -> None:
    """out = x * scale + shift per channel, block by block (in the dtype of ``scale``)."""
    dtype = scale.dtype
    scratch = np.empty(min(x3.size, _BLOCK_BYTES // dtype.itemsize), dtype)
    for rows, chans, cols in _blocks(x3.shape, dtype.itemsize):
        block, target = x3[rows, chans, cols], out3[rows, chans, cols]
        # Work in place in the output when it has the compute dtype; else in a scratch block.
        work = target if target.dtype == dtype else scratch[: block.size].reshape(block.shape)
        # einsum's scaling loop, then an in-place broadcast add: the fastest per-channel
        # affine map numpy offers (out-of-place broadcast arithmetic is ~2x slower).
        np.einsum("rci,c->rci", block, scale[chans], out=work, dtype=dtype, casting="unsafe")
        np.add(work, shift[chans][None, :, None], out=work)
        if work is not target:
            target[...] = work


def _resolve(x, gamma, beta, running_mean, running_var, **kwargs) -> BatchNormArgs:
    return check_batch_norm_args(x, gamma, beta, running_mean, running_var, **kwargs,
                                 inspect=_inspect, array_type=ARRAY_TYPE)


def batch_norm(
    x: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    running_mean: np.ndarray | None,
    running_var: np.ndarray | None,
    *,
    training: bool,
    momentum: float = DEFAULT,  # type: ignore[assignment]
    eps: float | None = None,
    axis: int | None = None,
    convention: str | Convention = "torch",
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Batch-normalize ``x`` over every axis but the channel axis.

    ``y = gamma * (x - mean) / sqrt(var + eps) + beta`` with the biased batch statistics in
    training (or when no running statistics are given) and the running statistics in
    inference. Returns ``(y, new_running_mean, new_running_var)``; in training the running
    statistics move by the convention's rule (torch: ``(1 - m) * old + m * batch`` with the
    unbiased variance; keras/flax/mxnet/onnx: ``m * old + (1 - m) * batch`` with the biased
    one). ``momentum``, ``eps`` and ``axis`` default to the convention's. ``gamma``/``beta``
    may be ``None`` (scale 1, shift 0); running statistics both ``None`` means batch statistics
    in both modes and ``(y, None, None)`` back. Inputs are never modified; ``y`` has ``x``'s
    dtype and the running statistics keep theirs.
    """
    args = _resolve(x, gamma, beta, running_mean, running_var, training=training,
                    momentum=momentum, eps=eps, axis=axis, convention=convention)
    dtype = compute_dtype(x.dtype)
    x3 = _as_3d(x, args.axis)
    use_batch_stats = training or running_mean is None
    if use_batch_stats:
        mean, var = channel_moments(x3, dtype)
    else:
        mean, var = running_mean.astype(dtype), running_var.astype(dtype)

    # y = x * scale + shift with scale = gamma / sqrt(var + eps), shift = beta - mean * scale:
    # two passes over the data instead of three.
    scale = 1.0 / np.sqrt(var + dtype.type(args.eps))
    if gamma is not None:
        scale = scale * gamma.astype(dtype)
    shift = -mean * scale
    if beta is not None:
        shift = shift + beta.astype(dtype)
    y = np.empty(x.shape, x.dtype)
    # y's (outer, C, inner) view shares y's memory because y is fresh and contiguous.
    _normalize(x3, scale, shift, _as_3d(y, args.axis))

    if running_mean is None:
        return y, None, None
    if not training:
        return y, running_mean.copy(), running_var.copy()
    conv, momentum_value = args.convention, dtype.type(args.momentum)
    new_mean = conv.update_running(running_mean.astype(dtype), mean, momentum_value)
    new_var = conv.update_running(running_var.astype(dtype),
                                  conv.running_var_estimate(var, args.count), momentum_value)
    return y, new_mean.astype(running_mean.dtype), new_var.astype(running_var.dtype)


def batch_norm_backward(
    dy: np.ndarray,
    x: np.ndarray,
    gamma: np.ndarray | None,
    *,
    eps: float | None = None,
    axis: int | None = None,
    beta: Any = DEFAULT,
    convention: str | Convention = "torch",
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Analytic gradient of training-mode ``batch_norm`` (batch statistics).

    With ``xhat = (x - mean) / sqrt(var + eps)`` and ``n`` values per channel::

        dbeta  = sum(dy)
        dgamma = sum(dy * xhat)
        dx     = gamma / sqrt(var + eps) * (dy - dbeta / n - xhat * dgamma / n)

    the sums running over every axis but the channel axis. ``dgamma`` is ``None`` when
    ``gamma`` is; ``dbeta`` is ``None`` when ``beta=None`` is passed, or when ``beta`` is
    omitted and ``gamma`` is ``None`` (no affine transform). ``eps``/``axis`` default to the
    convention's. ``dx`` has ``x``'s dtype; ``dgamma``/``dbeta`` have ``gamma``'s (else the
    compute dtype).
    """
    args = _resolve(x, gamma, None, None, None, training=True, momentum=DEFAULT, eps=eps,
                    axis=axis, convention=convention)
    check_like("dy", dy, x.shape, inspect=_inspect, array_type=ARRAY_TYPE)
    has_beta = gamma is not None if beta is DEFAULT else beta is not None
    dtype = compute_dtype(x.dtype)
    param_dtype = dtype if gamma is None else gamma.dtype
    x3, dy3 = _as_3d(x, args.axis).astype(dtype), _as_3d(dy, args.axis).astype(dtype)
    mean, var = channel_moments(x3, dtype)
    inv_std = (1.0 / np.sqrt(var + dtype.type(args.eps)))[None, :, None]
    x_hat = (x3 - mean[None, :, None]) * inv_std
    dbeta = dy3.sum(axis=(0, 2))
    dgamma = (dy3 * x_hat).sum(axis=(0, 2))
    scale = inv_std if gamma is None else gamma.astype(dtype)[None, :, None] * inv_std
    n = dtype.type(args.count)
    dx3 = scale * (dy3 - (dbeta / n)[None, :, None] - x_hat * (dgamma / n)[None, :, None])
    return (
        dx3.reshape(x.shape).astype(x.dtype),
        None if gamma is None else dgamma.astype(param_dtype),
        dbeta.astype(param_dtype) if has_beta else None,
    )

