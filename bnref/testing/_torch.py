"""The torch backend's adapter, and torch's own batch norm as built-ins to compare with."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

import bnref.torch as bt
from bnref.conventions import DEFAULT, get_convention
from bnref.testing.backends import Backend, Builtin, LayerBuiltin, LayerConfig
from bnref.testing.strategies import numpy_dtype

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
           "float64": torch.float64}
# canonical state name -> torch.nn.BatchNorm*d's
_NAMES = {"gamma": "weight", "beta": "bias", "running_mean": "running_mean",
          "running_var": "running_var", "num_batches_tracked": "num_batches_tracked"}


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """An exact tensor copy; numpy has no bfloat16 of its own, so go through float32."""
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.array(array, copy=True))


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.float().numpy().astype(numpy_dtype("bfloat16"))
    return tensor.numpy()


class TorchLayer:
    """Any torch module with BatchNorm*d's state names, behind numpy in and out."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def forward(self, x: np.ndarray, training: bool) -> np.ndarray:
        self.module.train(training)
        with torch.no_grad():
            return to_numpy(self.module(to_tensor(x)))

    def state(self) -> dict[str, np.ndarray]:
        state = self.module.state_dict()
        return {name: to_numpy(state[key]) for name, key in _NAMES.items() if key in state}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        current = self.module.state_dict()
        self.module.load_state_dict({
            _NAMES[name]: to_tensor(np.asarray(value)).to(current[_NAMES[name]].dtype)
            for name, value in state.items()})


class _LazyBuiltinLayer(TorchLayer):
    """torch.nn.BatchNorm1d/2d/3d, picked by the rank of the first batch it sees."""

    def __init__(self, config: LayerConfig) -> None:
        conv = get_convention(config.convention)
        self.kwargs = {
            "num_features": config.num_features,
            "eps": conv.default_eps if config.eps is None else config.eps,
            "momentum": conv.default_momentum if config.momentum is DEFAULT else config.momentum,
            "affine": config.affine, "track_running_stats": config.track_running_stats,
            "dtype": _DTYPES[config.param_dtype],
        }
        self.pending: Mapping[str, np.ndarray] | None = None
        self.module = None

    def _build(self, ndim: int) -> None:
        cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
               5: torch.nn.BatchNorm3d}[ndim]
        self.module = cls(**self.kwargs)
        if self.pending is not None:
            super().load_state(self.pending)

    def forward(self, x: np.ndarray, training: bool) -> np.ndarray:
        if self.module is None:
            self._build(x.ndim)
        return super().forward(x, training)

    def state(self) -> dict[str, np.ndarray]:
        return super().state() if self.module is not None else {}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        if self.module is None:
            self.pending = state
        else:
            super().load_state(state)


def _functional_builtin(x, gamma, beta, running_mean, running_var, *, training, momentum, eps,
                        axis=None, convention="torch"):
    del axis, convention  # fixed by the cases: channels on axis 1, torch's meaning
    tensors = [None if a is None else to_tensor(a)
               for a in (x, gamma, beta, running_mean, running_var)]
    x_t, gamma_t, beta_t, mean_t, var_t = tensors
    # F.batch_norm raises without running statistics in inference; the layer then uses the
    # batch statistics (training=True), which is what bnref's contract does.
    y = torch.nn.functional.batch_norm(x_t, mean_t, var_t, gamma_t, beta_t,
                                       training=training or mean_t is None,
                                       momentum=momentum, eps=eps)
    return (to_numpy(y), None if mean_t is None else to_numpy(mean_t),
            None if var_t is None else to_numpy(var_t))


def _functional_gradients(x, gamma, beta, dy, *, eps, axis=1):
    del axis  # fixed by the cases: channels on axis 1
    inputs = [None if a is None else to_tensor(a).requires_grad_() for a in (x, gamma, beta)]
    y = torch.nn.functional.batch_norm(inputs[0], None, None, inputs[1], inputs[2],
                                       training=True, eps=eps)
    wanted = [t for t in inputs if t is not None]
    grads = iter(torch.autograd.grad(y, wanted, grad_outputs=to_tensor(dy)))
    return tuple(None if t is None else to_numpy(next(grads)) for t in inputs)


class TorchBackend(Backend):
    # The one-line built-in comparison third parties use, exercised on bnref's own adapter.
    compare_with = ("torch.nn.BatchNorm2d", "torch.nn.functional.batch_norm")
    exact_errors = True  # bnref's own tier: the contract's exact exception messages
    name = "torch"
    array_type = bt.functional.ARRAY_TYPE
    dtypes = ("float16", "bfloat16", "float32", "float64")

    def asarray(self, array: np.ndarray) -> torch.Tensor:
        return to_tensor(array)

    def to_numpy(self, array: torch.Tensor) -> np.ndarray:
        return to_numpy(array)

    def batch_norm(self, x, gamma, beta, running_mean, running_var, **kwargs):
        return bt.batch_norm(x, gamma, beta, running_mean, running_var, **kwargs)

    def gradients(self, x, gamma, beta, dy, *, eps=None, axis=None, convention="torch"):
        inputs = [None if a is None else to_tensor(a).requires_grad_() for a in (x, gamma, beta)]
        y = bt.batch_norm(*inputs, None, None, training=True, eps=eps, axis=axis,
                          convention=convention)[0]
        wanted = [t for t in inputs if t is not None]
        grads = iter(torch.autograd.grad(y, wanted, grad_outputs=to_tensor(dy)))
        return tuple(None if t is None else to_numpy(next(grads)) for t in inputs)

    def make_layer(self, config: LayerConfig) -> TorchLayer:
        return TorchLayer(bt.BatchNorm(
            config.num_features, eps=config.eps, momentum=config.momentum, affine=config.affine,
            track_running_stats=config.track_running_stats, dtype=_DTYPES[config.param_dtype],
            axis=config.axis, convention=config.convention))

    def builtin(self, name: str) -> Builtin:
        if name != "torch.nn.functional.batch_norm":
            return super().builtin(name)
        return Builtin(name, _functional_builtin,
                       cases={"conventions": ("torch",), "channel_axis": 1,
                              "dtypes": ("float32", "float64")},
                       note="channels on axis 1, torch's momentum meaning",
                       gradients=_functional_gradients)

    def layer_builtin(self, name: str) -> LayerBuiltin:
        if name != "torch.nn.BatchNormNd":
            return super().layer_builtin(name)
        return LayerBuiltin(name, _LazyBuiltinLayer,
                            cases={"conventions": ("torch",), "channel_axis": 1,
                                   "dtypes": ("float32", "float64")},
                            note="BatchNorm1d for rank 2-3, 2d for rank 4, 3d for rank 5")
