"""Measurements behind the chapters: layer-wise error propagation and weight clipping curves.

Two analyses of Park, Jang & Park (ECCV 2022, arXiv 2208.00338), as listed in book/methods.md ("Analyses
to reproduce", [recon]; the paper's own protocol is known only from a third-party summary):

* **error propagation** (insight 1, Fig. 1 [summary]): per conv/linear layer, the KL divergence
  between the output distributions of the float and the quantized network, the per-channel mean
  shift ``|E[y_q] - E[y]| / std(y)`` and the relative MSE; with every layer quantized (the error
  that reached the layer) or one layer at a time (the error the layer adds itself). The analytic
  link of the mean shift to the weight error, ``E[dy_c] = sum_i dW_ci E[x_i]`` [recon], is
  :func:`shift_prediction`.
* **range clamping** (insight 2 [summary]): weight MSE against the clip ratio ``r`` of a symmetric
  (or asymmetric) grid, its argmin ``r*(b)``, and accuracy per range policy (:func:`policy_grid`).

Functions take models and tensors and return tidy ``pandas`` frames (one row per observation).
Models are analysed as deployed (book/methods.md §0): BN unfolded by default (the papers' setting), or
folded into the convs first with ``fold=True`` (:func:`robustq.ptq.fold_bn`).

* outputs: :func:`layer_io`, :func:`layer_outputs`, :func:`quantize_layers`
* metrics: :func:`kl_divergence`, :func:`mean_shift`, :func:`relative_mse`, :func:`spearman`
* insight 1: :func:`error_propagation`, :func:`propagation_grid`, :func:`weight_error_mean`,
  :func:`shift_prediction`, :func:`weight_symmetry`
* insight 2: :func:`clip_curve`, :func:`model_clip_curves`, :func:`optimal_ratio`,
  :func:`default_ratios`, :func:`policy_grid`, :func:`policy_spread`
* insight 3 (magnitude buckets, flatness, ASAM): :func:`magnitude_quartile_masks`,
  :func:`magnitude_sensitivity`, :func:`quartile_contrast`, :func:`hessian_power_iteration`,
  :func:`hessian_top_eigenvalue`, :func:`noise_robustness`, :func:`asam_perturbation_by_magnitude`,
  :func:`satnl_latent` (a trained SatNL result back in ``theta`` space)
* gradient-ℓ1 (chapter 05, Alizadeh et al. 2020, book/methods.md §2): :func:`first_order_bound`,
  :func:`grad_l1_norm`
* SinReQ and oscillations (chapters 06, 07, book/methods.md §3, §4): :func:`distance_to_grid`,
  :func:`grid_distance`, :func:`integer_levels`, :class:`OscillationTracker`, :class:`WeightTrajectory`,
  :func:`ste_gradient_decomposition`
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from robustq import experiments, methods, models, ptq, qat, quant, regularizers, sam, satnl
from robustq.data import Dataset
from robustq.params import check_choice
from robustq.quant import QuantSpec

KL_MAX_BINS = 256
KL_BINS = 256  # the fixed bin count of the book's KL (book/methods.md §7: KL moves 80x between 32 and 1024 bins)
KL_EPS = 1e-6  # additive smoothing, per bin, of both histograms' probabilities
KL_MAX_SAMPLES = 2**20
STD_EPS = 1e-8
MODES = ("all", "single")


# --- layer outputs -------------------------------------------------------------------------------


@torch.no_grad()
def layer_io(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(inputs, outputs)`` of every conv and linear layer of ``model`` on ``x``, keyed by the
    layer's qualified name in module order. Outputs are cloned before the next in-place ReLU can
    overwrite them. The model is run as it is (fold it first if it has BatchNorm)."""
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def hook(name):
        def store(_module, args, out):
            inputs[name] = args[0].detach().clone()
            outputs[name] = out.detach().clone()

        return store

    handles = [module.register_forward_hook(hook(name)) for name, module in ptq.weighted_layers(model)]
    try:
        model.eval()(x)
    finally:
        for handle in handles:
            handle.remove()
    return inputs, outputs


def layer_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output of every conv and linear layer of ``model`` on ``x`` (see :func:`layer_io`)."""
    return layer_io(model, x)[1]


# --- metrics -------------------------------------------------------------------------------------


def kl_divergence(
    p_samples: torch.Tensor,
    q_samples: torch.Tensor,
    bins: int | None = None,
    eps: float = KL_EPS,
    max_samples: int | None = KL_MAX_SAMPLES,
) -> float:
    """``KL(P || Q) = sum_k p_k log(p_k / q_k)`` between the histograms of two samples.

    ``P`` is the float layer's output, ``Q`` the quantized one's (book/methods.md, insight 1 [summary]:
    "KL divergence between each layer's output distribution before and after quantization"). Both
    use the same ``bins`` equal-width bins spanning the range of ``p_samples`` (default
    ``min(256, ceil(sqrt(n)))`` for ``n`` float samples, so that small samples are not spread over
    mostly empty bins); values of
    ``q_samples`` outside that range are counted in the first or last bin, so no mass is lost.
    Smoothing: ``eps`` is added to every bin probability of both histograms, which are then
    renormalised, so the KL is finite when ``Q`` has empty bins. Identical samples give exactly 0.
    Samples are paired (``q_samples[i]`` is the quantized ``p_samples[i]``); above ``max_samples``
    values, a fixed evenly strided subset of the same positions is used in both, to bound the cost.
    """
    p = p_samples.detach().reshape(-1).float()
    q = q_samples.detach().reshape(-1).float()
    if p.shape != q.shape:
        raise ValueError(f"p_samples and q_samples must have as many values, got {p.numel()} and {q.numel()}")
    if max_samples is not None and p.numel() > max_samples:
        stride = math.ceil(p.numel() / max_samples)
        p, q = p[::stride], q[::stride]
    bins = min(KL_MAX_BINS, math.ceil(math.sqrt(p.numel()))) if bins is None else bins
    lo, hi = float(p.min()), float(p.max())
    if not hi > lo:  # a constant output: one bin
        hi = lo + 1.0
    p_hist = _histogram(p, lo, hi, bins)
    q_hist = _histogram(q.clamp(lo, hi), lo, hi, bins)
    p_prob = _smooth(p_hist, eps)
    q_prob = _smooth(q_hist, eps)
    return float((p_prob * (p_prob / q_prob).log()).sum().clamp_min(0.0))


def _histogram(x: torch.Tensor, lo: float, hi: float, bins: int) -> torch.Tensor:
    return torch.histc(x, bins=bins, min=lo, max=hi).double()  # x is inside [lo, hi]


def _smooth(hist: torch.Tensor, eps: float) -> torch.Tensor:
    prob = hist / hist.sum() + eps
    return prob / prob.sum()


def _channel_stats(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of a ``[N, C, ...]`` tensor over batch and spatial positions."""
    dims = [0] + list(range(2, y.dim()))
    std, mean = torch.std_mean(y.detach(), dim=dims, unbiased=False)
    return mean.double(), std.double()


def _channel_mean(y: torch.Tensor) -> torch.Tensor:
    return y.detach().mean(dim=[0] + list(range(2, y.dim()))).double()


def mean_shift(y_fp: torch.Tensor, y_q: torch.Tensor, reduce: bool = True) -> torch.Tensor | float:
    """Per-channel mean shift ``|E[y_q,c] - E[y_c]| / std(y_c)`` (book/methods.md, analyses [recon]).

    Channels are on axis 1; means and the float output's std are over batch and spatial positions.
    A channel with (near) zero float std is left out (it carries no signal to shift). Returns the
    average over channels (``reduce=True``) or the per-channel tensor.
    """
    _, std_fp = _channel_stats(y_fp)
    delta = _channel_mean(y_q.detach() - y_fp.detach())
    live = std_fp > STD_EPS
    shift = torch.where(live, delta.abs() / std_fp.clamp_min(STD_EPS), torch.nan)
    return float(shift[live].mean()) if reduce else shift


def signed_shift(y_fp: torch.Tensor, y_q: torch.Tensor) -> float:
    """Pooled signed shift ``mean_c (E[y_q,c] - E[y_c]) / std(y_c)``: unlike :func:`mean_shift`,
    opposite shifts of different channels cancel, which shows whether a layer drifts one way."""
    _, std_fp = _channel_stats(y_fp)
    delta = _channel_mean(y_q.detach() - y_fp.detach())
    live = std_fp > STD_EPS
    return float((delta[live] / std_fp[live]).mean())


def sqnr_db(y_fp: torch.Tensor, y_q: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(||y||^2 / ||y_q - y||^2)`` in dB (book/methods.md §7:
    the book's bin-free primary measure; ``-10 log10`` of :func:`relative_mse`). ``inf`` when
    ``y_q == y``."""
    rel = relative_mse(y_fp, y_q)
    return math.inf if rel == 0 else -10.0 * math.log10(rel)


def relative_mse(y_fp: torch.Tensor, y_q: torch.Tensor) -> float:
    """``||y_q - y||^2 / ||y||^2``."""
    y_fp, y_q = y_fp.detach(), y_q.detach()
    return float((y_q - y_fp).pow(2).sum().double() / y_fp.pow(2).sum().double().clamp_min(1e-300))


# --- quantizing some layers ----------------------------------------------------------------------


@torch.no_grad()
def quantize_layers(model: nn.Module, w_spec: QuantSpec, names: Iterable[str] | None = None) -> nn.Module:
    """A copy of (an already folded) ``model`` with the weights of the layers in ``names`` (all
    conv/linear layers if ``None``) fake-quantized by :func:`robustq.quant.quantize` (per output
    channel along axis 0 when ``w_spec.per_channel``). Biases stay in float."""
    quantized = copy.deepcopy(model).eval()
    wanted = None if names is None else set(names)
    for name, module in ptq.weighted_layers(quantized):
        if wanted is None or name in wanted:
            module.weight.copy_(quant.quantize(module.weight, w_spec, axis=0))
    return quantized


def _metrics(y_fp: torch.Tensor, y_q: torch.Tensor, bins: int | None, eps: float,
             varying: torch.Tensor | None = None) -> dict[str, float]:
    return {
        "sqnr_db": sqnr_db(y_fp, y_q),
        "rel_mse": relative_mse(y_fp, y_q),
        "kl": kl_divergence(*_varying_values(y_fp, y_q, varying), bins, eps),
        "mean_shift": mean_shift(y_fp, y_q),
        "signed_shift": signed_shift(y_fp, y_q),
    }


@torch.no_grad()
def varying_positions(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """For a conv, the output positions ``[N, H', W']`` whose receptive field in ``x`` is not
    constant; ``None`` for other layers (every position counts).

    A constant patch (the uniform background of a Fashion-MNIST image: about a third of the first
    layer's positions) gives every image the same output there, whose spike in a histogram dominates
    the KL (book/methods.md §7); the book's KL leaves those positions out."""
    if not isinstance(module, nn.Conv2d):
        return None
    window = dict(kernel_size=module.kernel_size, stride=module.stride, padding=module.padding,
                  dilation=module.dilation)
    # max - min over each window (zero padding counts as a value, so borders usually vary)
    spread = F.max_pool2d(x, **window) + F.max_pool2d(-x, **window)
    return spread.amax(dim=1) > 0


def _varying_values(y_fp, y_q, varying):
    if varying is None:
        return y_fp, y_q
    pick = lambda y: y.movedim(1, -1)[varying]  # noqa: E731  [positions, channels]
    return pick(y_fp), pick(y_q)


@torch.no_grad()
def error_propagation(
    model: nn.Module,
    x: torch.Tensor,
    w_spec: QuantSpec,
    mode: str = "all",
    *,
    bins: int | None = KL_BINS,
    eps: float = KL_EPS,
    fold: bool = False,
) -> pd.DataFrame:
    """Layer-wise error of weight quantization on the batch ``x`` (Park et al. 2022, insight 1 and
    Fig. 1 [summary]; metrics of book/methods.md "Analyses to reproduce" [recon]).

    ``mode="all"``: every conv/linear weight quantized with ``w_spec``; each layer's output carries
    the error propagated from the layers below plus its own. ``mode="single"``: each layer alone is
    quantized and fed the float network's input to that layer, so its output carries only its own
    (local) error; this equals quantizing that one layer and running the whole network.

    One row per layer: ``depth`` (1 = first conv), ``layer``, ``kl`` (:func:`kl_divergence`),
    ``mean_shift`` (:func:`mean_shift`, averaged over channels), ``rel_mse``
    (:func:`relative_mse`), ``mode``, and ``flips``: the share of the images of ``x`` whose
    predicted class differs from the float network's (a network-level number, repeated on each row
    of mode ``"all"``, NaN for ``"single"``). ``model`` is BN-folded first unless ``fold=False``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    net = _deployed(model, fold)
    return _propagation(net, x, _FloatPass(net, x), w_spec, mode, bins, eps).drop(columns="acc")


def propagation_grid(
    model: nn.Module,
    x: torch.Tensor,
    w_specs: Iterable[QuantSpec],
    modes: Sequence[str] = MODES,
    *,
    labels: torch.Tensor | None = None,
    bins: int | None = KL_BINS,
    eps: float = KL_EPS,
    fold: bool = False,
) -> pd.DataFrame:
    """:func:`error_propagation` for every weight spec and mode, running the float network once. Adds the columns ``w_bits``, ``symmetric``, ``per_channel``, ``policy``;
    with the ``labels`` of ``x`` also ``acc`` (top-1 accuracy on ``x`` of the network with every
    layer quantized, NaN for mode ``"single"``) and ``fp_acc`` (of the float network)."""
    net = _deployed(model, fold)
    reference = _FloatPass(net, x)
    frames = []
    for spec in w_specs:
        for mode in modes:
            frame = _propagation(net, x, reference, spec, mode, bins, eps, labels)
            frames.append(frame.assign(w_bits=spec.bit_width, symmetric=spec.symmetric,
                                       per_channel=spec.per_channel, policy=spec.policy))
    frame = pd.concat(frames, ignore_index=True)
    if labels is None:
        return frame.drop(columns="acc")
    return frame.assign(fp_acc=float((reference.logits.argmax(1) == labels).double().mean()))


class _FloatPass:
    """Inputs, outputs, logits and KL position masks of the float network on ``x``, computed once."""

    def __init__(self, net: nn.Module, x: torch.Tensor) -> None:
        with torch.no_grad():
            self.inputs, self.outputs = layer_io(net, x)
            self.logits = net(x)
        modules = dict(ptq.weighted_layers(net))
        self.varying = {name: varying_positions(modules[name], self.inputs[name]) for name in self.inputs}


def _deployed(model: nn.Module, fold: bool) -> nn.Module:
    """The float network as it is quantized: BN folded, or plain weights with BN kept."""
    return ptq.fold_bn(model) if fold else ptq.materialize(model)


def _propagation(net, x, reference: _FloatPass, w_spec, mode, bins, eps, labels=None) -> pd.DataFrame:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    quantized = quantize_layers(net, w_spec)
    flips = acc = math.nan
    with torch.no_grad():
        if mode == "all":
            _, y_q = layer_io(quantized, x)
            predicted = quantized(x).argmax(1)
            flips = float((predicted != reference.logits.argmax(1)).double().mean())
            if labels is not None:
                acc = float((predicted == labels).double().mean())
        else:
            modules = dict(ptq.weighted_layers(quantized))
            y_q = {name: modules[name](reference.inputs[name]) for name in reference.outputs}
    rows = [
        {"depth": depth, "layer": name,
         **_metrics(reference.outputs[name], y_q[name], bins, eps, reference.varying[name]),
         "mode": mode, "flips": flips, "acc": acc}
        for depth, name in enumerate(reference.outputs, start=1)
    ]
    return pd.DataFrame(rows)


def sqnr_drop(model: nn.Module, x: torch.Tensor, w_spec: QuantSpec, *, fold: bool = False) -> float:
    """Accumulation with depth as one number, in dB: with every layer quantized, the SQNR of the
    first layer's output minus that of the last layer (the logits). Positive when the error grows
    relative to the signal on its way through the network (Park et al. 2022, insight 1 [summary])."""
    frame = error_propagation(model, x, w_spec, mode="all", fold=fold)
    return float(frame["sqnr_db"].iloc[0] - frame["sqnr_db"].iloc[-1])


def bias_drift(model: nn.Module, x: torch.Tensor, w_spec: QuantSpec, *, fold: bool = False) -> float:
    """Bias drift as one number, in percent of a standard deviation: each layer quantized alone
    (fed the float input), the per-channel mean shift ``|E[y_q,c] - E[y_c]| / std(y_c)`` averaged
    over channels and layers, times 100 (Park et al. 2022: "weight symmetry inherits robustness
    against bias drift" [summary])."""
    frame = error_propagation(model, x, w_spec, mode="single", fold=fold)
    return 100.0 * float(frame["mean_shift"].mean())


@torch.no_grad()
def layer_shifts(reference: nn.Module, quantized: nn.Module, x: torch.Tensor) -> pd.DataFrame:
    """Per conv/linear layer, the per-channel mean shift (:func:`mean_shift`) and the pooled signed
    shift (:func:`signed_shift`) of ``quantized`` (e.g. from :func:`robustq.ptq.quantize_model`,
    bias correction included) against ``reference``, the same network in float, on ``x``.
    Layer names must match (both folded or both unfolded)."""
    _, y_fp = layer_io(reference, x)
    _, y_q = layer_io(quantized, x)
    return pd.DataFrame([
        {"depth": depth, "layer": name, "mean_shift": mean_shift(y_fp[name], y_q[name]),
         "signed_shift": signed_shift(y_fp[name], y_q[name])}
        for depth, name in enumerate(y_fp, start=1)
    ])


# --- the analytic link: weight error mean -> output shift ----------------------------------------


@torch.no_grad()
def weight_error_mean(model: nn.Module, w_spec: QuantSpec, *, fold: bool = False) -> pd.DataFrame:
    """Per layer and output channel ``c``, the mean over the fan-in of the weight-quantization error
    ``dW = q(W) - W`` (``dw_mean``), the channel's weight std (``w_std``) and fan-in ``n``.

    [recon] (book/methods.md §1): ``E[dy_c] ~ N mean(dW_c) E[x]``; for a row whose weights are symmetric
    about 0 and an odd quantizer, ``mean(dW_c) = 0`` whatever the step. The layer-level mean of
    ``dW`` is the mean of ``dw_mean`` over channels (all rows have the same fan-in).
    """
    net = _deployed(model, fold)
    frames = []
    for depth, (name, module) in enumerate(ptq.weighted_layers(net), start=1):
        w = module.weight.detach()
        dw = (quant.quantize(w, w_spec, axis=0) - w).double().reshape(w.shape[0], -1)
        w_rows = w.double().reshape(w.shape[0], -1)
        frames.append(pd.DataFrame({
            "depth": depth, "layer": name, "channel": range(w.shape[0]), "n": w_rows.shape[1],
            "dw_mean": dw.mean(dim=1).numpy(), "w_mean": w_rows.mean(dim=1).numpy(),
            "w_std": w_rows.std(dim=1, unbiased=False).numpy(),
        }))
    return pd.concat(frames, ignore_index=True)


@torch.no_grad()
def shift_prediction(model: nn.Module, x: torch.Tensor, w_spec: QuantSpec, *, fold: bool = False) -> pd.DataFrame:
    """The analytic link between weight error and output shift, per layer and output channel.

    With the float input ``x`` of a layer and its weight error ``dW`` (the layer alone quantized):

    * ``measured``: ``E[y_q,c] - E[y_c]``, the mean of the output change over batch and positions;
    * ``predicted``: ``sum_i dW_ci E[x_i]`` with ``E[x_i]`` the mean of input channel ``i`` over
      batch and positions (a conv sums its kernel: the prediction ignores where in the image the
      input is large, and zero padding);
    * ``predicted_scalar``: ``n mean(dW_c) E[x]``, the one-number form of book/methods.md §1 [recon],
      ``E[x]`` the mean of the whole input.

    All three are divided by ``std(y_c)``, like :func:`mean_shift` (but signed). One row per
    (layer, channel) with ``depth``, ``layer``, ``channel``, ``dw_mean`` and the three values.
    """
    net = _deployed(model, fold)
    inputs, y_fp = layer_io(net, x)
    quantized = dict(ptq.weighted_layers(quantize_layers(net, w_spec)))
    frames = []
    for depth, (name, module) in enumerate(ptq.weighted_layers(net), start=1):
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            raise ValueError(f"shift_prediction does not handle grouped convs ({name!r})")
        x_in = inputs[name]
        dw = quantized[name].weight.detach().double() - module.weight.detach().double()
        _, std_fp = _channel_stats(y_fp[name])
        measured = _channel_mean(quantized[name](x_in) - y_fp[name])
        dw_in = dw.reshape(dw.shape[0], dw.shape[1], -1).sum(dim=2)  # [C_out, C_in]: kernel summed
        predicted = dw_in @ _channel_mean(x_in)
        dw_rows = dw.reshape(dw.shape[0], -1)
        scalar = dw_rows.shape[1] * dw_rows.mean(dim=1) * float(x_in.double().mean())
        live = std_fp > STD_EPS
        std = std_fp[live]
        frames.append(pd.DataFrame({
            "depth": depth, "layer": name, "channel": torch.nonzero(live).flatten().numpy(),
            "dw_mean": dw_rows.mean(dim=1)[live].numpy(),
            "measured": (measured[live] / std).numpy(),
            "predicted": (predicted[live] / std).numpy(),
            "predicted_scalar": (scalar[live] / std).numpy(),
        }))
    return pd.concat(frames, ignore_index=True)


# --- weight symmetry diagnostics -----------------------------------------------------------------


@torch.no_grad()
def weight_symmetry(model: nn.Module, *, fold: bool = False) -> pd.DataFrame:
    """Per conv/linear layer, how symmetric the weights are about zero: the normalised SymReg
    penalty of the whole tensor (``sym_reg``, :func:`robustq.regularizers.sym_reg`, 1:1 pairing,
    layer scope: the quantity the ``symreg`` method penalises), the same averaged over output
    channels (``sym_reg_channel``), the skewness, and ``mean / std`` of the weights. ``fold=True``
    measures the BN-folded weights that get quantized; ``fold=False`` the trained conv weights."""
    from robustq.regularizers import sym_reg

    net = _deployed(model, fold)
    rows = []
    for depth, (name, module) in enumerate(ptq.weighted_layers(net), start=1):
        w = module.weight.detach().double()
        flat = w.reshape(-1)
        centered = flat - flat.mean()
        std = centered.pow(2).mean().sqrt()
        rows.append({
            "depth": depth, "layer": name,
            "sym_reg": float(sym_reg(w, "1:1", "layer")),
            "sym_reg_channel": float(sym_reg(w, "1:1", "channel")),
            "sym_reg_kernel": float(sym_reg(w, "1:1", "kernel")),
            "skewness": float(centered.pow(3).mean() / std.pow(3)),
            "mean_over_std": float(flat.mean() / std),
        })
    return pd.DataFrame(rows)


@torch.no_grad()
def weight_tails(model: nn.Module, *, fold: bool = False) -> pd.DataFrame:
    """Per conv/linear layer, how far the largest weight lies from the bulk: ``max_over_std``
    (``max|W| / std(W)``) and the ``kurtosis`` (3 Gaussian, 6 Laplace, 1.8 uniform), as deployed."""
    rows = []
    for depth, (name, module) in enumerate(ptq.weighted_layers(_deployed(model, fold)), start=1):
        w = module.weight.detach().double().flatten()
        centered = w - w.mean()
        std = centered.pow(2).mean().sqrt()
        rows.append({"depth": depth, "layer": name, "max_over_std": float(w.abs().max() / std),
                     "kurtosis": float(centered.pow(4).mean() / std**4)})
    return pd.DataFrame(rows)


# --- clipping curves -----------------------------------------------------------------------------


def default_ratios(low: float = 0.1) -> list[float]:
    """The clip ratios of the ``mse`` range policy's search (:func:`robustq.quant.mse_grid`) from
    ``low`` to 1, so that an argmin on them is the clip the policy would pick (when >= ``low``)."""
    return [r for r in quant.mse_grid().tolist() if r >= low - 1e-12]


@torch.no_grad()
def clip_curve(
    w: torch.Tensor,
    bit_widths: Sequence[int] = (2, 3, 4, 6, 8),
    ratios: Sequence[float] | None = None,
    symmetric: bool = True,
) -> pd.DataFrame:
    """Quantization MSE of the tensor ``w`` against the clip ratio ``r`` (Park et al. 2022,
    insight 2 [summary]; the sweep of book/methods.md "Analyses to reproduce" [recon]).

    Symmetric narrow-range grid clipping at ``t = r max|w|``: ``s = t / (2^(b-1) - 1)``. Asymmetric:
    the range ``[r min(w, 0), r max(w, 0)]`` over ``2^b`` codes. This is the arithmetic of the ``mse``
    range policy of :mod:`robustq.quant` (per tensor), so the argmin is the policy's choice.
    One row per ``(bit_width, r)``: ``mse`` and ``rel_mse = mse / mean(w^2)``, its exact split into
    ``rounding`` (weights inside the clip) and ``clipping`` (weights beyond it), both relative to
    ``mean(w^2)``, ``clipped`` (the fraction of weights beyond the clip) and the grid's ``step``.
    ``ratios`` default: :func:`default_ratios`.
    """
    ratios = default_ratios() if ratios is None else list(ratios)
    flat = w.detach().reshape(1, -1).float()
    power = float(flat.double().pow(2).mean())
    r = torch.tensor(ratios, dtype=torch.float64).to(flat.dtype)
    absmax, lo, hi = flat.abs().amax(), flat.amin().clamp(max=0), flat.amax().clamp(min=0)
    frames = []
    for bit_width in bit_widths:
        spec = QuantSpec(bit_width, symmetric=symmetric)
        qmin, qmax = spec.qrange
        if symmetric:
            top = r * absmax
            scale = torch.clamp(top / qmax, min=torch.finfo(flat.dtype).tiny)
            zero_point = torch.zeros_like(scale, dtype=torch.int32)
            beyond = flat.abs() > top[:, None]
        else:
            low, top = r * lo, r * hi
            scale = torch.clamp((top - low) / (qmax - qmin), min=torch.finfo(flat.dtype).tiny)
            zero_point = torch.clamp(qmin - torch.round(low / scale), qmin, qmax).to(torch.int32)
            beyond = (flat < low[:, None]) | (flat > top[:, None])
        expanded = flat.expand(len(ratios), -1)
        squared = (quant.fake_quant(expanded, scale[:, None], zero_point[:, None], qmin, qmax) - expanded).pow(2)
        err = squared.mean(dim=1)
        rel_mse = err.double() / max(power, 1e-300)
        clipping = torch.where(beyond, squared, 0.0).double().sum(dim=1) / flat.numel() / max(power, 1e-300)
        frames.append(pd.DataFrame({
            "bit_width": bit_width, "r": ratios, "mse": err.double().numpy(), "rel_mse": rel_mse.numpy(),
            "rounding": (rel_mse - clipping).numpy(), "clipping": clipping.numpy(),
            "clipped": beyond.double().mean(dim=1).numpy(), "step": scale.double().numpy(),
        }))
    return pd.concat(frames, ignore_index=True)


def optimal_ratio(curves: pd.DataFrame, by: Sequence[str] | None = None) -> pd.DataFrame:
    """The row of least ``mse`` (first on ties, as the ``mse`` policy) of each curve in ``curves``.

    ``by`` names the columns that identify one curve; default: every column except the values
    :func:`clip_curve` computes (``r``, ``mse``, ``rel_mse``, ``rounding``, ``clipping``,
    ``clipped``, ``step``). Adds ``minmax_excess = mse(r=1) / mse(r*)`` when ``r = 1`` is on
    the curve: how much more error the min-max range has than the best clip.
    """
    value_columns = {"r", "mse", "rel_mse", "rounding", "clipping", "clipped", "step"}
    by = [c for c in curves.columns if c not in value_columns] if by is None else list(by)
    ordered = curves.sort_values(by + ["r"], kind="stable")
    best = ordered.loc[ordered.groupby(by, sort=False)["mse"].idxmin()]
    at_one = ordered[ordered["r"] == 1.0].set_index(by)["mse"] if (ordered["r"] == 1.0).any() else None
    best = best.reset_index(drop=True)
    if at_one is not None:
        keys = pd.MultiIndex.from_frame(best[by]) if len(by) > 1 else pd.Index(best[by[0]])
        best["minmax_excess"] = at_one.reindex(keys).to_numpy() / best["mse"].clip(lower=1e-300).to_numpy()
    return best


def model_clip_curves(
    model: nn.Module,
    bit_widths: Sequence[int] = (2, 3, 4, 6, 8),
    ratios: Sequence[float] | None = None,
    symmetric: bool = True,
    *,
    fold: bool = False,
) -> pd.DataFrame:
    """:func:`clip_curve` of every conv/linear weight of the model as deployed (BN unfolded by
    default, folded with ``fold=True``), with ``depth`` and ``layer`` columns."""
    frames = [
        clip_curve(module.weight, bit_widths, ratios, symmetric).assign(depth=depth, layer=name)
        for depth, (name, module) in enumerate(ptq.weighted_layers(_deployed(model, fold)), start=1)
    ]
    columns = ["depth", "layer", "bit_width", "r", "mse", "rel_mse", "clipped"]
    return pd.concat(frames, ignore_index=True)[columns]


def minmax_log_excess(model: nn.Module, bit_widths: Sequence[int] = (2, 3, 4, 6, 8), *, fold: bool = False) -> float:
    """How far min-max is from the MSE-optimal clip, as one number: ``100 mean ln(E_b)`` over the
    model's layers and ``bit_widths``, with ``E_b = MSE_b(r=1) / MSE_b(r*)`` the min-max excess of
    :func:`optimal_ratio` (symmetric grid). 0 when min-max is optimal everywhere; 10 is about 10%
    more error than the best clip. Park et al. 2022, insight 2 [summary]: clamping should bring it
    towards 0."""
    curves = model_clip_curves(model, bit_widths, fold=fold)
    excess = optimal_ratio(curves, by=["depth", "layer", "bit_width"])["minmax_excess"]
    return 100.0 * float(excess.map(math.log).mean())


# --- accuracy per range policy -------------------------------------------------------------------


def policy_grid(
    model: nn.Module,
    data: Dataset,
    policies: Sequence[str] = quant.POLICIES,
    bit_widths: Sequence[int] = (8, 4, 3, 2),
    a_bits: Sequence[int | None] = (None, 8),
    **kwargs,
) -> pd.DataFrame:
    """Test accuracy of ``model`` PTQ'd under each range policy x weight bit-width x activation
    setting: :func:`robustq.ptq.bit_sweep` with ``policy=policies`` (symmetric per-tensor weights
    unless ``kwargs`` say otherwise). Adds ``drop = fp_acc - acc``."""
    frame = ptq.bit_sweep(model, data, w_bits=bit_widths, a_bits=a_bits, policy=policies, **kwargs)
    return frame.assign(drop=frame["fp_acc"] - frame["acc"])


def policy_spread(grid: pd.DataFrame, by: Sequence[str] = ("w_bits", "a_bits")) -> pd.DataFrame:
    """Per group of ``grid`` (a :func:`policy_grid` frame, possibly with a ``model`` column), the
    best and worst accuracy over range policies and their difference ``spread``: how much the
    choice of range policy matters."""
    by = list(by)
    stats = grid.groupby(by)["acc"].agg(best="max", worst="min").reset_index()
    return stats.assign(spread=stats["best"] - stats["worst"])


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks on ties); NaN when either side is constant."""
    rx = pd.Series(list(x)).rank().to_numpy()
    ry = pd.Series(list(y)).rank().to_numpy()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx**2).sum() * (ry**2).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else math.nan


__all__ = [
    "layer_io", "layer_outputs", "kl_divergence", "mean_shift", "signed_shift", "relative_mse", "sqnr_db",
    "varying_positions", "quantize_layers", "layer_shifts",
    "error_propagation", "propagation_grid", "weight_error_mean", "shift_prediction", "weight_symmetry",
    "default_ratios", "clip_curve", "optimal_ratio", "model_clip_curves", "policy_grid",
    "policy_spread", "spearman",
]


# --- insight 3: magnitude buckets, flatness, noise and ASAM's perturbation -----------------------
# Park et al. 2022, insight 3 (Fig. 4 and 5 [summary]); our protocol [recon], book/methods.md §1,
# "Analyses to reproduce" (3). Accuracies are top-1 on the given batch; costs are in points.

HESSIAN_PARAMETERS = ("trainable", "weights")
_EVAL_CHUNK = 1024  # images per forward pass, to bound memory on large batches


def magnitude_quartile_masks(weight: torch.Tensor, n_buckets: int = 4) -> torch.Tensor:
    """Boolean masks, shape ``[n_buckets, *weight.shape]``, that split ``weight`` by ``|w|``
    quantile (bucket 0 = the smallest magnitudes; Park et al. 2022, Fig. 4 [summary]).

    The cut between buckets ``k - 1`` and ``k`` is the ``|w|`` of rank ``ceil(k N / n_buckets)``
    in ascending order; a weight goes to the highest bucket whose cut it reaches. So a bucket is a
    function of ``|w|``: equal magnitudes share a bucket, and every weight is in exactly one. Without
    ties the sizes differ by at most one; a group of tied magnitudes at a cut moves whole into the
    upper bucket, so a size departs from ``N / n_buckets`` by at most that group's size (a bucket
    can be empty when most weights are equal).
    """
    if isinstance(n_buckets, bool) or not isinstance(n_buckets, int) or n_buckets < 1:
        raise ValueError(f"n_buckets must be an integer >= 1, got {n_buckets!r}")
    if weight.numel() == 0:
        raise ValueError("magnitude_quartile_masks needs a non-empty weight tensor")
    magnitude = weight.detach().abs().reshape(-1)
    if not bool(torch.isfinite(magnitude).all()):
        raise ValueError("the weight holds NaN or infinity: its magnitude buckets are undefined")
    ordered = torch.cat([magnitude.sort().values, magnitude.new_full((1,), math.inf)])
    cuts = [math.ceil(k * magnitude.numel() / n_buckets) for k in range(1, n_buckets)]
    bucket = torch.searchsorted(ordered[cuts], magnitude, right=True)
    labels = torch.arange(n_buckets, device=weight.device).reshape(-1, *([1] * weight.dim()))
    return bucket.reshape(weight.shape).unsqueeze(0) == labels


def _top1(net: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        hits = sum(int((net(xs).argmax(1) == ys).sum())
                   for xs, ys in zip(x.split(_EVAL_CHUNK), labels.split(_EVAL_CHUNK)))
    return hits / len(labels)


def _minmax_step(weight: torch.Tensor, bit_width: int) -> float:
    """The per-tensor symmetric min-max step ``max|w| / (2^(b-1) - 1)`` (book/methods.md §0)."""
    return float(quant.choose_qparams(weight, QuantSpec(bit_width))[0])


def _bucket_error(error: torch.Tensor, mask: torch.Tensor, target_rms: torch.Tensor | None) -> torch.Tensor:
    """``error`` on the bucket's weights (0 elsewhere), rescaled to RMS ``target_rms`` over them
    when given; an error that is zero everywhere in the bucket stays zero."""
    inside = torch.where(mask, error, torch.zeros_like(error))
    if target_rms is None or not mask.any():
        return inside
    rms = inside[mask].pow(2).mean().sqrt()
    return inside * (target_rms / rms) if rms > 0 else inside


@torch.no_grad()
def magnitude_sensitivity(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    bit_width: int = 3,
    n_buckets: int = 4,
    normalize: bool = False,
    *,
    fold: bool = False,
) -> pd.DataFrame:
    """Accuracy cost of quantizing one magnitude bucket of one layer (Park et al. 2022, insight 3,
    Fig. 4 [summary]: small weights are the most sensitive; our protocol [recon], book/methods.md §1).

    The model is deployed unfolded (``fold=True``: BN folded first; SatNL and QAT weights replaced
    by their values). For each conv/linear layer and each bucket of
    :func:`magnitude_quartile_masks`, only that bucket's weights of that layer take their W``bit_width``
    value (``quant.quantize(w, QuantSpec(bit_width))``: the layer's per-tensor symmetric min-max
    step, computed on the whole layer); every other weight stays float. ``cost_points`` is
    ``100 (float accuracy - accuracy)`` on ``(x, labels)``.

    ``normalize=True`` separates "these weights matter more" from "these weights get a larger
    error": each bucket's error vector ``q(w) - w`` (over its weights) is rescaled by one factor so
    that its RMS equals the RMS error of the whole layer quantized; every bucket then carries errors
    of the same mean squared size, and a remaining difference in cost is sensitivity per unit of
    error. A bucket whose weights all lie on the grid has no error to rescale and costs 0.

    One row per (layer, bucket): ``depth``, ``layer``, ``bucket``, ``n_weights``, ``error_rms`` (RMS
    of the error applied, over the bucket's weights; NaN for an empty bucket), ``cost_points``,
    ``normalized``.
    """
    net = _deployed(model, fold)
    fp_acc = _top1(net, x, labels)
    rows = []
    for depth, (name, module) in enumerate(ptq.weighted_layers(net), start=1):
        w = module.weight.detach().clone()
        quantized = quant.quantize(w, QuantSpec(bit_width))
        error = quantized - w
        layer_rms = error.pow(2).mean().sqrt() if normalize else None
        for bucket, mask in enumerate(magnitude_quartile_masks(w, n_buckets)):
            applied = _bucket_error(error, mask, layer_rms)
            # without rescaling, take q(w) itself: w + (q(w) - w) can miss it by one ulp
            module.weight.copy_(torch.where(mask, w + applied if normalize else quantized, w))
            acc = _top1(net, x, labels)
            module.weight.copy_(w)
            n = int(mask.sum())
            rows.append({
                "depth": depth, "layer": name, "bucket": bucket, "n_weights": n,
                "error_rms": float(applied[mask].pow(2).mean().sqrt()) if n else math.nan,
                "cost_points": 100.0 * (fp_acc - acc), "normalized": normalize,
            })
    return pd.DataFrame(rows)


def quartile_contrast(frame: pd.DataFrame, by: Sequence[str] | None = None) -> pd.DataFrame:
    """The chapter's endpoint C4.1: per model, the mean over layers of
    ``cost(smallest bucket) - cost(largest bucket)`` in points, from a :func:`magnitude_sensitivity`
    frame (positive when small weights are the more sensitive, as Park et al. 2022 report for
    Fig. 4 [summary]).

    ``by`` names the columns that identify a model (e.g. ``["method", "seed"]``); default: every
    column that :func:`magnitude_sensitivity` does not compute, so a ``normalized`` column splits
    the two variants. Returns ``by`` columns, ``contrast_points`` and ``layers`` (how many layers
    were averaged); one row when there is nothing to group by.
    """
    computed = {"depth", "layer", "bucket", "n_weights", "error_rms", "cost_points"}
    by = [c for c in frame.columns if c not in computed] if by is None else list(by)
    keys = by + ["depth", "layer"]
    ordered = frame.sort_values(keys + ["bucket"], kind="stable").groupby(keys, sort=False, dropna=False)
    per_layer = (ordered["cost_points"].first() - ordered["cost_points"].last()).rename("contrast_points")
    per_layer = per_layer.reset_index()
    if not by:
        return pd.DataFrame({"contrast_points": [float(per_layer["contrast_points"].mean())],
                             "layers": [len(per_layer)]})
    return (per_layer.groupby(by, sort=False, dropna=False)["contrast_points"]
            .agg(contrast_points="mean", layers="size").reset_index())


def _hessian_parameters(net: nn.Module, parameters: str) -> list[torch.Tensor]:
    if parameters not in HESSIAN_PARAMETERS:
        raise ValueError(f"parameters must be one of {HESSIAN_PARAMETERS}, got {parameters!r}")
    if parameters == "weights":
        return [methods.latent_weight(m) for _, m in ptq.weighted_layers(net)]
    return [p for p in net.parameters() if p.requires_grad]


def _unit(vectors: list[torch.Tensor]) -> list[torch.Tensor]:
    norm = torch.sqrt(sum(v.double().pow(2).sum() for v in vectors)).clamp_min(1e-300)
    return [(v.double() / norm).to(v.dtype) for v in vectors]


def hessian_power_iteration(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    iterations: int = 20,
    seed: int = 0,
    *,
    parameters: str = "trainable",
    loss_fn=F.cross_entropy,
) -> pd.DataFrame:
    """Power iteration on the loss Hessian (Park et al. 2022, Fig. 5 [summary]: top Hessian
    eigenvalue, baseline vs SAM/ASAM vs SatNL+ASAM; book/methods.md §1, analyses (3) [recon]).

    The loss is ``loss_fn(model(x), labels)`` (the training loss, without penalties) on the fixed
    batch, with the model in eval mode (BN uses its running statistics; a copy, ``model`` is left
    as it is). The Hessian is with respect to ``parameters="trainable"``: every parameter with
    ``requires_grad`` (BN affine, biases and LSQ steps included), i.e. the coordinates the
    optimizer and SAM/ASAM move; or ``"weights"``: the trained tensor behind each conv/linear
    weight. Under SatNL the trained tensor is ``theta`` (``parametrizations.weight.original``), so
    the Hessian is in ``theta``'s coordinates, not ``W = f(theta)``'s; a SatNL model must be passed
    before ``remove_satnl`` for that.

    Each step computes ``H v`` by double backprop (``torch.autograd.grad`` of ``g . v`` with
    ``create_graph=True``), starting from a Gaussian ``v`` drawn with ``seed``. One row per
    iteration: ``iteration`` and ``eigenvalue``, the Rayleigh quotient ``v^T H v`` of the unit
    ``v`` of that step. It converges to the eigenvalue of largest magnitude (negative if that one
    is), at the rate ``(lambda_2 / lambda_1)^(2k)``.
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
    net = copy.deepcopy(model).eval()
    tensors = _hessian_parameters(net, parameters)
    with torch.enable_grad():
        grads = torch.autograd.grad(loss_fn(net(x), labels), tensors, create_graph=True)
        generator = torch.Generator().manual_seed(seed)
        v = _unit([torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device) for t in tensors])
        rows = []
        for iteration in range(1, iterations + 1):
            hv = torch.autograd.grad(grads, tensors, grad_outputs=v, retain_graph=True)
            rayleigh = sum((a.double() * b.double()).sum() for a, b in zip(v, hv))
            rows.append({"iteration": iteration, "eigenvalue": float(rayleigh)})
            v = _unit([h.detach() for h in hv])
    return pd.DataFrame(rows)


def hessian_top_eigenvalue(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    iterations: int = 20,
    seed: int = 0,
    *,
    parameters: str = "trainable",
    loss_fn=F.cross_entropy,
) -> float:
    """The top eigenvalue of the loss Hessian: the last estimate of :func:`hessian_power_iteration`
    (Park et al. 2022, Fig. 5 [summary]), same arguments."""
    trace = hessian_power_iteration(model, x, labels, iterations, seed, parameters=parameters, loss_fn=loss_fn)
    return float(trace["eigenvalue"].iloc[-1])


@torch.no_grad()
def noise_robustness(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    bit_width: int = 3,
    draws: int = 5,
    seed: int = 0,
    *,
    fold: bool = False,
) -> pd.DataFrame:
    """Accuracy under random weight noise the size of W``bit_width`` rounding (Park et al. 2022,
    insight 3, robustness as flatness [summary]; our protocol [recon], book/methods.md §1).

    The model is deployed unfolded (or folded with ``fold=True``); every conv/linear weight, stem and
    classifier included, gets independent uniform noise on ``[-step/2, step/2]``, ``step`` the
    layer's per-tensor symmetric min-max step at ``bit_width`` (the error rounding would make, but
    independent of where each weight lies on the grid). Noise comes from a CPU
    ``torch.Generator`` seeded with ``seed``, layer after layer, draw after draw.

    One row: ``bit_width``, ``draws``, ``fp_acc`` (no noise), ``acc_mean`` and ``acc_sd`` (over
    draws, ``ddof=1``; NaN for one draw), ``drop_points = 100 (fp_acc - acc_mean)``.
    """
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be an integer >= 1, got {draws!r}")
    net = _deployed(model, fold)
    layers = [module for _, module in ptq.weighted_layers(net)]
    floats = [module.weight.detach().clone() for module in layers]
    steps = [_minmax_step(w, bit_width) for w in floats]
    generator = torch.Generator().manual_seed(seed)
    accs = []
    for _ in range(draws):
        for module, w, step in zip(layers, floats, steps):
            noise = (torch.rand(w.shape, generator=generator, dtype=w.dtype) - 0.5) * step
            module.weight.copy_(w + noise.to(w.device))
        accs.append(_top1(net, x, labels))
    for module, w in zip(layers, floats):
        module.weight.copy_(w)
    acc = pd.Series(accs, dtype=float)
    fp_acc = _top1(net, x, labels)
    return pd.DataFrame([{
        "bit_width": bit_width, "draws": draws, "fp_acc": fp_acc, "acc_mean": float(acc.mean()),
        "acc_sd": float(acc.std(ddof=1)) if draws > 1 else math.nan,
        "drop_points": 100.0 * (fp_acc - float(acc.mean())),
    }])


def _weight_space(module: nn.Module, theta: torch.Tensor, eps_theta: torch.Tensor) -> torch.Tensor:
    """``J_f(theta) eps_theta``: a perturbation of the trained tensor carried to the float weight
    (through SatNL's ``f``, stopping before any QAT quantizer; the identity without SatNL)."""
    # the double-vjp jvp: forward-mode AD would load TorchScript decompositions (deprecated)
    _, tangent = torch.autograd.functional.jvp(lambda t: qat.float_weight(module, t), theta.detach(), eps_theta)
    return tangent.detach()


def asam_perturbation_by_magnitude(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    rho: float,
    eta: float = sam.DEFAULT_ETA,
    bit_width: int = 3,
    n_buckets: int = 4,
    *,
    loss_fn=F.cross_entropy,
) -> pd.DataFrame:
    """Size of ASAM's perturbation per weight-magnitude bucket, relative to the quantization step
    (Kwon et al. 2021, arXiv 2102.11600, eq. 9; Park et al. 2022 [summary]: SatNL makes small
    weights relatively more sensitive so that ASAM regularises them harder; book/methods.md §1).

    ``eps = rho T^2 g / ||T g||``, ``T = |p| + eta``, from :func:`robustq.sam.perturbations` with
    the gradient ``g`` of ``loss_fn(model(x), labels)`` on this one batch, the model in eval mode
    (a copy; BN on running statistics, where training uses batch statistics), and the norm over
    every trainable parameter, as :class:`robustq.sam.SAM` takes it in training. Under SatNL the
    perturbation lives on the trained ``theta``; it is reported in weight space, carried by the
    Jacobian of ``f``: ``eps_w = J_f(theta) eps_theta``, which is ``f'(theta) eps_theta``
    elementwise for the ``tanh`` and ``scaled_tanh`` forms (first order; ``normalized_tanh`` also
    moves with its max). So pass a SatNL model before ``remove_satnl``.

    Per conv/linear layer, the buckets of :func:`magnitude_quartile_masks` are taken on the float
    weight ``w = f(theta)`` and ``step`` is its per-tensor symmetric min-max step at ``bit_width``.
    One row per (layer, bucket): ``depth``, ``layer``, ``bucket``, ``n_weights``, ``mean_abs_eps``
    (mean ``|eps_w|`` over the bucket) and ``eps_over_step`` (the same divided by ``step``).
    """
    net = copy.deepcopy(model).eval()
    trainable = [p for p in net.parameters() if p.requires_grad]
    with torch.enable_grad():
        grads = torch.autograd.grad(loss_fn(net(x), labels), trainable, allow_unused=True)
    with_grad = [(p, g) for p, g in zip(trainable, grads) if g is not None]
    steps = sam.perturbations([p for p, _ in with_grad], [g for _, g in with_grad], rho, adaptive=True, eta=eta)
    eps_of = {id(p): e for (p, _), e in zip(with_grad, steps)}
    rows = []
    for depth, (name, module) in enumerate(ptq.weighted_layers(net), start=1):
        theta = methods.latent_weight(module)
        if id(theta) not in eps_of:
            raise ValueError(f"layer {name!r} gets no gradient from the loss: ASAM does not perturb it")
        eps_w = _weight_space(module, theta, eps_of[id(theta)]).abs()
        with torch.no_grad():
            w = qat.float_weight(module).detach()
        step = _minmax_step(w, bit_width)
        for bucket, mask in enumerate(magnitude_quartile_masks(w, n_buckets)):
            n = int(mask.sum())
            mean_abs = float(eps_w[mask].double().mean()) if n else math.nan
            rows.append({"depth": depth, "layer": name, "bucket": bucket, "n_weights": n,
                         "mean_abs_eps": mean_abs, "eps_over_step": mean_abs / step})
    return pd.DataFrame(rows)


LATENT_RTOL = 1e-5  # satnl_latent: largest |f(theta) - W| allowed, relative to the layer's max |W|


def satnl_latent(result: experiments.Result) -> nn.Module:
    """``result``'s trained model back in SatNL's ``theta`` space (Park, Jang & Park, ECCV 2022,
    arXiv 2208.00338; forms [recon], :mod:`robustq.satnl`), for what training acted on: ASAM's
    perturbation of ``theta`` (:func:`asam_perturbation_by_magnitude`), gradients and curvature in
    ``theta``.

    A cached result holds plain weights ``W = f(theta)`` (``method.finalize`` folds SatNL) and no
    ``alpha``. Here ``alpha`` is recovered by replaying the start of training
    (``experiments._train_and_store``): ``seed_everything(seed)``, ``dataset_for`` (which draws
    from private generators only, not the global RNG), ``models.make_model`` and
    ``method.prepare``, which rebuilds the initial weights bit for bit and so each layer's
    ``alpha = alpha_mult * std(W_init)``; the cache key covers the training code and the torch
    version, so a cached result was trained by this same code. The global RNGs (python, numpy,
    torch) are restored afterwards. Each SatNL layer then gets that parametrization with
    ``theta = right_inverse(W)`` (large where ``|W|`` is near ``alpha``: expected near
    saturation). Returns an eval-mode copy; ``result.model`` is not touched.

    SatNL only: a QAT quantizer trained on top of it (``symreg_satnl_lsq``) is not restored. A
    method without SatNL gets a plain copy of its model (``ptq.materialize``), unchanged.

    Raises ``ValueError`` if the rebuilt layers do not fit the result's model, or if ``f(theta)``
    differs from the result's weights by more than ``LATENT_RTOL`` times the layer's max ``|W|``
    (``alpha`` below the trained weights: not recovered). The check cannot catch an ``alpha`` too
    large; the replay is what makes it right. Also raises for ``form="normalized_tanh"``:
    ``tanh(theta) / max|tanh(theta)|`` is unchanged by ``theta -> atanh(c tanh(theta))`` for every
    ``c`` in (0, 1], so the folded weights do not determine the trained ``theta``, nor ``f'``.
    """
    latent = ptq.materialize(result.model)
    exp = result.experiment.resolved()
    forms = [p.form for p in methods.make(exp.method, **exp.method_params).parts if isinstance(p, methods.SatNL)]
    if not forms:
        return latent
    if forms[0] == "normalized_tanh":
        raise ValueError(
            "satnl_latent cannot recover theta for form='normalized_tanh': W = tanh(theta)/max|tanh(theta)| "
            "does not change when tanh(theta) is scaled, so the folded weights do not determine theta"
        )
    initial = _initial_model(exp)
    layers = dict(ptq.weighted_layers(latent))
    for name, module in ptq.weighted_layers(initial):
        chain = module.parametrizations["weight"] if torch.nn.utils.parametrize.is_parametrized(module, "weight") else ()
        saturating = [p for p in chain if isinstance(p, satnl.SaturatingWeight)]
        if not saturating:
            continue
        layer = layers.get(name)
        if layer is None or layer.weight.shape != chain.original.shape:
            raise ValueError(f"satnl_latent: layer {name!r} of the rebuilt {exp.model!r} does not match the result's model")
        target = layer.weight.detach().clone()
        parametrization = copy.deepcopy(saturating[0]).to(device=target.device)
        torch.nn.utils.parametrize.register_parametrization(layer, "weight", parametrization)
        with torch.no_grad():
            error = float((layer.weight - target).abs().max())
        scale = float(target.abs().max())
        if not error <= LATENT_RTOL * scale:
            alpha = f" alpha={parametrization.alpha.item():.4g}" if parametrization.form == "scaled_tanh" else ""
            raise ValueError(
                f"satnl_latent: layer {name!r}: f(right_inverse(W)) differs from the result's weights by {error:.3g} "
                f"(max |W| {scale:.4g},{alpha} form={parametrization.form!r}): SatNL's parameters were not recovered"
            )
    if not satnl.has_satnl(latent):
        raise ValueError(f"satnl_latent: the rebuilt {exp.method!r} model has no SatNL layer")
    return latent.eval()


def _initial_model(exp: experiments.Experiment) -> nn.Module:
    """The prepared model of ``exp`` before its first step (:func:`robustq.experiments.prepared`,
    as training builds it); the caller's RNG states are kept."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
            return experiments.prepared(exp.resolved())[2]
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


__all__ += [  # insight 3
    "asam_perturbation_by_magnitude", "hessian_power_iteration", "hessian_top_eigenvalue",
    "magnitude_quartile_masks", "magnitude_sensitivity", "noise_robustness", "quartile_contrast",
    "satnl_latent",
]


# --- gradient-ℓ1: the first-order bound (chapter 05) ---------------------------------------------


def grad_l1_norm(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, *, loss_fn=F.cross_entropy) -> float:
    """``sum_l ||dL/dW_l||_1`` over every conv and linear weight: the weight term of gradient-ℓ1
    regularization (Alizadeh et al., ICLR 2020, arXiv 2002.07520; book/methods.md §2) with unit
    strength and no weighting, measured on a trained model.

    ``L = loss_fn(model(x), labels)`` on the fixed batch, with a plain eval-mode copy of the model
    (BN on its running statistics; SatNL and QAT weights replaced by their values), so two models
    are compared as they deploy. ``model`` is left as it is.
    """
    plain = ptq.materialize(model)
    _, grads = _loss_and_weight_grads(plain, x, labels, loss_fn)
    return float(sum(g.abs().sum() for g in grads))


def first_order_bound(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    bit_widths: Sequence[int],
    a_bits: int | None = None,
    *,
    first_last_8bit: bool = True,
    loss_fn=F.cross_entropy,
    dtype: torch.dtype = torch.float64,
) -> pd.DataFrame:
    """The first-order view of weight quantization behind gradient-ℓ1 regularization (Alizadeh et
    al., ICLR 2020, arXiv 2002.07520; book/methods.md §2): how well ``dW . grad L`` predicts the loss
    change, and how far the [paper] bound ``sum_l (Delta_l / 2) ||dL/dW_l||_1`` sits above it.

    Each bit-width ``b`` deploys the weights as the book's primary setting does
    (:func:`robustq.ptq.quantize_model` with ``QuantSpec(b)``: symmetric per-tensor min-max, BN
    unfolded, the stem and the classifier at 8 bits unless ``first_last_8bit=False``). One row per
    ``b`` (``w_bits``):

    * ``loss_float``, ``loss_quantized``: ``L(W)`` and ``L(q(W))`` on ``(x, labels)``;
    * ``loss_change``: ``L(q(W)) - L(W)``;
    * ``first_order``: ``sum_l <q(W_l) - W_l, dL/dW_l>``, the gradient taken at ``W``;
    * ``bound``: ``sum_l (Delta_l / 2) ||dL/dW_l||_1`` with ``Delta_l`` the step layer ``l`` is
      quantized with at ``b`` (8 bits for the edges), so ``|first_order| <= bound`` always;
    * ``ratio``: ``loss_change / first_order`` (NaN when ``first_order`` is 0); near 1 where the
      first-order term explains the loss change.

    Sums run over every conv/linear weight; biases and BN stay in float. Models are evaluated in
    eval mode on copies (``model`` is left as it is), in ``dtype`` (float64 by default: at 8 bits
    the loss change is small enough for float32 rounding to blur it); weights are quantized in the
    model's own dtype, as deployed. Weights only: ``a_bits`` must be None, because quantized
    activations would need calibration and a first-order term of their own.
    """
    if a_bits is not None:
        raise ValueError(
            f"first_order_bound quantizes weights only, got a_bits={a_bits!r}: pass a_bits=None "
            "(activation quantization would need calibration and its own first-order term)"
        )
    bit_widths = [quant.validate_bit_width(b) for b in bit_widths]
    if not bit_widths:
        raise ValueError("bit_widths must hold at least one bit-width, e.g. [8, 4, 3, 2]")
    plain = ptq.materialize(model)
    reference = copy.deepcopy(plain).to(dtype)
    x, labels = _in_dtype(x, dtype), _in_dtype(labels, dtype)
    loss_float, grads = _loss_and_weight_grads(reference, x, labels, loss_fn)
    rows = []
    for bit_width in bit_widths:
        quantized = ptq.quantize_model(model, QuantSpec(bit_width), fold=False, first_last_8bit=first_last_8bit)
        half_steps = _deployed_half_steps(plain, bit_width, first_last_8bit)
        deltas = _weight_deltas(quantized, plain, half_steps, dtype)
        loss_quantized = _loss(quantized.to(dtype), x, labels, loss_fn)
        first_order = float(sum((d * g).sum() for d, g in zip(deltas, grads)))
        bound = float(sum(h * g.abs().sum() for h, g in zip(half_steps, grads)))
        change = loss_quantized - loss_float
        rows.append({
            "w_bits": bit_width, "loss_float": loss_float, "loss_quantized": loss_quantized,
            "loss_change": change, "first_order": first_order, "bound": bound,
            "ratio": change / first_order if first_order != 0 else math.nan,
        })
    return pd.DataFrame(rows)


def _in_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floating tensors (inputs, regression targets) in ``dtype``; class labels as they are."""
    return t.to(dtype) if t.is_floating_point() else t


def _loss(net: nn.Module, x: torch.Tensor, labels: torch.Tensor, loss_fn) -> float:
    with torch.no_grad():
        return float(loss_fn(net.eval()(x), labels))


def _loss_and_weight_grads(net: nn.Module, x, labels, loss_fn) -> tuple[float, list[torch.Tensor]]:
    """``L`` and ``dL/dW_l`` of each conv/linear weight of ``net`` (a copy: its weights are made
    differentiable even if they were frozen)."""
    weights = [m.weight.requires_grad_(True) for _, m in ptq.weighted_layers(net)]
    with torch.enable_grad():
        loss = loss_fn(net.eval()(x), labels)
        grads = torch.autograd.grad(loss, weights)
    return float(loss.detach()), [g.detach() for g in grads]


def _deployed_half_steps(plain: nn.Module, bit_width: int, first_last_8bit: bool) -> list[float]:
    """``Delta_l / 2`` of each conv/linear weight as :func:`robustq.ptq.quantize_model` deploys it
    at ``bit_width``: the stem and the classifier at ``max(8, b)`` when ``first_last_8bit``."""
    edges = set(models.stem_and_classifier(plain)) if first_last_8bit else set()
    edge_bits = max(ptq.EDGE_BIT_WIDTH, bit_width)
    return [_minmax_step(m.weight, edge_bits if name in edges else bit_width) / 2
            for name, m in ptq.weighted_layers(plain)]


def _weight_deltas(quantized: nn.Module, plain: nn.Module, half_steps: list[float],
                   dtype: torch.dtype) -> list[torch.Tensor]:
    """``q(W_l) - W_l`` per layer in ``dtype``, checked against ``|q(W_l) - W_l| <= Delta_l / 2``
    (up to the rounding of the weights' own dtype): a step that disagrees with the quantizer would
    make ``bound`` wrong without any other sign."""
    deltas = []
    for (name, q), (_, w), half_step in zip(ptq.weighted_layers(quantized), ptq.weighted_layers(plain), half_steps):
        weight = w.weight.detach()
        delta = q.weight.detach().to(dtype) - weight.to(dtype)
        rounding = 4 * torch.finfo(weight.dtype).eps * float(weight.abs().max())
        if float(delta.abs().max()) > half_step + rounding:
            raise RuntimeError(
                f"first_order_bound: layer {name!r} moved by {float(delta.abs().max()):.3g} > Delta/2 = "
                f"{half_step:.3g}; the steps here no longer match ptq.quantize_model's quantizer: update "
                "_deployed_half_steps"
            )
        deltas.append(delta)
    return deltas


__all__ += ["first_order_bound", "grad_l1_norm"]  # gradient-ℓ1 (chapter 05)


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
    zero (book/methods.md §3)."""
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
    as the regularizer's does.
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
        if count < 1:
            raise ValueError(f"count must be >= 1 weights to follow, got {count}")
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


def _relative_gap(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``max|value - reference| / max|reference|``: the largest difference in units of the largest
    entry (elementwise ratios blow up where an entry is near 0)."""
    scale = reference.abs().max().clamp_min(torch.finfo(reference.dtype).tiny)
    return float((value - reference).abs().max() / scale)


def _maxabs_quantize(w: torch.Tensor, bit_width: int) -> torch.Tensor:
    """The oscillation regularizer's quantizer, ``s round_ste(w / s)``, ``s = max|w| / (2^(b-1) - 1)``
    detached: a straight-through QAT with a constant step (book/methods.md §4)."""
    _, qmax = quant.qrange(bit_width)
    scale = (w.detach().abs().max() / qmax).clamp_min(torch.finfo(w.dtype).tiny)
    return scale * quant.round_ste(w / scale)


def ste_gradient_decomposition(
    x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, bit_width: int
) -> dict[str, float]:
    """C7.1: the STE gradient of QAT on a linear model is the float gradient plus a term that
    pushes weights off their level (Wenshøj, Pepin & Selvan, arXiv 2502.00490; book/methods.md §4 [recon]).

    Model ``y_hat = W x`` (``w`` of shape ``(d,)`` for one output, ``(m, d)`` for a layer; ``x`` of
    shape ``(n, d)``, or ``(n,)`` with ``w`` a scalar for the 1-D case; ``y`` of shape ``(n,)`` or
    ``(n, m)``), loss ``L(W) = 1/2 mean_n ||y_n - W x_n||^2``, quantizer ``q`` of
    :func:`_maxabs_quantize` at ``bit_width``. Then exactly
    ``grad_STE L(q(W)) = grad L(W) + (q(W) - W) C`` with ``C = mean_n x_n x_n^T``; for one input
    ``C = E[x^2]`` and the term is the gradient of ``1/2 E[x^2] (q(w)^2 - w^2)``. All in float64.

    Returns ``identity_error``, the largest difference between the STE gradient (autograd, forward
    through ``q``) and ``grad L(W) + (q(W) - W) C`` relative to the largest STE gradient entry
    (the identity holds iff it is at rounding level, <= 1e-5); ``regularizer_error``, the same for
    the autograd gradient of :func:`robustq.regularizers.oscillation` against ``2 (q(W) - W) / N``
    (``N`` weights); ``equivalent_lam = N mean(diag C) / 2``, the strength at which the
    regularizer's gradient equals the QAT term when ``C`` is a multiple of the identity; and
    ``regularizer_match``, the gap between ``(q(W) - W) C`` and ``equivalent_lam`` times the
    regularizer's gradient: 0 (to rounding) for one input, otherwise the share of the QAT term that
    input correlations and unequal input scales add [recon].
    """
    xs, ys, weight = _linear_problem(x, y, w)
    n_weights = weight.numel()
    leaf = weight.clone().requires_grad_(True)
    quantized = _maxabs_quantize(leaf, bit_width)
    ste = torch.autograd.grad(_half_mse(xs, ys, quantized), leaf)[0]
    float_grad = torch.autograd.grad(_half_mse(xs, ys, leaf), leaf)[0]
    moment = xs.T @ xs / xs.shape[0]
    push = (quantized.detach() - weight) @ moment
    reg_grad = torch.autograd.grad(regularizers.oscillation(leaf, bit_width), leaf)[0]
    lam = n_weights * float(torch.diagonal(moment).mean()) / 2
    return {
        "identity_error": _relative_gap(float_grad + push, ste),
        "regularizer_error": _relative_gap(reg_grad, 2 * (quantized.detach() - weight) / n_weights),
        "equivalent_lam": lam,
        "regularizer_match": _relative_gap(lam * reg_grad, push),
    }


def _linear_problem(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(x, y, W)`` as float64 ``(n, d)``, ``(n, m)`` and ``(m, d)`` tensors, shapes checked."""
    weight = w.detach().to(torch.float64)
    weight = weight.reshape(1, -1) if weight.dim() <= 1 else weight
    xs = x.detach().to(torch.float64)
    xs = xs.reshape(-1, 1) if xs.dim() == 1 else xs
    fits = weight.dim() == 2 and xs.dim() == 2 and xs.shape[1] == weight.shape[1]
    if not fits or y.numel() != xs.shape[0] * weight.shape[0] or y.shape[0] != xs.shape[0]:
        raise ValueError(
            f"shapes do not make a linear model y = W x: x {tuple(x.shape)}, y {tuple(y.shape)}, "
            f"w {tuple(w.shape)}; pass x (n, d), w (d,) or (m, d), y (n,) or (n, m)"
        )
    return xs, y.detach().to(torch.float64).reshape(xs.shape[0], -1), weight


def _half_mse(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return 0.5 * (y - x @ weight.T).pow(2).sum(dim=1).mean()


__all__ += [  # SinReQ and oscillations (chapters 06, 07)
    "OscillationTracker", "WeightTrajectory", "distance_to_grid", "grid_distance", "integer_levels",
    "ste_gradient_decomposition",
]
