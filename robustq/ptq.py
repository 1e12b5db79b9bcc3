"""Post-training quantization of whole models, and the bit-width sweep every chapter evaluates with.

``quantize_model`` returns a fake-quantized copy: BatchNorm folded into the preceding conv
(methods.md §0), each conv/linear weight quantized by :func:`robustq.quant.quantize`, and, with an
activation spec, the input of each conv/linear fake-quantized with ranges calibrated on a few
training batches. The original model is never modified.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Iterable, Sequence

import pandas as pd
import torch
from torch import nn
from torch.nn.utils import parametrize

from robustq import quant
from robustq.data import BatchLoader, Dataset, Split, eval_loader
from robustq.models import ConvBN
from robustq.quant import QuantSpec
from robustq.train import EVAL_BATCH_SIZE, evaluate

FLOAT_BITS = 32  # how tidy frames label an unquantized tensor
WEIGHTED = (nn.Conv2d, nn.Linear)


def fold_bn(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every ``ConvBN`` replaced by one conv with bias:
    ``W' = W * gamma / sqrt(var + eps)``, ``b' = beta + (b - mean) * gamma / sqrt(var + eps)``
    (Krishnamoorthi 2018, arXiv 1806.08342, §2.5). Outputs equal the original's in eval mode."""
    folded = materialize(model)
    for parent in list(folded.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ConvBN):
                setattr(parent, name, _fold_conv_bn(child.conv, child.bn))
    return folded.eval()


def materialize(model: nn.Module) -> nn.Module:
    """An eval-mode copy whose parametrized weights (SatNL, QAT) are replaced by their values."""
    plain = copy.deepcopy(model).eval()
    for module in plain.modules():
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return plain


@torch.no_grad()
def _fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    fused = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
    ).to(conv.weight.device, conv.weight.dtype)
    gain = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.weight.copy_(conv.weight * gain.reshape(-1, 1, 1, 1))
    fused.bias.copy_(bn.bias + (bias - bn.running_mean) * gain)
    return fused


def weighted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every conv and linear layer, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, WEIGHTED)]


def quantize_model(
    model: nn.Module,
    w_spec: QuantSpec | None,
    a_spec: QuantSpec | None = None,
    calib: torch.Tensor | None = None,
    *,
    first_last_8bit: bool = False,
    fold: bool = True,
) -> nn.Module:
    """A fake-quantized copy of ``model``.

    ``w_spec`` quantizes every conv/linear weight (per output channel along axis 0 when
    ``w_spec.per_channel``); ``None`` keeps weights in float. ``first_last_8bit`` keeps the stem
    conv and the classifier at 8 bits, a common deployment choice. ``a_spec`` quantizes the input of
    every conv/linear with ranges calibrated on ``calib`` (a normalised batch of training images); a
    layer whose calibration inputs are all >= 0 (after ReLU) gets an unsigned grid with zero point 0.
    """
    if a_spec is not None and calib is None:
        raise ValueError("a_spec needs calib: pass a batch of normalised training images, e.g. calibration_batch(data)")
    quantized = fold_bn(model) if fold else materialize(model)
    if w_spec is not None:
        _quantize_weights(quantized, w_spec, first_last_8bit)
    if a_spec is not None:
        attach_activation_quantizers(quantized, calibrate(quantized, calib, a_spec))
    return quantized


@torch.no_grad()
def _quantize_weights(model: nn.Module, spec: QuantSpec, first_last_8bit: bool) -> None:
    layers = weighted_layers(model)
    edge = {layers[0][0], _last_linear(layers)} if first_last_8bit else set()
    for name, module in layers:
        layer_spec = dataclasses.replace(spec, bit_width=max(8, spec.bit_width)) if name in edge else spec
        module.weight.copy_(quant.quantize(module.weight, layer_spec, axis=0))


def _last_linear(layers: list[tuple[str, nn.Module]]) -> str | None:
    linear = [name for name, m in layers if isinstance(m, nn.Linear)]
    return linear[-1] if linear else None


@torch.no_grad()
def calibrate(model: nn.Module, calib: torch.Tensor, a_spec: QuantSpec) -> dict[str, tuple]:
    """Per conv/linear layer, the qparams of its input on the calibration batch."""
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_pre_hook(lambda _m, args, name=name: inputs.__setitem__(name, args[0].detach()))
        for name, module in weighted_layers(model)
    ]
    try:
        model.eval()(calib.to(next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    qparams = {}
    for name, x in inputs.items():
        spec = dataclasses.replace(a_spec, symmetric=False) if bool((x >= 0).all()) else a_spec
        qparams[name] = quant.choose_qparams(x, dataclasses.replace(spec, per_channel=False))
    return qparams


def attach_activation_quantizers(model: nn.Module, qparams: dict[str, tuple]) -> None:
    """Fake-quantize the input of each named layer with fixed, calibrated qparams."""
    for name, module in weighted_layers(model):
        module.register_forward_pre_hook(lambda _m, args, qp=qparams[name]: (quant.fake_quant(args[0], *qp),))


def calibration_batch(data: Dataset, size: int = 512, seed: int = 0) -> torch.Tensor:
    """``size`` normalised training images drawn with a seeded permutation (no augmentation)."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(data.train.labels), generator=generator)[:size]
    subset = Split(data.train.images[index], data.train.labels[index])
    return next(iter(BatchLoader(subset, len(index), mean=data.mean, std=data.std)))[0]


def accuracy(model: nn.Module, data: Dataset, split: str = "test", batch_size: int = EVAL_BATCH_SIZE) -> float:
    """Top-1 accuracy in [0, 1] on ``data.<split>``, in large batches."""
    return evaluate(model, eval_loader(data, split, batch_size, next(model.parameters()).device))


def bit_sweep(
    model: nn.Module,
    data: Dataset,
    w_bits: Sequence[int] = (8, 6, 5, 4, 3, 2),
    a_bits: Sequence[int | None] = (None, 8),
    *,
    symmetric: Iterable[bool] = (True,),
    per_channel: Iterable[bool] = (False,),
    policy: Iterable[str] = ("minmax",),
    first_last_8bit: bool = False,
    calib_size: int = 512,
) -> pd.DataFrame:
    """Test accuracy of ``model`` PTQ'd at every combination of the arguments.

    One tidy row per ``(w_bits, a_bits, symmetric, per_channel, policy)`` with ``acc`` and the
    float model's ``fp_acc``; ``a_bits`` of ``FLOAT_BITS`` means float activations. Activations use
    an asymmetric min-max spec of the given bit-width, calibrated once on the float model and
    reused for every weight spec. BN is folded once.
    """
    folded = fold_bn(model)
    calib = calibration_batch(data, calib_size)
    fp_acc = accuracy(folded, data)
    act_qparams = {a: calibrate(folded, calib, QuantSpec(a, symmetric=False)) for a in a_bits if a is not None}
    rows = []
    for sym, pc, pol, w in itertools.product(symmetric, per_channel, policy, w_bits):
        weights_only = quantize_model(folded, QuantSpec(w, sym, True, pc, pol), fold=False, first_last_8bit=first_last_8bit)
        for a in a_bits:
            candidate = weights_only if a is None else _with_activations(weights_only, act_qparams[a])
            rows.append(
                {"w_bits": w, "a_bits": a or FLOAT_BITS, "symmetric": sym, "per_channel": pc,
                 "policy": pol, "acc": accuracy(candidate, data), "fp_acc": fp_acc}
            )
    return pd.DataFrame(rows)


def _with_activations(model: nn.Module, qparams: dict[str, tuple]) -> nn.Module:
    quantized = copy.deepcopy(model)
    attach_activation_quantizers(quantized, qparams)
    return quantized
