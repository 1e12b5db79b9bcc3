"""Where the latent weights sit against the quantization grid, and how often they flip between
levels during training (chapters 06 and 07).

* SinReQ (Elthakeb et al., arXiv 1905.01416; book/methods.md §3): :func:`grid_distance` and
  :func:`distance_to_grid`, the mean distance of the weights to SinReQ's lattice in units of the
  step (0 on the grid, about 0.25 for weights unrelated to it).
* oscillations (Nagel et al., ICML 2022, arXiv 2203.11086; book/methods.md §4, §6):
  :func:`integer_levels`, :class:`OscillationTracker` (``TrackOscillation``'s count of level flips
  [code]) and :class:`WeightTrajectory` (a few weights followed step by step, as Wenshøj, Pepin &
  Selvan, arXiv 2502.00490, plot them).

Pure functions, models in, frames out; the two classes are ``on_step_end`` hooks of
:class:`robustq.train.Extensions` that record and then report frames.

>>> grid_distance(torch.tensor([0.0, 1.0, 0.25, 0.75]), step=0.5)
0.25
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd
import torch
from torch import nn

from robustq import models, ptq, qat, quant, regularizers
from robustq.params import check_choice, check_int

# --- SinReQ and oscillations (chapters 06, 07) ---


GRID_DOMAINS = regularizers.SINREQ_DOMAINS
# TrackOscillation's default EMA momentum (Qualcomm-AI-research/oscillations-qat,
# utils/oscillation_tracking_utils.py); main.py passes --oscillations-freeze-ema-momentum, default 0.001.
OSCILLATION_MOMENTUM = 0.01
# The released 4-bit MobileNetV2 run's final freezing threshold (README, bash/train_mobilenetv2.sh): the
# repository counts no "oscillating" fraction itself, so this frequency cut-off is our choice [recon].
OSCILLATION_THRESHOLD = 0.01


def _named_layers(model: nn.Module, layers: Iterable[str] | None) -> list[tuple[str, nn.Module]]:
    """The conv and linear layers of ``model`` named in ``layers`` (all of them if ``None``)."""
    available = ptq.weighted_layers(model)
    if layers is None:
        return available
    if isinstance(layers, str):
        raise TypeError(f"layers must be a collection of layer names, got the string {layers!r}; "
                        "wrap it in a list")
    wanted = set(layers)
    unknown = sorted(wanted - {name for name, _ in available})
    if unknown:
        raise ValueError(f"layers names no conv/linear layer of the model: {unknown}; "
                         f"allowed: {[name for name, _ in available]}")
    return [(name, m) for name, m in available if name in wanted]


def grid_distance(w: torch.Tensor, step: float, shift: float = 0.0) -> float:
    """Mean distance of ``w`` to the nearest point of the lattice ``k * step - shift`` (``k`` any
    integer), in units of ``step``: in [0, 0.5], 0 on the lattice, 0.25 for weights spread
    uniformly over many steps. The lattice is where SinReQ's ``sin^2(pi (w + shift) / step)`` is
    zero (Elthakeb et al., arXiv 1905.01416; book/methods.md §3)."""
    position = (w.detach() + shift) / step
    return float((position - torch.round(position)).abs().mean())


@torch.no_grad()
def distance_to_grid(
    model: nn.Module,
    bit_width: int,
    grid: str = "wrpn",
    domain: str = "raw",
    layers: Iterable[str] | None = None,
) -> pd.DataFrame:
    """Per conv/linear layer, the mean distance of the latent weights to SinReQ's grid in units of
    the step (:func:`grid_distance`): the mechanism SinReQ claims, weights pulled onto the levels
    (Elthakeb et al., arXiv 1905.01416; book/methods.md §3, C6.2). 0 on the grid, about 0.25 for
    weights with no relation to it.

    ``step`` and ``shift`` are those of :func:`robustq.regularizers.sinreq_grid` [code]: WRPN
    ``1/(2^(k-1) - 1)``, shift 0; DoReFa ``2/(2^k - 1)``, shift ``step/2``. ``domain="raw"``
    measures the latent weights themselves, where the released code puts its sinusoid, also for
    DoReFa; ``domain="normalized"`` measures what the quantizer rounds: ``tanh(w) / max|tanh w|``
    for DoReFa, ``clamp(w, -1, 1)`` for WRPN (:mod:`robustq.qat`; book/methods.md §6, §8).

    Latent weights are :func:`robustq.qat.float_weight`: the parametrization's ``original`` of a
    QAT-prepared layer (what SinReQ regularizes), ``layer.weight`` otherwise. A model finalized by
    ``remove_qat`` keeps the pre-rounded weights, which for DoReFa are already normalized, so
    measure a trained model before ``method.finalize`` (or from an ``on_epoch_end`` hook of
    :class:`robustq.train.Extensions`, for the course over training). Columns: ``layer``,
    ``weights``, ``distance`` and ``outside``, the fraction of the measured weights beyond the
    grid's range [-1, 1], which the lattice distance ignores.
    """
    check_choice("domain", domain, GRID_DOMAINS)
    step, shift = regularizers.sinreq_grid(bit_width, grid)
    rows = []
    for name, layer in _named_layers(model, layers):
        w = qat.float_weight(layer).detach()
        if domain == "normalized":
            w = qat.pre_rounded(grid, bit_width, w)
        rows.append({"layer": name, "weights": w.numel(), "distance": grid_distance(w, step, shift),
                     "outside": float((w.abs() > 1).float().mean())})
    return pd.DataFrame(rows, columns=["layer", "weights", "distance", "outside"])


def _weight_quantizer(layer: nn.Module) -> qat.WeightQuantizer | None:
    if not torch.nn.utils.parametrize.is_parametrized(layer, "weight"):
        return None
    return next((p for p in layer.parametrizations["weight"] if isinstance(p, qat.WeightQuantizer)), None)


def _quantizer_step(quantizer: qat.WeightQuantizer, v: torch.Tensor) -> tuple[torch.Tensor | float, float]:
    """``(step, offset)`` with ``quantizer.quantize_pre_rounded(v) = offset + step * level``."""
    if isinstance(quantizer, qat.STEWeight):
        return quant.choose_qparams(v, quantizer.spec, axis=0)[0], 0.0
    if isinstance(quantizer, qat.LSQWeight):
        return quantizer.scale.detach(), 0.0
    if isinstance(quantizer, qat.DoReFaWeight):
        return 2.0 / (2**quantizer.bit_width - 1), -1.0
    if isinstance(quantizer, qat.WRPNWeight):
        return 1.0 / (2 ** (quantizer.bit_width - 1) - 1), 0.0
    raise ValueError(f"no integer levels known for the quantizer {type(quantizer).__name__}; "
                     "add it to _quantizer_step")


@torch.no_grad()
def integer_levels(
    model: nn.Module, bit_width: int | None = None, layers: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """The integer quantization level of every weight, per conv/linear layer (float tensors
    holding integers), as :class:`OscillationTracker` follows them.

    A layer with a QAT quantizer (:mod:`robustq.qat`) is read on its own grid: ``q(w) = offset +
    step * level`` with its current step (LSQ's learned step, the STE quantizer's min-max scale,
    DoReFa's and WRPN's fixed grids); ``bit_width`` does not apply to it. Any other layer is read
    on the symmetric per-tensor min-max grid at ``bit_width`` [recon]: ``s = max|w| / (2^(b-1) - 1)``,
    ``level = round(w / s)`` (:func:`robustq.quant.quantize`, book/methods.md §0), the grid of the
    oscillation regularizer (book/methods.md §4); the scale follows ``max|w|`` from step to step,
    as the regularizer's does. These are the levels whose flips Nagel et al. (ICML 2022, arXiv
    2203.11086) count as oscillations.
    """
    levels = {}
    for name, layer in _named_layers(model, layers):
        w = qat.float_weight(layer).detach()
        quantizer = _weight_quantizer(layer)
        if quantizer is None:
            if bit_width is None:
                raise ValueError(f"layer {name!r} has no QAT quantizer: pass bit_width=... to read it "
                                 "on a min-max grid")
            quantizer = qat.STEWeight(bit_width)
        v = quantizer.pre_rounding(w)
        step, offset = _quantizer_step(quantizer, v)
        levels[name] = torch.round((quantizer.quantize_pre_rounded(v) - offset) / step)
    return levels


class _OscillationState:
    """One tensor's record in :class:`OscillationTracker`: ``TrackOscillation``'s variables."""

    def __init__(self, level: torch.Tensor) -> None:
        self.level = level.clone()
        self.direction = torch.zeros_like(level)
        self.ema = torch.zeros_like(level, dtype=torch.float32)
        self.count = torch.zeros_like(level, dtype=torch.long)
        self.steps = 0

    def update(self, level: torch.Tensor, momentum: float) -> None:
        if level.shape != self.level.shape:
            raise ValueError(f"levels of shape {tuple(level.shape)} follow levels of shape "
                             f"{tuple(self.level.shape)}; track each tensor under its own name")
        delta = torch.round(self.level - level)
        direction = torch.sign(delta)
        oscillated = self.direction * direction == -1
        self.ema = momentum * oscillated + (1 - momentum) * self.ema
        self.direction = torch.where(delta != 0, direction, self.direction)
        self.level = level.clone()
        self.count += oscillated
        self.steps += 1


class OscillationTracker:
    """Weight oscillations counted as Nagel et al. count them (ICML 2022, arXiv 2203.11086; book/methods.md
    §6, C7.5), with the semantics of ``TrackOscillation.__call__`` in the released code [code]
    (Qualcomm-AI-research/oscillations-qat, ``utils/oscillation_tracking_utils.py``).

    Call it after every optimizer step, e.g. as an ``on_step_end`` hook of
    :class:`robustq.train.Extensions` (``tracker(model, epoch, step)``), or feed it levels with
    :meth:`update`. Per weight, with ``level`` its integer level (:func:`integer_levels`):
    ``delta = round(previous level - level)``, ``direction = sign(delta)``; an **oscillation** is
    ``direction * previous direction == -1``, where the previous direction is that of the weight's
    last change (0 before its first); its frequency is the EMA
    ``f = momentum * oscillated + (1 - momentum) * f``. So a weight alternating between two levels
    counts at every change after its first, a monotone drift never. The first call only records the
    levels. A weight **oscillates** when ``f > threshold``.

    ``momentum = 0.01`` is ``TrackOscillation``'s default (the released ``main.py`` passes its CLI
    option, default 0.001). The repository reports no fraction of oscillating weights; its only
    threshold freezes weights (annealed from 0.1 to 0.005-0.015 in the released runs). Our default
    ``threshold = 0.01`` is the 4-bit MobileNetV2 run's final one [recon]: with ``momentum = 0.01``
    one isolated oscillation sets ``f`` to exactly the threshold, which does not exceed it. The
    released code skips layers above 4 bits (``add_oscillation_trackers(max_bits=4)``); here
    ``layers`` selects them (default: every conv and linear).
    """

    def __init__(
        self,
        bit_width: int | None = None,
        *,
        momentum: float = OSCILLATION_MOMENTUM,
        threshold: float = OSCILLATION_THRESHOLD,
        layers: Iterable[str] | None = None,
    ) -> None:
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum must be in (0, 1], got {momentum!r}; TrackOscillation uses 0.01")
        if not 0 <= threshold < 1:
            raise ValueError(f"threshold must be in [0, 1), got {threshold!r}: it is a frequency per step")
        self.bit_width = None if bit_width is None else quant.validate_bit_width(bit_width)
        self.momentum, self.threshold = momentum, threshold
        self.layers = None if layers is None else list(layers)
        self.states: dict[str, _OscillationState] = {}

    def __call__(self, model: nn.Module, epoch: int = 0, step: int = 0) -> None:
        self.update(integer_levels(model, self.bit_width, self.layers))

    def update(self, levels: dict[str, torch.Tensor]) -> None:
        """Record one step's integer levels, ``{name: tensor}``."""
        for name, level in levels.items():
            if name not in self.states:
                self.states[name] = _OscillationState(level)
            self.states[name].update(level, self.momentum)

    def summary(self) -> pd.DataFrame:
        """One row per tensor: ``weights``, ``steps`` seen, ``oscillating`` (fraction with EMA
        frequency above ``threshold`` now), ``ever_oscillated`` (fraction that oscillated at least
        once) and ``oscillations_per_weight`` (mean count)."""
        rows = [
            {"layer": name, "weights": s.count.numel(), "steps": s.steps,
             "oscillating": float((s.ema > self.threshold).float().mean()),
             "ever_oscillated": float((s.count > 0).float().mean()),
             "oscillations_per_weight": float(s.count.double().mean())}
            for name, s in self.states.items()
        ]
        columns = ["layer", "weights", "steps", "oscillating", "ever_oscillated", "oscillations_per_weight"]
        return pd.DataFrame(rows, columns=columns)

    def oscillating_fraction(self) -> float:
        """The fraction of all tracked weights oscillating now (every layer's weights counted once)."""
        if not self.states:
            raise ValueError("the tracker has seen no step yet: call it after optimizer steps first")
        oscillating = sum(int((s.ema > self.threshold).sum()) for s in self.states.values())
        return oscillating / sum(s.ema.numel() for s in self.states.values())


class WeightTrajectory:
    """An ``on_step_end`` hook (:class:`robustq.train.Extensions`) that records ``count`` weights
    of one layer after every step, the latent weights a QAT quantizer receives
    (:func:`robustq.qat.float_weight`): the trajectories of QAT and of the oscillation regularizer
    (Wenshøj, Pepin & Selvan, arXiv 2502.00490; book/methods.md §4). The weights are the layer's first
    ``count`` in a fixed random order (``seed``), so they are not all from one output channel."""

    def __init__(self, layer: str, count: int = 4, seed: int = 0) -> None:
        check_int("count", count, minimum=1, example=4)
        self.layer, self.count, self.seed = layer, count, seed
        self.index: torch.Tensor | None = None
        self.rows: list[dict] = []

    def __call__(self, model: nn.Module, epoch: int = 0, step: int = 0) -> None:
        modules = dict(model.named_modules())
        if self.layer not in modules:
            raise ValueError(f"no layer {self.layer!r} in the model; its conv/linear layers are "
                             f"{[name for name, _ in models.weighted_layers(model)]}")
        weight = qat.float_weight(modules[self.layer]).detach().flatten()
        if self.index is None:
            generator = torch.Generator().manual_seed(self.seed)
            self.index = torch.randperm(weight.numel(), generator=generator)[: self.count]
        for rank, value in enumerate(weight[self.index].tolist()):
            self.rows.append({"step": len(self.rows) // self.count, "weight": rank, "value": value})

    def frame(self) -> pd.DataFrame:
        """Columns ``step`` (0 = after the first step), ``weight`` (0 .. count-1) and ``value``."""
        return pd.DataFrame(self.rows, columns=["step", "weight", "value"])
