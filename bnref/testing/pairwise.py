"""Pairwise equivalence: the same drawn case through two backends, compared with each other
directly (not each with the oracle) -- forward outputs and running statistics, gradients, and
layer trajectories followed by inference.

The ``pair`` fixture (see :mod:`bnref.testing.fixtures`) gives two backends; cases are drawn
from what both support (shared dtypes and conventions, a shape pool when either compiles per
shape). Both sides are within the bound of the exact result, so they may differ by twice it:
the comparisons reuse the built-in checks, with the second backend in the built-in's place.
"""

from __future__ import annotations

from typing import Any

from bnref.testing.backends import Backend, Builtin, LayerBuiltin
from bnref.testing.checks import check_builtin, check_builtin_gradients, check_layer
from bnref.testing.strategies import bn_cases, layer_cases, with_dy
from bnref.testing.suite import assert_all, property_test

__all__ = ["as_builtin", "as_layer_builtin", "shared_cases",
           "test_pair_forward_agrees", "test_pair_gradients_agree", "test_pair_layers_agree"]


def as_builtin(other: Backend) -> Builtin:
    """Another backend's ``batch_norm`` and gradients, in a built-in's place."""
    def gradients(x, gamma, beta, dy, *, eps, axis):
        return other.gradients(x, gamma, beta, dy, eps=eps, axis=axis)

    return Builtin(other.name, other.run_batch_norm, cases={}, gradients=gradients)


def as_layer_builtin(other: Backend) -> LayerBuiltin:
    """Another backend's native layer, in a built-in layer's place."""
    return LayerBuiltin(other.name, other.make_layer, cases={})


def shared_cases(a: Backend, b: Backend) -> dict[str, Any]:
    """``bn_cases``/``layer_cases`` restrictions both backends accept."""
    return {"dtypes": tuple(d for d in a.dtypes if d in b.dtypes),
            "conventions": tuple(c for c in a.conventions if c in b.conventions),
            "shapes": a.shape_pool or b.shape_pool}


@property_test
def test_pair_forward_agrees(pair: tuple[Backend, Backend], data) -> None:
    """Outputs and new running statistics of one call agree between the two backends."""
    a, b = pair
    case = data.draw(bn_cases(**shared_cases(a, b)), label="case")
    assert_all(check_builtin(a, as_builtin(b), case, check="pair"), case)


@property_test
def test_pair_gradients_agree(pair: tuple[Backend, Backend], data) -> None:
    """Training-mode dx, dgamma and dbeta agree between the two backends."""
    a, b = pair
    case, dy = data.draw(with_dy(bn_cases(**shared_cases(a, b), training=True)),
                         label="case and dy")
    assert_all(check_builtin_gradients(a, as_builtin(b), case, dy, check="pair gradients"),
               case)


@property_test
def test_pair_layers_agree(pair: tuple[Backend, Backend], data) -> None:
    """The two native layers, fed the same batches from the same state, agree step by step:
    outputs, running statistics (and batch counters), then inference."""
    a, b = pair
    case = data.draw(layer_cases(**shared_cases(a, b)), label="layer case")
    assert_all(check_layer(a, case, check="pair layer", reference=as_layer_builtin(b)), case)
