"""Helpers shared by the :mod:`robustq.analysis` modules, each defined once here: the per-tensor
min-max step. Private to the package."""

from __future__ import annotations

import torch

from robustq import quant
from robustq.quant import QuantSpec


def _minmax_step(weight: torch.Tensor, bit_width: int) -> float:
    """The per-tensor symmetric min-max step ``max|w| / (2^(b-1) - 1)`` (book/methods.md §0)."""
    return float(quant.choose_qparams(weight, QuantSpec(bit_width))[0])
