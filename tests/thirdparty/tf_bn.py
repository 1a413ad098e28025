"""Batch norm written with plain TensorFlow ops, following Keras' convention.

new running stat = momentum * old + (1 - momentum) * batch, with the *biased* batch variance;
defaults momentum=0.99, eps=1e-3, channels on the last axis. No Keras layer and no
``tf.nn.moments``/``tf.nn.batch_normalization``: the statistics are written out with
``tf.reduce_mean``. numpy arrays are accepted too.
"""

import tensorflow as tf

FRAMEWORK = "tf"
CONVENTION = "keras"
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
    default_eps = 1e-5 if bug == "eps-default" else 1e-3
    default_axis = 1 if bug == "channel-axis" else -1

    def batch_norm(x, gamma, beta, running_mean, running_var, *, training, momentum=0.99,
                   eps=default_eps, axis=default_axis):
        x = tf.convert_to_tensor(x)
        gamma, beta = tf.convert_to_tensor(gamma), tf.convert_to_tensor(beta)
        running_mean = tf.convert_to_tensor(running_mean)
        running_var = tf.convert_to_tensor(running_var)
        rank = len(x.shape)
        if not -rank <= axis < rank:
            raise ValueError(f"axis {axis} is out of range for a {rank}-d input")
        axis = axis % rank
        channels = x.shape[axis]
        for name, v in [("gamma", gamma), ("beta", beta), ("running_mean", running_mean),
                        ("running_var", running_var)]:
            if tuple(v.shape) != (channels,):
                raise ValueError(f"{name} has shape {tuple(v.shape)}, expected ({channels},)")

        # Statistics of half-precision data (float16, bfloat16) are taken in float32; float64
        # stays float64.
        dtype = tf.float64 if x.dtype == tf.float64 else tf.float32
        xc = tf.cast(x, dtype)
        reduce_axes = [i for i in range(rank) if i != axis]
        shape = [1] * rank  # per-channel vectors are reshaped to this to broadcast
        shape[axis] = channels
        n = x.shape.num_elements() // channels  # values per channel

        def batch_stats():
            mean = tf.reduce_mean(xc, axis=reduce_axes)
            if bug == "one-pass-variance":
                var = tf.reduce_mean(xc * xc, axis=reduce_axes) - mean * mean
            else:
                # Two passes: squaring deviations from the mean does not cancel the way
                # E[x^2] - E[x]^2 does for data far from zero.
                var = tf.reduce_mean(tf.square(xc - tf.reshape(mean, shape)), axis=reduce_axes)
            return mean, var

        def moved(mean, var):
            # Keras keeps the biased batch variance (max(n - 1, 1): one value has variance 0).
            var_estimate = var * (n / max(n - 1, 1)) if bug == "running-var-bias" else var
            old_mean = tf.cast(running_mean, dtype)
            old_var = tf.cast(running_var, dtype)
            if bug == "momentum-other-term":
                new_mean = (1 - momentum) * old_mean + momentum * mean
                new_var = (1 - momentum) * old_var + momentum * var_estimate
            else:
                new_mean = momentum * old_mean + (1 - momentum) * mean
                new_var = momentum * old_var + (1 - momentum) * var_estimate
            return tf.cast(new_mean, running_mean.dtype), tf.cast(new_var, running_var.dtype)

        if training or bug == "eval-uses-batch-stats":
            mean, var = batch_stats()
        else:
            mean, var = tf.cast(running_mean, dtype), tf.cast(running_var, dtype)

        if bug == "eps-outside-sqrt":
            inv_std = 1 / (tf.sqrt(var) + eps)
        else:
            inv_std = 1 / tf.sqrt(var + eps)
        scale = tf.reshape(tf.cast(gamma, dtype) * inv_std, shape)
        y = (xc - tf.reshape(mean, shape)) * scale + tf.reshape(tf.cast(beta, dtype), shape)
        y = tf.cast(y, x.dtype)

        if training:
            return (y, *moved(mean, var))
        if bug == "eval-moves-stats":
            return (y, *moved(*batch_stats()))
        return y, tf.identity(running_mean), tf.identity(running_var)

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
