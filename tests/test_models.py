"""Tests of robustq.models: shapes, parameter counts and the module conventions others rely on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustq import models

NAMES = ("cnn", "resnet20", "mobilenetv2")
INPUTS = ((1, 28), (3, 32))  # (channels, pixels): Fashion-MNIST and CIFAR-10

# Exact counts (all parameters, BN affine included) for 10 classes.
PARAMETER_COUNTS = {
    ("cnn", 1): 65_114,
    ("cnn", 3): 65_402,
    ("resnet20", 1): 272_186,
    ("resnet20", 3): 272_474,
    ("mobilenetv2", 1): 149_098,
    ("mobilenetv2", 3): 149_386,
}


def build(name: str, in_channels: int, num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return models.make_model(name, in_channels, num_classes)


def test_available_names() -> None:
    assert models.available() == NAMES


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("in_channels", "size"), INPUTS)
def test_forward_shape(name: str, in_channels: int, size: int) -> None:
    model = build(name, in_channels).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, 10) and out.dtype == torch.float32


@pytest.mark.parametrize("name", NAMES)
def test_train_step_runs(name: str) -> None:
    model = build(name, 1, num_classes=7)
    loss = nn.functional.cross_entropy(model(torch.randn(8, 1, 28, 28)), torch.randint(0, 7, (8,)))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(("name", "in_channels"), sorted(PARAMETER_COUNTS))
def test_parameter_counts(name: str, in_channels: int) -> None:
    assert models.count_parameters(build(name, in_channels)) == PARAMETER_COUNTS[name, in_channels]


def test_resnet20_size_matches_paper() -> None:
    assert 260_000 <= models.count_parameters(build("resnet20", 3)) <= 280_000


def test_mobilenetv2_is_small() -> None:
    assert models.count_parameters(build("mobilenetv2", 3)) < 1_000_000


@pytest.mark.parametrize("name", NAMES)
def test_every_batchnorm_lives_in_a_convbn(name: str) -> None:
    model = build(name, 3)
    parents = {id(child): parent for parent in model.modules() for child in parent.children()}
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms
    assert all(isinstance(parents[id(bn)], models.ConvBN) for bn in norms)


@pytest.mark.parametrize("name", NAMES)
def test_convbn_has_exactly_conv_and_bn(name: str) -> None:
    for module in build(name, 3).modules():
        if isinstance(module, models.ConvBN):
            assert [child for child, _ in module.named_children()] == ["conv", "bn"]
            assert isinstance(module.conv, nn.Conv2d) and module.conv.bias is None
            assert module.conv.padding == (module.conv.kernel_size[0] // 2,) * 2
            assert module.bn.num_features == module.conv.out_channels


@pytest.mark.parametrize("name", NAMES)
def test_only_conv_linear_and_bn_hold_parameters(name: str) -> None:
    for module in build(name, 3).modules():
        if any(True for _ in module.parameters(recurse=False)):
            assert isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)), type(module)


@pytest.mark.parametrize("name", NAMES)
def test_stem_and_classifier_positions(name: str) -> None:
    model = build(name, 3)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert convs[0].in_channels == 3 and convs[0].groups == 1
    assert linears[-1].out_features == 10


@pytest.mark.parametrize("name", NAMES)
def test_no_module_is_used_twice(name: str) -> None:
    model = build(name, 3)
    # Each activation instance must be one use site, so per-layer hooks see one tensor each.
    all_sites = list(model.named_modules(remove_duplicate=False))
    assert len(all_sites) == len(list(model.named_modules()))


def test_mobilenetv2_has_depthwise_convs() -> None:
    convs = [m for m in build("mobilenetv2", 3).modules() if isinstance(m, nn.Conv2d)]
    depthwise = [c for c in convs if c.groups == c.in_channels > 1]
    assert depthwise and all(c.out_channels == c.in_channels for c in depthwise)


def test_residual_additions_use_add_module() -> None:
    assert sum(isinstance(m, models.Add) for m in build("resnet20", 3).modules()) == 9
    assert any(isinstance(m, models.Add) for m in build("mobilenetv2", 3).modules())


def test_resnet20_uses_projection_shortcuts() -> None:
    blocks = [m for m in build("resnet20", 3).modules() if isinstance(m, models.BasicBlock)]
    projections = [b for b in blocks if isinstance(b.shortcut, models.ConvBN)]
    assert len(blocks) == 9 and len(projections) == 2
    assert all(p.shortcut.conv.kernel_size == (1, 1) for p in projections)


def test_init_is_seeded_and_batchnorm_is_identity() -> None:
    first, second = build("resnet20", 3), build("resnet20", 3)
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)
    for module in first.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert bool((module.weight == 1).all()) and bool((module.bias == 0).all())


def test_unknown_name_lists_known() -> None:
    with pytest.raises(ValueError, match=r"model must be one of \('cnn', 'resnet20', 'mobilenetv2'\), got 'vgg16'"):
        models.make_model("vgg16", 3, 10)


@pytest.mark.parametrize(("in_channels", "num_classes"), [(0, 10), (3, 0), (3, 2.0)])
def test_bad_sizes_rejected(in_channels, num_classes) -> None:
    with pytest.raises(ValueError, match="must be a positive int"):
        models.make_model("cnn", in_channels, num_classes)


def test_count_parameters_counts_frozen_too() -> None:
    layer = nn.Linear(3, 2)
    layer.bias.requires_grad_(False)
    assert models.count_parameters(layer) == 8
