"""Learned rounding of weights: AdaRound (Nagel et al., ICML 2020, arXiv 2004.10568), layer by layer.

Post-training quantization rounds every weight to its nearest level. AdaRound learns, per weight,
whether to round down or up, so that each layer's *output* is reconstructed rather than each
weight. On the grid of :func:`robustq.quant.choose_qparams` (scale ``s``, zero point ``z``, codes
``[qmin, qmax]``) the weight becomes

    W̃ = s · (clamp(⌊W/s⌋ + h(V) + z, qmin, qmax) − z),    h(V) = clamp(σ(V)(ζ − γ) + γ, 0, 1)

(Eq. 22 and the rectified sigmoid of Eq. 23, ζ = 1.1, γ = −0.1), and ``V`` minimises

    ‖f(W x) − f(W̃ x̃)‖²_F + λ Σ (1 − |2 h(V) − 1|^β)

(Eq. 25 with the regulariser of Eq. 24): ``x`` is the layer's input in the float model, ``x̃`` its
input with the layers below already rounded (the asymmetric reconstruction of §4), ``f`` an optional
activation. The regulariser is off for a warm start (20% of the iterations) and ``β`` decays from 20
to 2 (a cosine, as AIMET does: ``aimet_torch/adaround/adaround_loss.py``), so that every ``h(V)``
ends at 0 or 1; the weights then round up where ``h(V) ≥ 1/2``. ``V`` starts where the soft weight
equals the float one and trains with Adam (lr 10⁻³, batches of 32 inputs), λ = 0.01 as AIMET's
default; the iterations are the caller's budget (the paper: 10⁴ per layer).

Our safeguard, not the paper's: a layer keeps rounding to nearest where its learned rounding
reconstructs the calibration batch worse (possible after few iterations), so learned rounding never
does worse than nearest on the loss it optimises.

:func:`round_blocks` is block reconstruction (BRECQ, Li et al., ICLR 2021, arXiv 2102.05426): the
same variables and loop (:func:`learn_joint_rounding`), for all the layers of a block at once,
against the block's output.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from robustq.models import edge_layers, reconstruction_blocks, weighted_layers
from robustq.quant import QuantSpec, choose_qparams, fake_quant, layer_spec

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (Eq. 23)


@dataclass(frozen=True)
class AdaRoundConfig:
    """How long and how hard each layer's rounding is optimised (defaults: AIMET's, but for the
    iterations, which the paper and AIMET set to 10⁴ and a CPU build cannot afford)."""

    iterations: int = 500
    reg_weight: float = 0.01  # λ of Eq. 24
    warm_start: float = 0.2  # share of the iterations without the regulariser
    beta_start: float = 20.0
    beta_end: float = 2.0
    lr: float = 1e-3
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("iterations", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AdaRoundConfig.{name} must be an integer >= 1, got {value!r}")
        if not 0 <= self.warm_start < 1:
            raise ValueError(f"AdaRoundConfig.warm_start must be in [0, 1), got {self.warm_start!r}")
        if not self.beta_start >= self.beta_end > 0:
            raise ValueError(f"AdaRoundConfig needs beta_start >= beta_end > 0, got "
                             f"{self.beta_start!r} and {self.beta_end!r}")
        if not (self.reg_weight >= 0 and self.lr > 0):
            raise ValueError(f"AdaRoundConfig needs reg_weight >= 0 and lr > 0, got {self.reg_weight!r}, {self.lr!r}")


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``h(V) = clamp(σ(V)(ζ − γ) + γ, 0, 1)`` (Eq. 23): reaches 0 and 1 exactly, with a gradient
    inside.

    >>> rectified_sigmoid(torch.tensor([-20.0, 0.0, 20.0]))
    tensor([0.0000, 0.5000, 1.0000])
    """
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def initial_logits(rest: torch.Tensor) -> torch.Tensor:
    """``V`` with ``h(V) = rest`` for a fractional part ``rest`` in [0, 1): the soft weight starts
    at the float weight."""
    share = (rest - GAMMA) / (ZETA - GAMMA)
    return torch.log(share) - torch.log1p(-share)


def rounding_regularizer(v: torch.Tensor, beta: float) -> torch.Tensor:
    """``Σ 1 − |2 h(V) − 1|^β`` (Eq. 24): 0 where every ``h(V)`` is 0 or 1, one per weight at 1/2.

    >>> float(rounding_regularizer(torch.tensor([-20.0, 0.0, 20.0]), beta=2.0))
    1.0
    """
    return (1 - (2 * rectified_sigmoid(v) - 1).abs().pow(beta)).sum()


def annealed_beta(iteration: int, config: AdaRoundConfig) -> float | None:
    """``β`` at ``iteration``: ``None`` during the warm start (no regulariser), then a cosine from
    ``beta_start`` to ``beta_end`` over the remaining iterations (AIMET's schedule).

    >>> config = AdaRoundConfig(iterations=10)
    >>> annealed_beta(1, config), annealed_beta(2, config), round(annealed_beta(9, config), 2)
    (None, 20.0, 2.69)
    """
    warm = config.warm_start * config.iterations
    if iteration < warm:
        return None
    progress = (iteration - warm) / (config.iterations - warm)
    return config.beta_end + 0.5 * (config.beta_start - config.beta_end) * (1 + math.cos(progress * math.pi))


@dataclass(frozen=True)
class Grid:
    """A weight's quantization grid: scale, zero point (broadcastable to the weight) and codes."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int

    @classmethod
    def of(cls, weight: torch.Tensor, spec: QuantSpec) -> Grid:
        """The grid :func:`robustq.quant.quantize` puts ``weight`` on (per output channel along
        axis 0 when ``spec.per_channel``)."""
        return cls(*choose_qparams(weight, spec, axis=0))

    def floor(self, weight: torch.Tensor) -> torch.Tensor:
        # x * (1 / s), as torch's fake-quant kernels compute x / s: the same codes
        return torch.floor(weight * (1.0 / self.scale))

    def weights(self, codes: torch.Tensor) -> torch.Tensor:
        """``s · (clamp(codes + z, qmin, qmax) − z)``: the weights of (possibly soft) codes."""
        return self.scale * (torch.clamp(codes + self.zero_point, self.qmin, self.qmax) - self.zero_point)

    def nearest(self, weight: torch.Tensor) -> torch.Tensor:
        """Rounding to nearest: torch's fake-quant kernel (:func:`robustq.quant.fake_quant`)."""
        return fake_quant(weight, self.scale, self.zero_point, self.qmin, self.qmax)


def soft_weights(weight: torch.Tensor, v: torch.Tensor, grid: Grid) -> torch.Tensor:
    """The weights while ``V`` is learned: ``⌊W/s⌋ + h(V)`` on the grid (Eq. 22)."""
    return grid.weights(grid.floor(weight) + rectified_sigmoid(v))


def hard_weights(weight: torch.Tensor, v: torch.Tensor, grid: Grid) -> torch.Tensor:
    """The learned rounding: up where ``h(V) ≥ 1/2`` (``V ≥ 0``), down elsewhere."""
    return grid.weights(grid.floor(weight) + (v >= 0).to(weight.dtype))


def layer_forward(layer: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(weight, input) -> output`` of a conv or linear layer with another weight (its bias held
    fixed: only the rounding learns)."""
    bias = None if layer.bias is None else layer.bias.detach()
    if isinstance(layer, nn.Conv2d):
        return lambda weight, x: layer._conv_forward(x, weight, bias)
    if isinstance(layer, nn.Linear):
        return lambda weight, x: F.linear(x, weight, bias)
    raise ValueError(f"learned rounding needs an nn.Conv2d or nn.Linear, got {type(layer).__name__}")


def reconstruction_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``‖output − target‖²`` over the output features (dimension 1), mean over the rest (AIMET's
    ``compute_recon_loss``)."""
    return (output - target).pow(2).sum(dim=1).mean()


def learn_rounding(
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    weight: torch.Tensor,
    grid: Grid,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    config: AdaRoundConfig = AdaRoundConfig(),
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict]:
    """One layer's learned rounding (Eq. 25): the rounded weight, and a report of the reconstruction
    error on all of ``inputs`` with nearest and with learned rounding, which one was kept (the
    better), and the share of weights rounded the other way than nearest. ``forward(weight, x)`` is
    the layer; ``targets`` its float outputs, ``inputs`` its inputs with the layers below rounded."""
    act = activation or (lambda y: y)
    (rounded,), report = learn_joint_rounding(lambda weights, x: act(forward(weights[0], x)), [weight], [grid],
                                              inputs, act(targets.detach()), config)
    return rounded, report


def learn_joint_rounding(
    forward: Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor],
    weights: list[torch.Tensor],
    grids: list[Grid],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    config: AdaRoundConfig = AdaRoundConfig(),
) -> tuple[list[torch.Tensor], dict]:
    """The rounding of several weights learned together against one output (Eq. 25 with a sum of
    Eq. 24 over the weights): one layer's (:func:`learn_rounding`) or a block's (BRECQ,
    :func:`round_blocks`). ``forward(weights, x)`` computes the output ``targets`` reconstructs;
    returns the rounded weights and :func:`learn_rounding`'s report over all of them."""
    weights = [weight.detach() for weight in weights]
    goal = targets.detach()
    vs = [initial_logits(w * (1.0 / grid.scale) - grid.floor(w)).requires_grad_() for w, grid in zip(weights, grids)]
    optimizer = torch.optim.Adam(vs, lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    for iteration in range(config.iterations):
        batch = torch.randint(len(inputs), (min(config.batch_size, len(inputs)),), generator=generator)
        soft = [soft_weights(w, v, grid) for w, v, grid in zip(weights, vs, grids)]
        loss = reconstruction_error(forward(soft, inputs[batch]), goal[batch])
        beta = annealed_beta(iteration, config)
        if beta is not None:
            for v in vs:
                loss = loss + config.reg_weight * rounding_regularizer(v, beta)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        nearest = [grid.nearest(w) for w, grid in zip(weights, grids)]
        learned = [hard_weights(w, v, grid) for w, v, grid in zip(weights, vs, grids)]
        errors = {name: float(reconstruction_error(forward(candidate, inputs), goal))
                  for name, candidate in (("nearest", nearest), ("learned", learned))}
        flipped = torch.cat([(a != b).flatten() for a, b in zip(learned, nearest)]).float().mean()
    kept = "learned" if errors["learned"] <= errors["nearest"] else "nearest"
    report = {"error_nearest": errors["nearest"], "error_learned": errors["learned"], "kept": kept,
              "flipped": float(flipped)}
    return (learned if kept == "learned" else nearest), report


@torch.no_grad()
def _float_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every conv and linear layer's output on ``x``, by name, from one forward pass."""
    outputs = {}
    handles = [layer.register_forward_hook(lambda _m, _i, output, name=name: outputs.__setitem__(name, output))
               for name, layer in weighted_layers(model)]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


class _InputReached(Exception):
    """Raised once the layer asked for has its input: the layers above it need not run."""


@torch.no_grad()
def _layer_inputs(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer``'s input on ``x`` in ``model``, as the layers below it now compute it."""
    captured = []

    def hook(_module, inputs):
        captured.append(inputs[0])
        raise _InputReached

    handle = layer.register_forward_pre_hook(hook)
    try:
        model(x)
    except _InputReached:
        pass
    finally:
        handle.remove()
    return captured[0]


def round_model(
    quantized: nn.Module,
    reference: nn.Module,
    spec: QuantSpec,
    calib: torch.Tensor,
    *,
    first_last_8bit: bool = True,
    config: AdaRoundConfig = AdaRoundConfig(),
) -> pd.DataFrame:
    """Learn the rounding of every conv and linear weight of ``quantized`` in place, layer by layer
    in module order, each against the same layer of ``reference`` (the float model, unchanged) on
    the calibration batch ``calib``, with the layers below already rounded (AdaRound, §4). Weights
    go on :class:`Grid.of` ``spec``'s grid; with ``first_last_8bit`` the stem and the classifier at
    8 bits. Both models are plain (materialised, :func:`robustq.ptq.materialize`) and in eval mode.
    Returns one row per layer: its bit-width and :func:`learn_rounding`'s report."""
    edges = edge_layers(quantized, first_last_8bit)
    targets_of = _float_outputs(reference, calib)
    rows = []
    for name, layer in weighted_layers(quantized):
        grid_spec = layer_spec(spec, name in edges)
        inputs = _layer_inputs(quantized, layer, calib)
        rounded, report = learn_rounding(layer_forward(layer), layer.weight, Grid.of(layer.weight, grid_spec),
                                         inputs, targets_of[name], config)
        with torch.no_grad():
            layer.weight.copy_(rounded)
        rows.append({"layer": name, "w_bits": grid_spec.bit_width, **report})
    return pd.DataFrame(rows)


def round_blocks(
    quantized: nn.Module,
    reference: nn.Module,
    spec: QuantSpec,
    calib: torch.Tensor,
    *,
    first_last_8bit: bool = True,
    config: AdaRoundConfig = AdaRoundConfig(),
) -> pd.DataFrame:
    """Block reconstruction (BRECQ, Li et al., ICLR 2021, arXiv 2102.05426, §3.3): as
    :func:`round_model`, but the rounding of every layer of one block (:func:`robustq.models.
    reconstruction_blocks`: a residual block, or a network's layers up to a pooling) is learned
    together, against the block's float output (its activations and pooling included) from the
    block's input with the blocks below already rounded. Blocks in module order, each layer on
    :class:`Grid.of` ``spec``'s grid (with ``first_last_8bit`` the stem and the classifier at 8 bits).

    Deviations from BRECQ, stated: the block output's error is the plain squared error of
    :func:`reconstruction_error` (BRECQ weighs it by the diagonal Fisher information, the squared
    gradients of the task loss), and, as in :func:`round_model`, a block keeps rounding to nearest
    where its learned rounding reconstructs the calibration batch worse. QDrop's dropping of
    activation quantization (Wei et al., ICLR 2022) acts only with quantized activations, which this
    weight-only deployment has none of. Returns one row per block: its layers, their bit-widths and
    :func:`learn_joint_rounding`'s report."""
    edges = edge_layers(quantized, first_last_8bit)
    layers = weighted_layers(quantized)
    rows = []
    for quantized_block, float_block in zip(reconstruction_blocks(quantized), reconstruction_blocks(reference)):
        members = [(name, layer) for name, layer in layers if any(layer is m for m in quantized_block.modules())]
        if not members:
            continue
        inputs = _block_input(quantized, quantized_block, calib)
        targets = _block_output(reference, float_block, calib)
        parameters = _weight_names(quantized_block, [layer for _, layer in members])
        specs = [layer_spec(spec, name in edges) for name, _ in members]
        grids = [Grid.of(layer.weight, grid_spec) for (_, layer), grid_spec in zip(members, specs)]
        rounded, report = learn_joint_rounding(
            lambda weights, x, block=quantized_block, names=parameters: functional_call(block, dict(zip(names, weights)),
                                                                                        (x,)),
            [layer.weight for _, layer in members], grids, inputs, targets, config)
        with torch.no_grad():
            for (_, layer), weight in zip(members, rounded):
                layer.weight.copy_(weight)
        rows.append({"block": ", ".join(name for name, _ in members),
                     "w_bits": ", ".join(str(grid_spec.bit_width) for grid_spec in specs),
                     **report})
    return pd.DataFrame(rows)


def _weight_names(block: nn.Module, layers: list[nn.Module]) -> list[str]:
    """Each layer's weight as a parameter name of ``block`` (for ``functional_call``)."""
    names = {id(module): name for name, module in block.named_modules()}
    return [f"{names[id(layer)]}.weight" for layer in layers]


@torch.no_grad()
def _block_input(model: nn.Module, block: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The input of ``block`` (a view of ``model``'s modules) on ``x``, as the layers below compute it."""
    return _layer_inputs(model, block[0], x)


@torch.no_grad()
def _block_output(model: nn.Module, block: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The output of ``block`` (a view of ``model``'s modules) on ``x`` in ``model`` (a copy: the
    modules above may act in place)."""
    return block(_block_input(model, block, x)).clone()
