"""The demo's models in JAX: ``flax.linen`` layers (channels-last), ``optax.sgd`` and optax's
softmax cross-entropy, one jitted train step per run.

Flax's conventions: kernels are (in, out) and (kh, kw, in, out), the canonical layouts; images
are NHWC; BN's ``momentum`` weights the OLD running value (``new = m * old + (1 - m) *
batch``) and its running variance is the biased batch variance (torch's is unbiased, so the
running variance and inference differ from torch's, the training loss does not). BN lives in
two collections: ``params`` ``{scale, bias}`` and ``batch_stats`` ``{mean, var}``.
``optax.sgd(lr, momentum=mu)`` is torch's form (``v = mu v + g; p -= lr v``).
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bnref.demo.core import MODELS, Hyper, Job, RunResult, layer_names

__all__ = ["train"]

# JAX computes in float32 unless x64 is on: float64 jobs must really run in float64 (float32
# jobs stay float32, their arrays are created float32 explicitly).
jax.config.update("jax_enable_x64", True)

# Compiling dominates these short runs. XLA's CPU code for a convolution's kernel gradient is
# loops that LLVM optimizes for seconds at the default level (the CNN's step: ~8 s of CPU to
# compile, 3 ms a step); level 1 compiles it in ~2.5 s for 5 ms a step, level 0 in ~1 s but
# for 25 ms a step. The level moves only the last bits (float64: ~1e-15 between levels).
_JIT = {"compiler_options": {"xla_backend_optimization_level": 1}}

# canonical leaf -> (Flax collection, Flax leaf)
_FLAX = {"kernel": ("params", "kernel"), "bias": ("params", "bias"),
         "gamma": ("params", "scale"), "beta": ("params", "bias"),
         "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def _norm(bn: str, hyper: Hyper, dtype: Any, name: str) -> nn.Module:
    """BN with Flax's momentum (the OLD value's weight: 1 - the new batch's) and the shared
    eps."""
    kwargs = {"momentum": 1 - hyper.bn_new_weight, "epsilon": hyper.bn_eps, "dtype": dtype,
              "param_dtype": dtype, "name": name}
    if bn == "bnref":
        from bnref.jax.flax import BatchNorm

        return BatchNorm(**kwargs)
    # Flax's default variance is E[x²] - E[x]² (use_fast_variance=True); the two-pass
    # E[(x - E[x])²] is what torch, Keras and bnref compute.
    return nn.BatchNorm(use_fast_variance=False, **kwargs)


class _Net(nn.Module):
    """Hidden blocks (kernel layer, optional BN, ReLU) then the output layer; returns the
    logits and each block's pre-ReLU activation."""

    model: str
    bn: str
    hyper: Hyper
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, list[jax.Array]]:
        layer = {"dtype": self.dtype, "param_dtype": self.dtype}
        if self.model == "mlp":
            widths, classes = MODELS["mlp"]["widths"][1:-1], MODELS["mlp"]["widths"][-1]
        else:
            spec = MODELS["cnn"]
            widths, classes = spec["channels"][1:], spec["classes"]
        pre_relu = []
        for i, width in enumerate(widths):
            if self.model == "mlp":
                x = nn.Dense(width, name=f"dense{i}", **layer)(x)
            else:  # zero padding 1 on each side, as torch's Conv2d(padding=1)
                x = nn.Conv(width, (3, 3), padding=((1, 1), (1, 1)), name=f"conv{i}", **layer)(x)
            if self.bn != "none":
                x = _norm(self.bn, self.hyper, self.dtype, f"bn{i}")(
                    x, use_running_average=not train)
            pre_relu.append(x)
            x = nn.relu(x)
        if self.model == "cnn":
            x = x.mean(axis=(1, 2))
        return nn.Dense(classes, name=f"dense{len(widths)}", **layer)(x), pre_relu


def _variables(job: Job, dtype: Any) -> dict[str, dict[str, dict[str, jax.Array]]]:
    """The canonical weights as Flax's ``{"params": ..., "batch_stats": ...}``."""
    out: dict[str, dict[str, dict[str, jax.Array]]] = {"params": {}, "batch_stats": {}}
    for name in layer_names(job.model, job.bn != "none"):
        layer, leaf = name.split("/")
        collection, flax_leaf = _FLAX[leaf]
        out[collection].setdefault(layer, {})[flax_leaf] = jnp.asarray(job.weights[name], dtype)
    return out


def _canonical(params: Any, stats: Any, job: Job) -> dict[str, np.ndarray]:
    variables = {"params": params, "batch_stats": stats}
    out = {}
    for name in layer_names(job.model, job.bn != "none"):
        layer, leaf = name.split("/")
        collection, flax_leaf = _FLAX[leaf]
        out[name] = np.asarray(variables[collection][layer][flax_leaf], np.float64)
    return out


def train(job: Job) -> RunResult:
    start = time.perf_counter()
    dtype = jnp.dtype(job.dtype)
    net = _Net(job.model, job.bn, job.hyper, dtype)
    optimizer = optax.sgd(job.hyper.lr, momentum=job.hyper.momentum)
    variables = _variables(job, dtype)
    params, stats = variables["params"], variables["batch_stats"]
    opt_state = optimizer.init(params)
    kernel_layers = [name.split("/")[0] for name in layer_names(job.model, False)
                     if name.endswith("/kernel")]
    norms = [f"bn{i}" for i in range(len(kernel_layers) - 1)] if job.bn != "none" else []

    def to_nhwc(x: np.ndarray) -> jax.Array:
        return jnp.asarray(x.transpose(0, 2, 3, 1) if x.ndim == 4 else x, dtype)

    x_train, x_test = to_nhwc(job.x_train), to_nhwc(job.x_test)
    y_train = jnp.asarray(job.y_train)

    def loss_fn(params: Any, stats: Any, x: jax.Array, y: jax.Array) -> tuple[jax.Array, Any]:
        (logits, pre_relu), updated = net.apply({"params": params, "batch_stats": stats}, x,
                                                train=True, mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, (pre_relu, updated.get("batch_stats", {}))

    # The data go in as arguments, not closed over as constants of the program.
    @partial(jax.jit, **_JIT)
    def train_step(params: Any, stats: Any, opt_state: Any, x_train: jax.Array,
                   y_train: jax.Array, rows: jax.Array) -> tuple[Any, ...]:
        """Forward, gradients, the optimizer's and BN's updates; the pre-ReLU activations
        and kernel gradients come out every step (cheap here), read only when recorded."""
        (loss, (pre_relu, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, stats, x_train[rows], y_train[rows])
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        kernel_grads = [grads[layer]["kernel"] for layer in kernel_layers]
        return params, stats, opt_state, loss, pre_relu, kernel_grads

    @partial(jax.jit, **_JIT)
    def predict(params: Any, stats: Any, x: jax.Array) -> jax.Array:
        logits, _ = net.apply({"params": params, "batch_stats": stats}, x, train=False)
        return logits.argmax(axis=1)

    result = RunResult()
    for step, rows in enumerate(job.batches):
        params, stats, opt_state, loss, pre_relu, kernel_grads = train_step(
            params, stats, opt_state, x_train, y_train, rows)
        result.loss.append(float(loss))
        if job.records_at(step):
            # NHWC -> channels on axis 1 (a no-op for the MLP's (N, C))
            result.record(step, [np.moveaxis(np.asarray(a), -1, 1) for a in pre_relu],
                          [np.asarray(g) for g in kernel_grads],
                          [np.asarray(stats[norm]["var"]) for norm in norms])
        if job.evaluates_at(step):
            predicted = np.asarray(predict(params, stats, x_test))
            result.eval_steps.append(step)
            result.test_accuracy.append(float((predicted == job.y_test).mean()))
        job.tick(step)
    result.final = _canonical(params, stats, job)
    result.seconds = time.perf_counter() - start
    return result
