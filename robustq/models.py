"""The three networks of the book: a small VGG-style CNN, ResNet-20 and a small MobileNetV2.

Conventions other modules rely on (``fold_bn``, quantizer insertion, first/last-layer rules):

* every convolution followed by BatchNorm is a :class:`ConvBN` with exactly two children, ``conv``
  (``nn.Conv2d``, no bias) and ``bn`` (``nn.BatchNorm2d``);
* activations are separate ``nn.ReLU`` / ``nn.ReLU6`` modules, one instance per use site;
* only ``nn.Conv2d`` and ``nn.Linear`` carry weights besides BatchNorm, and nothing calls
  ``F.conv2d`` / ``F.linear`` directly;
* the stem is the first ``nn.Conv2d`` in module order, the classifier the last ``nn.Linear``;
* residual sums go through an :class:`Add` module, so they can be hooked like any layer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable

import torch
from torch import nn

from robustq.params import check_choice, check_int

# Channel widths of the "cnn" model. Halving the first four of 32-32-64-64-128 cuts the
# multiply-adds from 22 M to 6.4 M per 28x28 image (the 28x28 layers dominate), which is what
# makes CPU training fast; the last layer stays at 128 because at 7x7 it is cheap.
CNN_WIDTHS = (16, 16, 32, 32, 128)
# The head keeps a coarse 3x3 map instead of global pooling: where a feature sits (sleeve vs
# collar) matters on Fashion-MNIST; measured +2 points test accuracy after 4 epochs.
CNN_HEAD_GRID = 3

RESNET20_STAGE_WIDTHS = (16, 32, 64)
RESNET20_BLOCKS_PER_STAGE = 3

# (expansion t, output channels c, repeats n, first stride s), as in Table 2 of Sandler et al.
# 2018, cut down to four stages for 28/32 px inputs: 28 -> 14 -> 7 -> 4.
MOBILENETV2_STEM_WIDTH = 16
MOBILENETV2_BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 2, 2))
MOBILENETV2_HEAD_WIDTH = 256


WEIGHTED_TYPES = (nn.Conv2d, nn.Linear)


def weighted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every conv and linear layer, in module order: the layers
    that every quantizer, regularizer, reparametrization and analysis of the package acts on."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, WEIGHTED_TYPES)]


def target_layers(
    model: nn.Module, *, include: Iterable[str] | None = None, exclude: Iterable[str] = ()
) -> dict[str, nn.Module]:
    """The :func:`weighted_layers` of ``model`` by qualified name that a reparametrization (SatNL,
    a QAT quantizer) goes on: those named in ``include`` (in its order; None: all, in module order)
    less those named in ``exclude``. ``ValueError`` if either names a module that is not such a
    layer, or is a string instead of a collection of names."""
    layers = dict(weighted_layers(model))
    chosen = list(layers) if include is None else _layer_names("include", include, layers)
    excluded = set(_layer_names("exclude", exclude, layers))
    return {name: layers[name] for name in chosen if name not in excluded}


def _layer_names(argument: str, names: Iterable[str], layers: dict[str, nn.Module]) -> list[str]:
    if isinstance(names, str):
        raise ValueError(  # noqa: TRY004 (a usage error, as every other check here)
            f"{argument} must be a collection of module names, got the string {names!r}"
        )
    names = list(names)
    unknown = sorted(set(names) - set(layers))
    if unknown:
        raise ValueError(
            f"{argument} names modules that are not Conv2d/Linear layers of the model: {unknown}; "
            f"allowed: {sorted(layers)}"
        )
    return names


class ConvBN(nn.Sequential):
    """Conv2d (no bias, padding ``kernel_size // 2``) followed by BatchNorm2d.

    Exactly two children, ``conv`` and ``bn``, so that ``fold_bn`` can replace the pair by one
    biased convolution (Jacob et al. 2018, arXiv 1712.05877, §3.2).
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1
    ) -> None:
        conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
            groups=groups, bias=False,
        )  # fmt: skip
        super().__init__(OrderedDict(conv=conv, bn=nn.BatchNorm2d(out_channels)))


class Add(nn.Module):
    """Elementwise sum of two tensors: the residual addition, as a module so it can be hooked."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


# ---------------------------------------------------------------------------------------------
# Small VGG-style CNN
# ---------------------------------------------------------------------------------------------


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [ConvBN(in_channels, out_channels, 3), nn.ReLU(inplace=True)]


class SmallCNN(nn.Sequential):
    """A small VGG-style network (Simonyan & Zisserman 2015, arXiv 1409.1556) with BatchNorm.

    ConvBN-ReLU x2, MaxPool, ConvBN-ReLU x2, MaxPool, ConvBN-ReLU, adaptive max pool to 3x3,
    Flatten, Linear. Works for any input of at least 4x4 pixels (the adaptive pool makes the
    classifier size independent of it); the book's default for Fashion-MNIST.
    """

    def __init__(
        self, in_channels: int, num_classes: int, widths: tuple[int, ...] = CNN_WIDTHS
    ) -> None:
        w1, w2, w3, w4, w5 = widths
        super().__init__(
            *_conv_bn_relu(in_channels, w1),
            *_conv_bn_relu(w1, w2),
            nn.MaxPool2d(2),
            *_conv_bn_relu(w2, w3),
            *_conv_bn_relu(w3, w4),
            nn.MaxPool2d(2),
            *_conv_bn_relu(w4, w5),
            nn.AdaptiveMaxPool2d(CNN_HEAD_GRID),
            nn.Flatten(),
            nn.Linear(w5 * CNN_HEAD_GRID**2, num_classes),
        )


# ---------------------------------------------------------------------------------------------
# ResNet-20
# ---------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet basic block: ConvBN-ReLU-ConvBN, plus the shortcut, then ReLU (He et al. 2016)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(in_channels, out_channels, 3, stride=stride)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = ConvBN(out_channels, out_channels, 3)
        self.shortcut: nn.Module = (
            ConvBN(in_channels, out_channels, 1, stride=stride)
            if stride != 1 or in_channels != out_channels
            else nn.Identity()
        )
        self.add = Add()
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.relu1(self.conv1(x)))
        return self.relu2(self.add(out, self.shortcut(x)))


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (He et al. 2016, arXiv 1512.03385, §4.2): a 3x3 stem with 16 channels,
    three stages of three basic blocks with 16/32/64 channels (stride 2 at stages 2 and 3),
    global average pooling and a linear classifier.

    Downsampling shortcuts are 1x1 ConvBN projections (the paper's option B) rather than
    option A's zero padding, so every layer is a conv the quantizers can see. 0.27 M parameters.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        stem_width = RESNET20_STAGE_WIDTHS[0]
        self.stem = ConvBN(in_channels, stem_width, 3)
        self.stem_relu = nn.ReLU(inplace=True)
        blocks, width = [], stem_width
        for stage, stage_width in enumerate(RESNET20_STAGE_WIDTHS):
            for index in range(RESNET20_BLOCKS_PER_STAGE):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(width, stage_width, stride))
                width = stage_width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem_relu(self.stem(x)))
        return self.fc(self.flatten(self.pool(x)))


# ---------------------------------------------------------------------------------------------
# MobileNetV2
# ---------------------------------------------------------------------------------------------


class InvertedResidual(nn.Module):
    """MobileNetV2 block (Sandler et al. 2018, arXiv 1801.04381): 1x1 expand ConvBN-ReLU6,
    3x3 depthwise ConvBN-ReLU6, 1x1 linear projection ConvBN; residual when the shapes match.

    With expansion 1 the expand layer is left out, as in the paper's first block.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if expansion != 1:
            layers["expand"] = ConvBN(in_channels, hidden, 1)
            layers["expand_relu"] = nn.ReLU6(inplace=True)
        layers["depthwise"] = ConvBN(hidden, hidden, 3, stride=stride, groups=hidden)
        layers["depthwise_relu"] = nn.ReLU6(inplace=True)
        layers["project"] = ConvBN(hidden, out_channels, 1)
        self.body = nn.Sequential(layers)
        self.use_residual = stride == 1 and in_channels == out_channels
        self.add = Add() if self.use_residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return self.add(x, out) if self.add is not None else out


class MobileNetV2(nn.Module):
    """A small MobileNetV2 (Sandler et al. 2018, arXiv 1801.04381) for 28/32 px inputs.

    Stride-1 3x3 stem with 16 channels, the inverted-residual stages of ``MOBILENETV2_BLOCKS``
    (28 -> 14 -> 7 -> 4 px), a 1x1 ConvBN-ReLU6 head to 256 channels, global average pooling
    and a linear classifier. About 0.15 M parameters.

    Not ``torchvision.models.mobilenet_v2``: it hard-wires a 3-channel stride-2 stem of 32 channels,
    a 1280-channel head and dropout (2.2 M parameters for 10 classes, sized for 224 px ImageNet),
    and sums its residuals as ``x + ...`` instead of through :class:`Add`.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.stem = ConvBN(in_channels, MOBILENETV2_STEM_WIDTH, 3)
        self.stem_relu = nn.ReLU6(inplace=True)
        blocks, width = [], MOBILENETV2_STEM_WIDTH
        for expansion, out_width, repeats, first_stride in MOBILENETV2_BLOCKS:
            for index in range(repeats):
                stride = first_stride if index == 0 else 1
                blocks.append(InvertedResidual(width, out_width, stride, expansion))
                width = out_width
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBN(width, MOBILENETV2_HEAD_WIDTH, 1)
        self.head_relu = nn.ReLU6(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(MOBILENETV2_HEAD_WIDTH, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem_relu(self.stem(x)))
        x = self.head_relu(self.head(x))
        return self.fc(self.flatten(self.pool(x)))


# ---------------------------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------------------------

_BUILDERS: dict[str, Callable[[int, int], nn.Module]] = {
    "cnn": SmallCNN,
    "resnet20": ResNet20,
    "mobilenetv2": MobileNetV2,
}


def available() -> tuple[str, ...]:
    """Names accepted by :func:`make_model`."""
    return tuple(_BUILDERS)


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan-out) conv weights (He et al. 2015, arXiv 1502.01852), BatchNorm weight 1
    and bias 0. Linear layers keep PyTorch's default init. Randomness comes from the caller's
    ``torch.manual_seed``."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def make_model(name: str, in_channels: int, num_classes: int) -> nn.Module:
    """Build the model ``name`` (one of :func:`available`) for ``in_channels`` x H x W inputs."""
    check_choice("model", name, available())
    check_int("in_channels", in_channels, minimum=1, example=1)
    check_int("num_classes", num_classes, minimum=1, example=10)
    model = _BUILDERS[name](in_channels, num_classes)
    init_weights(model)
    return model


def stem_and_classifier(model: nn.Module) -> tuple[str, str | None]:
    """Qualified names of the stem (first ``nn.Conv2d``) and the classifier (last ``nn.Linear``,
    ``None`` if there is none), the layers deployments keep at 8 bits."""
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not convs:
        raise ValueError("the model has no nn.Conv2d, so it has no stem")
    return convs[0], (linears[-1] if linears else None)


def edge_layers(model: nn.Module, kept: bool = True) -> set[str | None]:
    """The names of the layers a deployment keeps at 8 bits: the stem and the classifier
    (:func:`stem_and_classifier`) when ``kept`` (the primary setting, book/methods.md §0), else none."""
    return set(stem_and_classifier(model)) if kept else set()


def reconstruction_blocks(model: nn.Module) -> list[nn.Sequential]:
    """The blocks block reconstruction (BRECQ, Li et al. 2021, arXiv 2102.05426, §3.3) learns one at a
    time, in order: views (``nn.Sequential`` of the model's own modules, nothing copied) whose
    composition is the model. The CNN: its ConvBN-ReLU layers up to each pooling, then the
    classifier; ResNet-20 and MobileNetV2: the stem with its activation, each residual block, the
    head (MobileNetV2) and the classifier with its pooling. Any other model: one weighted layer a
    block, for which block reconstruction is AdaRound."""
    if isinstance(model, SmallCNN):
        blocks, current = [], []
        for module in model:
            current.append(module)
            if isinstance(module, (nn.MaxPool2d, nn.AdaptiveMaxPool2d)):
                blocks.append(current)
                current = []
        return [nn.Sequential(*block) for block in (*blocks, current)]
    if isinstance(model, (ResNet20, MobileNetV2)):
        head = [[model.head, model.head_relu]] if isinstance(model, MobileNetV2) else []
        return [nn.Sequential(*block) for block in ([model.stem, model.stem_relu], *([b] for b in model.blocks),
                                                     *head, [model.pool, model.flatten, model.fc])]
    return [nn.Sequential(layer) for _, layer in weighted_layers(model)]


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or frozen; buffers such as BN running stats excluded)."""
    return sum(p.numel() for p in model.parameters())
