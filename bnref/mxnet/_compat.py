"""MXNet 1.9.1 (its last release) uses ``numpy.bool``, an alias numpy 1.24 removed: put back the
alias -- Python's ``bool``, exactly what it was -- before mxnet is imported. Nothing else of numpy
is touched."""

import numpy

if "bool" not in numpy.__dict__:
    numpy.bool = bool  # type: ignore[attr-defined]
