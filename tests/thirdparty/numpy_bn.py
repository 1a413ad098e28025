"""Batch norm in plain numpy, following PyTorch's convention.

new running stat = (1 - momentum) * old + momentum * batch, with the *unbiased* batch variance
for the running variance; defaults momentum=0.1, eps=1e-5, channels on axis 1.
"""

import numpy as np

FRAMEWORK = "numpy"
CONVENTION = "torch"
BUGS = (
    "momentum-other-term",
    "running-var-bias",
    "eps-default",
    "eps-outside-sqrt",
    "one-pass-variance",
    "channel-axis",
    "eval-moves-stats",
    "eval-uses-batch-stats",
)


def _check_bug(bug):
    if bug is not None and bug not in BUGS:
        raise ValueError(f"unknown bug {bug!r}; expected None or one of {BUGS}")


def make(bug=None):
    """Return a batch_norm function, correct when ``bug`` is None, else with ``bug`` planted."""
    _check_bug(bug)
    default_eps = 1e-3 if bug == "eps-default" else 1e-5
    default_axis = -1 if bug == "channel-axis" else 1

    def batch_norm(x, gamma, beta, running_mean, running_var, *, training, momentum=0.1,
                   eps=default_eps, axis=default_axis):
        x = np.asarray(x)
        if not -x.ndim <= axis < x.ndim:
            raise ValueError(f"axis {axis} is out of range for a {x.ndim}-d input")
        axis = axis % x.ndim
        channels = x.shape[axis]
        for name, v in [("gamma", gamma), ("beta", beta), ("running_mean", running_mean),
                        ("running_var", running_var)]:
            if np.shape(v) != (channels,):
                raise ValueError(f"{name} has shape {np.shape(v)}, expected ({channels},)")

        # Statistics of half-precision data are taken in float32 (float16 sums overflow and
        # lose digits); float64 stays float64.
        dtype = np.float64 if x.dtype == np.float64 else np.float32
        xc = x.astype(dtype)  # a copy: the caller's x is never modified
        reduce_axes = tuple(i for i in range(x.ndim) if i != axis)
        shape = [1] * x.ndim  # per-channel vectors are reshaped to this to broadcast
        shape[axis] = channels
        n = x.size // channels  # values per channel

        def batch_stats():
            mean = xc.mean(axis=reduce_axes)
            if bug == "one-pass-variance":
                var = (xc * xc).mean(axis=reduce_axes) - mean * mean
            else:
                # Two passes: the deviations from the mean are small, so squaring them does
                # not cancel the way E[x^2] - E[x]^2 does for data far from zero.
                var = ((xc - mean.reshape(shape)) ** 2).mean(axis=reduce_axes)
            return mean, var

        def moved(mean, var):
            if n == 1:  # like torch: one value has no unbiased variance
                raise ValueError("expected more than 1 value per channel when training")
            # torch keeps an unbiased estimate of the population variance.
            var_estimate = var if bug == "running-var-bias" else var * n / (n - 1)
            if bug == "momentum-other-term":
                new_mean = momentum * running_mean + (1 - momentum) * mean
                new_var = momentum * running_var + (1 - momentum) * var_estimate
            else:
                new_mean = (1 - momentum) * running_mean + momentum * mean
                new_var = (1 - momentum) * running_var + momentum * var_estimate
            return new_mean.astype(running_mean.dtype), new_var.astype(running_var.dtype)

        if training or bug == "eval-uses-batch-stats":
            mean, var = batch_stats()
        else:
            mean, var = running_mean.astype(dtype), running_var.astype(dtype)

        if bug == "eps-outside-sqrt":
            inv_std = 1 / (np.sqrt(var) + eps)
        else:
            inv_std = 1 / np.sqrt(var + eps)
        scale = (gamma.astype(dtype) * inv_std).reshape(shape)
        y = (xc - mean.reshape(shape)) * scale + beta.astype(dtype).reshape(shape)
        y = y.astype(x.dtype)

        if training:
            return (y, *moved(mean, var))
        if bug == "eval-moves-stats":
            return (y, *moved(*batch_stats()))
        return y, running_mean.copy(), running_var.copy()

    batch_norm.__name__ = "batch_norm" if bug is None else "batch_norm_" + bug.replace("-", "_")
    batch_norm.__qualname__ = batch_norm.__name__
    return batch_norm


def make_layer(bug=None):
    """Return a BatchNorm layer class, correct when ``bug`` is None, else with ``bug`` planted."""
    _check_bug(bug)
    batch_norm = make(bug)
    default_eps = 1e-3 if bug == "eps-default" else 1e-5
    axis = -1 if bug == "channel-axis" else 1

    class BatchNorm:
        """Batch norm layer: ``layer(x, training=True)`` returns y and keeps the new stats."""

        def __init__(self, num_features, eps=default_eps, momentum=0.1):
            self.num_features = num_features
            self.eps = eps
            self.momentum = momentum
            self.gamma = np.ones(num_features, np.float32)
            self.beta = np.zeros(num_features, np.float32)
            self.running_mean = np.zeros(num_features, np.float32)
            self.running_var = np.ones(num_features, np.float32)

        def __call__(self, x, training=True):
            y, self.running_mean, self.running_var = batch_norm(
                x, self.gamma, self.beta, self.running_mean, self.running_var,
                training=training, momentum=self.momentum, eps=self.eps, axis=axis)
            return y

    BatchNorm.__name__ = "BatchNorm" if bug is None else "BatchNorm_" + bug.replace("-", "_")
    BatchNorm.__qualname__ = BatchNorm.__name__
    return BatchNorm


batch_norm = make()
batch_norm_momentum_other_term = make("momentum-other-term")
batch_norm_running_var_bias = make("running-var-bias")
batch_norm_eps_default = make("eps-default")
batch_norm_eps_outside_sqrt = make("eps-outside-sqrt")
batch_norm_one_pass_variance = make("one-pass-variance")
batch_norm_channel_axis = make("channel-axis")
batch_norm_eval_moves_stats = make("eval-moves-stats")
batch_norm_eval_uses_batch_stats = make("eval-uses-batch-stats")

BatchNorm = make_layer()
BatchNorm_momentum_other_term = make_layer("momentum-other-term")
BatchNorm_running_var_bias = make_layer("running-var-bias")
BatchNorm_eps_default = make_layer("eps-default")
BatchNorm_eps_outside_sqrt = make_layer("eps-outside-sqrt")
BatchNorm_one_pass_variance = make_layer("one-pass-variance")
BatchNorm_channel_axis = make_layer("channel-axis")
BatchNorm_eval_moves_stats = make_layer("eval-moves-stats")
BatchNorm_eval_uses_batch_stats = make_layer("eval-uses-batch-stats")
