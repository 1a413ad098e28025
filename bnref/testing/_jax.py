"""The jax backend's adapter, and Flax's BatchNorm (linen and nnx) as built-ins.

Importing this enables ``jax_enable_x64`` so that float64 cases run in float64. JAX compiles
every operation per shape, so the adapter draws from a small fixed pool of shapes
(:attr:`JaxBackend.shape_pool`): the compiled functions are then reused across examples.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

jax.config.update("jax_enable_x64", True)

import bnref.jax as bj  # noqa: E402
from bnref.conventions import DEFAULT, get_convention  # noqa: E402
from bnref.testing.backends import Backend, Builtin, LayerBuiltin, LayerConfig  # noqa: E402
from bnref.testing.strategies import SHAPE_POOL  # noqa: E402

_PARAMS = {"gamma": ("params", "scale"), "beta": ("params", "bias"),
           "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var"),
           "num_batches_tracked": ("batch_stats", "num_batches_tracked")}


def to_array(array: np.ndarray) -> jax.Array:
    return jnp.asarray(np.array(array, copy=True))


def to_numpy(array: jax.Array) -> np.ndarray:
    return np.asarray(array)


def _canonical(variables: Mapping[str, Mapping[str, jax.Array]]) -> dict[str, np.ndarray]:
    return {name: to_numpy(variables[collection][key])
            for name, (collection, key) in _PARAMS.items()
            if key in variables.get(collection, {})}


def _flax_layout(state: Mapping[str, np.ndarray], dtypes: Mapping[str, jnp.dtype]) -> dict:
    variables: dict[str, dict[str, jax.Array]] = {}
    for name, value in state.items():
        collection, key = _PARAMS[name]
        dtype = jnp.int32 if name == "num_batches_tracked" else dtypes[name]
        variables.setdefault(collection, {})[key] = jnp.asarray(np.asarray(value), dtype)
    return variables


class JaxLayer:
    def __init__(self, config: LayerConfig) -> None:
        self.layer = bj.BatchNorm(
            config.num_features, axis=config.axis, momentum=config.momentum, epsilon=config.eps,
            param_dtype=jnp.dtype(config.param_dtype), use_bias=config.affine,
            use_scale=config.affine, track_running_stats=config.track_running_stats,
            convention=config.convention)
        self.variables = self.layer.init()

    def forward(self, x: np.ndarray, training: bool) -> np.ndarray:
        y, self.variables = self.layer.apply(self.variables, to_array(x), training=training)
        return to_numpy(y)

    def state(self) -> dict[str, np.ndarray]:
        return _canonical(self.variables)

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        dtypes = {name: jnp.dtype(self.layer.param_dtype) for name in _PARAMS}
        if self.layer.momentum is not None:  # only the cumulative average keeps a counter
            state = {k: v for k, v in state.items() if k != "num_batches_tracked"}
        self.variables = _flax_layout(state, dtypes)


@functools.cache
def _linen(config_axis, momentum, eps, use_scale, use_bias, param_dtype, training):
    """A linen BatchNorm and its jitted apply, cached: Flax compiles per constant, so the
    Flax cases draw eps and momentum from a few values (see _FLAX_CONSTANTS)."""
    import flax.linen as nn

    module = nn.BatchNorm(use_running_average=not training, axis=config_axis,
                          momentum=momentum, epsilon=eps, use_scale=use_scale,
                          use_bias=use_bias, param_dtype=param_dtype, use_fast_variance=False)
    if training:
        return jax.jit(functools.partial(module.apply, mutable=["batch_stats"]))
    return jax.jit(module.apply)


def _linen_variables(gamma, beta, running_mean, running_var):
    params = {**({"scale": to_array(gamma)} if gamma is not None else {}),
              **({"bias": to_array(beta)} if beta is not None else {})}
    return {**({"params": params} if params else {}),
            "batch_stats": {"mean": to_array(running_mean), "var": to_array(running_var)}}


def _linen_functional(x, gamma, beta, running_mean, running_var, *, training, momentum, eps,
                      axis, convention="flax"):
    del convention  # fixed by the cases: Flax's meaning
    apply = _linen(axis, momentum, eps, gamma is not None, beta is not None,
                   jnp.dtype(running_mean.dtype), training)
    variables = _linen_variables(gamma, beta, running_mean, running_var)
    if not training:
        return to_numpy(apply(variables, to_array(x))), running_mean, running_var
    y, updates = apply(variables, to_array(x))
    stats = updates["batch_stats"]
    return to_numpy(y), to_numpy(stats["mean"]), to_numpy(stats["var"])


@functools.cache
def _linen_grad(axis, eps, use_scale, use_bias, dtype):
    apply = _linen(axis, 0.9, eps, use_scale, use_bias, dtype, True)

    def objective(x, params, stats, dy):
        variables = {"batch_stats": stats, **({"params": params} if params else {})}
        y, _ = apply(variables, x)
        return jnp.sum(y * dy)

    return jax.jit(jax.grad(objective, argnums=(0, 1)))


def _linen_gradients(x, gamma, beta, dy, *, eps, axis):
    dtype = jnp.dtype(jnp.float64 if x.dtype == np.float64 else jnp.float32)
    channels = x.shape[axis]
    stats = {"mean": jnp.zeros(channels, dtype), "var": jnp.ones(channels, dtype)}
    params = {**({"scale": to_array(gamma)} if gamma is not None else {}),
              **({"bias": to_array(beta)} if beta is not None else {})}
    grad = _linen_grad(axis, eps, gamma is not None, beta is not None, dtype)
    dx, dparams = grad(to_array(x), params, stats, to_array(dy))
    return (to_numpy(dx),
            None if gamma is None else to_numpy(dparams["scale"]),
            None if beta is None else to_numpy(dparams["bias"]))


class _LinenLayer:
    def __init__(self, config: LayerConfig) -> None:
        conv = get_convention(config.convention)
        self.axis = conv.default_axis if config.axis is None else config.axis
        self.momentum = conv.default_momentum if config.momentum is DEFAULT else config.momentum
        self.eps = conv.default_eps if config.eps is None else config.eps
        self.config = config
        dtype = jnp.dtype(config.param_dtype)
        ones, zeros = jnp.ones(config.num_features, dtype), jnp.zeros(config.num_features, dtype)
        params = {"scale": ones, "bias": zeros} if config.affine else {}
        self.variables = {**({"params": params} if params else {}),
                          "batch_stats": {"mean": zeros, "var": ones}}

    def forward(self, x: np.ndarray, training: bool) -> np.ndarray:
        c = self.config
        apply = _linen(self.axis % x.ndim, self.momentum, self.eps, c.affine, c.affine,
                       jnp.dtype(c.param_dtype), training)
        if not training:
            return to_numpy(apply(self.variables, to_array(x)))
        y, updates = apply(self.variables, to_array(x))
        self.variables = {**self.variables, **updates}
        return to_numpy(y)

    def state(self) -> dict[str, np.ndarray]:
        return _canonical(self.variables)

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        dtypes = {name: jnp.dtype(self.config.param_dtype) for name in _PARAMS}
        self.variables = _flax_layout(
            {k: v for k, v in state.items() if k != "num_batches_tracked"}, dtypes)


@functools.cache
def _nnx_call():
    """An nnx module's call under nnx.jit, as a training step would run it (op by op it
    compiles every primitive separately)."""
    from flax import nnx

    def call(module, x, training):
        return module(x, use_running_average=not training)

    return nnx.jit(call, static_argnums=2)


class _NnxLayer:
    def __init__(self, config: LayerConfig) -> None:
        from flax import nnx

        conv = get_convention(config.convention)
        self.module = nnx.BatchNorm(
            config.num_features, axis=conv.default_axis if config.axis is None else config.axis,
            momentum=conv.default_momentum if config.momentum is DEFAULT else config.momentum,
            epsilon=conv.default_eps if config.eps is None else config.eps,
            use_scale=config.affine, use_bias=config.affine,
            param_dtype=jnp.dtype(config.param_dtype), use_fast_variance=False,
            rngs=nnx.Rngs(0))

    def forward(self, x: np.ndarray, training: bool) -> np.ndarray:
        return to_numpy(_nnx_call()(self.module, to_array(x), training))

    def _slots(self):
        m = self.module
        return {"gamma": m.scale, "beta": m.bias, "running_mean": m.mean, "running_var": m.var}

    def state(self) -> dict[str, np.ndarray]:
        return {name: to_numpy(slot.value) for name, slot in self._slots().items()
                if slot is not None}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        for name, slot in self._slots().items():
            if slot is not None and name in state:
                slot.value = jnp.asarray(np.asarray(state[name]), slot.value.dtype)


# Flax modules take eps and momentum as Python constants and compile per value: a few values
# keep the compiled functions reusable across examples.
_FLAX_EPS = st.sampled_from([None, 1e-3, 0.1])
_FLAX_MOMENTUM = st.sampled_from([DEFAULT, 0.0, 0.5, 0.9, 1.0])
_FLAX_CASES = {"conventions": ("flax",), "running_stats": True,
               "dtypes": ("float32", "float64"), "eps": _FLAX_EPS, "momentum": _FLAX_MOMENTUM}
_FLAX_LAYER_CASES = {"conventions": ("flax",), "track_running_stats": True,
                     "dtypes": ("float32", "float64"), "eps": _FLAX_EPS,
                     "momentum": _FLAX_MOMENTUM}


@functools.cache
def _bnref_grad(eps, axis, convention):
    """d(sum(y * dy)) / d(x, gamma, beta), compiled as one function: grad of the op-by-op
    objective compiled ~6 pieces per case (forward, transpose, casts), 3x the time."""
    def objective(x, gamma, beta, dy):
        y = bj.batch_norm(x, gamma, beta, None, None, training=True, eps=eps, axis=axis,
                          convention=convention)[0]
        wide = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
        return jnp.sum(y.astype(wide) * dy.astype(wide))

    return jax.jit(jax.grad(objective, argnums=(0, 1, 2)))


class JaxBackend(Backend):
    exact_errors = True  # bnref's own tier: the contract's exact exception messages
    name = "jax"
    array_type = bj.functional.ARRAY_TYPE
    dtypes = ("float16", "bfloat16", "float32", "float64")
    shape_pool = SHAPE_POOL
    # Each new shape or flag combination costs JAX a compilation (~0.1 s forward, ~0.3 s
    # gradient); 40% of the examples keeps its share of CI near two minutes.
    example_scale = 0.4

    def asarray(self, array: np.ndarray) -> jax.Array:
        return to_array(array)

    def to_numpy(self, array: jax.Array) -> np.ndarray:
        return to_numpy(array)

    def batch_norm(self, x, gamma, beta, running_mean, running_var, **kwargs):
        return bj.batch_norm(x, gamma, beta, running_mean, running_var, **kwargs)

    def gradients(self, x, gamma, beta, dy, *, eps=None, axis=None, convention="torch"):
        arrays = [None if a is None else to_array(a) for a in (x, gamma, beta, dy)]
        grads = _bnref_grad(eps, axis, convention)(*arrays)
        return tuple(None if g is None else to_numpy(g).astype(a.dtype)
                     for g, a in zip(grads, (x, gamma, beta), strict=True))

    def make_layer(self, config: LayerConfig) -> JaxLayer:
        return JaxLayer(config)

    def builtin(self, name: str) -> Builtin:
        if name != "flax.linen.BatchNorm":
            return super().builtin(name)
        return Builtin(name, _linen_functional, cases=_FLAX_CASES,
                       note="use_fast_variance=False (the default one-pass variance is "
                            "compared separately, in tests/test_jax.py)",
                       gradients=_linen_gradients)

    def layer_builtin(self, name: str) -> LayerBuiltin:
        if name == "flax.linen.BatchNorm":
            return LayerBuiltin(name, _LinenLayer, cases=_FLAX_LAYER_CASES,
                                note="Flax keeps no batch counter: no momentum=None")
        if name == "flax.nnx.BatchNorm":
            # nnx.BatchNorm creates mean/var as float32 whatever param_dtype is (flax 0.12,
            # nnx/nn/normalization.py), so float64 running statistics are not comparable.
            return LayerBuiltin(name, _NnxLayer,
                                cases={**_FLAX_LAYER_CASES, "dtypes": ("float32",)},
                                note="running statistics always float32; no momentum=None")
        return super().layer_builtin(name)
