"""The ONNX ``BatchNormalization`` operator, run by onnxruntime or by ``onnx.reference``.

The operator (opset 15) takes ``X, scale, B, input_mean, input_var`` with channels on axis 1,
``momentum`` weighting the *old* running value and, with ``training_mode=1``, returns
``Y, running_mean, running_var`` updated with the biased batch variance.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

_ONNX_TYPES = {"float32": 1, "float64": 11, "float16": 10}  # onnx.TensorProto enum values


@lru_cache(maxsize=64)
def _model_bytes(dtype: str, training: bool, momentum: float, eps: float, opset: int) -> bytes:
    from onnx import helper

    elem = _ONNX_TYPES[dtype]
    # Before opset 14 the outputs differ by opset; onnx.reference returns Y alone there.
    outputs = ["Y", "running_mean", "running_var"] if training and opset >= 14 else ["Y"]
    attributes = {"epsilon": eps}
    if opset >= 14:
        attributes["training_mode"] = int(training)
        attributes["momentum"] = momentum
    elif training:
        attributes["momentum"] = momentum  # opset 9: the presence of momentum means "training"
    node = helper.make_node("BatchNormalization", ["X", "scale", "B", "input_mean", "input_var"],
                            outputs, **attributes)
    inputs = [helper.make_tensor_value_info("X", elem, None)] + [
        helper.make_tensor_value_info(name, elem, None)
        for name in ("scale", "B", "input_mean", "input_var")
    ]
    graph = helper.make_graph([node], "batch_norm", inputs,
                              [helper.make_tensor_value_info(name, elem, None) for name in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 8)  # what this onnxruntime accepts
    return model.SerializeToString()


@lru_cache(maxsize=64)
def _session(model: bytes):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def run_onnx(
    x: np.ndarray,
    scale: np.ndarray,
    bias: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    *,
    training: bool,
    momentum: float,
    eps: float,
    engine: str = "onnxruntime",
    opset: int = 15,
) -> tuple[np.ndarray, ...]:
    """Run one BatchNormalization node; returns ``(Y,)`` or ``(Y, running_mean, running_var)``."""
    dtype = x.dtype.name
    model = _model_bytes(dtype, training, float(momentum), float(eps), opset)
    feeds = {"X": x, "scale": scale.astype(dtype), "B": bias.astype(dtype),
             "input_mean": mean.astype(dtype), "input_var": var.astype(dtype)}
    if engine == "onnxruntime":
        return tuple(_session(model).run(None, feeds))
    if engine == "reference":
        import onnx
        from onnx.reference import ReferenceEvaluator

        return tuple(ReferenceEvaluator(onnx.load_from_string(model)).run(None, feeds))
    raise ValueError(f"engine must be 'onnxruntime' or 'reference', got {engine!r}")
