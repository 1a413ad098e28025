"""What only the PyTorch backend promises: torch's defaults, its module protocol (state dicts,
train/eval, nn.Sequential, torch.compile), second derivatives, and torch's own error."""

from __future__ import annotations

import inspect

import pytest

from bnref.conventions import CONVENTIONS, DEFAULT
from bnref.testing.fixtures import backend_or_skip
from bnref.testing.tolerances import assert_close

backend_or_skip("torch")  # skips this module without torch, fails it when torch is required
import torch  # noqa: E402

import bnref.torch as bt  # noqa: E402
from tests.test_conventions import observe_one_step  # noqa: E402

RECORD = CONVENTIONS["torch"]


def test_torch_record_is_the_installed_defaults():
    parameters = inspect.signature(torch.nn.BatchNorm2d).parameters
    assert parameters["momentum"].default == RECORD.default_momentum
    assert parameters["eps"].default == RECORD.default_eps
    names = set(torch.nn.BatchNorm2d(3).state_dict())
    assert names == {*(RECORD.state_names[k] for k in ("gamma", "beta", "running_mean",
                                                        "running_var")), "num_batches_tracked"}

    def step(x, momentum):
        layer = torch.nn.BatchNorm1d(2, momentum=momentum)
        layer(torch.from_numpy(x))
        return layer.running_mean.detach().numpy(), layer.running_var.detach().numpy()

    assert observe_one_step(step, 0.25) == {"momentum_weights": RECORD.momentum_weights,
                                            "unbiased_running_var": RECORD.unbiased_running_var}
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        torch.nn.functional.batch_norm(torch.ones(1, 3), None, None, training=True)


def test_bnref_layer_takes_the_builtins_arguments_in_its_order():
    ours = list(inspect.signature(bt.BatchNorm).parameters)
    theirs = list(inspect.signature(torch.nn.BatchNorm2d).parameters)
    assert ours[: len(theirs)] == theirs
    assert inspect.signature(bt.BatchNorm).parameters["momentum"].default is DEFAULT
    layer = bt.BatchNorm(4)
    assert (layer.eps, layer.momentum, layer.axis) == (1e-5, 0.1, 1)


def test_one_value_per_channel_is_refused_like_the_builtin_and_changes_nothing():
    layer, builtin = bt.BatchNorm(3), torch.nn.BatchNorm1d(3)
    with pytest.raises(ValueError) as ours:
        layer(torch.ones(1, 3))
    with pytest.raises(ValueError) as theirs:
        builtin(torch.ones(1, 3))
    prefix = "Expected more than 1 value per channel when training"
    assert str(ours.value).startswith(prefix) and str(theirs.value).startswith(prefix)
    assert int(layer.num_batches_tracked) == 0  # the built-in has counted the refused batch


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (2, 3, 4, 4), (2, 3, 2, 2, 3)],
                         ids=lambda s: f"rank{len(s)}")
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_gradcheck_and_second_derivatives_in_float64(shape, affine):
    generator = torch.Generator().manual_seed(len(shape))
    x = (3 + 2 * torch.randn(shape, generator=generator, dtype=torch.float64)).requires_grad_()
    params = ((torch.randn(3, generator=generator, dtype=torch.float64).requires_grad_(),
               torch.randn(3, generator=generator, dtype=torch.float64).requires_grad_())
              if affine else ())

    def normalised(x, *params):
        gamma, beta = params if params else (None, None)
        return bt.batch_norm(x, gamma, beta, None, None, training=True, eps=1e-3)[0]

    assert torch.autograd.gradcheck(normalised, (x, *params))
    assert torch.autograd.gradgradcheck(normalised, (x, *params))


def test_state_dicts_load_both_ways_with_the_builtin():
    generator = torch.Generator().manual_seed(0)
    builtin = torch.nn.BatchNorm2d(3, momentum=None)
    for _ in range(3):
        builtin(torch.randn(4, 3, 2, 2, generator=generator) * 2 + 1)
    with torch.no_grad():
        builtin.weight.copy_(torch.randn(3, generator=generator))
    ours = bt.BatchNorm(3, momentum=None)
    ours.load_state_dict(builtin.state_dict())  # strict: same names, same shapes
    x = torch.randn(4, 3, 2, 2, generator=generator)
    for mode in ("train", "eval"):
        getattr(ours, mode)(), getattr(builtin, mode)()
        with torch.no_grad():
            assert_close(ours(x).numpy(), builtin(x).numpy(), 1e-5, f"{mode} output")
    for key, value in builtin.state_dict().items():
        assert_close(ours.state_dict()[key].numpy(), value.numpy(), 1e-6, key)
    torch.nn.BatchNorm2d(3).load_state_dict(ours.state_dict())  # and back, strictly


def test_eval_freezes_and_untracked_layers_use_batch_statistics():
    x = torch.randn(8, 2) * 3 + 1
    layer = bt.BatchNorm(2)
    layer(x)
    frozen = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.eval()
    layer(x + 10)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, frozen[key]), key
    untracked = bt.BatchNorm(2, track_running_stats=False).eval()
    assert untracked.running_mean is None and untracked.num_batches_tracked is None
    builtin = torch.nn.BatchNorm1d(2, track_running_stats=False).eval()
    with torch.no_grad():
        assert_close(untracked(x).numpy(), builtin(x).numpy(), 1e-5, "untracked eval")


def test_works_inside_sequential_and_under_torch_compile():
    """Checked: nn.Sequential, backward through it, and torch.compile (which the built-in
    supports). torch.jit.script is not supported: the shared validation is plain Python."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), bt.BatchNorm(3), torch.nn.ReLU())
    x = torch.randn(4, 2, 6, 6)
    model(x).sum().backward()
    assert model[0].weight.grad is not None and model[1].weight.grad is not None
    compiled = torch.compile(bt.BatchNorm(3))
    eager = bt.BatchNorm(3)
    y = torch.randn(5, 3, 4)
    assert_close(compiled(y).detach().numpy(), eager(y).detach().numpy(), 1e-5, "compiled")
    assert_close(compiled.running_var.numpy(), eager.running_var.numpy(), 1e-6, "running_var")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_runs_on_cuda_without_code_changes():
    layer = bt.BatchNorm(3).cuda()
    x = torch.randn(4, 3, 2, device="cuda")
    reference = torch.nn.BatchNorm1d(3).cuda()
    assert_close(layer(x).detach().cpu().numpy(), reference(x).detach().cpu().numpy(), 1e-5,
                 "cuda output")


def test_inputs_are_not_modified_and_running_stats_come_back_new():
    x = torch.randn(6, 3)
    before = x.clone()
    mean, var = torch.zeros(3), torch.ones(3)
    _, new_mean, new_var = bt.batch_norm(x, None, None, mean, var, training=True)
    assert torch.equal(mean, torch.zeros(3)) and torch.equal(var, torch.ones(3))
    assert torch.equal(x, before)
    assert new_mean.data_ptr() != mean.data_ptr() and new_var.data_ptr() != var.data_ptr()
