"""What every framework's trainer gets (:class:`Job`) and gives back (:class:`RunResult`).

The two models, written once here as data and built by each trainer from its framework's own
layers:

- ``mlp`` (MNIST-1D): ``Dense(40 -> 100)``, then ``Dense(100 -> 100)`` five times, each
  followed by ``[BN] -> ReLU``, then ``Dense(100 -> 10)``: six hidden blocks, deep enough that
  BN visibly helps in 300 steps (with four blocks of 64 it did not).
- ``cnn`` (8x8 digits): ``Conv3x3(1 -> 8, pad 1) -> [BN] -> ReLU -> Conv3x3(8 -> 16, pad 1) ->
  [BN] -> ReLU -> mean over H, W -> Dense(16 -> 10)``.

``[BN]`` is absent (``bn="none"``), bnref's layer (``"bnref"``) or the framework's built-in
(``"builtin"``), always with the same running-average weight for the new batch statistic
(:attr:`Hyper.bn_new_weight`, written in each framework's own momentum convention) and the same
eps. Weights are canonical numpy arrays (float64), drawn once (:func:`initial_weights`):

- ``dense{i}/kernel`` (in, out), ``dense{i}/bias`` (out,)
- ``conv{i}/kernel`` (kh, kw, in, out), ``conv{i}/bias`` (out,)
- ``bn{i}/gamma``, ``bn{i}/beta``, ``bn{i}/running_mean``, ``bn{i}/running_var`` (C,)

Each trainer converts them to its layout (torch's Linear is (out, in), its Conv2d
(out, in, kh, kw)).

The loss is the mean softmax cross-entropy over the batch; the optimizer each framework's own SGD
with momentum (:data:`SGD_FORMS` says how each writes it).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["MODELS", "SGD_FORMS", "Hyper", "Job", "RunResult", "from_out_in", "initial_weights",
           "layer_names", "to_out_in"]

MODELS = {
    "mlp": {"data": "mnist1d", "widths": (40, 100, 100, 100, 100, 100, 100, 10)},
    "cnn": {"data": "digits", "channels": (1, 8, 16), "classes": 10, "kernel": 3},
}

# How each framework writes SGD with momentum mu and learning rate lr, for a gradient g. With a
# constant lr they are the same update (v_keras = -lr * v_torch); they part ways when lr
# changes during training (torch's velocity carries no lr, Keras's and MXNet's carry the old one).
SGD_FORMS = {
    "numpy": "v = mu * v + g;  p = p - lr * v   (PyTorch's form, written out)",
    "torch": "torch.optim.SGD(lr, momentum=mu):  v = mu * v + g;  p = p - lr * v",
    "jax": "optax.sgd(lr, momentum=mu):  v = mu * v + g;  p = p - lr * v",
    "tf": "keras.optimizers.SGD(lr, momentum=mu):  v = mu * v - lr * g;  p = p + v",
    "mxnet": "gluon.Trainer('sgd', learning_rate=lr, momentum=mu):  v = mu * v - lr * g;  "
             "p = p + v  (trainer.step(1): the loss is already a mean)",
}


@dataclass(frozen=True)
class Hyper:
    """Training hyperparameters, framework-neutral.

    Every value is exact in float32 (a sum of a few powers of two): MXNet's SGD and BatchNorm
    operators take ``lr`` and ``momentum`` as float32 even for float64 weights, and 0.05 or
    0.9 rounded to float32 would set MXNet's float64 runs 1e-8 apart from the others'."""

    lr: float = 0.0625
    momentum: float = 0.875  # SGD momentum
    bn_new_weight: float = 0.125  # weight of the batch statistic in the running average
    bn_eps: float = 1e-5
    batch: int = 100


@dataclass(frozen=True)
class Job:
    """One training run: a framework, a model, where BN comes from, and everything it sees."""

    backend: str  # numpy, torch, jax, tf, mxnet
    model: str  # mlp, cnn
    bn: str  # none, bnref, builtin
    dtype: str  # float32, float64
    weights: dict[str, np.ndarray]  # canonical, float64 (see the module docstring)
    x_train: np.ndarray  # float64; (N, 40) or (N, 1, 8, 8)
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    batches: list[np.ndarray]  # row indices of x_train, one array per step
    hyper: Hyper
    record_every: int = 5  # activation statistics and gradient norms every this many steps
    eval_every: int = 25  # test accuracy every this many steps (and after the last)
    on_step: Any = None  # called with the 0-based step after each step (a progress bar)

    def tick(self, step: int) -> None:
        if self.on_step is not None:
            self.on_step(step)

    @property
    def steps(self) -> int:
        return len(self.batches)

    @property
    def key(self) -> str:
        return f"{self.backend}/{self.model}/{self.bn}"

    def records_at(self, step: int) -> bool:
        return step % self.record_every == 0

    def evaluates_at(self, step: int) -> bool:
        """After the update of ``step`` (0-based): every ``eval_every`` steps and at the end."""
        return (step + 1) % self.eval_every == 0 or step + 1 == self.steps


@dataclass
class RunResult:
    """What a trainer measured. Steps are 0-based; a step's loss is its batch's, before that
    step's update. Activation statistics are of each hidden block's input to its ReLU (after
    BN when there is one), on the training batch in the step's own forward pass: ``mean`` over
    every value, ``var`` the per-feature (per-channel) variance over the batch (and positions),
    averaged over features. Gradient norms are the 2-norm of each dense/conv kernel's
    gradient, in layer order."""

    loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    record_steps: list[int] = field(default_factory=list)
    activation_mean: list[list[float]] = field(default_factory=list)  # [record][block]
    activation_var: list[list[float]] = field(default_factory=list)
    grad_norm: list[list[float]] = field(default_factory=list)  # [record][kernel]
    running_var: list[list[list[float]]] = field(default_factory=list)  # [record][bn][channel]
    final: dict[str, np.ndarray] = field(default_factory=dict)  # canonical names, float64
    seconds: float = 0.0

    def record(self, step: int, pre_relu: list[Any], kernel_grads: list[Any],
               running_var: list[Any] = ()) -> None:
        """Add one record from the step's pre-ReLU activations (channels on axis 1: move them
        there from a channels-last layout), kernel gradients and, with BN, each BN layer's
        running variance after the step's update, as numpy arrays. Called once the step's
        gradients exist, before the optimizer's update."""
        self.record_steps.append(step)
        means, variances = [], []
        for act in pre_relu:
            act = np.asarray(act, np.float64)
            per_feature = act.reshape(act.shape[0], act.shape[1], -1)
            means.append(float(act.mean()))
            variances.append(float(per_feature.transpose(1, 0, 2).reshape(
                act.shape[1], -1).var(axis=1).mean()))
        self.activation_mean.append(means)
        self.activation_var.append(variances)
        self.grad_norm.append([float(np.linalg.norm(np.asarray(g, np.float64)))
                               for g in kernel_grads])
        self.running_var.append([np.asarray(v, np.float64).tolist() for v in running_var])

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("final")
        return out


def to_out_in(name: str, value: np.ndarray) -> np.ndarray:
    """A canonical array in PyTorch's and Gluon's layout: dense kernels (out, in), convolution
    kernels (out, in, kh, kw); everything else as it is."""
    if name.endswith("/kernel"):
        return value.T if value.ndim == 2 else value.transpose(3, 2, 0, 1)
    return value


def from_out_in(name: str, value: np.ndarray) -> np.ndarray:
    """The inverse of :func:`to_out_in`."""
    if name.endswith("/kernel"):
        return value.T if value.ndim == 2 else value.transpose(2, 3, 1, 0)
    return value


def layer_names(model: str, bn: bool) -> list[str]:
    """Canonical parameter names of ``model`` (with or without BN), in layer order."""
    if model == "mlp":
        hidden = len(MODELS["mlp"]["widths"]) - 2
        names = []
        for i in range(hidden):
            names += [f"dense{i}/kernel", f"dense{i}/bias"]
            if bn:
                names += [f"bn{i}/gamma", f"bn{i}/beta", f"bn{i}/running_mean",
                          f"bn{i}/running_var"]
        return [*names, f"dense{hidden}/kernel", f"dense{hidden}/bias"]
    names = []
    for i in range(2):
        names += [f"conv{i}/kernel", f"conv{i}/bias"]
        if bn:
            names += [f"bn{i}/gamma", f"bn{i}/beta", f"bn{i}/running_mean", f"bn{i}/running_var"]
    return [*names, "dense2/kernel", "dense2/bias"]


def initial_weights(model: str, seed: int = 0) -> dict[str, np.ndarray]:
    """He-uniform kernels (bound sqrt(6 / fan_in)), zero biases, BN at gamma 1, beta 0,
    running mean 0 and variance 1: drawn once by numpy, for every framework."""
    rng = np.random.default_rng(seed)
    weights: dict[str, np.ndarray] = {}

    def kernel(name: str, shape: tuple[int, ...], fan_in: int) -> None:
        bound = np.sqrt(6.0 / fan_in)
        weights[f"{name}/kernel"] = rng.uniform(-bound, bound, shape)
        weights[f"{name}/bias"] = np.zeros(shape[-1])

    def norm(name: str, channels: int) -> None:
        weights.update({f"{name}/gamma": np.ones(channels), f"{name}/beta": np.zeros(channels),
                        f"{name}/running_mean": np.zeros(channels),
                        f"{name}/running_var": np.ones(channels)})

    if model == "mlp":
        widths = MODELS["mlp"]["widths"]
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
            kernel(f"dense{i}", (fan_in, fan_out), fan_in)
            if i < len(widths) - 2:
                norm(f"bn{i}", fan_out)
        return weights
    spec = MODELS["cnn"]
    k = spec["kernel"]
    for i, (cin, cout) in enumerate(itertools.pairwise(spec["channels"])):
        kernel(f"conv{i}", (k, k, cin, cout), cin * k * k)
        norm(f"bn{i}", cout)
    kernel("dense2", (spec["channels"][-1], spec["classes"]), spec["channels"][-1])
    return weights
