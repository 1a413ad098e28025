"""The default adapters (:mod:`bnref.testing.adapters`) on correct implementations: bnref's own
functions and the frameworks' built-in layers, treated as third-party code, pass the shared
suite with no false alarm; the declarations come from the signatures; bad arguments are refused
in words; a reproducer rebuilds the adapter.

The suite's tests are re-exported below with the adapter under test as ``adapter``: the
``backend`` argument name is taken by ``tests/conftest.py``, whose hook parametrizes every
test that asks for it over bnref's registry.
"""

from __future__ import annotations

import functools
import inspect
import math

import numpy as np
import pytest

import bnref.testing.suite as suite
from bnref.conventions import CONVENTIONS
from bnref.testing.adapters import function_backend, layer_backend, load_object
from bnref.testing.backends import LayerConfig
from bnref.testing.checks import MISTAKES

# The share of the profile's examples each property runs here (at least 10): a quarter of the
# adapters' own (25 at the ci profile, 10 for JAX's), and JAX's adapters draw from three of
# the pool's shapes (each new shape compiles every operation again). The full budget per
# framework is what a third party's run costs (docs/testing.md, "Speed"); this module proves
# eleven adapters.
SHARE = 0.25
JAX_SHAPES = ((6, 2), (2, 3, 4), (2, 3, 2, 2))

# id -> (the module to import or skip, the default adapter, what it adapts, its arguments).
# Each is a correct implementation: every failure below is a false alarm of the adapter.
ADAPTERS = {
    "function-numpy": ("numpy", function_backend, "bnref.numpy:batch_norm",
                       {"framework": "numpy", "convention": "torch"}),
    "function-torch": ("torch", function_backend, "bnref.torch:batch_norm",
                       {"framework": "torch", "convention": "torch", "optional_affine": True,
                        "optional_running_stats": True}),
    # Given as the object rather than its path.
    "function-jax": ("jax", function_backend, lambda: load_object("bnref.jax:batch_norm"),
                     {"framework": "jax", "convention": "flax"}),
    "function-tf": ("tensorflow", function_backend, "bnref.tf:batch_norm",
                    {"framework": "tf", "convention": "keras"}),
    "function-mxnet": ("bnref.mxnet", function_backend, "bnref.mxnet:batch_norm",
                       {"framework": "mxnet", "convention": "mxnet"}),
    "layer-torch.nn.BatchNorm2d": ("torch", layer_backend, "torch.nn:BatchNorm2d",
                                   {"framework": "torch", "convention": "torch",
                                    "ranks": (4, 4)}),
    "layer-keras.layers.BatchNormalization": (
        "keras", layer_backend, "keras.layers:BatchNormalization",
        {"framework": "tf", "convention": "keras"}),
    # What Gluon's layer cannot do, declared: float64 (its oneDNN kernel refuses it), any
    # momentum (a float32 operator parameter: a tiny one is refused) and a large eps (its CPU
    # kernel recovers the running variance's batch term from 1/sqrt(var + eps), an error of
    # about one rounding of eps per step that bnref's bounds do not model; see
    # tests/test_mxnet.py): both stay at Gluon's defaults.
    "layer-mxnet.gluon.nn.BatchNorm": ("bnref.mxnet", layer_backend, "mxnet.gluon.nn:BatchNorm",
                                       {"framework": "mxnet", "convention": "mxnet",
                                        "dtypes": ("float32",), "fixed_eps": 1e-5,
                                        "fixed_momentum": 0.9}),
    # Its default one-pass variance cancels on inputs with a large mean (tests/test_jax.py).
    "layer-flax.linen.BatchNorm": ("flax", layer_backend, "flax.linen:BatchNorm",
                                   {"framework": "jax", "convention": "flax",
                                    "layer_kwargs": {"use_fast_variance": False}}),
    "layer-bnref.numpy.BatchNorm": ("numpy", layer_backend, "bnref.numpy:BatchNorm",
                                    {"framework": "numpy", "convention": "torch"}),
    # A textbook layer: its state in (1, C, 1, 1) tensors, the running ones plain attributes;
    # nothing but the channel count and the rank to construct. (It reads the mode from
    # self.training: d2l's torch.is_grad_enabled() is caught, see test_planted_bugs.)
    "layer-textbook-torch": ("torch", layer_backend, lambda: textbook_torch_layer(),
                             {"framework": "torch", "convention": "torch", "ranks": (4, 4),
                              "layer_kwargs": {"num_dims": 4}, "name": "textbook BatchNorm"}),
}


def textbook_torch_layer():
    """A batch-norm module as textbooks write it (d2l.ai's, with PyTorch's unbiased running
    variance): gamma, beta, moving_mean and moving_var, all shaped (1, C, 1, 1)."""
    import torch

    def batch_norm(x, gamma, beta, moving_mean, moving_var, eps, momentum, training):
        if not training:
            x_hat = (x - moving_mean) / torch.sqrt(moving_var + eps)
        else:
            dims = (0, 2, 3) if x.ndim == 4 else (0,)
            mean = x.mean(dim=dims, keepdim=True)
            var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
            x_hat = (x - mean) / torch.sqrt(var + eps)
            n = x.numel() // x.shape[1]
            moving_mean = (1.0 - momentum) * moving_mean + momentum * mean
            moving_var = (1.0 - momentum) * moving_var + momentum * var * n / (n - 1)
        return gamma * x_hat + beta, moving_mean.data, moving_var.data

    class BatchNorm(torch.nn.Module):
        def __init__(self, num_features, num_dims):
            super().__init__()
            shape = (1, num_features) if num_dims == 2 else (1, num_features, 1, 1)
            self.gamma = torch.nn.Parameter(torch.ones(shape))
            self.beta = torch.nn.Parameter(torch.zeros(shape))
            self.moving_mean = torch.zeros(shape)
            self.moving_var = torch.ones(shape)

        def forward(self, x):
            y, self.moving_mean, self.moving_var = batch_norm(
                x, self.gamma, self.beta, self.moving_mean, self.moving_var, eps=1e-5,
                momentum=0.1, training=self.training)
            return y

    return BatchNorm


@functools.cache
def _adapter(name: str):
    module, factory, target, kwargs = ADAPTERS[name]
    pytest.importorskip(module)
    if kwargs["framework"] == "jax":
        kwargs = {**kwargs, "example_scale": 0.4 * SHARE, "shape_pool": JAX_SHAPES}
    return factory(target if isinstance(target, str) else target(),
                   **{"example_scale": SHARE, **kwargs})


@pytest.fixture(scope="module", params=list(ADAPTERS))
def adapter(request):
    return _adapter(request.param)


def _with_adapter(test):
    """``test`` from the shared suite, its ``backend`` argument fed from ``adapter``."""

    def run(adapter, **kwargs):
        test(backend=adapter, **kwargs)

    rest = [p for p in inspect.signature(test).parameters.values() if p.name != "backend"]
    run.__signature__ = inspect.Signature(
        [inspect.Parameter("adapter", inspect.Parameter.POSITIONAL_OR_KEYWORD), *rest])
    run.__name__ = run.__qualname__ = test.__name__
    run.__doc__ = test.__doc__
    run.pytestmark = list(getattr(test, "pytestmark", []))
    return run


# Bad input: the mistakes any batch norm must refuse (the rest, and the layer's constructor
# messages, are bnref's own tier, exact_errors, which no default adapter declares).
_UNIVERSAL = [m for m in MISTAKES if m.universal]
for _name in suite.__all__:
    if _name == "test_bad_layer_arguments_raise":
        continue
    globals()[_name] = _with_adapter(getattr(suite, _name))
    if _name == "test_bad_input_raises_and_modifies_nothing":
        globals()[_name].pytestmark = [
            pytest.mark.parametrize("mistake", _UNIVERSAL, ids=lambda m: m.id)]


# -- what the adapters infer --------------------------------------------------------------


def minimal(x, gamma, beta, running_mean, running_var, *, training):
    """A numpy batch norm with nothing but the mode: torch's defaults, channels on axis 1."""
    return load_object("bnref.numpy:batch_norm")(x, gamma, beta, running_mean, running_var,
                                                 training=training)


def with_kwargs(x, gamma, beta, running_mean, running_var, **kwargs):
    return load_object("bnref.numpy:batch_norm")(x, gamma, beta, running_mean, running_var,
                                                 **kwargs)


def without_eps(x, gamma, beta, running_mean, running_var, *, training, momentum=0.99,
                axis=-1):
    return load_object("bnref.numpy:batch_norm")(
        x, gamma, beta, running_mean, running_var, training=training, momentum=momentum,
        axis=axis, convention="keras")


def test_a_function_without_eps_momentum_axis_gets_them_fixed_at_the_conventions_defaults():
    backend = function_backend(minimal, framework="numpy", convention="torch")
    torch = CONVENTIONS["torch"]
    assert backend.fixed_eps == torch.default_eps
    assert backend.fixed_momentum == torch.default_momentum
    assert backend.channel_axis == torch.default_axis == 1
    assert backend.conventions == ("torch",)
    assert backend.dtypes == ("float32", "float64")
    assert not backend.optional_affine and not backend.optional_running_stats
    assert backend.name == "minimal"
    assert "gradients" not in backend.capabilities  # numpy has no autodiff


def test_only_the_missing_arguments_are_fixed():
    backend = function_backend(without_eps, framework="numpy", convention="keras")
    assert backend.fixed_eps == CONVENTIONS["keras"].default_eps
    assert backend.fixed_momentum is None and backend.channel_axis is None


def test_a_function_taking_kwargs_takes_everything():
    backend = function_backend(with_kwargs, framework="numpy", convention="flax")
    assert (backend.fixed_eps, backend.fixed_momentum, backend.channel_axis) == (None,) * 3


def test_omitted_arguments_are_omitted_and_unknown_ones_dropped():
    calls = []

    def spy(x, gamma, beta, running_mean, running_var, *, training, eps=1e-5, axis=1):
        calls.append({"training": training, "eps": eps, "axis": axis})
        return x, running_mean, running_var

    backend = function_backend(spy, framework="numpy", convention="torch")
    x, v = np.ones((2, 3), np.float32), np.ones(3, np.float32)
    backend.batch_norm(x, v, v, v, v, training=True, eps=None, axis=None, convention="torch",
                       momentum=0.5)
    backend.batch_norm(x, v, v, v, v, training=False, eps=0.25, axis=-1, convention="torch")
    assert calls == [{"training": True, "eps": 1e-5, "axis": 1},
                     {"training": False, "eps": 0.25, "axis": -1}]
    assert backend.fixed_momentum == 0.1  # the signature has no momentum


def test_given_declarations_override_the_inferred_ones():
    backend = function_backend(minimal, framework="numpy", convention="torch",
                               dtypes=["float64"], ranks=[4, 4], optional_affine=True)
    assert backend.dtypes == ("float64",) and backend.ranks == (4, 4)
    assert backend.optional_affine
    assert backend.inferred["optional_affine"] is False  # what the signature alone says


def test_gradients_false_removes_the_capability():
    pytest.importorskip("torch")
    with_grad = function_backend("bnref.torch:batch_norm", framework="torch", convention="torch")
    without = function_backend("bnref.torch:batch_norm", framework="torch", convention="torch",
                               gradients=False)
    assert "gradients" in with_grad.capabilities
    assert "gradients" not in without.capabilities
    assert with_grad.array_type == "torch.Tensor"


def test_jax_adapters_draw_from_the_shape_pool_and_enable_float64():
    pytest.importorskip("jax")
    import jax.numpy as jnp

    from bnref.testing.strategies import SHAPE_POOL

    backend = function_backend("bnref.jax:batch_norm", framework="jax", convention="flax")
    assert backend.shape_pool == SHAPE_POOL and backend.example_scale == pytest.approx(0.4)
    assert jnp.asarray(np.zeros(1)).dtype == jnp.float64


class NoOptions:
    """A numpy layer that takes only the channel count: eps, momentum and the axis are torch's
    defaults, always affine, always tracking; state under Keras's names, shaped (1, C)."""

    def __init__(self, num_features):
        self.gamma = np.ones((1, num_features), np.float32)
        self.beta = np.zeros((1, num_features), np.float32)
        self.moving_mean = np.zeros((1, num_features), np.float32)
        self.moving_variance = np.ones((1, num_features), np.float32)

    def __call__(self, x, training):
        from bnref.numpy import batch_norm

        y, mean, var = batch_norm(x, self.gamma[0], self.beta[0], self.moving_mean[0],
                                  self.moving_variance[0], training=training)
        self.moving_mean, self.moving_variance = mean[None], var[None]
        return y


def test_a_layer_without_options_gets_them_declared():
    backend = layer_backend(NoOptions, framework="numpy", convention="torch",
                            state_names={"running_var": "moving_variance"})
    assert backend.inferred == {
        "dtypes": ("float32", "float64"), "conventions": ("torch",), "optional_affine": True,
        "optional_running_stats": True, "cumulative": False, "fixed_eps": 1e-5,
        "fixed_momentum": 0.1, "channel_axis": 1, "always_tracks": True,
        "layer_affine_optional": False}
    layer = backend.make_layer(LayerConfig(num_features=3))
    state = layer.state()
    assert {k: v.shape for k, v in state.items()} == dict.fromkeys(
        ["gamma", "beta", "running_mean", "running_var"], (3,))  # (1, C) read as (C,)
    layer.load_state({"running_mean": np.arange(3.0)})
    assert layer.layer.moving_mean.shape == (1, 3)  # and written back in the layer's shape
    np.testing.assert_array_equal(layer.state()["running_mean"], np.arange(3.0))


def test_layer_declarations_follow_the_constructors():
    torch_layer = layer_backend("bnref.numpy:BatchNorm", framework="numpy", convention="torch")
    assert torch_layer.inferred["cumulative"]  # momentum may be None: PyTorch's cumulative
    assert torch_layer.channel_axis is None and torch_layer.fixed_eps is None
    assert "make_layer" in torch_layer.capabilities
    assert "gradients" not in torch_layer.capabilities
    pytest.importorskip("torch")
    bn2d = layer_backend("torch.nn:BatchNorm2d", framework="torch", convention="torch")
    assert bn2d.channel_axis == 1 and bn2d.cumulative and not bn2d.always_tracks
    assert bn2d.constructor_kwargs(LayerConfig(num_features=3, eps=0.5, affine=False)) == {
        "num_features": 3, "eps": 0.5, "affine": False, "track_running_stats": True}
    textbook = layer_backend(textbook_torch_layer(), framework="torch", convention="torch",
                             layer_kwargs={"num_dims": 4})
    assert {k: v for k, v in textbook.inferred.items() if k not in ("dtypes", "conventions")} == {
        "optional_affine": True, "optional_running_stats": True, "cumulative": False,
        "fixed_eps": 1e-5, "fixed_momentum": 0.1, "channel_axis": 1, "always_tracks": True,
        "layer_affine_optional": False}
    assert textbook.constructor_kwargs(LayerConfig(num_features=3, eps=0.5)) == {
        "num_features": 3, "num_dims": 4}


def test_keras_and_flax_constructor_names():
    pytest.importorskip("keras")
    keras = layer_backend("keras.layers:BatchNormalization", framework="tf",
                          convention="keras")
    assert keras.constructor_kwargs(LayerConfig(3, "keras", momentum=0.5, axis=1)) == {
        "momentum": 0.5, "center": True, "scale": True, "axis": 1, "dtype": "float32"}
    assert keras.always_tracks and not keras.cumulative and keras.channel_axis is None
    pytest.importorskip("flax")
    flax = layer_backend("flax.linen:BatchNorm", framework="jax", convention="flax")
    kwargs = flax.constructor_kwargs(LayerConfig(3, "flax", eps=0.1, affine=False))
    assert {k: kwargs[k] for k in ("epsilon", "use_bias", "use_scale")} == {
        "epsilon": 0.1, "use_bias": False, "use_scale": False}
    assert "use_running_average" not in kwargs  # given to __call__, per mode


# -- refusals in words --------------------------------------------------------------------


def test_unknown_framework_convention_or_declaration_is_refused():
    with pytest.raises(ValueError, match=r"framework must be one of .*got 'pytorch'"):
        function_backend(minimal, framework="pytorch", convention="torch")
    with pytest.raises(ValueError, match=r"convention must be one of .*got 'caffe'"):
        function_backend(minimal, framework="numpy", convention="caffe")
    with pytest.raises(TypeError, match=r"unknown declaration 'fixed_epsilon'"):
        function_backend(minimal, framework="numpy", convention="torch", fixed_epsilon=1e-3)
    with pytest.raises(ValueError, match=r"framework must be one of .*got 'keras'"):
        layer_backend(NoOptions, framework="keras", convention="keras")
    with pytest.raises(TypeError, match=r"unknown declaration 'affine'"):
        layer_backend(NoOptions, framework="numpy", convention="torch", affine=False)


def test_a_function_without_training_is_refused():
    def no_mode(x, gamma, beta, running_mean, running_var):
        return x, running_mean, running_var

    with pytest.raises(TypeError, match="must take a `training` keyword"):
        function_backend(no_mode, framework="numpy", convention="torch")


def test_load_object_reads_modules_and_files(tmp_path):
    assert load_object("bnref.numpy:batch_norm") is load_object("bnref.numpy.batch_norm")
    source = tmp_path / "my_bn.py"
    source.write_text("def batch_norm(x, g, b, m, v, *, training):\n    return x, m, v\n")
    assert load_object(f"{source}:batch_norm").__name__ == "batch_norm"
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        load_object("bnref.numpy:nope")
    with pytest.raises(ValueError, match=r"expected 'pkg\.module:attr'"):
        load_object("nothing")


def test_a_state_name_mismatch_is_explained_in_words():
    backend = layer_backend(NoOptions, framework="numpy", convention="torch")
    layer = backend.make_layer(LayerConfig(num_features=3))
    with pytest.raises(KeyError) as raised:
        layer.state()
    message = str(raised.value)
    assert "the layer has no running_var under 'running_var' or 'moving_var'" in message
    assert "its state has 'gamma', 'beta', 'moving_mean', 'moving_variance'" in message
    assert "state_names={'running_var': '<its name>'}" in message
    with pytest.raises(KeyError, match="loading running_var"):
        layer.load_state({"running_var": np.ones(3)})
    with pytest.raises(ValueError, match=r"gamma has 4 values, the layer's 'gamma' has 3"):
        layer.load_state({"gamma": np.ones(4)})
    with pytest.raises(ValueError, match="state_names keys must be among"):
        layer_backend(NoOptions, framework="numpy", convention="torch",
                      state_names={"weight": "gamma"})


# -- reproducers --------------------------------------------------------------------------


def _rebuilt(backend):
    namespace: dict = {}
    exec(backend.reproducer(), namespace)
    return namespace["backend"]


@pytest.mark.parametrize("name", ["function-numpy", "function-torch", "function-jax",
                                  "layer-mxnet.gluon.nn.BatchNorm",
                                  "layer-flax.linen.BatchNorm"])
def test_the_reproducer_rebuilds_an_equivalent_backend(name):
    backend = _adapter(name)
    rebuilt = _rebuilt(backend)
    assert type(rebuilt) is type(backend)
    assert rebuilt.declared() == backend.declared()
    assert rebuilt.capabilities == backend.capabilities
    assert rebuilt.name == backend.name
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    ones = np.ones(3, np.float32)
    args = (x, ones, 0 * ones, 0 * ones, ones)
    kwargs = {"training": True, "axis": backend.channel_axis or 1, "convention":
              backend.conventions[0]}
    if backend.fixed_eps is not None:
        kwargs["eps"] = backend.fixed_eps
    for got, expected in zip(rebuilt.run_batch_norm(*args, **kwargs),
                             backend.run_batch_norm(*args, **kwargs), strict=True):
        np.testing.assert_array_equal(got, expected)


def test_a_reproducer_names_an_object_by_its_import_path():
    backend = function_backend(load_object("bnref.numpy:batch_norm"), framework="numpy",
                               convention="keras", ranks=(2, 3))
    assert backend.reproducer() == (
        "from bnref.testing.adapters import function_backend\n"
        "backend = function_backend('bnref.numpy.functional:batch_norm', framework='numpy', "
        "convention='keras', name='batch_norm', ranks=(2, 3))")
    assert _rebuilt(backend).ranks == (2, 3)


def test_a_reproducer_says_when_the_object_has_no_import_path():
    def local(x, gamma, beta, running_mean, running_var, *, training):
        return x, running_mean, running_var

    text = function_backend(local, framework="numpy", convention="torch").reproducer()
    assert text.startswith("# the object was given directly")
    assert "function_backend(OBJECT, framework='numpy', convention='torch', name='local')" in text


def test_importing_the_adapters_imports_no_framework():
    from tests.test_imports import loaded_frameworks

    assert loaded_frameworks("import bnref.testing.adapters") == set()


def test_layer_batch_norm_without_running_stats_uses_the_batch():
    backend = layer_backend("bnref.numpy:BatchNorm", framework="numpy", convention="torch")
    x = np.random.default_rng(1).normal(3.0, 2.0, size=(8, 2)).astype(np.float64)
    y, mean, var = backend.run_batch_norm(x, None, None, None, None, training=False)
    assert mean is None and var is None
    assert math.isclose(float(y[:, 0].mean()), 0.0, abs_tol=1e-12)
