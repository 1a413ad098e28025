"""``bnref.mxnet.SyncBatchNorm``: synchronized batch norm across the contexts of one process, a
drop-in for ``mxnet.gluon.contrib.nn.SyncBatchNorm``.

Data-parallel Gluon code runs one block on ``k`` contexts, one shard of the batch each::

    xs = gluon.utils.split_and_load(x, [mx.cpu(0), mx.cpu(1)])
    with autograd.record():
        ys = [bn(xi) for xi in xs]          # a plain loop: MXNet runs the k calls concurrently
    autograd.backward(ys, dys)

In training, per channel, over the union of the ``k`` shards (``n`` values, the GLOBAL
count)::

    n_d, mean_d, M2_d = count, mean, sum((x_d - mean_d)²) of device d's shard  (two-pass, local)
    n, mean, M2       = Chan's merge of every (n_d, mean_d, M2_d), in float64, in device order
    var               = M2 / n                                                 (biased)
    y_d               = gamma * (x_d - mean) / sqrt(var + eps) + beta
    running          <- the convention's update with mean and var (unbiased: M2 / (n - 1)),
                        computed once in float64: bit for bit the same on every context

and in backward, with ``xhat = (x - mean) / sqrt(var + eps)``::

    sum(dy), sum(dy * (x - mean))     summed over the k devices, in float64, in device order
    dx_d     = gamma / sqrt(var + eps) * (dy_d - sum(dy) / n - xhat_d * sum(dy * xhat) / n)
    dgamma_d = sum(dy_d * xhat_d), dbeta_d = sum(dy_d)     (device d's part: Gluon sums them)

so each device's ``dx`` is its rows of the full batch's, and the parts sum to the full batch's
parameter gradients.

How the devices meet. The math runs in a custom operator (as :class:`bnref.mxnet.BatchNorm`'s).
MXNet 1.9's threaded engines hand custom operators to a pool of Python threads that grows on
demand (one more whenever every thread is busy; ``MXNET_CUSTOM_OP_NUM_THREADS`` no longer
exists) and do not hold an engine thread while one runs, so the ``k`` operators of one step
run at the same time, each on its own thread (measured: k = 2..8). They meet at a rendezvous
of the block (a ``threading.Condition``), once in forward to exchange ``(count, mean, M2)``
and once in backward to exchange the two gradient sums; the last device to arrive merges for
all, so every device gets the same numbers. The arithmetic is :mod:`bnref.numpy`'s (the
oracle's functions) on the host: the operator only reads its inputs and writes its outputs,
and queues no MXNet operator of its own that could wait behind another device's. Every wait is
bounded by ``timeout`` seconds, after which every waiting device raises ``TimeoutError``,
which MXNet reports as an ``MXNetError`` at the next read or ``waitall()`` (and prints, naming
this layer, on stderr). Nothing is left half done: the next step starts afresh.

What it asks of the calling code (the built-in asks the same, and hangs where this raises):

- the ``num_devices`` calls of a step go to ``num_devices`` distinct contexts (two calls on one
  context wait for each other's running statistics), every output gets a backward, and
  nothing waits for a result between the devices' calls (an ``asnumpy()`` inside the loop);
- on CPU contexts, enough of MXNet's shared engine resources. Every CPU context draws its
  temporary workspaces from one pool of ``MXNET_CPU_TEMP_COPY`` (default 4) and its random
  numbers from ``MXNET_CPU_PARALLEL_RAND_COPY`` (default 1) generators, handed out in turn,
  and the engine runs the operators using one resource in the order they were queued. When an
  operator after device 0's SyncBatchNorm (which waits for device 1) is queued on a resource
  ahead of one before device 1's, neither can run. Measured: Dropout before and after the
  layer never runs on 2 CPU contexts; a 3-layer conv net with SyncBatchNorm does not run on 2
  or 4 CPU contexts with the defaults, nor with 16 workspaces on 4; it trains with
  ``MXNET_CPU_TEMP_COPY=64`` (both settings are read when MXNet starts). GPUs have their own
  resources each;
- hybridized with oneDNN operators next to it, ``hybridize(static_alloc=True,
  static_shape=True)``: with the default ``hybridize()``, MXNet 1.9.1 (oneDNN on) hands the
  custom operators of bnref's layers (BatchNorm's too) stale output gradients, where the
  static graph, the imperative block and ``MXNET_MKLDNN_ENABLED=0`` are right;
- on CPU contexts with oneDNN on, ``MXNET_MKLDNN_ENABLED=0`` when a oneDNN operator (a
  convolution) is next to the layer: MXNet 1.9.1 hands a custom operator a oneDNN-layout array
  as if it were plain (see :func:`bnref.mxnet.layer.plain_layout_copies`), and the copies that
  fix it for ``BatchNorm`` are extra operators on the shared engine resources above, which
  stopped 3 CPU contexts from meeting (measured); so with ``num_devices > 1`` the block makes
  no copies and warns at construction when oneDNN is on;
- not MXNet's ``NaiveEngine`` (``MXNET_ENGINE_TYPE=NaiveEngine``): it runs each call to the
  end before the next starts, so no device can wait for another (refused at construction).

Unlike the built-in, whose operator holds an engine thread and a workspace per device while
it waits (from k = 5 on it hangs unless ``MXNET_CPU_TEMP_COPY >= k``), a single layer runs on
any number of contexts (measured to 8).

Differences from ``mxnet.gluon.contrib.nn.SyncBatchNorm``, which averages each device's
``E[x]`` and ``E[x²]`` without weights and takes ``var = E[x²] - E[x]²``: uneven shards are
weighted by their counts (the built-in's statistics are wrong whenever the shards differ in
size), the variance is the stable two-pass one merged with Chan's update (the built-in's
cancels at large offsets), and a shard may be empty when MXNet's NumPy shape semantics are on
(``mx.util.set_np_shape(True)``; without them MXNet refuses zero-size arrays) and the block is
not hybridized (MXNet's cached graphs never run an operator on an empty input, or crash).
"""

from __future__ import annotations

import itertools
import math
import os
import re
import threading
import warnings
import weakref
from typing import Any

import mxnet as mx
import numpy as np
from mxnet import context, nd

from bnref._checks import check_batch_norm_args, relaxed_convention
from bnref.conventions import DEFAULT, Convention
from bnref.mxnet.functional import ARRAY_TYPE, _inspect
from bnref.mxnet.layer import BatchNorm, _BatchNormOp, _BatchNormProp, plain_layout_copies
from bnref.numpy.functional import (
    _float64,
    _gradient_sums,
    _input_gradient,
    _normalize,
    _split,
    channel_moments,
    compute_dtype,
)
from bnref.numpy.sync import _merge

__all__ = ["SyncBatchNorm"]

_OP = "bnref_sync_batch_statistics"


# -- the rendezvous ---------------------------------------------------------------------------


class _Round:
    """One exchange: each device's (order, payload), then the merged result or an error."""

    __slots__ = ("done", "entries", "error", "result")

    def __init__(self) -> None:
        self.entries: list[tuple[tuple, Any]] = []
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = False


class _Rendezvous:
    """Where the ``parties`` operators of one block meet: once per forward, once per backward.
    The last to arrive combines every payload (sorted by device) for all; the others wait for
    it, at most ``timeout`` seconds."""

    def __init__(self, name: str, parties: int, timeout: float) -> None:
        self.name, self.parties, self.timeout = name, parties, timeout
        self._cond = threading.Condition()
        self._rounds = {"forward": _Round(), "backward": _Round()}
        self._arrival = itertools.count()

    def exchange(self, phase: str, device: tuple[int, int], payload: Any, combine) -> Any:
        with self._cond:
            round_ = self._rounds[phase]
            round_.entries.append(((*device, next(self._arrival)), payload))
            if len(round_.entries) == self.parties:
                self._rounds[phase] = _Round()  # the next step's
                try:
                    round_.result = combine([p for _, p in sorted(round_.entries,
                                                                  key=lambda e: e[0])])
                except Exception as error:  # every device raises it
                    round_.error = error
                round_.done = True
                self._cond.notify_all()
            elif not self._cond.wait_for(lambda: round_.done, self.timeout):
                if self._rounds[phase] is round_:
                    self._rounds[phase] = _Round()  # late arrivals start afresh
                arrived = sorted(_device_name(order[:2]) for order, _ in round_.entries)
                round_.error = TimeoutError(
                    f"bnref.mxnet.SyncBatchNorm {self.name!r}: {len(round_.entries)} of "
                    f"num_devices={self.parties} devices reached its {phase} pass within "
                    f"{self.timeout} s (arrived: {', '.join(arrived)}). In each training step "
                    f"every one of {self.parties} distinct contexts must call the block (and "
                    "run backward on its output) before anything waits for a result; on CPU "
                    "contexts, MXNet may also have queued a missing device behind another's "
                    "later operators on a shared workspace or random generator: raise "
                    "MXNET_CPU_TEMP_COPY and MXNET_CPU_PARALLEL_RAND_COPY before MXNet starts "
                    "(see bnref.mxnet.sync)")
                round_.done = True
                self._cond.notify_all()
            if round_.error is not None:
                error = round_.error
                raise type(error)(*error.args)
            return round_.result


_RENDEZVOUS: dict[str, _Rendezvous] = {}
_KEYS = itertools.count()


def _device(ctx: Any) -> tuple[int, int]:
    """(device type id, device id) of a context or its string (create_operator gets
    ``"cpu(1)"``), for the device order."""
    if isinstance(ctx, mx.Context):
        return ctx.device_typeid, ctx.device_id
    match = re.fullmatch(r"(\w+)\((\d+)\)", str(ctx))
    kind, index = (match.group(1), int(match.group(2))) if match else (str(ctx), 0)
    return mx.Context.devstr2type.get(kind, 99), index


def _device_name(device: tuple[int, int]) -> str:
    return f"{mx.Context.devtype2str.get(device[0], 'device')}({device[1]})"


# -- the operator -----------------------------------------------------------------------------


def _host(array: nd.NDArray) -> np.ndarray:
    return array.asnumpy()


def _merge_forward(parts: list[tuple[int, np.ndarray, np.ndarray]], single_value_error: bool
                   ) -> tuple[int, np.ndarray, np.ndarray]:
    """(global count, mean, M2) of the devices' parts, merged in device order."""
    counts = [n for n, _, _ in parts]
    total = sum(counts)
    if single_value_error and total == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got 1 value per channel "
            f"over the {len(parts)} devices (per-device counts {counts})")
    if total == 0:
        return 0, parts[0][1], parts[0][2]
    # bnref.numpy.merge_moments' pairwise Chan merge, without its argument checks: a NaN in
    # the data flows through to y, as in the unsynchronized layer, instead of raising.
    _, mean, m2 = _merge([(np.full(mean.shape, float(n)), mean, m2) for n, mean, m2 in parts])
    return total, mean, m2


def _sum_backward(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    dy_sum, dy_x_sum = parts[0]
    for a, b in parts[1:]:
        dy_sum, dy_x_sum = dy_sum + a, dy_x_sum + b
    return dy_sum, dy_x_sum


class _Synced:
    """What the synchronized backward needs from the forward (host arrays)."""

    def __init__(self, x3, gamma, mean, inv_std, total) -> None:
        self.x3 = x3  # this device's shard, (before, C, after) in the compute dtype
        self.gamma = gamma  # float64, or None when the layer ignores gamma
        self.mean = mean  # the global mean, float64
        self.inv_std = inv_std  # 1 / sqrt(var + eps) with the global variance, float64
        self.total = total  # the global count


class _SyncBatchNormOp(_BatchNormOp):
    """:class:`_BatchNormOp`, with the statistics and gradient sums of every device's shard in
    training. Outside training, or with ``use_global_stats``, exactly :class:`_BatchNormOp`.

    The synchronized math runs on the host, with :mod:`bnref.numpy`'s functions (the
    oracle's): the operator reads its inputs and writes its outputs and pushes no other
    MXNet operator, so while it waits for the other devices it can never be queued behind
    one of their successors on an engine resource (see the module's notes)."""

    def __init__(self, prop: _SyncBatchNormProp, device: tuple[int, int],
                 rendezvous: _Rendezvous | None) -> None:
        super().__init__(prop)
        self.device = device
        # Held from creation: a backward still queued when the block is deleted can finish.
        self.rendezvous = rendezvous
        self.synced: _Synced | None = None

    def _rendezvous(self) -> _Rendezvous:
        if self.rendezvous is None:
            raise RuntimeError(f"bnref.mxnet.SyncBatchNorm: no live block has key "
                               f"{self.prop.key!r}")
        return self.rendezvous

    def forward(self, is_train, req, in_data, out_data, aux) -> None:
        p = self.prop
        if not (is_train and p.use_batch):
            self.synced = None
            return super().forward(is_train, req, in_data, out_data, aux)
        self.saved, self.inference = None, None
        before, channels, after = in_data[0].shape
        count = before * after
        # An empty shard is never read: MXNet's operators refuse zero sizes.
        x3 = _host(in_data[0]) if count else None
        dtype = compute_dtype(in_data[0].dtype)
        if count:
            mean, var = channel_moments(x3, dtype)  # two-pass, blockwise (bnref.numpy)
            part = (count, mean, var * count)
        else:
            part = (0, np.zeros(channels), np.zeros(channels))
        total, mean, m2 = self._rendezvous().exchange(
            "forward", self.device, part,
            lambda parts: _merge_forward(parts, p.conv.single_value_error))
        if total == 0:  # no value anywhere: nothing to normalise, statistics unchanged
            self.synced = _Synced(None, None, mean, np.zeros(channels), 0)
            return
        var = m2 / total
        inv_std = 1.0 / np.sqrt(var + p.eps)
        gamma = _host(in_data[1]).astype(np.float64) if p.use_gamma else None
        self.synced = _Synced(x3, gamma, mean, inv_std, total)
        if count:
            # bnref.numpy.sync_batch_norm's normalisation: (x - hi) * scale + (beta - lo *
            # scale), the global mean = hi + lo split at the compute dtype.
            hi, lo = _split(mean, dtype)
            scale = _float64(gamma, 1.0, channels) * inv_std
            beta = _host(in_data[2]) if p.use_beta else None
            shift = _float64(beta, 0.0, channels) - lo * scale
            y3 = np.empty(x3.shape, dtype)
            _normalize(x3, hi, scale.astype(dtype), shift.astype(dtype), y3)
            out_data[0][:] = y3
        if aux:
            self._track(aux, mean, var, total)

    def _track(self, aux, mean: np.ndarray, var: np.ndarray, total: int) -> None:
        """The running statistics' recurrence in float64 from this context's old values,
        rounded once: the same numbers on every context."""
        p, conv = self.prop, self.prop.conv
        estimate = conv.running_var_estimate(var, total)
        old_mean, old_var = (_host(a).astype(np.float64) for a in aux[:2])
        if p.momentum is None:  # PyTorch's cumulative average: the k-th batch weighs 1/k
            batches = _host(aux[2]).astype(np.float64) + 1
            weight = 1.0 / batches
            new_mean = (1.0 - weight) * old_mean + weight * mean
            new_var = (1.0 - weight) * old_var + weight * estimate
            aux[2][:] = batches.astype(aux[2].dtype)
        else:
            momentum = np.float64(p.momentum)
            new_mean = conv.update_running(old_mean, mean, momentum)
            new_var = conv.update_running(old_var, estimate, momentum)
        aux[0][:] = new_mean.astype(aux[0].dtype)
        aux[1][:] = new_var.astype(aux[1].dtype)

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux) -> None:
        s = self.synced
        if s is None:
            return super().backward(req, out_grad, in_data, out_data, in_grad, aux)
        channels = in_data[0].shape[1]
        zeros = np.zeros(channels)
        dy3 = None
        if s.x3 is not None:
            dy3 = _host(out_grad[0])
            dy_sum, dy_x_sum = _gradient_sums(s.x3, dy3, s.mean)  # float64 (bnref.numpy)
        else:
            dy_sum, dy_x_sum = zeros, zeros
        total_dy, total_dy_x = self._rendezvous().exchange(
            "backward", self.device, (dy_sum, dy_x_sum), _sum_backward)
        if dy3 is not None:
            # bnref.numpy.sync_batch_norm_backward's dx, with the sums of every device:
            # dx = k * dy - k * sum(dy) / n - (k * inv_std * sum(dy * xhat) / n) * (x - mean)
            n = float(s.total)
            k = _float64(s.gamma, 1.0, channels) * s.inv_std
            x_scale = -k * s.inv_std * (total_dy_x * s.inv_std) / n
            dx3 = np.empty(s.x3.shape, s.x3.dtype)
            _input_gradient(s.x3, dy3, s.mean, k, x_scale, -k * total_dy / n, dx3)
            self.assign(in_grad[0], req[0], nd.array(dx3, ctx=in_grad[0].context,
                                                     dtype=in_grad[0].dtype))
        for grad, request, part in ((in_grad[1], req[1], dy_x_sum * s.inv_std),
                                    (in_grad[2], req[2], dy_sum)):  # this device's parts
            self.assign(grad, request, nd.array(part, ctx=grad.context, dtype=grad.dtype))


@mx.operator.register(_OP)
class _SyncBatchNormProp(_BatchNormProp):
    def __init__(self, convention: str, momentum: str, eps: str, use_batch: str,
                 use_gamma: str, use_beta: str, aux: str, key: str) -> None:
        super().__init__(convention, momentum, eps, use_batch, use_gamma, use_beta, aux)
        self.key = key

    def create_operator(self, ctx, shapes, dtypes):
        return _SyncBatchNormOp(self, _device(ctx), _RENDEZVOUS.get(self.key))


# -- the block --------------------------------------------------------------------------------


class SyncBatchNorm(BatchNorm):
    """Batch normalization with the statistics of every device's shard: a drop-in for
    ``mxnet.gluon.contrib.nn.SyncBatchNorm`` that gets uneven shards and large offsets right.

    In training (inside ``autograd.record()``, without ``use_global_stats``), the
    ``num_devices`` calls of one step -- one per context, each on its shard of the batch --
    normalise with the mean and biased variance of the union of their shards::

        y = gamma * (x - mean) / sqrt(var + epsilon) + beta

    merged from each device's two-pass ``(count, mean, M2)`` with Chan et al.'s parallel
    update in float64 (``bnref.numpy.merge_moments``), weighted by the counts, never through
    E[x²] - E[x]². The running statistics move in the forward pass (as
    :class:`bnref.mxnet.BatchNorm`'s; the built-in's move in backward) by the convention's
    rule with those statistics, identically on every context. The backward sums ``sum(dy)``
    and ``sum(dy * (x - mean))`` over the devices, so each context's input gradient is its
    rows of the full batch's and its gamma/beta gradients its part of the full batch's
    (Gluon's ``Trainer`` sums them over the contexts).

    Outside training, with ``use_global_stats=True`` or with ``num_devices=1`` it is exactly
    :class:`bnref.mxnet.BatchNorm`: nothing is exchanged, nothing waits.

    Differences from the built-in: it averages the devices' ``E[x]`` and ``E[x²]`` without
    weights, so uneven shards get wrong statistics (3 + 5 rows of a well-conditioned batch:
    ``y`` off by 0.19, ``dx`` by 0.36), and its one-pass variance cancels at large offsets (at
    1e4 in float32 a channel's variance comes out 0: ``y`` off by 1.3e3); measured in
    ``tests/test_mxnet_sync.py``. Here shards may be uneven, and empty
    under MXNet's NumPy shape semantics (``mx.util.set_np_shape(True)``; MXNet's legacy
    shapes have no zero size) when the block is not hybridized.

    The arguments are the built-in's, in its order (``num_devices``: default the number of
    GPUs, or 1, with the built-in's warning), and parameters are named ``gamma``, ``beta``,
    ``running_mean``, ``running_var``, so ``save_parameters``/``load_parameters`` files move
    between the two. Keyword-only additions: :class:`bnref.mxnet.BatchNorm`'s ``axis``
    (default the convention's: 1 under mxnet; the built-in has only 1), ``num_features``,
    ``track_running_stats`` and ``convention``, and ``timeout``: how many seconds a device
    waits for the others before raising (instead of hanging, as the built-in does).

    How the devices meet, and what that asks of the calling code: see :mod:`bnref.mxnet.sync`.
    In short: distinct contexts, a backward for every output, no read between the devices'
    calls; on CPU contexts, ``MXNET_CPU_TEMP_COPY`` (and ``MXNET_CPU_PARALLEL_RAND_COPY`` with
    Dropout) raised for a real network, e.g. to 64, before MXNet starts; hybridized,
    ``hybridize(static_alloc=True, static_shape=True)``. Where the devices cannot meet, it
    raises after ``timeout`` seconds.
    """

    def __init__(
        self,
        in_channels: int = 0,
        num_devices: int | None = None,
        momentum: float | None = DEFAULT,  # type: ignore[assignment]
        epsilon: float | None = None,
        center: bool = True,
        scale: bool = True,
        use_global_stats: bool = False,
        beta_initializer: Any = "zeros",
        gamma_initializer: Any = "ones",
        running_mean_initializer: Any = "zeros",
        running_variance_initializer: Any = "ones",
        *,
        axis: int | None = None,
        num_features: int | None = None,
        track_running_stats: bool = True,
        convention: str | Convention = "mxnet",
        timeout: float = 60.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(axis, momentum, epsilon, center, scale, use_global_stats,
                         beta_initializer, gamma_initializer, running_mean_initializer,
                         running_variance_initializer, in_channels, num_features=num_features,
                         track_running_stats=track_running_stats, convention=convention,
                         **kwargs)
        if num_devices is None:  # the built-in's default, and its warning
            warnings.warn("Caution using SyncBatchNorm: if not using all the GPUs, please "
                          "mannually set num_devices", UserWarning, stacklevel=2)
            num_devices = max(context.num_gpus(), 1)
        if isinstance(num_devices, bool) or not isinstance(num_devices, (int, np.integer)) \
                or num_devices < 1:
            raise ValueError(f"num_devices must be a positive int, got {num_devices!r}")
        if num_devices > 1 and os.environ.get("MXNET_ENGINE_TYPE", "").startswith("Naive"):
            raise ValueError(
                f"SyncBatchNorm(num_devices={num_devices}) cannot run on MXNet's NaiveEngine "
                "(MXNET_ENGINE_TYPE=NaiveEngine): it finishes each device's call before the "
                "next one starts, so no device can wait for the others' statistics")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
                or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.num_devices, self.timeout = int(num_devices), float(timeout)
        if self.num_devices > 1 and plain_layout_copies():
            warnings.warn(
                f"bnref.mxnet.SyncBatchNorm(num_devices={self.num_devices}) with oneDNN on: "
                "MXNet 1.9.1 hands a custom operator the output of a oneDNN operator (a "
                "convolution) on a CPU context in oneDNN's layout as if it were plain, and the "
                "copies bnref's BatchNorm makes against it would stall the devices' meeting; "
                "set MXNET_MKLDNN_ENABLED=0 before MXNet starts when a convolution is next to "
                "this layer on CPU contexts", RuntimeWarning, stacklevel=2)
        self._key = f"{self.prefix}#{next(_KEYS)}"  # unique even if prefixes repeat
        if self.num_devices > 1:
            _RENDEZVOUS[self._key] = _Rendezvous(self.prefix, self.num_devices, self.timeout)
            weakref.finalize(self, _RENDEZVOUS.pop, self._key, None)

    def _synchronized(self, training: bool) -> bool:
        return training and self.num_devices > 1 and not self.use_global_stats

    def _check_input(self, x: nd.NDArray, training: bool) -> None:
        if not self._synchronized(training):
            return super()._check_input(x, training)
        # The single-value rule is the union's (checked by the operator), and a shard may be
        # empty where MXNet has zero sizes.
        check_batch_norm_args(
            x, None, None, None, None, training=training,
            momentum=0.0 if self.momentum is None else self.momentum, eps=self.epsilon,
            axis=self.axis, convention=relaxed_convention(self.convention), inspect=_inspect,
            array_type=ARRAY_TYPE, allow_empty=mx.util.is_np_shape())
        if 0 in x.shape and self._active:
            # A cached graph skips the operator of an empty input (the others would wait for
            # it), or dies of a floating-point exception (measured, MXNet 1.9.1).
            raise ValueError(
                f"an empty shard (shape {tuple(x.shape)}) cannot run through a hybridized "
                "SyncBatchNorm: MXNet's cached graph never runs the operator for it; call "
                "the block without hybridize() when a device may get no rows")

    def hybrid_forward(self, F, x, gamma, beta, running_mean=None, running_var=None,
                       num_batches_tracked=None):
        if not (isinstance(x, nd.NDArray) and x.size == 0):
            return super().hybrid_forward(F, x, gamma, beta, running_mean, running_var,
                                          num_batches_tracked)
        # An empty shard (NumPy shape semantics): BatchNorm's graph, with NumPy reshapes to
        # and from the (before, C, after) view (the legacy reshape reads a 0 as "keep").
        dtype = "float64" if self._data_dtype == "float64" else "float32"
        shape, axis = x.shape, self.axis % x.ndim
        view = (math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:]))
        wide = x if dtype == self._data_dtype else F.cast(x, dtype)
        x3 = wide.as_np_ndarray().reshape(view).as_nd_ndarray()
        aux = [a for a in (running_mean, running_var, num_batches_tracked) if a is not None]
        y3 = F.Custom(x3, gamma, beta, *aux, **self._custom_attrs(len(aux)))
        y = y3.as_np_ndarray().reshape(shape).as_nd_ndarray()
        return y if dtype == self._data_dtype else F.cast(y, self._data_dtype)

    def _plain_layout_copies(self) -> bool:
        # Extra operators on the shared engine resources can stop the devices from meeting.
        return self.num_devices == 1 and super()._plain_layout_copies()

    def _custom_attrs(self, aux: int) -> dict[str, str]:
        attrs = super()._custom_attrs(aux)
        if self.num_devices > 1:  # else exactly BatchNorm's operator
            attrs.update(op_type=_OP, key=self._key)
        return attrs
