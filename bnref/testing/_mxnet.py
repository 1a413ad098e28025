"""The mxnet backend's adapter, and MXNet's own batch norms as built-ins to compare with:
``gluon.nn.BatchNorm`` (whose running statistics move during ``backward``) and the
``mx.nd.BatchNorm`` operator with ``fix_gamma=False``."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import bnref.mxnet as bm  # restores numpy.bool, which mxnet needs, before mxnet is imported

# isort: split
import numpy as np
from hypothesis import strategies as st
from mxnet import autograd, gluon, nd

from bnref.conventions import DEFAULT
from bnref.testing.backends import Backend, Builtin, LayerBuiltin, LayerConfig

_CANONICAL = ("gamma", "beta", "running_mean", "running_var", "num_batches_tracked")


def to_array(array: np.ndarray) -> nd.NDArray:
    return nd.array(np.array(array, copy=True), dtype=array.dtype)


def to_numpy(array: nd.NDArray) -> np.ndarray:
    return array.asnumpy()


class GluonLayer:
    """A Gluon block with BatchNorm's parameter names. Training steps run inside
    ``autograd.record()``; with ``backward`` they also run a backward pass (with a zero head
    gradient), which is when ``gluon.nn.BatchNorm`` moves its running statistics."""

    def __init__(self, block: gluon.HybridBlock, dtype: str, backward: bool = False) -> None:
        self.block, self.backward = block, backward
        block.initialize()
        if dtype == "float64":
            block.cast("float64")

    def forward(self, x: np.ndarray, training: bool) -> np.ndarray:
        x_nd = to_array(x)
        if not training:
            return to_numpy(self.block(x_nd))
        x_nd.attach_grad()
        with autograd.record():
            y = self.block(x_nd)
        if self.backward:
            y.backward(nd.zeros_like(y))
        return to_numpy(y)

    def _params(self) -> dict[str, gluon.Parameter]:
        params = self.block._reg_params  # by attribute name, without the block's prefix
        return {name: params[name] for name in _CANONICAL if name in params}

    def state(self) -> dict[str, np.ndarray]:
        state = {}
        for name, param in self._params().items():
            try:
                value = to_numpy(param.data())
            except gluon.parameter.DeferredInitializationError:
                continue
            state[name] = (np.asarray(int(value[0]), np.int64) if name == "num_batches_tracked"
                           else value)
        return state

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        for name, param in self._params().items():
            if name in state:
                value = np.asarray(state[name]).reshape(-1 if name != "num_batches_tracked"
                                                        else 1)
                param.shape = value.shape
                param.set_data(nd.array(value, dtype=param.dtype))


def builtin_layer(config: LayerConfig) -> GluonLayer:
    block = gluon.nn.BatchNorm(**config.resolved(), center=config.affine, scale=config.affine,
                               in_channels=config.num_features)
    return GluonLayer(block, config.param_dtype, backward=True)


def _operator(x, gamma, beta, running_mean, running_var, *, training, momentum, eps, axis,
              convention="mxnet", dy=None):
    """mx.nd.BatchNorm with fix_gamma=False; the moving statistics move in its backward."""
    del convention  # fixed by the cases: Gluon's meaning
    channels = x.shape[axis]
    pdtype = "float64" if x.dtype == np.float64 else "float32"
    gamma_nd = to_array(gamma) if gamma is not None else nd.ones(channels, dtype=pdtype)
    beta_nd = to_array(beta) if beta is not None else nd.zeros(channels, dtype=pdtype)
    use_batch = training or running_mean is None
    mean_nd = to_array(running_mean) if running_mean is not None else nd.zeros(channels,
                                                                               dtype=pdtype)
    var_nd = to_array(running_var) if running_var is not None else nd.ones(channels, dtype=pdtype)
    x_nd = to_array(x)
    for array in (x_nd, gamma_nd, beta_nd):
        array.attach_grad()
    with autograd.record(train_mode=use_batch):
        y = nd.BatchNorm(x_nd, gamma_nd, beta_nd, mean_nd, var_nd, eps=eps, momentum=momentum,
                         fix_gamma=False, axis=axis)
    y.backward(nd.zeros_like(y) if dy is None else to_array(dy), train_mode=use_batch)
    if dy is not None:
        return (to_numpy(x_nd.grad), None if gamma is None else to_numpy(gamma_nd.grad),
                None if beta is None else to_numpy(beta_nd.grad))
    if running_mean is None or not training:
        return to_numpy(y), running_mean, running_var
    return to_numpy(y), to_numpy(mean_nd), to_numpy(var_nd)


def _operator_gradients(x, gamma, beta, dy, *, eps, axis):
    return _operator(x, gamma, beta, None, None, training=True, momentum=0.9, eps=eps, axis=axis,
                     dy=dy)


# The operator keeps eps and momentum as float32 parameters (a tiny momentum is refused).
_GLUON_MOMENTUM = st.one_of(st.just(DEFAULT), st.sampled_from([0.0, 0.5, 1.0]),
                            st.floats(0, 1, width=32, allow_subnormal=False))
# MXNet's CPU BatchNorm kernel (behind both the operator and Gluon's block) recovers the
# running variance's batch term from 1/sqrt(var + eps): an error of about one rounding of eps
# per step, which bnref's bounds do not model. Small eps keep it below them;
# tests/test_mxnet.py pins the effect at large eps.
_SMALL_EPS = st.one_of(st.none(), st.floats(-6, -3).map(lambda e: float(np.float32(10.0**e))))


class MxnetBackend(Backend):
    exact_errors = True  # bnref's own tier: the contract's exact exception messages
    name = "mxnet"
    array_type = bm.functional.ARRAY_TYPE
    dtypes = ("float16", "float32", "float64")

    def asarray(self, array: np.ndarray) -> nd.NDArray:
        return to_array(array)

    def to_numpy(self, array: nd.NDArray) -> np.ndarray:
        return to_numpy(array)

    def batch_norm(self, x, gamma, beta, running_mean, running_var, **kwargs):
        return bm.batch_norm(x, gamma, beta, running_mean, running_var, **kwargs)

    def gradients(self, x, gamma, beta, dy, *, eps=None, axis=None, convention="torch"):
        inputs = [None if a is None else to_array(a) for a in (x, gamma, beta)]
        for array in inputs:
            if array is not None:
                array.attach_grad()
        with autograd.record():
            y = bm.batch_norm(*inputs, None, None, training=True, eps=eps, axis=axis,
                              convention=convention)[0]
        y.backward(to_array(dy))
        return tuple(None if a is None else to_numpy(a.grad) for a in inputs)

    def make_layer(self, config: LayerConfig, hybridize: bool = False) -> GluonLayer:
        block = bm.BatchNorm(config.axis, config.momentum, config.eps, center=config.affine,
                             scale=config.affine, num_features=config.num_features,
                             track_running_stats=config.track_running_stats,
                             convention=config.convention)
        layer = GluonLayer(block, config.param_dtype)
        if hybridize:
            with warnings.catch_warnings():
                # A lone block: no oneDNN operator follows its custom operator, so the hazard
                # bnref.mxnet.layer.hybridization_hazards warns of is not there.
                warnings.simplefilter("ignore", RuntimeWarning)
                block.hybridize()
        return layer

    def builtin(self, name: str) -> Builtin:
        if name != "mxnet.nd.BatchNorm":
            return super().builtin(name)
        return Builtin(name, _operator,
                       cases={"conventions": ("mxnet",), "dtypes": ("float32", "float64"),
                              "float32_constants": True, "momentum": _GLUON_MOMENTUM,
                              "eps": _SMALL_EPS},
                       note="fix_gamma=False; moving statistics read after its backward; "
                            "eps and momentum are float32 operator parameters; eps <= 1e-3",
                       gradients=_operator_gradients)

    def layer_builtin(self, name: str) -> LayerBuiltin:
        if name != "mxnet.gluon.nn.BatchNorm":
            return super().layer_builtin(name)
        return LayerBuiltin(name, builtin_layer,
                            cases={"conventions": ("mxnet",), "track_running_stats": True,
                                   "dtypes": ("float32",), "momentum": _GLUON_MOMENTUM,
                                   "eps": _SMALL_EPS},
                            note="each training step runs backward, where Gluon moves its "
                                 "running statistics; float32 only (its oneDNN kernel refuses "
                                 "float64); eps <= 1e-3; no momentum=None")

