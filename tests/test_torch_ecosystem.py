"""bnref.torch inside PyTorch's own machinery: what a user does to a model with batch-norm
layers (copy it, save it, average it, fuse it, trace it, compile it, export it, transform it
with torch.func, feed it an empty batch) works on bnref's layers as on the built-ins."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import numpy as np
import pytest

from bnref.testing.fixtures import backend_or_skip
from bnref.testing.tolerances import (
    UNIT_ROUNDOFF,
    assert_close,
    forward_tolerance,
    gradient_tolerances,
    running_stat_tolerances,
)

backend_or_skip("torch")  # skips this module without torch, fails it when torch is required
import torch  # noqa: E402
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402

import bnref.torch as bt  # noqa: E402

BUILTIN = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}
OURS = {1: bt.BatchNorm1d, 2: bt.BatchNorm2d, 3: bt.BatchNorm3d}


def small_net(bn: type, **bn_kwargs) -> torch.nn.Module:
    """conv -> BN -> ReLU -> conv -> BN: two layers, so state carries through a model."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), bn(4, **bn_kwargs), torch.nn.ReLU(),
                               torch.nn.Conv2d(4, 4, 3), bn(4, **bn_kwargs))


def batch(*shape: int, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def trained(model: torch.nn.Module, steps: int = 2) -> torch.nn.Module:
    for step in range(steps):
        model(batch(4, 3, 8, 8, seed=step) * 2 + 1)
    return model


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_b = b.state_dict()
    for key, value in a.state_dict().items():
        assert torch.equal(value, state_b[key]), key


def _deepcopy(model):
    return copy.deepcopy(model)


def _pickle(model):
    return pickle.loads(pickle.dumps(model))


def _torch_save(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _averaged(model):
    averaged = torch.optim.swa_utils.AveragedModel(model)  # deep-copies the model
    averaged.update_parameters(model)
    return averaged.module


@pytest.mark.parametrize("operation", [_deepcopy, _pickle, _torch_save, _averaged],
                         ids=["deepcopy", "pickle", "torch.save", "AveragedModel"])
@pytest.mark.parametrize("convention", ["torch", "keras"])
def test_a_model_is_copied_saved_and_averaged_with_its_state(operation, convention):
    model = trained(small_net(bt.BatchNorm2d, convention=convention, axis=1))
    twin = operation(model)
    same_state(twin, model)
    assert twin[1].convention is model[1].convention  # a registered convention stays itself
    x = batch(2, 3, 8, 8, seed=7)
    model.eval(), twin.eval()
    with torch.no_grad():
        assert torch.equal(twin(x), model(x))
    twin.train(), model.train()
    with torch.no_grad():
        assert torch.equal(twin(x), model(x))
    same_state(twin, model)


def test_torch_sees_a_batch_norm_layer():
    """isinstance(_BatchNorm) is how training scripts exclude BN from weight decay and how
    convert_sync_batchnorm and fusion find batch norms."""
    model = trained(small_net(bt.BatchNorm2d))
    found = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert found == [model[1], model[4]]
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert [type(m) for m in synced.modules() if isinstance(m, _BatchNorm)] == [
        torch.nn.SyncBatchNorm] * 2
    same_state(synced, model)


def test_an_old_checkpoint_without_num_batches_tracked_loads():
    state = torch.nn.BatchNorm2d(3).state_dict()
    del state["num_batches_tracked"]
    state._metadata = {"": {"version": 1}}  # what PyTorch < 0.4.1 wrote
    builtin, ours = torch.nn.BatchNorm2d(3), bt.BatchNorm2d(3)
    builtin.load_state_dict(state)
    ours.load_state_dict(state)
    assert int(ours.num_batches_tracked) == int(builtin.num_batches_tracked) == 0


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_rank_checks_are_the_builtins(dims):
    for ndim in range(1, 7):
        x = torch.ones((2,) * ndim)
        try:
            BUILTIN[dims](2)(x)
            expected = None
        except ValueError as error:
            expected = str(error)
        if expected is None:
            OURS[dims](2)(x)
        else:
            with pytest.raises(ValueError) as ours:
                OURS[dims](2)(x)
            assert str(ours.value) == expected


def test_conv_batch_norm_fusion_and_fx():
    """Eval-mode folding into the convolution (fuse_modules, with bnref's fuser mapping),
    torch.fx keeping the layer a leaf as it does the built-ins, and FX quantization."""
    from torch.ao.quantization import fuse_modules
    from torch.fx.experimental.optimization import fuse

    model = trained(small_net(bt.BatchNorm2d)).eval()
    x = batch(2, 3, 8, 8, seed=3)
    with torch.no_grad():
        expected = model(x)
        fused = fuse_modules(copy.deepcopy(model), [["0", "1", "2"], ["3", "4"]],
                             fuse_custom_config_dict={
                                 "additional_fuser_method_mapping": bt.fuser_method_mapping()})
        assert isinstance(fused[1], torch.nn.Identity) and isinstance(fused[4], torch.nn.Identity)
        assert_close(fused(x).numpy(), expected.numpy(), 1e-5, "folded into the convolutions")
        traced = torch.fx.symbolic_trace(model)
        assert [n.op for n in traced.graph.nodes].count("call_module") == 5
        assert torch.equal(traced(x), expected)
        assert torch.equal(fuse(model)(x), expected)
        traced.train()  # a leaf reads the training flag at run time, as the built-ins do
        traced(x)
        assert int(model[1].num_batches_tracked) == 3


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 5), (0, 3, 4, 4), (2, 3, 0, 4), (0, 3, 2, 2, 2)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_an_empty_batch_works_as_in_the_builtin(shape, training):
    dims = {2: 1, 3: 1, 4: 2, 5: 3}[len(shape)]
    layers = [BUILTIN[dims](3), OURS[dims](3)]
    results = []
    for layer in layers:
        with torch.no_grad():
            layer.running_mean.fill_(0.5)
        layer.train(training)
        x = torch.empty(shape, requires_grad=True)
        y = layer(x)
        y.sum().backward()
        results.append((y.shape, y.dtype, x.grad.shape, layer.weight.grad, layer.bias.grad,
                        {k: v.clone() for k, v in layer.state_dict().items()}))
    theirs, ours = results
    assert ours[:3] == theirs[:3]
    for got, expected in zip(ours[3:5], theirs[3:5], strict=True):
        assert torch.equal(got, expected)
    for key, value in theirs[5].items():
        assert torch.equal(ours[5][key], value), key


def test_an_empty_batch_in_the_functional_form_keeps_the_running_statistics():
    mean, var = torch.full((3,), 0.5), torch.full((3,), 2.0)
    y, new_mean, new_var = bt.batch_norm(torch.empty(0, 3, 4), None, None, mean, var,
                                         training=True)
    assert y.shape == (0, 3, 4)
    assert torch.equal(new_mean, mean) and torch.equal(new_var, var)


# --- torch.func and forward-mode AD, in training, against the built-in -------------------

X = batch(6, 3, 4, seed=11, dtype=torch.float64) * 2 + 1
GAMMA = batch(3, seed=12, dtype=torch.float64)
BETA = batch(3, seed=13, dtype=torch.float64)
EPS = 1e-5


def _ours(x, gamma, beta):
    return bt.batch_norm(x, gamma, beta, None, None, training=True, eps=EPS)[0]


def _theirs(x, gamma, beta):
    return torch.nn.functional.batch_norm(x, None, None, gamma, beta, training=True, eps=EPS)


def _cubic_loss(f):
    return lambda x: (f(x, GAMMA, BETA) ** 3).sum()


def _forward_ad(f):
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        dual = fwAD.make_dual(X, X.flip(0))
        return fwAD.unpack_dual(f(dual, GAMMA, BETA)).tangent


TRANSFORMS = {
    "vmap": lambda f: torch.func.vmap(f, in_dims=(0, None, None))(X.view(2, 3, 3, 4), GAMMA,
                                                                   BETA),
    "vmap-params": lambda f: torch.func.vmap(f, in_dims=(None, 0, 0))(
        X, torch.stack([GAMMA, -GAMMA]), torch.stack([BETA, BETA])),
    "grad": lambda f: torch.func.grad(_cubic_loss(f))(X),
    "vmap-grad": lambda f: torch.func.vmap(torch.func.grad(_cubic_loss(f)))(X.view(2, 3, 3, 4)),
    "jvp": lambda f: torch.func.jvp(f, (X, GAMMA, BETA), (X.flip(0), BETA, GAMMA))[1],
    "jacrev": lambda f: torch.func.jacrev(f, argnums=(0, 1, 2))(X, GAMMA, BETA),
    "jacfwd": lambda f: torch.func.jacfwd(f, argnums=(0, 1, 2))(X, GAMMA, BETA),
    "hessian": lambda f: torch.func.hessian(_cubic_loss(f))(X[:2]),
    "forward_ad": _forward_ad,
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_torch_func_transforms_agree_with_the_builtin(name):
    ours, theirs = TRANSFORMS[name](_ours), TRANSFORMS[name](_theirs)
    ours = ours if isinstance(ours, tuple) else (ours,)
    theirs = theirs if isinstance(theirs, tuple) else (theirs,)
    # Two float64 computations of the same derivative, each within the gradient bound of the
    # exact one: they differ by at most twice that bound (dx's, the loosest, for every term).
    dx_bound = gradient_tolerances(X.numpy(), np.ones(X.shape), 1, gamma=GAMMA.numpy(),
                                   eps=EPS, param_dtype="float64", factor=2.0)[0].max()
    scale = max(float(t.abs().max()) for t in theirs)
    for i, (got, expected) in enumerate(zip(ours, theirs, strict=True)):
        assert got.shape == expected.shape
        assert_close(got.numpy(), expected.numpy(), dx_bound * max(scale, 1.0), f"{name}[{i}]")


def test_gradcheck_with_forward_mode_and_batched_gradients():
    x = X.clone().requires_grad_()
    params = (GAMMA.clone().requires_grad_(), BETA.clone().requires_grad_())
    assert torch.autograd.gradcheck(_ours, (x, *params), check_forward_ad=True,
                                    check_batched_grad=True, check_batched_forward_grad=True)
    assert torch.autograd.gradgradcheck(_ours, (x, *params), check_fwd_over_rev=True,
                                        check_batched_grad=True)


def test_functional_call_gives_the_builtins_parameter_gradients():
    x = X.float()

    grads = []
    for module in (torch.nn.BatchNorm1d(3), bt.BatchNorm1d(3)):
        def loss(params, buffers, module=module):
            return torch.func.functional_call(module, (params, buffers), (x,)).pow(3).sum()

        params = {k: v.detach() for k, v in module.named_parameters()}
        buffers = {k: v.clone() for k, v in module.named_buffers()}
        grads.append(torch.func.grad(loss)(params, buffers))
    for key in grads[0]:
        assert_close(grads[1][key].numpy(), grads[0][key].numpy(), 1e-4, key)


# --- compile, export, meta, jit.trace ------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_compile_has_no_graph_break_in_training(momentum):
    torch._dynamo.reset()
    model = small_net(bt.BatchNorm2d, momentum=momentum)
    explanation = torch._dynamo.explain(model)(batch(4, 3, 8, 8))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_export_in_training_matches_eager(momentum):
    model, twin = small_net(bt.BatchNorm2d, momentum=momentum), None
    twin = copy.deepcopy(model)
    x = batch(4, 3, 8, 8, seed=5)
    exported = torch.export.export(model, (x,)).module()
    y = exported(x)
    y.sum().backward()  # the exported graph is differentiable
    assert_close(y.detach().numpy(), twin(x).detach().numpy(), 1e-5, "exported training step")
    for name, value in twin.named_buffers():
        assert_close(exported.get_buffer(name).numpy(), value.numpy(), 1e-6, name)


def test_training_on_the_meta_device():
    model = small_net(bt.BatchNorm2d, momentum=None).to("meta")
    y = model(torch.empty(4, 3, 8, 8, device="meta"))
    y.sum().backward()
    assert y.shape == (4, 4, 4, 4) and model[1].weight.grad.device.type == "meta"


def test_jit_trace_in_training_saves_and_loads():
    model = small_net(bt.BatchNorm2d)
    x = batch(4, 3, 8, 8, seed=9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer warns that shapes become constants
        traced = torch.jit.trace(copy.deepcopy(model), x, check_trace=False)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    y = loaded(x)
    y.sum().backward()
    assert_close(y.detach().numpy(), model(x).detach().numpy(), 1e-5, "traced training step")


@pytest.mark.parametrize("dims", [2, 3])
def test_channels_last_input_gets_a_channels_last_gradient(dims):
    memory_format = torch.channels_last if dims == 2 else torch.channels_last_3d
    shape = (4, 3) + (5,) * dims
    grads = []
    for layer in (BUILTIN[dims](3), OURS[dims](3)):
        x = batch(*shape).to(memory_format=memory_format).requires_grad_()
        layer(x).backward(batch(*shape, seed=2))  # a contiguous dy
        grads.append(x.grad)
    theirs, ours = grads
    assert theirs.is_contiguous(memory_format=memory_format)
    assert ours.is_contiguous(memory_format=memory_format)
    assert_close(ours.numpy(), theirs.numpy(), 1e-5, "dx")


@pytest.mark.parametrize("dims", [2, 3])
def test_channels_last_gives_the_contiguous_result_in_its_own_format(dims):
    """bnref's kernels walk each layout in its own order (channels innermost for
    channels_last): every combination of x's and dy's layouts gives y and dx within the
    derived float32 bounds of the float64 result, in x's memory format, as the built-in
    keeps it."""
    memory_format = torch.channels_last if dims == 2 else torch.channels_last_3d
    shape = (6, 5) + (7,) * dims
    x, dy = batch(*shape, seed=31) * 3 + 50, batch(*shape, seed=32)
    exact = BUILTIN[dims](5).double()
    x64 = x.double().requires_grad_()
    y64 = exact(x64)
    y64.backward(dy.double())
    stats = x64.detach().numpy().astype(np.float64)
    axes = tuple(i for i in range(x.ndim) if i != 1)
    y_bound = forward_tolerance(x.numpy(), 1, gamma=None, beta=None, eps=EPS,
                                mean=stats.mean(axes), var=stats.var(axes), batch_stats=True)
    dx_bound = gradient_tolerances(x.numpy(), dy.numpy(), 1, gamma=None, eps=EPS,
                                   param_dtype="float32")[0]
    for x_format, dy_format in ((torch.contiguous_format, torch.contiguous_format),
                                (memory_format, memory_format),
                                (memory_format, torch.contiguous_format),
                                (torch.contiguous_format, memory_format)):
        xi = x.clone(memory_format=x_format).requires_grad_()
        y = OURS[dims](5)(xi)
        y.backward(dy.clone(memory_format=dy_format))
        assert y.is_contiguous(memory_format=x_format)
        assert xi.grad.is_contiguous(memory_format=x_format)
        assert_close(y.detach().numpy(), y64.detach().numpy(), y_bound, "y")
        assert_close(xi.grad.numpy(), x64.grad.numpy(), dx_bound, "dx")


# --- accuracy: never less accurate than the built-in being checked --------------------------


def _relative_errors(f, x, gamma, beta, dy, reference):
    inputs = [t.clone().requires_grad_() for t in (x, gamma, beta)]
    y = f(*inputs)
    dx, dgamma, _ = torch.autograd.grad(y, inputs, dy)
    return [float((got.detach().double() - ref).abs().max() / ref.abs().max())
            for got, ref in zip((y, dx, dgamma), reference, strict=True)]


@pytest.mark.parametrize("offset", [1e2, 1e3, 1e4])
@pytest.mark.parametrize("shape", [(64, 8, 16, 16), (4096, 16), (16, 4, 300)],
                         ids=["nchw", "nc", "ncl"])
def test_float32_gradients_at_large_offsets_are_at_least_as_accurate_as_the_builtin(offset,
                                                                                   shape):
    """x = offset + randn: the cancellation in sum(dy * x) - mean * sum(dy) would cost
    u * offset / sigma; bnref centres x (with a corrected mean) before every product.

    Where neither loses accuracy to the offset both sit at float32's own floor, a unit
    roundoff or two of the largest value, and which of the two is smaller there is a coin
    toss: bnref must be no worse than the built-in or within that floor (2u relative to the
    largest value). (At offset 0 the CPU built-in's dgamma, a sum accumulated in float64, is
    about twice as accurate as bnref's float32 sum: see the next test.)
    """
    x = offset + batch(*shape, seed=21)
    gamma, beta, dy = batch(shape[1], seed=22), batch(shape[1], seed=23), batch(*shape, seed=24)
    inputs = [t.double().requires_grad_() for t in (x, gamma, beta)]
    y = _theirs(*inputs)
    reference = [y.detach(), *torch.autograd.grad(y, inputs[:2], dy.double())]
    ours = _relative_errors(_ours, x, gamma, beta, dy, reference)
    theirs = _relative_errors(_theirs, x, gamma, beta, dy, reference)
    floor = 2 * UNIT_ROUNDOFF["float32"]
    for what, mine, builtin in zip(("y", "dx", "dgamma"), ours, theirs, strict=True):
        assert mine <= max(builtin, floor), f"{what}: bnref {mine:.3g} > built-in {builtin:.3g}"


@pytest.mark.parametrize("shape", [(64, 8, 16, 16), (4096, 16), (16, 4, 300)],
                         ids=["nchw", "nc", "ncl"])
def test_float32_gradients_without_offset_are_within_the_derived_bound(shape):
    """At offset 0 both are at float32's floor; bnref's sums are float32 (torch's CPU kernel
    accumulates in float64, at the cost of a float64 reduction pass that is 8x slower in torch
    ops), so its dgamma may be ~2x the built-in's there, and must stay within the bound."""
    x = batch(*shape, seed=21)
    gamma, beta, dy = batch(shape[1], seed=22), batch(shape[1], seed=23), batch(*shape, seed=24)
    inputs = [t.double().requires_grad_() for t in (x, gamma, beta)]
    expected = torch.autograd.grad(_theirs(*inputs), inputs, dy.double())
    inputs32 = [t.clone().requires_grad_() for t in (x, gamma, beta)]
    got = torch.autograd.grad(_ours(*inputs32), inputs32, dy)
    bounds = gradient_tolerances(x.numpy(), dy.numpy(), 1, gamma=gamma.numpy(), eps=EPS,
                                 param_dtype="float32")
    for what, a, e, bound in zip(("dx", "dgamma", "dbeta"), got, expected, bounds, strict=True):
        assert_close(a.numpy(), e.detach().numpy(), bound, what)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64],
                         ids=str)
@pytest.mark.parametrize(("shape", "convention"), [
    ((1000, 2), "torch"), ((7, 2, 3), "torch"), ((1000, 2), "onnx"), ((7, 2, 3), "onnx"),
    ((1, 3, 1, 1), "onnx"),  # one value per channel: torch's convention refuses it (tested)
], ids=["n1000-torch", "ncl-torch", "n1000-onnx", "ncl-onnx", "single-value-onnx"])
def test_a_constant_channel_gives_exactly_beta(dtype, shape, convention):
    """A channel of equal values has no spread to normalise: y is beta, exactly."""
    values = torch.tensor([0.1, -1234.567, 3.3e-3][: shape[1]], dtype=torch.float64)
    x = values.view(1, -1, *([1] * (len(shape) - 2))).expand(shape).to(dtype).contiguous()
    beta = torch.linspace(-1, 1, shape[1], dtype=dtype)
    y, _, _ = bt.batch_norm(x, torch.full((shape[1],), 3.0, dtype=dtype), beta,
                            torch.zeros(shape[1], dtype=dtype), torch.ones(shape[1], dtype=dtype),
                            training=True, convention=convention)
    assert torch.equal(y, beta.view(1, -1, *([1] * (len(shape) - 2))).expand(shape))


# --- the compiled kernels (large CPU inputs) --------------------------------------------------

FUSED_CASES = [  # (shape, memory format, dtype): each is one compile of the four kernels
    ((6, 5, 9, 9), torch.contiguous_format, torch.float32),
    ((6, 5, 9, 9), torch.channels_last, torch.float32),
    ((300, 5), torch.contiguous_format, torch.float32),
    ((6, 5, 9, 9), torch.contiguous_format, torch.float64),
    ((6, 5, 9, 9), torch.channels_last, torch.float16),
]


@pytest.fixture
def fused_for_every_size(monkeypatch):
    """Sends every CPU input through the compiled kernels (normally only inputs of at least
    ``MIN_NUMEL`` elements) and records which kernels ran and that none fell back."""
    from bnref.torch import _fused

    ran = []
    run = _fused.run

    def recording(kernel, *args):
        out = run(kernel, *args)
        ran.append((kernel.__name__, out is not None))
        return out

    monkeypatch.setattr(_fused, "MIN_NUMEL", 0)
    monkeypatch.setattr(_fused, "run", recording)
    return ran


@pytest.mark.parametrize("offset", [0.0, 1e4], ids=["offset0", "offset1e4"])
@pytest.mark.parametrize(("shape", "memory_format", "dtype"), FUSED_CASES,
                         ids=lambda v: str(v).replace("torch.", "").replace(", ", "x"))
def test_compiled_kernels_give_the_oracle_result_in_x_format(fused_for_every_size, shape,
                                                              memory_format, dtype, offset):
    """The fused (torch.compile) kernels are the same formulas as the eager ones: y, dx,
    dgamma, dbeta and the running statistics within the derived bounds of the float64
    numpy oracle, at offset 1e4 as well, in x's memory format."""
    import bnref.numpy as bn

    x = (batch(*shape, seed=41, dtype=torch.float64) * 3 + offset).to(dtype)
    dy = batch(*shape, seed=42).to(dtype)
    layer = bt.BatchNorm(shape[1]).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(batch(shape[1], seed=43) * 0.5 + 1)
        layer.bias.copy_(batch(shape[1], seed=44))
    xi = x.clone(memory_format=memory_format).requires_grad_()
    y = layer(xi)
    y.backward(dy)
    assert sorted(fused_for_every_size) == sorted(
        (name, True) for name in ("moments", "normalized", "gradient_sums", "input_gradient"))
    assert y.is_contiguous(memory_format=memory_format)
    assert xi.grad.is_contiguous(memory_format=memory_format)

    x_np, dy_np = x.numpy(), dy.numpy()
    gamma, beta = layer.weight.detach().numpy(), layer.bias.detach().numpy()
    c = shape[1]
    y64, mean64, var64 = bn.batch_norm(
        x_np.astype(np.float64), gamma.astype(np.float64), beta.astype(np.float64),
        np.zeros(c), np.ones(c), training=True, eps=EPS, momentum=0.1)
    dx64, dgamma64, dbeta64 = bn.batch_norm_backward(
        dy_np.astype(np.float64), x_np.astype(np.float64), gamma.astype(np.float64),
        eps=EPS)
    axes = tuple(i for i in range(x.ndim) if i != 1)
    stats = x_np.astype(np.float64)
    y_bound = forward_tolerance(x_np, 1, gamma=gamma, beta=beta, eps=EPS,
                                mean=stats.mean(axes), var=stats.var(axes), batch_stats=True)
    dx_bound, dgamma_bound, dbeta_bound = gradient_tolerances(
        x_np, dy_np, 1, gamma=gamma, eps=EPS, param_dtype=gamma.dtype.name)
    assert_close(y.detach().numpy(), y64, y_bound, "y")
    assert_close(xi.grad.numpy(), dx64, dx_bound, "dx")
    assert_close(layer.weight.grad.numpy(), dgamma64, dgamma_bound, "dgamma")
    assert_close(layer.bias.grad.numpy(), dbeta64, dbeta_bound, "dbeta")
    mean_bound, var_bound = running_stat_tolerances(
        x_np, 1, old_mean=np.zeros(c), old_var=np.ones(c), new_value_weight=0.1,
        stat_dtype=layer.running_mean.dtype.__str__().removeprefix("torch."))
    assert_close(layer.running_mean.numpy(), mean64, mean_bound, "running_mean")
    assert_close(layer.running_var.numpy(), var64, var_bound, "running_var")


def test_compiled_kernels_fall_back_to_eager_with_a_warning(monkeypatch):
    """A machine where torch.compile cannot build (no C++ compiler) still trains: the
    kernels say why once and the eager ones give the same result."""
    from bnref.torch import _fused

    def broken(*_args, **_kwargs):
        raise RuntimeError("no working C++ compiler found")

    monkeypatch.setattr(_fused, "MIN_NUMEL", 0)
    monkeypatch.setattr(_fused, "_compiled", {})
    monkeypatch.setattr(_fused, "_enabled", True)
    monkeypatch.setattr(_fused.torch, "compile", lambda fn, **_: broken)
    x = batch(6, 5, 9, 9, seed=45)
    with pytest.warns(RuntimeWarning, match="no working C\\+\\+ compiler"):
        y = bt.BatchNorm(5)(x)
    assert not _fused._enabled
    monkeypatch.setattr(_fused, "MIN_NUMEL", 1 << 62)
    expected = bt.BatchNorm(5)(x)
    assert torch.equal(y, expected)


_STRICT = """
import torch
import bnref.torch as bt
from bnref.torch import _fused

_fused.MIN_NUMEL = 0
x = torch.randn(6, 5, 9, 9, requires_grad=True)
bt.BatchNorm(5)(x).sum().backward()
assert _fused._enabled and len(_fused._compiled) == 4, (_fused._enabled, _fused._compiled)
print("compiled")
"""


def test_compiled_kernels_compile_under_warnings_as_errors():
    """A user's ``-W error`` (or pytest's ``filterwarnings = error``) must not turn torch's own
    deprecation warnings while compiling into a failed compile: in a fresh process (where
    they are first emitted) the compiled kernels run and nothing falls back."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-W", "error", "-c", _STRICT], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "compiled", done.stderr[-2000:]
