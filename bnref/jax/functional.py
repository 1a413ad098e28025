"""Batch normalization in JAX: pure ``jax.numpy``, usable under ``jit``, ``grad``, ``vjp``
and ``vmap``.

Training, per channel over every axis but the channel axis (``n`` values each)::

    mean = sum(x) / n
    var  = sum((x - mean)²) / n                (biased; as accurate as a two-pass)
    y    = (x - mean) * scale + beta           scale = gamma / sqrt(var + eps)
    running <- convention.update_running(running, batch statistic)

Inference uses the running statistics. float16/bfloat16 inputs are computed in float32;
float64 (with ``jax_enable_x64``) in float64. Unlike Flax's default
``use_fast_variance=True`` (E[x²]−E[x]²), the variance here stays accurate at large offsets.

Unsynchronized training reads ``x`` once for the statistics and once for ``y``: the moments
are merged up a tree of blocks of 8 values, each block shifted by its own first value
(:func:`channel_moments`, where the accuracy argument is), in loops XLA's CPU backend fuses
and runs at memory speed (its plain reductions over leading axes do not: see the comment
above :data:`BLOCK`). Its gradient is the analytic backward from the saved mean and
``1/sqrt(var + eps)`` (a ``jax.custom_vjp``: ``x`` and ``dy`` read twice, ``dx`` written
once), so it is reverse mode only: ``grad``, ``vjp``, ``jacrev`` (nested too) work, and
forward mode (``jax.jvp``, ``jacfwd``) raises JAX's ``TypeError`` for custom-VJP functions.
Inference and synchronized training are plain ``jax.numpy``, differentiated by JAX in both
modes.

Synchronized (``axis_name=``, in training): the statistics are those of the union of every
shard along the named axis of ``jax.vmap(..., axis_name=)``, ``jax.pmap`` or ``jax.shard_map``
(``N`` values per channel, every member's count together), in two all-reduces::

    mean = psum(sum(x)) / N                      (the global mean)
    var  = psum(sum((x - mean)²)) / N            (two-pass over the union, from the global mean)

exactly the two passes of one device over the concatenated batch, never E[x²]−E[x]² (Flax's
default ``use_fast_variance=True``, which loses every digit at offset 1e4 in float32). The
unbiased running variance (torch convention) uses ``N``. ``axis_index_groups`` (as
``jax.lax.psum``'s: lists of axis indices covering each exactly once) normalise each group
over its own members; they are reduced by one plain ``psum`` of a per-group slot, so they
work under ``vmap`` and ``shard_map`` too (where ``jax.lax.psum`` refuses groups). Gradients
are JAX's autodiff through ``psum``: each member's ``dx`` is its rows of the full batch's
``dx``, and its ``dgamma``/``dbeta`` its own part of the full batch's (they sum to it; under
``shard_map``'s default ``check_vma`` a replicated ``gamma``'s gradient arrives summed).

Arrays may be anything JAX's own operations take as an array (``jax.numpy``'s
``check_arraylike``): JAX arrays and tracers, numpy arrays and scalars (weights loaded from a
checkpoint), Python numbers, objects with ``__jax_array__``. They are converted with
``jnp.asarray``, so a float64 numpy array becomes float32 unless ``jax_enable_x64`` is set, as
everywhere in JAX. Lists, tuples and other frameworks' tensors are refused with bnref's
``TypeError``, as ``jnp.add`` and ``flax.linen.BatchNorm`` refuse them.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from bnref._checks import (
    AxisName,
    Groups,
    check_axis_index_groups,
    check_axis_name,
    check_batch_norm_args,
    relaxed_convention,
)
from bnref.conventions import DEFAULT, Convention, get_convention

__all__ = ["batch_norm"]

ARRAY_TYPE = "jax.Array or numpy.ndarray"


def _is_array_like(value: Any) -> bool:
    """What ``jnp.add`` takes as an array: ``jax.typing.ArrayLike`` (JAX arrays and tracers,
    numpy arrays and scalars, Python numbers) or an object with ``__jax_array__``. Not lists
    or tuples: jax.numpy refuses them since converting element by element hides a performance
    trap (jax-ml/jax#7737)."""
    return isinstance(value, ArrayLike) or hasattr(value, "__jax_array__")


def describe_array(value: Any) -> tuple[tuple[int, ...], str] | None:
    """``(shape, dtype name)`` of what JAX takes as an array, else None (for validation)."""
    if not _is_array_like(value):
        return None
    if isinstance(value, (np.ndarray, np.generic)):
        # numpy's own dtype, before conversion: the message names the dtype that was passed
        # (int64 stays int64 without x64), and dtypes JAX cannot hold (str, object) get the
        # dtype error rather than JAX's conversion error.
        return tuple(value.shape), value.dtype.name
    array = value if isinstance(value, jax.Array) else jnp.asarray(value)
    return tuple(array.shape), jnp.dtype(array.dtype).name


def as_jax(value: Any) -> Any:
    """``value`` as a ``jax.Array`` when JAX takes it as one (see :func:`_is_array_like`);
    anything else unchanged, for validation to refuse by name."""
    if value is None or isinstance(value, jax.Array) or not _is_array_like(value):
        return value
    return jnp.asarray(value)


def compute_dtype(dtype) -> jnp.dtype:
    return jnp.dtype(jnp.float64) if dtype == jnp.float64 else jnp.dtype(jnp.float32)


# -- synchronization (named axes) --------------------------------------------------------------

def sync_group_sizes(axis_name: AxisName, groups: Groups | None) -> list[int]:
    """The size of the group every member of the named axis is in (its position in the
    list: the member's axis index), checking that the axis is bound here and that the groups
    cover it. Call where the axis is bound (inside ``vmap``/``pmap``/``shard_map``)."""
    try:
        # jax.lax.axis_size (JAX 0.6+); before it, psum of a constant is the axis size.
        size = (jax.lax.axis_size(axis_name) if hasattr(jax.lax, "axis_size")
                else jax.lax.psum(1, axis_name))
    except NameError as error:
        raise ValueError(
            f"axis_name {axis_name!r} is not bound here: synchronized batch norm reduces over "
            "a named axis, so call it inside jax.vmap(..., axis_name=...), jax.pmap(..., "
            "axis_name=...) or jax.shard_map over a mesh with that axis name (under jax.jit "
            "with a sharded batch, leave axis_name=None: XLA's partitioner already computes "
            "the full batch's statistics)") from error
    if groups is None:
        return [size] * size
    if sorted(i for group in groups for i in group) != list(range(size)):
        raise ValueError(
            f"axis_index_groups must cover the {size} indices of axis {axis_name!r} (0 to "
            f"{size - 1}) each exactly once, got {[list(g) for g in groups]}")
    sizes = [0] * size
    for group in groups:
        for i in group:
            sizes[i] = len(group)
    return sizes


def _group_sum(value: jax.Array, axis_name: AxisName, groups: Groups | None) -> jax.Array:
    """``jax.lax.psum(value, axis_name, axis_index_groups=groups)``. Groups go through one
    plain psum: each member writes its value into its group's slot of a (groups, ...) array
    (``where``, so a NaN in one group cannot reach another) and reads its group's sum back.
    Plain psum runs (and differentiates) under vmap, pmap and shard_map alike."""
    if groups is None:
        return jax.lax.psum(value, axis_name)
    table = np.zeros(sum(len(g) for g in groups), np.int32)
    for number, group in enumerate(groups):
        table[list(group)] = number
    mine = jnp.asarray(table)[jax.lax.axis_index(axis_name)]
    slots = jnp.arange(len(groups)).reshape((-1,) + (1,) * value.ndim)
    spread = jnp.where(slots == mine, value[None], jnp.zeros((), value.dtype))
    return jax.lax.psum(spread, axis_name)[mine]


def _global_count(count: int, axis_name: AxisName, groups: Groups | None, dtype) -> Any:
    """Values per channel over the union: ``count`` times the member's group size (a Python
    int when every group has one size, else traced per member)."""
    sizes = sync_group_sizes(axis_name, groups)
    if len(set(sizes)) == 1:
        return count * sizes[0]
    table = jnp.asarray(np.asarray(sizes) * count, dtype)
    return table[jax.lax.axis_index(axis_name)]


def _per_channel(vector: jax.Array, ndim: int, axis: int) -> jax.Array:
    shape = [1] * ndim
    shape[axis] = -1
    return vector.reshape(shape)


# -- per-channel reductions in blocks ----------------------------------------------------------
#
# XLA on CPU reduces a channels-last array badly: a reduce over its leading axes becomes a
# tree of reduce-windows that do not fuse the elementwise work before them, so
# sum((x - mean)²) first writes (x - mean)² out in full and reads it back (measured at
# (64, 56, 56, 64) float32, in the optimized HLO and in time: 5-6x a copy of x). A reduce
# over a short middle axis, (rows / 8, 8, C) -> (rows / 8, C), does fuse: LLVM unrolls the 8
# and vectorizes over the channels, so the loop reads x once, at the speed of an elementwise
# pass (both sums of (x - 1, (x - 1)²) this way: 1.0-1.1x a copy, as x * 2 + 1). Every
# per-channel reduction here is levels of such blocks on the (before, C, after) view of x,
# each level one fused loop over an eighth of the data of the one before, until at most
# FINAL values per channel are left for a plain reduce.

BLOCK = 8  # values per block; 16 and 32 measured no faster, and 2-3x slower at C=64
# Values per channel left to plain reduces at the end. Not 1: XLA materializes a reduce's
# result, but the mean after the last blocked level is a chain of slices and adds (each
# level's pilot), which it inlined into the y loop, recomputing it for every element.
FINAL = 64


def _view(shape: tuple[int, ...], axis: int) -> tuple[int, int, int]:
    """``(before, C, after)``: the shape of ``x`` as a 3-D array with the channel axis in the
    middle (``after == 1`` for channels last)."""
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])


def _block_axis(shape: tuple[int, int, int]) -> int | None:
    """The axis of a ``(before, C, after)`` array to block next: ``before`` while it is long
    enough, then ``after``, preferring one BLOCK divides (no remainder to set aside). None
    once at most FINAL values per channel are left.

    ``before`` first: its blocks are whole ``(C, after)`` slabs, so each block's first value
    (:func:`channel_moments`'s shift) is a contiguous row, and the loop vectorizes along
    ``after``. Blocks along ``after`` take every 8th value, which the next level reads back
    from ``x``: one value per 32-byte stretch, so every cache line of ``x`` again (measured
    at (64, 64, 56, 56), channel axis 1: the second level took 13 ms, 2.6x the first)."""
    before, channels, after = shape
    if not channels or before * after <= FINAL:
        return None
    candidates = [i for i in (0, 2) if shape[i] >= BLOCK]
    exact = [i for i in candidates if shape[i] % BLOCK == 0]
    return (exact or candidates or [None])[0]


def _split_blocks(array: jax.Array, axis: int) -> tuple[jax.Array, jax.Array | None]:
    """``array`` (``(before, C, after)``) with its ``axis`` cut into blocks of BLOCK, as
    ``(before / BLOCK, BLOCK, C, after)`` or ``(before, C, after / BLOCK, BLOCK)``, and the
    remainder (fewer than BLOCK values along ``axis``; None when BLOCK divides it)."""
    length = array.shape[axis]
    whole = length - length % BLOCK
    tail = jax.lax.slice_in_dim(array, whole, length, axis=axis) if whole < length else None
    array = jax.lax.slice_in_dim(array, 0, whole, axis=axis)
    before, channels, after = array.shape
    if axis == 0:
        return array.reshape(before // BLOCK, BLOCK, channels, after), tail
    return array.reshape(before, channels, after // BLOCK, BLOCK), tail


def _block_dimension(axis: int) -> int:
    """Where :func:`_split_blocks` put the BLOCK axis."""
    return 1 if axis == 0 else 3


def _block_sums(operands: tuple[jax.Array, ...], axis: int) -> tuple[jax.Array, ...]:
    """Each blocked array summed over its BLOCK axis, all in one variadic reduce: one loop
    over the blocks (separate reduces would each read them again), and XLA keeps it apart
    from the next level's (chained single-array sums it merges into one slow reduce)."""
    zeros = tuple(jnp.zeros((), o.dtype) for o in operands)
    return tuple(jax.lax.reduce(operands, zeros, lambda a, b: tuple(map(jnp.add, a, b)),
                                (_block_dimension(axis),)))


def channel_sums(*views: jax.Array) -> tuple[jax.Array, ...]:
    """``sum(v)`` over axes 0 and 2 of each ``(before, C, after)`` array, ``(C,)`` each, all
    read in one loop: blocks of BLOCK summed, then blocks of those sums, and so on (a tree:
    the rounding error grows like a pairwise sum's)."""
    tails = []
    while (axis := _block_axis(views[0].shape)) is not None:
        split = [_split_blocks(v, axis) for v in views]
        if split[0][1] is not None:
            tails.append([jnp.sum(tail, axis=(0, 2)) for _, tail in split])
        views = _block_sums(tuple(blocked for blocked, _ in split), axis)
    sums = [jnp.sum(v, axis=(0, 2)) for v in views]
    for tail in tails:
        sums = [total + part for total, part in zip(sums, tail, strict=True)]
    return tuple(sums)


def channel_moments(view: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(mean, var)`` per channel of a ``(before, C, after)`` array: the mean and the biased
    variance ``sum((x - mean)²) / n`` over axes 0 and 2, reading ``view`` once.

    The values are merged up a tree of blocks (Chan, Golub & LeVeque's pairwise update). A
    block of ``k`` items of ``m`` values each, with means ``m_i`` and sums of squared
    deviations ``M2_i``, is shifted by its own first mean ``p = m_1``::

        e_i  = m_i - p
        mean = p + sum(e) / k
        M2   = sum(M2_i) + m * (sum(e²) - sum(e)² / k)

    ``sum(e²) - sum(e)²/k`` is ``sum((m_i - mean)²)`` exactly, and since ``p`` is one of the
    ``m_i``, ``sum(e²) = sum((m_i - mean)²) + k (p - mean)² <= (k + 1) sum((m_i - mean)²)``:
    the subtraction cancels at most a factor k + 1 = 9 (3 bits) whatever the offset, where
    E[x²]−E[x]² cancels a factor (mean / std)². The means are carried relative to each
    channel's first value ``s`` (a value of the batch), so they are the size of the spread
    ``x - s``, not of the offset, and round like the centred values of a two-pass. The items
    left (at most FINAL values' worth per channel) are merged two-pass::

        mean = s + sum(m * d) / n             d: each item's mean minus s
        var  = (sum(M2) + sum(m * (d - mean + s)²)) / n
    """
    channels = view.shape[1]
    shift = jax.lax.slice(view, (0, 0, 0), (1, channels, 1))  # s: each channel's first value
    items: list[tuple[int, jax.Array, jax.Array | None]] = []  # (m, d, M2) left unblocked
    size, means, squares = 1, view, None  # M2 None: single values (0)
    shifted = False  # means still absolute (the input values)
    while (axis := _block_axis(means.shape)) is not None:
        blocked, tail = _split_blocks(means, axis)
        blocked_squares, tail_squares = (None, None) if squares is None else _split_blocks(
            squares, axis)
        if tail is not None:
            items.append((size, tail if shifted else tail - shift, tail_squares))
        dimension = _block_dimension(axis)
        pilot = jnp.squeeze(jax.lax.slice_in_dim(blocked, 0, 1, axis=dimension), dimension)
        offsets = blocked - jnp.expand_dims(pilot, dimension)
        operands = (offsets, offsets * offsets) + (
            () if blocked_squares is None else (blocked_squares,))
        sums = _block_sums(operands, axis)
        mean_offset = sums[0] / BLOCK
        spread = size * (sums[1] - sums[0] * mean_offset)
        squares = spread if blocked_squares is None else spread + sums[2]
        means = (pilot if shifted else pilot - shift) + mean_offset
        size, shifted = size * BLOCK, True
    items.append((size, means if shifted else means - shift, squares))
    count = sum(m * (d.size // channels) for m, d, _ in items) if channels else 0
    mean_offset = sum(m * jnp.sum(d, axis=(0, 2)) for m, d, _ in items) / count
    total = jnp.zeros_like(mean_offset)
    for m, d, m2 in items:
        deviation = d - mean_offset[:, None]
        total = total + m * jnp.sum(deviation * deviation, axis=(0, 2))
        if m2 is not None:
            total = total + jnp.sum(m2, axis=(0, 2))
    return shift[0, :, 0] + mean_offset, total / count


def batch_norm(
    x: ArrayLike,
    gamma: ArrayLike | None,
    beta: ArrayLike | None,
    running_mean: ArrayLike | None,
    running_var: ArrayLike | None,
    *,
    training: bool,
    momentum: float = DEFAULT,  # type: ignore[assignment]
    eps: float | None = None,
    axis: int | None = None,
    convention: str | Convention = "torch",
    axis_name: AxisName | None = None,
    axis_index_groups: Any = None,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """Batch-normalize ``x`` over every axis but the channel axis (see :mod:`bnref.numpy`).

    ``y = gamma * (x - mean) / sqrt(var + eps) + beta`` with the biased batch statistics in
    training (or when no running statistics are given) and the running statistics in
    inference. Returns ``(y, new_running_mean, new_running_var)``: in training the running
    statistics move by the convention's rule (torch: ``(1 - m) * old + m * batch``, variance
    unbiased; keras/flax/mxnet/onnx: ``m * old + (1 - m) * batch``, biased). ``training``,
    ``momentum``, ``eps``, ``axis`` and ``convention`` are validated as Python values: pass
    them through ``functools.partial`` or ``static_argnames`` under an outer ``jit``. The math
    itself is jitted once per shapes and flags, with ``eps`` and ``momentum`` traced.

    The arrays may also be numpy arrays (or anything else ``jnp.add`` takes); they are
    converted with ``jnp.asarray``, and the statistics come back as ``jax.Array``.

    ``axis_name`` (a str, or a tuple of them) synchronizes training across the members of
    that named axis of ``jax.vmap``/``jax.pmap``/``jax.shard_map`` (the call must run inside
    one): the batch statistics, ``y`` and the new running statistics are those of the union
    of every member's ``x`` (the full batch), the same on every member. Each member's ``x``
    has the same shape, as JAX's collectives require. ``axis_index_groups`` (lists of axis
    indices covering each exactly once, as ``jax.lax.psum``) synchronize within each group
    only. Inference, and ``axis_name=None``, is exactly the unsynchronized call (no
    collective; the axis need not be bound). See the module docstring for how the statistics
    are reduced.
    """
    axis_name = check_axis_name(axis_name)
    groups = check_axis_index_groups(axis_index_groups, axis_name)
    synchronized = (axis_name is not None and isinstance(training, (bool, np.bool_))
                    and bool(training))
    relaxed = convention
    if synchronized:
        try:
            relaxed = relaxed_convention(get_convention(convention))
        except ValueError:  # check_batch_norm_args names it
            pass
    args = check_batch_norm_args(x, gamma, beta, running_mean, running_var, training=training,
                                 momentum=momentum, eps=eps, axis=axis, convention=relaxed,
                                 inspect=describe_array, array_type=ARRAY_TYPE)
    conv = get_convention(convention)
    if synchronized:
        sizes = sync_group_sizes(axis_name, groups)
        if conv.single_value_error and args.count * min(sizes) == 1:
            shape = describe_array(x)[0]
            # batch_norm's (and PyTorch's) wording, over the union of the shards.
            raise ValueError(
                "Expected more than 1 value per channel when training, got 1 value per "
                f"channel in the union of {min(sizes)} shard(s) of shape {shape} along "
                f"axis_name {axis_name!r} (channel axis {args.axis})")
    x, gamma, beta, running_mean, running_var = (
        as_jax(value) for value in (x, gamma, beta, running_mean, running_var))
    return _normalise(x, gamma, beta, running_mean, running_var, args.eps, args.momentum,
                      training=training, axis=args.axis, convention=conv.name,
                      axis_name=axis_name if synchronized else None,
                      groups=groups if synchronized else None)


@functools.partial(jax.jit, static_argnames=("training", "axis", "convention", "axis_name",
                                             "groups"))
def _normalise(x, gamma, beta, running_mean, running_var, eps, momentum, *, training: bool,
               axis: int, convention: str, axis_name: AxisName | None = None,
               groups: Groups | None = None):
    """The math, compiled once per shapes, dtypes and static flags: ``eps`` and ``momentum``
    are traced, so new values do not recompile (the public function validated them).
    ``axis_name`` (training only): the statistics of the union along that axis."""
    conv = get_convention(convention)
    count = x.size // x.shape[axis]
    dtype = compute_dtype(x.dtype)
    eps = jnp.asarray(eps, dtype)
    if axis_name is None and (training or running_mean is None):
        # The batch statistics of this x alone: the blocked moments and analytic backward.
        y, mean, var = _train(x, gamma, beta, eps, axis)
    else:
        wide = x.astype(dtype)
        if axis_name is not None:
            # Two all-reduces, two passes over the union: the global mean from the global sum
            # and count, then the global sum of squared deviations from that mean.
            reduce_axes = tuple(i for i in range(x.ndim) if i != axis)
            count = _global_count(count, axis_name, groups, dtype)
            mean = _group_sum(jnp.sum(wide, axis=reduce_axes), axis_name, groups) / count
            centered = wide - _per_channel(mean, x.ndim, axis)
            var = _group_sum(jnp.sum(centered * centered, axis=reduce_axes), axis_name,
                             groups) / count
        else:
            mean, var = running_mean.astype(dtype), running_var.astype(dtype)
        y = _scale_and_shift(wide - _per_channel(mean, x.ndim, axis), var, gamma, beta, eps,
                             axis).astype(x.dtype)
    if running_mean is None:
        return y, None, None
    if not training:
        return y, running_mean, running_var
    m = jnp.asarray(momentum, dtype)
    mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
    new_mean = conv.update_running(running_mean.astype(dtype), mean, m)
    new_var = conv.update_running(running_var.astype(dtype),
                                  conv.running_var_estimate(var, count), m)
    return y, new_mean.astype(running_mean.dtype), new_var.astype(running_var.dtype)


# -- training, unsynchronized: one read of x for the statistics, an analytic backward -----------

@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _train(x, gamma, beta, eps, axis: int):
    """Training with the batch statistics: ``(y, mean, var)``. ``mean``/``var`` carry no
    gradient (they only feed the running statistics, which ``stop_gradient`` cuts anyway)."""
    y, mean, var, _ = _train_forward(x, gamma, beta, eps, axis)
    return y, mean, var


def _scale_and_shift(centered, var, gamma, beta, eps, axis: int):
    """``(x - mean) * scale + beta`` with ``scale = gamma / sqrt(var + eps)``, from
    ``centered = x - mean`` (in the compute dtype)."""
    scale = jax.lax.rsqrt(var + eps)
    if gamma is not None:
        scale = scale * gamma.astype(centered.dtype)
    y = centered * _per_channel(scale, centered.ndim, axis)
    if beta is not None:
        y = y + _per_channel(beta.astype(centered.dtype), centered.ndim, axis)
    return y


def _train_forward(x, gamma, beta, eps, axis: int):
    """``(y, mean, var, rstd)``: one read of ``x`` for the moments (:func:`channel_moments`),
    one more for ``y``; ``rstd = 1 / sqrt(var + eps)`` is kept for the backward."""
    wide = x.astype(eps.dtype)
    mean, var = channel_moments(wide.reshape(_view(x.shape, axis)))
    y = _scale_and_shift(wide - _per_channel(mean, x.ndim, axis), var, gamma, beta, eps, axis)
    return y.astype(x.dtype), mean, var, jax.lax.rsqrt(var + eps)


def _train_fwd(x, gamma, beta, eps, axis: int):
    y, mean, var, rstd = _train_forward(x, gamma, beta, eps, axis)
    return (y, mean, var), (x, gamma, beta, mean, rstd)


def _train_bwd(axis: int, residuals, cotangents):
    """The analytic gradient from the saved ``mean`` and ``rstd`` (``n`` values per channel,
    ``xhat = (x - mean) * rstd``, ``scale = gamma * rstd``)::

        dbeta  = sum(dy)
        dgamma = sum(dy * xhat)
        dx     = scale * (dy - dbeta / n - xhat * dgamma / n)
        deps   = -sum(scale * rstd * dgamma) / 2

    The two sums read ``dy`` and ``x`` once, together (:func:`channel_sums`); ``dx`` reads
    them once more. The cotangents of ``mean``/``var`` are ignored (see :func:`_train`)."""
    x, gamma, beta, mean, rstd = residuals
    dy = cotangents[0]
    dtype = mean.dtype
    before, _, after = view = _view(x.shape, axis)
    count = before * after
    per_channel = functools.partial(_per_channel, ndim=x.ndim, axis=axis)
    dy_wide = dy.astype(dtype)
    xhat = (x.astype(dtype) - per_channel(mean)) * per_channel(rstd)
    dbeta, dgamma = channel_sums(dy_wide.reshape(view), (dy_wide * xhat).reshape(view))
    scale = rstd if gamma is None else rstd * gamma.astype(dtype)
    dx = per_channel(scale) * (dy_wide - per_channel(dbeta / count)
                               - xhat * per_channel(dgamma / count))
    deps = -0.5 * jnp.sum(scale * rstd * dgamma)
    return (dx.astype(x.dtype), None if gamma is None else dgamma.astype(gamma.dtype),
            None if beta is None else dbeta.astype(beta.dtype), deps.astype(rstd.dtype))


_train.defvjp(_train_fwd, _train_bwd)
