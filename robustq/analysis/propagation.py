"""Layer-wise error propagation of weight quantization and the output shift it causes (chapter 01;
also 00 for :func:`relative_mse`, 02 and 04 for :func:`weight_tails`).

Park, Jang & Park (ECCV 2022, arXiv 2208.00338), insight 1 (Fig. 1 [summary]), as listed in
book/methods.md ("Analyses to reproduce", [recon]; the paper's own protocol is known only from a
third-party summary): per conv/linear layer, the KL divergence between the output distributions of
the float and the quantized network, the per-channel mean shift ``|E[y_q] - E[y]| / std(y)`` and
the relative MSE; with every layer quantized (the error that reached the layer) or one layer at a
time (the error the layer adds itself). The analytic link of the mean shift to the weight error,
``E[dy_c] = sum_i dW_ci E[x_i]`` [recon], is :func:`shift_prediction`.

Pure functions, tensors and models in, tidy ``pandas`` frames out (one row per observation). Models
are analysed as deployed (book/methods.md §0): BN unfolded by default (the papers' setting), or
folded into the convs first with ``fold=True`` (:func:`robustq.ptq.fold_bn`).

* outputs: :func:`layer_io`, :func:`layer_outputs`, :func:`quantize_layers`
* metrics: :func:`kl_divergence`, :func:`mean_shift`, :func:`signed_shift`, :func:`relative_mse`,
  :func:`sqnr_db`
* insight 1: :func:`error_propagation`, :func:`propagation_grid`, :func:`sqnr_drop`,
  :func:`bias_drift`, :func:`layer_shifts`, :func:`weight_error_mean`, :func:`shift_prediction`
* weight symmetry: :func:`weight_symmetry`, :func:`weight_tails`

>>> y = torch.tensor([1.0, -2.0, 3.0])
>>> relative_mse(y, 0.5 * y), round(sqnr_db(y, 0.5 * y), 2), sqnr_db(y, y)
(0.25, 6.02, inf)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from robustq import ptq, quant
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
    overwrite them. The model is run as it is (fold it first if it has BatchNorm). The book's own
    diagnostic (the probe behind insight 1's per-layer measures)."""
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
    """Output of every conv and linear layer of ``model`` on ``x`` (see :func:`layer_io`; the book's
    own diagnostic)."""
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
    opposite shifts of different channels cancel, which shows whether a layer drifts one way (the
    book's own diagnostic)."""
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
    """``||y_q - y||^2 / ||y||^2`` (book/methods.md "Analyses to reproduce" [recon]: insight 1's
    relative MSE of Park et al. 2022)."""
    y_fp, y_q = y_fp.detach(), y_q.detach()
    return float((y_q - y_fp).pow(2).sum().double() / y_fp.pow(2).sum().double().clamp_min(1e-300))


# --- quantizing some layers ----------------------------------------------------------------------


@torch.no_grad()
def quantize_layers(model: nn.Module, w_spec: QuantSpec, names: Iterable[str] | None = None) -> nn.Module:
    """A copy of (an already folded) ``model`` with the weights of the layers in ``names`` (all
    conv/linear layers if ``None``) fake-quantized by :func:`robustq.quant.quantize` (per output
    channel along axis 0 when ``w_spec.per_channel``). Biases stay in float. The book's own
    diagnostic (the quantized network of insight 1)."""
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
    the KL (book/methods.md §7); the book's KL leaves those positions out (the book's own
    diagnostic)."""
    if not isinstance(module, nn.Conv2d):
        return None
    window = {"kernel_size": module.kernel_size, "stride": module.stride, "padding": module.padding,
              "dilation": module.dilation}
    # max - min over each window (zero padding counts as a value, so borders usually vary)
    spread = F.max_pool2d(x, **window) + F.max_pool2d(-x, **window)
    return spread.amax(dim=1) > 0


def _varying_values(y_fp, y_q, varying):
    if varying is None:
        return y_fp, y_q
    pick = lambda y: y.movedim(1, -1)[varying]  # [positions, channels]
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
    check_choice("mode", mode, MODES)
    net = ptq.deployment(model, fold)
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
    """:func:`error_propagation` for every weight spec and mode, running the float network once (Park
    et al. 2022, insight 1 and Fig. 1 [summary]). Adds the columns ``w_bits``, ``symmetric``, ``per_channel``, ``policy``;
    with the ``labels`` of ``x`` also ``acc`` (top-1 accuracy on ``x`` of the network with every
    layer quantized, NaN for mode ``"single"``) and ``fp_acc`` (of the float network)."""
    net = ptq.deployment(model, fold)
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


def _propagation(net, x, reference: _FloatPass, w_spec, mode, bins, eps, labels=None) -> pd.DataFrame:
    check_choice("mode", mode, MODES)
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
    Layer names must match (both folded or both unfolded). The book's own diagnostic of Park et
    al. 2022's bias drift [summary]."""
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
    net = ptq.deployment(model, fold)
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
    net = ptq.deployment(model, fold)
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
    measures the BN-folded weights that get quantized; ``fold=False`` the trained conv weights.
    The book's own diagnostic of the symmetry SymReg asks for (Park et al. 2022, insight 1 [summary];
    book/methods.md §1)."""
    from robustq.regularizers import sym_reg

    net = ptq.deployment(model, fold)
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
    (``max|W| / std(W)``) and the ``kurtosis`` (3 Gaussian, 6 Laplace, 1.8 uniform), as deployed
    (the book's own diagnostic: what makes min-max clipping costly, Park et al. 2022, insight 2)."""
    rows = []
    for depth, (name, module) in enumerate(ptq.weighted_layers(ptq.deployment(model, fold)), start=1):
        w = module.weight.detach().double().flatten()
        centered = w - w.mean()
        std = centered.pow(2).mean().sqrt()
        rows.append({"depth": depth, "layer": name, "max_over_std": float(w.abs().max() / std),
                     "kurtosis": float(centered.pow(4).mean() / std**4)})
    return pd.DataFrame(rows)
