"""Registering weight parametrizations on many layers at once (shared by SatNL and QAT)."""

from __future__ import annotations

from collections.abc import Callable

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
