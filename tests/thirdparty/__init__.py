"""Third-party style batch-norm implementations, for testing bnref's conformance harness.

Each module here (``numpy_bn``, ``torch_bn``, ``jax_bn``, ``tf_bn``, ``mxnet_bn``) is a small,
independently written batch norm in one framework, with bnref's functional signature::

    batch_norm(x, gamma, beta, running_mean, running_var, *, training, momentum, eps, axis)
        -> (y, new_running_mean, new_running_var)

and no framework built-in batch-norm kernel. ``make()`` gives the correct one (also the module's
``batch_norm``); ``make(bug)`` gives one with a classic bug planted, for each name in the
module's ``BUGS`` (also as ``batch_norm_<bug>`` module attributes). ``CONVENTION`` names the
bnref convention the module follows and ``FRAMEWORK`` its framework. ``numpy_bn`` and
``torch_bn`` also have a layer, ``BatchNorm``, with a ``BatchNorm_<bug>`` per bug.

The harness must pass the correct implementations and catch (and diagnose) every planted bug.
This is test data, not a test module: nothing here is collected by pytest. See README.md.
"""
