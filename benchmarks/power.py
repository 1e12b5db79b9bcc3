"""Power of the book's claim endpoints, measured on the selection seeds, which are never graded.

    python benchmarks/power.py [--profile book] [--seeds 100 101 102 103 104]

Trains (or loads) the baseline, SymReg (channel scope, the registry's default λ = 1: the book's λ
is chosen later, by its own rule) and SatNL on each seed with the given profile, computes every
endpoint the chapters grade, and prints per endpoint the standard deviation of the paired per-seed
differences and the minimum detectable effect t_{0.975,n-1} sd / sqrt(n) at 3 and 5 seeds.
The primary-endpoint rule, fixed before this was run (book/methods.md §7): of the candidates ``w432``
and ``variants43``, the one whose larger MDE over the two comparisons (SymReg and SatNL against
the baseline) is smaller. ``book_settings.PLANNING_SD`` and ``ENDPOINT`` hold what it printed.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import pandas as pd

from robustq import analysis, book, book_settings, experiments
from robustq.experiments import Experiment
from robustq.quant import QuantSpec
from robustq.verdicts import minimum_detectable_effect

METHODS = {"baseline": {}, "symreg": {"scope": "channel"}, "satnl": {}}
CANDIDATES = ("w432", "variants43")


def per_seed_values(profile: str, seeds: list[int]) -> pd.DataFrame:
    rows = []
    for seed in seeds:
        for method, params in METHODS.items():
            start = time.perf_counter()
            result = experiments.run(Experiment(method=method, method_params=params, seed=seed, profile=profile),
                                     progress=False)
            x, _ = book.test_batch(experiments.dataset_for(result.experiment), profile)
            row = {"seed": seed, "method": method, "float": 100 * result.test_acc,
                   "train_s": result.metrics["train_time_s"]}
            for name, endpoint in book_settings.ENDPOINTS.items():
                row[name] = endpoint.value(result)
            row["sqnr_drop_db"] = analysis.sqnr_drop(result.model, x, QuantSpec(4))
            row["bias_drift_pct"] = analysis.bias_drift(result.model, x, QuantSpec(3))
            row["log_excess_pct"] = analysis.minmax_log_excess(result.model)
            row["seconds"] = time.perf_counter() - start
            rows.append(row)
            print(json.dumps(row), flush=True)
    return pd.DataFrame(rows)


def spreads(values: pd.DataFrame) -> pd.DataFrame:
    """sd of paired differences per endpoint and comparison, and the MDE at 3 and 5 seeds."""
    wide = values.pivot(index="seed", columns="method")
    comparisons = {
        **{(e, f"{m} - baseline"): wide[e][m] - wide[e]["baseline"]
           for e in (*book_settings.ENDPOINTS, "float") for m in ("symreg", "satnl")},
        ("sqnr_drop_db", "baseline"): wide["sqnr_drop_db"]["baseline"],
        ("bias_drift_pct", "baseline - symreg"): wide["bias_drift_pct"]["baseline"] - wide["bias_drift_pct"]["symreg"],
        ("log_excess_pct", "baseline - satnl"): wide["log_excess_pct"]["baseline"] - wide["log_excess_pct"]["satnl"],
    }
    rows = []
    for (endpoint, comparison), d in comparisons.items():
        sd = float(d.std(ddof=1))
        rows.append({"endpoint": endpoint, "comparison": comparison, "mean": float(d.mean()), "sd": sd,
                     "MDE n=3": minimum_detectable_effect(sd, 3), "MDE n=5": minimum_detectable_effect(sd, 5)})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="book")
    parser.add_argument("--seeds", type=int, nargs="+", default=[100, 101, 102, 103, 104])
    args = parser.parse_args()
    if set(args.seeds) & set(book_settings.graded_seeds(args.profile)):
        raise SystemExit("power is measured on selection seeds only; graded seeds must not be looked at")
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
