"""bnref.torch tested the way PyTorch tests its own layers: every ``module_db`` input of
``torch.nn.BatchNorm1d/2d/3d`` and every ``op_db`` sample of ``nn.functional.batch_norm``,
run through the built-in and through bnref side by side.

Layers: each ModuleInput (float32/float64, train/eval) in three layouts (contiguous, a strided
slice, channels_last for 4-D and 5-D), from the built-in's randomised state loaded into
bnref's layer, for two steps: outputs, ``dx``/``dweight``/``dbias`` under the same random
``grad_output``, the buffers after each forward, and the memory format of ``y`` and ``dx``.
Where the built-in raises, bnref must raise too. Functional: each OpInfo sample mapped onto
``bnref.torch.batch_norm`` (pure: its returned statistics against F.batch_norm's in-place ones);
a sample outside bnref's contract is skipped with its entry in :data:`DIFFERENCES`, after the
difference itself is checked.

Tolerances come from :mod:`bnref.testing.tolerances`, doubled as every comparison with a
built-in is (both sides are within the bound of the exact result).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import pytest

from bnref.testing.fixtures import backend_or_skip
from bnref.testing.tolerances import (
    ChannelStats,
    assert_close,
    forward_tolerance,
    gradient_tolerances,
    override_factor,
    running_stat_tolerances,
)

backend_or_skip("torch")  # skips this module without torch, fails it when torch is required
import torch  # noqa: E402
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db  # noqa: E402

import bnref.torch as bt  # noqa: E402

DTYPES = {"float32": torch.float32, "float64": torch.float64}
MODES = {"train": True, "eval": False}
STEPS = 2
LAYER_CHECK = "layer:torch.nn.BatchNormNd"
OP_CHECK = "builtin:torch.nn.functional.batch_norm"
GRADIENT_CHECK = "builtin gradients:torch.nn.functional.batch_norm"

# Inputs of module_db / op_db that lie outside bnref.torch's contract on purpose. Each skip
# first checks that the difference is exactly the one described.
DIFFERENCES = {
    "rank": (
        "bnref takes x of rank 2 to 5 (N, C, *spatial) and raises ValueError for any other "
        "rank; F.batch_norm also runs a rank-1 input (op_db's empty (0,) samples give an "
        "empty output)"
    ),
    "momentum_range": (
        "bnref requires momentum in [0, 1] in every mode and raises ValueError otherwise; "
        "F.batch_norm takes any float: a negative momentum extrapolates the running statistics "
        "in training and is ignored in inference (the inference samples are compared without "
        "it by test_op_db_inference_sample_without_momentum)"
    ),
    "eps_zero_in_inference": (
        "bnref requires eps > 0 in every mode and its layers raise ValueError at construction; "
        "torch's layers refuse eps <= 0 only in training and eps < 0 in inference, so "
        "module_db's eps=0.0 error input runs in eval mode"
    ),
    "inference_without_running_stats": (
        "F.batch_norm raises in inference without running statistics; bnref normalises with "
        "the batch statistics, as nn.BatchNorm*d(track_running_stats=False) does"
    ),
}


# ---------------------------------------------------------------- shared helpers


def _seed(test_id: str) -> int:
    return zlib.crc32(test_id.encode())


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().cpu().numpy()


def _formats(t: torch.Tensor) -> dict[str, bool]:
    """Which memory formats ``t`` satisfies (a size-1 axis may make it satisfy several)."""
    formats = {"contiguous": torch.contiguous_format}
    if t.dim() == 4:
        formats["channels_last"] = torch.channels_last
    elif t.dim() == 5:
        formats["channels_last_3d"] = torch.channels_last_3d
    return {name: t.is_contiguous(memory_format=f) for name, f in formats.items()}


def _assert_same_layout(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    assert ours.dtype == theirs.dtype, f"{what}: dtype {ours.dtype}, built-in {theirs.dtype}"
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape}, built-in {theirs.shape}"
    assert _formats(ours) == _formats(theirs), (
        f"{what}: memory format {_formats(ours)} (strides {ours.stride()}), built-in "
        f"{_formats(theirs)} (strides {theirs.stride()})")


# Exceptions of these types are "the same refusal": torch's layers raise either for bad
# arguments and shapes; bnref raises ValueError for both.
_REFUSALS = (ValueError, RuntimeError)


def _assert_refuses_like(theirs: BaseException, call, what: str) -> None:
    """``call()`` must raise where the built-in raised ``theirs`` (types compared loosely)."""
    expected = _REFUSALS if isinstance(theirs, _REFUSALS) else type(theirs)
    try:
        call()
    except expected:
        return
    except Exception as ours:
        pytest.fail(f"{what}: bnref raised {type(ours).__name__}: {ours}; the built-in raised "
                    f"{type(theirs).__name__}: {theirs}")
    pytest.fail(f"{what}: bnref accepted what the built-in refuses with "
                f"{type(theirs).__name__}: {theirs}")


def _inference_gradient_tolerances(x, dy, *, gamma, running_mean, running_var, eps,
                                   param_dtype, factor):
    """Bounds on eval-mode gradients (normalised with the running statistics), built from
    tolerances.py's bounds, which cover only the batch-statistics backward:

    * ``dx = dy * gamma / sqrt(running_var + eps)`` is the inference forward applied to ``dy``
      with a zero mean and no shift: :func:`forward_tolerance` of exactly that;
    * ``dbeta = sum(dy)``: the dbeta bound of :func:`gradient_tolerances` (it reads only dy);
    * ``dgamma = sum(dy * xhat)``, ``xhat = (x - running_mean) / sigma``: ``n * max|dy|``
      times the bound on ``xhat`` (the inference forward with gamma 1, no beta), plus the
      rounding of a sum of ``n`` terms of size ``max|dy| * max|xhat|`` (the dbeta bound
      applied to ``dy * max|xhat|``).
    """
    axis = 1
    zeros = np.zeros_like(running_mean)
    tol_dx = forward_tolerance(dy, axis, gamma=gamma, beta=None, eps=eps, mean=zeros,
                               var=running_var, batch_stats=False, factor=factor)
    _, _, tol_dbeta = gradient_tolerances(x, dy, axis, gamma=gamma, eps=eps,
                                          param_dtype=param_dtype, factor=factor)
    stats = ChannelStats.of(x, axis)
    sigma = np.sqrt(np.asarray(running_var, np.float64) + eps)
    x_hat_max = (stats.max_abs + np.abs(np.asarray(running_mean, np.float64))) / sigma
    shape = [1] * x.ndim
    shape[axis] = -1
    x_hat_tol = forward_tolerance(x, axis, gamma=None, beta=None, eps=eps, mean=running_mean,
                                  var=running_var, batch_stats=False, factor=factor)
    dy_max = ChannelStats.of(dy, axis).max_abs
    _, _, sum_tol = gradient_tolerances(x, dy * x_hat_max.reshape(shape), axis, gamma=gamma,
                                        eps=eps, param_dtype=param_dtype, factor=factor)
    tol_dgamma = stats.count * dy_max * x_hat_tol.reshape(-1) + sum_tol
    return tol_dx, tol_dgamma, tol_dbeta


def _gradient_tolerances(x, dy, *, gamma, running_mean, running_var, eps, batch_stats,
                         param_dtype):
    factor = 2 * override_factor("torch", x.dtype.name, GRADIENT_CHECK)
    if batch_stats:
        return gradient_tolerances(x, dy, 1, gamma=gamma, eps=eps, param_dtype=param_dtype,
                                   factor=factor)
    return _inference_gradient_tolerances(x, dy, gamma=gamma, running_mean=running_mean,
                                          running_var=running_var, eps=eps,
                                          param_dtype=param_dtype, factor=factor)


def _forward_tolerance(x, *, gamma, beta, eps, running_mean, running_var, batch_stats, check):
    factor = 2 * override_factor("torch", x.dtype.name, check)
    if batch_stats:
        stats = ChannelStats.of(x, 1)
        mean, var = stats.mean, stats.var
    else:
        mean, var = running_mean, running_var
    return forward_tolerance(x, 1, gamma=gamma, beta=beta, eps=eps, mean=mean, var=var,
                             batch_stats=batch_stats, factor=factor)


def _compare_gradients(ours, theirs, tolerances, names, empty: bool) -> None:
    for name, a, b, tol in zip(names, ours, theirs, tolerances, strict=True):
        if a is None or b is None:
            assert a is None and b is None, f"{name}: bnref {a is None}, built-in {b is None}"
            continue
        _assert_same_layout(a, b, name)
        assert_close(_np(a), _np(b), 0.0 if empty else tol, f"{name} vs built-in")


# ---------------------------------------------------------------- module_db: the layers

BUILTIN_TO_OURS = {
    torch.nn.BatchNorm1d: bt.BatchNorm1d,
    torch.nn.BatchNorm2d: bt.BatchNorm2d,
    torch.nn.BatchNorm3d: bt.BatchNorm3d,
}
MODULE_INFOS = {info.module_cls.__name__: info for info in module_db
                if info.module_cls in BUILTIN_TO_OURS}


def _module_inputs(info, dtype: torch.dtype, training: bool, error: bool = False):
    func = info.module_error_inputs_func if error else info.module_inputs_func
    return list(func(info, device="cpu", dtype=dtype, requires_grad=True, training=training))


def _layouts(ndim: int) -> list[str]:
    extra = {4: ["channels_last"], 5: ["channels_last_3d"]}.get(ndim, [])
    return ["contiguous", "strided", *extra]


@dataclass(frozen=True)
class ModuleCase:
    cls_name: str
    dtype: str
    mode: str
    layout: str
    index: int

    @property
    def id(self) -> str:
        return f"{self.cls_name}-{self.dtype}-{self.mode}-{self.layout}-case{self.index}"


def _module_cases() -> list:
    """Every (class, dtype, mode, layout, input): the inputs are tiny tensors, made once here
    for their count, rank and description only; each test makes its own, seeded."""
    params = []
    for cls_name, info in MODULE_INFOS.items():
        for dtype_name, dtype in DTYPES.items():
            for mode, training in MODES.items():
                for index, module_input in enumerate(_module_inputs(info, dtype, training)):
                    ndim = module_input.forward_input.args[0].dim()
                    desc = module_input.desc or "default"
                    for layout in _layouts(ndim):
                        case = ModuleCase(cls_name, dtype_name, mode, layout, index)
                        params.append(pytest.param(case, id=f"{case.id}-{desc}"))
    return params


def _in_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A leaf copy of ``x`` (same values) in ``layout``, requiring grad."""
    x = x.detach()
    if layout == "contiguous":
        out = x.clone(memory_format=torch.contiguous_format)
    elif layout == "strided":  # every other element of a buffer twice as wide
        base = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        out = base[..., ::2]
        out.copy_(x)
        assert x.numel() == 0 or not out.is_contiguous()
    else:
        out = x.clone(memory_format=getattr(torch, layout))
    return out.requires_grad_()


def _randomise_state(module: torch.nn.Module) -> None:
    """Parameters and running statistics away from their 1/0 initial values (so a swapped or
    ignored one shows), and a batch count for the cumulative average to continue from."""
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean"):
            tensor = getattr(module, name)
            if tensor is not None:
                tensor.copy_(torch.randn_like(tensor))
        if module.running_var is not None:
            module.running_var.copy_(torch.rand_like(module.running_var) * 2 + 0.5)
            module.num_batches_tracked.fill_(int(torch.randint(0, 5, ())))


def _step(module: torch.nn.Module, x: torch.Tensor, dy_seed: int):
    """Forward, then the gradients w.r.t. x and the parameters under a seeded grad_output."""
    y = module(x)
    generator = torch.Generator().manual_seed(dy_seed)
    # grad_output in y's memory format, as PyTorch's own memory-format tests pass it.
    dy = torch.empty_like(y).copy_(torch.randn(y.shape, generator=generator, dtype=y.dtype))
    params = [p for p in (module.weight, module.bias) if p is not None]
    grads = torch.autograd.grad(y, [x, *params], dy)
    named = dict(zip(("x", *(n for n in ("weight", "bias") if getattr(module, n) is not None)),
                     grads, strict=True))
    return y, dy, (named.get("x"), named.get("weight"), named.get("bias"))


@pytest.mark.parametrize("case", _module_cases())
def test_module_db_input(case: ModuleCase):
    info = MODULE_INFOS[case.cls_name]
    dtype, training = DTYPES[case.dtype], MODES[case.mode]
    seed = _seed(case.id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module_input = _module_inputs(info, dtype, training)[case.index]
        args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
        shape = module_input.forward_input.args[0].shape
        batches = [module_input.forward_input.args[0].detach(),
                   *(torch.testing.make_tensor(shape, dtype=dtype, device="cpu")
                     for _ in range(STEPS - 1))]
        try:
            builtin = info.module_cls(*args, **kwargs).to(dtype)
        except Exception as theirs:
            _assert_refuses_like(theirs, lambda: BUILTIN_TO_OURS[info.module_cls](
                *args, **kwargs)(_in_layout(batches[0], case.layout)), "construction")
            return
        _randomise_state(builtin)
    ours = BUILTIN_TO_OURS[info.module_cls](*args, **kwargs).to(dtype)
    ours.load_state_dict(builtin.state_dict())
    builtin.train(training)
    ours.train(training)

    tracking = builtin.running_mean is not None
    mean_err = var_err = 0.0
    for step, batch in enumerate(batches, start=1):
        label = f"step {step}"
        x_theirs, x_ours = _in_layout(batch, case.layout), _in_layout(batch, case.layout)
        old = {k: _np(v).copy() for k, v in builtin.state_dict().items()
               if k in ("running_mean", "running_var")}
        try:
            y_theirs, dy, grads_theirs = _step(builtin, x_theirs, seed + step)
        except Exception as theirs:
            _assert_refuses_like(theirs, lambda x=x_ours, s=seed + step: _step(ours, x, s), label)
            return
        y_ours, _, grads_ours = _step(ours, x_ours, seed + step)

        x_np, dy_np = _np(batch), _np(dy)
        empty = batch.numel() == 0
        gamma, beta = _np(builtin.weight), _np(builtin.bias)
        batch_stats = training or not tracking
        _assert_same_layout(y_ours, y_theirs, f"{label} y")
        y_tol = 0.0 if empty else _forward_tolerance(
            x_np, gamma=gamma, beta=beta, eps=builtin.eps, running_mean=old.get("running_mean"),
            running_var=old.get("running_var"), batch_stats=batch_stats, check=LAYER_CHECK)
        assert_close(_np(y_ours), _np(y_theirs), y_tol, f"{label} y vs built-in")

        grad_tols = (0.0, 0.0, 0.0) if empty else _gradient_tolerances(
            x_np, dy_np, gamma=gamma, running_mean=old.get("running_mean"),
            running_var=old.get("running_var"), eps=builtin.eps, batch_stats=batch_stats,
            param_dtype=case.dtype)
        _compare_gradients(grads_ours, grads_theirs, grad_tols,
                           [f"{label} d{n}" for n in ("x", "weight", "bias")], empty)

        theirs_state, ours_state = builtin.state_dict(), ours.state_dict()
        assert set(ours_state) == set(theirs_state)
        for name in ("weight", "bias"):
            if name in theirs_state:
                assert torch.equal(ours_state[name], theirs_state[name]), f"{name} changed"
        if not tracking:
            continue
        assert int(ours.num_batches_tracked) == int(builtin.num_batches_tracked), (
            f"{label} num_batches_tracked: bnref {int(ours.num_batches_tracked)}, built-in "
            f"{int(builtin.num_batches_tracked)}")
        if training and not empty:
            weight = (1.0 / int(builtin.num_batches_tracked) if builtin.momentum is None
                      else builtin.momentum)
            step_mean, step_var = running_stat_tolerances(
                x_np, 1, old_mean=old["running_mean"], old_var=old["running_var"],
                new_value_weight=weight, stat_dtype=case.dtype,
                factor=2 * override_factor("torch", case.dtype, LAYER_CHECK))
            mean_err, var_err = mean_err + step_mean, var_err + step_var
        for name, tol in (("running_mean", mean_err), ("running_var", var_err)):
            assert ours_state[name].dtype == theirs_state[name].dtype
            assert_close(_np(ours_state[name]), _np(theirs_state[name]), tol,
                         f"{label} {name} vs built-in")


def _error_cases() -> list:
    params = []
    for cls_name, info in MODULE_INFOS.items():
        if info.module_error_inputs_func is None:
            continue
        for dtype_name, dtype in DTYPES.items():
            for mode, training in MODES.items():
                for index, _ in enumerate(_module_inputs(info, dtype, training, error=True)):
                    params.append(pytest.param(
                        cls_name, dtype_name, mode, index,
                        id=f"{cls_name}-{dtype_name}-{mode}-error{index}"))
    return params


@pytest.mark.parametrize(("cls_name", "dtype_name", "mode", "index"), _error_cases())
def test_module_db_error_input(cls_name, dtype_name, mode, index):
    """module_db's error inputs: the built-in raises as declared, and bnref refuses too
    (at construction or in the forward: bnref validates its arguments in the constructor)."""
    info, training = MODULE_INFOS[cls_name], MODES[mode]
    error_input = _module_inputs(info, DTYPES[dtype_name], training, error=True)[index]
    module_input = error_input.module_error_input
    args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
    x = module_input.forward_input.args[0]

    def run(cls):
        module = cls(*args, **kwargs).to(DTYPES[dtype_name])
        if error_input.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
            return module
        return module.train(training)(x)

    try:
        run(info.module_cls)
    except Exception as theirs:
        # The declared type; not the regex: in eval the built-in words it differently
        # ("eps must be non-negative" where module_db expects "eps must be positive").
        assert isinstance(theirs, error_input.error_type), repr(theirs)
        _assert_refuses_like(theirs, lambda: run(BUILTIN_TO_OURS[info.module_cls]),
                             str(error_input.error_on))
        return
    # The built-in accepts it: only eps == 0 in inference, which bnref refuses on purpose.
    assert kwargs.get("eps") == 0.0 and not training, "the built-in accepted an error input"
    with pytest.raises(ValueError, match="eps must be a finite float > 0"):
        run(BUILTIN_TO_OURS[info.module_cls])
    pytest.skip(DIFFERENCES["eps_zero_in_inference"])


# ---------------------------------------------------------------- op_db: the function

BATCH_NORM_OP = next(op for op in op_db
                     if op.name == "nn.functional.batch_norm" and not op.variant_test_name)


@dataclass(frozen=True)
class OpSample:
    x: torch.Tensor
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    training: bool
    momentum: float
    eps: float


def _op_samples(dtype: torch.dtype) -> list[OpSample]:
    samples = []
    for sample in BATCH_NORM_OP.sample_inputs("cpu", dtype, requires_grad=True):
        running_mean, running_var, weight, bias = sample.args
        # F.batch_norm's defaults: training=False, momentum=0.1, eps=1e-5.
        kwargs = {"training": False, "momentum": 0.1, "eps": 1e-5, **sample.kwargs}
        samples.append(OpSample(sample.input, running_mean, running_var, weight, bias,
                                **kwargs))
    return samples


def _op_id(dtype_name: str, index: int, sample: OpSample) -> str:
    shape = "x".join(map(str, sample.x.shape))
    mode = "train" if sample.training else "eval"
    stats = "" if sample.running_mean is not None else "-no_running_stats"
    return f"{dtype_name}-sample{index}-{shape}-{mode}{stats}"


def _op_cases(select=None) -> list:
    params = []
    for dtype_name, dtype in DTYPES.items():
        for index, sample in enumerate(_op_samples(dtype)):
            if select is None or select(sample):
                params.append(pytest.param(dtype_name, index,
                                           id=_op_id(dtype_name, index, sample)))
    return params


def _difference(sample: OpSample) -> str | None:
    """The DIFFERENCES key that puts ``sample`` outside bnref's contract, if any."""
    if not 2 <= sample.x.dim() <= 5:
        return "rank"
    if not 0.0 <= sample.momentum <= 1.0:
        return "momentum_range"
    if not sample.training and sample.running_mean is None:
        return "inference_without_running_stats"
    return None


def _leaf(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().clone().requires_grad_(t.requires_grad)


def _copy(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().clone()


def _ours(sample: OpSample, x, weight, bias, running_mean, running_var, **overrides):
    kwargs = {"training": sample.training, "momentum": sample.momentum, "eps": sample.eps,
              **overrides}
    return bt.batch_norm(x, weight, bias, running_mean, running_var, **kwargs)


def _check_difference(key: str, sample: OpSample) -> None:
    """The difference ``key`` describes is the one that happens."""
    args = (_copy(sample.x), _copy(sample.weight), _copy(sample.bias),
            _copy(sample.running_mean), _copy(sample.running_var))
    if key == "rank":
        with pytest.raises(ValueError, match="x must have rank 2 to 5"):
            _ours(sample, *args)
    elif key == "momentum_range":
        with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
            _ours(sample, *args)
    elif key == "inference_without_running_stats":
        with pytest.raises((ValueError, RuntimeError)):
            torch.nn.functional.batch_norm(sample.x, None, None, training=False)
        y = _ours(sample, *args)[0]
        assert y.shape == sample.x.shape
    # torch itself must run the sample (only the "inference without statistics" one raises).
    if key != "inference_without_running_stats":
        torch.nn.functional.batch_norm(
            _copy(sample.x), _copy(sample.running_mean), _copy(sample.running_var),
            _copy(sample.weight), _copy(sample.bias), training=sample.training,
            momentum=sample.momentum, eps=sample.eps)


def _compare_op(sample: OpSample, dtype_name: str, seed: int, **overrides) -> None:
    x_t, w_t, b_t = _leaf(sample.x), _leaf(sample.weight), _leaf(sample.bias)
    rm_t, rv_t = _copy(sample.running_mean), _copy(sample.running_var)
    y_t = torch.nn.functional.batch_norm(x_t, rm_t, rv_t, w_t, b_t, training=sample.training,
                                         momentum=sample.momentum, eps=sample.eps)
    x_o, w_o, b_o = _leaf(sample.x), _leaf(sample.weight), _leaf(sample.bias)
    rm_o, rv_o = _copy(sample.running_mean), _copy(sample.running_var)
    y_o, new_mean, new_var = _ours(sample, x_o, w_o, b_o, rm_o, rv_o, **overrides)

    # Pure: nothing bnref was given moved.
    for name, given, original in (("running_mean", rm_o, sample.running_mean),
                                  ("running_var", rv_o, sample.running_var),
                                  ("x", x_o, sample.x)):
        if given is not None:
            assert torch.equal(given, original), f"bnref modified {name}"

    x_np = _np(sample.x)
    empty = sample.x.numel() == 0
    gamma, beta = _np(sample.weight), _np(sample.bias)
    old_mean, old_var = _np(sample.running_mean), _np(sample.running_var)
    batch_stats = sample.training or sample.running_mean is None
    _assert_same_layout(y_o, y_t, "y")
    y_tol = 0.0 if empty else _forward_tolerance(
        x_np, gamma=gamma, beta=beta, eps=sample.eps, running_mean=old_mean,
        running_var=old_var, batch_stats=batch_stats, check=OP_CHECK)
    assert_close(_np(y_o), _np(y_t), y_tol, "y vs F.batch_norm")

    if sample.running_mean is None:
        assert new_mean is None and new_var is None
    else:
        mean_tol = var_tol = 0.0  # inference: the statistics come back unchanged
        if sample.training and not empty:
            mean_tol, var_tol = running_stat_tolerances(
                x_np, 1, old_mean=old_mean, old_var=old_var, new_value_weight=sample.momentum,
                stat_dtype=dtype_name, factor=2 * override_factor("torch", dtype_name, OP_CHECK))
        for name, ours, theirs, tol in (("running_mean", new_mean, rm_t, mean_tol),
                                        ("running_var", new_var, rv_t, var_tol)):
            assert ours.dtype == theirs.dtype, f"{name} dtype"
            assert_close(_np(ours), _np(theirs), tol, f"{name} vs F.batch_norm's in-place")

    generator = torch.Generator().manual_seed(seed)
    dy = torch.randn(y_t.shape, generator=generator, dtype=y_t.dtype)
    inputs = [(x_t, x_o), (w_t, w_o), (b_t, b_o)]
    wanted = [pair for pair in inputs if pair[0] is not None]
    grads_t = iter(torch.autograd.grad(y_t, [p[0] for p in wanted], dy))
    grads_o = iter(torch.autograd.grad(y_o, [p[1] for p in wanted], dy))
    theirs = [None if t is None else next(grads_t) for t, _ in inputs]
    ours = [None if t is None else next(grads_o) for t, _ in inputs]
    grad_tols = (0.0, 0.0, 0.0) if empty else _gradient_tolerances(
        x_np, _np(dy), gamma=gamma, running_mean=old_mean, running_var=old_var, eps=sample.eps,
        batch_stats=batch_stats, param_dtype=dtype_name)
    _compare_gradients(ours, theirs, grad_tols, ["dx", "dweight", "dbias"], empty)


@pytest.mark.parametrize(("dtype_name", "index"), _op_cases())
def test_op_db_sample(dtype_name, index, request):
    seed = _seed(request.node.callspec.id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sample = _op_samples(DTYPES[dtype_name])[index]
    key = _difference(sample)
    if key is not None:
        _check_difference(key, sample)
        pytest.skip(DIFFERENCES[key])
    _compare_op(sample, dtype_name, seed)


@pytest.mark.parametrize(("dtype_name", "index"), _op_cases(
    lambda s: not s.training and _difference(s) == "momentum_range"))
def test_op_db_inference_sample_without_momentum(dtype_name, index, request):
    """The inference samples skipped for their momentum, with bnref's momentum left out:
    F.batch_norm ignores it in inference, so the results must agree."""
    seed = _seed(request.node.callspec.id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sample = _op_samples(DTYPES[dtype_name])[index]
    _compare_op(sample, dtype_name, seed, momentum=0.1)
