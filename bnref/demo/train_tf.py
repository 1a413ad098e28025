"""The demo's models in TensorFlow: Keras 3 layers (channels-last), ``keras.optimizers.SGD``
and ``SparseCategoricalCrossentropy(from_logits=True)``, one ``tf.function`` train step per run.

Keras's conventions: kernels are (in, out) and (kh, kw, in, out), the canonical layouts; images
are NHWC; BN's ``momentum`` weights the OLD moving value (``new = m * old + (1 - m) *
batch``) and its moving variance is the biased batch variance (torch's is unbiased, so the
moving variance and inference differ from torch's, the training loss does not).
``SGD(lr, momentum=mu)`` is ``v = mu v - lr g; p += v``: torch's update for a constant lr, the
velocity scaled by -lr. Every layer, the loss and the optimizer get ``job.dtype``: Keras
otherwise computes in ``keras.config.floatx()`` (float32).
"""

from __future__ import annotations

import time
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from bnref.demo.core import MODELS, Job, RunResult, layer_names

__all__ = ["train"]

# canonical leaf -> Keras attribute (bnref's layer has the built-in's weights)
_KERAS = {"kernel": "kernel", "bias": "bias", "gamma": "gamma", "beta": "beta",
          "running_mean": "moving_mean", "running_var": "moving_variance"}


def _norm(job: Job) -> keras.layers.Layer:
    """BN with Keras's momentum (the OLD value's weight: 1 - the new batch's) and the shared
    eps."""
    h = job.hyper
    if job.bn == "bnref":
        from bnref.tf import BatchNorm as cls
    else:
        cls = keras.layers.BatchNormalization
    return cls(momentum=1 - h.bn_new_weight, epsilon=h.bn_eps, dtype=job.dtype)


class _Net(keras.Model):
    """Hidden blocks (kernel layer, optional BN, ReLU) then the output layer; returns the
    logits and each block's pre-ReLU activation."""

    def __init__(self, job: Job) -> None:
        super().__init__(dtype=job.dtype, name="net")
        self.conv = job.model == "cnn"
        if self.conv:
            spec = MODELS["cnn"]
            widths, classes = spec["channels"][1:], spec["classes"]
            # padding="same" for a 3x3 stride-1 kernel is torch's zero padding 1 on each side
            self.blocks = [keras.layers.Conv2D(w, 3, padding="same", dtype=job.dtype)
                           for w in widths]
        else:
            widths, classes = MODELS["mlp"]["widths"][1:-1], MODELS["mlp"]["widths"][-1]
            self.blocks = [keras.layers.Dense(w, dtype=job.dtype) for w in widths]
        self.norms = [_norm(job) for _ in widths] if job.bn != "none" else []
        self.head = keras.layers.Dense(classes, dtype=job.dtype)

    def call(self, x: tf.Tensor, training: bool = False) -> tuple[tf.Tensor, list[tf.Tensor]]:
        pre_relu = []
        for i, layer in enumerate(self.blocks):
            x = layer(x)
            if self.norms:
                x = self.norms[i](x, training=training)
            pre_relu.append(x)
            x = tf.nn.relu(x)
        if self.conv:
            x = tf.reduce_mean(x, axis=(1, 2))
        return self.head(x), pre_relu

    def variables_by_name(self) -> dict[str, keras.Variable]:
        """Canonical name -> the Keras variable that holds it."""
        prefix = "conv" if self.conv else "dense"
        layers = {f"{prefix}{i}": layer for i, layer in enumerate(self.blocks)}
        layers.update({f"bn{i}": norm for i, norm in enumerate(self.norms)})
        layers[f"dense{len(self.blocks)}"] = self.head
        out = {}
        for name in layer_names("cnn" if self.conv else "mlp", bool(self.norms)):
            layer, leaf = name.split("/")
            out[name] = getattr(layers[layer], _KERAS[leaf])
        return out


def _sgd(job: Job) -> keras.optimizers.SGD:
    """Keras's SGD with the run's lr and momentum held in ``job.dtype``. Keras rounds both
    through float32 otherwise, which float64 runs notice (the momentum alone moved the loss
    2e-8 relative from torch's within 40 steps): the learning rate lives in a variable of
    ``floatx()``, and ``update_step`` reads the momentum as ``ops.cast(0.9, float64)``, which
    is ``tf.cast`` of a Python float: float32's 0.8999999761581421. A numpy float64 scalar is
    still a ``float`` (SGD's check) and casts exactly."""
    floatx = keras.config.floatx()
    keras.config.set_floatx(job.dtype)
    try:
        return keras.optimizers.SGD(learning_rate=job.hyper.lr,
                                    momentum=np.float64(job.hyper.momentum))
    finally:
        keras.config.set_floatx(floatx)


def _channels_last(x: np.ndarray, dtype: str) -> tf.Tensor:
    return tf.constant(x.transpose(0, 2, 3, 1) if x.ndim == 4 else x, dtype)


def train(job: Job) -> RunResult:
    start = time.perf_counter()
    net = _Net(job)
    x_train, x_test = _channels_last(job.x_train, job.dtype), _channels_last(job.x_test, job.dtype)
    y_train = tf.constant(job.y_train)
    net(x_train[:1])  # builds the layers (inference: the moving statistics stay)
    for name, variable in net.variables_by_name().items():
        variable.assign(job.weights[name].astype(job.dtype))
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=job.dtype)
    optimizer = _sgd(job)
    kernels = [layer.kernel for layer in [*net.blocks, net.head]]
    others = [v for v in net.trainable_variables if all(v is not k for k in kernels)]
    optimizer.build(kernels + others)

    @tf.function
    def train_step(rows: tf.Tensor) -> tuple[Any, ...]:
        """Forward, gradients, BN's and the optimizer's updates; the pre-ReLU activations,
        kernel gradients and moving variances come out every step, read only when recorded."""
        with tf.GradientTape() as tape:
            logits, pre_relu = net(tf.gather(x_train, rows), training=True)
            loss = loss_fn(tf.gather(y_train, rows), logits)
        kernel_grads, other_grads = tape.gradient(loss, (kernels, others))
        running_var = [tf.identity(norm.moving_variance) for norm in net.norms]
        optimizer.apply_gradients(zip(kernel_grads + other_grads, kernels + others,
                                      strict=True))
        return loss, pre_relu, kernel_grads, running_var

    @tf.function
    def predict() -> tf.Tensor:
        logits, _ = net(x_test, training=False)
        return tf.argmax(logits, axis=1)

    result = RunResult()
    for step, rows in enumerate(job.batches):
        loss, pre_relu, kernel_grads, running_var = train_step(tf.constant(rows))
        result.loss.append(float(loss))
        if job.records_at(step):
            # NHWC -> channels on axis 1 (a no-op for the MLP's (N, C))
            result.record(step, [np.moveaxis(a.numpy(), -1, 1) for a in pre_relu],
                          [g.numpy() for g in kernel_grads], [v.numpy() for v in running_var])
        if job.evaluates_at(step):
            predicted = predict().numpy()
            result.eval_steps.append(step)
            result.test_accuracy.append(float((predicted == job.y_test).mean()))
        job.tick(step)
    result.final = {name: np.asarray(v.numpy(), np.float64)
                    for name, v in net.variables_by_name().items()}
    result.seconds = time.perf_counter() - start
    return result
