"""Registering weight parametrizations on many layers at once (shared by SatNL and QAT)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torch.nn.utils import parametrize


def register_weight_parametrizations(
    targets: dict[str, nn.Module], build: Callable[[str, nn.Module], nn.Module], fix: str
) -> None:
    """Register ``build(name, layer)`` on the ``weight`` of every target layer.

    Refuses a layer whose weight already has a parametrization (``fix`` says what to do), and
    builds every parametrization before registering any, so a failure leaves the model untouched.
    """
    for name, layer in targets.items():
        if parametrize.is_parametrized(layer, "weight"):
            raise ValueError(f"layer {name!r} already has a weight parametrization; {fix}")
    built = {name: build(name, layer) for name, layer in targets.items()}
    for name, layer in targets.items():
        parametrize.register_parametrization(layer, "weight", built[name])
