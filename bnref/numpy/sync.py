"""Synchronized batch normalization in numpy: the oracle for every backend's cross-worker BN.

Each worker holds a *shard* of the batch: the full batch split along its batch axis, axis 0
(what distributed data-parallel training splits: torch's ``N``, the leading axis of Keras and
Flax), so the full batch is ``np.concatenate(shards, axis=0)``. Shards may be uneven, and
empty (a worker with no values: count 0). Nothing depends on which non-channel axis the split
is along: the statistics are per channel over the union of every shard's values, so shards
may also differ in their other non-channel sizes (then there is no concatenated array, only
the union of values).

Training, per channel, over that union (``n`` values, the GLOBAL count)::

    n_k, mean_k, M2_k = count, mean and sum((x - mean_k)²) of shard k      (channel_moments)
    n, mean, M2       = Chan's merge of every (n_k, mean_k, M2_k)          (merge_moments)
    var               = M2 / n                                             (biased)
    y_k               = gamma * (x_k - mean) / sqrt(var + eps) + beta      for every shard k
    running_mean     <- update(running_mean, mean)
    running_var      <- update(running_var, var * n / (n - 1) if unbiased else var)

with ``update``/``unbiased`` the convention's (:mod:`bnref.conventions`): exactly
:func:`bnref.numpy.batch_norm` on the full batch. Chan, Golub & LeVeque's merge of two parts
``a`` and ``b``::

    n     = n_a + n_b
    delta = mean_b - mean_a
    mean  = mean_a + delta * n_b / n
    M2    = M2_a + M2_b + delta² * n_a * n_b / n

never the one-pass ``E[x²] - E[x]²`` (at offset 1e4 in float32 it returns negative
variances). Inference is not synchronized (as ``torch.nn.SyncBatchNorm`` in ``eval()``): each
shard is exactly ``batch_norm`` of that shard, normalised with the running statistics, or
with its own batch statistics when there are none.

The backward pass uses the same global statistics and the global sums
``sum(dy)`` and ``sum(dy * (x - mean))`` over every shard (the all-reduce of
``torch.nn.SyncBatchNorm``'s backward), so each shard's ``dx`` is its rows of the full batch's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from bnref._checks import (
    BatchNormArgs,
    check_batch_norm_args,
    check_like,
    relaxed_convention,
)
from bnref.conventions import DEFAULT, Convention, get_convention
from bnref.numpy.functional import (
    ARRAY_TYPE,
    _as_3d,
    _float64,
    _gradient_sums,
    _input_gradient,
    _inspect,
    _normalize,
    _split,
    batch_norm,
    channel_moments,
    compute_dtype,
)

__all__ = ["merge_moments", "shard_moments", "sync_batch_norm", "sync_batch_norm_backward"]

Moments = tuple[np.ndarray, np.ndarray, np.ndarray]


# -- moments ----------------------------------------------------------------------------------


def _moments3(x3: np.ndarray, dtype: np.dtype) -> tuple[int, np.ndarray, np.ndarray]:
    """(count, mean, biased var) of (outer, C, inner) data; zeros when it holds no value."""
    count = x3.shape[0] * x3.shape[2]
    if count == 0 or x3.shape[1] == 0:
        zeros = np.zeros(x3.shape[1], np.float64)
        return 0, zeros, zeros.copy()
    mean, var = channel_moments(x3, dtype)
    return count, mean, var


def shard_moments(x: np.ndarray, *, axis: int | None = None,
                  convention: str | Convention = "torch") -> Moments:
    """Per-channel ``(count, mean, M2)`` of one shard, ``M2 = sum((x - mean)²)``.

    Computed by :func:`bnref.numpy.functional.channel_moments` (blockwise, relative to a value
    of the channel: exact on a constant channel, no loss to an offset), then
    ``M2 = count * var`` in float64 (one float64 rounding). ``count`` is an int64 array of
    shape ``(C,)`` (the same value in every channel), ``mean`` and ``M2`` float64 arrays; an
    empty shard gives ``(0, 0, 0)`` per channel. ``axis`` defaults to the convention's channel
    axis; ``x`` is validated as ``batch_norm`` validates it (empty allowed; one value per
    channel too, whatever the convention: the union decides that).
    """
    args = check_batch_norm_args(
        x, None, None, None, None, training=False, momentum=DEFAULT, eps=None, axis=axis,
        convention=relaxed_convention(convention), inspect=_inspect, array_type=ARRAY_TYPE,
        allow_empty=True)
    count, mean, var = _moments3(_as_3d(x, args.axis), compute_dtype(x.dtype))
    return np.full(mean.shape, count, np.int64), mean, var * count


def _chan(a: Moments, b: Moments) -> Moments:
    """Chan et al.'s merge of two parts, per channel, in float64. A part with count 0 is the
    identity: the other part comes back unchanged (bit for bit), so merging a constant channel
    with empty parts keeps it exact."""
    count_a, mean_a, m2_a = a
    count_b, mean_b, m2_b = b
    count = count_a + count_b
    weight = np.divide(count_b, count, out=np.zeros_like(count), where=count > 0)  # n_b / n
    delta = mean_b - mean_a
    mean = mean_a + delta * weight
    m2 = m2_a + m2_b + delta * delta * (count_a * weight)  # delta² n_a n_b / n
    mean = np.where(count_b == 0, mean_a, np.where(count_a == 0, mean_b, mean))
    m2 = np.where(count_b == 0, m2_a, np.where(count_a == 0, m2_b, m2))
    return count, mean, m2


def _merge(parts: list[Moments]) -> Moments:
    """Merge float64 parts pairwise (a tree: rounding grows with log k, not k)."""
    while len(parts) > 1:
        parts = [_chan(parts[i], parts[i + 1]) if i + 1 < len(parts) else parts[i]
                 for i in range(0, len(parts), 2)]
    return parts[0]


def merge_moments(moments: Sequence[tuple[Any, Any, Any]]) -> Moments:
    """Merge per-shard ``(count, mean, M2)`` into the union's, with Chan et al.'s parallel
    update, in float64.

    Each entry is one shard's per-channel ``count`` (whole numbers >= 0; 0 for an empty
    shard), ``mean`` and ``M2 = sum((x - mean)²)`` (>= 0): arrays of one shape (or scalars),
    e.g. from :func:`shard_moments`. Two parts ``a``, ``b`` merge as::

        n     = n_a + n_b
        delta = mean_b - mean_a
        mean  = mean_a + delta * n_b / n
        M2    = M2_a + M2_b + delta² * n_a * n_b / n

    pairwise over the shards (a tree), so the rounding grows with ``log k``; never through
    ``E[x²] - E[x]²``. A part with count 0 changes nothing (its mean and M2 are ignored);
    equal means with M2 0 (a constant channel) merge to that mean and M2 0 exactly. Returns
    ``(count, mean, M2)``: ``count`` int64, ``mean`` and ``M2`` float64; where every count is
    0, mean and M2 are 0. The biased variance is ``M2 / count``, the unbiased one
    ``M2 / (count - 1)``.
    """
    if not isinstance(moments, (list, tuple)):
        kind = f"{type(moments).__module__}.{type(moments).__qualname__}"
        raise TypeError(f"moments must be a list of (count, mean, M2), one per shard, got {kind}")
    if not moments:
        raise ValueError("moments must hold one (count, mean, M2) per shard, got an empty "
                         f"{type(moments).__name__}")
    parts: list[Moments] = []
    for index, entry in enumerate(moments):
        if not isinstance(entry, (list, tuple)) or len(entry) != 3:
            raise ValueError(f"moments[{index}] must be a (count, mean, M2) triple, got "
                             f"{entry!r}")
        try:
            count, mean, m2 = (np.asarray(value, np.float64) for value in entry)
        except (TypeError, ValueError) as error:
            raise TypeError(f"moments[{index}] must hold real numbers or arrays of them, got "
                            f"{entry!r}") from error
        if not (np.isfinite(count).all() and (count >= 0).all()
                and (count == np.round(count)).all()):
            raise ValueError(f"moments[{index}] count must be whole numbers >= 0, got {count}")
        if not (m2 >= 0).all():  # NaN fails this too
            raise ValueError(f"moments[{index}] M2 must be >= 0, got {m2}")
        parts.append((count, mean, m2))
    try:
        shape = np.broadcast_shapes(*(a.shape for part in parts for a in part))
    except ValueError as error:
        shapes = [tuple(a.shape for a in part) for part in parts]
        raise ValueError(f"moments must share one per-channel shape, got shapes {shapes}") from (
            error)
    parts = [tuple(np.broadcast_to(a, shape) for a in part) for part in parts]
    count, mean, m2 = _merge(parts)
    empty = count == 0
    return (count.astype(np.int64), np.where(empty, 0.0, mean), np.where(empty, 0.0, m2))


def _global_moments(x3s: list[np.ndarray], dtype: np.dtype) -> tuple[int, np.ndarray, np.ndarray]:
    """(global count, mean, biased var) over every shard (float64). With one non-empty shard
    its ``channel_moments`` come back as they are: bit for bit ``batch_norm``'s."""
    parts = [_moments3(x3, dtype) for x3 in x3s]
    filled = [part for part in parts if part[0] > 0]
    if not filled:
        return 0, parts[0][1], parts[0][2]
    if len(filled) == 1:
        return filled[0]
    _, mean, m2 = _merge([(np.full(mean.shape, float(n)), mean, var * n)
                          for n, mean, var in filled])
    total = sum(part[0] for part in filled)
    return total, mean, m2 / total


# -- validation -------------------------------------------------------------------------------


def _check_list(name: str, value: Any, per: str) -> None:
    if not isinstance(value, (list, tuple)):
        kind = f"{type(value).__module__}.{type(value).__qualname__}"
        raise TypeError(f"{name} must be a list of {ARRAY_TYPE}, one per {per}, got {kind}")
    if not value:
        raise ValueError(f"{name} must hold one {ARRAY_TYPE} per {per}, got an empty "
                         f"{type(value).__name__}")


def _note(error: Exception, index: int, total: int, name: str = "shards") -> None:
    if hasattr(error, "add_note"):  # Python 3.11+: the message stays batch_norm's
        error.add_note(f"in {name}[{index}] of {total}")


def _check_shards(shards: Any, gamma: Any, beta: Any, running_mean: Any, running_var: Any, *,
                  training: Any, momentum: Any, eps: Any, axis: Any,
                  convention: Any) -> list[BatchNormArgs]:
    """Validate the shards as ``batch_norm`` validates each one (same errors, same order),
    then what ties them together (rank, dtype, channels), then the parameters, and in training
    the torch convention's single-value refusal over the union (the GLOBAL count).

    Returns each shard's resolved arguments. In inference, and for a single shard, each shard
    is checked exactly as ``batch_norm`` checks it, single-value refusal included.
    """
    _check_list("shards", shards, "worker")
    total = len(shards)
    relaxed = relaxed_convention(convention)
    options = {"momentum": momentum, "eps": eps, "axis": axis, "inspect": _inspect,
               "array_type": ARRAY_TYPE, "allow_empty": True}
    for index, shard in enumerate(shards):  # the shard itself, as batch_norm checks x
        try:
            resolved = check_batch_norm_args(shard, None, None, None, None, training=training,
                                             convention=relaxed, **options)
        except (TypeError, ValueError) as error:
            _note(error, index, total)
            raise
        if index == 0:
            channel_axis = resolved.axis
    first = shards[0]
    for index, shard in enumerate(shards[1:], start=1):
        if shard.ndim != first.ndim:
            raise ValueError(
                f"every shard must have the rank of shards[0], {first.ndim}, got rank "
                f"{shard.ndim} with shape {shard.shape} for shards[{index}]")
        if shard.dtype != first.dtype:
            raise TypeError(
                f"every shard must have the dtype of shards[0], {first.dtype.name}, got "
                f"{shard.dtype.name} for shards[{index}]")
    for index, shard in enumerate(shards[1:], start=1):
        if shard.shape[channel_axis] != first.shape[channel_axis]:
            raise ValueError(
                f"every shard must have the {first.shape[channel_axis]} channels of shards[0] "
                f"on axis {channel_axis}, got shape {shard.shape} for shards[{index}]")
    # Synchronized (training, or batch statistics): the single-value rule is the union's.
    # Unsynchronized (inference) or one shard: each shard is batch_norm's own call.
    per_shard = not training or total == 1
    checked = [check_batch_norm_args(shard, gamma, beta, running_mean, running_var,
                                     training=training,
                                     convention=convention if per_shard else relaxed,
                                     **options)
               for shard in shards]
    conv = get_convention(convention)
    if not per_shard and conv.single_value_error and sum(a.count for a in checked) == 1:
        shapes = [tuple(shard.shape) for shard in shards]
        # batch_norm's (and PyTorch's) wording, over the union of the shards.
        raise ValueError(
            "Expected more than 1 value per channel when training, got 1 value per channel in "
            f"the union of {total} shards of shapes {shapes} (channel axis {channel_axis})")
    return checked


# -- forward ----------------------------------------------------------------------------------


def sync_batch_norm(
    shards: Sequence[np.ndarray],
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
) -> tuple[list[np.ndarray], np.ndarray | None, np.ndarray | None]:
    """Batch-normalize the shards of one batch with the statistics of their union.

    ``shards``: a list of arrays, one per worker, the full batch split along its batch axis
    (axis 0: ``np.concatenate(shards, axis=0)`` is the full batch). Every shard has the same
    rank, dtype and channel count; their other sizes may differ (uneven batches, or other
    non-channel sizes: the statistics are over the union of values) and a shard may be empty.
    Arguments are ``batch_norm``'s, ``axis`` the channel axis of every shard.

    Training (synchronized), per channel, with ``n = sum_k n_k`` the GLOBAL count::

        (n, mean, M2) = merge_moments([(n_k, mean_k, M2_k) for every shard k])
        var = M2 / n                                                     (biased)
        y_k = gamma * (x_k - mean) / sqrt(var + eps) + beta
        running_mean <- update(running_mean, mean)
        running_var  <- update(running_var, M2 / (n - 1) if unbiased else var)

    (``update``/``unbiased``: the convention's; see :func:`merge_moments` for Chan's merge).
    That is ``batch_norm`` of the full batch: its ``y`` split back into the shards and its new
    running statistics. Under the torch convention a union of one value per channel is refused
    with ``batch_norm``'s error (a shard of one value is fine when the others add more).
    All shards empty (``n = 0``): empty ``y`` per shard, running statistics unchanged.

    Inference is not synchronized (``torch.nn.SyncBatchNorm`` in ``eval()``): shard ``k``
    gives exactly ``batch_norm(shards[k], ..., training=False)``, i.e. the running statistics,
    or the shard's own batch statistics when there are none.

    Returns ``(ys, new_running_mean, new_running_var)``: ``ys`` a list with each shard's
    ``y`` (its shape and dtype), the running statistics in their dtype (``None`` when not
    given). Inputs are never modified. A shard failing ``batch_norm``'s checks raises
    ``batch_norm``'s error (with a note naming the shard); an empty list, or shards that
    differ in rank, dtype or channel count, get their own.
    """
    checked = _check_shards(shards, gamma, beta, running_mean, running_var, training=training,
                            momentum=momentum, eps=eps, axis=axis, convention=convention)
    args = checked[0]
    if not training:  # unsynchronized: batch_norm of each shard
        ys = []
        for shard in shards:
            y, new_mean, new_var = batch_norm(shard, gamma, beta, running_mean, running_var,
                                              training=False, momentum=args.momentum,
                                              eps=args.eps, axis=args.axis,
                                              convention=args.convention)
            ys.append(y)
        return ys, new_mean, new_var
    ys = [np.empty(shard.shape, shard.dtype) for shard in shards]
    dtype = compute_dtype(shards[0].dtype)
    x3s = [_as_3d(shard, args.axis) for shard in shards]
    count, mean, var = _global_moments(x3s, dtype)
    if count == 0:  # no value to take statistics of, none to normalise (as batch_norm)
        if running_mean is None:
            return ys, None, None
        return ys, running_mean.copy(), running_var.copy()

    # batch_norm's normalisation: y = (x - hi) * scale + (beta - lo * scale), with the global
    # mean = hi + lo split at the compute dtype (exact near the mean, beta on a constant
    # channel), the per-channel constants computed in float64 and rounded once.
    channels = x3s[0].shape[1]
    hi, lo = _split(mean, dtype)
    scale = _float64(gamma, 1.0, channels) / np.sqrt(var + args.eps)
    shift = _float64(beta, 0.0, channels) - lo * scale
    scale_c, shift_c = scale.astype(dtype), shift.astype(dtype)
    for x3, y in zip(x3s, ys, strict=True):
        if x3.size:
            _normalize(x3, hi, scale_c, shift_c, _as_3d(y, args.axis))

    if running_mean is None:
        return ys, None, None
    # The recurrence in float64 with the GLOBAL count, rounded once to the statistics' dtype.
    conv, momentum_value = args.convention, np.float64(args.momentum)
    new_mean = conv.update_running(running_mean.astype(np.float64), mean, momentum_value)
    new_var = conv.update_running(running_var.astype(np.float64),
                                  conv.running_var_estimate(var, count), momentum_value)
    return ys, new_mean.astype(running_mean.dtype), new_var.astype(running_var.dtype)



# -- backward ---------------------------------------------------------------------------------


def sync_batch_norm_backward(
    dys: Sequence[np.ndarray],
    shards: Sequence[np.ndarray],
    gamma: np.ndarray | None,
    *,
    eps: float | None = None,
    axis: int | None = None,
    beta: Any = DEFAULT,
    convention: str | Convention = "torch",
    per_shard: bool = False,
) -> tuple[list[np.ndarray], Any, Any]:
    """Analytic gradient of training-mode :func:`sync_batch_norm`.

    With the global statistics (``n``, ``mean``, ``var`` over the union of the shards, as in
    the forward pass), ``xhat = (x - mean) / sqrt(var + eps)`` and the sums over every value of
    every shard (the all-reduce)::

        dbeta  = sum(dy)
        dgamma = sum(dy * xhat)
        dx_k   = gamma / sqrt(var + eps) * (dy_k - dbeta / n - xhat_k * dgamma / n)

    so ``dx_k`` is shard ``k``'s rows of the full batch's ``dx`` and ``dgamma``/``dbeta`` the
    full batch's (``batch_norm_backward`` of the concatenation). With ``per_shard=True``,
    ``dgamma``/``dbeta`` are lists of each shard's part, ``sum(dy_k * xhat_k)`` and
    ``sum(dy_k)`` (what each rank's parameters receive before the data-parallel gradient
    all-reduce), which sum to the full batch's. ``dys[k]`` has ``shards[k]``'s shape.
    ``gamma``, ``beta``, ``eps``, ``axis``, ``convention`` and the dtypes are as in
    ``batch_norm_backward``: ``dgamma`` is ``None`` when ``gamma`` is, ``dbeta`` when
    ``beta=None`` is passed (or ``beta`` is omitted and ``gamma`` is ``None``). Empty shards
    give empty ``dx`` and zero parts.
    """
    checked = _check_shards(shards, gamma, None, None, None, training=True, momentum=DEFAULT,
                            eps=eps, axis=axis, convention=convention)
    _check_list("dys", dys, "shard")
    if len(dys) != len(shards):
        raise ValueError(f"dys must hold one array per shard, {len(shards)}, got {len(dys)}")
    for index, (dy, shard) in enumerate(zip(dys, shards, strict=True)):
        try:
            check_like("dy", dy, shard.shape, inspect=_inspect, array_type=ARRAY_TYPE)
        except (TypeError, ValueError) as error:
            _note(error, index, len(dys), "dys")
            raise
    args = checked[0]
    has_beta = gamma is not None if beta is DEFAULT else beta is not None
    dtype = compute_dtype(shards[0].dtype)
    param_dtype = dtype if gamma is None else gamma.dtype
    x3s = [_as_3d(shard, args.axis) for shard in shards]
    dy3s = [_as_3d(dy, args.axis) for dy in dys]
    dxs = [np.empty(shard.shape, shard.dtype) for shard in shards]
    channels = x3s[0].shape[1]
    count, mean, var = _global_moments(x3s, dtype)
    zeros = np.zeros(channels, np.float64)
    if count == 0:  # nothing flows back; the parameters' sums are empty sums
        inv_std = zeros
        sums = [(zeros, zeros)] * len(shards)
    else:
        inv_std = 1.0 / np.sqrt(var + args.eps)
        sums = [_gradient_sums(x3, dy3, mean) if x3.size else (zeros, zeros)
                for x3, dy3 in zip(x3s, dy3s, strict=True)]
    # The all-reduce: from the first shard's sums on (one shard: bit for bit batch_norm's).
    dbeta, dy_x_sum = sums[0]
    for dy_sum_k, dy_x_sum_k in sums[1:]:
        dbeta, dy_x_sum = dbeta + dy_sum_k, dy_x_sum + dy_x_sum_k
    dgamma = dy_x_sum * inv_std
    if count:
        # dx = k * dy - k * dbeta / n - (k * inv_std * dgamma / n) * (x - mean), with
        # k = gamma * inv_std, as batch_norm_backward.
        n = float(count)
        k = _float64(gamma, 1.0, channels) * inv_std
        x_scale, shift = -k * inv_std * dgamma / n, -k * dbeta / n
        for x3, dy3, dx in zip(x3s, dy3s, dxs, strict=True):
            if x3.size:
                _input_gradient(x3, dy3, mean, k, x_scale, shift, _as_3d(dx, args.axis))
    if per_shard:
        dgammas = [(part * inv_std).astype(param_dtype) for _, part in sums]
        dbetas = [part.astype(param_dtype) for part, _ in sums]
        return dxs, None if gamma is None else dgammas, dbetas if has_beta else None
    return (dxs, None if gamma is None else dgamma.astype(param_dtype),
            dbeta.astype(param_dtype) if has_beta else None)
