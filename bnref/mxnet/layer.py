"""``bnref.mxnet.BatchNorm``: a Gluon ``HybridBlock``, drop-in for ``mxnet.gluon.nn.BatchNorm``.

A hybridized graph is traced once and must pick batch or running statistics at run time, and
update the running statistics in place, which graph operations cannot do. One small custom
operator does both (``_BatchStatistics``): given the ``(before, C, after)`` view of ``x`` and
the running statistics as auxiliary states -- the way MXNet's own BatchNorm operator holds them
-- it returns the batch ``(mean, var)`` and moves the running statistics when MXNet says it is
training (``is_train``: inside ``autograd.record()``), and returns the running statistics
otherwise. Its backward is the analytic gradient of the mean and variance. The normalisation
around it is ordinary graph operations, shared with :func:`bnref.mxnet.batch_norm`.
"""

from __future__ import annotations

import atexit
from typing import Any

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon, nd

from bnref._checks import check_batch_norm_args, check_bool, check_layer_args
from bnref.conventions import DEFAULT, Convention, get_convention
from bnref.mxnet.functional import (
    ARRAY_TYPE,
    _inspect,
    channel_sums,
    moments,
    normalise,
    to_view,
)

__all__ = ["BatchNorm"]

_OP = "bnref_batch_statistics"


@atexit.register
def _drain_before_mxnet_shuts_down() -> None:
    # Registered after mxnet's own exit hook, so it runs first (atexit is last-in, first-out):
    # MXNet 1.9.1's shutdown can hang while custom-operator work is still queued (measured:
    # about 1 exit in 10 without this).
    nd.waitall()


class _BatchStatistics(mx.operator.CustomOp):
    """Training: pass the batch ``(mean, var)`` through and move the running statistics (the
    auxiliary states). Otherwise: return the running statistics, which are constants."""

    def __init__(self, convention: str, momentum: float | None, use_batch: bool) -> None:
        super().__init__()
        self.convention = get_convention(convention)
        self.momentum, self.use_batch = momentum, use_batch
        self.batch = False

    def forward(self, is_train, req, in_data, out_data, aux) -> None:
        self.batch = bool(is_train) and self.use_batch
        if not self.batch:
            self.assign(out_data[0], req[0], aux[0])
            self.assign(out_data[1], req[1], aux[1])
            return
        mean, var, count = in_data
        conv = self.convention
        estimate = conv.running_var_estimate(var, float(count.asscalar()))
        if self.momentum is None:  # PyTorch's cumulative average: the k-th batch weighs 1/k
            aux[2][:] = aux[2] + 1
            weight = 1.0 / aux[2]
            aux[0][:] = nd.broadcast_add(nd.broadcast_mul(1.0 - weight, aux[0]),
                                         nd.broadcast_mul(weight, mean))
            aux[1][:] = nd.broadcast_add(nd.broadcast_mul(1.0 - weight, aux[1]),
                                         nd.broadcast_mul(weight, estimate))
        else:
            # As an array: MXNet refuses subnormal scalars as operator parameters.
            momentum = nd.array([self.momentum], dtype=mean.dtype)
            aux[0][:] = conv.update_running(aux[0], mean, momentum)
            aux[1][:] = conv.update_running(aux[1], estimate, momentum)
        self.assign(out_data[0], req[0], mean)
        self.assign(out_data[1], req[1], var)

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux) -> None:
        for i, data in enumerate(in_data):
            self.assign(in_grad[i], req[i],
                        out_grad[i] if self.batch and i < 2 else nd.zeros_like(data))


@mx.operator.register(_OP)
class _BatchStatisticsProp(mx.operator.CustomOpProp):
    def __init__(self, convention: str, momentum: str, use_batch: str, counter: str) -> None:
        super().__init__(need_top_grad=True)
        self.convention = convention
        self.momentum = None if momentum == "None" else float(momentum)
        self.use_batch = use_batch == "True"
        self.counter = counter == "True"

    def list_arguments(self) -> list[str]:
        return ["mean", "var", "count"]

    def list_outputs(self) -> list[str]:
        return ["mean", "var"]

    def list_auxiliary_states(self) -> list[str]:
        return ["running_mean", "running_var"] + (["num_batches_tracked"] if self.counter else [])

    def infer_shape(self, in_shape):
        channels = in_shape[0]
        aux = [channels, channels] + ([[1]] if self.counter else [])
        return in_shape, [channels, channels], aux

    def infer_type(self, in_type):
        dtype = in_type[0]
        return in_type, [dtype, dtype], [dtype] * (3 if self.counter else 2)

    def create_operator(self, ctx, shapes, dtypes):
        return _BatchStatistics(self.convention, self.momentum, self.use_batch)


class BatchNorm(gluon.HybridBlock):
    """Batch normalization over every axis but ``axis``, with Gluon's parameters and modes.

    ``y = gamma * (x - mean) / sqrt(var + epsilon) + beta``. Inside ``autograd.record()``
    (Gluon's training mode) the layer uses the biased batch statistics and moves
    ``running_mean``/``running_var`` by the convention's rule (default mxnet:
    ``new = momentum * old + (1 - momentum) * batch``, biased variance); outside it, or with
    ``use_global_stats=True``, it uses the running statistics.

    **When the running statistics move:** in the forward pass, as in every other framework.
    ``mxnet.gluon.nn.BatchNorm`` moves them during ``backward()`` instead, and not at all when
    no backward runs (a forward under ``autograd.record()`` alone leaves them unchanged).

    The arguments are the built-in's, in its order, plus ``convention=``: omitted ``axis``,
    ``momentum`` and ``epsilon`` are the convention's defaults (mxnet: 1, 0.9, 1e-5; note the
    ``mx.nd.BatchNorm`` operator's own default eps is 1e-3). Parameters are named ``gamma``,
    ``beta``, ``running_mean``, ``running_var``, so ``save_parameters``/``load_parameters``
    files move between the two. ``scale=False`` ignores gamma and ``center=False`` ignores
    beta (both stay, untrained, so parameter files still match). Additions the built-in lacks:
    ``momentum=None`` is PyTorch's cumulative average (an extra ``num_batches_tracked``
    parameter, kept as a float in the statistics' dtype), and ``track_running_stats=False``
    keeps no running statistics; ``num_features`` is ``in_channels`` under the name the other
    bnref layers use (and, unlike ``in_channels=0``, never means "infer"). Running statistics
    are kept in the computation's dtype: float32 for float16/float32 data (``cast("float16")``
    keeps them float32, as the built-in's does), float64 for float64.
    """

    def __init__(
        self,
        axis: int | None = None,
        momentum: float | None = DEFAULT,  # type: ignore[assignment]
        epsilon: float | None = None,
        center: bool = True,
        scale: bool = True,
        use_global_stats: bool = False,
        beta_initializer: Any = "zeros",
        gamma_initializer: Any = "ones",
        running_mean_initializer: Any = "zeros",
        running_variance_initializer: Any = "ones",
        in_channels: int = 0,
        *,
        num_features: int | None = None,
        track_running_stats: bool = True,
        convention: str | Convention = "mxnet",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        args = check_layer_args(num_features if num_features is not None else in_channels or 1,
                                momentum=momentum, eps=epsilon, convention=convention)
        in_channels = num_features if num_features is not None else in_channels
        self.convention = args.convention
        self.momentum, self.epsilon = args.momentum, args.eps
        self.axis = self.convention.default_axis if axis is None else axis
        if isinstance(self.axis, bool) or not isinstance(self.axis, int):
            raise TypeError(f"axis must be an int or None, got {axis!r}")
        self.center, self.scale = check_bool("center", center), check_bool("scale", scale)
        self.use_global_stats = check_bool("use_global_stats", use_global_stats)
        self.track_running_stats = check_bool("track_running_stats", track_running_stats)
        # The data's dtype: seen on every imperative call, else set by cast() (inside a
        # hybridized parent the block sees symbols, whose dtype is unknown when traced).
        self._data_dtype = "float32"
        shape = (in_channels,)
        with self.name_scope():
            self.gamma = self.params.get("gamma", grad_req="write" if scale else "null",
                                         shape=shape, init=gamma_initializer,
                                         allow_deferred_init=True, differentiable=scale)
            self.beta = self.params.get("beta", grad_req="write" if center else "null",
                                        shape=shape, init=beta_initializer,
                                        allow_deferred_init=True, differentiable=center)
            if self.track_running_stats:
                self.running_mean = self.params.get(
                    "running_mean", grad_req="null", shape=shape, init=running_mean_initializer,
                    allow_deferred_init=True, differentiable=False)
                self.running_var = self.params.get(
                    "running_var", grad_req="null", shape=shape,
                    init=running_variance_initializer, allow_deferred_init=True,
                    differentiable=False)
                if self.momentum is None:
                    self.num_batches_tracked = self.params.get(
                        "num_batches_tracked", grad_req="null", shape=(1,), init="zeros",
                        differentiable=False)

    def cast(self, dtype: Any) -> None:
        # As the built-in: float16 data keeps float32 parameters and statistics.
        self._data_dtype = np.dtype(dtype).name
        super().cast("float32" if np.dtype(dtype) == np.float16 else dtype)

    def infer_shape(self, x: nd.NDArray, *args: Any) -> None:
        channels = x.shape[self.axis]
        for param in (self.gamma, self.beta, getattr(self, "running_mean", None),
                      getattr(self, "running_var", None)):
            if param is not None:
                param.shape = (channels,)

    def forward(self, x, *args):
        if isinstance(x, nd.NDArray):  # imperative, or the top of a hybridized graph
            self._data_dtype = np.dtype(x.dtype).name
            check_batch_norm_args(
                x, None, None, None, None, training=bool(autograd.is_training()),
                momentum=0.0 if self.momentum is None else self.momentum, eps=self.epsilon,
                axis=self.axis, convention=self.convention, inspect=_inspect,
                array_type=ARRAY_TYPE)
        return super().forward(x, *args)

    def hybrid_forward(self, F, x, gamma, beta, running_mean=None, running_var=None,
                       num_batches_tracked=None):
        dtype = "float64" if self._data_dtype == "float64" else "float32"
        x3 = to_view(F, x if dtype == self._data_dtype else F.cast(x, dtype), self.axis)
        # Values per channel, in the computation's dtype, from the graph itself.
        count = channel_sums(F, F.ones_like(F.slice_axis(x3, axis=1, begin=0, end=1)))
        mean, var = moments(F, x3, count)
        if running_mean is not None:
            aux = [running_mean, running_var] + (
                [num_batches_tracked] if num_batches_tracked is not None else [])
            stats = F.Custom(mean, var, count, *aux, op_type=_OP,
                             convention=self.convention.name, momentum=str(self.momentum),
                             use_batch=str(not self.use_global_stats),
                             counter=str(num_batches_tracked is not None))
            mean, var = stats[0], stats[1]
        y = normalise(F, x3, mean, var, gamma if self.scale else None,
                      beta if self.center else None, self.epsilon)
        y = F.reshape_like(y, x)
        return y if dtype == self._data_dtype else F.cast(y, self._data_dtype)
