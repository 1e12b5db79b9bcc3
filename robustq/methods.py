"""The method registry: a name → what that method changes in training.

A method is built from *parts*. Each part is a frozen dataclass whose fields are its typed
hyperparameters (defaults and provenance in the docstring) and which may

* ``prepare`` the model before training (SatNL reparametrization, QAT quantizers),
* add a ``penalty`` to the loss (SymReg, KURE, SinReQ, oscillation, gradient-ℓ1),
* wrap the optimizer (SAM/ASAM),
* ``finalize`` the model after training into plain weights (fold SatNL, drop QAT quantizers).

``make("symreg_satnl_asam", lam=0.1)`` builds the parts of a registered method and routes each
keyword to every part that has a field of that name (so ``bit_width`` reaches both the QAT
quantizer and the SinReQ grid of ``sinreq_dorefa``). Layer rules follow each paper and are listed
per part.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from robustq import distributed, qat, regularizers, sam, satnl
from robustq.models import stem_and_classifier, weighted_layers
from robustq.params import check_choice, check_int
from robustq.quant import EDGE_BIT_WIDTH, QAT_BIT_WIDTH, validate_bit_width
from robustq.train import Extensions, StepContext

# --- layer selection -----------------------------------------------------------------------------


def is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


def latent_weight(module: nn.Module) -> torch.Tensor:
    """The trained tensor behind ``module.weight``: the parametrization's original if any."""
    if torch.nn.utils.parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


# --- parts ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """Base of every method part: typed, validated hyperparameters and no-op hooks."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            _check_type(type(self).__name__, f.name, getattr(self, f.name), hints[f.name])
        for name in ("lam", "lam_w", "lam_a", "rho", "eta", "alpha_mult", "ramp"):
            if hasattr(self, name):
                _check_nonnegative(type(self).__name__, name, getattr(self, name))
        if hasattr(self, "bit_width"):
            validate_bit_width(self.bit_width)

    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def penalty(self, model: nn.Module, context: StepContext) -> torch.Tensor | None:
        return None

    def wrap_optimizer(self, params, optimizer):
        return None

    def finalize(self, model: nn.Module) -> nn.Module:
        return model

    @property
    def penalty_from_epoch(self) -> int:
        """The first epoch the penalty acts (0 unless a warm start delays it)."""
        return 0

    capture_activations: typing.ClassVar[bool] = False
    double_backprop: typing.ClassVar[bool] = False
    # Whether the method's maths survives bfloat16 forward convolutions (penalties on the weights
    # are computed in float32 either way): False where the forward carries the method itself.
    bf16_safe: typing.ClassVar[bool] = True


@dataclass(frozen=True)
class SymReg(Part):
    """Symmetry regularization (Park, Jang & Park, ECCV 2022, arXiv 2208.00338), reconstructed:
    ``lam * mean_layers sym_reg(W_l)`` with the order-statistic penalty of
    :func:`robustq.regularizers.sym_reg` [recon]. Layers: every conv and linear weight except
    depthwise convs, where the paper reports it hurts [summary]. ``lam`` is not given by the
    sources [recon]: the chapters sweep it. Acts on the effective float weight: after SatNL, before
    any QAT quantizer (:func:`robustq.qat.float_weight`; ``f(theta)``, not ``q(f(theta))``, in
    ``symreg_satnl_lsq``)."""

    lam: float = 1.0
    pairing: str = "1:1"
    scope: str = "layer"
    normalize: bool = True
    skip_depthwise: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("pairing", self.pairing, regularizers.SYM_PAIRINGS)
        check_choice("scope", self.scope, regularizers.SYM_SCOPES)

    def penalty(self, model, context):
        layers = [m for _, m in weighted_layers(model) if not (self.skip_depthwise and is_depthwise(m))]
        terms = [regularizers.sym_reg(qat.float_weight(m), self.pairing, self.scope, self.normalize) for m in layers]
        return self.lam * torch.stack(terms).mean()


@dataclass(frozen=True)
class SatNL(Part):
    """Saturating nonlinearity on the weights (Park et al. 2022): ``W = f(theta)`` with a tanh form
    of :mod:`robustq.satnl` [recon]; folded into plain weights after training. Layers: every conv
    and linear weight."""

    form: str = "scaled_tanh"
    alpha_mult: float = satnl.DEFAULT_ALPHA_MULT

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("form", self.form, satnl.SATNL_FORMS)

    def prepare(self, model):
        return satnl.apply_satnl(model, form=self.form, alpha_mult=self.alpha_mult)

    def finalize(self, model):
        return satnl.remove_satnl(model)


@dataclass(frozen=True)
class SAM(Part):
    """SAM (Foret et al., ICLR 2021, arXiv 2010.01412, eq. 2): ``eps = rho g / ||g||``, wrapping the
    base optimizer. ``rho = 0.05``, the paper's CIFAR default."""

    rho: float = 0.05

    def wrap_optimizer(self, params, optimizer):
        return sam.SAM(params, optimizer, rho=self.rho, adaptive=False)


@dataclass(frozen=True)
class ASAM(Part):
    """ASAM (Kwon et al., ICML 2021, arXiv 2102.11600, eq. 9): ``eps = rho T^2 g / ||T g||`` with
    ``T = |w| + eta``, as combined with SatNL by Park et al. [summary]. ``rho = 0.5``,
    ``eta = 0.01``, the ASAM paper's CIFAR values."""

    rho: float = 0.5
    eta: float = 0.01

    def wrap_optimizer(self, params, optimizer):
        return sam.SAM(params, optimizer, rho=self.rho, adaptive=True, eta=self.eta)


@dataclass(frozen=True)
class KURE(Part):
    """KURE (Shkolnik et al., NeurIPS 2020, arXiv 2002.07686, eq. 3-4) [code]:
    ``lam * (1/L) sum_l (Kurt(W_l) - target)^2`` over every conv weight except the first conv;
    the FC layer, BatchNorm and biases are excluded, as in the released code. ``lam = 1.0``."""

    lam: float = 1.0
    target: float = 1.8

    def penalty(self, model, context):
        stem, _ = stem_and_classifier(model)
        layers = [m for name, m in weighted_layers(model) if isinstance(m, nn.Conv2d) and name != stem]
        return self.lam * torch.stack([regularizers.kure(m.weight, self.target) for m in layers]).mean()


@dataclass(frozen=True)
class SinReQ(Part):
    """SinReQ (Elthakeb et al., arXiv 1905.01416; book/methods.md §3) [code]:
    ``strength(epoch) * sum_layers mean sin^2(pi (w + shift) / Delta)`` on the latent (shadow)
    weights. ``schedule="constant"`` (default): ``strength = lam``, as the fixed-bit scripts
    (``compress_classifier_sinreq_v2.py``: ``cost_factor = 1``). ``schedule="tanh"``:
    ``strength = lam * 0.5 (1 + tanh((epoch - 0.2 E) / ramp))`` (:func:`regularizers.sinreq_lambda`),
    the schedule of the learned-bit-width script ``compress_classifier_sinreq-Learn_cifar10.py``
    only; ``ramp`` is used by ``"tanh"`` alone. Layers: every conv and linear except the stem conv
    and the classifier. ``lam = 1`` is ``_v2.py``'s (the ResNet-20 and VGG-11 scripts set 0,
    book/methods.md §8). ``domain="raw"`` (default) puts the sinusoid on the latent weights, as the
    released code does for both grids [code]; ``"normalized"`` puts it on what the QAT quantizer
    rounds (``tanh(w) / max|tanh w|`` for DoReFa, ``clamp(w, -1, 1)`` for WRPN), where DoReFa's
    levels actually are [recon] (book/methods.md §8)."""

    lam: float = 1.0
    bit_width: int = 4
    grid: str = "wrpn"
    schedule: str = "constant"
    ramp: float = 20.0
    domain: str = "raw"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("grid", self.grid, regularizers.SINREQ_GRIDS)
        check_choice("schedule", self.schedule, regularizers.SINREQ_SCHEDULES)
        check_choice("domain", self.domain, regularizers.SINREQ_DOMAINS)

    def strength(self, epoch: float, epochs: int) -> float:
        """The multiplier of the penalty at ``epoch`` (0-based) of ``epochs``."""
        if self.schedule == "constant":
            return self.lam
        return self.lam * regularizers.sinreq_lambda(epoch, epochs, self.ramp)

    def penalty(self, model, context):
        excluded = set(stem_and_classifier(model))
        layers = [m for name, m in weighted_layers(model) if name not in excluded]
        terms = [regularizers.sinreq(self._sinusoid_input(m), self.bit_width, self.grid) for m in layers]
        return self.strength(context.epoch, context.epochs) * torch.stack(terms).sum()

    def _sinusoid_input(self, layer: nn.Module) -> torch.Tensor:
        w = latent_weight(layer)
        if self.domain == "raw":
            return w
        return qat.pre_rounded(self.grid, self.bit_width, w)


OSCILLATION_SCOPES = ("all", "deployed")


@dataclass(frozen=True)
class Oscillation(Part):
    """Oscillation-inducing regularization (Wenshøj, Pepin & Selvan, arXiv 2502.00490; book/methods.md §4)
    [code]: ``lam * sum_layers mean (q(w)^2 - w^2)`` with the symmetric per-tensor max-abs quantizer
    at ``bit_width``. Layers (``scope``): ``"all"``, every module with a ``.weight`` (BatchNorm
    included), as in the released code; ``"deployed"``, the conv and linear layers quantized at
    ``bit_width`` (not BatchNorm, not the stem and classifier kept at 8 bits), as the paper's
    experiments deploy them (book/methods.md §4, issue #25); either minus the qualified names in
    ``exclude``. The scale ``max|w| / (2^(b-1) - 1)`` is detached
    by default (``detach_scale=True``, our choice: gradient exactly ``2 (q(w) - w) / N``); the
    released code does not detach it (``detach_scale=False``; book/methods.md §8). ``lam = 14`` is
    the released MLP example's."""

    lam: float = 14.0
    bit_width: int = 4
    detach_scale: bool = True
    exclude: tuple[str, ...] = ()
    scope: str = "all"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("scope", self.scope, OSCILLATION_SCOPES)

    def penalty(self, model, context):
        if self.scope == "deployed":
            edges = set(stem_and_classifier(model))
            layers = [(name, m) for name, m in weighted_layers(model) if name not in edges]
        else:
            layers = [(name, m) for name, m in model.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor)]
        weights = [m.weight for name, m in layers if name not in self.exclude]
        terms = [regularizers.oscillation(w, self.bit_width, self.detach_scale) for w in weights]
        return self.lam * torch.stack(terms).sum()


@dataclass(frozen=True)
class GradL1(Part):
    """Gradient-ℓ1 regularization (Alizadeh et al., ICLR 2020, arXiv 2002.07520, eq. 7), our
    reconstruction [recon]: ``lam_w sum_l c_l ||dL/dW_l||_1 + lam_a sum_l ||dL/da_l||_1`` by double
    backprop, ``a_l`` the input of each conv/linear (book/methods.md §2). Gradients are of the
    batch-mean loss, so each activation term is the mean over samples of the per-sample ℓ1 norm.
    No penalty during the first ``warmup_epochs`` (a warm start). Strengths are not given for our
    setting: chapters sweep them.

    * ``weighting="none"`` (default: the behaviour from before these options): ``c_l = 1``.
      For a conv followed by BN, ``dL/dW`` scales as ``1/||W||``, so this penalty can be lowered by
      growing the conv's norm without changing the network [recon].
    * ``weighting="step"``: the [paper] bound's weighting of every term by its half-step, each
      weight term by ``c_l = Delta_l / 2`` with ``Delta_l = max|W_l| / (2^(b-1) - 1)`` at
      ``b = reference_bit_width``, detached (:func:`robustq.regularizers.grad_l1_half_steps`),
      invariant to that rescaling; each activation term by ``Delta_a / 2``, the step of the
      asymmetric min-max grid at ``b`` over the batch's activations, detached
      (:func:`robustq.regularizers.grad_l1_activation_half_steps`). ``b`` sets the unit of
      ``lam_w`` and ``lam_a``. With both terms weighted the penalty is ``lam`` times the bound
      itself when ``lam_w = lam_a``.
    * ``lazy_every=k`` (lazy regularization): the penalty is applied only on global steps
      ``0, k, 2k, ...`` (``StepContext.step``), ``k`` times as strong, so its mean over ``k``
      consecutive steps equals the full penalty while the double backward runs on 1 step in ``k``.
      ``1`` (default) is every step.
    """

    lam_w: float = 0.01
    lam_a: float = 0.01
    warmup_epochs: int = 0
    weighting: str = "none"
    reference_bit_width: int = QAT_BIT_WIDTH  # the book's one QAT target
    lazy_every: int = 1

    capture_activations: typing.ClassVar[bool] = True
    double_backprop: typing.ClassVar[bool] = True
    bf16_safe: typing.ClassVar[bool] = False  # it penalises gradients that bf16 rounding perturbs

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("weighting", self.weighting, regularizers.GRAD_L1_WEIGHTINGS)
        try:
            validate_bit_width(self.reference_bit_width)
        except ValueError as error:
            raise ValueError(f"GradL1.reference_bit_width: {error}") from None
        check_int("GradL1.lazy_every", self.lazy_every, minimum=1, example=4)  # k: every k-th step

    def penalty(self, model, context):
        if not self._applies_at(context):
            return None
        weights = [m.weight for _, m in weighted_layers(model)]
        acts = [a for a in context.activations if a.requires_grad]
        # k times as strong on 1 step in k: the same penalty in expectation over the run
        scales = [self.lazy_every * c for c in self._weight_strengths(weights) + self._activation_strengths(acts)]
        # weight gradients of the global batch under DDP; activation terms are per sample
        transforms = [distributed.mean_across_ranks] * len(weights) + [None] * len(acts)
        return regularizers.grad_l1(context.loss, weights + acts, scales=scales, transforms=transforms)

    @property
    def penalty_from_epoch(self) -> int:
        return self.warmup_epochs

    def _applies_at(self, context: StepContext) -> bool:
        return context.epoch >= self.penalty_from_epoch and context.step % self.lazy_every == 0

    def _weight_strengths(self, weights: list[torch.Tensor]) -> list[float]:
        if self.weighting == "none":
            return [self.lam_w] * len(weights)
        half_steps = regularizers.grad_l1_half_steps(weights, self.reference_bit_width)
        return [self.lam_w * h for h in half_steps]

    def _activation_strengths(self, activations: list[torch.Tensor]) -> list[float]:
        if self.weighting == "none":
            return [self.lam_a] * len(activations)
        half_steps = regularizers.grad_l1_activation_half_steps(activations, self.reference_bit_width)
        return [self.lam_a * h for h in half_steps]


@dataclass(frozen=True)
class QAT(Part):
    """Weight-only quantization-aware training (:func:`robustq.qat.prepare_qat`): ``ste``
    (straight-through, Bengio et al. 2013), ``lsq`` (Esser et al., arXiv 1902.08153), ``dorefa``
    (Zhou et al., arXiv 1606.06160) or ``wrpn`` (Mishra et al., arXiv 1709.01134) at ``bit_width``
    on every conv and linear, except the stem conv and the classifier, which train at
    ``edge_bit_width`` (8 by default, as LSQ and SinReQ train; set it to ``bit_width`` for every
    layer at the target) with ``edge_quantizer`` (``None``: ``quantizer``; ``"ste"``: the min-max
    grid scaled to the layer, in place of WRPN's and DoReFa's grids fixed to [-1, 1]). After
    training the quantizers are removed and the weights they saw before rounding are kept; the
    cache keeps the quantizers' description, so the model is evaluated with its own quantizer
    (book/methods.md §7) and cross-bit.

    ``init_to_grid=True`` first divides every conv-with-BN's initial weights, except the stem's, by
    their largest magnitude (:func:`robustq.qat.scale_init_to_grid`, function-preserving under BN):
    WRPN's grid is fixed to [-1, 1], and without it a 3-bit WRPN model died on some seeds [recon]."""

    quantizer: str = "ste"
    bit_width: int = 4
    edge_bit_width: int = EDGE_BIT_WIDTH
    edge_quantizer: str | None = None
    per_channel: bool = False
    init_to_grid: bool = False

    bf16_safe: typing.ClassVar[bool] = False  # bf16 would move the trained grid's levels

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("quantizer", self.quantizer, qat.QUANTIZERS)
        if self.edge_quantizer is not None:
            check_choice("edge_quantizer", self.edge_quantizer, qat.QUANTIZERS)
        validate_bit_width(self.edge_bit_width)

    def prepare(self, model):
        if self.init_to_grid:
            qat.scale_init_to_grid(model, exclude=stem_and_classifier(model))
        return qat.prepare_qat(
            model, self.quantizer, self.bit_width, per_channel=self.per_channel, edge_bit_width=self.edge_bit_width,
            edge_quantizer=self.edge_quantizer,
        )

    def finalize(self, model):
        return qat.remove_qat(model)


@dataclass(frozen=True)
class QATOnSatNL(QAT):
    """:class:`QAT` stacked on SatNL: the quantizer rounds SatNL's output, so each layer's forward
    weight is ``q(f(theta))`` with ``theta`` the trained parameter
    (``qat.prepare_qat(..., stack_on_satnl=True)``). Place it after :class:`SatNL` in a recipe.
    Park et al. 2022 combine SymReg and SatNL with LSQ's QAT [summary]; how the two stack is our
    reconstruction [recon] (book/methods.md §1). After training the quantizer is dropped and SatNL
    folded, leaving ``f(theta)``: the model is judged by its own quantizer, like ``qat_lsq``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("quantizer", self.quantizer, qat.STACKABLE_QUANTIZERS)
        if self.edge_quantizer is not None:
            check_choice("edge_quantizer", self.edge_quantizer, qat.STACKABLE_QUANTIZERS)

    def prepare(self, model):
        return qat.prepare_qat(
            model, self.quantizer, self.bit_width, per_channel=self.per_channel,
            edge_bit_width=self.edge_bit_width, edge_quantizer=self.edge_quantizer, stack_on_satnl=True,
        )


# --- methods -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """A registered method: its name and its parts, applied in order."""

    name: str
    parts: tuple[Part, ...]

    def params(self) -> dict[str, typing.Any]:
        """Every hyperparameter with its value (defaults included). A name two parts share takes
        the first part's value: the same value, unless a later part fixes its own (KURE's λ in
        ``symreg_satnl_asam_kure``), which the registry, not the parameters, defines."""
        merged: dict[str, typing.Any] = {}
        for part in self.parts:
            for key, value in dataclasses.asdict(part).items():
                merged.setdefault(key, _jsonable(value))
        return merged

    def prepare(self, model: nn.Module) -> nn.Module:
        for part in self.parts:
            model = part.prepare(model)
        return model

    def finalize(self, model: nn.Module) -> nn.Module:
        for part in reversed(self.parts):
            model = part.finalize(model)
        return model

    def extensions(self, model: nn.Module) -> Extensions:
        penalties = [p for p in self.parts if type(p).penalty is not Part.penalty]
        wrappers = [p for p in self.parts if type(p).wrap_optimizer is not Part.wrap_optimizer]
        return Extensions(
            penalty=_sum_penalties(penalties) if penalties else None,
            capture_activations=any(p.capture_activations for p in self.parts),
            double_backprop=any(p.double_backprop for p in self.parts),
            double_backprop_from_epoch=min((p.penalty_from_epoch for p in self.parts if p.double_backprop), default=0),
            bf16_autocast=all(p.bf16_safe for p in self.parts),
            wrap_optimizer=wrappers[0].wrap_optimizer if wrappers else None,
        )


def _sum_penalties(parts: Sequence[Part]) -> Callable[[nn.Module, StepContext], torch.Tensor]:
    def penalty(model: nn.Module, context: StepContext) -> torch.Tensor:
        terms = [t for t in (p.penalty(model, context) for p in parts) if t is not None]
        return torch.stack(terms).sum() if terms else context.loss.new_zeros(())

    return penalty


# name -> parts, each a part class with the settings that define the method (not overridable)
REGISTRY: dict[str, tuple[tuple[type[Part], dict], ...]] = {
    "baseline": (),
    "symreg": ((SymReg, {}),),
    "satnl": ((SatNL, {}),),
    "symreg_satnl": ((SymReg, {}), (SatNL, {})),
    "sam": ((SAM, {}),),
    "asam": ((ASAM, {}),),
    "satnl_asam": ((SatNL, {}), (ASAM, {})),
    "symreg_satnl_asam": ((SymReg, {}), (SatNL, {}), (ASAM, {})),
    # Park et al. report this combination best overall [summary]; KURE keeps its released λ so that
    # ``lam`` sets SymReg's alone.
    "symreg_satnl_asam_kure": ((SymReg, {}), (SatNL, {}), (ASAM, {}), (KURE, {"lam": 1.0})),
    "kure": ((KURE, {}),),
    "grad_l1": ((GradL1, {}),),
    "sinreq_dorefa": ((QAT, {"quantizer": "dorefa"}), (SinReQ, {"grid": "dorefa"})),
    "sinreq_wrpn": ((QAT, {"quantizer": "wrpn"}), (SinReQ, {"grid": "wrpn"})),
    "dorefa": ((QAT, {"quantizer": "dorefa"}),),
    "wrpn": ((QAT, {"quantizer": "wrpn"}),),
    "oscillation": ((Oscillation, {}),),
    "qat_ste": ((QAT, {"quantizer": "ste"}),),
    "qat_lsq": ((QAT, {"quantizer": "lsq"}),),
    "symreg_satnl_lsq": ((SymReg, {}), (SatNL, {}), (QATOnSatNL, {"quantizer": "lsq"})),
}


def available() -> tuple[str, ...]:
    """Names of the registered methods."""
    return tuple(REGISTRY)


def make(name: str, **params: typing.Any) -> Method:
    """Build method ``name`` with ``params`` routed to every part that has a field of that name.

    >>> make("sinreq_wrpn", bit_width=3).params()["bit_width"]
    3
    """
    check_choice("method", name, available())
    recipe = REGISTRY[name]
    accepted = {f.name for cls, fixed in recipe for f in dataclasses.fields(cls) if f.name not in fixed}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(
            f"method {name!r} has no hyperparameter {', '.join(map(repr, unknown))}; "
            f"its hyperparameters are: {', '.join(sorted(accepted)) or 'none'}"
        )
    parts = []
    for cls, fixed in recipe:
        own = {f.name for f in dataclasses.fields(cls)}
        parts.append(cls(**fixed, **{k: v for k, v in params.items() if k in own and k not in fixed}))
    return Method(name, tuple(parts))


def describe(name: str) -> list[dict[str, typing.Any]]:
    """One row per hyperparameter of method ``name``: part, name, type, default (a name shared by
    two parts, such as ``bit_width``, is listed once)."""
    rows, seen = [], set()
    for part, (_, fixed) in zip(make(name).parts, REGISTRY[name]):
        hints = typing.get_type_hints(type(part))
        for f in dataclasses.fields(part):
            if f.name in seen or f.name in fixed:
                continue
            seen.add(f.name)
            rows.append({"part": type(part).__name__, "name": f.name, "type": _type_name(hints[f.name]),
                         "value": getattr(part, f.name)})
    return rows


# --- validation ----------------------------------------------------------------------------------


def _check_type(owner: str, name: str, value, expected) -> None:
    origin = typing.get_origin(expected)
    if expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif origin is tuple:
        ok = isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise ValueError(f"{owner}.{name} must be of type {_type_name(expected)}, got {value!r}")


def _check_nonnegative(owner: str, name: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{owner}.{name} must be a finite number >= 0, got {value!r}")


def _type_name(expected) -> str:
    return getattr(expected, "__name__", str(expected))


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value
