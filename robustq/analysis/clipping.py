"""Weight clipping curves and accuracy per range policy (chapter 02; chapter 00 for
:func:`clip_curve` and :func:`optimal_ratio`).

Park, Jang & Park (ECCV 2022, arXiv 2208.00338), insight 2 (range clamping [summary]), as listed in
book/methods.md ("Analyses to reproduce", [recon]): weight MSE against the clip ratio ``r`` of a
symmetric (or asymmetric) grid, its argmin ``r*(b)``, and accuracy per range policy
(:func:`policy_grid`).

Pure functions, tensors and models in, tidy ``pandas`` frames out (one row per observation). Models
are analysed as deployed (book/methods.md §0): BN unfolded by default, folded with ``fold=True``.

* clip curves: :func:`clip_curve`, :func:`model_clip_curves`, :func:`optimal_ratio`,
  :func:`default_ratios`, :func:`minmax_log_excess`
* range policies: :func:`policy_grid`, :func:`policy_spread`
* rank agreement: :func:`spearman`

>>> spearman([1, 2, 3, 4], [10, 20, 30, 45]), spearman([1, 2, 3], [3, 2, 1])
(1.0, -1.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd
import torch
from torch import nn

from robustq import ptq, quant
from robustq.data import Dataset
from robustq.quant import QuantSpec

# --- clipping curves -----------------------------------------------------------------------------


def default_ratios(low: float = 0.1) -> list[float]:
    """The clip ratios of the ``mse`` range policy's search (:func:`robustq.quant.mse_grid`) from
    ``low`` to 1, so that an argmin on them is the clip the policy would pick (when >= ``low``; the
    book's own diagnostic)."""
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
    """The row of least ``mse`` (first on ties, as the ``mse`` policy) of each curve in ``curves``:
    the optimal clip ratio ``r*(b)`` of Park et al. 2022, insight 2 [summary] (book/methods.md
    "Analyses to reproduce" [recon]).

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
    default, folded with ``fold=True``), with ``depth`` and ``layer`` columns (Park et al. 2022,
    insight 2 [summary])."""
    frames = [
        clip_curve(module.weight, bit_widths, ratios, symmetric).assign(depth=depth, layer=name)
        for depth, (name, module) in enumerate(ptq.weighted_layers(ptq.deployment(model, fold)), start=1)
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
    unless ``kwargs`` say otherwise). Adds ``drop = fp_acc - acc``. Park et al. 2022, insight 2
    [summary]: accuracy per range policy (book/methods.md "Analyses to reproduce" [recon])."""
    frame = ptq.bit_sweep(model, data, w_bits=bit_widths, a_bits=a_bits, policy=policies, **kwargs)
    return frame.assign(drop=frame["fp_acc"] - frame["acc"])


def policy_spread(grid: pd.DataFrame, by: Sequence[str] = ("w_bits", "a_bits")) -> pd.DataFrame:
    """Per group of ``grid`` (a :func:`policy_grid` frame, possibly with a ``model`` column), the
    best and worst accuracy over range policies and their difference ``spread``: how much the
    choice of range policy matters (the book's own diagnostic)."""
    by = list(by)
    stats = grid.groupby(by)["acc"].agg(best="max", worst="min").reset_index()
    return stats.assign(spread=stats["best"] - stats["worst"])


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks on ties); NaN when either side is constant. A
    standard statistic, not from the papers: the book's own diagnostic of whether two measures rank
    models alike."""
    rx = pd.Series(list(x)).rank().to_numpy()
    ry = pd.Series(list(y)).rank().to_numpy()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx**2).sum() * (ry**2).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else math.nan
