"""Batch norm written with plain PyTorch tensor ops, following PyTorch's own convention.

new running stat = (1 - momentum) * old + momentum * batch, with the *unbiased* batch variance
for the running variance; defaults momentum=0.1, eps=1e-5, channels on axis 1. No
``torch.nn.functional.batch_norm``: the statistics are written out, so autograd differentiates
the formula itself.
"""

import torch

FRAMEWORK = "torch"
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
        if not -x.ndim <= axis < x.ndim:
            raise ValueError(f"axis {axis} is out of range for a {x.ndim}-d input")
        axis = axis % x.ndim
        channels = x.shape[axis]
        for name, v in [("gamma", gamma), ("beta", beta), ("running_mean", running_mean),
                        ("running_var", running_var)]:
            if tuple(v.shape) != (channels,):
                raise ValueError(f"{name} has shape {tuple(v.shape)}, expected ({channels},)")

        # Statistics of half-precision data (float16, bfloat16) are taken in float32; float64
        # stays float64.
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        xc = x.to(dtype)  # no in-place op below: the caller's tensors are never modified
        reduce_dims = tuple(i for i in range(x.ndim) if i != axis)
        shape = [1] * x.ndim  # per-channel vectors are reshaped to this to broadcast
        shape[axis] = channels
        n = x.numel() // channels  # values per channel

        def batch_stats():
            mean = xc.mean(dim=reduce_dims)
            if bug == "one-pass-variance":
                var = (xc * xc).mean(dim=reduce_dims) - mean * mean
            else:
                # Two passes: squaring deviations from the mean does not cancel the way
                # E[x^2] - E[x]^2 does for data far from zero.
                var = ((xc - mean.reshape(shape)) ** 2).mean(dim=reduce_dims)
            return mean, var

        def moved(mean, var):
            if n == 1:  # like torch: one value has no unbiased variance
                raise ValueError("expected more than 1 value per channel when training")
            # The running statistics are not part of the graph.
            mean, var = mean.detach(), var.detach()
            # torch keeps an unbiased estimate of the population variance.
            var_estimate = var if bug == "running-var-bias" else var * n / (n - 1)
            if bug == "momentum-other-term":
                new_mean = momentum * running_mean + (1 - momentum) * mean
                new_var = momentum * running_var + (1 - momentum) * var_estimate
            else:
                new_mean = (1 - momentum) * running_mean + momentum * mean
                new_var = (1 - momentum) * running_var + momentum * var_estimate
            return new_mean.to(running_mean.dtype), new_var.to(running_var.dtype)

        if training or bug == "eval-uses-batch-stats":
            mean, var = batch_stats()
        else:
            mean, var = running_mean.to(dtype), running_var.to(dtype)

        if bug == "eps-outside-sqrt":
            inv_std = 1 / (torch.sqrt(var) + eps)
        else:
            inv_std = 1 / torch.sqrt(var + eps)
        scale = (gamma.to(dtype) * inv_std).reshape(shape)
        y = (xc - mean.reshape(shape)) * scale + beta.to(dtype).reshape(shape)
        y = y.to(x.dtype)

        if training:
            return (y, *moved(mean, var))
        if bug == "eval-moves-stats":
            return (y, *moved(*batch_stats()))
        return y, running_mean.clone(), running_var.clone()

    batch_norm.__name__ = "batch_norm" if bug is None else "batch_norm_" + bug.replace("-", "_")
    batch_norm.__qualname__ = batch_norm.__name__
    return batch_norm


def make_layer(bug=None):
    """Return a BatchNorm module class, correct when ``bug`` is None, else with ``bug`` planted."""
    _check_bug(bug)
    batch_norm = make(bug)
    default_eps = 1e-3 if bug == "eps-default" else 1e-5
    axis = -1 if bug == "channel-axis" else 1

    class BatchNorm(torch.nn.Module):
        """Like torch.nn.BatchNorm{1,2,3}d with affine=True, track_running_stats=True."""

        def __init__(self, num_features, eps=default_eps, momentum=0.1):
            super().__init__()
            self.num_features = num_features
            self.eps = eps
            self.momentum = momentum
            self.weight = torch.nn.Parameter(torch.ones(num_features))
            self.bias = torch.nn.Parameter(torch.zeros(num_features))
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))

        def forward(self, x):
            y, new_mean, new_var = batch_norm(
                x, self.weight, self.bias, self.running_mean, self.running_var,
                training=self.training, momentum=self.momentum, eps=self.eps, axis=axis)
            with torch.no_grad():  # buffers, not parameters: keep them out of autograd
                self.running_mean.copy_(new_mean)
                self.running_var.copy_(new_var)
            return y

        def extra_repr(self):
            return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"

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
