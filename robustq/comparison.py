"""Chapter 08's tables: every compared method on one protocol (book/methods.md §0, §7).

The functions take tidy frames, one row per (method, seed, setting), so that a method added to
:data:`robustq.book_settings.METHODS` with ``compared=True`` reaches every table and figure of the
chapter without other changes:

* :func:`compared_methods`: the methods of the comparison, in the book's order;
* the tidy frame itself is :func:`robustq.endpoints.accuracy_table` (every chapter's tables use it):
  per method, seed and setting, ``acc`` and ``fp_acc`` in points;
* :func:`paired_cells`: per method and bit-width, the paired difference to a reference method and
  its grade (:func:`robustq.verdicts.paired`);
* :func:`mean_ranks` and :func:`top_k_share`: the ranking over the primary grid and how stable it is
  across resamples of the seeds, side by side and best first in :func:`ranking`;
* :func:`gain_split`: a method's gain on a quantized endpoint as better float accuracy plus a
  smaller loss to quantization;
* :func:`pareto_front`: the methods no other method beats on both cost and gain;
* :func:`step_seconds`: one method's training step time, for the overhead figure.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pandas as pd

from robustq import book_settings, experiments, verdicts
from robustq.experiments import Experiment
from robustq.params import check_int


def compared_methods() -> list[str]:
    """The book methods of chapter 08 (``MethodSettings.compared``), in :data:`METHODS` order."""
    return [name for name, entry in book_settings.METHODS.items() if entry.compared]


def paired_cells(frame: pd.DataFrame, reference: str, tau: float, by: str = "w_bits") -> pd.DataFrame:
    """Per method (other than ``reference``) and value of ``by``: the mean paired difference of
    ``acc`` to ``reference`` over the seeds both have, its standard error and the grade of
    ``paired(method, reference, tau)``. Columns ``method``, ``by``, ``mean``, ``se``, ``n`` and
    ``grade``."""
    if reference not in set(frame["method"]):
        known = sorted(set(frame["method"]))
        raise ValueError(f"the reference {reference!r} is not among the methods {known}")
    table = frame.pivot_table(index=["seed", by], columns="method", values="acc")
    rows = []
    for method in (m for m in frame["method"].unique() if m != reference):
        for value, group in table.groupby(level=by):
            seeds = group.droplevel(by)
            verdict = verdicts.paired(seeds[method].dropna(), seeds[reference].dropna(), tau)
            rows.append({"method": method, by: value, "mean": verdict.mean, "se": verdict.se, "n": verdict.n,
                         "grade": verdict.grade})
    return pd.DataFrame(rows)


def mean_ranks(frame: pd.DataFrame, by: str = "w_bits") -> pd.Series:
    """Each method's rank (1 = best accuracy) per seed and value of ``by``, averaged, best first."""
    ranks = frame.groupby(["seed", by])["acc"].rank(ascending=False, method="average")
    return frame.assign(rank=ranks).groupby("method")["rank"].mean().sort_values()


def top_k_share(frame: pd.DataFrame, k: int = 3, resamples: int = 1000, seed: int = 0,
                by: str = "w_bits") -> pd.Series:
    """How often each method is among the ``k`` best mean ranks when the seeds are resampled with
    replacement ``resamples`` times (a bootstrap over seeds; fixed ``seed``): the stability of
    :func:`mean_ranks`."""
    check_int("k", k, minimum=1, example=3)
    check_int("resamples", resamples, minimum=1, example=1000)
    ranks = frame.assign(rank=frame.groupby(["seed", by])["acc"].rank(ascending=False, method="average"))
    per_seed = ranks.groupby(["seed", "method"])["rank"].mean().unstack("method")
    generator = np.random.default_rng(seed)
    counts = pd.Series(0, index=per_seed.columns, dtype=float)
    for _ in range(resamples):
        sample = per_seed.iloc[generator.integers(0, len(per_seed), len(per_seed))]
        counts[sample.mean().nsmallest(k).index] += 1
    return (counts / resamples).sort_values(ascending=False)


def ranking(frame: pd.DataFrame, k: int = 3, resamples: int = 1000, by: str = "w_bits") -> pd.DataFrame:
    """:func:`mean_ranks` beside :func:`top_k_share` (column ``in the top k``), best mean rank first
    (two Series put in one frame would be aligned in alphabetical order instead, and its first row
    would name the wrong winner)."""
    shares = top_k_share(frame, k=k, resamples=resamples, by=by)
    ranks = mean_ranks(frame, by=by)
    return pd.DataFrame({"mean rank": ranks, f"in the top {k}": shares.reindex(ranks.index)})


def gain_split(endpoint: pd.DataFrame, floats: pd.DataFrame, reference: str = "baseline") -> pd.DataFrame:
    """Each method's mean paired gain over ``reference`` on a quantized endpoint, split as
    ``endpoint gain = float gain + robustness gain``: the part a better float model explains and the
    rest, a smaller loss to quantization (the robustness SymReg and SatNL claim, Park et al. 2022).
    ``endpoint`` and ``floats`` are seeds × methods in points (a QAT-type model's float accuracy is
    its latent weights', which it never deploys: leave those methods out).

    >>> q = pd.DataFrame({"baseline": [85.0, 86.0], "m": [86.0, 87.0]})
    >>> f = pd.DataFrame({"baseline": [87.0, 87.0], "m": [87.5, 87.5]})
    >>> gain_split(q, f).loc["m"].tolist()
    [1.0, 0.5, 0.5]
    """
    methods = [name for name in endpoint.columns if name != reference and name in floats.columns]
    gain = endpoint[methods].sub(endpoint[reference], axis=0).mean()
    float_gain = floats[methods].sub(floats[reference], axis=0).mean()
    return pd.DataFrame({"endpoint gain": gain, "float gain": float_gain,
                         "robustness gain": gain - float_gain}).rename_axis("method")


def pareto_front(frame: pd.DataFrame, cost: str, gain: str) -> pd.Series:
    """For each row, whether no other row has a cost at most as high and a gain at least as high,
    one of them strictly (lower ``cost`` and higher ``gain`` are better)."""
    values = frame[[cost, gain]].to_numpy(dtype=float)
    dominated = [
        bool(np.any((values[:, 0] <= c) & (values[:, 1] >= g) & ((values[:, 0] < c) | (values[:, 1] > g))))
        for c, g in values
    ]
    return pd.Series([not d for d in dominated], index=frame.index, name="pareto")


def step_seconds(exp: Experiment, steps: int = 30, warmup: int = 5) -> float:
    """Mean wall time of one training step of ``exp``'s method and model, after ``warmup`` steps,
    timed in this process on ``warmup + steps`` batches of its data (an uncached, throwaway run).
    A method with a warm start is timed with its penalty on (``warmup_epochs = 0``); a lazy penalty
    counts as it runs, on one step in k (hence the mean, not the median)."""
    check_int("steps", steps, minimum=1, example=30)
    check_int("warmup", warmup, example=5)
    exp = exp.resolved()
    params = {**exp.method_params, **({"warmup_epochs": 0} if "warmup_epochs" in exp.method_params else {})}
    short = dataclasses.replace(exp, epochs=1, train_size=(warmup + steps) * exp.batch_size, val_size=0,
                                keep="last", method_params=params)  # steps only: no epoch to keep
    stamps: list[float] = []

    def stamp(model, epoch, step):
        stamps.append(time.perf_counter())

    experiments.train_observed(short, on_step_end=[stamp], purpose="timed")
    timed = stamps[warmup - 1:] if warmup else stamps  # from the end of the last warm-up step
    return float(np.mean(np.diff(timed)))
