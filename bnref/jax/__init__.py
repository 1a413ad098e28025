"""bnref's JAX backend: ``batch_norm`` in pure jax.numpy and an init/apply layer with Flax's
variable layout. Never imports flax."""

from bnref.jax.functional import batch_norm
from bnref.jax.layer import BatchNorm

__all__ = ["BatchNorm", "batch_norm"]
