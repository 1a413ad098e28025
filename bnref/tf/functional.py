"""Batch normalization in TensorFlow, from plain ops (no ``tf.nn.moments``, no fused kernel).

Training, per channel over every axis but the channel axis (``n`` values each)::

    mean = sum(x) / n
    var  = sum((x - mean)²) / n                (biased, two-pass)
    y    = (x - mean) * scale + beta           scale = gamma / sqrt(var + eps)
    running <- convention.update_running(running, batch statistic)

Inference uses the running statistics. float16/bfloat16 inputs are computed in float32 and
float64 in float64. The math runs as one XLA-compiled ``tf.function``: XLA fuses the passes,
which is what makes plain ops as fast as a fused kernel, and it works unchanged eagerly,
inside an outer ``tf.function`` (with or without ``jit_compile``) and under ``GradientTape``.
Eager calls on small tensors (at most :data:`EAGER_MAX_SIZE` elements) run the same ops
without compiling: a compile costs ~150 ms per new shape, which a small tensor never earns back.

Arrays are what ``tf.convert_to_tensor`` takes and that carry their own dtype: tensors, numpy
arrays, ``tf.Variable``, ``keras.Variable`` (so a Keras layer can pass its own weights). Python
lists and scalars are refused: TensorFlow would pick their dtype, not the caller.

:func:`batch_moments` gives the layer the (optionally masked) batch statistics on their own,
for Keras's masked moments and batch renormalization.
"""

from __future__ import annotations

import math
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
    small = tf.executing_eagerly() and x.shape.num_elements() <= EAGER_MAX_SIZE
    y, new_mean, new_var = (_math if small else _normalise)(
        x, gamma, beta, running_mean, running_var, tf.constant(args.eps, dtype),
        tf.constant(args.momentum, dtype), training=training, axis=args.axis,
        ndim=x.shape.rank, convention=args.convention.name)
    if running_mean is None or not training:
        return y, running_mean, running_var
    return y, new_mean, new_var


def _column(vector: tf.Tensor) -> tf.Tensor:
    """(C,) -> (C, 1), to broadcast over the view's last axis (one op; slicing takes five)."""
    return tf.expand_dims(vector, 1)


def _math(x, gamma, beta, running_mean, running_var, eps, momentum, *, training: bool,
          axis: int, ndim: int, convention: str):
    """The math: run eagerly as it stands, or compiled as :func:`_normalise`.

    ``x`` is viewed as ``(before, C, after)``, the channel axis in the middle: XLA's CPU
    reductions over several leading axes of a channels-last array run ~3x slower than over
    the first axis of its 2-D view (measured: (64, 56, 56, 64) forward 50 ms vs 16 ms).
    """
    conv = get_convention(convention)
    del ndim  # part of the trace key only
    dims = x.shape.as_list()
    if None in dims:  # sizes known only at run time (a generalized trace)
        shape = tf.shape(x)
        view = tf.stack([tf.reduce_prod(shape[:axis]), shape[axis],
                         tf.reduce_prod(shape[axis + 1:])])
        count = tf.size(x) // shape[axis]
    else:  # Python ints: eager shape ops cost dispatch (with _column: 4.0 -> 1.9 ms a call)
        shape = dims
        view = [math.prod(dims[:axis]), dims[axis], math.prod(dims[axis + 1:])]
        count = view[0] * view[2]
    dtype = compute_dtype(x.dtype)
    wide = tf.reshape(tf.cast(x, dtype), view)
    if training or running_mean is None:
        mean = tf.reduce_mean(wide, axis=[0, 2])
        centered = wide - _column(mean)
        var = tf.reduce_mean(centered * centered, axis=[0, 2])
    else:
        mean, var = tf.cast(running_mean, dtype), tf.cast(running_var, dtype)
        centered = wide - _column(mean)
    scale = tf.math.rsqrt(var + eps)
    if gamma is not None:
        scale = scale * tf.cast(gamma, dtype)
    y = centered * _column(scale)
    if beta is not None:
        y = y + _column(tf.cast(beta, dtype))
    y = tf.cast(tf.reshape(y, shape), x.dtype)
    if running_mean is None or not training:
        return y, None, None
    mean, var = tf.stop_gradient(mean), tf.stop_gradient(var)
    count = tf.cast(count, dtype)
    new_mean = conv.update_running(tf.cast(running_mean, dtype), mean, momentum)
    new_var = conv.update_running(tf.cast(running_var, dtype),
                                  conv.running_var_estimate(var, count), momentum)
    return y, tf.cast(new_mean, running_mean.dtype), tf.cast(new_var, running_var.dtype)


# Traced once per dtypes, rank and flags (``reduce_retracing`` generalizes the sizes of later
# shapes, never the static ``ndim``) and compiled by XLA once per shape.
_normalise = tf.function(_math, jit_compile=True, reduce_retracing=True, autograph=False)


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
