"""bnref's TensorFlow backend: ``batch_norm`` from plain TensorFlow ops and ``BatchNorm``, a
Keras layer that is a drop-in for ``keras.layers.BatchNormalization`` (the class is named
``BatchNormalization`` too, which Keras's weight files need; see :mod:`bnref.tf.layer`)."""

from bnref.tf.functional import batch_norm
from bnref.tf.layer import BatchNorm, BatchNormalization

__all__ = ["BatchNorm", "BatchNormalization", "batch_norm"]
