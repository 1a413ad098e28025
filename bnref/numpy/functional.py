"""Batch normalization in numpy: the oracle every other backend is compared with.

Training, per channel ``c`` over every axis but the channel axis (``n`` values each)::

    mean_c = sum(x) / n
    var_c  = sum((x - mean_c) ** 2) / n                    (biased, two-pass)
    y      = gamma_c * (x - mean_c) / sqrt(var_c + eps) + beta_c
    running_mean_c <- update(running_mean_c, mean_c)
    running_var_c  <- update(running_var_c, var_c * n / (n - 1) if unbiased else var_c)

where ``update`` and ``unbiased`` come from the convention (see :mod:`bnref.conventions`).
Inference uses the running statistics instead of the batch ones.

Numerics. Statistics: each cache-sized block is reduced as shifted data about ``s``, a value
of the compute dtype (float32 for float16/bfloat16/float32 inputs, float64 for float64 ones)
close to the channel's mean: ``x - s`` is exact for values near it, so an offset costs nothing
and a constant channel gives back its value exactly. The squares are summed with float64
accumulation and blocks are merged with Chan, Golub & LeVeque's pairwise update in float64,
which keeps the two-pass accuracy while reading ``x`` from memory once. The variance is never
E[x²]−E[x]² (in float32 that returns negative variances at offset 1e4). The output is
``(x - hi) * scale + (beta - lo * scale)`` per channel, with the float64 mean split as
``hi + lo`` at the compute dtype: ``x - hi`` is again exact near the mean, so ``y`` is ``beta``
exactly on a constant channel and loses nothing to an offset (``x * scale + shift`` would lose
``u * |mean| * scale``). The backward pass centres, sums and forms ``dx`` in float64, so
``dx``, ``dgamma`` and ``dbeta`` are off by little more than their final rounding.
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
_ROW_RUN = 8  # without an inner axis, the rows einsum squares and sums before float64 does
_INNER_RUN = 64  # with one, the inner values einsum squares and sums before float64 does


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
                  dtype: Any = None) -> np.ndarray:
    """Per-channel sum of ``block`` (or of ``block * other``) over its rows and inner axis,
    accumulated in ``dtype`` (by default the block's; einsum casts in buffers otherwise).

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
    return per_row if rows == 1 else per_row.reshape(rows, channels).sum(axis=0)


def _sum_of_squares(block: np.ndarray) -> np.ndarray:
    """Per-channel sum of ``block²`` over its rows and inner axis, in float64, accurate to
    about a rounding of each square (``block`` is left as it was).

    Long float32 runs would lose ~u * sqrt(run) (10u for a row of 16384 values, where
    PyTorch's cascade sums lose u); casting every square to float64 is ~5x slower. So
    einsum's fused multiply-add loop sums runs of _ROW_RUN values in float32 (error ~u *
    sqrt(8) relative each, averaging out) and the runs' sums are added in float64.
    """
    rows, channels, inner = block.shape
    if inner == 1:
        flat = block.reshape(rows, channels)
        head = rows - rows % _ROW_RUN
        runs = flat[:head].reshape(-1, _ROW_RUN, channels)
        total = np.einsum("abc,abc->ac", runs, runs).sum(axis=0, dtype=np.float64)
        return total + np.einsum("rc,rc->c", flat[head:], flat[head:])
    flat = np.ascontiguousarray(block).reshape(rows * channels, inner)
    head = inner - inner % _INNER_RUN
    runs = np.lib.stride_tricks.as_strided(
        flat, (flat.shape[0], head // _INNER_RUN, _INNER_RUN),
        (flat.strides[0], _INNER_RUN * flat.strides[1], flat.strides[1]), writeable=False)
    per_row = np.einsum("rji,rji->rj", runs, runs).sum(axis=1, dtype=np.float64)
    if head < inner:
        tail = flat[:, head:]
        per_row += np.einsum("ri,ri->r", tail, tail)
    return per_row if rows == 1 else per_row.reshape(rows, channels).sum(axis=0)


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

    ``dtype`` is the compute dtype the blocks are reduced in. Each block is reduced while it
    sits in cache, as shifted data about ``s`` (a value of ``dtype``)::

        d = sum(x - s) / count,    block mean = s + d,    block m2 = sum((x - s)²) - count * d²

    and blocks are merged with Chan, Golub & LeVeque's pairwise update, in float64.

    In a channel's first block ``s`` is its first value, moved by the block's mean deviation
    from it (one more pass over that block); after it, that block's mean rounded to ``dtype``.
    ``x - s`` is then exact for values near the mean, and 0 for values equal to ``s``: a
    constant channel gets its value back exactly, in every dtype and without a wider
    accumulator, and an offset costs nothing, as the sums only see the spread. ``d`` is summed
    in ``dtype`` (its error is a fraction of the spread, not of the offset); the squares are
    summed with float64 accumulation (:func:`_sum_of_squares`), so the variance does not lose
    accuracy to the count. When ``s`` turns out far from a block's mean (``|d|`` over ~1/2 of
    the block's standard deviation: drifting data; sampling noise puts it near
    ``1/sqrt(count)`` of it), subtracting ``count * d²`` would start to cancel, and the block
    is reduced again about ``s + d``.
    """
    acc = np.dtype(np.float64)
    channels = x3.shape[1]
    # A channel's mean is origin + mean: origin is its first block's mean rounded to dtype
    # (the shift of its later blocks), and merging relative to it keeps the merge's roundings
    # at the size of the spread rather than of the offset.
    origin = np.zeros(channels, dtype)
    mean = np.zeros(channels, acc)
    m2 = np.zeros(channels, acc)
    seen = np.zeros(channels, acc)
    scratch = np.empty(min(x3.size, _BLOCK_BYTES // dtype.itemsize), dtype)
    widens = x3.dtype != dtype  # float16/bfloat16: each block is widened into the scratch
    for rows, chans, cols in _blocks(x3.shape, dtype.itemsize):
        block = _widened(x3[rows, chans, cols], scratch, dtype)
        work = scratch[: block.size].reshape(block.shape)
        count = block.shape[0] * block.shape[2]
        # _blocks walks the rows in order: a block holds the first values of all its
        # channels or of none.
        first = seen[chans][0] == 0
        shift = block[0, :, 0].copy() if first else origin[chans]
        moved = False  # whether shift left origin (drifting data)
        for attempt in range(3):
            # Out of place when block is x itself; in place (~2x faster) when it is the
            # scratch, which then needs widening again before the next attempt.
            if attempt and widens:
                block = _widened(x3[rows, chans, cols], scratch, dtype)
            np.subtract(block, shift[None, :, None], out=work)
            offset = _channel_sums(work).astype(acc) / count
            if first and attempt == 0:  # the first value may sit anywhere in the spread
                shift = (shift + offset).astype(dtype)
                continue
            squares = _sum_of_squares(work)
            if attempt == 2 or not (4 * count * (offset * offset) > squares).any():
                break
            shift, moved = (shift + offset).astype(dtype), True  # centre on the block
        block_m2 = squares - count * (offset * offset)
        if first:
            origin[chans], mean[chans], m2[chans], seen[chans] = shift, offset, block_m2, count
            continue
        # Chan et al.: merge (seen, mean, m2) with (count, block_mean, block_m2). shift and
        # origin are values of dtype close together: their difference is exact in float64.
        block_mean = (shift - origin[chans].astype(acc)) + offset if moved else offset
        before = seen[chans]
        weight = count / (before + count)
        delta = block_mean - mean[chans]
        mean[chans] += delta * weight
        m2[chans] += block_m2 + delta * delta * (before * weight)
        seen[chans] += count
    # Rounding can leave a constant channel's m2 a hair below 0; the variance is not.
    return origin + mean, np.maximum(m2 / seen, 0.0)


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


def _gradient_sums(x3: np.ndarray, dy3: np.ndarray,
                   mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean))``, block by block in float64.

    In float64 the centring, the products (of float32 values: exact) and the sums lose
    nothing that matters, at any offset or count: ``dgamma`` is then only off by the final
    rounding to its dtype, where float32 sums would add a few more of its ulps.
    """
    wide = np.dtype(np.float64)
    channels = x3.shape[1]
    dy_sum, dy_x_sum = np.zeros(channels, wide), np.zeros(channels, wide)
    mean3 = _per_channel(mean)
    size = min(x3.size, _BLOCK_BYTES // wide.itemsize)
    scratch, dy_scratch = np.empty(size, wide), np.empty(size, wide)
    for rows, chans, cols in _blocks(x3.shape, wide.itemsize):
        block = _widened(x3[rows, chans, cols], scratch, wide)
        centred = scratch[: block.size].reshape(block.shape)
        np.subtract(block, mean3[:, chans], out=centred)
        dy_block = _widened(dy3[rows, chans, cols], dy_scratch, wide)
        dy_sum[chans] += _channel_sums(dy_block)
        dy_x_sum[chans] += _channel_sums(centred, dy_block)
    return dy_sum, dy_x_sum


def _input_gradient(x3: np.ndarray, dy3: np.ndarray, mean: np.ndarray, dy_scale: np.ndarray,
                    x_scale: np.ndarray, shift: np.ndarray, out3: np.ndarray) -> None:
    """out = dy * dy_scale + (x - mean) * x_scale + shift per channel, block by block, in
    float64 and rounded once to ``out``'s dtype.

    ``dy * dy_scale`` is most of ``dx``: in float32 it and the sum would round twice at
    ``dx``'s size (plus ``dy_scale``'s own rounding), as many times as PyTorch's kernel
    rounds. In float64 only the final rounding is left.
    """
    wide = np.dtype(np.float64)
    mean3, dy_scale3 = _per_channel(mean), _per_channel(dy_scale)
    x_scale3, shift3 = _per_channel(x_scale), _per_channel(shift)
    size = min(x3.size, _BLOCK_BYTES // wide.itemsize)
    scratch, dy_scratch = np.empty(size, wide), np.empty(size, wide)
    for rows, chans, cols in _blocks(x3.shape, wide.itemsize):
        block = _widened(x3[rows, chans, cols], scratch, wide)
        work = scratch[: block.size].reshape(block.shape)
        np.subtract(block, mean3[:, chans], out=work)
        np.multiply(work, x_scale3[:, chans], out=work)
        np.add(work, shift3[:, chans], out=work)
        dy_block = dy3[rows, chans, cols]
        scaled_dy = dy_scratch[: block.size].reshape(block.shape)
        if dy_block.dtype != wide:
            np.copyto(scaled_dy, dy_block, casting="unsafe")
            dy_block = scaled_dy
        np.multiply(dy_block, dy_scale3[:, chans], out=scaled_dy)  # never in place in dy
        np.add(work, scaled_dy, out=work)
        out3[rows, chans, cols] = work


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
        inv_std = 1.0 / np.sqrt(var + args.eps)
        dbeta, dy_x_sum = _gradient_sums(x3, dy3, mean)
        dgamma = dy_x_sum * inv_std
        # dx = k * dy - k * dbeta / n - (k * inv_std * dgamma / n) * (x - mean), with
        # k = gamma * inv_std.
        n = float(args.count)
        k = _float64(gamma, 1.0, channels) * inv_std
        x_scale = -k * inv_std * dgamma / n
        _input_gradient(x3, dy3, mean, k, x_scale, -k * dbeta / n, _as_3d(dx, args.axis))
    return (
        dx,
        None if gamma is None else dgamma.astype(param_dtype),
        dbeta.astype(param_dtype) if has_beta else None,
    )
