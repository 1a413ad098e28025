"""The demo's runs: every installed framework, both models, without BN, with bnref's layer and with
the framework's built-in, from the same weights on the same batches; then how far apart they
are, and the ported-naively experiment.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import os
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from bnref.demo import data as datasets
from bnref.demo.core import SGD_FORMS, Hyper, Job, RunResult, initial_weights

__all__ = ["BACKENDS", "FRAMEWORK_MODULES", "Settings", "agreement", "available_backends",
           "run_all"]

BACKENDS = ("numpy", "torch", "jax", "tf", "mxnet")
# What each backend's runs import: the JAX runs are Flax models trained with optax (which
# Flax installs).
FRAMEWORK_MODULES = {"numpy": "numpy", "torch": "torch", "jax": "flax", "tf": "tensorflow",
                     "mxnet": "mxnet"}
SEED = 0


@dataclass(frozen=True)
class Settings:
    """The run's size. ``quick`` is for tests: fewer samples and steps, same models."""

    dtype: str = "float32"
    mlp_steps: int = 300
    cnn_steps: int = 150
    port_steps: int = 100
    mnist_samples: int = 4000
    mlp_hyper: Hyper = field(default_factory=lambda: Hyper(lr=0.0625, batch=100))
    cnn_hyper: Hyper = field(default_factory=lambda: Hyper(lr=0.125, batch=64))

    @classmethod
    def quick(cls, dtype: str = "float32") -> Settings:
        return cls(dtype=dtype, mlp_steps=40, cnn_steps=20, port_steps=20, mnist_samples=1000)

    def as_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "mlp_steps": self.mlp_steps, "cnn_steps": self.cnn_steps,
                "port_steps": self.port_steps, "mnist_samples": self.mnist_samples,
                "mlp_hyper": vars(self.mlp_hyper), "cnn_hyper": vars(self.cnn_hyper),
                "seed": SEED}


def available_backends() -> list[str]:
    """The frameworks installed here, in bnref's order (JAX's runs need Flax as well)."""
    return [b for b in BACKENDS if importlib.util.find_spec(FRAMEWORK_MODULES[b]) is not None]


def trainer(backend: str):
    if backend == "mxnet":
        from bnref.mxnet import _compat  # noqa: F401  (numpy.bool for MXNet 1.9.1)
    return importlib.import_module(f"bnref.demo.train_{backend}")


_LIVE = True  # False in worker processes, whose bars would overwrite each other's line


class _Bar:
    """One progress bar per run on stderr (when it is a terminal); from a worker process, one
    finished bar per run."""

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.label, self.total, self.enabled = label, total, enabled and sys.stderr.isatty()
        self.start = time.perf_counter()

    def __call__(self, step: int) -> None:
        last = step + 1 == self.total
        if not self.enabled or not (last or (_LIVE and step % 10 == 9)):
            return
        done = (step + 1) * 30 // self.total
        sys.stderr.write(f"{'' if _LIVE else chr(10)}\r{self.label:<24} "
                         f"[{'#' * done}{'.' * (30 - done)}] {step + 1}/{self.total}")
        if last:
            sys.stderr.write(f" {time.perf_counter() - self.start:.1f} s" + (
                "\n" if _LIVE else ""))
        sys.stderr.flush()


@dataclass
class Runs:
    settings: Settings
    results: dict[str, RunResult] = field(default_factory=dict)  # "backend/model/bn"
    port: dict[str, RunResult] = field(default_factory=dict)  # "naive", "converted"
    port_notes: list[str] = field(default_factory=list)
    port_momentum: dict[str, float] = field(default_factory=dict)
    port_start_running_var: list[list[float]] = field(default_factory=list)  # [bn][channel]
    seconds: float = 0.0


def jobs_for(settings: Settings, backends: list[str], data: dict[str, datasets.Dataset],
             models: tuple[str, ...] = ("mlp", "cnn")):
    for model, steps, hyper, name in (("mlp", settings.mlp_steps, settings.mlp_hyper, "mnist1d"),
                                      ("cnn", settings.cnn_steps, settings.cnn_hyper, "digits")):
        if model not in models:
            continue
        ds = data[name]
        batches = datasets.batch_order(len(ds.y_train), hyper.batch, steps, SEED + 1)
        weights = initial_weights(model, SEED)
        for backend in backends:
            for bn in ("none", "bnref", "builtin"):
                if backend == "numpy" and bn == "builtin":
                    continue  # numpy has no built-in batch norm
                yield Job(backend, model, bn, settings.dtype, weights, ds.x_train, ds.y_train,
                          ds.x_test, ds.y_test, batches, hyper)


# Rough seconds of each backend's runs at the default settings: the heaviest go first.
_COST = {"tf": 5, "jax": 4, "mxnet": 3, "torch": 2, "numpy": 1}
_ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1",
               "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false "
                            "intra_op_parallelism_threads=1"}


def run_all(settings: Settings, backends: list[str] | None = None,
            progress: bool = True, models: tuple[str, ...] = ("mlp", "cnn"),
            jobs: int | None = None) -> Runs:
    """Every run, then the port experiment (when torch and tf are both there).

    With ``jobs > 1`` (default: one per core, at most 2) each framework's runs go to one of
    ``jobs`` worker processes with one thread each, heaviest first; the data is made once, here.
    The results do not depend on ``jobs``: every run is one thread either way."""
    start = time.perf_counter()
    backends = available_backends() if backends is None else list(backends)
    data = {"mnist1d": datasets.mnist1d(settings.mnist_samples) if "mlp" in models else None,
            "digits": datasets.digits() if "cnn" in models else None}
    runs = Runs(settings)
    jobs = min(2, os.cpu_count() or 1) if jobs is None else jobs
    port = "torch" in backends and "tf" in backends and "mlp" in models
    if jobs <= 1:
        _one_thread()
        for backend in backends:
            runs.results.update(_backend_runs(settings, backend, data, models, progress))
        if port:
            _port(runs, data["mnist1d"], settings, progress)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker) as pool:
            futures = {b: pool.submit(_backend_runs, settings, b, data, models, progress)
                       for b in sorted(backends, key=lambda b: -_COST[b])}
            for backend in backends:
                runs.results.update(futures[backend].result())
            if port:
                runs.port_momentum, runs.port_notes, runs.port_start_running_var, runs.port = (
                    pool.submit(_port_runs, runs.results["torch/mlp/builtin"].final,
                                data["mnist1d"], settings, progress).result())
    runs.results = {job.key: runs.results[job.key]
                    for job in jobs_for(settings, backends, data, models)}  # a fixed order
    runs.seconds = time.perf_counter() - start
    return runs


def _worker() -> None:
    global _LIVE
    _LIVE = False
    _one_thread()


def _one_thread() -> None:
    """Every framework on one thread (set before any of them is imported in a worker)."""
    for key, value in _ONE_THREAD.items():
        os.environ.setdefault(key, value)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _backend_runs(settings: Settings, backend: str, data: dict[str, Any],
                  models: tuple[str, ...], progress: bool) -> dict[str, RunResult]:
    """One framework's runs, in order."""
    if backend == "torch" or "torch" in sys.modules:
        import torch

        torch.set_num_threads(1)
    results = {}
    for job in jobs_for(settings, [backend], data, models):
        job = replace(job, on_step=_Bar(job.key, job.steps, progress))
        results[job.key] = trainer(backend).train(job)
    return results


def _port(runs: Runs, ds: datasets.Dataset, settings: Settings, progress: bool) -> None:
    runs.port_momentum, runs.port_notes, runs.port_start_running_var, runs.port = _port_runs(
        runs.results["torch/mlp/builtin"].final, ds, settings, progress)


def _port_runs(trained: dict[str, np.ndarray], ds: datasets.Dataset, settings: Settings,
               progress: bool):
    """(e): the torch-trained MLP (built-in BN, state ``trained``) moved to Keras twice and
    trained on: once with torch's momentum number copied as it is (0.125, which Keras reads as
    the OLD value's weight), once through ``bnref.convert`` (which translates it to 0.875).
    Returns (momenta, convert's notes, the running variances it starts from, the runs)."""
    import torch

    from bnref.convert import convert

    hyper = settings.mlp_hyper
    weights = dict(trained)
    keras_momentum, notes, layers = None, [], 0
    while f"bn{layers}/gamma" in trained:
        i, layers = layers, layers + 1
        layer = torch.nn.BatchNorm1d(len(trained[f"bn{i}/gamma"]), eps=hyper.bn_eps,
                                     momentum=hyper.bn_new_weight).double()
        with torch.no_grad():
            for ours, theirs in (("gamma", "weight"), ("beta", "bias"),
                                 ("running_mean", "running_mean"),
                                 ("running_var", "running_var")):
                getattr(layer, theirs).copy_(torch.from_numpy(trained[f"bn{i}/{ours}"]))
        keras_layer, notes = convert(layer, "keras", ndim=2)
        keras_momentum = float(keras_layer.momentum)
        for ours, variable in (("gamma", keras_layer.gamma), ("beta", keras_layer.beta),
                               ("running_mean", keras_layer.moving_mean),
                               ("running_var", keras_layer.moving_variance)):
            weights[f"bn{i}/{ours}"] = np.asarray(variable.numpy(), np.float64)
    batches = datasets.batch_order(len(ds.y_train), hyper.batch, settings.port_steps, SEED + 2)
    momenta = {"naive": hyper.bn_new_weight, "converted": keras_momentum}
    start = [weights[f"bn{j}/running_var"].tolist() for j in range(layers)]
    results = {}
    for name, momentum in momenta.items():
        # Keras momentum m weights the old value: the new batch's weight is 1 - m.
        job = Job("tf", "mlp", "builtin", settings.dtype, weights, ds.x_train, ds.y_train,
                  ds.x_test, ds.y_test, batches, replace(hyper, bn_new_weight=1 - momentum),
                  record_every=1, eval_every=5)
        job = replace(job, on_step=_Bar(f"port: {name}", job.steps, progress))
        results[name] = trainer("tf").train(job)
    return momenta, list(notes), start, results


def relative_difference(a: list[float], b: list[float]) -> float:
    """Largest |a - b| / |b| over the steps."""
    a_, b_ = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a_ - b_) / np.abs(b_)))


def agreement(results: dict[str, RunResult]) -> dict[str, Any]:
    """The largest relative loss difference over the run, for every pair of frameworks (same
    model, same BN), and between bnref's layer and the built-in in each framework."""
    pairs: dict[str, float] = {}
    keys = sorted(results)
    for a, b in itertools.combinations(keys, 2):
        backend_a, model_a, bn_a = a.split("/")
        backend_b, model_b, bn_b = b.split("/")
        if model_a == model_b and bn_a == bn_b and backend_a != backend_b:
            pairs[f"{model_a}/{bn_a}: {backend_a}~{backend_b}"] = relative_difference(
                results[a].loss, results[b].loss)
    builtin = {}
    for key in keys:
        backend, model, bn = key.split("/")
        if bn == "bnref" and f"{backend}/{model}/builtin" in results:
            builtin[f"{model}: {backend}"] = relative_difference(
                results[key].loss, results[f"{backend}/{model}/builtin"].loss)
    return {"frameworks": pairs, "bnref_vs_builtin": builtin}


def _drift(records: list[list[list[float]]], start: list[list[float]]) -> list[float]:
    """Per record, the mean over BN layers and channels of |running_var - start| / start:
    how far the running variances have moved from the ported ones."""
    base = np.concatenate([np.asarray(layer, np.float64) for layer in start])
    return [float(np.mean(np.abs(np.concatenate([np.asarray(layer) for layer in record]) - base)
                          / base)) for record in records]


def metrics(runs: Runs) -> dict[str, Any]:
    """Everything measured, as plain JSON data."""
    return {"settings": runs.settings.as_dict(),
            "sgd": SGD_FORMS,
            # The main runs' running variances (every channel, every record) are only used by
            # the port plot, whose runs keep them: dropped here, they were most of the file.
            "runs": {key: {**result.as_dict(), "running_var": []}
                     for key, result in runs.results.items()},
            "agreement": agreement(runs.results),
            "port": {"momentum": runs.port_momentum, "notes": runs.port_notes,
                     "runs": {key: {**result.as_dict(), "running_var": [],
                                    "running_var_drift": _drift(result.running_var,
                                                                runs.port_start_running_var)}
                              for key, result in runs.port.items()}},
            "seconds": runs.seconds}
