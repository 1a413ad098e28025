"""Import footprint, proven in fresh interpreters: ``import bnref`` loads no framework, and
``import bnref.<backend>`` loads its own framework and no other one."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bnref.testing import KNOWN_BACKENDS
from bnref.testing.fixtures import backend_or_skip

FRAMEWORKS = ("torch", "tensorflow", "jax", "flax", "mxnet", "keras")
# What a framework's own import pulls in (DESIGN.md): TensorFlow 2.21 imports jax through
# tensorflow.lite and Keras 3 as tf.keras.
ALSO_LOADED_BY = {"tensorflow": {"jax", "keras"}}


def loaded_frameworks(statement: str) -> set[str]:
    code = (f"import sys, json\n{statement}\n"
            f"print(json.dumps([m for m in {FRAMEWORKS!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("module", ["bnref", "bnref.conventions", "bnref._checks",
                                    "bnref.numpy", "bnref.testing", "bnref.testing.suite",
                                    "bnref.testing.diagnose", "bnref.testing.adapters",
                                    "bnref.testing.pytest_plugin", "bnref.cli"])
def test_core_modules_import_no_framework(module):
    assert loaded_frameworks(f"import {module}") == set()


@pytest.mark.parametrize("name", [n for n, info in KNOWN_BACKENDS.items() if info.module])
def test_a_backend_imports_only_its_own_framework(name):
    backend_or_skip(name)  # a missing framework skips, or fails when required
    info = KNOWN_BACKENDS[name]
    own = {info.framework} if info.framework in FRAMEWORKS else set()
    allowed = own | set().union(*(ALSO_LOADED_BY.get(f, set()) for f in own))
    loaded = loaded_frameworks(f"import {info.module}")
    assert own <= loaded, f"{info.module} did not load {own}"
    assert loaded <= allowed, f"{info.module} also loaded {sorted(loaded - allowed)}"


@pytest.mark.parametrize(("module", "loads_flax"), [("bnref.jax", False), ("bnref.jax.flax", True)],
                         ids=["bnref.jax", "bnref.jax.flax"])
def test_flax_is_loaded_only_by_the_opt_in_bnref_jax_flax(module, loads_flax):
    backend_or_skip("jax")
    if loads_flax:
        pytest.importorskip("flax")
    loaded = loaded_frameworks(f"import {module}")
    assert ("flax" in loaded) is loads_flax, f"import {module} loaded {sorted(loaded)}"
    assert loaded <= {"jax", "flax"}, f"import {module} also loaded {sorted(loaded)}"
