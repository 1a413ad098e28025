"""``bnref.mxnet.BatchNorm``: a Gluon ``HybridBlock``, drop-in for ``mxnet.gluon.nn.BatchNorm``.

A hybridized graph is traced once and must pick batch or running statistics at run time, and
update the running statistics in place, which graph operations cannot do. So the math runs in
one custom operator (``_BatchNormOp``) over the ``(before, C, after)`` view of ``x``, with the
running statistics as auxiliary states -- the way MXNet's own BatchNorm operator holds them. It
uses the batch statistics and moves the running ones when MXNet says it is training
(``is_train``: inside ``autograd.record()``), and the running statistics otherwise. Its forward
and analytic backward are the functions of :mod:`bnref.mxnet.functional`, written in
``mx.nd`` operations and shared with :func:`bnref.mxnet.batch_norm`.
"""

from __future__ import annotations

import atexit
import os
import warnings
from typing import Any

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon, nd

from bnref._checks import check_batch_norm_args, check_bool, check_layer_args
from bnref.conventions import DEFAULT, Convention, get_convention
from bnref.mxnet.functional import (
    ARRAY_TYPE,
    Saved,
    _inspect,
    affine,
    center,
    channel_dots,
    channel_sums,
    inference_forward,
    running_weights,
    to_view,
    train_backward,
    train_forward,
    update_running_into,
)

__all__ = ["BatchNorm"]

_OP = "bnref_batch_statistics"


@atexit.register
def _drain_before_mxnet_shuts_down() -> None:
    # Registered after mxnet's own exit hook, so it runs first (atexit is last-in, first-out):
    # MXNet 1.9.1's shutdown can hang while custom-operator work is still queued (measured:
    # about 1 exit in 10 without this).
    nd.waitall()


def _onednn_active() -> bool:
    return (mx.runtime.Features().is_enabled("MKLDNN")
            and os.environ.get("MXNET_MKLDNN_ENABLED", "1") != "0")


def plain_layout_copies() -> bool:
    """Whether bnref's layers copy ``x`` before their custom operator and ``y`` after it
    (so ``dy`` too, in the backward): with oneDNN on.

    MXNet 1.9.1 hands a Python custom operator an array a oneDNN operator wrote in its blocked
    layout as if it were plain. Measured with a custom operator that only doubles its input,
    right after ``Conv2D``, imperatively: 12 of 20 outputs garbage (values of 1e29), and
    bnref's layer there off by up to 65 or NaN, different from run to run; a ``ReLU`` or a
    convolution after the operator does the same to ``dy``. An ``identity`` (a copy) on
    each side gives 0 of 20, and training runs that equal the oneDNN-off ones bit for bit.
    The copies cost a read and a write of ``x`` and of ``y`` forward, of ``dy`` and ``dx``
    backward; ``MXNET_MKLDNN_ENABLED=0`` needs none.
    """
    return _onednn_active()


def hybridization_hazards(flags: dict[str, Any], block: str = "BatchNorm") -> list[str]:
    """What MXNet 1.9.1 gets wrong for a Python custom operator -- bnref's layers run in one,
    as any ``mx.operator.CustomOp`` does -- inside a graph hybridized with ``flags``.

    Measured with a custom operator that only doubles its input, in Conv2D -> op -> ReLU ->
    GlobalAvgPool2D -> Dense, 20 training steps against the same net run imperatively:

    - with oneDNN on (the pip build's default), ``hybridize()`` and
      ``hybridize(static_alloc=True)`` handed the operator's backward garbage output
      gradients or dropped its input gradients in 13-19 of 20 steps (0 of 20 with
      ``MXNET_MKLDNN_ENABLED=0``, and 0 of 20 with ``static_shape=True`` too);
    - with ``static_shape=True``, MXNet's static executor overwrote the running statistics
      the operator had just written whenever the operator ran late (a 0.2 s delay in its
      forward lost every update; oneDNN on or off).

    Imperative use (no ``hybridize``) is unaffected by these two. The layout mix-up of
    :func:`plain_layout_copies` hits imperative use as well; the layer's copies handle it.
    """
    hazards = []
    if flags.get("static_shape"):
        hazards.append(
            f"bnref.mxnet.{block} in a graph hybridized with static_shape=True: MXNet 1.9.1's "
            "static executor can overwrite the running statistics a custom operator has "
            "just written (measured when the operator runs late); hybridize without "
            "static_shape, or call the block imperatively")
    elif _onednn_active():
        hazards.append(
            f"bnref.mxnet.{block} in a hybridized graph with oneDNN on: MXNet 1.9.1 can hand "
            "a Python custom operator's backward wrong output gradients when oneDNN "
            "operators such as pooling follow it (measured with a trivial custom operator "
            "before GlobalAvgPool2D: 13-19 of 20 steps wrong). Set MXNET_MKLDNN_ENABLED=0 "
            "before MXNet starts, or call the block imperatively")
    return hazards


class _BatchNormOp(mx.operator.CustomOp):
    """The layer's math on the ``(before, C, after)`` view. Training (``is_train``, not
    ``use_global_stats``): batch statistics, and the running statistics (auxiliary states)
    move. Otherwise: the running statistics. Backward is analytic in both modes.

    With the property's ``axis`` set, the operator takes ``x`` (and gives ``y`` and ``dx``) in
    its own shape and views it here, outside any recording: a reshape recorded around the
    operator would copy the whole gradient in backward, once on each side. Without it (the
    subclasses' operators) its input is the view already."""

    def __init__(self, prop: _BatchNormProp) -> None:
        super().__init__()
        self.prop = prop
        self.saved: Saved | None = None
        self.inference: tuple[nd.NDArray, nd.NDArray] | None = None

    def _view(self, array: nd.NDArray) -> nd.NDArray:
        axis = self.prop.axis
        return array if axis is None else to_view(nd, array, axis)

    def forward(self, is_train, req, in_data, out_data, aux) -> None:
        p = self.prop
        x3, gamma, beta = self._view(in_data[0]), in_data[1], in_data[2]
        gamma, beta = (gamma if p.use_gamma else None), (beta if p.use_beta else None)
        # Written straight into the output (req is "write" for a forward).
        y3 = self._view(out_data[0])
        if aux and not (is_train and p.use_batch):
            _, rstd = inference_forward(x3, gamma, beta, aux[0], aux[1], p.eps, y3)
            self.saved, self.inference = None, (aux[0].copy(), rstd)
            return
        _, mean, var, self.saved = train_forward(x3, gamma, beta, p.eps, y3)
        self.inference = None
        if aux and is_train:
            conv = p.conv
            estimate = conv.running_var_estimate(var, x3.shape[0] * x3.shape[2])
            if p.momentum is None:  # PyTorch's cumulative average: the k-th batch weighs 1/k
                aux[2][:] = aux[2] + 1
                weight = 1.0 / aux[2]
                aux[0][:] = nd.broadcast_add(nd.broadcast_mul(1.0 - weight, aux[0]),
                                             nd.broadcast_mul(weight, mean))
                aux[1][:] = nd.broadcast_add(nd.broadcast_mul(1.0 - weight, aux[1]),
                                             nd.broadcast_mul(weight, estimate))
            else:  # the convention's rule, with its weights made once
                weights = running_weights(conv, p.momentum, mean.dtype, mean.context)
                update_running_into(aux[0], mean, weights)
                update_running_into(aux[1], estimate, weights)

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux) -> None:
        dy3 = self._view(out_grad[0])
        # dx goes straight into in_grad when it is to be overwritten (it also holds
        # dy * (x - mean) on the way); "add" and the rest go through assign.
        direct = req[0] == "write"
        dx_out = self._view(in_grad[0]) if direct else None
        need_dx = req[0] != "null"
        # Likewise the parameters' gradients.
        grads = tuple(grad if request == "write" else None
                      for grad, request in zip(in_grad[1:], req[1:], strict=True))
        if self.saved is not None:
            dx, dgamma, dbeta = train_backward(dy3, self.saved, dx_out, need_dx, grads)
        else:  # inference: y = (x - mean) * gamma * rstd + beta, statistics constant
            mean, rstd = self.inference
            dbeta = channel_sums(dy3, out=grads[1])
            dots = channel_dots(dy3, center(self._view(in_data[0]), mean), work=dx_out)
            dgamma = nd.elemwise_mul(dots, rstd, out=grads[0])
            scale = rstd * in_data[1] if self.prop.use_gamma else rstd
            dx = affine(dy3, scale, None, dx_out) if need_dx else None
        if need_dx and not direct:
            self.assign(in_grad[0], req[0], dx.reshape(in_grad[0].shape))
        for grad, request, value, written in zip(in_grad[1:], req[1:], (dgamma, dbeta), grads,
                                                 strict=True):
            if written is None:
                self.assign(grad, request, value)


@mx.operator.register(_OP)
class _BatchNormProp(mx.operator.CustomOpProp):
    def __init__(self, convention: str, momentum: str, eps: str, use_batch: str,
                 use_gamma: str, use_beta: str, aux: str, axis: str = "None") -> None:
        super().__init__(need_top_grad=True)
        self.conv = get_convention(convention)
        self.momentum = None if momentum == "None" else float(momentum)
        self.eps = float(eps)
        self.use_batch, self.use_gamma = use_batch == "True", use_gamma == "True"
        self.use_beta = use_beta == "True"
        self.aux = int(aux)  # 0: no running statistics; 2; 3: with the batch counter
        # The channel axis of x as given; None: x is the (before, C, after) view already.
        self.axis = None if axis == "None" else int(axis)

    def list_arguments(self) -> list[str]:
        return ["data", "gamma", "beta"]

    def list_outputs(self) -> list[str]:
        return ["output"]

    def list_auxiliary_states(self) -> list[str]:
        return ["running_mean", "running_var", "num_batches_tracked"][:self.aux]

    def infer_shape(self, in_shape):
        channels = [in_shape[0][1 if self.axis is None else self.axis]]
        aux = [channels, channels, [1]][:self.aux]
        return [in_shape[0], channels, channels], [in_shape[0]], aux

    def infer_type(self, in_type):
        dtype = in_type[0]
        return [dtype] * 3, [dtype], [dtype] * self.aux

    def create_operator(self, ctx, shapes, dtypes):
        return _BatchNormOp(self)


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
        args = check_layer_args(num_features, momentum=momentum, eps=epsilon,
                                convention=convention, axis=axis, features_optional=True)
        in_channels = num_features if num_features is not None else in_channels
        self.convention, self.momentum, self.epsilon = args.convention, args.momentum, args.eps
        self.axis = args.axis
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

    def hybridize(self, active: bool = True, **kwargs: Any) -> None:
        """Gluon's ``hybridize`` (a hybridized parent calls it with its own flags), with a
        warning where MXNet 1.9.1 runs Python custom operators wrongly (see
        :func:`hybridization_hazards`)."""
        if active:
            for hazard in hybridization_hazards(kwargs, type(self).__name__):
                warnings.warn(hazard, RuntimeWarning, stacklevel=2)
        super().hybridize(active, **kwargs)

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
            self._check_input(x, bool(autograd.is_training()))
        return super().forward(x, *args)

    def _check_input(self, x: nd.NDArray, training: bool) -> None:
        check_batch_norm_args(
            x, None, None, None, None, training=training,
            momentum=0.0 if self.momentum is None else self.momentum, eps=self.epsilon,
            axis=self.axis, convention=self.convention, inspect=_inspect,
            array_type=ARRAY_TYPE)

    def _plain_layout_copies(self) -> bool:
        return plain_layout_copies()

    def _custom_attrs(self, aux: int) -> dict[str, str]:
        """The custom operator's type and attributes (strings, as MXNet passes them)."""
        return {"op_type": _OP, "convention": self.convention.name,
                "momentum": str(self.momentum), "eps": repr(self.epsilon),
                "use_batch": str(not self.use_global_stats), "use_gamma": str(self.scale),
                "use_beta": str(self.center), "aux": str(aux)}

    def hybrid_forward(self, F, x, gamma, beta, running_mean=None, running_var=None,
                       num_batches_tracked=None):
        dtype = "float64" if self._data_dtype == "float64" else "float32"
        wide = x if dtype == self._data_dtype else F.cast(x, dtype)
        aux = [a for a in (running_mean, running_var, num_batches_tracked) if a is not None]
        attrs = self._custom_attrs(len(aux))
        plain = self._plain_layout_copies()
        if plain:  # x, and dy in the backward, in the plain layout (see plain_layout_copies)
            wide = F.identity(wide)
        if attrs["op_type"] == _OP:  # bnref's operator takes x as it is (no recorded reshape)
            y = F.Custom(wide, gamma, beta, *aux, axis=str(self.axis), **attrs)
        else:  # a subclass's operator takes the (before, C, after) view
            y3 = F.Custom(to_view(F, wide, self.axis), gamma, beta, *aux, **attrs)
            y = y3.reshape(x.shape) if isinstance(x, nd.NDArray) else F.reshape_like(y3, x)
        if plain:
            y = F.identity(y)
        return y if dtype == self._data_dtype else F.cast(y, self._data_dtype)
