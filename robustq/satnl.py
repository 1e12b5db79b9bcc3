"""SatNL: a saturating non-linearity on the weights (Park, Jang & Park, ECCV 2022, arXiv 2208.00338).

[summary] SatNL trains a latent tensor ``theta`` and uses ``W = tanh(...)`` as the layer's weight:
odd, bounded by a fixed bound, with a slope that falls with magnitude. It clamps the
full-precision range (so a min-max quantizer has no truncation error to trade off) and makes
small weights relatively more sensitive. The three forms below are **our reconstruction**
[recon] (book/methods.md §1); the paper's exact form was not available to us:

* ``"tanh"``: ``W = tanh(theta)``, bound 1;
* ``"scaled_tanh"``: ``W = alpha * tanh(theta / alpha)``, ``alpha`` fixed per layer at apply time;
* ``"normalized_tanh"``: ``W = tanh(theta) / max|tanh(theta)|``, so ``max|W| = 1`` always.

SatNL is a ``torch.nn.utils.parametrize`` parametrization of ``weight``; ``remove_satnl`` folds
it into plain weights before post-training quantization.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from robustq.models import target_layers
from robustq.params import check_choice
from robustq.reparam import in_layout_of, register_weight_parametrizations

SATNL_FORMS = ("tanh", "scaled_tanh", "normalized_tanh")
# Three standard deviations of the initial weights: beyond every weight of PyTorch's default
# (uniform, max = sqrt(3) std) init, beyond 99.7% of a Gaussian init.
DEFAULT_ALPHA_MULT = 3.0


class SaturatingWeight(nn.Module):
    """Parametrization ``theta -> W`` of SatNL (Park, Jang & Park, ECCV 2022, arXiv 2208.00338).

    The three ``form`` values are our reconstruction [recon] (book/methods.md §1, see the module
    docstring). ``alpha`` (a buffer, so it travels with ``state_dict``) is required for
    ``"scaled_tanh"`` and ignored otherwise.

    ``right_inverse`` maps a weight ``W`` to the ``theta`` that reproduces it:
    ``atanh(W / bound)`` scaled back, with ``W / bound`` clamped to ``+-(1 - eps)`` (``eps`` the
    dtype's machine epsilon). So a weight at or beyond the bound (``|W| >= 1`` for ``"tanh"``,
    ``|W| >= alpha`` for ``"scaled_tanh"``) starts at ``+-bound (1 - eps)``: saturated, with a
    near-zero gradient. ``"normalized_tanh"`` cannot keep the scale of ``W`` (its output always
    has ``max|W| = 1``); its inverse is ``atanh(W)`` (``W`` first shrunk below 1 if needed), so
    the effective weight becomes ``W / max|W|``: same direction, new scale.
    """

    def __init__(self, form: str = "scaled_tanh", alpha: float | None = None) -> None:
        super().__init__()
        check_choice("form", form, SATNL_FORMS)
        if form == "scaled_tanh" and (alpha is None or not alpha > 0):
            raise ValueError(f"alpha must be > 0 for form='scaled_tanh', got {alpha!r}")
        self.form = form
        if form == "scaled_tanh":
            self.register_buffer("alpha", torch.tensor(float(alpha)))

    @property
    def bound(self) -> torch.Tensor | float:
        """Largest ``|W|`` the form can output (1 except for ``"scaled_tanh"``)."""
        return self.alpha if self.form == "scaled_tanh" else 1.0

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        return in_layout_of(theta, self._saturate(theta))

    def _saturate(self, theta: torch.Tensor) -> torch.Tensor:
        if self.form == "tanh":
            return torch.tanh(theta)
        if self.form == "scaled_tanh":
            alpha = self.alpha.to(theta.dtype)
            return alpha * torch.tanh(theta / alpha)
        saturated = torch.tanh(theta)
        return saturated / saturated.abs().max().clamp_min(torch.finfo(theta.dtype).tiny)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        below_one = 1.0 - torch.finfo(weight.dtype).eps
        if self.form == "normalized_tanh":
            shrink = (weight.abs().max() / below_one).clamp_min(1.0)
            return torch.atanh(weight / shrink)
        bound = self.bound if self.form == "tanh" else self.alpha.to(weight.dtype)
        return bound * torch.atanh((weight / bound).clamp(-below_one, below_one))

    def extra_repr(self) -> str:
        alpha = f", alpha={self.alpha.item():.4g}" if self.form == "scaled_tanh" else ""
        return f"form={self.form!r}{alpha}"


def apply_satnl(
    model: nn.Module,
    form: str = "scaled_tanh",
    *,
    include: Iterable[str] | None = None,
    alpha_mult: float = DEFAULT_ALPHA_MULT,
) -> nn.Module:
    """Put SatNL (Park, Jang & Park, ECCV 2022, arXiv 2208.00338; forms are our reconstruction
    [recon], book/methods.md §1) on the ``weight`` of every ``nn.Conv2d`` and ``nn.Linear``.

    ``include`` restricts it to the modules with these qualified names (each must name a Conv2d
    or Linear). For ``"scaled_tanh"`` each layer's ``alpha = alpha_mult * std(W_init)`` is fixed
    now, from the weights at apply time. The layer's current weights are kept (see
    ``SaturatingWeight.right_inverse``). Modifies ``model`` in place and returns it. Raises
    ``ValueError`` if SatNL is already applied or a target weight already has another
    parametrization (e.g. a QAT quantizer): SatNL never goes on top of a quantizer. To combine them,
    fold SatNL first (``remove_satnl``), keep their layers disjoint (``include``/``exclude``), or
    stack the quantizer on SatNL (``robustq.qat.prepare_qat(..., stack_on_satnl=True)``).
    """
    check_choice("form", form, SATNL_FORMS)
    if not alpha_mult > 0:
        raise ValueError(f"alpha_mult must be > 0, got {alpha_mult!r}")
    if has_satnl(model):
        raise ValueError("SatNL is already applied to this model; call remove_satnl first")
    register_weight_parametrizations(
        target_layers(model, include=include),
        lambda name, layer: SaturatingWeight(form, _alpha_for(name, layer, form, alpha_mult)),
        fix="e.g. a QAT quantizer: remove it first (remove_qat) or leave the layer out with include=...",
    )
    return model


def remove_satnl(model: nn.Module) -> nn.Module:
    """Fold SatNL (Park, Jang & Park, ECCV 2022, arXiv 2208.00338) into plain weights.

    Each parametrized weight is replaced by its current value ``W = f(theta)``, so the model's
    outputs are unchanged bit for bit. Modifies ``model`` in place and returns it; raises
    ``ValueError`` if the model has no SatNL.
    """
    layers = [layer for layer in model.modules() if _has_satnl_weight(layer)]
    if not layers:
        raise ValueError("the model has no SatNL parametrization to remove")
    for layer in layers:
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    return model


def has_satnl(model: nn.Module) -> bool:
    """Whether any module of ``model`` carries a SatNL weight parametrization
    (Park, Jang & Park, ECCV 2022, arXiv 2208.00338)."""
    return any(_has_satnl_weight(layer) for layer in model.modules())


def _has_satnl_weight(layer: nn.Module) -> bool:
    return parametrize.is_parametrized(layer, "weight") and any(
        isinstance(p, SaturatingWeight) for p in layer.parametrizations["weight"]
    )


def _alpha_for(name: str, layer: nn.Module, form: str, alpha_mult: float) -> float | None:
    if form != "scaled_tanh":
        return None
    std = layer.weight.detach().std().item() if layer.weight.numel() > 1 else 0.0
    if not std > 0:
        raise ValueError(
            f"cannot set alpha for layer {name!r}: its weights have std {std!r}; "
            "leave the layer out with include=..."
        )
    return alpha_mult * std
