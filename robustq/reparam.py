"""Registering weight parametrizations on many layers at once (shared by SatNL and QAT)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize


def register_weight_parametrizations(
    targets: dict[str, nn.Module],
    build: Callable[[str, nn.Module], nn.Module],
    fix: str,
    *,
    stack_on: tuple[type[nn.Module], ...] = (),
) -> None:
    """Register ``build(name, layer)`` on the ``weight`` of every target layer.

    Refuses a layer whose weight already has a parametrization (``fix`` says what to do), unless
    every parametrization it has is an instance of a type in ``stack_on``: then the new one is
    appended after them and the chain computes ``new(old(original))`` (torch's parametrize chains
    a tensor's parametrizations in registration order). Builds every parametrization before
    registering any, so a failure leaves the model untouched.
    """
    for name, layer in targets.items():
        if parametrize.is_parametrized(layer, "weight") and not _only(layer, stack_on):
            raise ValueError(f"layer {name!r} already has a weight parametrization; {fix}")
    built = {name: build(name, layer) for name, layer in targets.items()}
    for name, layer in targets.items():
        parametrize.register_parametrization(layer, "weight", built[name])


def _only(layer: nn.Module, allowed: tuple[type[nn.Module], ...]) -> bool:
    return bool(allowed) and all(isinstance(p, allowed) for p in layer.parametrizations["weight"])


def in_layout_of(reference: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (a parametrization's output) with the strides of ``reference`` (its input).

    Elementwise ops give a one-input-channel kernel (the stem on grayscale images) contiguous
    strides even when the kernel is stored channels_last, and the stem's convolution then runs and
    backpropagates in the slower contiguous layout: SatNL measured 1.09x the baseline step, LSQ and
    WRPN 1.09x (``benchmarks/overhead.py``). Values are unchanged; the copy is of a kernel only."""
    if tensor.shape != reference.shape or tensor.stride() == reference.stride():
        return tensor
    return torch.empty_like(reference, dtype=tensor.dtype).copy_(tensor)
