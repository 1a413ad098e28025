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


def _channel_sums(block: np.ndarray, other: np.ndarray | None = None,
                  dtype: np.dtype | None = None) -> np.ndarray:
    """Per-channel sum of ``block`` (or of ``block * other``) over its rows and inner axis,
    accumulated in ``dtype`` (default: the block's).

    einsum's summation loop is several times faster than ``ndarray.sum`` here but adds
    sequentially (in SIMD lanes) rather than pairwise, so blocks cap each channel's run at
    _MAX_RUN values; Chan's update merges the blocks.
    """
    rows, channels, inner = block.shape
    if inner == 1:
        flat = block.reshape(rows, channels)
        return (np.einsum("rc->c", flat, dtype=dtype) if other is None
                else np.einsum("rc,rc->c", flat, other.reshape(rows, channels), dtype=dtype))
    flat = block.reshape(rows * channels, inner)
    per_row = (np.einsum("ri->r", flat, dtype=dtype) if other is None
               else np.einsum("ri,ri->r", flat, other.reshape(rows * channels, inner),
                              dtype=dtype))
    return per_row.reshape(rows, channels).sum(axis=0)


def _widened(block: np.ndarray, scratch: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``block`` itself when it has the compute dtype, else a copy in ``scratch`` (float16 and
    bfloat16 widen to float32 exactly; numpy's mixed-dtype loops would cast on every op)."""
    if block.dtype == dtype:
        return block
    work = scratch[: block.size].reshape(block.shape)
    np.copyto(work, block, casting="unsafe")
    return work


def channel_moments(x3: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance of (outer, C, inner) data, both in float64.

    ``dtype`` is the compute dtype the blocks are centred in. Each block is reduced two-pass
    (mean, then the sum of squared deviations from it) while it sits in cache; blocks are
    merged with Chan, Golub & LeVeque's pairwise update, in float64.

    The block mean is exact enough that a constant channel gets its value back exactly:

    * float32 blocks (float16/bfloat16 widened) are summed in float64. A block sums at most
      _MAX_RUN = 2^14 values of a channel, so n equal float32 values sum exactly (24 + 14 bits
      < 53) and the division returns the value itself.
    * float64 blocks have no wider type. Their mean ``m`` is corrected by the mean of the
      residuals ``x - m``: those are exact (Sterbenz) and, on a constant channel, n copies of
      one small multiple of ulp(m) whose sum is exact too, so ``m + sum(x - m) / n`` is the
      value exactly. Elsewhere the correction is the classic corrected two-pass algorithm.

    Either way the block's sum of squares is taken about the mean rounded to ``dtype``
    (``hi``), where ``x - hi`` is exact for values near the mean, and moved to the exact mean
    with ``m2 = sum((x - hi)²) - count * (mean - hi)²``.
    """
    acc = np.dtype(np.float64)
    channels = x3.shape[1]
    mean = np.zeros(channels, acc)
    m2 = np.zeros(channels, acc)
    seen = np.zeros(channels, acc)
    scratch = np.empty(min(x3.size, _BLOCK_BYTES // dtype.itemsize), dtype)
    for rows, chans, cols in _blocks(x3.shape, dtype.itemsize):
        block = _widened(x3[rows, chans, cols], scratch, dtype)
        work = scratch[: block.size].reshape(block.shape)
        count = block.shape[0] * block.shape[2]
        block_mean = _channel_sums(block, dtype=acc) / count
        hi = block_mean.astype(dtype)
        # Out of place when block is x itself; in place (~2x faster) when it is the scratch.
        np.subtract(block, hi[None, :, None], out=work)
        if dtype == acc:
            residual = _channel_sums(work) / count
            block_mean = hi + residual
        else:
            residual = block_mean - hi  # exact: both are float64 and within an ulp of hi
        # Squares round once each (a relative error, never a cancellation); their sum is
        # accumulated in float64, so the variance does not lose accuracy to the run length.
        np.multiply(work, work, out=work)
        block_m2 = _channel_sums(work, dtype=acc) - count * (residual * residual)
        # Chan et al.: merge (seen, mean, m2) with (count, block_mean, block_m2).
        before = seen[chans]
        total = before + count
        delta = block_mean - mean[chans]
        mean[chans] += delta * (count / total)
        m2[chans] += block_m2 + delta * delta * (before * (count / total))
        seen[chans] = total
    # Rounding can leave a constant channel's m2 a hair below 0; the variance is not.
    return mean, np.maximum(m2 / seen, 0.0)


def _split(value: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """``value`` (float64) as ``hi + lo`` in ``dtype``: ``hi`` its rounding, ``lo`` the rest
    (0 when ``dtype`` is float64). Subtracting ``hi`` from ``x`` is exact near the mean."""
    hi = value.astype(dtype)
    return hi, (value - hi).astype(dtype)


def _per_channel(values: np.ndarray) -> np.ndarray:
    return values[None, :, None]


def _normalize(x3: np.ndarray, mean: np.ndarray, scale: np.ndarray, shift: np.ndarray,
               out3: np.ndarray) -> None:
    """out = (x - mean) * scale + shift per channel, block by block (in the dtype of
    ``scale``).

    With ``mean`` the batch mean rounded to the compute dtype, ``x - mean`` is exact for
    values near it (0 on a constant channel, whose ``y`` is then ``shift = beta`` exactly)
    and the product only rounds relative to ``|x - mean| * scale``: ``x * scale + shift``
    would lose ``u * |mean| * scale`` to cancellation at large offsets.
    """
    dtype = scale.dtype
    mean3, scale3, shift3 = _per_channel(mean), _per_channel(scale), _per_channel(shift)
    scratch = np.empty(min(x3.size, _BLOCK_BYTES // dtype.itemsize), dtype)
    for rows, chans, cols in _blocks(x3.shape, dtype.itemsize):
        block, target = x3[rows, chans, cols], out3[rows, chans, cols]
        # Work in place in the output when it has the compute dtype; else in a scratch block.
        work = target if target.dtype == dtype else scratch[: block.size].reshape(block.shape)
        if block.dtype != dtype:
            np.copyto(work, block, casting="unsafe")  # float16/bfloat16 widen exactly
            block = work
        # One out-of-place op at most, then in-place ones (numpy's in-place broadcast
        # arithmetic is ~2x faster than its out-of-place one).
        np.subtract(block, mean3[:, chans], out=work)
        np.multiply(work, scale3[:, chans], out=work)
        np.add(work, shift3[:, chans], out=work)
        if work is not target:
            target[...] = work


def _resolve(x, gamma, beta, running_mean, running_var, **kwargs) -> BatchNormArgs:
    return check_batch_norm_args(x, gamma, beta, running_mean, running_var, **kwargs,
                                 inspect=_inspect, array_type=ARRAY_TYPE, allow_empty=True)


def _float64(value: np.ndarray | None, default: float, channels: int) -> np.ndarray:
    return np.full(channels, default) if value is None else value.astype(np.float64)


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
    dtype and the running statistics keep theirs. An empty ``x`` (a zero batch or spatial
    size) gives an empty ``y`` and the running statistics unchanged, as in
    ``torch.nn.BatchNorm*d``.
    """
    args = _resolve(x, gamma, beta, running_mean, running_var, training=training,
                    momentum=momentum, eps=eps, axis=axis, convention=convention)
    y = np.empty(x.shape, x.dtype)
    if args.count == 0:  # no value to take statistics of, none to normalise
        if running_mean is None:
            return y, None, None
        return y, running_mean.copy(), running_var.copy()
    dtype = compute_dtype(x.dtype)
    x3 = _as_3d(x, args.axis)
    channels = x3.shape[1]
    use_batch_stats = training or running_mean is None
    if use_batch_stats:
        mean, var = channel_moments(x3, dtype)
    else:
        mean, var = running_mean.astype(np.float64), running_var.astype(np.float64)

    # y = (x - hi) * scale + (beta - lo * scale), with mean = hi + lo split at the compute
    # dtype: x - hi is exact near the mean, so a constant channel gives beta exactly and a
    # large offset costs nothing. The per-channel constants are computed in float64 and
    # rounded once.
    hi, lo = _split(mean, dtype)
    scale = _float64(gamma, 1.0, channels) / np.sqrt(var + args.eps)
    shift = _float64(beta, 0.0, channels) - lo * scale
    # y's (outer, C, inner) view shares y's memory because y is fresh and contiguous.
    _normalize(x3, hi, scale.astype(dtype), shift.astype(dtype), _as_3d(y, args.axis))

    if running_mean is None:
        return y, None, None
    if not training:
        return y, running_mean.copy(), running_var.copy()
    # The recurrence in float64, rounded once to the running statistics' dtype.
    conv, momentum_value = args.convention, np.float64(args.momentum)
    new_mean = conv.update_running(running_mean.astype(np.float64), mean, momentum_value)
    new_var = conv.update_running(running_var.astype(np.float64),
                                  conv.running_var_estimate(var, args.count), momentum_value)
    return y, new_mean.astype(running_mean.dtype), new_var.astype(running_var.dtype)


def _gradient_sums(x3: np.ndarray, dy3: np.ndarray, hi: np.ndarray,
                   dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``sum(dy)`` and ``sum(dy * (x - hi))`` in float64, block by block.

    ``x - hi`` is exact near the mean; the products round once in ``dtype`` (an error
    relative to each term, which averages out) and the sums are accumulated in float64, so
    neither sum loses accuracy to the number of terms or to the offset of ``x``.
    """
    acc = np.dtype(np.float64)
    channels = x3.shape[1]
    dy_sum, dy_x_sum = np.zeros(channels, acc), np.zeros(channels, acc)
    hi3 = _per_channel(hi)
    size = min(x3.size, _BLOCK_BYTES // dtype.itemsize)
    work, dy_scratch = np.empty(size, dtype), np.empty(size, dtype)
    for rows, chans, cols in _blocks(x3.shape, dtype.itemsize):
        block = x3[rows, chans, cols]
        centred = work[: block.size].reshape(block.shape)
        if block.dtype != dtype:
            np.copyto(centred, block, casting="unsafe")
            block = centred
        np.subtract(block, hi3[:, chans], out=centred)
        dy_block = _widened(dy3[rows, chans, cols], dy_scratch, dtype)
        dy_sum[chans] += _channel_sums(dy_block, dtype=acc)
        np.multiply(centred, dy_block, out=centred)
        dy_x_sum[chans] += _channel_sums(centred, dtype=acc)
    return dy_sum, dy_x_sum


def _input_gradient(x3: np.ndarray, dy3: np.ndarray, hi: np.ndarray, dy_scale: np.ndarray,
                    x_scale: np.ndarray, shift: np.ndarray, out3: np.ndarray) -> None:
    """out = dy * dy_scale + (x - hi) * x_scale + shift per channel, block by block (in the
    dtype of ``dy_scale``)."""
    dtype = dy_scale.dtype
    hi3, dy_scale3 = _per_channel(hi), _per_channel(dy_scale)
    x_scale3, shift3 = _per_channel(x_scale), _per_channel(shift)
    size = min(x3.size, _BLOCK_BYTES // dtype.itemsize)
    scratch, dy_scratch = np.empty(size, dtype), np.empty(size, dtype)
    for rows, chans, cols in _blocks(x3.shape, dtype.itemsize):
        block, target = x3[rows, chans, cols], out3[rows, chans, cols]
        work = target if target.dtype == dtype else scratch[: block.size].reshape(block.shape)
        if block.dtype != dtype:
            np.copyto(work, block, casting="unsafe")
            block = work
        np.subtract(block, hi3[:, chans], out=work)
        np.multiply(work, x_scale3[:, chans], out=work)
        np.add(work, shift3[:, chans], out=work)
        dy_block = dy3[rows, chans, cols]
        scaled_dy = dy_scratch[: block.size].reshape(block.shape)
        np.multiply(dy_block, dy_scale3[:, chans], out=scaled_dy, casting="unsafe")
        np.add(work, scaled_dy, out=work)
        if work is not target:
            target[...] = work


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
    compute dtype). An empty ``x`` gives an empty ``dx`` and zero ``dgamma``/``dbeta``.
    """
    args = _resolve(x, gamma, None, None, None, training=True, momentum=DEFAULT, eps=eps,
                    axis=axis, convention=convention)
    check_like("dy", dy, x.shape, inspect=_inspect, array_type=ARRAY_TYPE)
    has_beta = gamma is not None if beta is DEFAULT else beta is not None
    dtype = compute_dtype(x.dtype)
    param_dtype = dtype if gamma is None else gamma.dtype
    dx = np.empty(x.shape, x.dtype)
    x3, dy3 = _as_3d(x, args.axis), _as_3d(dy, args.axis)
    channels = x3.shape[1]
    if args.count == 0:  # nothing flows back; the parameters' sums are empty sums
        dgamma = dbeta = np.zeros(channels, np.float64)
    else:
        mean, var = channel_moments(x3, dtype)
        hi, lo = _split(mean, dtype)
        inv_std = 1.0 / np.sqrt(var + args.eps)
        # sum(dy * (x - mean)) = sum(dy * (x - hi)) - lo * sum(dy): the exact centring of
        # ((x - hi) - lo) without the per-value subtraction of lo.
        dbeta, dy_x_sum = _gradient_sums(x3, dy3, hi, dtype)
        dgamma = (dy_x_sum - lo * dbeta) * inv_std
        # dx = k * dy - k * dbeta / n - (k * inv_std * dgamma / n) * ((x - hi) - lo), with
        # k = gamma * inv_std: every per-channel constant in float64, rounded once.
        n = float(args.count)
        k = _float64(gamma, 1.0, channels) * inv_std
        x_scale = -k * inv_std * dgamma / n
        shift = -k * dbeta / n - x_scale * lo
        _input_gradient(x3, dy3, hi, k.astype(dtype), x_scale.astype(dtype),
                        shift.astype(dtype), _as_3d(dx, args.axis))
    return (
        dx,
        None if gamma is None else dgamma.astype(param_dtype),
        dbeta.astype(param_dtype) if has_beta else None,
    )
