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
  :func:`hessian_top_eigenvalue`, :func:`noise_robustness`, :func:`asam_perturbation_by_magnitude`
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from robustq import ptq, qat, quant, sam
from robustq.data import Dataset
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


def _trained_weight(module: nn.Module) -> torch.Tensor:
    """The trained tensor behind ``module.weight``: ``theta`` under SatNL or QAT, else the weight."""
    if torch.nn.utils.parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def _hessian_parameters(net: nn.Module, parameters: str) -> list[torch.Tensor]:
    if parameters not in HESSIAN_PARAMETERS:
        raise ValueError(f"parameters must be one of {HESSIAN_PARAMETERS}, got {parameters!r}")
    if parameters == "weights":
        return [_trained_weight(m) for _, m in ptq.weighted_layers(net)]
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
        theta = _trained_weight(module)
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


__all__ += [  # insight 3
    "asam_perturbation_by_magnitude", "hessian_power_iteration", "hessian_top_eigenvalue",
    "magnitude_quartile_masks", "magnitude_sensitivity", "noise_robustness", "quartile_contrast",
]
