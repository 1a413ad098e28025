"""The numpy backend's adapter (the oracle checked in lower precisions against itself in float64,
and against the ONNX operator)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

import bnref.numpy as bn
from bnref.testing import _onnx
from bnref.testing.backends import Backend, Builtin, LayerConfig


def _has_bfloat16() -> bool:
    try:
        import ml_dtypes  # noqa: F401
    except ImportError:
        return False
    return True


class NumpyLayer:
    def __init__(self, config: LayerConfig) -> None:
        self.layer = bn.BatchNorm(
            config.num_features, momentum=config.momentum, eps=config.eps, affine=config.affine,
            track_running_stats=config.track_running_stats, axis=config.axis,
            convention=config.convention, dtype=np.dtype(config.param_dtype),
        )

    def forward(self, x: np.ndarray, training: bool) -> np.ndarray:
        return self.layer(x, training=training)

    def state(self) -> dict[str, np.ndarray]:
        state = self.layer.state_dict("torch")
        names = {"weight": "gamma", "bias": "beta"}
        return {names.get(key, key): np.asarray(value) for key, value in state.items()}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        names = {"gamma": "weight", "beta": "bias"}
        self.layer.load_state_dict({names.get(key, key): value for key, value in state.items()})


class NumpyBackend(Backend):
    exact_errors = True  # bnref's own tier: the contract's exact exception messages
    name = "numpy"
    array_type = bn.functional.ARRAY_TYPE
    dtypes = ("float16", "bfloat16", "float32", "float64") if _has_bfloat16() else (
        "float16", "float32", "float64")

    def batch_norm(self, x, gamma, beta, running_mean, running_var, **kwargs):
        return bn.batch_norm(x, gamma, beta, running_mean, running_var, **kwargs)

    def gradients(self, x, gamma, beta, dy, *, eps=None, axis=None, convention="torch"):
        return bn.batch_norm_backward(dy, x, gamma, eps=eps, axis=axis, beta=beta,
                                      convention=convention)

    def make_layer(self, config: LayerConfig) -> NumpyLayer:
        return NumpyLayer(config)

    def builtin(self, name: str) -> Builtin:
        if name not in ("onnxruntime", "onnx.reference"):
            return super().builtin(name)
        engine = "onnxruntime" if name == "onnxruntime" else "reference"

        def run(x, gamma, beta, running_mean, running_var, *, training, momentum, eps,
                axis=None, convention="onnx"):
            del axis, convention  # fixed by `cases` below: channels on axis 1, onnx meaning
            outputs = _onnx.run_onnx(x, gamma, beta, running_mean, running_var,
                                     training=training, momentum=momentum, eps=eps,
                                     engine=engine)
            if not training:
                return outputs[0], running_mean, running_var
            return outputs

        return Builtin(
            name, run,
            cases={"conventions": ("onnx",), "channel_axis": 1, "affine": True,
                   "running_stats": True, "dtypes": ("float32", "float64"),
                   "float32_constants": True},
            note="ONNX BatchNormalization-15: channels on axis 1, all four inputs required, "
                 "epsilon and momentum are float32 attributes even for float64 data",
        )
