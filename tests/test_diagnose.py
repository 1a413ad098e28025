"""bnref.testing.diagnose: each classic mistake is named, correct implementations conform.

The implementations under diagnosis are small numpy functions written here, one switch per
mistake; bnref's own backends must conform to every convention (no false alarm).
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from bnref.conventions import CONVENTIONS, DEFAULT
from bnref.testing import Backend
from bnref.testing.diagnose import MISTAKES, diagnose
from bnref.testing.fixtures import backend_or_skip


def make_batch_norm(convention: str = "torch", bug: str | tuple[str, ...] = (), *,
                    wrong_eps: float = 1e-2, float32_constants: bool = False):
    """A plain numpy batch norm of ``convention``, with the mistakes named in ``bug``
    (``eps-default`` uses ``wrong_eps``); ``float32_constants`` rounds eps and momentum to
    float32 first, as ONNX attributes and some kernels do."""
    bugs = {bug} if isinstance(bug, str) else set(bug)
    assert bugs <= set(MISTAKES), bugs - set(MISTAKES)
    conv = CONVENTIONS[convention]

    def batch_norm(x, gamma, beta, running_mean, running_var, *, training, momentum=DEFAULT,
                   eps=None, axis=None, convention=convention):
        if momentum is DEFAULT:
            momentum = 0.01 if "momentum-default" in bugs else conv.default_momentum
        if eps is None:
            eps = wrong_eps if "eps-default" in bugs else conv.default_eps
        if float32_constants:
            eps, momentum = float(np.float32(eps)), float(np.float32(momentum))
        if axis is None:
            axis = -conv.default_axis if "channel-axis" in bugs else conv.default_axis
        dtype = np.float64 if x.dtype == np.float64 else np.float32
        xm = np.moveaxis(x.astype(dtype), axis, -1)
        reduce = tuple(range(xm.ndim - 1))
        n = xm.size // xm.shape[-1]
        mean = xm.mean(reduce)
        if "one-pass-variance" in bugs:
            var = (xm * xm).mean(reduce) - mean * mean
        else:
            var = ((xm - mean) ** 2).mean(reduce)
        use_batch = training or "eval-uses-batch-stats" in bugs
        m, v = (mean, var) if use_batch else (running_mean.astype(dtype),
                                              running_var.astype(dtype))
        sigma = np.sqrt(v) + eps if "eps-outside-sqrt" in bugs else np.sqrt(v + eps)
        y = gamma.astype(dtype) * (xm - m) / sigma + beta.astype(dtype)
        new_mean, new_var = running_mean.copy(), running_var.copy()
        if training or "eval-moves-stats" in bugs:
            weights = conv.momentum_weights
            if "momentum-other-term" in bugs:
                weights = "old" if weights == "new" else "new"
            w = momentum if weights == "new" else 1.0 - momentum
            unbiased = conv.unbiased_running_var != ("running-var-bias" in bugs)
            feed = var * n / (n - 1) if unbiased else var
            new_mean = ((1 - w) * running_mean + w * mean).astype(running_mean.dtype)
            new_var = ((1 - w) * running_var + w * feed).astype(running_var.dtype)
        return np.moveaxis(y, -1, axis).astype(x.dtype), new_mean, new_var

    return batch_norm


class FunctionBackend(Backend):
    """A numpy function declared as one convention (the way a user's adapter would be)."""

    def __init__(self, function, conventions=("torch",), **declarations) -> None:
        self.function = function
        self.conventions = conventions
        for key, value in declarations.items():
            setattr(self, key, value)

    def batch_norm(self, x, gamma, beta, running_mean, running_var, **kwargs):
        return self.function(x, gamma, beta, running_mean, running_var, **kwargs)


class _Layer:
    def __init__(self, function, config) -> None:
        self.function, self.config, self.stats = function, config, {}

    def load_state(self, state) -> None:
        self.stats = {key: np.array(value) for key, value in state.items()}

    def state(self):
        return dict(self.stats)

    def forward(self, x, training):
        s, c = self.stats, self.config
        kwargs = {} if c.momentum is DEFAULT else {"momentum": c.momentum}
        y, s["running_mean"], s["running_var"] = self.function(
            x, s["gamma"], s["beta"], s["running_mean"], s["running_var"], training=training,
            eps=c.eps, axis=c.axis, **kwargs)
        return y


class LayerOnlyBackend(FunctionBackend):
    """Only a layer: ``batch_norm`` is not implemented."""

    def batch_norm(self, *args, **kwargs):
        raise NotImplementedError("layer only")

    def make_layer(self, config):
        return _Layer(self.function, config)


@pytest.mark.parametrize("convention", list(CONVENTIONS))
def test_a_correct_implementation_conforms(convention):
    result = diagnose(FunctionBackend(make_batch_norm(convention), (convention,)))
    assert result.conforms and result.fits and result.findings == (), result.text
    assert result.text.startswith("backend 'custom' conforms to convention " + convention)


@pytest.mark.parametrize("mistake", list(MISTAKES))
@pytest.mark.parametrize("convention", list(CONVENTIONS))
def test_each_mistake_is_named(convention, mistake):
    result = diagnose(FunctionBackend(make_batch_norm(convention, mistake), (convention,)))
    assert result.fits and not result.conforms, result.text
    assert result.findings == (mistake,), result.text
    assert result.behaves_like == convention
    assert f"behaves like convention {convention} except that" in result.text


def test_two_mistakes_are_both_named():
    bugs = ("momentum-other-term", "running-var-bias")
    result = diagnose(FunctionBackend(make_batch_norm("torch", bugs)))
    assert result.findings == bugs, result.text
    assert "weights the old value" in result.text and "biased" in result.text


def test_three_mistakes_are_named():
    bugs = ("running-var-bias", "eps-outside-sqrt", "eval-moves-stats")
    result = diagnose(FunctionBackend(make_batch_norm("torch", bugs)))
    assert result.findings == bugs, result.text


def test_the_texts_words():
    result = diagnose(FunctionBackend(make_batch_norm("torch", "momentum-other-term")))
    assert result.text == (
        "backend 'custom' behaves like convention torch except that its momentum weights the "
        "old value (m*old + (1-m)*batch, as Keras/Flax/MXNet write it).")
    result = diagnose(FunctionBackend(make_batch_norm("keras", "eps-default"), ("keras",)))
    assert "its eps is 0.01 instead of 0.001 when not passed" in result.text
    # keras with eps 1e-5 is also flax's defaults: the declared convention wins the tie
    result = diagnose(FunctionBackend(make_batch_norm("keras", "eps-default", wrong_eps=1e-5),
                                      ("keras",)))
    assert result.text == ("backend 'custom' behaves like convention keras except that its "
                           "eps is 1e-05 instead of 0.001 when not passed.")


@pytest.mark.parametrize("convention", ["torch", "keras", "mxnet"])
def test_float32_constants_are_no_mistake(convention):
    function = make_batch_norm(convention, float32_constants=True)
    result = diagnose(FunctionBackend(function, (convention,)))
    assert result.conforms, result.text


@pytest.mark.parametrize("other", ["keras", "flax", "mxnet"])
def test_another_convention_is_recognised(other):
    backend = FunctionBackend(make_batch_norm(other), ("torch",))
    result = diagnose(backend)
    assert result.fits and not result.conforms
    assert result.behaves_like == other and result.findings == ("other-convention",)
    assert f"behaves like convention {other} (" in result.text
    assert "rather than the declared torch" in result.text


def test_another_convention_with_a_mistake():
    """The issue's example: keras defaults, but the running variance is unbiased."""
    backend = FunctionBackend(make_batch_norm("keras", "running-var-bias"), ("torch",))
    result = diagnose(backend)
    assert result.behaves_like == "keras"
    assert result.findings == ("other-convention", "running-var-bias"), result.text
    assert "eps 0.001" in result.text and "its running variance is unbiased" in result.text


def test_a_hopeless_implementation_fits_nothing():
    def identity(x, gamma, beta, running_mean, running_var, **kwargs):
        return x.copy(), running_mean.copy(), running_var.copy()

    result = diagnose(FunctionBackend(identity))
    assert not result.fits and not result.conforms and result.findings == ()
    assert result.text.startswith("No hypothesis explains backend 'custom': against convention "
                                  "torch, y in training is off by up to")
    assert "y in inference is off" in result.text and "The closest hypothesis is" in result.text
    training = next(name for name in result.details["declared_errors"] if "training" in name)
    assert result.details["declared_errors"][training]["y in training"]["ratio"] > 1


def test_refused_probes_are_recorded_and_left_out():
    correct = make_batch_norm("torch")

    def no_float32(x, *args, **kwargs):
        if x.dtype == np.float32:
            raise TypeError("float64 only")
        return correct(x, *args, **kwargs)

    result = diagnose(FunctionBackend(no_float32))
    assert result.conforms, result.text
    assert list(result.details["refused"].values()) == ["TypeError: float64 only"]
    assert "Refused probe 'training, float32" in result.text


def test_every_probe_refused():
    def refuse(*args, **kwargs):
        raise ValueError("no")

    result = diagnose(FunctionBackend(refuse))
    assert not result.fits and "refused every probe" in result.text


@pytest.mark.parametrize("declarations, not_tested", [
    ({"fixed_eps": 1e-3}, {"eps-default"}),
    ({"fixed_momentum": 0.5}, {"momentum-default", "momentum-other-term"}),
    ({"channel_axis": 1}, set()),  # still tested: the probes omit the axis
    ({"ranks": (2, 2)}, {"channel-axis"}),
    ({"dtypes": ("float64",)}, {"one-pass-variance"}),
    ({"dtypes": ("float32",)}, set()),
], ids=["fixed-eps", "fixed-momentum-half", "channel-axis", "rank-2", "float64-only",
        "float32-only"])
def test_probes_stay_inside_the_declarations(declarations, not_tested):
    calls = []
    correct = make_batch_norm("torch")

    def recording(x, *args, **kwargs):
        calls.append((x.ndim, x.dtype.name, kwargs))
        return correct(x, *args, **kwargs)

    backend = FunctionBackend(recording, **declarations)
    result = diagnose(backend)
    assert result.conforms, result.text
    assert set(result.details["not_tested"]) == not_tested
    low, high = backend.ranks
    for ndim, dtype, kwargs in calls:
        assert low <= ndim <= high and dtype in backend.dtypes
        for name in ("eps", "momentum"):
            if getattr(backend, f"fixed_{name}") is not None:
                assert kwargs[name] == getattr(backend, f"fixed_{name}")
        if backend.channel_axis is not None:
            assert kwargs["axis"] in (None, backend.channel_axis)


def test_a_fixed_eps_still_shows_its_placement():
    function = make_batch_norm("torch", "eps-outside-sqrt")
    result = diagnose(FunctionBackend(function, fixed_eps=1e-5))
    assert result.findings == ("eps-outside-sqrt",), result.text


def test_one_pass_variance_is_detectable_in_float32():
    """The float32 probe is built so that E[x²]−E[x]² cancels catastrophically (offsets 1e4
    to 3e4, spreads 10 to 30): far outside the two-pass tolerance, inside the one-pass band."""
    result = diagnose(FunctionBackend(make_batch_norm("torch", "one-pass-variance")))
    assert result.findings == ("one-pass-variance",), result.text
    probe = next(name for name in result.details["errors"] if "float32" in name)
    assert result.details["declared_errors"][probe]["running var"]["ratio"] > 10
    assert max(e["ratio"] for e in result.details["errors"][probe].values()) <= 1


def test_one_pass_variance_is_harmless_at_small_offsets():
    backend = FunctionBackend(make_batch_norm("torch", "one-pass-variance"),
                              dtypes=("float64",))
    result = diagnose(backend)
    assert result.conforms and "one-pass-variance" in result.details["not_tested"]


@pytest.mark.parametrize("mistake", [None, "momentum-other-term", "eps-default"],
                         ids=["correct", "momentum-other-term", "eps-default"])
def test_a_layer_only_backend(mistake):
    backend = LayerOnlyBackend(make_batch_norm("torch", mistake or ()))
    assert "make_layer" in backend.capabilities
    result = diagnose(backend)
    assert result.details["mode"] == "layer"
    assert result.findings == ((mistake,) if mistake else ()), result.text


def test_the_convention_must_be_declared():
    with pytest.raises(ValueError, match="not one the backend declares"):
        diagnose(FunctionBackend(make_batch_norm("torch")), "keras")


def test_diagnose_is_fast_for_numpy_functions():
    backend = FunctionBackend(make_batch_norm("torch", "running-var-bias"))
    start = time.perf_counter()
    diagnose(backend)
    assert time.perf_counter() - start < 1.0


def test_importing_diagnose_imports_no_framework():
    code = ("import sys, bnref.testing.diagnose; "
            "print(sorted({'torch', 'jax', 'tensorflow', 'mxnet', 'hypothesis'} "
            "& set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("convention", list(CONVENTIONS))
@pytest.mark.parametrize("name", ["numpy", "torch", "jax", "tf", "mxnet"])
def test_bnref_backends_conform(name, convention):
    backend = backend_or_skip(name)
    start = time.perf_counter()
    result = diagnose(backend, convention)
    print(f"diagnose({name}, {convention}): {time.perf_counter() - start:.3f} s")
    assert result.conforms, result.text
    assert result.details["refused"] == {}


def test_flax_fast_variance_is_diagnosed_as_one_pass():
    """Flax's own BatchNorm with its default use_fast_variance=True (E[x²]−E[x]²)."""
    backend_or_skip("jax")  # enables float64 in JAX
    import jax.numpy as jnp
    from flax import nnx

    class NnxLayer:
        def __init__(self, config, fast):
            conv = CONVENTIONS[config.convention]
            self.module = nnx.BatchNorm(
                config.num_features, axis=conv.default_axis if config.axis is None else config.axis,
                momentum=conv.default_momentum if config.momentum is DEFAULT else config.momentum,
                epsilon=conv.default_eps if config.eps is None else config.eps,
                use_fast_variance=fast, rngs=nnx.Rngs(0))

        def _slots(self):
            m = self.module
            return {"gamma": m.scale, "beta": m.bias, "running_mean": m.mean, "running_var": m.var}

        def load_state(self, state):
            for name, slot in self._slots().items():
                slot.value = jnp.asarray(state[name], slot.value.dtype)

        def state(self):
            return {name: np.asarray(slot.value) for name, slot in self._slots().items()}

        def forward(self, x, training):
            return np.asarray(self.module(jnp.asarray(x), use_running_average=not training))

    class FlaxBackend(Backend):
        conventions = ("flax",)
        dtypes = ("float32",)  # nnx keeps float32 statistics

        def __init__(self, fast):
            self.fast = fast

        def make_layer(self, config):
            return NnxLayer(config, self.fast)

    assert diagnose(FlaxBackend(fast=False)).conforms
    result = diagnose(FlaxBackend(fast=True))
    assert result.findings == ("one-pass-variance",), result.text
