"""Backend adapters: the only place the shared suite learns how to drive a framework.

A :class:`Backend` converts numpy arrays to the framework's arrays and back, calls its
``batch_norm``, differentiates it and builds its layer behind a small :class:`LayerHandle`.
The suite and ``bnref check`` speak numpy to adapters only. The registry knows every backend
by name and finds installed ones with ``importlib.util.find_spec``: nothing is imported until a
backend is asked for.

To check your own implementation, the quickest way is ``bnref check --implementation
pkg.module:function --framework torch --convention torch`` (a default adapter,
:mod:`bnref.testing.adapters`); for anything it cannot express, subclass :class:`Backend` (a
numpy function needs only ``batch_norm``) and point the suite's ``backend`` fixture at it.
The protocol is documented on :class:`Backend` and in ``docs/testing.md``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from bnref.conventions import CONVENTIONS, DEFAULT

__all__ = [
    "BUILTIN_ALIASES",
    "DECLARATIONS",
    "KNOWN_BACKENDS",
    "Backend",
    "BackendInfo",
    "Builtin",
    "LayerBuiltin",
    "LayerConfig",
    "LayerHandle",
    "installed_backends",
    "is_installed",
    "load_backend",
    "named_builtin",
    "register_backend",
    "required_backends",
]


@dataclass(frozen=True)
class LayerConfig:
    """A layer's constructor arguments in bnref's terms (``momentum``: DEFAULT, None or float)."""

    num_features: int
    convention: str = "torch"
    momentum: Any = DEFAULT
    eps: float | None = None
    affine: bool = True
    track_running_stats: bool = True
    axis: int | None = None
    param_dtype: str = "float32"

    def with_(self, **changes: Any) -> LayerConfig:
        return replace(self, **changes)

    def resolved(self) -> dict[str, Any]:
        """``axis``, ``momentum`` and ``epsilon`` with the convention's defaults filled in, as
        Keras-style constructors name them."""
        conv = CONVENTIONS[self.convention]
        return {"axis": conv.default_axis if self.axis is None else self.axis,
                "momentum": conv.default_momentum if self.momentum is DEFAULT else self.momentum,
                "epsilon": conv.default_eps if self.eps is None else self.eps}


class LayerHandle(Protocol):
    """A framework's layer behind numpy in, numpy out.

    ``state()``/``load_state()`` use canonical names: ``gamma``, ``beta`` (when affine),
    ``running_mean``, ``running_var`` and ``num_batches_tracked`` (when tracking).
    """

    def forward(self, x: np.ndarray, training: bool) -> np.ndarray: ...

    def state(self) -> dict[str, np.ndarray]: ...

    def load_state(self, state: Mapping[str, np.ndarray]) -> None: ...


class Backend:
    """How the shared suite drives one implementation: override what your framework needs,
    and declare what the implementation is (the class attributes below).

    The adapter protocol (all arrays cross it as numpy arrays unless said otherwise):

    - :meth:`batch_norm` is the functional API on *native* arrays::

          y, new_mean, new_var = batch_norm(x, gamma, beta, running_mean, running_var, *,
                                            training, momentum=<default>, eps=None, axis=None,
                                            convention="torch")

      ``y`` is ``gamma * (x - mean) / sqrt(var + eps) + beta`` with the batch's mean and biased
      variance in training (or without running statistics) and the running ones in inference;
      the new running statistics follow the convention's update (``(1 - m) * old + m * batch``
      for ``torch``, ``m * old + (1 - m) * batch`` for the others; torch feeds the unbiased
      batch variance, the others the biased one); ``None`` comes back as ``None``, and in
      inference the statistics come back unchanged. Inputs are never modified.
    - :meth:`asarray` / :meth:`to_numpy` convert between numpy and native arrays.
    - :meth:`gradients` (optional): ``(dx, dgamma, dbeta)`` of ``sum(y * dy)`` in training.
    - :meth:`make_layer` (optional): a :class:`LayerHandle` for a :class:`LayerConfig`.

    Declarations. Cases are drawn inside them, and a property the adapter cannot serve is
    skipped with a one-line reason instead of crashing:

    - ``dtypes``, ``conventions``: what cases may use (a torch-style implementation declares
      ``conventions = ("torch",)``);
    - ``ranks`` (inclusive), ``channel_axis`` (a fixed channel axis, e.g. ``1`` or ``-1``;
      ``None``: any axis, passed as ``axis=``);
    - ``fixed_eps`` / ``fixed_momentum``: the implementation always uses this value (cases
      then use it too, and the properties that vary it are skipped);
    - ``optional_affine`` / ``optional_running_stats``: whether ``gamma``/``beta`` and the
      running statistics may be ``None``;
    - for the layer: ``cumulative`` (``momentum=None`` means the cumulative average, as in
      PyTorch), ``always_tracks`` (the layer always keeps running statistics), and
      ``layer_affine_optional`` (the layer can be built without gamma and beta);
    - ``exact_errors``: opt in to bnref's own tier, which demands bnref's exact exception types
      and messages for bad input. Off, a bad input must raise *some* exception and modify
      nothing;
    - ``subnormals``: opt in to subnormal values in drawn inputs (some frameworks refuse them);
    - ``shape_pool`` / ``example_scale``: for frameworks that compile per shape, draw shapes
      from a small pool (:data:`bnref.testing.strategies.SHAPE_POOL`) and run that share of
      the profile's examples;
    - ``compare_with``: names of frameworks' own batch norms to compare with, step by step
      (``("torch.nn.BatchNorm2d",)``; any name of :data:`KNOWN_BACKENDS`' built-ins, or of
      :data:`BUILTIN_ALIASES`): the suite's ``test_agrees_with_named_builtins`` runs them.
    """

    name: str = "custom"
    array_type: str = "numpy.ndarray"
    dtypes: tuple[str, ...] = ("float32", "float64")
    conventions: tuple[str, ...] = tuple(CONVENTIONS)  # the ones drawn cases may use
    # A fixed pool of shapes to draw from, for frameworks that compile per shape (JAX);
    # None draws shapes freely.
    shape_pool: tuple[tuple[int, ...], ...] | None = None
    # The share of the Hypothesis profile's max_examples this backend runs per property.
    example_scale: float = 1.0
    ranks: tuple[int, int] = (2, 5)
    channel_axis: int | None = None
    fixed_eps: float | None = None
    fixed_momentum: float | None = None
    optional_affine: bool = True
    optional_running_stats: bool = True
    cumulative: bool = True
    always_tracks: bool = False
    layer_affine_optional: bool = True
    exact_errors: bool = False
    subnormals: bool = False
    compare_with: tuple[str, ...] = ()

    @property
    def capabilities(self) -> frozenset[str]:
        """Which optional methods this adapter implements (overrides)."""
        return frozenset(name for name in ("gradients", "make_layer", "builtin", "layer_builtin")
                         if getattr(type(self), name) is not getattr(Backend, name))

    def reproducer(self) -> str:
        """Python lines that rebuild this adapter as ``backend`` (failure snippets start so)."""
        info = KNOWN_BACKENDS.get(self.name)
        if info is not None and info.module:
            return f"from bnref.testing import load_backend\nbackend = load_backend({self.name!r})"
        cls = type(self)
        return f"from {cls.__module__} import {cls.__qualname__}\nbackend = {cls.__qualname__}()"

    def declared(self) -> dict[str, Any]:
        """The declarations that differ from an unrestricted implementation's (for reports)."""
        return {name: getattr(self, name) for name in DECLARATIONS
                if getattr(self, name) != getattr(Backend, name)}

    # -- arrays ---------------------------------------------------------------------------
    def asarray(self, array: np.ndarray) -> Any:
        """A native copy of ``array`` with the same dtype (bfloat16 arrays via ml_dtypes)."""
        return np.array(array, copy=True)

    def to_numpy(self, array: Any) -> np.ndarray:
        return np.asarray(array)

    # -- functional -----------------------------------------------------------------------
    def batch_norm(self, x, gamma, beta, running_mean, running_var, **kwargs: Any):
        raise NotImplementedError(f"backend {self.name!r} has no batch_norm")

    def run_batch_norm(self, x, gamma, beta, running_mean, running_var, **kwargs: Any):
        """``batch_norm`` on numpy inputs, numpy outputs (``None`` stays ``None``)."""
        native = [None if a is None else self.asarray(a)
                  for a in (x, gamma, beta, running_mean, running_var)]
        return tuple(None if r is None else self.to_numpy(r)
                     for r in self.batch_norm(*native, **kwargs))

    def gradients(self, x, gamma, beta, dy, **kwargs: Any):
        """Training-mode ``(dx, dgamma, dbeta)`` of ``sum(batch_norm(x, ...)[0] * dy)``.

        ``dgamma``/``dbeta`` are ``None`` when ``gamma``/``beta`` are.
        """
        raise NotImplementedError(f"backend {self.name!r} has no gradients")

    # -- layer ----------------------------------------------------------------------------
    def make_layer(self, config: LayerConfig) -> LayerHandle:
        raise NotImplementedError(f"backend {self.name!r} has no layer")

    # -- built-ins ------------------------------------------------------------------------
    def builtin(self, name: str) -> Builtin:
        """The framework's own implementation called ``name`` (see ``BackendInfo.builtins``)."""
        raise NotImplementedError(f"backend {self.name!r} has no built-in {name!r}")

    def layer_builtin(self, name: str) -> LayerBuiltin:
        """The framework's own layer called ``name`` (see ``BackendInfo.layer_builtins``)."""
        raise NotImplementedError(f"backend {self.name!r} has no built-in layer {name!r}")

    def __repr__(self) -> str:
        return self.name


# Every declaration a Backend subclass (or a default adapter's keyword) may set.
DECLARATIONS = ("dtypes", "conventions", "ranks", "channel_axis", "fixed_eps", "fixed_momentum",
                 "optional_affine", "optional_running_stats", "cumulative", "always_tracks",
                 "layer_affine_optional", "exact_errors", "subnormals", "shape_pool",
                 "example_scale", "compare_with")


@dataclass(frozen=True)
class Builtin:
    """A framework's own batch norm, driven like ``Backend.run_batch_norm`` (numpy in and out).

    ``cases`` are the ``bn_cases`` keyword arguments that restrict drawn cases to what the
    built-in accepts (its convention, channel axis, dtypes, ...); ``note`` says why.
    """

    name: str
    run: Callable[..., tuple[Any, ...]]
    cases: Mapping[str, Any]
    note: str = ""
    # (x, gamma, beta, dy, *, eps, axis) -> (dx, dgamma, dbeta) by the framework's autodiff,
    # for built-ins listed in BackendInfo.gradient_builtins.
    gradients: Callable[..., tuple[Any, ...]] | None = None


@dataclass(frozen=True)
class LayerBuiltin:
    """A framework's own layer behind a :class:`LayerHandle` (numpy in and out).

    ``make(config)`` builds it from bnref's :class:`LayerConfig`; ``cases`` are the
    ``layer_cases`` keyword arguments restricting drawn cases to what it accepts.
    """

    name: str
    make: Callable[[LayerConfig], LayerHandle]
    cases: Mapping[str, Any]
    note: str = ""


@dataclass(frozen=True)
class BackendInfo:
    name: str
    framework: str  # the module whose presence means "installed"
    factory: str | Callable[[], Backend]  # "module:Class" (imported lazily) or a callable
    builtins: tuple[str, ...] = ()  # names the adapter's builtin() answers to
    layer_builtins: tuple[str, ...] = ()  # names the adapter's layer_builtin() answers to
    gradient_builtins: tuple[str, ...] = ()  # built-ins whose Builtin.gradients is set
    module: str = ""  # the bnref module implementing it ("bnref.torch"); "" for third parties


KNOWN_BACKENDS: dict[str, BackendInfo] = {
    "numpy": BackendInfo("numpy", "numpy", "bnref.testing._numpy:NumpyBackend",
                         builtins=("onnxruntime", "onnx.reference"), module="bnref.numpy"),
    "torch": BackendInfo("torch", "torch", "bnref.testing._torch:TorchBackend",
                         builtins=("torch.nn.functional.batch_norm",),
                         layer_builtins=("torch.nn.BatchNormNd",),
                         gradient_builtins=("torch.nn.functional.batch_norm",),
                         module="bnref.torch"),
    "jax": BackendInfo("jax", "jax", "bnref.testing._jax:JaxBackend",
                       builtins=("flax.linen.BatchNorm",),
                       layer_builtins=("flax.linen.BatchNorm", "flax.nnx.BatchNorm"),
                       gradient_builtins=("flax.linen.BatchNorm",), module="bnref.jax"),
    "tf": BackendInfo("tf", "tensorflow", "bnref.testing._tf:TfBackend",
                      builtins=("keras.layers.BatchNormalization", "tf.nn.batch_normalization",
                                "tf.compat.v1.nn.fused_batch_norm"),
                      layer_builtins=("keras.layers.BatchNormalization",),
                      gradient_builtins=("keras.layers.BatchNormalization",
                                         "tf.nn.batch_normalization",
                                         "tf.compat.v1.nn.fused_batch_norm"),
                      module="bnref.tf"),
    "mxnet": BackendInfo("mxnet", "mxnet", "bnref.testing._mxnet:MxnetBackend",
                         builtins=("mxnet.nd.BatchNorm",),
                         layer_builtins=("mxnet.gluon.nn.BatchNorm",),
                         gradient_builtins=("mxnet.nd.BatchNorm",), module="bnref.mxnet"),
}

_LOADED: dict[str, Backend] = {}


def register_backend(name: str, framework: str, factory: str | Callable[[], Backend],
                     builtins: tuple[str, ...] = (), layer_builtins: tuple[str, ...] = (),
                     gradient_builtins: tuple[str, ...] = ()) -> None:
    """Make a backend known to the registry (and so to ``bnref check`` and the suite)."""
    KNOWN_BACKENDS[name] = BackendInfo(name, framework, factory, builtins, layer_builtins,
                                       gradient_builtins)
    _LOADED.pop(name, None)


def is_installed(name: str) -> bool:
    info = KNOWN_BACKENDS[name]
    return importlib.util.find_spec(info.framework) is not None


def installed_backends() -> list[str]:
    return [name for name in KNOWN_BACKENDS if is_installed(name)]


def required_backends() -> list[str]:
    """Backends named in ``BNREF_REQUIRE`` (comma-separated, or ``all``): missing is an error."""
    raw = os.environ.get("BNREF_REQUIRE", "").strip()
    if raw == "all":
        return list(KNOWN_BACKENDS)
    names = [name.strip() for name in raw.split(",") if name.strip()]
    unknown = [name for name in names if name not in KNOWN_BACKENDS]
    if unknown:
        raise ValueError(f"BNREF_REQUIRE names unknown backends {unknown}; "
                         f"known: {sorted(KNOWN_BACKENDS)}")
    return names


def load_backend(name: str) -> Backend:
    """The adapter for ``name`` (imports its framework on first use)."""
    if name not in KNOWN_BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known: {sorted(KNOWN_BACKENDS)}")
    if name not in _LOADED:
        factory = KNOWN_BACKENDS[name].factory
        if isinstance(factory, str):
            module_name, _, attr = factory.partition(":")
            factory = getattr(importlib.import_module(module_name), attr)
        _LOADED[name] = factory()
    return _LOADED[name]


# Names users know, for built-ins the registry knows under another name: (registered name,
# restrictions of the drawn cases).
BUILTIN_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "torch.nn.BatchNorm1d": ("torch.nn.BatchNormNd", {"ranks": (2, 3)}),
    "torch.nn.BatchNorm2d": ("torch.nn.BatchNormNd", {"ranks": (4, 4)}),
    "torch.nn.BatchNorm3d": ("torch.nn.BatchNormNd", {"ranks": (5, 5)}),
    "torch.nn.BatchNormNd": ("torch.nn.BatchNormNd", {}),
    "keras.layers.BatchNormalization": ("keras.layers.BatchNormalization", {}),
    "tf.keras.layers.BatchNormalization": ("keras.layers.BatchNormalization", {}),
    "mxnet.gluon.nn.BatchNorm": ("mxnet.gluon.nn.BatchNorm", {}),
    "ONNX BatchNormalization": ("onnxruntime", {}),
}


def named_builtin(name: str, layer: bool) -> tuple[Builtin | LayerBuiltin, dict[str, Any]]:
    """The framework's own batch norm called ``name`` -- a layer (``layer=True``, when the
    name has one) or a function -- and extra case restrictions, for ``compare_with``."""
    registered, extra = BUILTIN_ALIASES.get(name, (name, {}))
    for info in KNOWN_BACKENDS.values():
        if layer and registered in info.layer_builtins:
            return load_backend(info.name).layer_builtin(registered), extra
    for info in KNOWN_BACKENDS.values():
        if registered in info.builtins:
            return load_backend(info.name).builtin(registered), extra
    if registered == "torch.nn.BatchNormNd":  # for a function: the layer's own functional
        functional = load_backend("torch").builtin("torch.nn.functional.batch_norm")
        return replace(functional, name=f"{name} (as {functional.name})"), extra
    for info in KNOWN_BACKENDS.values():
        if registered in info.layer_builtins:
            return load_backend(info.name).layer_builtin(registered), extra
    known = sorted({*BUILTIN_ALIASES, *(n for i in KNOWN_BACKENDS.values()
                                        for n in (*i.builtins, *i.layer_builtins))})
    raise ValueError(f"compare_with names an unknown built-in {name!r}; known: {known}")
