"""``bnref demo``: the tutorials' with/without-BN experiment, in every installed framework at once.

Two small models (an MLP on MNIST-1D, a CNN on scikit-learn's 8x8 digits) are trained without
BN, with bnref's BN layer and with the framework's built-in, in numpy, PyTorch, JAX, TensorFlow
and MXNet, from the same numpy-drawn initial weights on the same batches, with each
framework's own SGD with momentum. :func:`run` writes the plots, ``metrics.json`` and an
``index.html`` (see ``docs/teaching.md``)::

    import bnref.demo
    metrics = bnref.demo.run("demo-out")              # or: bnref demo --out demo-out

The extra ``demo`` (matplotlib, scikit-learn, mnist1d) is needed; nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

__all__ = ["MissingExtra", "run"]

_NEEDS = {"matplotlib": "matplotlib", "sklearn": "scikit-learn", "mnist1d": "mnist1d"}


class MissingExtra(ImportError):
    """The demo's packages are not installed."""


def check_extra() -> None:
    missing = [package for module, package in _NEEDS.items()
               if importlib.util.find_spec(module) is None]
    if missing:
        raise MissingExtra(f"bnref demo needs {', '.join(missing)}: install the demo extra, "
                           "pip install 'bnref[demo]' (or 'bnref[all]')")


def run(out: str | Path | None = "bnref-demo", *, backends: list[str] | None = None,
        quick: bool = False, dtype: str = "float32", progress: bool = True,
        models: tuple[str, ...] = ("mlp", "cnn")) -> dict[str, Any]:
    """Train every run, measure how far the frameworks are apart, and (unless ``out`` is
    None) write the report to ``out``. Returns the metrics (what ``metrics.json`` holds).

    ``backends``: a subset of ``("numpy", "torch", "jax", "tf", "mxnet")`` (default: every
    installed one); ``quick``: fewer samples and steps (for tests); ``dtype``: ``"float32"``
    or ``"float64"``; ``models``: ``"mlp"`` and/or ``"cnn"``.
    """
    check_extra()
    from bnref.demo.experiment import (
        BACKENDS,
        FRAMEWORK_MODULES,
        Settings,
        available_backends,
        metrics,
        run_all,
    )

    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    if backends is not None:
        unknown = [b for b in backends if b not in BACKENDS]
        if unknown:
            raise ValueError(f"backends must be among {BACKENDS}, got {unknown}")
        missing = [b for b in backends if b not in available_backends()]
        if missing:
            needs = ", ".join(f"{b}: {FRAMEWORK_MODULES[b]}" for b in missing)
            raise ValueError(f"backends {missing} are not installed here (they import {needs})")
    settings = Settings.quick(dtype) if quick else Settings(dtype=dtype)
    unknown_models = [m for m in models if m not in ("mlp", "cnn")]
    if unknown_models or not models:
        raise ValueError(f"models must be among ('mlp', 'cnn'), got {models}")
    result = metrics(run_all(settings, backends, progress=progress, models=models))
    if out is not None:
        from bnref.demo.report import write_report

        write_report(result, Path(out))
    return result
