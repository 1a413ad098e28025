"""bnref's JAX backend: ``batch_norm`` in pure jax.numpy and an init/apply layer with Flax's
variable layout, both synchronizable across devices (``axis_name=``/``axis_index_groups=``
under ``jax.vmap``, ``jax.pmap`` and ``jax.shard_map``). Never imports flax."""

from bnref.jax.functional import batch_norm
from bnref.jax.layer import BatchNorm

__all__ = ["BatchNorm", "batch_norm"]
