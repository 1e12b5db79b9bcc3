"""Weight-only quantization-aware training: four fake-quantizers as ``torch.nn.utils.parametrize``
parametrizations of ``weight`` (methods.md §6).

* ``"ste"``: the shared symmetric narrow-range quantizer of ``robustq.quant`` (min-max range,
  per-tensor or per-channel) with a straight-through gradient (Bengio et al., arXiv 1308.3432);
* ``"lsq"``: LSQ, learned step size (Esser et al., ICLR 2020, arXiv 1902.08153);
* ``"dorefa"``: DoReFa-Net's weight quantizer (Zhou et al., arXiv 1606.06160);
* ``"wrpn"``: WRPN's weight quantizer (Mishra et al., arXiv 1709.01134).

The latent full-precision weight stays the trainable parameter
(``layer.parametrizations.weight.original``); ``layer.weight`` is its fake-quantized value.
``remove_qat`` replaces each quantized weight with the weight the quantizer sees just before
rounding, so the trained model can be post-training quantized at any bit-width (cross-bit
evaluation, methods.md §7).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from robustq.reparam import register_weight_parametrizations

from robustq.quant import QuantSpec, quantize, round_ste, validate_bit_width

QUANTIZERS = ("ste", "lsq", "dorefa", "wrpn")
QAT_LAYER_TYPES = (nn.Conv2d, nn.Linear)


class WeightQuantizer(nn.Module):
    """Base of the QAT weight quantizers: ``forward`` fake-quantizes, ``pre_rounding`` returns the
    full-precision weight the quantizer rounds (used by ``remove_qat``)."""

    def __init__(self, bit_width: int) -> None:
        super().__init__()
        self.bit_width = validate_bit_width(bit_width)

    def pre_rounding(self, w: torch.Tensor) -> torch.Tensor:
        return w

    def extra_repr(self) -> str:
        return f"bit_width={self.bit_width}"


class STEWeight(WeightQuantizer):
    """Straight-through QAT with the shared quantizer (methods.md §0 and §6; STE of Bengio et al.,
    arXiv 1308.3432): ``quant.quantize(w, QuantSpec(bit_width, symmetric=True, narrow_range=True,
    per_channel=per_channel))``, min-max range over the output-channel axis 0 when per-channel.
    Gradient 1 for every weight (the min-max range clips nothing); the scale is a constant."""

    def __init__(self, bit_width: int, per_channel: bool = False) -> None:
        super().__init__(bit_width)
        self.spec = QuantSpec(self.bit_width, symmetric=True, narrow_range=True, per_channel=per_channel)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return quantize(w, self.spec, axis=0)

    def extra_repr(self) -> str:
        return f"bit_width={self.bit_width}, per_channel={self.spec.per_channel}"


class LSQWeight(WeightQuantizer):
    """LSQ weight quantizer (Esser et al., ICLR 2020, arXiv 1902.08153, eq. 1-5).

    ``v_hat = s * round(clamp(v / s, -Q_N, Q_P))`` with a learnable scalar step ``s``
    (``self.scale``, an ``nn.Parameter``), initialised to ``2 mean|v| / sqrt(Q_P)`` and whose
    gradient is scaled by ``g = 1 / sqrt(N Q_P)`` (``N`` weights). Our choice: the grid is
    symmetric narrow-range, ``Q_N = Q_P = 2^(b-1) - 1``, like the rest of the package (LSQ's own
    signed grid has ``Q_N = 2^(b-1)``). The optimizer must be built after ``prepare_qat`` so that
    it sees ``scale``.
    """

    def __init__(self, bit_width: int, init_weight: torch.Tensor) -> None:
        super().__init__(bit_width)
        self.q_p = 2 ** (self.bit_width - 1) - 1
        self.q_n = self.q_p
        self.grad_scale = 1.0 / math.sqrt(init_weight.numel() * self.q_p)
        init_step = 2 * init_weight.detach().abs().mean() / math.sqrt(self.q_p)
        if not init_step > 0:
            raise ValueError("LSQWeight cannot initialise its step from an all-zero init_weight")
        self.scale = nn.Parameter(init_step.clone())

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        step = _scale_gradient(self.scale, self.grad_scale)
        return step * round_ste(torch.clamp(v / step, -self.q_n, self.q_p))


def _scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    # Value of x, gradient times factor: LSQ's gradient scale.
    return (x - x * factor).detach() + x * factor


class DoReFaWeight(WeightQuantizer):
    """DoReFa-Net's k-bit weight quantizer (Zhou et al., arXiv 1606.06160; methods.md §6):
    ``2 quantize_k(tanh(w) / (2 max|tanh w|) + 1/2) - 1`` with
    ``quantize_k(x) = round(x (2^k - 1)) / (2^k - 1)`` and a straight-through round; outputs lie on
    the ``2^k`` levels ``2 i / (2^k - 1) - 1``. The max is not detached, as in DoReFa."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        levels = 2**self.bit_width - 1
        unit = self.pre_rounding(w) / 2 + 0.5
        return 2 * (round_ste(unit * levels) / levels) - 1

    def pre_rounding(self, w: torch.Tensor) -> torch.Tensor:
        """``tanh(w) / max|tanh w|``, in [-1, 1]."""
        saturated = torch.tanh(w)
        return saturated / saturated.abs().max().clamp_min(torch.finfo(w.dtype).tiny)


class WRPNWeight(WeightQuantizer):
    """WRPN's weight quantizer (Mishra et al., arXiv 1709.01134; methods.md §6):
    ``round((2^(k-1) - 1) clamp(w, -1, 1)) / (2^(k-1) - 1)`` with a straight-through round; outputs
    lie on the ``2^k - 1`` levels ``j / (2^(k-1) - 1)``. The grid is fixed to [-1, 1]: with
    PyTorch's default init most weights are far below one step at low bit-widths and round to 0
    (WRPN compensates by widening layers, which this package does not do)."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        levels = 2 ** (self.bit_width - 1) - 1
        return round_ste(levels * self.pre_rounding(w)) / levels

    def pre_rounding(self, w: torch.Tensor) -> torch.Tensor:
        """``clamp(w, -1, 1)``."""
        return torch.clamp(w, -1.0, 1.0)


def make_weight_quantizer(
    quantizer: str, bit_width: int, weight: torch.Tensor, per_channel: bool = False
) -> WeightQuantizer:
    """The parametrization for one weight tensor: ``"ste"`` (shared quantizer + STE), ``"lsq"``
    (Esser et al., arXiv 1902.08153), ``"dorefa"`` (Zhou et al., arXiv 1606.06160) or ``"wrpn"``
    (Mishra et al., arXiv 1709.01134). ``per_channel`` is only supported by ``"ste"``."""
    _check_quantizer_args(quantizer, per_channel)
    if quantizer == "ste":
        return STEWeight(bit_width, per_channel=per_channel)
    if quantizer == "lsq":
        return LSQWeight(bit_width, weight)
    return DoReFaWeight(bit_width) if quantizer == "dorefa" else WRPNWeight(bit_width)


def prepare_qat(
    model: nn.Module,
    quantizer: str = "ste",
    bit_width: int = 4,
    *,
    per_channel: bool = False,
    exclude: Iterable[str] = (),
) -> nn.Module:
    """Register a weight fake-quantizer (see ``make_weight_quantizer``; methods.md §6) on every
    ``nn.Conv2d`` and ``nn.Linear`` of ``model`` whose qualified name is not in ``exclude``.

    Modifies ``model`` in place and returns it. Raises ``ValueError`` if QAT is already prepared,
    or if a target weight already has another parametrization: SatNL must be folded first
    (``remove_satnl``), or its layers excluded.
    """
    validate_bit_width(bit_width)
    _check_quantizer_args(quantizer, per_channel)
    if has_qat(model):
        raise ValueError("QAT is already prepared on this model; call remove_qat first")
    register_weight_parametrizations(
        _target_layers(model, exclude),
        lambda _name, layer: make_weight_quantizer(quantizer, bit_width, layer.weight, per_channel),
        fix="e.g. SatNL: fold it first (remove_satnl) or put the layer in exclude",
    )
    return model


def remove_qat(model: nn.Module) -> nn.Module:
    """Drop the QAT quantizers, keeping for each layer the weight its quantizer saw just before
    rounding: the latent ``w`` for ``"ste"`` and ``"lsq"`` (LSQ's learned step is discarded),
    ``tanh(w) / max|tanh w|`` for ``"dorefa"``, ``clamp(w, -1, 1)`` for ``"wrpn"``.

    Our choice (methods.md §7): the result is a full-precision model that a PTQ grid can
    quantize at any bit-width; quantizing it at the training bit-width with the training grid
    reproduces the QAT weights for DoReFa and WRPN (and for STE with the same spec). The weight
    ``Parameter`` objects are kept. Modifies ``model`` in place and returns it; raises
    ``ValueError`` if the model has no QAT quantizer.
    """
    layers = [layer for layer in model.modules() if _qat_quantizer(layer) is not None]
    if not layers:
        raise ValueError("the model has no QAT quantizer to remove")
    for layer in layers:
        with torch.no_grad():
            latent = _qat_quantizer(layer).pre_rounding(layer.parametrizations["weight"].original).clone()
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
        with torch.no_grad():
            layer.weight.copy_(latent)
    return model


def has_qat(model: nn.Module) -> bool:
    """Whether any module of ``model`` carries a QAT weight quantizer of this module."""
    return any(_qat_quantizer(layer) is not None for layer in model.modules())


def _check_quantizer_args(quantizer: str, per_channel: bool) -> None:
    if quantizer not in QUANTIZERS:
        raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
    if not isinstance(per_channel, bool):
        raise ValueError(f"per_channel must be True or False, got {per_channel!r}")
    if per_channel and quantizer != "ste":
        raise ValueError(
            f"per_channel=True is only supported by quantizer='ste', got quantizer={quantizer!r}"
        )


def _qat_quantizer(layer: nn.Module) -> WeightQuantizer | None:
    if not parametrize.is_parametrized(layer, "weight"):
        return None
    return next((p for p in layer.parametrizations["weight"] if isinstance(p, WeightQuantizer)), None)


def _target_layers(model: nn.Module, exclude: Iterable[str]) -> dict[str, nn.Module]:
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QAT_LAYER_TYPES)}
    if isinstance(exclude, str):
        raise ValueError(f"exclude must be a collection of module names, got the string {exclude!r}")
    unknown = sorted(set(exclude) - set(layers))
    if unknown:
        raise ValueError(
            f"exclude names modules that are not Conv2d/Linear layers of the model: {unknown}; "
            f"allowed: {sorted(layers)}"
        )
    excluded = set(exclude)
    return {name: layer for name, layer in layers.items() if name not in excluded}
