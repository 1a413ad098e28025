"""``bnref.torch.BatchNorm2d`` as a drop-in inside a real model: a ResNet-18-shaped network.

The model: ResNet-18's layout (stem conv7x7/2 + BN + ReLU + maxpool3x3/2, BasicBlock x [2, 2, 2,
2], 1x1-conv + BN downsampling, global average pool, linear head) with the widths scaled down to
16-32-64-128 and 10 classes, on (8, 3, 32, 32) batches: 20 convolutions, 20 batch norms, and
8 values per channel in the last stage (at batch 4 the last stage normalises 4 values per
channel, which makes the whole network's rounding ~1000x more sensitive). The ``torch.compile``
and ``torch.export`` checks use the same layout with one block per stage and widths 8-16-32-64
in float32: compilation on CPU costs tens of seconds per model.

The tolerance. ``bnref.testing.tolerances`` bounds one batch-norm call; nothing there bounds a
whole network after several SGD steps, where each layer's rounding is amplified by the layers
and steps after it. So a comparison here allows ``SAFETY`` times the *built-in's own* rounding
spread on the same computation (``tolerances.rounding_spread`` and ``model_tolerance``): the
built-in model run a second time in channels_last memory format (other kernels, other
summation orders, equally correct). Integers (``num_batches_tracked``) must be equal.
"""

from __future__ import annotations

import contextlib
import copy
import io
import pickle

import numpy as np
import pytest

from bnref.testing.fixtures import backend_or_skip
from bnref.testing.tolerances import assert_close, model_tolerance, rounding_spread

backend_or_skip("torch")  # skips this module without torch, fails it when torch is required
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402
from torch.optim.swa_utils import AveragedModel, update_bn  # noqa: E402

import bnref.torch as bt  # noqa: E402

NORMS = {"torch.nn.BatchNorm2d": nn.BatchNorm2d, "bnref.torch.BatchNorm2d": bt.BatchNorm2d}
BUILTIN, BNREF = NORMS
RESNET18 = {"widths": (16, 32, 64, 128), "blocks": (2, 2, 2, 2)}
SMALL = {"widths": (8, 16, 32, 64), "blocks": (1, 1, 1, 1)}  # for compile and export
BATCH, CLASSES = (8, 3, 32, 32), 10
STEPS = 3
SGD = {"lr": 0.1, "momentum": 0.9}
WEIGHT_DECAY = 5e-4

by_norm = pytest.mark.parametrize("norm", list(NORMS))


# --- the model -------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: type[nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, norm: type[nn.Module], widths: tuple[int, ...] = RESNET18["widths"],
                 blocks: tuple[int, ...] = RESNET18["blocks"], classes: int = CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = norm(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], widths[0]
        for i, (width, count) in enumerate(zip(widths, blocks, strict=True)):
            stage = []
            for j in range(count):
                stage.append(BasicBlock(cin, width, 2 if i > 0 and j == 0 else 1, norm))
                cin = width
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build(norm: str, dtype: torch.dtype, seed: int = 0, **shape) -> ResNet:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return ResNet(NORMS[norm], **shape).to(dtype)


def swapped(builtin: ResNet, **shape) -> ResNet:
    """The same model with every BN a bnref one, loaded strictly from the built-in's state."""
    dtype = next(builtin.parameters()).dtype
    model = ResNet(bt.BatchNorm2d, **shape).to(dtype)
    model.load_state_dict(builtin.state_dict())  # strict
    return model


def channels_last(model: ResNet) -> ResNet:
    """The rounding reference: the same model in channels_last memory format."""
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def batches(count: int, dtype: torch.dtype, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, generator=generator, dtype=dtype),
             torch.randint(0, CLASSES, (BATCH[0],), generator=generator))
            for _ in range(count)]


def norm_modules(model: nn.Module) -> dict[str, _BatchNorm]:
    return {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm)}


def optimizer(model: nn.Module) -> torch.optim.SGD:
    """SGD with weight decay on everything but the BN parameters, found the usual way."""
    no_decay = {id(p) for m in norm_modules(model).values() for p in m.parameters(recurse=False)}
    decay = [p for p in model.parameters() if id(p) not in no_decay]
    rest = [p for p in model.parameters() if id(p) in no_decay]
    return torch.optim.SGD([{"params": decay, "weight_decay": WEIGHT_DECAY},
                            {"params": rest, "weight_decay": 0.0}], **SGD)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor) -> torch.Tensor:
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.detach()


def as_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Inputs in the model's memory format (channels_last for the rounding reference)."""
    if model.conv1.weight.is_contiguous(memory_format=torch.channels_last):
        return x.to(memory_format=torch.channels_last)
    return x


def state(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().clone() for k, v in model.state_dict().items()}


@contextlib.contextmanager
def preserved(model: nn.Module):
    """Leaves ``model``'s state and mode as they were (a train-mode forward moves its stats)."""
    saved, training = copy.deepcopy(model.state_dict()), model.training
    try:
        yield model
    finally:
        model.load_state_dict(saved)
        model.train(training)


# --- comparisons -----------------------------------------------------------------------------

def _float64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).contiguous().numpy()


def spread(expected: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """The built-in's own rounding spread (see ``rounding_spread``)."""
    return rounding_spread({k: _float64(v) for k, v in expected.items() if v.is_floating_point()},
                           {k: _float64(v) for k, v in reference.items()})


def assert_agree(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], level: float,
                 dtype: str, what: str) -> None:
    assert got.keys() == expected.keys(), what
    for key, want in expected.items():
        have = got[key]
        if not want.is_floating_point():
            assert torch.equal(have, want), f"{what}: {key} {have} != {want}"
            continue
        w = _float64(want)
        tolerance = model_tolerance(w, level, dtype)
        assert_close(_float64(have), w, tolerance, f"{what}: {key}")


def assert_same(restored: nn.Module, original: nn.Module, x: torch.Tensor, norm: str) -> None:
    """Same class everywhere, same state, own storage, identical outputs in eval and train."""
    assert type(restored) is type(original)
    for name, module in norm_modules(restored).items():
        assert type(module) is NORMS[norm], name
    assert restored.training == original.training
    theirs = original.state_dict()
    assert restored.state_dict().keys() == theirs.keys()
    for key, value in restored.state_dict().items():
        assert torch.equal(value, theirs[key]), key
        assert value.data_ptr() != theirs[key].data_ptr(), f"{key} shares the original's storage"
    with preserved(original), preserved(restored), torch.no_grad():
        assert torch.equal(restored.eval()(x), original.eval()(x)), "eval output"
        assert torch.equal(restored.train()(x), original.train()(x)), "train output"
        theirs = original.state_dict()
        for key, value in restored.state_dict().items():
            assert torch.equal(value, theirs[key]), f"{key} after a training-mode forward"


# --- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained():
    """Built-in float64 ResNet-18, the bnref one loaded from it, and the rounding reference,
    trained for 3 SGD steps on the same batches; their results, and the eval outputs after."""
    builtin = build(BUILTIN, torch.float64)
    models = {BUILTIN: builtin, BNREF: swapped(builtin), "reference": channels_last(builtin)}
    data = batches(STEPS, torch.float64, seed=1)
    results = {}
    for name, model in models.items():
        opt = optimizer(model)
        losses = [train_step(model, opt, as_input(model, x), y) for x, y in data]
        model.eval()
        with torch.no_grad():
            outputs = model(as_input(model, data[0][0]))
        model.train()
        results[name] = {"losses": {"losses": torch.stack(losses)},
                         "parameters": {k: p.detach().clone()
                                        for k, p in model.named_parameters()},
                         "buffers": {k: b.clone() for k, b in model.named_buffers()},
                         "eval outputs": {"eval outputs": outputs}}
    flat = {name: {k: v for part in r.values() for k, v in part.items()}
            for name, r in results.items()}
    level = spread(flat[BUILTIN], flat["reference"])
    return {"models": models, "results": results, "level": level, "x": data[0][0]}


@pytest.fixture(scope="module")
def small():
    """The small float32 model (built-in, bnref, reference) and one batch, for compile/export."""
    builtin = build(BUILTIN, torch.float32, **SMALL)
    (x, y), = batches(1, torch.float32, seed=2)
    return {BUILTIN: builtin, BNREF: swapped(builtin, **SMALL),
            "reference": channels_last(builtin), "x": x, "y": y}


def one_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             call: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """One training step (through ``call``, the compiled module, if given): output, loss,
    gradients, and the parameters and buffers after the update."""
    opt = optimizer(model)
    opt.zero_grad()
    output = (model if call is None else call)(as_input(model, x))
    loss = nn.functional.cross_entropy(output, y)
    loss.backward()
    grads = {f"grad {k}": p.grad.clone() for k, p in model.named_parameters()}
    opt.step()
    return {"output": output.detach(), "loss": loss.detach(), **grads, **state(model)}


# --- 1. the model ----------------------------------------------------------------------------

@by_norm
def test_model_is_resnet18_shaped(norm):
    model = build(norm, torch.float64)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20 and convs[0].kernel_size == (7, 7) and convs[0].stride == (2, 2)
    norms = norm_modules(model)
    assert len(norms) == 20 and all(type(m) is NORMS[norm] for m in norms.values())
    assert [len(getattr(model, f"layer{i}")) for i in (1, 2, 3, 4)] == [2, 2, 2, 2]
    assert model(torch.randn(BATCH, dtype=torch.float64)).shape == (BATCH[0], CLASSES)


def test_every_bn_is_swapped_and_the_builtin_state_loads_strictly():
    builtin = build(BUILTIN, torch.float64)
    model = ResNet(bt.BatchNorm2d).double()
    result = model.load_state_dict(builtin.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    theirs, ours = norm_modules(builtin), norm_modules(model)
    assert list(ours) == list(theirs)
    assert all(type(m) is bt.BatchNorm2d for m in ours.values())
    for key, value in builtin.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


@by_norm
def test_weight_decay_exclusion_finds_every_bn_parameter_by_isinstance(norm):
    model = build(norm, torch.float64)
    names = {id(p): name for name, p in model.named_parameters()}
    found = {names[id(p)] for m in norm_modules(model).values() for p in m.parameters()}
    layers = [name for name, m in model.named_modules() if type(m) is NORMS[norm]]
    assert len(layers) == 20
    assert found == {f"{layer}.{p}" for layer in layers for p in ("weight", "bias")}
    groups = optimizer(model).param_groups
    assert len(groups[1]["params"]) == 40 and groups[1]["weight_decay"] == 0.0
    assert len(groups[0]["params"]) == len(list(model.parameters())) - 40


# --- 2. three SGD steps in float64 -----------------------------------------------------------

@pytest.mark.parametrize("part", ["losses", "parameters", "buffers", "eval outputs"])
def test_bnref_model_trains_like_the_builtin_in_float64(trained, part):
    got, expected = trained["results"][BNREF][part], trained["results"][BUILTIN][part]
    assert_agree(got, expected, trained["level"], "float64", part)


def test_num_batches_tracked_counts_every_step(trained):
    buffers = trained["results"][BNREF]["buffers"]
    counts = {k: int(v) for k, v in buffers.items() if k.endswith("num_batches_tracked")}
    assert len(counts) == 20 and set(counts.values()) == {STEPS}


# --- 3. PyTorch's module machinery on the trained model ---------------------------------------

@by_norm
def test_deepcopy_gives_identical_outputs(trained, norm):
    model = trained["models"][norm]
    assert_same(copy.deepcopy(model), model, trained["x"], norm)


@by_norm
def test_torch_save_and_load_give_identical_outputs(trained, norm):
    model = trained["models"][norm]
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    assert_same(torch.load(buffer, weights_only=False), model, trained["x"], norm)


@by_norm
def test_pickle_round_trip_gives_identical_outputs(trained, norm):
    model = trained["models"][norm]
    assert_same(pickle.loads(pickle.dumps(model)), model, trained["x"], norm)


def test_swa_averaged_model_and_update_bn_match_the_builtin(trained):
    """AveragedModel over two more steps, then update_bn: it finds the bnref layers (it resets
    and recounts num_batches_tracked) and their cumulative average matches the built-in's."""
    data = batches(2, torch.float64, seed=3)
    loader = [x for x, _ in batches(3, torch.float64, seed=4)]
    results = {}
    for name, original in trained["models"].items():
        model = copy.deepcopy(original)
        averaged = AveragedModel(model)
        opt = optimizer(model)
        for x, y in data:
            train_step(model, opt, as_input(model, x), y)
            averaged.update_parameters(model)
        update_bn([as_input(model, x) for x in loader], averaged)
        assert int(averaged.n_averaged) == len(data)
        for module in norm_modules(averaged).values():
            assert int(module.num_batches_tracked) == len(loader)
            assert module.momentum == 0.1  # restored after the cumulative average
        averaged.eval()
        with torch.no_grad():
            output = averaged(as_input(model, trained["x"]))
        results[name] = {**state(averaged.module), "eval output": output}
    level = spread(results[BUILTIN], results["reference"])
    assert_agree(results[BNREF], results[BUILTIN], level, "float64", "SWA")


@by_norm
def test_convert_sync_batchnorm_converts_every_bn_keeping_the_state(trained, norm):
    model = trained["models"][norm]
    names = list(norm_modules(model))
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    synced = {n: m for n, m in converted.named_modules() if isinstance(m, nn.SyncBatchNorm)}
    assert list(synced) == names and len(synced) == 20
    assert not any(isinstance(m, NORMS[norm]) for m in converted.modules())
    assert all(m.training == model.training for m in synced.values())
    expected = model.state_dict()
    assert converted.state_dict().keys() == expected.keys()
    for key, value in converted.state_dict().items():
        assert torch.equal(value, expected[key]), key
    # Without a process group SyncBatchNorm falls back to torch's batch norm.
    with torch.no_grad(), preserved(model):
        got = {"eval output": converted.eval()(trained["x"])}
        want = {"eval output": model.eval()(trained["x"])}
    assert_agree(got, want, trained["level"], "float64", "converted")


@by_norm
def test_torch_compile_in_training_mode_has_no_graph_break(small, norm):
    torch._dynamo.reset()
    model = copy.deepcopy(small[norm]).train()
    explanation = torch._dynamo.explain(model)(small["x"])
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_training_step_matches_eager_in_float32(small):
    level = spread(one_step(copy.deepcopy(small[BUILTIN]), small["x"], small["y"]),
                   one_step(copy.deepcopy(small["reference"]), small["x"], small["y"]))
    eager = one_step(copy.deepcopy(small[BNREF]), small["x"], small["y"])
    torch._dynamo.reset()
    model = copy.deepcopy(small[BNREF]).train()
    compiled = one_step(model, small["x"], small["y"], call=torch.compile(model))
    assert_agree(compiled, eager, level, "float32", "compiled")


def test_torch_export_in_training_mode_matches_eager(small):
    x = small["x"]

    def forward(model):
        return {"output": model(as_input(model, x)).detach(), **state(model)}

    level = spread(forward(copy.deepcopy(small[BUILTIN])),
                   forward(copy.deepcopy(small["reference"])))
    model = copy.deepcopy(small[BNREF]).train()
    exported = torch.export.export(model, (x,)).module()
    assert exported.training
    got = {"output": exported(x).detach(), **state(exported)}  # the running stats moved too
    assert_agree(got, forward(copy.deepcopy(small[BNREF])), level, "float32", "exported")


@by_norm
def test_training_on_the_meta_device(trained, norm):
    model = copy.deepcopy(trained["models"][norm]).to("meta").train()
    x = torch.empty(BATCH, dtype=torch.float64, device="meta")
    output = model(x)
    assert output.device.type == "meta" and output.shape == (BATCH[0], CLASSES)
    output.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.device.type == "meta", name
        assert p.grad.shape == p.shape, name
    assert all(b.device.type == "meta" for b in model.buffers())
