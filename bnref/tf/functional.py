"""Batch normalization in TensorFlow, from plain ops (no ``tf.nn.moments``, no fused kernel).

Training, per channel over every axis but the channel axis (``n`` values each)::

    m0   = sum(x) / n                        (two-pass, with the correction term of the
    mean = m0 + sum(x - m0) / n               corrected two-pass algorithm: never
    var  = sum((x - m0)²) / n - (sum(x - m0) / n)²          E[x²] - E[x]²; biased)
    y    = (x - mean) * scale + beta         scale = gamma / sqrt(var + eps)
    running <- convention.update_running(running, batch statistic)

and its gradient analytically, from the saved ``mean`` and ``var`` (``xc = x - mean``,
``s = 1 / sqrt(var + eps)``)::

    dbeta = sum(dy),  dgamma = s * sum(dy * xc),
    dx    = gamma * s * (dy - dbeta / n - xc * s² * sum(dy * xc) / n)

Inference uses the running statistics. float16/bfloat16 inputs are computed in float32 and
float64 in float64. The math runs as XLA-compiled ``tf.function``s, the forward and (through
``tf.custom_gradient``) the gradient: XLA fuses each pass over the data into one loop, which
is what makes plain ops fast (forward: two reads of ``x`` for the statistics, then one read
and one write; gradient: one read of ``dy`` and ``x`` for both sums, then one more and the
write of ``dx``). It works unchanged eagerly, inside an outer ``tf.function`` (with or without
``jit_compile``) and under ``GradientTape``. Eager calls on small tensors (at most
:data:`EAGER_MAX_SIZE` elements) run the forward ops without compiling, with plain two-pass
statistics and autodiff for the gradient: a compile costs ~150 ms per new shape, which a small
tensor never earns back.

Arrays are what ``tf.convert_to_tensor`` takes and that carry their own dtype: tensors, numpy
arrays, ``tf.Variable``, ``keras.Variable`` (so a Keras layer can pass its own weights). Python
lists and scalars are refused: TensorFlow would pick their dtype, not the caller.

:func:`batch_moments` gives the layer the (optionally masked) batch statistics on their own,
for Keras's masked moments and batch renormalization.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import tensorflow as tf

from bnref._checks import check_batch_norm_args
from bnref.conventions import DEFAULT, Convention, get_convention

__all__ = ["batch_moments", "batch_norm"]

ARRAY_TYPE = ("tf.Tensor or an array with a dtype (numpy.ndarray, tf.Variable, "
              "keras.Variable)")

# Eager calls on tensors of at most this many elements run op by op instead of through XLA.
# Measured here (float32, training): a compiled call takes 0.6 ms against 2 ms op by op at
# (256, 64), but its compile takes ~150 ms, so a shape must recur ~100 times to pay for it;
# at (64, 64, 56, 56) the compiled call is twice as fast (32 vs 63 ms) and pays within ~5 calls.
# Inside a tf.function the compiled function is always used: the caller's trace amortizes it.
EAGER_MAX_SIZE = 1 << 16


def _inspect(value: Any) -> tuple[tuple[int | None, ...], str] | None:
    if not isinstance(value, tf.Tensor):
        return None
    return tuple(value.shape), value.dtype.name


def _as_tensor(value: Any) -> Any:
    """An array (anything with a dtype that ``tf.convert_to_tensor`` takes) as a tensor; any
    other value is returned as it is, for the validation to refuse by name."""
    if isinstance(value, tf.Tensor) or not hasattr(value, "dtype"):
        return value
    try:
        return tf.convert_to_tensor(value)
    except (TypeError, ValueError):
        return value


def compute_dtype(dtype: tf.DType) -> tf.DType:
    return tf.float64 if dtype == tf.float64 else tf.float32


def batch_norm(
    x: tf.Tensor,
    gamma: tf.Tensor | None,
    beta: tf.Tensor | None,
    running_mean: tf.Tensor | None,
    running_var: tf.Tensor | None,
    *,
    training: bool,
    momentum: float = DEFAULT,  # type: ignore[assignment]
    eps: float | None = None,
    axis: int | None = None,
    convention: str | Convention = "torch",
) -> tuple[tf.Tensor, tf.Tensor | None, tf.Tensor | None]:
    """Batch-normalize ``x`` over every axis but the channel axis (see :mod:`bnref.numpy`).

    Array arguments are tensors or arrays ``tf.convert_to_tensor`` takes (numpy arrays,
    ``tf.Variable``, ``keras.Variable``); a non-floating dtype is a ``TypeError``.

    ``y = gamma * (x - mean) / sqrt(var + eps) + beta`` with the biased batch statistics in
    training (or when no running statistics are given) and the running statistics in
    inference. Returns ``(y, new_running_mean, new_running_var)`` as new tensors (variables
    passed in are read, never assigned): in training the running statistics move by the
    convention's rule (torch: ``(1 - m) * old + m * batch``, variance unbiased;
    keras/flax/mxnet/onnx: ``m * old + (1 - m) * batch``, biased). ``training``,
    ``momentum``, ``eps``, ``axis`` and ``convention`` are Python values. A batch size unknown
    until run time (``None`` in a traced graph) is fine; the torch convention's "more than one
    value per channel" check then cannot run before the data arrives and is skipped.
    """
    x, gamma, beta, running_mean, running_var = (
        _as_tensor(value) for value in (x, gamma, beta, running_mean, running_var))
    for name, value in (("x", x), ("gamma", gamma), ("beta", beta),
                        ("running_mean", running_mean), ("running_var", running_var)):
        if isinstance(value, tf.Tensor) and value.shape.rank is None:
            raise ValueError(f"{name} must have a known rank, got a tensor of unknown rank "
                             "(trace with shapes of one rank)")
    args = check_batch_norm_args(x, gamma, beta, running_mean, running_var, training=training,
                                 momentum=momentum, eps=eps, axis=axis, convention=convention,
                                 inspect=_inspect, array_type=ARRAY_TYPE)
    dtype = compute_dtype(x.dtype)
    # Tensors, not Python floats: a tf.function retraces for every new Python constant.
    eps = tf.constant(args.eps, dtype)
    momentum = tf.constant(args.momentum, dtype)
    compiled = not (tf.executing_eagerly() and x.shape.num_elements() <= EAGER_MAX_SIZE)
    if compiled and (training or running_mean is None):
        keep = float(args.convention.update_running(1.0, 0.0, args.momentum))
        return _train(x, gamma, beta, running_mean, running_var, eps, momentum, keep=keep,
                      training=training, axis=args.axis, convention=args.convention.name)
    y, new_mean, new_var, _, _ = (_normalise if compiled else _math)(
        x, gamma, beta, running_mean, running_var, eps, momentum, training=training,
        axis=args.axis, ndim=x.shape.rank, convention=args.convention.name)
    if running_mean is None or not training:
        return y, running_mean, running_var
    return y, new_mean, new_var


# The batch statistics and the gradient's per-channel sums are sums over every axis but the
# channel axis. XLA on CPU materializes the operand of a reduction when it is an expression
# such as (x - mean)², not x itself: a write and a read of a full-size array more. Summing
# FOLD equal slices of the expression elementwise first fuses into the pass that reads x and
# writes an array FOLD times smaller, which the reduction then finishes. Measured, float32
# (64, 56, 56, 64), CPU time of the compiled forward / gradient: 117 / 86 ms unfolded against
# 23 / 28 ms with FOLD = 8; in another run FOLD = 16 and 32 took 20 / 33 and 31 / 39 ms
# against 23 / 25 ms with 8 (more slices in one loop run slower than the traffic they save).
FOLD = 8
# Views (before, C) with C <= GROUP_ROW fold GROUP consecutive rows of each slice too.
GROUP, GROUP_ROW = 2, 64


def _dims(tensor: tf.Tensor) -> list[Any]:
    """The sizes of ``tensor``: Python ints, or scalar tensors where only run time knows them."""
    static = tensor.shape.as_list()
    if None not in static:
        return static
    dynamic = tf.shape(tensor)
    return [dynamic[i] if d is None else d for i, d in enumerate(static)]


def _view(x: tf.Tensor, axis: int) -> tuple[list[Any], Any]:
    """``x``'s view for the math and the values per channel: ``(before, C)`` when the channel
    axis is the last, else ``(before, C, after)``; sizes as in :func:`_dims`."""
    dims = _dims(x)
    if any(isinstance(d, tf.Tensor) for d in dims):
        before = tf.reduce_prod(tf.shape(x)[:axis])
        after = tf.reduce_prod(tf.shape(x)[axis + 1:])
    else:
        before, after = math.prod(dims[:axis]), math.prod(dims[axis + 1:])
    view = [before, dims[axis]] if axis == len(dims) - 1 else [before, dims[axis], after]
    return view, before * after


def _column(vector: tf.Tensor, rank: int) -> tf.Tensor:
    """(C,) broadcast against a view of ``rank``: as it is for (before, C), (C, 1) for
    (before, C, after)."""
    return vector if rank == 2 else tf.expand_dims(vector, 1)


def _paired(first: tf.Tensor, second: tf.Tensor) -> tf.Tensor:
    """``(first, first * second)`` on a length-2 axis before the view's last axis, (before,
    2, C) or (before, C, 2, after), as one elementwise expression (a select between the two
    broadcast along that axis): the pass that sums it gets both sums from one read of its
    inputs. A stack or concat of the two is not fused; XLA computes each half in a pass of
    its own."""
    rank = first.shape.rank
    first, second = tf.expand_dims(first, rank - 1), tf.expand_dims(second, rank - 1)
    return tf.where(tf.constant([[True], [False]]), first, first * second)


def _pairwise_sum(parts: list[tf.Tensor]) -> tf.Tensor:
    while len(parts) > 1:
        parts = [parts[i] + parts[i + 1] if i + 1 < len(parts) else parts[i]
                 for i in range(0, len(parts), 2)]
    return parts[0]


def _split(view_tensor: tf.Tensor, axis: int,
           group: int = 1) -> tuple[list[tf.Tensor], tf.Tensor | None]:
    """``view_tensor`` cut along ``axis`` into ``FOLD * group`` equal slices, and the
    remaining ``size % (FOLD * group)`` entries (None when there are none). The slices are
    FOLD equal blocks, each read ``group`` entries at a time: slice ``(j, i)`` holds entries
    ``(j * part + m) * group + i`` of block ``j`` for ``m < part``."""
    dims = _dims(view_tensor)
    size = dims[axis]
    part = size // (FOLD * group)
    begin, length = [0] * len(dims), [-1] * len(dims)
    length[axis] = FOLD * part * group
    head = tf.reshape(tf.slice(view_tensor, begin, length),
                      [*dims[:axis], FOLD, part, group, *dims[axis + 1:]])
    slices = [piece for block in tf.unstack(head, axis=axis)
              for piece in tf.unstack(block, axis=axis + 1)]
    if isinstance(size, int) and size % (FOLD * group) == 0:
        return slices, None
    begin[axis], length[axis] = FOLD * part * group, -1
    return slices, tf.slice(view_tensor, begin, length)


def _fold_axis(view: list[Any]) -> int | None:
    """The view's axis to fold (:func:`_channel_sums`) before the reduction, or None:
    ``before`` unless it is shorter than FOLD and ``after`` is not."""
    before, after = view[0], (view[2] if len(view) == 3 else 1)
    if not isinstance(before, int) or before >= FOLD:
        return 0
    if len(view) == 3 and (not isinstance(after, int) or after >= FOLD):
        return 2
    return None


def _channel_sums(term: Callable[..., tf.Tensor], inputs: list[tf.Tensor],
                  view: list[Any]) -> tf.Tensor:
    """Per channel, the sums of ``term(*inputs)`` (an elementwise expression of views, or a
    :func:`_paired` one) over every axis but the channel axis: (C,), or (2, C) paired.

    Folded first: ``term`` of the inputs' FOLD (times GROUP) slices (:func:`_split`), added
    elementwise (pairwise) into an array that many times smaller that the reduction
    finishes. ``term`` applies to each slice, not to the whole before slicing: XLA fuses a
    slice of an expression that has FOLD consumers only up to FOLD = 8 (measured: at 16 it
    writes the paired expression out in full, twice ``x``'s size)."""
    fold_axis = _fold_axis(view)
    if fold_axis is None:
        parts, rest = [term(*inputs)], None
    else:
        # Short rows (channels last, at most GROUP_ROW of them) read GROUP at a time:
        # measured, the compiled forward at (200704, 64) 15.3 ms against 18.8 ms (medians),
        # the gradient unchanged; no gain at (100352, 128), a loss at (50176, 256).
        short = len(view) == 2 and isinstance(view[1], int) and view[1] <= GROUP_ROW
        cuts = [_split(t, fold_axis, GROUP if short else 1) for t in inputs]
        parts = [term(*pieces) for pieces in zip(*(slices for slices, _ in cuts), strict=True)]
        rest = None if cuts[0][1] is None else term(*(r for _, r in cuts))
    folded = _pairwise_sum(parts)
    last = folded.shape.rank - 1
    axes = [0] if len(view) == 2 else [0, last]  # (before, [2,] C) or (before, C, [2,] after)
    total = tf.reduce_sum(folded, axes)
    if rest is not None:
        total = total + tf.reduce_sum(rest, axes)
    return tf.transpose(total) if len(view) == 3 and folded.shape.rank == 4 else total


def _statistics(wide: tf.Tensor, view: list[Any], count: Any) -> tuple[tf.Tensor, tf.Tensor]:
    """Biased batch ``(mean, var)`` of the view ``wide``, two-pass.

    Compiled, with the correction term of Chan, Golub & LeVeque's corrected two-pass
    algorithm, which takes the first pass's rounding error back out::

        m0   = sum(x) / n
        mean = m0 + sum(x - m0) / n
        var  = sum((x - m0)²) / n - (sum(x - m0) / n)²

    Each pass reads ``x`` once, the second's two sums from one read (:func:`_paired`). Op by
    op (eagerly), plain two-pass, ``mean = sum(x) / n`` and ``var = sum((x - mean)²) / n``:
    the fewest ops to dispatch, and autodiff runs through them."""
    rank = len(view)
    axes = [0] if rank == 2 else [0, 2]
    if tf.executing_eagerly():
        mean = tf.reduce_mean(wide, axes)
        centered = wide - _column(mean, rank)
        return mean, tf.reduce_mean(centered * centered, axes)
    n = tf.cast(count, wide.dtype)
    m0 = _channel_sums(tf.identity, [wide], view) / n
    column = _column(m0, rank)

    def deviations(x):
        centered = x - column
        return _paired(centered, centered)

    shift, squares = tf.unstack(_channel_sums(deviations, [wide], view) / n)
    return m0 + shift, tf.nn.relu(squares - shift * shift)


def _math(x, gamma, beta, running_mean, running_var, eps, momentum, *, training: bool,
          axis: int, ndim: int, convention: str):
    """The forward math: run eagerly as it stands, or compiled as :func:`_normalise`.

    Returns ``(y, new_running_mean, new_running_var, mean, var)``. With the batch statistics
    (``training``, or no running statistics): ``mean``/``var`` are them, biased, in the
    compute dtype, and the new running statistics are None without running ones. Otherwise
    only ``y`` is not None. Run as it stands, autodiff differentiates every argument; the
    compiled training path's gradient is :func:`_gradient`'s instead (:func:`_train`).

    ``x`` is viewed as ``(before, C)`` or ``(before, C, after)`` (:func:`_view`): XLA's CPU
    reductions over several leading axes of a channels-last array run ~3x slower than over
    the first axis of its 2-D view (measured: (64, 56, 56, 64) forward 50 ms vs 16 ms).
    """
    conv = get_convention(convention)
    del ndim  # part of the trace key only
    dims = _dims(x)
    view, count = _view(x, axis)
    rank = len(view)
    dtype = compute_dtype(x.dtype)
    wide = tf.reshape(tf.cast(x, dtype), view)
    batch = training or running_mean is None
    if batch:
        mean, var = _statistics(wide, view, count)
    else:
        mean, var = tf.cast(running_mean, dtype), tf.cast(running_var, dtype)
    scale = tf.math.rsqrt(var + eps)
    if gamma is not None:
        scale = scale * tf.cast(gamma, dtype)
    y = (wide - _column(mean, rank)) * _column(scale, rank)
    if beta is not None:
        y = y + _column(tf.cast(beta, dtype), rank)
    y = tf.cast(tf.reshape(y, dims), x.dtype)
    if not batch:
        return y, None, None, None, None
    if running_mean is None:
        return y, None, None, mean, var
    batch_mean, batch_var = tf.stop_gradient(mean), tf.stop_gradient(var)
    count = tf.cast(count, dtype)
    new_mean = conv.update_running(tf.cast(running_mean, dtype), batch_mean, momentum)
    new_var = conv.update_running(tf.cast(running_var, dtype),
                                  conv.running_var_estimate(batch_var, count), momentum)
    return (y, tf.cast(new_mean, running_mean.dtype), tf.cast(new_var, running_var.dtype),
            mean, var)


def _gradient_math(dy, x, gamma, mean, var, eps, *, axis: int, ndim: int):
    """Training-mode batch norm's gradient from the saved batch statistics, compiled as
    :func:`_gradient`. With ``xc = x - mean``, ``s = 1 / sqrt(var + eps)`` and ``n`` values
    per channel::

        dbeta  = sum(dy)                 dgamma = s * sum(dy * xc)
        dx     = gamma * s * (dy - dbeta / n - xc * s² * sum(dy * xc) / n)

    Two passes over ``dy`` and ``x``: both sums from one read (:func:`_paired`), then ``dx``.
    Returns ``(dx, dgamma, dbeta)``, ``dx`` in ``x``'s dtype, the sums in the compute dtype.
    """
    del ndim  # part of the trace key only
    dims = _dims(x)
    view, count = _view(x, axis)
    rank = len(view)
    dtype = mean.dtype
    n = tf.cast(count, dtype)
    grad = tf.reshape(tf.cast(dy, dtype), view)
    wide = tf.reshape(tf.cast(x, dtype), view)
    column = _column(mean, rank)
    dbeta, projection = tf.unstack(_channel_sums(
        lambda dy, x: _paired(dy, x - column), [grad, wide], view))
    centered = wide - column
    inv_std = tf.math.rsqrt(var + eps)
    scale = inv_std if gamma is None else inv_std * tf.cast(gamma, dtype)
    along = inv_std * inv_std * projection / n
    dx = _column(scale, rank) * (grad - _column(dbeta / n, rank) - centered * _column(along, rank))
    return tf.cast(tf.reshape(dx, dims), x.dtype), inv_std * projection, dbeta


# Traced once per dtypes, rank and flags (``reduce_retracing`` generalizes the sizes of later
# shapes, never the static ``ndim``) and compiled by XLA once per shape.
_normalise = tf.function(_math, jit_compile=True, reduce_retracing=True, autograph=False)
_gradient = tf.function(_gradient_math, jit_compile=True, reduce_retracing=True,
                        autograph=False)


def _train(x, gamma, beta, running_mean, running_var, eps, momentum, *, keep: float,
           training: bool, axis: int, convention: str):
    """``(y, new_running_mean, new_running_var)`` with the batch statistics, through the
    compiled functions: the forward :func:`_normalise`, and the gradient analytic, from the
    saved statistics (:func:`_gradient`), not autodiff back through the statistics' passes.

    The gradient is the one autodiff gives :func:`_math`: the batch statistics reach the
    running ones as constants, so those take back only their own weight in the update,
    ``keep`` (the convention's weight of the old value), and nothing into ``x``."""
    ndim = x.shape.rank
    given = (gamma, beta, running_mean, running_var)
    present = [t is not None for t in given]

    @tf.custom_gradient
    def run(x, *args):
        arrays = iter(args)
        gamma, beta, running_mean, running_var = (next(arrays) if p else None for p in present)
        # Constants to any tape around: a taped call of a compiled function would keep its
        # intermediates for an autodiff backward that never runs.
        stopped = (None if t is None else tf.stop_gradient(t)
                   for t in (x, gamma, beta, running_mean, running_var))
        y, new_mean, new_var, mean, var = _normalise(
            *stopped, eps, momentum, training=training, axis=axis, ndim=ndim,
            convention=convention)

        def grad(dy, *d_running):
            if dy is None:
                grads = [None] * (1 + present[0] + present[1])
            else:
                dx, dgamma, dbeta = _gradient(dy, x, gamma, mean, var, eps, axis=axis,
                                              ndim=ndim)
                grads = [dx]
                if gamma is not None:
                    grads.append(tf.cast(dgamma, gamma.dtype))
                if beta is not None:
                    grads.append(tf.cast(dbeta, beta.dtype))
            if running_mean is not None:
                for d, stat in zip(d_running, (running_mean, running_var), strict=True):
                    grads.append(None if d is None else
                                 tf.cast(tf.cast(d, eps.dtype) * keep, stat.dtype))
            return grads

        return ((y,) if running_mean is None else (y, new_mean, new_var)), grad

    out = run(x, *(t for t in given if t is not None))
    return (out[0], None, None) if running_mean is None else tuple(out)


def batch_moments(
    x: tf.Tensor, *, axis: int, mask: tf.Tensor | None = None
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Per-channel batch statistics of ``x`` over every axis but ``axis``, two-pass::

        n    = sum(m)                      m = 1 where ``mask`` is True, else 0 (all 1 without)
        mean = sum(m * x) / n
        var  = sum(m * (x - mean)²) / n    (biased)

    ``mask``: bool, broadcastable to ``x``; unselected values (even NaN or inf) take no part.
    A channel with no selected value has mean 0 and variance 0, which is what Keras's masked
    moments give there (``0 / (0 + 1e-7)``); elsewhere Keras divides by ``n + 1e-7``, a
    relative bias of ``1e-7 / n`` that bnref leaves out. Returns ``(mean, var, n)``, each
    ``(C,)`` in the compute dtype (float32 for float16/bfloat16 ``x``). Differentiable: a
    layer normalizing with them gets the gradient of training-mode batch norm.
    """
    rank = x.shape.rank
    axis = axis % rank
    reduce_axes = [i for i in range(rank) if i != axis]
    per_channel = [-1 if i == axis else 1 for i in range(rank)]  # (C,) broadcast against x
    dtype = compute_dtype(x.dtype)
    wide = tf.cast(x, dtype)
    if mask is None:
        count = tf.cast(tf.size(x) // tf.shape(x)[axis], dtype)
        mean = tf.reduce_mean(wide, reduce_axes)
        centered = wide - tf.reshape(mean, per_channel)
        var = tf.reduce_mean(centered * centered, reduce_axes)
        return mean, var, tf.fill(tf.shape(mean), count)
    selected = tf.broadcast_to(mask, tf.shape(x))
    count = tf.reduce_sum(tf.cast(selected, dtype), reduce_axes)
    # where, not a product with m: an unselected inf or NaN must not reach the sums.
    zeros = tf.zeros_like(wide)
    mean = tf.math.divide_no_nan(tf.reduce_sum(tf.where(selected, wide, zeros), reduce_axes),
                                 count)
    centered = tf.where(selected, wide - tf.reshape(mean, per_channel), zeros)
    var = tf.math.divide_no_nan(tf.reduce_sum(centered * centered, reduce_axes), count)
    return mean, var, count
