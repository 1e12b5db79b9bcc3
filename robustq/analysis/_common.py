"""Helpers shared by the :mod:`robustq.analysis` modules, each defined once here: a model as the
analyses quantize it, and the per-tensor min-max step. Private to the package."""

from __future__ import annotations

import torch
from torch import nn

from robustq import ptq, quant
from robustq.quant import QuantSpec


def _deployed(model: nn.Module, fold: bool) -> nn.Module:
    """The float network as it is quantized: BN folded, or plain weights with BN kept."""
    return ptq.fold_bn(model) if fold else ptq.materialize(model)


def _minmax_step(weight: torch.Tensor, bit_width: int) -> float:
    """The per-tensor symmetric min-max step ``max|w| / (2^(b-1) - 1)`` (book/methods.md §0)."""
    return float(quant.choose_qparams(weight, QuantSpec(bit_width))[0])
