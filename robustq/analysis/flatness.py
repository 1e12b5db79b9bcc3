"""Which weights quantization hurts, and how flat the loss is around them (chapter 04).

Park, Jang & Park (ECCV 2022, arXiv 2208.00338), insight 3 (Fig. 4 and 5 [summary]); our protocol
[recon], book/methods.md §1, "Analyses to reproduce" (3): the accuracy cost of quantizing one
weight-magnitude bucket of one layer, the top eigenvalue of the loss Hessian, accuracy under random
weight noise the size of rounding, and the size of ASAM's perturbation (Kwon et al. 2021, arXiv
2102.11600) per magnitude bucket. Accuracies are top-1 on the given batch; costs are in points.

Pure functions, tensors and models in, tidy ``pandas`` frames out (one row per observation).
A trained SatNL result is brought back to ``theta`` space, where training acted, by
:func:`robustq.latent.satnl_latent` (it needs the runner, so it lives above this package).

* magnitude buckets: :func:`magnitude_quartile_masks`, :func:`magnitude_sensitivity`,
  :func:`quartile_contrast`
* flatness: :func:`hessian_power_iteration`, :func:`hessian_top_eigenvalue`, :func:`noise_robustness`
* ASAM: :func:`asam_perturbation_by_magnitude`

>>> magnitude_quartile_masks(torch.tensor([0.1, -4.0, 2.0, -0.3]), 2).int().tolist()
[[1, 0, 0, 1], [0, 1, 1, 0]]
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from robustq import methods, ptq, qat, quant, sam
from robustq.analysis._common import _minmax_step
from robustq.params import check_choice, check_int
from robustq.quant import QuantSpec

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
    check_int("n_buckets", n_buckets, minimum=1, example=4)
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
    net = ptq.deployment(model, fold)
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
    check_choice("parameters", parameters, HESSIAN_PARAMETERS)
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
    check_int("iterations", iterations, minimum=1, example=20)
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
    check_int("draws", draws, minimum=1, example=5)
    net = ptq.deployment(model, fold)
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
