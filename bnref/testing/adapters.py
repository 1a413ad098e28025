"""Default adapters: check a batch norm of your own without writing a :class:`Backend`.

::

    from bnref.testing.adapters import function_backend, layer_backend

    backend = function_backend("mypkg.bn:batch_norm", framework="torch", convention="torch")
    backend = layer_backend("mypkg.bn:BatchNorm", framework="torch", convention="torch",
                            layer_kwargs={"num_dims": 4}, ranks=(4, 4))

then point the suite's ``backend`` fixture at it (``from bnref.testing.suite import *``), or
run ``bnref check --implementation mypkg.bn:batch_norm --framework torch --convention torch``.

:func:`function_backend` drives a function with bnref's functional signature,
``fn(x, gamma, beta, running_mean, running_var, *, training, momentum=..., eps=...,
axis=..., convention=...) -> (y, new_mean, new_var)`` on the framework's arrays. Whichever of
``momentum``, ``eps``, ``axis`` and ``convention`` its signature lacks, the adapter declares
fixed at the convention's default (``fixed_momentum``, ``fixed_eps``, ``channel_axis``), and
it passes an omitted argument as omitted, so the function's own defaults are what is tested.
Gradients come from the framework's autodiff of the function (numpy has none).

:func:`layer_backend` drives a layer class: it maps bnref's
:class:`~bnref.testing.backends.LayerConfig` onto the constructor's parameters by name (PyTorch's
``num_features``/``eps``/``affine``/``track_running_stats``, Keras's and Gluon's
``epsilon``/``center``/``scale``, Flax's ``use_bias``/``use_scale``, ...), declares what the
constructor cannot express, reads and loads the state by name (``state_names`` overrides the
framework's usual names) and runs the functional properties through a fresh layer per call.

Importing this module imports no framework; building an adapter imports its framework.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from bnref.conventions import CONVENTIONS, DEFAULT, get_convention
from bnref.testing.backends import DECLARATIONS, Backend, LayerConfig
from bnref.testing.strategies import ALL_DTYPES, SHAPE_POOL, numpy_dtype, param_dtype

__all__ = ["FRAMEWORKS", "function_backend", "layer_backend", "load_object"]

FRAMEWORKS = ("numpy", "torch", "jax", "tf", "mxnet")
CANONICAL = ("gamma", "beta", "running_mean", "running_var", "num_batches_tracked")
_DEFAULT_DTYPES = ("float32", "float64")


# -- loading objects by name ----------------------------------------------------------------


def _prepare_import(module_name: str) -> None:
    """What must run before a framework is imported: MXNet 1.9.1 needs ``numpy.bool`` back."""
    if module_name == "mxnet" or module_name.startswith("mxnet."):
        importlib.import_module("bnref.mxnet._compat")


def load_object(path: str) -> Any:
    """The object ``path`` names: ``"pkg.module:attr"`` (``attr`` may be dotted, e.g.
    ``Class.method``), ``"path/to/file.py:attr"``, or ``"pkg.module.attr"``."""
    if not isinstance(path, str) or not path:
        raise TypeError(f"expected 'pkg.module:attr' or 'path/to/file.py:attr', got {path!r}")
    source, sep, attr = path.rpartition(":")
    if not sep:
        source, _, attr = path.rpartition(".")
    if not source or not attr:
        raise ValueError(f"expected 'pkg.module:attr' or 'path/to/file.py:attr', got {path!r}")
    if source.endswith(".py") or os.sep in source or "/" in source:
        module = _module_from_file(source)
    else:
        _prepare_import(source)
        module = importlib.import_module(source)
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AttributeError(f"{path!r}: {source!r} has no attribute {attr!r}") from None
    return obj


def _module_from_file(filename: str) -> Any:
    filename = os.path.abspath(filename)
    if not os.path.isfile(filename):
        raise FileNotFoundError(f"no such file: {filename!r}")
    stem = os.path.splitext(os.path.basename(filename))[0]
    name = f"_bnref_user_{stem}_{abs(hash(filename)):x}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, filename)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {filename!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _import_path(obj: Any) -> str | None:
    """``module:qualname`` of ``obj`` if importing that gives ``obj`` back, else None."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not qualname or "<" in qualname or module == "__main__":
        return None
    path = f"{module}:{qualname}"
    try:
        return path if load_object(path) is obj else None
    except Exception:
        return None


def _resolve(target: Any, what: str) -> tuple[Any, str | None]:
    """(object, the path to rebuild it from)."""
    if isinstance(target, str):
        return load_object(target), target
    if not callable(target):
        raise TypeError(f"{what} must be callable or a 'pkg.module:attr' string, got "
                        f"{type(target).__name__}")
    return target, _import_path(target)


# -- frameworks -----------------------------------------------------------------------------


def _check_choice(argument: str, value: Any, choices) -> None:
    if value not in choices:
        raise ValueError(f"{argument} must be one of {sorted(choices)}, got {value!r}")


class _Framework:
    """Array conversion, autodiff and layer plumbing for one framework, imported lazily."""

    name = "numpy"
    array_type = "numpy.ndarray"
    differentiable = False

    def prepare(self, dtypes: tuple[str, ...]) -> None:
        """Import the framework and set it up for ``dtypes`` (or refuse them)."""

    def asarray(self, array: np.ndarray) -> Any:
        return np.array(array, copy=True)

    def to_numpy(self, array: Any) -> np.ndarray:
        return np.asarray(array)

    def vjp(self, fn: Callable, primals: list[Any], dy: np.ndarray) -> list[Any]:
        """``(y, cotangents of primals)`` for ``fn(*primals)``, dy the head gradient (numpy)."""
        raise NotImplementedError(f"{self.name} has no autodiff")

    def handle(self, backend: LayerBackend, config: LayerConfig) -> _Handle:
        return _NumpyHandle(backend, config)


class _Numpy(_Framework):
    pass


class _Torch(_Framework):
    name = "torch"
    array_type = "torch.Tensor"
    differentiable = True

    def prepare(self, dtypes):
        import torch  # noqa: F401

    def asarray(self, array):
        import torch

        if array.dtype.name == "bfloat16":
            return torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16)
        return torch.from_numpy(np.array(array, copy=True))

    def to_numpy(self, array):
        import torch

        array = array.detach().cpu()
        if array.dtype == torch.bfloat16:
            return array.float().numpy().astype(numpy_dtype("bfloat16"))
        return array.numpy()

    def vjp(self, fn, primals, dy):
        import torch

        inputs = [p.detach().requires_grad_() for p in primals]
        y = fn(*inputs)
        head = self.asarray(dy).to(y.dtype)
        grads = torch.autograd.grad(y, inputs, grad_outputs=head, allow_unused=True)
        return y, [torch.zeros_like(p) if g is None else g for p, g in zip(inputs, grads,
                                                                            strict=True)]

    def torch_dtype(self, name: str):
        import torch

        return getattr(torch, name)

    def handle(self, backend, config):
        return _TorchHandle(backend, config)


class _Jax(_Framework):
    name = "jax"
    array_type = "jax.Array"
    differentiable = True

    def prepare(self, dtypes):
        import jax
        import jax.numpy as jnp

        if "float64" in dtypes:
            jax.config.update("jax_enable_x64", True)
            if jnp.asarray(np.zeros(1)).dtype != jnp.float64:
                raise ValueError("float64 is declared but JAX would compute it in float32: "
                                 "jax_enable_x64 could not be enabled (is x64 disabled by an "
                                 "enclosing context?); declare dtypes=('float32',)")

    def asarray(self, array):
        import jax.numpy as jnp

        return jnp.asarray(np.array(array, copy=True))

    def vjp(self, fn, primals, dy):
        import jax
        import jax.numpy as jnp

        y, pullback = jax.vjp(fn, *primals)
        return y, list(pullback(jnp.asarray(dy, y.dtype)))

    def handle(self, backend, config):
        return _FlaxHandle(backend, config)


class _Tf(_Framework):
    name = "tf"
    array_type = "tf.Tensor"
    differentiable = True

    def prepare(self, dtypes):
        import tensorflow  # noqa: F401

    def asarray(self, array):
        import tensorflow as tf

        return tf.constant(np.array(array, copy=True))

    def to_numpy(self, array):
        return np.array(array)

    def vjp(self, fn, primals, dy):
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(primals)
            y = fn(*primals)
        grads = tape.gradient(y, primals, output_gradients=tf.cast(self.asarray(dy), y.dtype))
        return y, [tf.zeros_like(p) if g is None else g for p, g in zip(primals, grads,
                                                                         strict=True)]

    def handle(self, backend, config):
        return _KerasHandle(backend, config)


class _Mxnet(_Framework):
    name = "mxnet"
    array_type = "mxnet.nd.NDArray"
    differentiable = True

    def prepare(self, dtypes):
        _prepare_import("mxnet")
        import mxnet  # noqa: F401

    def asarray(self, array):
        from mxnet import nd

        return nd.array(np.array(array, copy=True), dtype=array.dtype)

    def to_numpy(self, array):
        return array.asnumpy()

    def vjp(self, fn, primals, dy):
        from mxnet import autograd, nd

        inputs = [p.copy() for p in primals]
        for array in inputs:
            array.attach_grad()
        with autograd.record():
            y = fn(*inputs)
        y.backward(nd.array(dy, dtype=y.dtype))
        return y, [a.grad for a in inputs]

    def handle(self, backend, config):
        return _GluonHandle(backend, config)


_FRAMEWORK_CLASSES: dict[str, type[_Framework]] = {
    "numpy": _Numpy, "torch": _Torch, "jax": _Jax, "tf": _Tf, "mxnet": _Mxnet}


# -- declarations ---------------------------------------------------------------------------


def _framework_defaults(framework: str) -> dict[str, Any]:
    """What every adapter of ``framework`` declares unless told otherwise."""
    if framework == "jax":
        # jnp compiles every operation per shape: a small pool of shapes reuses them.
        return {"shape_pool": SHAPE_POOL, "example_scale": 0.4}
    return {}


def _validate_declarations(declarations: Mapping[str, Any]) -> dict[str, Any]:
    unknown = [name for name in declarations if name not in DECLARATIONS]
    if unknown:
        raise TypeError(f"unknown declaration {unknown[0]!r}; the declarations are "
                        f"{', '.join(DECLARATIONS)}")
    out = dict(declarations)
    for name in ("dtypes", "conventions", "compare_with"):
        if isinstance(out.get(name), str):  # one name, e.g. from `--declare dtypes=float32`
            out[name] = (out[name],)
    for name in ("dtypes", "conventions", "ranks", "compare_with"):
        if isinstance(out.get(name), (list, tuple)):
            out[name] = tuple(out[name])
    if out.get("shape_pool") is not None:
        out["shape_pool"] = tuple(tuple(shape) for shape in out["shape_pool"])
    for dtype in out.get("dtypes", ()):
        _check_choice("each of dtypes", dtype, ALL_DTYPES)
    for convention in out.get("conventions", ()):
        _check_choice("each of conventions", convention, CONVENTIONS)
    return out


def _parameters(target: Any) -> tuple[dict[str, inspect.Parameter], bool]:
    """(named parameters, whether it takes **kwargs); an uninspectable one takes anything."""
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return {}, True
    params = {name: p for name, p in signature.parameters.items()
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    var_keyword = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    return params, var_keyword


def _call_repr(factory: str, target: str, framework: str, convention: str,
               extra: Mapping[str, Any]) -> str:
    arguments = [repr(target), f"framework={framework!r}", f"convention={convention!r}",
                 *(f"{key}={value!r}" for key, value in extra.items())]
    return (f"from bnref.testing.adapters import {factory}\n"
            f"backend = {factory}({', '.join(arguments)})")


def _reproducer(factory: str, path: str | None, framework: str, convention: str,
                extra: Mapping[str, Any]) -> str:
    if path is not None:
        return _call_repr(factory, path, framework, convention, extra)
    return ("# the object was given directly and cannot be imported by name: replace "
            "OBJECT below\n" + _call_repr(factory, "OBJECT", framework, convention, extra)
            ).replace("'OBJECT'", "OBJECT")


class _AdapterMixin:
    """What both default adapters share: the framework's arrays and the reproducer."""

    _framework: _Framework
    _factory: str
    _path: str | None
    _convention: str
    _explicit: dict[str, Any]

    def asarray(self, array: np.ndarray) -> Any:
        return self._framework.asarray(array)

    def to_numpy(self, array: Any) -> np.ndarray:
        return self._framework.to_numpy(array)

    def reproducer(self) -> str:
        return _reproducer(self._factory, self._path, self._framework.name, self._convention,
                           self._explicit)

    def _channels(self, x: Any, axis: int | None) -> int:
        shape = tuple(x.shape)
        if axis is None:
            axis = (self.channel_axis if self.channel_axis is not None
                    else get_convention(self._convention).default_axis)
        return int(shape[axis])


# -- function_backend -----------------------------------------------------------------------


class FunctionBackend(_AdapterMixin, Backend):
    """A function with bnref's functional signature, on ``framework``'s arrays."""

    _factory = "function_backend"

    def __init__(self, function: Any, *, framework: str, convention: str,
                 name: str | None = None, gradients: bool = True,
                 declarations: Mapping[str, Any] | None = None) -> None:
        _check_choice("framework", framework, FRAMEWORKS)
        _check_choice("convention", convention, CONVENTIONS)
        given = _validate_declarations(declarations or {})
        self._framework = _FRAMEWORK_CLASSES[framework]()
        self._framework.prepare(given.get("dtypes", _DEFAULT_DTYPES))
        self._function, self._path = _resolve(function, "function")
        self._convention = convention
        self._gradients = bool(gradients) and self._framework.differentiable
        self.name = name or (function if isinstance(function, str) else getattr(
            self._function, "__name__", "function"))
        self.array_type = self._framework.array_type
        params, var_keyword = _parameters(self._function)
        self._accepts = None if var_keyword else set(params)
        if self._accepts is not None and "training" not in self._accepts:
            raise TypeError(f"{self.name}: the function must take a `training` keyword "
                            f"argument (bnref's functional signature); it takes "
                            f"{sorted(params)}")
        conv = CONVENTIONS[convention]
        inferred: dict[str, Any] = {
            "dtypes": _DEFAULT_DTYPES, "conventions": (convention,),
            "optional_affine": False, "optional_running_stats": False,
            **_framework_defaults(framework)}
        if not self._takes("eps"):
            inferred["fixed_eps"] = conv.default_eps
        if not self._takes("momentum"):
            inferred["fixed_momentum"] = conv.default_momentum
        if not self._takes("axis"):
            inferred["channel_axis"] = conv.default_axis
        self.inferred = inferred
        for key, value in {**inferred, **given}.items():
            setattr(self, key, value)
        # An object's name is its __name__; rebuilt from its path it would be the path.
        named = name or not isinstance(function, str)
        self._explicit = {**({"name": self.name} if named else {}),
                          **({} if gradients else {"gradients": False}), **given}

    def _takes(self, argument: str) -> bool:
        return self._accepts is None or argument in self._accepts

    @property
    def capabilities(self) -> frozenset[str]:
        capabilities = super().capabilities
        return capabilities if self._gradients else capabilities - {"gradients"}

    def _call_kwargs(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in kwargs.items()
                if self._takes(key) and not (key in ("eps", "axis") and value is None)}

    def batch_norm(self, x, gamma, beta, running_mean, running_var, **kwargs):
        return self._function(x, gamma, beta, running_mean, running_var,
                              **self._call_kwargs(kwargs))

    def gradients(self, x, gamma, beta, dy, *, eps=None, axis=None, convention="torch"):
        if not self._gradients:
            return super().gradients(x, gamma, beta, dy)
        fw = self._framework
        kwargs = self._call_kwargs({"training": True, "eps": eps, "axis": axis,
                                    "convention": convention})
        channels = self._channels(x, axis)
        pdtype = gamma.dtype if gamma is not None else np.dtype(param_dtype(x.dtype.name))
        fixed = {
            "gamma": None if gamma is not None or self.optional_affine
            else fw.asarray(np.ones(channels, pdtype)),
            "beta": None if beta is not None or self.optional_affine
            else fw.asarray(np.zeros(channels, pdtype)),
        }
        stats = (None, None) if self.optional_running_stats else (
            fw.asarray(np.zeros(channels, pdtype)), fw.asarray(np.ones(channels, pdtype)))
        wanted = [name for name, value in (("x", x), ("gamma", gamma), ("beta", beta))
                  if value is not None]

        def forward(*primals):
            given = dict(zip(wanted, primals, strict=True))
            return self._function(given["x"], given.get("gamma", fixed["gamma"]),
                                  given.get("beta", fixed["beta"]), *stats, **kwargs)[0]

        primals = [fw.asarray(value) for value in (x, gamma, beta) if value is not None]
        _, grads = fw.vjp(forward, primals, dy)
        by_name = dict(zip(wanted, grads, strict=True))
        return tuple(None if by_name.get(key) is None else fw.to_numpy(by_name[key])
                     for key in ("x", "gamma", "beta"))


def function_backend(function: Any, *, framework: str, convention: str, name: str | None = None,
                     gradients: bool = True, **declarations: Any) -> Backend:
    """A :class:`Backend` for ``function`` (or ``"pkg.module:attr"``), a batch norm with
    bnref's functional signature on ``framework``'s arrays (``"numpy"``, ``"torch"``,
    ``"jax"``, ``"tf"``, ``"mxnet"``) implementing ``convention``'s meaning.

    Inferred declarations (``backend.inferred``): the convention alone, float32 and float64,
    all four arrays required; ``fixed_eps``/``fixed_momentum``/``channel_axis`` at the
    convention's default when the signature lacks ``eps``/``momentum``/``axis``. Keyword
    ``declarations`` (any of :class:`Backend`'s) override them. ``gradients=False`` (or a numpy
    function) leaves gradients out.
    """
    return FunctionBackend(function, framework=framework, convention=convention, name=name,
                           gradients=gradients, declarations=declarations)


# -- layer_backend --------------------------------------------------------------------------

# LayerConfig field -> constructor parameter names that take it (first present wins).
_NUM_FEATURES = ("num_features", "in_channels", "num_channels", "channels", "features")
_EPS = ("eps", "epsilon")
_AFFINE = (("affine",), ("center", "scale"), ("use_bias", "use_scale"))

# canonical -> the names a framework's layers usually use, tried in order.
_USUAL_NAMES: dict[str, dict[str, tuple[str, ...]]] = {
    "torch": {"gamma": ("weight", "gamma"), "beta": ("bias", "beta"),
              "running_mean": ("running_mean", "moving_mean"),
              "running_var": ("running_var", "moving_var", "moving_variance"),
              "num_batches_tracked": ("num_batches_tracked",)},
    "tf": {"gamma": ("gamma",), "beta": ("beta",),
           "running_mean": ("moving_mean", "running_mean"),
           "running_var": ("moving_variance", "moving_var", "running_var"),
           "num_batches_tracked": ("num_batches_tracked",)},
    "mxnet": {"gamma": ("gamma",), "beta": ("beta",),
              "running_mean": ("running_mean", "moving_mean"),
              "running_var": ("running_var", "moving_var"),
              "num_batches_tracked": ("num_batches_tracked",)},
    "jax": {"gamma": ("params/scale",), "beta": ("params/bias",),
            "running_mean": ("batch_stats/mean",), "running_var": ("batch_stats/var",),
            "num_batches_tracked": ("batch_stats/num_batches_tracked",)},
    "numpy": {"gamma": ("gamma", "weight"), "beta": ("beta", "bias"),
              "running_mean": ("running_mean", "moving_mean"),
              "running_var": ("running_var", "moving_var"),
              "num_batches_tracked": ("num_batches_tracked",)},
}


def _state_names(framework: str, convention: str,
                 given: Mapping[str, str] | None) -> dict[str, tuple[str, ...]]:
    names = dict(_USUAL_NAMES[framework])
    if framework == "numpy":  # attributes named as the convention names its state
        conv_names = CONVENTIONS[convention].state_names
        names = {key: tuple(dict.fromkeys((*(
            [conv_names[key]] if key in conv_names and "/" not in conv_names[key] else []),
            *value))) for key, value in names.items()}
    for key, value in (given or {}).items():
        if key not in CANONICAL:
            raise ValueError(f"state_names keys must be among {list(CANONICAL)}, got {key!r}")
        names[key] = (value,) if isinstance(value, str) else tuple(value)
    return names


class LayerBackend(_AdapterMixin, Backend):
    """A layer class behind :class:`~bnref.testing.backends.LayerHandle`; its functional API
    runs a fresh layer per call."""

    _factory = "layer_backend"
    array_type = "numpy.ndarray"  # batch_norm drives the layer through numpy

    def __init__(self, layer_class: Any, *, framework: str, convention: str,
                 name: str | None = None, layer_kwargs: Mapping[str, Any] | None = None,
                 state_names: Mapping[str, str] | None = None,
                 declarations: Mapping[str, Any] | None = None) -> None:
        _check_choice("framework", framework, FRAMEWORKS)
        _check_choice("convention", convention, CONVENTIONS)
        given = _validate_declarations(declarations or {})
        self._framework = _FRAMEWORK_CLASSES[framework]()
        self._framework.prepare(given.get("dtypes", _DEFAULT_DTYPES))
        self.layer_class, self._path = _resolve(layer_class, "layer_class")
        self._convention = convention
        self.name = name or (layer_class if isinstance(layer_class, str) else getattr(
            self.layer_class, "__name__", "layer"))
        self.layer_kwargs = dict(layer_kwargs or {})
        self.state_names = _state_names(framework, convention, state_names)
        params, var_keyword = _parameters(self.layer_class)
        self._params, self._var_keyword = set(params), var_keyword
        conv = CONVENTIONS[convention]
        inferred: dict[str, Any] = {"dtypes": _DEFAULT_DTYPES, "conventions": (convention,),
                                    "optional_affine": True, "optional_running_stats": True,
                                    "cumulative": False, **_framework_defaults(framework)}
        taken = self._params | set(self.layer_kwargs)
        if not taken & set(_EPS):
            inferred["fixed_eps"] = conv.default_eps
        if "momentum" not in taken:
            inferred["fixed_momentum"] = conv.default_momentum
        elif framework in ("torch", "numpy") and _allows_none(params.get("momentum")):
            inferred["cumulative"] = True  # PyTorch's momentum=None: the cumulative average
        if "axis" not in taken:
            inferred["channel_axis"] = conv.default_axis
        if "track_running_stats" not in taken:
            inferred["always_tracks"] = True
        if not any(set(names) <= taken for names in _AFFINE):
            inferred["layer_affine_optional"] = False
        self.inferred = inferred
        for key, value in {**inferred, **given}.items():
            setattr(self, key, value)
        named = name or not isinstance(layer_class, str)
        self._explicit = {**({"name": self.name} if named else {}),
                          **({"layer_kwargs": dict(layer_kwargs)} if layer_kwargs else {}),
                          **({"state_names": dict(state_names)} if state_names else {}),
                          **given}

    def asarray(self, array: np.ndarray) -> np.ndarray:
        return np.array(array, copy=True)

    def to_numpy(self, array: Any) -> np.ndarray:
        return np.asarray(array)

    def constructor_kwargs(self, config: LayerConfig) -> dict[str, Any]:
        """The constructor's keyword arguments for ``config`` (by parameter name)."""
        params, kwargs = self._params, {}
        for name in _NUM_FEATURES:
            if name in params:
                kwargs[name] = config.num_features
                break
        if config.momentum is not DEFAULT and "momentum" in params:
            kwargs["momentum"] = config.momentum
        if config.eps is not None:
            for name in _EPS:
                if name in params:
                    kwargs[name] = config.eps
                    break
        for names in _AFFINE:
            if set(names) <= params:
                kwargs.update(dict.fromkeys(names, config.affine))
                break
        if "track_running_stats" in params:
            kwargs["track_running_stats"] = config.track_running_stats
        if config.axis is not None and "axis" in params:
            kwargs["axis"] = config.axis
        if "convention" in params:
            kwargs["convention"] = config.convention
        kwargs.update(self._framework_dtype_kwargs(config.param_dtype))
        return {**kwargs, **self.layer_kwargs}

    def _framework_dtype_kwargs(self, dtype: str) -> dict[str, Any]:
        fw, params = self._framework.name, self._params
        if fw == "numpy" and "dtype" in params:
            return {"dtype": np.dtype(dtype)}
        if fw == "tf" and ("dtype" in params or self._var_keyword):
            return {"dtype": dtype}  # Keras layers take it through **kwargs
        if fw == "jax" and "param_dtype" in params:
            import jax.numpy as jnp

            return {"param_dtype": jnp.dtype(dtype)}
        return {}  # torch: module.to(dtype); mxnet: block.cast(dtype)

    def build(self, config: LayerConfig) -> Any:
        """A new layer for ``config``."""
        return self.layer_class(**self.constructor_kwargs(config))

    def make_layer(self, config: LayerConfig) -> _Handle:
        return self._framework.handle(self, config)

    def batch_norm(self, x, gamma, beta, running_mean, running_var, *, training,
                   momentum=DEFAULT, eps=None, axis=None, convention=None):
        """One call through a fresh layer: built with ``eps``/``momentum``/``axis`` (omitted
        when omitted), loaded with the given arrays (gamma 1 and beta 0 when absent), one
        forward in the mode (training without running statistics), its statistics read back."""
        del convention  # the layer's own: conventions=(convention,) is declared
        x = np.asarray(x)
        ndim = x.ndim
        if axis is not None and not -ndim <= axis < ndim:
            # Not ours to refuse: build with some channel count and let the layer decide.
            channels = next((len(v) for v in (gamma, beta, running_mean) if v is not None), 1)
        else:
            channels = self._channels(x, axis)
        pdtype = next((v.dtype.name for v in (running_mean, gamma, beta) if v is not None),
                      param_dtype(x.dtype.name))
        config = LayerConfig(num_features=channels, convention=self._convention,
                             momentum=momentum, eps=eps, axis=axis, param_dtype=pdtype)
        handle = self.make_layer(config)
        state = {"gamma": np.ones(channels, pdtype) if gamma is None else gamma,
                 "beta": np.zeros(channels, pdtype) if beta is None else beta}
        if running_mean is not None or running_var is not None:
            state.update(running_mean=running_mean, running_var=running_var)
        handle.load_state({k: v for k, v in state.items() if v is not None})
        y = handle.forward(x, training or running_mean is None)
        if running_mean is None:
            return y, None, None
        after = handle.state()
        return y, after["running_mean"], after["running_var"]


def _allows_none(param: inspect.Parameter | None) -> bool:
    if param is None:
        return False
    annotation = param.annotation
    return param.default is None or (annotation is not inspect.Parameter.empty and (
        "None" in str(annotation) or "Optional" in str(annotation)))


def layer_backend(layer_class: Any, *, framework: str, convention: str, name: str | None = None,
                  layer_kwargs: Mapping[str, Any] | None = None,
                  state_names: Mapping[str, str] | None = None,
                  **declarations: Any) -> Backend:
    """A :class:`Backend` for ``layer_class`` (or ``"pkg.module:Class"``), a batch-norm layer
    of ``framework`` implementing ``convention``'s meaning.

    The constructor gets the :class:`LayerConfig` under the names its signature has (PyTorch,
    Keras, Gluon, Flax and bnref styles) plus ``layer_kwargs``; a hyperparameter it cannot
    take becomes a declaration (``fixed_eps``, ``fixed_momentum``, ``channel_axis``,
    ``always_tracks``, ``layer_affine_optional=False``; ``cumulative`` only for a PyTorch- or
    numpy-style ``momentum`` that may be None). ``state_names`` maps canonical names
    (``gamma``, ``beta``, ``running_mean``, ``running_var``, ``num_batches_tracked``) to the
    layer's, where the framework's usual names do not fit. Keyword ``declarations`` override.
    """
    return LayerBackend(layer_class, framework=framework, convention=convention, name=name,
                        layer_kwargs=layer_kwargs, state_names=state_names,
                        declarations=declarations)


# -- layer handles --------------------------------------------------------------------------


class _Handle:
    """A built layer behind numpy in and out, its state found by name.

    Subclasses provide ``_build(x)`` (for layers that create their state on the first batch),
    ``_entries()`` (name -> entry), ``_read(entry)``, ``_write(entry, value)`` and
    ``_forward(x, training)``.
    """

    def __init__(self, backend: LayerBackend, config: LayerConfig) -> None:
        self.backend, self.config = backend, config
        self.layer = backend.build(config)
        self.built = True
        self.pending: dict[str, np.ndarray] = {}

    # -- names ----------------------------------------------------------------------------
    def _entries(self) -> dict[str, Any]:
        raise NotImplementedError

    def _find(self, canonical: str, entries: Mapping[str, Any]) -> str | None:
        for name in self.backend.state_names[canonical]:
            if name in entries:
                return name
        for name in self.backend.state_names[canonical]:  # a nested layer's, by suffix
            matches = [key for key in entries if key.endswith(("/" + name, "." + name))]
            if len(matches) == 1:
                return matches[0]
        return None

    def _missing(self, canonical: str, entries: Mapping[str, Any], why: str) -> Exception:
        tried = " or ".join(repr(n) for n in self.backend.state_names[canonical])
        has = ", ".join(repr(n) for n in entries) or "none"
        return KeyError(
            f"{self.backend.name}: {why}, but the layer has no {canonical} under {tried}; its "
            f"state has {has}. Pass state_names={{{canonical!r}: '<its name>'}} to "
            "layer_backend (--state-names on the command line).")

    def _expected(self) -> set[str]:
        expected = set()
        if self.config.affine or not self.backend.layer_affine_optional:
            expected |= {"gamma", "beta"}
        if self.config.track_running_stats or self.backend.always_tracks:
            expected |= {"running_mean", "running_var"}
        return expected

    # -- LayerHandle ----------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        if not self.built:
            return {}
        entries = self._entries()
        state = {}
        for canonical in CANONICAL:
            key = self._find(canonical, entries)
            if key is None:
                if canonical in self._expected():
                    raise self._missing(canonical, entries,
                                        f"reading the state of a layer built from {self.config}")
                continue
            value = self._read(entries[key])
            if value is None:
                continue
            value = np.asarray(value)
            state[canonical] = (np.asarray(int(value.reshape(-1)[0]), np.int64)
                                if canonical == "num_batches_tracked"
                                else value.reshape(-1))
        return state

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        if not self.built:
            self.pending.update(state)
            return
        entries = self._entries()
        for canonical, value in state.items():
            key = self._find(canonical, entries)
            if key is None:
                if canonical == "num_batches_tracked":
                    continue  # only the layers that count their steps keep one
                raise self._missing(canonical, entries, f"loading {canonical}")
            current = self._read(entries[key])
            if current is None:
                raise self._missing(canonical, entries, f"loading {canonical}")
            current = np.asarray(current)
            value = np.asarray(value)
            if value.size != current.size:
                raise ValueError(
                    f"{self.backend.name}: {canonical} has {value.size} values, the layer's "
                    f"{key!r} has {current.size} (shape {current.shape})")
            self._write(entries[key], value.reshape(current.shape).astype(current.dtype))

    def forward(self, x: np.ndarray, training: bool) -> np.ndarray:
        if not self.built:
            self._build(x)
            self.built = True
            pending, self.pending = self.pending, {}
            if pending:
                self.load_state(pending)
        return self._forward(x, training)

    def _build(self, x: np.ndarray) -> None:
        pass

    def _read(self, entry: Any) -> Any:
        raise NotImplementedError

    def _write(self, entry: Any, value: np.ndarray) -> None:
        raise NotImplementedError

    def _forward(self, x: np.ndarray, training: bool) -> np.ndarray:
        raise NotImplementedError


def _training_argument(call: Callable) -> str | None:
    params, var_keyword = _parameters(call)
    for name in ("training", "train", "use_running_average", "is_training"):
        if name in params:
            return name
    return "training" if var_keyword else None


class _NumpyHandle(_Handle):
    """A numpy layer: state in attributes; ``layer(x, training=...)`` or ``forward``. A
    layer whose constructor takes no ``dtype`` has its floating array attributes cast to the
    parameter dtype (what ``module.double()`` does in PyTorch)."""

    def __init__(self, backend, config):
        super().__init__(backend, config)
        if "dtype" not in backend._params:
            for key, value in vars(self.layer).items():
                if isinstance(value, np.ndarray) and value.dtype.kind == "f":
                    setattr(self.layer, key, value.astype(config.param_dtype))

    def _entries(self):
        entries = {}
        for key, value in vars(self.layer).items():
            if isinstance(value, (np.ndarray, int, np.integer)) and not isinstance(value, bool):
                entries[key] = key
        for names in self.backend.state_names.values():  # dotted paths, properties
            for name in names:
                if name not in entries and _getpath(self.layer, name) is not None:
                    entries[name] = name
        return entries

    def _read(self, entry):
        value = _getpath(self.layer, entry)
        return None if value is None else np.array(value, copy=True)

    def _write(self, entry, value):
        current = _getpath(self.layer, entry)
        new = int(value.reshape(-1)[0]) if isinstance(current, (int, np.integer)) else value.copy()
        owner, _, attr = entry.rpartition(".")
        setattr(_getpath(self.layer, owner) if owner else self.layer, attr, new)

    def _forward(self, x, training):
        layer = self.layer
        method, argument = layer, _training_argument(layer) if callable(layer) else None
        if argument is None and hasattr(layer, "forward"):
            method, argument = layer.forward, _training_argument(layer.forward)
        if argument is None:
            if hasattr(layer, "train"):
                layer.train(training)
            return np.asarray(method(np.array(x, copy=True)))
        value = not training if argument == "use_running_average" else training
        return np.asarray(method(np.array(x, copy=True), **{argument: value}))


def _getpath(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


class _TorchHandle(_Handle):
    """A ``torch.nn.Module`` in the parameter dtype: state from ``state_dict`` (parameters
    and buffers) and plain tensor attributes; the mode is ``module.train(flag)`` alone, with
    gradients enabled in both, as torch's own layers read it: a layer that tells the mode by
    ``torch.is_grad_enabled()`` (d2l's) uses batch statistics after ``model.eval()``, and is
    reported so."""

    def __init__(self, backend, config):
        import torch

        super().__init__(backend, config)
        dtype = backend._framework.torch_dtype(config.param_dtype)
        self.layer.to(dtype)
        for module in self.layer.modules():  # plain tensor attributes too, which .to() skips
            for key, value in list(vars(module).items()):
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    setattr(module, key, value.to(dtype))

    def _entries(self):
        import torch

        entries = dict(self.layer.state_dict(keep_vars=True))
        for module_name, module in self.layer.named_modules():
            for key, value in vars(module).items():
                if isinstance(value, torch.Tensor) and not key.startswith("_"):
                    entries.setdefault(f"{module_name}.{key}" if module_name else key, value)
        # A registered-but-None buffer (track_running_stats=False) is absent.
        return {key: value for key, value in entries.items() if value is not None}

    def _read(self, entry):
        return self.backend._framework.to_numpy(entry)

    def _write(self, entry, value):
        import torch

        with torch.no_grad():
            entry.copy_(torch.from_numpy(np.array(value, copy=True)))

    def _forward(self, x, training):
        import torch

        fw = self.backend._framework
        self.layer.train(training)
        with torch.enable_grad():
            return fw.to_numpy(self.layer(fw.asarray(x)))


class _KerasHandle(_Handle):
    """A Keras layer: built on its first batch; weights by name or path suffix;
    ``layer(x, training=flag)``."""

    def __init__(self, backend, config):
        super().__init__(backend, config)
        self.built = bool(getattr(self.layer, "built", True))

    def _build(self, x):
        self.layer.build(tuple(x.shape))

    def _entries(self):
        entries = {}
        for weight in self.layer.weights:
            path = getattr(weight, "path", None) or weight.name
            entries[path] = weight
            entries.setdefault(weight.name.split(":")[0], weight)
        return entries

    def _read(self, entry):
        return np.array(entry.numpy())

    def _write(self, entry, value):
        entry.assign(value)

    def _forward(self, x, training):
        fw = self.backend._framework
        return fw.to_numpy(self.layer(fw.asarray(x), training=training))


class _GluonHandle(_Handle):
    """A Gluon block: initialized (and cast to the parameter dtype) on construction;
    parameters by attribute name or name suffix, plus plain NDArray attributes. Training
    steps run under ``autograd.record()`` and then a backward pass (zero head gradient),
    during which ``gluon.nn.BatchNorm`` moves its running statistics."""

    def __init__(self, backend, config):
        super().__init__(backend, config)
        self.layer.initialize()
        if config.param_dtype != "float32":
            self.layer.cast(config.param_dtype)
        # Parameters whose shape waits for the first batch (no in_channels given).
        self.built = not any(0 in (p.shape or (0,)) for p in self.layer.collect_params().values())

    def _build(self, x):
        from mxnet import autograd

        with autograd.predict_mode():  # one forward outside recording moves no statistics
            self.layer(self.backend._framework.asarray(x))

    def _entries(self):
        from mxnet import nd

        entries: dict[str, Any] = {}
        for block_name, block in _gluon_blocks(self.layer):
            prefix = f"{block_name}." if block_name else ""
            for key, param in getattr(block, "_reg_params", {}).items():
                entries[prefix + key] = param
            for key, value in vars(block).items():
                if isinstance(value, nd.NDArray) and not key.startswith("_"):
                    entries.setdefault(prefix + key, value)
        prefix = getattr(self.layer, "prefix", "") or ""
        for key, param in self.layer.collect_params().items():
            entries.setdefault(key, param)
            if prefix and key.startswith(prefix):  # "batchnorm0_gamma" -> "gamma"
                entries.setdefault(key[len(prefix):], param)
        return entries

    def _read(self, entry):
        from mxnet import nd

        return entry.asnumpy() if isinstance(entry, nd.NDArray) else entry.data().asnumpy()

    def _write(self, entry, value):
        from mxnet import nd

        if isinstance(entry, nd.NDArray):
            entry[:] = nd.array(value, dtype=entry.dtype)
            return
        if any(d == 0 for d in (entry.shape or ())):
            entry.shape = value.shape
        entry.set_data(nd.array(value, dtype=entry.dtype))

    def _forward(self, x, training):
        from mxnet import autograd, nd

        x_nd = self.backend._framework.asarray(x)
        if not training:
            return self.layer(x_nd).asnumpy()
        x_nd.attach_grad()
        with autograd.record():
            y = self.layer(x_nd)
        y.backward(nd.zeros_like(y))
        return y.asnumpy()


def _gluon_blocks(block, name: str = ""):
    yield name, block
    for child_name, child in getattr(block, "_children", {}).items():
        child = child() if callable(child) and not hasattr(child, "_children") else child
        yield from _gluon_blocks(child, f"{name}.{child_name}" if name else child_name)


class _FlaxHandle(_Handle):
    """A Flax linen module: variables from ``module.init`` on the first batch, cast to the
    parameter dtype (linen keeps batch statistics in float32 by default); by path
    (``params/scale``, or a nested module's ``params/BatchNorm_0/scale`` by suffix).
    ``module.apply(variables, x, <mode>, mutable=["batch_stats"])``, the mode passed as the
    ``__call__`` takes it (``use_running_average``, ``train`` or ``training``)."""

    def __init__(self, backend, config):
        super().__init__(backend, config)
        self.built = False
        self.variables: dict[str, Any] = {}
        self.argument = _training_argument(type(self.layer).__call__)

    def _mode(self, training: bool) -> tuple[Any, dict[str, Any]]:
        if self.argument is not None:
            value = not training if self.argument == "use_running_average" else training
            return self.layer, {self.argument: value}
        if hasattr(self.layer, "use_running_average"):
            return self.layer.clone(use_running_average=not training), {}
        return self.layer, {}

    def _build(self, x):
        import jax
        import jax.numpy as jnp

        module, mode = self._mode(True)
        variables = module.init(jax.random.PRNGKey(0), jnp.asarray(x), **mode)
        dtype = jnp.dtype(self.config.param_dtype)

        def cast(leaf):
            return leaf.astype(dtype) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf

        self.variables = jax.tree_util.tree_map(cast, _unfreeze(variables))

    def _entries(self):
        return dict(_flatten(self.variables))

    def _read(self, entry):
        return np.asarray(_getitem(self.variables, entry))

    def _write(self, entry, value):
        import jax.numpy as jnp

        _setitem(self.variables, entry, jnp.asarray(value))

    def _forward(self, x, training):
        import jax.numpy as jnp

        module, mode = self._mode(training)
        if not training:
            y = module.apply(self.variables, jnp.asarray(x), **mode)
            return np.asarray(y)
        y, updates = module.apply(self.variables, jnp.asarray(x), **mode, mutable=["batch_stats"])
        self.variables = {**self.variables, **_unfreeze(updates)}
        return np.asarray(y)


def _unfreeze(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {key: _unfreeze(value) for key, value in tree.items()}
    return tree


def _flatten(tree: Mapping[str, Any], prefix: str = ""):
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            yield from _flatten(value, path)
        else:
            yield path, path


def _getitem(tree: Mapping[str, Any], path: str) -> Any:
    for part in path.split("/"):
        tree = tree[part]
    return tree


def _setitem(tree: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split("/")
    for part in parents:
        tree = tree[part]
    tree[last] = value

