"""bnref's TensorFlow backend: ``batch_norm`` from plain TensorFlow ops and ``BatchNorm``, a
Keras layer that is a drop-in for ``keras.layers.BatchNormalization``."""

from bnref.tf.functional import batch_norm
from bnref.tf.layer import BatchNorm

__all__ = ["BatchNorm", "batch_norm"]
