"""The registry: bnref's own backends implement every capability, and BNREF_REQUIRE parses."""

from __future__ import annotations

import pytest

from bnref.testing.backends import KNOWN_BACKENDS, required_backends
from bnref.testing.fixtures import backend_or_skip

OWN = [name for name, info in KNOWN_BACKENDS.items() if info.module]


@pytest.mark.parametrize("name", OWN)
def test_own_backends_implement_every_capability(name):
    """So the suite's "does not implement" skips can only ever hit third-party adapters."""
    backend = backend_or_skip(name)
    expected = {"gradients", "make_layer"} | ({"builtin"} if KNOWN_BACKENDS[name].builtins
                                              else set())
    assert expected <= backend.capabilities
    assert set(backend.conventions) == {"torch", "keras", "flax", "mxnet", "onnx"}


def test_required_backends_reads_the_environment(monkeypatch):
    monkeypatch.setenv("BNREF_REQUIRE", "numpy")
    assert required_backends() == ["numpy"]
    monkeypatch.setenv("BNREF_REQUIRE", "all")
    assert required_backends() == list(KNOWN_BACKENDS)
    monkeypatch.setenv("BNREF_REQUIRE", "numpy,caffe")
    with pytest.raises(ValueError, match=r"unknown backends \['caffe'\]"):
        required_backends()
