"""The demo's models in numpy: dense and 3x3 convolution layers, ReLU and softmax
cross-entropy written out with their backward passes, and ``bnref.numpy.BatchNorm`` trained
through its ``backward``. SGD with momentum in PyTorch's form (``v = mu v + g; p -= lr v``).
There is no numpy built-in, so ``bn="builtin"`` is not offered."""

from __future__ import annotations

import time

import numpy as np

from bnref.demo.core import MODELS, Job, RunResult
from bnref.numpy import BatchNorm

__all__ = ["train"]


class Dense:
    def __init__(self, kernel: np.ndarray, bias: np.ndarray) -> None:
        self.kernel, self.bias = kernel, bias

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.x = x
        return x @ self.kernel + self.bias

    def backward(self, dy: np.ndarray) -> np.ndarray:
        self.kernel_grad, self.bias_grad = self.x.T @ dy, dy.sum(axis=0)
        return dy @ self.kernel.T


class Conv3x3:
    """Stride 1, zero padding 1, (N, C, H, W) in and out, as an im2col matrix product."""

    def __init__(self, kernel: np.ndarray, bias: np.ndarray) -> None:
        self.kernel, self.bias = kernel, bias  # (3, 3, in, out)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        n, c, h, w = x.shape
        padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
        # (N, H, W, kh, kw, C): each output position's 3x3 window, in the kernel's order
        windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))
        self.cols = windows.transpose(0, 2, 3, 4, 5, 1).reshape(n * h * w, 9 * c)
        self.shape = x.shape
        out = self.cols @ self.kernel.reshape(9 * c, -1) + self.bias
        return out.reshape(n, h, w, -1).transpose(0, 3, 1, 2)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        n, c, h, w = self.shape
        flat = dy.transpose(0, 2, 3, 1).reshape(n * h * w, -1)
        self.kernel_grad = (self.cols.T @ flat).reshape(self.kernel.shape)
        self.bias_grad = flat.sum(axis=0)
        dcols = (flat @ self.kernel.reshape(9 * c, -1).T).reshape(n, h, w, 3, 3, c)
        dpadded = np.zeros((n, c, h + 2, w + 2), dy.dtype)
        for i in range(3):
            for j in range(3):
                dpadded[:, :, i:i + h, j:j + w] += dcols[:, :, :, i, j, :].transpose(0, 3, 1, 2)
        return dpadded[:, :, 1:-1, 1:-1]


def _cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean softmax cross-entropy and its gradient with respect to the logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n = len(labels)
    loss = -log_probs[np.arange(n), labels].mean()
    grad = np.exp(log_probs)
    grad[np.arange(n), labels] -= 1
    return float(loss), grad / n


class Net:
    def __init__(self, job: Job) -> None:
        dtype = np.dtype(job.dtype)
        w = {name: value.astype(dtype) for name, value in job.weights.items()}
        self.conv = job.model == "cnn"
        blocks = len(MODELS["mlp"]["widths"]) - 2 if not self.conv else 2
        kind, prefix = (Conv3x3, "conv") if self.conv else (Dense, "dense")
        self.layers = [kind(w[f"{prefix}{i}/kernel"], w[f"{prefix}{i}/bias"])
                       for i in range(blocks)]
        self.norms = None
        if job.bn == "bnref":
            self.norms = []
            for i in range(blocks):
                norm = BatchNorm(len(w[f"bn{i}/gamma"]), momentum=job.hyper.bn_new_weight,
                                 eps=job.hyper.bn_eps, dtype=dtype)
                norm.weight, norm.bias = w[f"bn{i}/gamma"], w[f"bn{i}/beta"]
                norm.running_mean = w[f"bn{i}/running_mean"]
                norm.running_var = w[f"bn{i}/running_var"]
                self.norms.append(norm)
        elif job.bn != "none":
            raise ValueError(f"numpy has no built-in batch norm, got bn={job.bn!r}")
        self.head = Dense(w[f"dense{blocks}/kernel"], w[f"dense{blocks}/bias"])

    def __call__(self, x: np.ndarray, training: bool) -> np.ndarray:
        self.pre_relu, self.masks = [], []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if self.norms is not None:
                x = self.norms[i](x, training=training)
            self.pre_relu.append(x)
            self.masks.append(x > 0)
            x = x * self.masks[-1]
        if self.conv:
            self.pooled_shape = x.shape
            x = x.mean(axis=(2, 3))
        return self.head(x)

    def backward(self, dlogits: np.ndarray) -> None:
        d = self.head.backward(dlogits)
        if self.conv:
            h, w = self.pooled_shape[2:]
            d = np.broadcast_to(d[:, :, None, None] / (h * w), self.pooled_shape)
        for i in reversed(range(len(self.layers))):
            d = d * self.masks[i]
            if self.norms is not None:
                d = self.norms[i].backward(d)
            d = self.layers[i].backward(d)

    def parameters(self) -> list[tuple[object, str]]:
        """(owner, attribute) of every trained array; the gradient is ``attribute + '_grad'``
        (a BatchNorm's ``weight``/``bias`` has ``weight_grad``/``bias_grad``)."""
        out = []
        for i, layer in enumerate(self.layers):
            out += [(layer, "kernel"), (layer, "bias")]
            if self.norms is not None:
                out += [(self.norms[i], "weight"), (self.norms[i], "bias")]
        return [*out, (self.head, "kernel"), (self.head, "bias")]

    def state(self) -> dict[str, np.ndarray]:
        prefix = "conv" if self.conv else "dense"
        out = {}
        for i, layer in enumerate(self.layers):
            out[f"{prefix}{i}/kernel"], out[f"{prefix}{i}/bias"] = layer.kernel, layer.bias
            if self.norms is not None:
                norm = self.norms[i]
                out.update({f"bn{i}/gamma": norm.weight, f"bn{i}/beta": norm.bias,
                            f"bn{i}/running_mean": norm.running_mean,
                            f"bn{i}/running_var": norm.running_var})
        out[f"dense{len(self.layers)}/kernel"] = self.head.kernel
        out[f"dense{len(self.layers)}/bias"] = self.head.bias
        return {name: np.asarray(value, np.float64) for name, value in out.items()}


def train(job: Job) -> RunResult:
    start = time.perf_counter()
    dtype = np.dtype(job.dtype)
    net = Net(job)
    lr, mu = job.hyper.lr, job.hyper.momentum
    velocity = {id(owner) * 2 + (name == "bias"): None for owner, name in net.parameters()}
    x_train, x_test = job.x_train.astype(dtype), job.x_test.astype(dtype)
    result = RunResult()
    for step, rows in enumerate(job.batches):
        logits = net(x_train[rows], training=True)
        loss, dlogits = _cross_entropy(logits, job.y_train[rows])
        net.backward(dlogits.astype(dtype))
        result.loss.append(loss)
        if job.records_at(step):
            result.record(step, net.pre_relu,
                          [layer.kernel_grad for layer in [*net.layers, net.head]],
                          [norm.running_var for norm in net.norms or ()])
        for owner, name in net.parameters():
            grad = getattr(owner, f"{name}_grad")
            key = id(owner) * 2 + (name == "bias")
            velocity[key] = grad if velocity[key] is None else mu * velocity[key] + grad
            setattr(owner, name, (getattr(owner, name) - lr * velocity[key]).astype(dtype))
        if job.evaluates_at(step):
            predicted = net(x_test, training=False).argmax(axis=1)
            result.eval_steps.append(step)
            result.test_accuracy.append(float((predicted == job.y_test).mean()))
        job.tick(step)
    result.final = net.state()
    result.seconds = time.perf_counter() - start
    return result
