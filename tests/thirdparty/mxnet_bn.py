"""Batch norm written with ``mx.nd`` ops (no ``mx.nd.BatchNorm``), following MXNet's convention.

new running stat = momentum * old + (1 - momentum) * batch, with the *biased* batch variance;
defaults momentum=0.9, eps=1e-5, channels on axis 1.
"""

import numpy as np

if "bool" not in np.__dict__:
    np.bool = bool  # mxnet 1.9.1 still uses the alias numpy 1.24 removed

import mxnet as mx  # after the alias

FRAMEWORK = "mxnet"
CONVENTION = "mxnet"
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


def make(bug=None):
    """Return a batch_norm function, correct when ``bug`` is None, else with ``bug`` planted."""
    if bug is not None and bug not in BUGS:
        raise ValueError(f"unknown bug {bug!r}; expected None or one of {BUGS}")
    default_eps = 1e-3 if bug == "eps-default" else 1e-5
    default_axis = -1 if bug == "channel-axis" else 1

    def batch_norm(x, gamma, beta, running_mean, running_var, *, training, momentum=0.9,
                   eps=default_eps, axis=default_axis):
        if not -x.ndim <= axis < x.ndim:
            raise ValueError(f"axis {axis} is out of range for a {x.ndim}-d input")
        axis = axis % x.ndim
        channels = x.shape[axis]
        for name, v in [("gamma", gamma), ("beta", beta), ("running_mean", running_mean),
                        ("running_var", running_var)]:
            if v.shape != (channels,):
                raise ValueError(f"{name} has shape {v.shape}, expected ({channels},)")

        # Statistics of float16 data are taken in float32; float64 stays float64.
        dtype = np.float64 if x.dtype == np.float64 else np.float32
        xc = x.astype(dtype)  # astype copies: the caller's arrays are never modified
        reduce_axes = tuple(i for i in range(x.ndim) if i != axis)
        shape = [1] * x.ndim  # per-channel vectors are reshaped to this to broadcast
        shape[axis] = channels
        n = x.size // channels  # values per channel

        def batch_stats():
            mean = mx.nd.mean(xc, axis=reduce_axes)
            if bug == "one-pass-variance":
                var = mx.nd.mean(xc * xc, axis=reduce_axes) - mean * mean
            else:
                # Two passes: squaring deviations from the mean does not cancel the way
                # E[x^2] - E[x]^2 does for data far from zero.
                dev = mx.nd.broadcast_sub(xc, mean.reshape(shape))
                var = mx.nd.mean(dev * dev, axis=reduce_axes)
            return mean, var

        def moved(mean, var):
            # MXNet keeps the biased batch variance (max(n - 1, 1): one value has variance 0).
            var_estimate = var * (n / max(n - 1, 1)) if bug == "running-var-bias" else var
            old_mean, old_var = running_mean.astype(dtype), running_var.astype(dtype)
            if bug == "momentum-other-term":
                new_mean = (1 - momentum) * old_mean + momentum * mean
                new_var = (1 - momentum) * old_var + momentum * var_estimate
            else:
                new_mean = momentum * old_mean + (1 - momentum) * mean
                new_var = momentum * old_var + (1 - momentum) * var_estimate
            return new_mean.astype(running_mean.dtype), new_var.astype(running_var.dtype)

        if training or bug == "eval-uses-batch-stats":
            mean, var = batch_stats()
        else:
            mean, var = running_mean.astype(dtype), running_var.astype(dtype)

        if bug == "eps-outside-sqrt":
            inv_std = 1 / (mx.nd.sqrt(var) + eps)
        else:
            inv_std = 1 / mx.nd.sqrt(var + eps)
        scale = (gamma.astype(dtype) * inv_std).reshape(shape)
        centred = mx.nd.broadcast_sub(xc, mean.reshape(shape))
        y = mx.nd.broadcast_add(mx.nd.broadcast_mul(centred, scale),
                                beta.astype(dtype).reshape(shape))
        y = y.astype(x.dtype)

        if training:
            return (y, *moved(mean, var))
        if bug == "eval-moves-stats":
            return (y, *moved(*batch_stats()))
        return y, running_mean.copy(), running_var.copy()

    batch_norm.__name__ = "batch_norm" if bug is None else "batch_norm_" + bug.replace("-", "_")
    batch_norm.__qualname__ = batch_norm.__name__
    return batch_norm


batch_norm = make()
batch_norm_momentum_other_term = make("momentum-other-term")
batch_norm_running_var_bias = make("running-var-bias")
batch_norm_eps_default = make("eps-default")
batch_norm_eps_outside_sqrt = make("eps-outside-sqrt")
batch_norm_one_pass_variance = make("one-pass-variance")
batch_norm_channel_axis = make("channel-axis")
batch_norm_eval_moves_stats = make("eval-moves-stats")
batch_norm_eval_uses_batch_stats = make("eval-uses-batch-stats")
