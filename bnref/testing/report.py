"""What a failing property prints: a snippet that reproduces the case with the user's own
implementation, and (via :mod:`bnref.testing.diagnose`) the mistake that explains it.

The snippet is self-contained: the drawn arrays are written out as literals (exact: every value
goes through ``repr`` of a Python float), the adapter is rebuilt with
:meth:`~bnref.testing.backends.Backend.reproducer`, and the float64 oracle computes what was
expected, so it can be pasted into a file and run without pytest or Hypothesis.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bnref.testing.backends import Backend, LayerConfig
from bnref.testing.strategies import BNCase, LayerCase

__all__ = ["array_literal", "diagnosis_text", "snippet"]

_ARRAYS = ("x", "gamma", "beta", "running_mean", "running_var")


def array_literal(array: np.ndarray | None) -> str:
    """Python source that rebuilds ``array`` exactly (bfloat16 through ml_dtypes)."""
    if array is None:
        return "None"
    values = np.asarray(array).astype(np.float64).tolist() if array.dtype.kind == "f" or (
        array.dtype.name == "bfloat16") else np.asarray(array).tolist()
    if array.dtype.name == "bfloat16":
        return f"np.array({values!r}).astype(ml_dtypes.bfloat16)"
    return f"np.array({values!r}, dtype=np.{array.dtype.name})"


def _header(backend: Backend, arrays: dict[str, np.ndarray | None]) -> list[str]:
    lines = ["import numpy as np", "import bnref.numpy as oracle"]
    if any(a is not None and a.dtype.name == "bfloat16" for a in arrays.values()):
        lines.append("import ml_dtypes")
    lines += backend.reproducer().splitlines()
    lines += [f"{name} = {array_literal(value)}" for name, value in arrays.items()]
    return lines


def _wide(names: tuple[str, ...]) -> str:
    return ", ".join(f"None if {n} is None else {n}.astype(np.float64)" for n in names)


def _bn_snippet(backend: Backend, case: BNCase) -> list[str]:
    lines = _header(backend, dict(zip(_ARRAYS, case.arrays, strict=True)))
    return [*lines,
            f"kwargs = {case.kwargs()!r}",
            "got = backend.run_batch_norm(x, gamma, beta, running_mean, running_var, **kwargs)",
            f"expected = oracle.batch_norm({_wide(_ARRAYS)}, **kwargs)",
            'for name, g, e in zip(("y", "new running_mean", "new running_var"), got, '
            'expected):',
            "    if g is not None and e is not None:",
            "        print(name, 'max |error|', np.max(np.abs(g.astype(np.float64) - e)))"]


def _gradient_snippet(backend: Backend, case: BNCase, dy: np.ndarray) -> list[str]:
    arrays = {"x": case.x, "gamma": case.gamma, "beta": case.beta, "dy": dy}
    kwargs = {"eps": case.eps, "axis": case.axis, "convention": case.convention}
    return [*_header(backend, arrays),
            f"kwargs = {kwargs!r}",
            "got = backend.gradients(x, gamma, beta, dy, **kwargs)",
            "expected = oracle.batch_norm_backward(dy.astype(np.float64), x.astype(np.float64), "
            "None if gamma is None else gamma.astype(np.float64), "
            "beta=None if beta is None else beta.astype(np.float64), **kwargs)",
            'for name, g, e in zip(("dx", "dgamma", "dbeta"), got, expected):',
            "    if g is not None and e is not None:",
            "        print(name, 'max |error|', np.max(np.abs(g.astype(np.float64) - e)))"]


def _config_source(config: LayerConfig) -> str:
    fields = {k: getattr(config, k) for k in LayerConfig.__dataclass_fields__}
    parts = [f"{k}={'DEFAULT' if v is _default() else repr(v)}" for k, v in fields.items()]
    return f"LayerConfig({', '.join(parts)})"


def _default() -> Any:
    from bnref.conventions import DEFAULT

    return DEFAULT


def _layer_snippet(backend: Backend, case: LayerCase) -> list[str]:
    arrays = {f"batch_{i}": b for i, b in enumerate(case.batches)}
    arrays["eval_batch"] = case.eval_batch
    for name, value in (case.initial_state or {}).items():
        arrays[f"initial_{name}"] = np.asarray(value)
    lines = _header(backend, arrays)
    state = ", ".join(f"{n!r}: initial_{n}" for n in (case.initial_state or {}))
    config = case.config
    lines += [
        "from bnref.conventions import DEFAULT",
        "from bnref.testing import LayerConfig",
        f"config = {_config_source(config)}",
        "layer = backend.make_layer(config)",
        "reference = oracle.BatchNorm(config.num_features, momentum=config.momentum, "
        "eps=config.eps, affine=config.affine, track_running_stats=config.track_running_stats, "
        "axis=config.axis, convention=config.convention, dtype=np.float64)",
    ]
    if case.initial_state is not None:
        lines += [f"state = {{{state}}}", "layer.load_state(state)",
                  'names = {"gamma": "weight", "beta": "bias"}',
                  "reference.load_state_dict({names.get(k, k): v for k, v in state.items()})"]
    steps = [f"(batch_{i}, True)" for i in range(len(case.batches))] + ["(eval_batch, False)"]
    lines += [
        f"for step, (batch, training) in enumerate([{', '.join(steps)}], start=1):",
        "    y = layer.forward(batch, training=training)",
        "    expected = reference(batch.astype(np.float64), training=training)",
        "    state = layer.state()",
        "    print(step, 'train' if training else 'eval', 'y max |error|',",
        "          np.max(np.abs(y.astype(np.float64) - expected)))",
        "    for name in ('running_mean', 'running_var'):",
        "        if name in state and getattr(reference, name) is not None:",
        "            print('   ', name, 'got', state[name], 'expected', getattr(reference, name))",
    ]
    return lines


def snippet(backend: Backend, context: Any) -> str | None:
    """Source that reproduces ``context`` (a drawn case, ``(case, dy)`` or
    ``(case, dy, direction)``) with ``backend``; ``None`` for anything else."""
    if isinstance(context, BNCase):
        lines = _bn_snippet(backend, context)
    elif isinstance(context, LayerCase):
        lines = _layer_snippet(backend, context)
    elif (isinstance(context, tuple) and len(context) >= 2 and isinstance(context[0], BNCase)
          and isinstance(context[1], np.ndarray)):
        lines = _gradient_snippet(backend, context[0], context[1])
    else:
        return None
    return "\n".join(lines)


_DIAGNOSES: dict[int, str] = {}


def diagnosis_text(backend: Backend) -> str:
    """The diagnosis of ``backend`` in words, computed once per adapter (it does not depend
    on the failing case: it runs its own probes)."""
    key = id(backend)
    if key not in _DIAGNOSES:
        try:
            from bnref.testing.diagnose import diagnose

            _DIAGNOSES[key] = diagnose(backend).text
        except Exception as error:  # a diagnosis must never hide the failure it explains
            _DIAGNOSES[key] = f"(no diagnosis: {type(error).__name__}: {error})"
    return _DIAGNOSES[key]
