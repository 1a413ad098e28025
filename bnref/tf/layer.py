"""``bnref.tf.BatchNorm``: a Keras layer, drop-in for ``keras.layers.BatchNormalization``.

The class is named ``BatchNormalization`` and exported under both names: Keras 3 files
(``.weights.h5``, ``.keras``) address a layer's weights by its class name in snake case
(``keras/src/saving/saving_lib.py``, ``_save_container_state``), so only a class of the
built-in's name reads and writes the built-in's files; its default layer names
(``batch_normalization``, ``batch_normalization_1``, ...) are the built-in's too.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import tensorflow as tf

from bnref._checks import (
    check_axis,
    check_bool,
    check_fraction,
    check_layer_args,
    check_mask,
    check_renorm_clipping,
)
from bnref.conventions import DEFAULT, Convention
from bnref.tf.functional import batch_moments, batch_norm, compute_dtype

__all__ = ["BatchNorm", "BatchNormalization"]


def _clone(initializer: Any) -> Any:
    """A fresh copy of a Keras initializer object (a new seed for random ones), as Keras's
    BatchNormalization makes for each renorm weight; names and dicts are returned as they are."""
    if isinstance(initializer, keras.initializers.Initializer):
        return type(initializer).from_config(initializer.get_config())
    return initializer


def _read(variable: Any) -> tf.Tensor | None:
    return None if variable is None else tf.convert_to_tensor(variable)


def _view(tensor: tf.Tensor, axis: int) -> tf.Tensor:
    """``tensor`` viewed as ``(before, C, after)``, the channel axis in the middle: the
    reductions of bnref.tf.functional, whose numerics the synchronized path keeps."""
    dims = tensor.shape.as_list()
    if None in dims:  # sizes known only at run time
        shape = tf.shape(tensor)
        view = tf.stack([tf.reduce_prod(shape[:axis]), shape[axis],
                         tf.reduce_prod(shape[axis + 1:])])
    else:
        view = [math.prod(dims[:axis]), dims[axis], math.prod(dims[axis + 1:])]
    return tf.reshape(tensor, view)


def _synchronized_moments(
    x: tf.Tensor, axis: int, selected: tf.Tensor | None, replica: tf.distribute.ReplicaContext,
    convention: Convention,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Per-channel ``(mean, var, n)`` of every replica's ``x`` together (the compute dtype,
    ``(C,)``), two-pass across the replicas::

        n    = sum_r n_r,  mean = sum_r sum(m x_r) / n          all-reduce 1: (n_r, sum(m x_r))
        var  = sum_r sum(m (x_r - mean)²) / n                    all-reduce 2

    ``m`` the mask's flags (1 everywhere without one; a channel with nothing flagged gets 0
    and 0, as :func:`batch_moments` gives it). Every replica must call this the same number
    of times, in the same order: it blocks until all have.
    """
    dtype = compute_dtype(x.dtype)
    wide = _view(tf.cast(x, dtype), axis)
    flags = None if selected is None else _view(selected, axis)
    zeros = tf.zeros_like(wide)
    if flags is None:
        view = tf.shape(wide)
        local_count = tf.fill(view[1:2], tf.cast(view[0] * view[2], dtype))
        local_sum = tf.reduce_sum(wide, [0, 2])
    else:
        # where, not a product with m: an unselected inf or NaN must not reach the sums.
        local_count = tf.reduce_sum(tf.cast(flags, dtype), [0, 2])
        local_sum = tf.reduce_sum(tf.where(flags, wide, zeros), [0, 2])
    # One tensor per all-reduce: collectives must be issued in the same order everywhere.
    count, total = tf.unstack(replica.all_reduce(tf.distribute.ReduceOp.SUM,
                                                 tf.stack([local_count, local_sum])))
    if flags is None:
        _check_count(count, convention, replica.num_replicas_in_sync)
    mean = tf.math.divide_no_nan(total, count)
    centered = wide - tf.expand_dims(mean, 1)
    if flags is not None:
        centered = tf.where(flags, centered, zeros)
    m2 = replica.all_reduce(tf.distribute.ReduceOp.SUM,
                            tf.reduce_sum(centered * centered, [0, 2]))
    return mean, tf.math.divide_no_nan(m2, count), count


def _check_count(count: tf.Tensor, convention: Convention, replicas: int) -> None:
    """The whole batch must have a value per channel, more than one where the torch
    convention's unbiased running variance divides by ``n - 1``; one replica's share may be
    empty. Known only once every replica's size is, so checked at run time."""
    if convention.single_value_error:
        tf.debugging.assert_greater(
            count, tf.ones_like(count),
            message=f"Expected more than 1 value per channel when training, got fewer in the "
                    f"{replicas} replicas' batches together (synchronized batch norm)")
    else:
        tf.debugging.assert_positive(
            count, message=f"x must hold at least one value per channel, got none in the "
                           f"{replicas} replicas' batches together (synchronized batch norm)")


def _normalize(x: tf.Tensor, axis: int, mean: tf.Tensor, var: tf.Tensor,
               gamma: tf.Tensor | None, beta: tf.Tensor | None, eps: float) -> tf.Tensor:
    """``(x - mean) * gamma / sqrt(var + eps) + beta`` in ``mean``'s dtype, returned in
    ``x``'s, as bnref.tf.functional computes it (any batch size, none included)."""
    dtype = mean.dtype
    scale = tf.math.rsqrt(var + tf.constant(eps, dtype))
    if gamma is not None:
        scale = scale * tf.cast(gamma, dtype)
    y = (_view(tf.cast(x, dtype), axis) - tf.expand_dims(mean, 1)) * tf.expand_dims(scale, 1)
    if beta is not None:
        y = y + tf.expand_dims(tf.cast(beta, dtype), 1)
    return tf.cast(tf.reshape(y, tf.shape(x)), x.dtype)


@keras.saving.register_keras_serializable(package="bnref", name="BatchNorm")
class BatchNormalization(keras.layers.Layer):
    """Batch normalization over every axis but ``axis``, with Keras's weights and semantics.

    ``y = gamma * (x - mean) / sqrt(var + epsilon) + beta``. Called with ``training=True``
    (and ``trainable``), the layer normalizes with the biased batch statistics and moves the
    moving statistics by the convention's rule (default keras: ``new = momentum * old +
    (1 - momentum) * batch``, biased variance); otherwise -- ``training`` False or omitted, or
    ``trainable=False`` -- it uses ``moving_mean``/``moving_variance`` and changes nothing.

    The arguments are ``keras.layers.BatchNormalization``'s, in its order, so the built-in's
    config (``from_config``, ``keras.models.clone_model``) makes this layer; plus
    ``convention=``: omitted ``axis``/``momentum``/``epsilon``/``renorm_momentum`` are the
    convention's defaults (keras: -1, 0.99, 1e-3, 0.99). Weights are created as the built-in's
    -- ``gamma``, ``beta``, ``moving_mean``, ``moving_variance``, then with ``renorm``
    ``moving_stddev``, ``renorm_mean``, ``renorm_stddev`` -- so ``get_weights()``,
    ``set_weights()`` and weight files move between the two both ways.

    ``mask`` (at call time, or propagated from a ``Masking`` layer; passed on unchanged):
    Keras's layout, one flag per position of ``x`` without its last axis. In training only the
    flagged positions count: ``n = sum(m)``, ``mean = sum(m x) / n``, ``var = sum(m (x -
    mean)²) / n`` (two-pass; a channel with nothing flagged gets 0 and 0, as in Keras). Every
    position is normalized. Inference ignores the mask.

    ``renorm=True`` is batch renormalization (Ioffe, 2017), as Keras computes it: in training
    ``y = (xhat * r + d) * gamma + beta`` with ``xhat`` the batch-normalized input, ``s =
    sqrt(var + epsilon)``, ``r = s / max(renorm_stddev, sqrt(epsilon))`` clipped to ``[rmin,
    rmax]``, ``d = (mean - renorm_mean) / max(renorm_stddev, sqrt(epsilon))`` clipped to
    ``[-dmax, dmax]`` (``renorm_clipping``), both constants to the gradient. Then
    ``renorm_mean``/``renorm_stddev`` move toward ``mean``/``s`` with ``renorm_momentum``, and
    ``moving_mean``/``moving_stddev`` with ``momentum`` (``moving_stddev`` toward ``sqrt(v +
    epsilon)``, ``v`` the convention's running-variance estimate), and ``moving_variance =
    max(moving_stddev² - epsilon, 0)``. Inference is unchanged.

    ``synchronized=True``: in training, inside ``strategy.run`` of a ``tf.distribute``
    strategy with more than one replica (``MirroredStrategy``, ``MultiWorkerMirroredStrategy``),
    the statistics are those of every replica's batch together, by two all-reduces (SUM) of
    the replica context::

        n    = sum_r n_r                       n_r: replica r's values per channel (or flags)
        mean = sum_r sum(x_r) / n              (all-reduce 1: n_r and sum(x_r))
        var  = sum_r sum((x_r - mean)²) / n    (all-reduce 2: squared deviations from the
                                               global mean: stable, never E[x²] - E[x]²)

    Each replica normalizes its own batch with them, and every replica moves its copy of the
    moving statistics by the same global ``mean``, ``var`` and ``n`` (the torch convention's
    unbiased variance is ``var * n / (n - 1)``), so the copies stay bit for bit equal. The
    gradient flows through the all-reduces: each replica's input gradient is its rows of the
    whole batch's, and its ``gamma``/``beta`` gradients are its own part, which the strategy
    sums. Replicas' batches may differ in size, and some may be empty, as long as the whole
    batch has a value per channel (more than one under the torch convention). Outside a
    strategy, with one replica, in a cross-replica context or in inference, it is exactly the
    unsynchronized layer.

    Three additions, which the built-in lacks: ``momentum=None`` is PyTorch's cumulative
    average (it adds a last, non-trainable ``num_batches_tracked`` weight);
    ``track_running_stats=False`` keeps no moving statistics and always uses the batch's; and
    an optional ``num_features`` (as in ``flax.nnx``) is checked against the input's channels
    when the layer is built. Neither of the first two combines with ``renorm``, which needs
    the moving statistics and a fixed momentum. float16/bfloat16 inputs (e.g. a
    ``mixed_float16`` policy) are normalized in float32 and returned in their own dtype; the
    weights keep the policy's variable dtype.
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
        renorm: bool = False,
        renorm_clipping: dict[str, float] | None = None,
        renorm_momentum: float = DEFAULT,  # type: ignore[assignment]
        synchronized: bool = False,
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
        self.synchronized = check_bool("synchronized", synchronized)
        self.renorm = check_bool("renorm", renorm)
        self.renorm_momentum = (args.convention.default_momentum if renorm_momentum is DEFAULT
                                else check_fraction("renorm_momentum", renorm_momentum))
        # Keras validates and fills in the clipping only with renorm, and keeps it as given
        # otherwise (its config round-trips either way).
        self.renorm_clipping = (check_renorm_clipping(renorm_clipping) if self.renorm
                                else renorm_clipping)
        if self.renorm and (self.momentum is None or not self.track_running_stats):
            raise ValueError("renorm=True needs moving statistics with a fixed momentum, got "
                             f"momentum={self.momentum}, "
                             f"track_running_stats={self.track_running_stats}")
        self.beta_initializer = keras.initializers.get(beta_initializer)
        self.gamma_initializer = keras.initializers.get(gamma_initializer)
        self.moving_mean_initializer = keras.initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = keras.initializers.get(moving_variance_initializer)
        self.beta_regularizer = keras.regularizers.get(beta_regularizer)
        self.gamma_regularizer = keras.regularizers.get(gamma_regularizer)
        self.beta_constraint = keras.constraints.get(beta_constraint)
        self.gamma_constraint = keras.constraints.get(gamma_constraint)
        self.supports_masking = True
        self.gamma = self.beta = self.moving_mean = self.moving_variance = None
        self.moving_stddev = self.renorm_mean = self.renorm_stddev = None
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
        if self.renorm:
            def stddev_initializer(shape: tuple[int, ...], dtype: Any = None) -> tf.Tensor:
                # The standard deviations start at sqrt of the variance initializer's values.
                return tf.sqrt(_clone(self.moving_variance_initializer)(shape, dtype=dtype))

            self.moving_stddev = weight("moving_stddev", stddev_initializer, False)
            self.renorm_mean = weight("renorm_mean", _clone(self.moving_mean_initializer), False)
            self.renorm_stddev = weight("renorm_stddev", stddev_initializer, False)
        self.input_spec = keras.layers.InputSpec(ndim=len(input_shape), axes={axis: channels})

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return input_shape

    def call(self, inputs: tf.Tensor, training: bool | None = None,
             mask: tf.Tensor | None = None) -> tf.Tensor:
        x = tf.convert_to_tensor(inputs)
        selected = None if mask is None else self._selected(x, mask)
        gamma, beta = _read(self.gamma), _read(self.beta)
        if self.track_running_stats and not (training and self.trainable):
            return batch_norm(x, gamma, beta, _read(self.moving_mean),
                              _read(self.moving_variance), training=False, eps=self.epsilon,
                              axis=self.axis, convention=self.convention)[0]
        replica = self._replicas_to_synchronize()
        if replica is None and selected is None and not self.renorm:
            return self._train(x, gamma, beta)
        if replica is None:
            mean, var, count = batch_moments(x, axis=self.axis, mask=selected)
        else:
            mean, var, count = _synchronized_moments(x, self.axis % x.shape.rank, selected,
                                                     replica, self.convention)
        if self.renorm:
            gamma, beta = self._renorm_scale_and_offset(mean, var, gamma, beta)
        # Normalizing with statistics that depend on x (through the all-reduces too) gives
        # training-mode batch norm's gradient (with renorm's r, d held constant).
        if replica is None:
            y = batch_norm(x, gamma, beta, mean, var, training=False, eps=self.epsilon,
                           axis=self.axis, convention=self.convention)[0]
        else:  # batch_norm refuses an empty batch, which a replica's share may be
            y = _normalize(x, self.axis % x.shape.rank, mean, var, gamma, beta, self.epsilon)
        if not self.track_running_stats:
            return y
        # A channel of at most one selected value has variance exactly 0: any finite
        # unbiasing factor n / (n - 1) keeps it 0 (n itself would make it 0 * inf = NaN).
        batch_var = self.convention.running_var_estimate(var, tf.maximum(count, 2))
        if self.renorm:
            self._move_renorm_statistics(mean, var, batch_var)
        else:
            self._move_statistics(mean, batch_var)
        return y

    def _selected(self, x: tf.Tensor, mask: Any) -> tf.Tensor:
        """Keras's mask as a bool tensor of ``x``'s shape: a position's flag covers its last
        axis (``_masked_moments`` in Keras expands the mask there); nonzero means selected."""
        mask = tf.convert_to_tensor(mask)
        check_mask(tuple(mask.shape), tuple(x.shape))
        return tf.broadcast_to(tf.expand_dims(tf.cast(mask, tf.bool), -1), tf.shape(x))

    def _replicas_to_synchronize(self) -> tf.distribute.ReplicaContext | None:
        """The replica context whose replicas share the batch statistics, or None: not
        synchronized, outside ``strategy.run`` (no replica context, or the default one of a
        single replica), or a strategy of one replica."""
        if not self.synchronized:
            return None
        replica = tf.distribute.get_replica_context()  # None in a cross-replica context
        if replica is None or replica.num_replicas_in_sync == 1:
            return None
        return replica

    def _train(self, x: tf.Tensor, gamma: tf.Tensor | None, beta: tf.Tensor | None) -> tf.Tensor:
        """Training without a mask or renorm: one call of the compiled batch_norm."""
        if not self.track_running_stats:
            return batch_norm(x, gamma, beta, None, None, training=True, eps=self.epsilon,
                              axis=self.axis, convention=self.convention)[0]
        if self.momentum is None:
            # Ask for the batch statistic itself (new-value weight 1), then average it in
            # with weight 1/k (_move_statistics), as torch.nn.BatchNorm*d(momentum=None) does.
            momentum = self.convention.momentum_for_new_value_weight(1.0)
        else:
            momentum = self.momentum
        y, new_mean, new_var = batch_norm(x, gamma, beta, _read(self.moving_mean),
                                          _read(self.moving_variance), training=True,
                                          momentum=momentum, eps=self.epsilon, axis=self.axis,
                                          convention=self.convention)
        if self.momentum is None:
            self._move_statistics(new_mean, new_var)
        else:
            self.moving_mean.assign(new_mean)
            self.moving_variance.assign(new_var)
        return y

    def _move(self, variable: keras.Variable, batch_value: tf.Tensor, momentum: float) -> tf.Tensor:
        """``variable <- the convention's update(variable, batch_value, momentum)``, computed
        in ``batch_value``'s dtype; returns the new value in that dtype."""
        old = tf.cast(_read(variable), batch_value.dtype)
        new = self.convention.update_running(old, batch_value, momentum)
        variable.assign(tf.cast(new, variable.dtype))
        return new

    def _move_statistics(self, batch_mean: tf.Tensor, batch_var: tf.Tensor) -> None:
        """The moving statistics toward this batch's (the variance already as the convention
        feeds it): with the momentum, or with weight 1/k when ``momentum`` is None."""
        if self.momentum is not None:
            self._move(self.moving_mean, batch_mean, self.momentum)
            self._move(self.moving_variance, batch_var, self.momentum)
            return
        count = self.num_batches_tracked + 1
        self.num_batches_tracked.assign(count)
        weight = 1.0 / tf.cast(count, batch_mean.dtype)
        for variable, batch_value in ((self.moving_mean, batch_mean),
                                      (self.moving_variance, batch_var)):
            old = tf.cast(_read(variable), batch_value.dtype)
            # (1 - w) * old + w * batch, as PyTorch writes it: exact for the first batch.
            variable.assign(tf.cast((1.0 - weight) * old + weight * batch_value, variable.dtype))

    def _renorm_scale_and_offset(self, mean: tf.Tensor, var: tf.Tensor, gamma: tf.Tensor | None,
                                 beta: tf.Tensor | None) -> tuple[tf.Tensor, tf.Tensor]:
        """``(xhat * r + d) * gamma + beta = xhat * (r * gamma) + (d * gamma + beta)``: the
        scale and offset that apply renorm's correction (keras/src/layers/normalization/
        batch_normalization.py, ``_renorm_correction_and_moments``, ``_compose_transforms``)."""
        dtype = mean.dtype
        stddev = tf.sqrt(var + tf.constant(self.epsilon, dtype))
        renorm_mean = tf.cast(_read(self.renorm_mean), dtype)
        # Keras's floor: renorm_stddev may start (or decay) near 0 early in training.
        renorm_stddev = tf.maximum(tf.cast(_read(self.renorm_stddev), dtype),
                                   tf.sqrt(tf.constant(self.epsilon, dtype)))
        r = stddev / renorm_stddev
        d = (mean - renorm_mean) / renorm_stddev
        rmin, rmax, dmax = (self.renorm_clipping.get(key) for key in ("rmin", "rmax", "dmax"))
        if rmin is not None:
            r = tf.maximum(r, tf.constant(rmin, dtype))
        if rmax is not None:
            r = tf.minimum(r, tf.constant(rmax, dtype))
        if dmax is not None:
            d = tf.clip_by_value(d, tf.constant(-dmax, dtype), tf.constant(dmax, dtype))
        # r and d are corrections toward the moving statistics, not functions to train through.
        r, d = tf.stop_gradient(r), tf.stop_gradient(d)
        scale = r if gamma is None else r * tf.cast(gamma, dtype)
        offset = d if gamma is None else d * tf.cast(gamma, dtype)
        return scale, offset if beta is None else offset + tf.cast(beta, dtype)

    def _move_renorm_statistics(self, mean: tf.Tensor, var: tf.Tensor,
                                batch_var: tf.Tensor) -> None:
        """Renorm's statistics follow the batch's ``mean`` and ``sqrt(var + eps)`` with
        ``renorm_momentum``; the inference ones follow with ``momentum``, Keras tracking the
        standard deviation and deriving the variance from it (``_update_renorm_statistics``)."""
        eps = tf.constant(self.epsilon, mean.dtype)
        self._move(self.renorm_mean, mean, self.renorm_momentum)
        self._move(self.renorm_stddev, tf.sqrt(var + eps), self.renorm_momentum)
        self._move(self.moving_mean, mean, self.momentum)
        moving_stddev = self._move(self.moving_stddev, tf.sqrt(batch_var + eps), self.momentum)
        # max(., 0): rounding can take stddev² below eps.
        self.moving_variance.assign(tf.cast(tf.nn.relu(moving_stddev * moving_stddev - eps),
                                            self.moving_variance.dtype))

    def get_config(self) -> dict[str, Any]:
        serialize = {"initializer": keras.initializers.serialize,
                     "regularizer": keras.regularizers.serialize,
                     "constraint": keras.constraints.serialize}
        config = {"axis": self.axis, "momentum": self.momentum, "epsilon": self.epsilon,
                  "center": self.center, "scale": self.scale,
                  "synchronized": self.synchronized, "renorm": self.renorm,
                  "renorm_clipping": self.renorm_clipping,
                  "renorm_momentum": self.renorm_momentum,
                  "num_features": self.num_features,
                  "track_running_stats": self.track_running_stats,
                  "convention": self.convention.name}
        for name in ("beta_initializer", "gamma_initializer", "moving_mean_initializer",
                     "moving_variance_initializer", "beta_regularizer", "gamma_regularizer",
                     "beta_constraint", "gamma_constraint"):
            config[name] = serialize[name.rsplit("_", 1)[1]](getattr(self, name))
        return {**super().get_config(), **config}


BatchNorm = BatchNormalization
"""bnref's name for the layer (the same class): ``BatchNorm(...)`` in every backend."""
