"""The demo's models in MXNet Gluon: ``nn.Dense``, ``nn.Conv2D``, ``gluon.Trainer("sgd")``,
``SoftmaxCrossEntropyLoss``, hybridized.

MXNet's conventions, as the demo translates to them:

- BN ``momentum`` weights the OLD running value: ``momentum = 1 - bn_new_weight``, for the
  built-in ``nn.BatchNorm`` and for ``bnref.mxnet.BatchNorm`` (in its default mxnet convention).
- The built-in moves its running statistics during ``backward()`` (bnref's layer in the
  forward): they are read after the backward.
- ``Trainer.step(1)``: the loss is already the batch mean, and ``step(batch)`` would divide the
  gradient by the batch size again (``rescale_grad = 1 / batch``). SGD is written
  ``v = mu * v - lr * g; p = p + v``, with ``wd`` 0 by default.
- The SGD operators take ``lr`` and ``momentum``, and the built-in BatchNorm operator its
  ``momentum``, as float32 parameters, also for float64 weights (0.05 runs as 0.0500000007):
  a float64 run matches the other frameworks to rounding only when those numbers are
  float32-exact.
"""

from __future__ import annotations

import itertools
import time

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon, nd
from mxnet.gluon import nn

from bnref.demo.core import MODELS, Job, RunResult, from_out_in, to_out_in

__all__ = ["train"]


def _norm(job: Job, channels: int) -> gluon.HybridBlock:
    """BN with MXNet's momentum (the old value's weight) and the shared eps."""
    h = job.hyper
    if job.bn == "bnref":
        import bnref.mxnet as bm

        cls = bm.BatchNorm
    else:
        cls = nn.BatchNorm
    return cls(momentum=1 - h.bn_new_weight, epsilon=h.bn_eps, in_channels=channels)


class _Net(gluon.HybridBlock):
    """Hidden blocks (kernel layer, optional BN) then the output layer. The forward returns the
    logits and each block's pre-ReLU activation: a hybridized graph keeps no intermediate
    arrays a Python attribute could hold."""

    def __init__(self, job: Job) -> None:
        super().__init__()
        bn = job.bn != "none"
        self.conv = job.model == "cnn"
        with self.name_scope():
            self.layers = nn.HybridSequential()
            self.norms = nn.HybridSequential() if bn else None
            if not self.conv:
                widths = MODELS["mlp"]["widths"]
                for a, b in itertools.pairwise(widths[:-1]):
                    self.layers.add(nn.Dense(b, in_units=a))
                self.head = nn.Dense(widths[-1], in_units=widths[-2])
                normed = widths[1:-1]
            else:
                spec = MODELS["cnn"]
                for a, b in itertools.pairwise(spec["channels"]):
                    self.layers.add(nn.Conv2D(b, spec["kernel"], padding=1, in_channels=a))
                self.head = nn.Dense(spec["classes"], in_units=spec["channels"][-1])
                normed = spec["channels"][1:]
            if self.norms is not None:
                for channels in normed:
                    self.norms.add(_norm(job, channels))

    def hybrid_forward(self, F, x):
        pre_relu = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if self.norms is not None:
                x = self.norms[i](x)
            pre_relu.append(x)
            x = F.relu(x)
        if self.conv:
            x = F.mean(x, axis=(2, 3))
        return (self.head(x), *pre_relu)

    def kernels(self) -> list[gluon.Parameter]:
        return [layer.weight for layer in self.layers] + [self.head.weight]


def _parameters(net: _Net) -> dict[str, gluon.Parameter]:
    """Canonical name -> the parameter that holds it."""
    out: dict[str, gluon.Parameter] = {}
    prefix = "conv" if net.conv else "dense"
    for i, layer in enumerate(net.layers):
        out[f"{prefix}{i}/kernel"], out[f"{prefix}{i}/bias"] = layer.weight, layer.bias
        if net.norms is not None:
            norm = net.norms[i]
            out.update({f"bn{i}/gamma": norm.gamma, f"bn{i}/beta": norm.beta,
                        f"bn{i}/running_mean": norm.running_mean,
                        f"bn{i}/running_var": norm.running_var})
    head = len(net.layers)
    out[f"dense{head}/kernel"], out[f"dense{head}/bias"] = net.head.weight, net.head.bias
    return out


def build(job: Job) -> _Net:
    net = _Net(job)
    net.initialize(ctx=mx.cpu())
    net.cast(job.dtype)
    for name, param in _parameters(net).items():
        param.set_data(nd.array(to_out_in(name, job.weights[name]), dtype=job.dtype))
    if job.bn != "bnref":
        # bnref's layer runs in a Python custom operator, which MXNet 1.9.1 hands wrong
        # gradients in a hybridized graph with oneDNN pooling after it (measured here: the CNN's
        # loss 14x off; see bnref.mxnet.layer.hybridization_hazards): imperative instead.
        net.hybridize(static_alloc=True)
    return net


def state(net: _Net) -> dict[str, np.ndarray]:
    return {name: from_out_in(name, p.data().asnumpy().astype(np.float64))
            for name, p in _parameters(net).items()}


def train(job: Job) -> RunResult:
    start = time.perf_counter()
    dtype, h = job.dtype, job.hyper
    net = build(job)
    trainer = gluon.Trainer(net.collect_params(), "sgd",
                            {"learning_rate": h.lr, "momentum": h.momentum})
    # One update operator for every parameter, not one per 4 (MXNet's default aggregation)
    trainer.optimizer.aggregate_num = len(net.collect_params().keys())
    cross_entropy = gluon.loss.SoftmaxCrossEntropyLoss()
    cross_entropy.hybridize()
    # Every batch copied in once: a copy from numpy waits for MXNet's engine, an index does not.
    order = np.stack(job.batches)
    x_batches = nd.array(job.x_train[order], dtype=dtype)
    y_batches = nd.array(job.y_train[order], dtype=dtype)
    x_test = nd.array(job.x_test, dtype=dtype)
    result = RunResult()
    losses = []  # NDArrays, read once at the end: no wait for the engine at every step
    for step in range(job.steps):
        with autograd.record():  # training mode: batch statistics
            logits, *pre_relu = net(x_batches[step])
            loss = cross_entropy(logits, y_batches[step]).mean()
        loss.backward()
        losses.append(loss)
        if job.records_at(step):
            result.record(step, [a.asnumpy() for a in pre_relu],
                          [k.grad().asnumpy() for k in net.kernels()],
                          [n.running_var.data().asnumpy() for n in net.norms or ()])
        trainer.step(1)
        if job.evaluates_at(step):
            predicted = net(x_test)[0].argmax(axis=1).asnumpy()  # running statistics
            result.eval_steps.append(step)
            result.test_accuracy.append(float((predicted == job.y_test).mean()))
        job.tick(step)
    result.loss = [float(v) for v in nd.concat(*losses, dim=0).asnumpy()]
    result.final = state(net)
    result.seconds = time.perf_counter() - start
    return result
