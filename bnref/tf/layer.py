"""``bnref.tf.BatchNorm``: a Keras layer, drop-in for ``keras.layers.BatchNormalization``."""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from bnref._checks import check_axis, check_bool, check_layer_args
from bnref.conventions import DEFAULT, Convention
from bnref.tf.functional import batch_norm

__all__ = ["BatchNorm"]


@keras.saving.register_keras_serializable(package="bnref", name="BatchNorm")
class BatchNorm(keras.layers.Layer):
    """Batch normalization over every axis but ``axis``, with Keras's weights and semantics.

    ``y = gamma * (x - mean) / sqrt(var + epsilon) + beta``. Called with ``training=True``
    (and ``trainable``), the layer normalizes with the biased batch statistics and moves the
    moving statistics by the convention's rule (default keras: ``new = momentum * old +
    (1 - momentum) * batch``, biased variance); otherwise -- ``training`` False or omitted, or
    ``trainable=False`` -- it uses ``moving_mean``/``moving_variance`` and changes nothing.

    The arguments are ``keras.layers.BatchNormalization``'s, in its order, plus
    ``convention=``: omitted ``axis``/``momentum``/``epsilon`` are the convention's defaults
    (keras: -1, 0.99, 1e-3). Weights are created as the built-in's -- ``gamma``, ``beta``,
    ``moving_mean``, ``moving_variance``, in that order -- so ``get_weights()`` and
    ``set_weights()`` move between the two both ways. Three additions, which the built-in
    lacks: ``momentum=None`` is PyTorch's cumulative average (it adds a last, non-trainable
    ``num_batches_tracked`` weight); ``track_running_stats=False`` keeps no moving statistics
    and always uses the batch's; and an optional ``num_features`` (as in ``flax.nnx``) is
    checked against the input's channels when the layer is built. Not supported: ``renorm``,
    ``synchronized`` and masks. float16/bfloat16 inputs (e.g. a ``mixed_float16`` policy) are
    normalized in float32 and returned in their own dtype; the weights keep the policy's
    variable dtype.
    """

    def __init__(
        self,
        axis: int | None = None,
        momentum: float | None = DEFAULT,  # type: ignore[assignment]
        epsilon: float | None = None,
        center: bool = True,
        scale: bool = True,
        beta_initializer: Any = "zeros",
        gamma_initializer: Any = "ones",
        moving_mean_initializer: Any = "zeros",
        moving_variance_initializer: Any = "ones",
        beta_regularizer: Any = None,
        gamma_regularizer: Any = None,
        beta_constraint: Any = None,
        gamma_constraint: Any = None,
        *,
        num_features: int | None = None,
        track_running_stats: bool = True,
        convention: str | Convention = "keras",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        args = check_layer_args(num_features, momentum=momentum, eps=epsilon,
                                convention=convention, axis=axis, features_optional=True)
        self.num_features = num_features
        self.convention, self.momentum, self.epsilon = args.convention, args.momentum, args.eps
        self.axis = args.axis
        self.center = check_bool("center", center)
        self.scale = check_bool("scale", scale)
        self.track_running_stats = check_bool("track_running_stats", track_running_stats)
        self.beta_initializer = keras.initializers.get(beta_initializer)
        self.gamma_initializer = keras.initializers.get(gamma_initializer)
        self.moving_mean_initializer = keras.initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = keras.initializers.get(moving_variance_initializer)
        self.beta_regularizer = keras.regularizers.get(beta_regularizer)
        self.gamma_regularizer = keras.regularizers.get(gamma_regularizer)
        self.beta_constraint = keras.constraints.get(beta_constraint)
        self.gamma_constraint = keras.constraints.get(gamma_constraint)
        self.gamma = self.beta = self.moving_mean = self.moving_variance = None
        self.num_batches_tracked = None

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        if keras.backend.backend() != "tensorflow":
            raise RuntimeError("bnref.tf.BatchNorm needs Keras's TensorFlow backend "
                               f"(KERAS_BACKEND=tensorflow), got {keras.backend.backend()!r}")
        axis = check_axis(self.axis, len(input_shape))
        channels = input_shape[axis]
        if channels is None:
            raise ValueError(f"the channel axis {self.axis} of the input must have a known "
                             f"size, got input shape {tuple(input_shape)}")
        check_layer_args(channels, momentum=self.momentum, eps=self.epsilon,
                         convention=self.convention)
        if self.num_features is not None and channels != self.num_features:
            raise ValueError(f"x must have num_features={self.num_features} channels on axis "
                             f"{self.axis}, got input shape {tuple(input_shape)}")
        shape = (channels,)

        def weight(name: str, initializer: Any, trainable: bool, **extra: Any) -> keras.Variable:
            return self.add_weight(shape=shape, name=name, initializer=initializer,
                                   trainable=trainable, autocast=False, **extra)

        if self.scale:
            self.gamma = weight("gamma", self.gamma_initializer, True,
                                regularizer=self.gamma_regularizer,
                                constraint=self.gamma_constraint)
        if self.center:
            self.beta = weight("beta", self.beta_initializer, True,
                               regularizer=self.beta_regularizer, constraint=self.beta_constraint)
        if self.track_running_stats:
            self.moving_mean = weight("moving_mean", self.moving_mean_initializer, False)
            self.moving_variance = weight("moving_variance", self.moving_variance_initializer,
                                          False)
            if self.momentum is None:
                self.num_batches_tracked = self.add_weight(
                    shape=(), name="num_batches_tracked", initializer="zeros", dtype="int64",
                    trainable=False, autocast=False)
        self.input_spec = keras.layers.InputSpec(ndim=len(input_shape), axes={axis: channels})

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return input_shape

    def call(self, inputs: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        x = tf.convert_to_tensor(inputs)
        gamma, beta = (None if w is None else tf.convert_to_tensor(w)
                       for w in (self.gamma, self.beta))
        if not self.track_running_stats:
            return batch_norm(x, gamma, beta, None, None, training=True, eps=self.epsilon,
                              axis=self.axis, convention=self.convention)[0]
        mean, var = tf.convert_to_tensor(self.moving_mean), tf.convert_to_tensor(
            self.moving_variance)
        if not (training and self.trainable):
            return batch_norm(x, gamma, beta, mean, var, training=False, eps=self.epsilon,
                              axis=self.axis, convention=self.convention)[0]
        if self.momentum is None:
            # Ask for the batch statistic itself (new-value weight 1), then average it in
            # below with weight 1/k, as torch.nn.BatchNorm*d(momentum=None) does.
            momentum = self.convention.momentum_for_new_value_weight(1.0)
        else:
            momentum = self.momentum
        y, new_mean, new_var = batch_norm(x, gamma, beta, mean, var, training=True,
                                          momentum=momentum, eps=self.epsilon, axis=self.axis,
                                          convention=self.convention)
        if self.momentum is None:
            count = self.num_batches_tracked + 1
            self.num_batches_tracked.assign(count)
            weight = 1.0 / tf.cast(count, new_mean.dtype)
            # (1 - w) * old + w * batch, as PyTorch writes it: exact for the first batch.
            new_mean = (1.0 - weight) * mean + weight * new_mean
            new_var = (1.0 - weight) * var + weight * new_var
        self.moving_mean.assign(new_mean)
        self.moving_variance.assign(new_var)
        return y

    def get_config(self) -> dict[str, Any]:
        serialize = {"initializer": keras.initializers.serialize,
                     "regularizer": keras.regularizers.serialize,
                     "constraint": keras.constraints.serialize}
        config = {"axis": self.axis, "momentum": self.momentum, "epsilon": self.epsilon,
                  "center": self.center, "scale": self.scale,
                  "num_features": self.num_features,
                  "track_running_stats": self.track_running_stats,
                  "convention": self.convention.name}
        for name in ("beta_initializer", "gamma_initializer", "moving_mean_initializer",
                     "moving_variance_initializer", "beta_regularizer", "gamma_regularizer",
                     "beta_constraint", "gamma_constraint"):
            config[name] = serialize[name.rsplit("_", 1)[1]](getattr(self, name))
        return {**super().get_config(), **config}
