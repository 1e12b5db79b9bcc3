"""Power of the book's claim endpoints, measured on the selection seeds, which are never graded.

    python benchmarks/power.py [--profile book] [--seeds 100 101 102 103 104]

Trains (or loads) the baseline, SymReg (channel scope, the registry's default λ = 1: the book's λ
is chosen later, by its own rule), SatNL, SymReg+SatNL+ASAM, LSQ and LSQ on SymReg+SatNL (the
book's 3-bit QAT setting) on each seed with the given profile, computes the endpoints the chapters
grade, and prints per endpoint the standard deviation of the paired per-seed differences and the
minimum detectable effect t_{0.975,n-1} sd / sqrt(n) at 3 and 5 seeds.
The primary-endpoint rule, fixed before this was run (book/methods.md §7): of the candidates ``w432``
and ``variants43``, the one whose larger MDE over the two comparisons (SymReg and SatNL against
the baseline) is smaller. ``endpoints.PLANNING_SD`` and ``ENDPOINT`` hold what it printed.
"""

from __future__ import annotations

import json
import math
import time

import pandas as pd
from common import selection_seed_arguments

from robustq import analysis, book, book_settings, endpoints, experiments, profiles
from robustq.experiments import Experiment
from robustq.quant import QuantSpec
from robustq.verdicts import minimum_detectable_effect

# Chapters 01-02 (SymReg, SatNL), 03 (its endpoints below) and 04 (SymReg+SatNL+ASAM, LSQ with and
# without SymReg+SatNL, cross-bit): each method, its parameters, and whether it is a QAT model
# (judged at its own quantizer, cross-bit only).
METHODS = {
    "baseline": {}, "symreg": {"scope": "channel"}, "satnl": {},
    "symreg_satnl_asam": {"scope": "channel"},
    "qat_lsq": book_settings.QAT_PARAMS, "symreg_satnl_lsq": {**book_settings.QAT_PARAMS, "scope": "channel"},
}
QAT_METHODS = ("qat_lsq", "symreg_satnl_lsq")
CANDIDATES = ("w432", "variants43")


def per_seed_values(profile: str, seeds: list[int]) -> pd.DataFrame:
    rows = []
    for seed in seeds:
        for method, params in METHODS.items():
            start = time.perf_counter()
            result = experiments.run(Experiment(method=method, method_params=params, seed=seed, profile=profile),
                                     progress=False)
            row = {"seed": seed, "method": method, "float": 100 * result.test_acc,
                   "train_s": result.metrics["train_time_s"]}
            row.update(qat_values(result) if method in QAT_METHODS else ptq_values(result, method, profile))
            row["seconds"] = time.perf_counter() - start
            rows.append(row)
            print(json.dumps(row), flush=True)
    return pd.DataFrame(rows)


def qat_values(result) -> dict[str, float]:
    return {"crossbit": endpoints.ENDPOINTS["crossbit"].value(result)}


def ptq_values(result, method: str, profile: str) -> dict[str, float]:
    primary = endpoints.primary_endpoint()
    row = {primary.name: primary.value(result)}
    if method == "symreg_satnl_asam":
        return row
    data = experiments.dataset_for(result.experiment)
    x, labels = book.test_batch(data, profiles.get(profile).analysis_images)
    for name, endpoint in endpoints.ENDPOINTS.items():
        if name != "crossbit":
            row[name] = endpoint.value(result)
    by_symmetry = primary.by(result, "symmetric")
    row[f"{primary.name}_symmetric"], row[f"{primary.name}_asymmetric"] = by_symmetry[True], by_symmetry[False]
    row[f"{primary.name}_bias_corrected"] = primary.with_settings("bias_corrected", bias_correction=(True,)).value(result)
    row["sqnr_drop_db"] = analysis.sqnr_drop(result.model, x, QuantSpec(4))
    row["bias_drift_pct"] = analysis.bias_drift(result.model, x, QuantSpec(3))
    row["log_excess_pct"] = analysis.minmax_log_excess(result.model)
    sensitivity = analysis.magnitude_sensitivity(result.model, x, labels, bit_width=3)
    row["quartile_contrast_points"] = float(analysis.quartile_contrast(sensitivity)["contrast_points"].iloc[0])
    return row


def spreads(values: pd.DataFrame) -> pd.DataFrame:
    """sd of paired differences per endpoint and comparison, and the MDE at 3 and 5 seeds."""
    wide = values.pivot(index="seed", columns="method")
    primary = endpoints.ENDPOINT
    symmetric, asymmetric = wide[f"{primary}_symmetric"], wide[f"{primary}_asymmetric"]
    comparisons = {
        **{(e, f"{m} - baseline"): wide[e][m] - wide[e]["baseline"]
           for e in (*endpoints.ENDPOINTS, "float") if e != "crossbit" for m in ("symreg", "satnl")},
        ("symmetry_gain_contrast", "symreg gain, symmetric - asymmetric"):
            (symmetric["symreg"] - symmetric["baseline"]) - (asymmetric["symreg"] - asymmetric["baseline"]),
        (f"{primary}_vs_bias_corrected", "symreg - baseline with bias correction"):
            wide[primary]["symreg"] - wide[f"{primary}_bias_corrected"]["baseline"],
        ("sqnr_drop_db", "baseline"): wide["sqnr_drop_db"]["baseline"],
        ("bias_drift_pct", "baseline - symreg"): wide["bias_drift_pct"]["baseline"] - wide["bias_drift_pct"]["symreg"],
        ("log_excess_pct", "baseline - satnl"): wide["log_excess_pct"]["baseline"] - wide["log_excess_pct"]["satnl"],
        (primary, "symreg_satnl_asam - baseline"): wide[primary]["symreg_satnl_asam"] - wide[primary]["baseline"],
        ("quartile_contrast_points", "baseline"): wide["quartile_contrast_points"]["baseline"],
        ("crossbit", "symreg_satnl_lsq - qat_lsq"): wide["crossbit"]["symreg_satnl_lsq"] - wide["crossbit"]["qat_lsq"],
    }
    rows = []
    for (endpoint, comparison), d in comparisons.items():
        sd = float(d.std(ddof=1))
        rows.append({"endpoint": endpoint, "comparison": comparison, "mean": float(d.mean()), "sd": sd,
                     "MDE n=3": minimum_detectable_effect(sd, 3), "MDE n=5": minimum_detectable_effect(sd, 5)})
    return pd.DataFrame(rows)


def main() -> None:
    args = selection_seed_arguments(__doc__.splitlines()[0], "power is measured")
    values = per_seed_values(args.profile, args.seeds)
    table = spreads(values)
    pd.set_option("display.width", 160)
    print(values.groupby("method").mean(numeric_only=True).round(2).to_string())
    print(table.round(2).to_string(index=False))
    worst = table[table["endpoint"].isin(CANDIDATES)].groupby("endpoint")["MDE n=5"].max()
    print(f"primary endpoint by the rule: {worst.idxmin()} (largest MDE at n=5: "
          + ", ".join(f"{e} {v:.2f}" for e, v in worst.items()) + ")")
    # PLANNING_SD: per endpoint, the largest sd over its comparisons (conservative)
    planning = table.groupby("endpoint")["sd"].max()
    print("PLANNING_SD = " + json.dumps({e: round(v, 2) for e, v in planning.items() if math.isfinite(v)}))


if __name__ == "__main__":
    main()
