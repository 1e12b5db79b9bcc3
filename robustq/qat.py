"""Weight-only quantization-aware training: four fake-quantizers as ``torch.nn.utils.parametrize``
parametrizations of ``weight`` (book/methods.md §6).

* ``"ste"``: the shared symmetric narrow-range quantizer of ``robustq.quant`` (min-max range,
  per-tensor or per-channel) with a straight-through gradient (Bengio et al., arXiv 1308.3432);
* ``"lsq"``: LSQ, learned step size (Esser et al., ICLR 2020, arXiv 1902.08153);
* ``"dorefa"``: DoReFa-Net's weight quantizer (Zhou et al., arXiv 1606.06160);
* ``"wrpn"``: WRPN's weight quantizer (Mishra et al., arXiv 1709.01134).

The latent full-precision weight stays the trainable parameter
(``layer.parametrizations.weight.original``); ``layer.weight`` is its fake-quantized value.
``remove_qat`` replaces each quantized weight with the weight the quantizer sees just before
rounding, and ``describe_quantizers`` keeps what ``requantize`` needs to quantize it again exactly
as trained (LSQ's learned step), or at another bit-width with the same quantizer family (cross-bit
evaluation, book/methods.md §7).

``prepare_qat(..., stack_on_satnl=True)`` puts an ``"ste"`` or ``"lsq"`` quantizer on top of a
SatNL weight (``robustq.satnl``): the layer's weight is ``q(f(theta))``, ``theta`` the trained
parameter; ``remove_qat`` then drops the quantizer and leaves ``f(theta)`` to ``remove_satnl``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from robustq.models import ConvBN, edge_layers, target_layers
from robustq.params import check_choice
from robustq.quant import QuantSpec, quantize, round_ste, validate_bit_width
from robustq.reparam import in_layout_of, register_weight_parametrizations
from robustq.satnl import SaturatingWeight

QUANTIZERS = ("ste", "lsq", "dorefa", "wrpn")
# Quantizers that round their input as it comes (``pre_rounding`` is the identity), so they can sit
# on top of SatNL: DoReFa's tanh and WRPN's clamp would replace SatNL's bound with their own.
STACKABLE_QUANTIZERS = ("ste", "lsq")


class WeightQuantizer(nn.Module):
    """Base of the QAT weight quantizers: ``forward`` fake-quantizes, ``pre_rounding`` returns the
    full-precision weight the quantizer rounds (used by ``remove_qat``)."""

    def __init__(self, bit_width: int) -> None:
        super().__init__()
        self.bit_width = validate_bit_width(bit_width)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return in_layout_of(w, self.quantize_pre_rounded(self.pre_rounding(w)))

    def pre_rounding(self, w: torch.Tensor) -> torch.Tensor:
        """The full-precision weight the quantizer rounds (``remove_qat`` keeps it)."""
        return w

    def quantize_pre_rounded(self, v: torch.Tensor) -> torch.Tensor:
        """The rounding stage alone: ``forward(w) == quantize_pre_rounded(pre_rounding(w))``, so a
        model finalized by ``remove_qat`` is re-quantized exactly as it trained."""
        raise NotImplementedError

    def describe(self) -> dict:
        """JSON-able state that rebuilds this quantizer on the pre-rounded weight
        (:func:`quantizer_from_description`)."""
        return {"quantizer": self.name, "bit_width": self.bit_width}

    def extra_repr(self) -> str:
        return f"bit_width={self.bit_width}"


class STEWeight(WeightQuantizer):
    """Straight-through QAT with the shared quantizer (book/methods.md §0 and §6; STE of Bengio et al.,
    arXiv 1308.3432): ``quant.quantize(w, QuantSpec(bit_width, symmetric=True, narrow_range=True,
    per_channel=per_channel))``, min-max range over the output-channel axis 0 when per-channel.
    Gradient 1 for every weight (the min-max range clips nothing); the scale is a constant."""

    name = "ste"

    def __init__(self, bit_width: int, per_channel: bool = False) -> None:
        super().__init__(bit_width)
        self.spec = QuantSpec(self.bit_width, symmetric=True, narrow_range=True, per_channel=per_channel)

    def quantize_pre_rounded(self, v: torch.Tensor) -> torch.Tensor:
        return quantize(v, self.spec, axis=0)

    def describe(self) -> dict:
        return {**super().describe(), "per_channel": self.spec.per_channel}

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

    name = "lsq"

    def __init__(self, bit_width: int, init_weight: torch.Tensor) -> None:
        super().__init__(bit_width)
        self.q_p = 2 ** (self.bit_width - 1) - 1
        self.q_n = self.q_p
        self.grad_scale = 1.0 / math.sqrt(init_weight.numel() * self.q_p)
        init_step = 2 * init_weight.detach().abs().mean() / math.sqrt(self.q_p)
        if not init_step > 0:
            raise ValueError("LSQWeight cannot initialise its step from an all-zero init_weight")
        self.scale = nn.Parameter(init_step.clone())

    def quantize_pre_rounded(self, v: torch.Tensor) -> torch.Tensor:
        step = _scale_gradient(self.scale, self.grad_scale)
        return step * round_ste(torch.clamp(v / step, -self.q_n, self.q_p))

    def describe(self) -> dict:
        return {**super().describe(), "scale": float(self.scale.detach())}

    @torch.no_grad()
    def carry_step(self, scale: float, trained_bit_width: int) -> None:
        """Set the step learned at ``trained_bit_width`` as ``s' = s Q_P(b) / Q_P(b')`` (book/methods.md §7):
        the same clipping range ``s Q_P`` on this quantizer's grid."""
        trained_q_p = 2 ** (validate_bit_width(trained_bit_width) - 1) - 1
        self.scale.fill_(scale * (trained_q_p / self.q_p))  # a ratio of exactly 1 keeps s bit for bit


def _scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    # Value of x, gradient times factor: LSQ's gradient scale.
    return (x - x * factor).detach() + x * factor


class DoReFaWeight(WeightQuantizer):
    """DoReFa-Net's k-bit weight quantizer (Zhou et al., arXiv 1606.06160; book/methods.md §6):
    ``2 quantize_k(tanh(w) / (2 max|tanh w|) + 1/2) - 1`` with
    ``quantize_k(x) = round(x (2^k - 1)) / (2^k - 1)`` and a straight-through round; outputs lie on
    the ``2^k`` levels ``2 i / (2^k - 1) - 1``. The max is not detached, as in DoReFa."""

    name = "dorefa"

    def quantize_pre_rounded(self, v: torch.Tensor) -> torch.Tensor:
        levels = 2**self.bit_width - 1
        return 2 * (round_ste((v / 2 + 0.5) * levels) / levels) - 1

    def pre_rounding(self, w: torch.Tensor) -> torch.Tensor:
        """``tanh(w) / max|tanh w|``, in [-1, 1]."""
        saturated = torch.tanh(w)
        return saturated / saturated.abs().max().clamp_min(torch.finfo(w.dtype).tiny)


class WRPNWeight(WeightQuantizer):
    """WRPN's weight quantizer (Mishra et al., arXiv 1709.01134; book/methods.md §6):
    ``round((2^(k-1) - 1) clamp(w, -1, 1)) / (2^(k-1) - 1)`` with a straight-through round; outputs
    lie on the ``2^k - 1`` levels ``j / (2^(k-1) - 1)``. The grid is fixed to [-1, 1]: with
    PyTorch's default init most weights are far below one step at low bit-widths and round to 0
    (WRPN compensates by widening layers, which this package does not do)."""

    name = "wrpn"

    def quantize_pre_rounded(self, v: torch.Tensor) -> torch.Tensor:
        levels = 2 ** (self.bit_width - 1) - 1
        return round_ste(levels * v) / levels

    def pre_rounding(self, w: torch.Tensor) -> torch.Tensor:
        """``clamp(w, -1, 1)``."""
        return torch.clamp(w, -1.0, 1.0)


@torch.no_grad()
def scale_init_to_grid(model: nn.Module, exclude: Iterable[str] = ()) -> nn.Module:
    """Divide the weights of every conv followed by BatchNorm (a ``models.ConvBN``), except those
    named in ``exclude``, by their largest magnitude, so that they span WRPN's fixed grid on
    [-1, 1] (Mishra et al., arXiv 1709.01134). BN normalises the conv's output, so in training mode
    (batch statistics) the float network computes the same function. Our reconstruction [recon]: with PyTorch's default init most weights
    of a 3-bit WRPN layer lie below half a step and round to 0, and training died on some seeds
    (book/methods.md §6). Modifies ``model`` in place and returns it."""
    excluded = set(exclude)
    for name, module in model.named_modules():
        if isinstance(module, ConvBN) and f"{name}.conv" not in excluded:
            weight = module.conv.weight
            weight.div_(weight.abs().max().clamp_min(torch.finfo(weight.dtype).tiny))
    return model


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


def pre_rounded(quantizer: str, bit_width: int, w: torch.Tensor) -> torch.Tensor:
    """What ``quantizer`` at ``bit_width`` rounds for the latent weights ``w``: ``tanh(w) / max|tanh w|``
    for ``"dorefa"``, ``clamp(w, -1, 1)`` for ``"wrpn"`` (its :meth:`WeightQuantizer.pre_rounding`)."""
    return make_weight_quantizer(quantizer, bit_width, w).pre_rounding(w)


def prepare_qat(
    model: nn.Module,
    quantizer: str = "ste",
    bit_width: int = 4,
    *,
    per_channel: bool = False,
    exclude: Iterable[str] = (),
    edge_bit_width: int | None = None,
    edge_quantizer: str | None = None,
    stack_on_satnl: bool = False,
) -> nn.Module:
    """Register a weight fake-quantizer (see ``make_weight_quantizer``; book/methods.md §6) on every
    ``nn.Conv2d`` and ``nn.Linear`` of ``model`` whose qualified name is not in ``exclude``.

    ``edge_bit_width`` (e.g. 8) quantizes the stem conv and the classifier at that bit-width
    instead of ``bit_width``, as LSQ and SinReQ train (book/methods.md §7, the book's QAT setting);
    ``None`` uses ``bit_width`` everywhere. ``edge_quantizer`` is those two layers' quantizer
    (``None``: ``quantizer``): ``"ste"`` gives them the shared min-max grid scaled to each layer,
    where WRPN's grid, fixed to [-1, 1], would leave a classifier's weights of about ±0.03 a handful
    of its 255 levels (issue #25; book/methods.md §6).

    ``stack_on_satnl=True`` accepts layers that already carry SatNL (``robustq.satnl``) and
    chains the quantizer after it, so the layer's weight is ``q(f(theta))`` (only for
    ``STACKABLE_QUANTIZERS``; the stack of the ``symreg_satnl_lsq`` method). Any other
    parametrization is still refused.

    Modifies ``model`` in place and returns it. Raises ``ValueError`` if QAT is already prepared,
    or if a target weight already has another parametrization: SatNL must be folded first
    (``remove_satnl``), or its layers excluded, or stacked on with ``stack_on_satnl=True``.
    """
    validate_bit_width(bit_width)
    edges = edge_layers(model, kept=edge_bit_width is not None)
    edge_bits = validate_bit_width(edge_bit_width) if edges else bit_width
    if edge_quantizer is not None:
        check_choice("edge_quantizer", edge_quantizer, QUANTIZERS)
    edge_quantizer = quantizer if edge_quantizer is None else edge_quantizer
    _check_quantizer_args(quantizer, per_channel)
    _check_quantizer_args(edge_quantizer, per_channel)
    if stack_on_satnl and {quantizer, edge_quantizer} - set(STACKABLE_QUANTIZERS):
        raise ValueError(
            f"stack_on_satnl=True needs a quantizer that rounds SatNL's output as it is, one of "
            f"{STACKABLE_QUANTIZERS}; got {quantizer!r}, {edge_quantizer!r} at the edges (fold SatNL first "
            "with remove_satnl instead)"
        )
    if has_qat(model):
        raise ValueError("QAT is already prepared on this model; call remove_qat first")
    register_weight_parametrizations(
        target_layers(model, exclude=exclude),
        lambda name, layer: make_weight_quantizer(
            *((edge_quantizer, edge_bits) if name in edges else (quantizer, bit_width)), layer.weight, per_channel
        ),
        fix="e.g. SatNL: fold it first (remove_satnl) or put the layer in exclude",
        stack_on=(SaturatingWeight,) if stack_on_satnl else (),
    )
    return model


def remove_qat(model: nn.Module) -> nn.Module:
    """Drop the QAT quantizers, keeping for each layer the weight its quantizer saw just before
    rounding: the latent ``w`` for ``"ste"`` and ``"lsq"``, ``tanh(w) / max|tanh w|`` for
    ``"dorefa"``, ``clamp(w, -1, 1)`` for ``"wrpn"``. Call :func:`describe_quantizers` first to keep
    what re-quantizing needs (LSQ's learned step): :func:`requantize` then reproduces the trained
    weights exactly, or re-quantizes them at another bit-width (cross-bit, book/methods.md §7).

    A quantizer stacked on SatNL (``prepare_qat(..., stack_on_satnl=True)``) is dropped from the
    chain alone: the weight stays ``f(theta)``, parametrized by SatNL, for ``remove_satnl``.

    The weight ``Parameter`` objects are kept. Modifies ``model`` in place and returns it; raises
    ``ValueError`` if the model has no QAT quantizer.
    """
    layers = [layer for layer in model.modules() if _qat_quantizer(layer) is not None]
    if not layers:
        raise ValueError("the model has no QAT quantizer to remove")
    for layer in layers:
        if len(layer.parametrizations["weight"]) > 1:
            _drop_stacked_quantizer(layer)
            continue
        with torch.no_grad():
            latent = _qat_quantizer(layer).pre_rounding(layer.parametrizations["weight"].original).clone()
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
        with torch.no_grad():
            layer.weight.copy_(latent)
    return model


def describe_quantizers(model: nn.Module) -> dict[str, dict]:
    """``{layer name: quantizer.describe()}`` for every layer with a QAT quantizer: JSON-able, so
    an experiment's cache entry can keep it beside the finalized weights."""
    return {
        name: _qat_quantizer(layer).describe()
        for name, layer in model.named_modules()
        if _qat_quantizer(layer) is not None
    }


def quantizer_from_description(description: dict, weight: torch.Tensor, bit_width: int | None = None) -> WeightQuantizer:
    """Rebuild a described quantizer for a pre-rounded ``weight``, at its trained bit-width or at
    ``bit_width``; LSQ's step is carried as ``s' = s Q_P(b) / Q_P(b')`` (book/methods.md §7)."""
    trained_bits = description["bit_width"]
    bits = trained_bits if bit_width is None else bit_width
    quantizer = make_weight_quantizer(
        description["quantizer"], bits, weight, description.get("per_channel", False)
    )
    if isinstance(quantizer, LSQWeight):
        quantizer.carry_step(description["scale"], trained_bits)
    return quantizer


@torch.no_grad()
def requantize(model: nn.Module, descriptions: dict[str, dict], bit_width_of=None) -> nn.Module:
    """Fake-quantize, in place, the finalized weights of a QAT-trained model with its own
    quantizers (:func:`describe_quantizers`). ``bit_width_of(name, trained_bit_width)`` picks each
    layer's bit-width; by default the trained one, which reproduces the trained model exactly."""
    modules = dict(model.named_modules())
    unknown = sorted(set(descriptions) - set(modules))
    if unknown:
        raise ValueError(f"the quantizer record names layers the model does not have: {unknown}")
    for name, description in descriptions.items():
        bits = bit_width_of(name, description["bit_width"]) if bit_width_of else None
        layer = modules[name]
        quantizer = quantizer_from_description(description, layer.weight, bits)
        layer.weight.copy_(quantizer.quantize_pre_rounded(layer.weight))
    return model


def _drop_stacked_quantizer(layer: nn.Module) -> None:
    chain = layer.parametrizations["weight"]
    quantizer = _qat_quantizer(layer)
    if quantizer is not chain[len(chain) - 1] or quantizer.name not in STACKABLE_QUANTIZERS:
        raise ValueError(
            f"cannot remove a {quantizer.name!r} quantizer that is not last in its weight's chain of "
            f"parametrizations ({[type(p).__name__ for p in chain]}); only {STACKABLE_QUANTIZERS} "
            "stacked last (prepare_qat(..., stack_on_satnl=True)) can be removed alone"
        )
    del chain[len(chain) - 1]


def float_weight(layer: nn.Module, original: torch.Tensor | None = None) -> torch.Tensor:
    """The float weight that ``layer``'s QAT quantizer receives: the output of the
    parametrizations registered before the quantizer (SatNL's ``f(theta)`` when QAT is stacked on
    SatNL, the latent weight for plain QAT), or ``layer.weight`` when it has no quantizer. With
    ``original``, the same map evaluated at that tensor in place of the trained parameter (to
    carry a perturbation of ``theta`` into weight space)."""
    if not parametrize.is_parametrized(layer, "weight"):
        return layer.weight if original is None else original
    if original is None and _qat_quantizer(layer) is None:
        return layer.weight
    chain = layer.parametrizations["weight"]
    value = chain.original if original is None else original
    for parametrization in chain:
        if isinstance(parametrization, WeightQuantizer):
            break
        value = parametrization(value)
    return value


def has_qat(model: nn.Module) -> bool:
    """Whether any module of ``model`` carries a QAT weight quantizer of this module."""
    return any(_qat_quantizer(layer) is not None for layer in model.modules())


def _check_quantizer_args(quantizer: str, per_channel: bool) -> None:
    check_choice("quantizer", quantizer, QUANTIZERS)
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
