"""What every chapter notebook does the same way: setup, the fixed test batch, the run summary, the
claims with their power before the run, and the verdict table with its record for the Findings page.

A chapter's first code cell is ``profile = book.setup(profile)``; its claims are
:class:`robustq.verdicts.Claim` objects written before any model is trained, shown with
:func:`power_table`, and graded at the end with :func:`grade_claims`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import pandas as pd
import torch
from IPython.display import Markdown, display

from robustq import book_settings, params, plots, verdicts
from robustq.data import BatchLoader, Dataset
from robustq.experiments import Result

SMOKE_IMAGES, BOOK_IMAGES = 256, 1000


def setup(profile: str | None, seed: int = 0, **parameters) -> str:
    """Validate the notebook's parameters (:func:`robustq.params.check_all`: a bad one fails here,
    before any work, naming the fix), resolve the profile, apply the house plot style, seed torch
    and silence known-harmless warnings."""
    profile = params.check_all(profile=profile, seed=seed, **parameters)["profile"]
    plots.use_style()
    pd.set_option("display.max_colwidth", None)  # verdict and power notes are sentences: show them whole
    warnings.filterwarnings("ignore", message="The figure layout has changed to tight")  # seaborn vs constrained
    torch.manual_seed(seed)
    return profile


def say(text: str) -> None:
    """Show Markdown whose numbers come from the computation above it."""
    display(Markdown(text))


def test_batch(data: Dataset, profile: str, n_images: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n_images`` normalised images of the (shared, fixed) test split and their labels;
    by default 256 under ``smoke`` and 1000 otherwise."""
    n = n_images or (SMOKE_IMAGES if profile == "smoke" else BOOK_IMAGES)
    return next(iter(BatchLoader(data.test, min(n, len(data.test)), mean=data.mean, std=data.std)))


def runs_table(runs: Mapping[str, Mapping[int, Result]]) -> pd.DataFrame:
    """One row per method: seeds, float test accuracy (mean ± sd over seeds), training time, and how
    many models came from the cache."""
    rows = []
    for name, by_seed in runs.items():
        acc = pd.Series({seed: 100 * r.test_acc for seed, r in by_seed.items()})
        rows.append({
            "method": name,
            "seeds": ", ".join(map(str, by_seed)),
            "float test accuracy (%)": _mean_sd(acc),
            "training time per model (s)": round(sum(r.metrics["train_time_s"] for r in by_seed.values()) / len(by_seed), 1),
            "from cache": f"{sum(r.cached for r in by_seed.values())} of {len(by_seed)}",
        })
    return pd.DataFrame(rows).set_index("method")


def choices_table(choices: Mapping[str, dict]) -> pd.DataFrame:
    """The open choices made on the selection seed: candidates' validation accuracy, the rule, the value."""
    rows = []
    for name, chosen in choices.items():
        validation = chosen["validation"]
        rows.append({
            "method": name,
            "baseline val. acc. (%)": round(100 * validation["baseline"], 2),
            **{f"{chosen['param']} = {value:g}": round(100 * acc, 2)
               for value, acc in validation.items() if value != "baseline"},
            "chosen": chosen["value"],
        })
    return pd.DataFrame(rows).set_index("method")


def power_table(claims: Sequence[verdicts.Claim], profile: str) -> pd.DataFrame:
    """Before the run: each claim's rule and its minimum detectable effect at this profile's number
    of graded seeds, from the spread measured on the selection seeds (``book_settings.PLANNING_SD``)."""
    n = len(book_settings.graded_seeds(profile))
    rows = []
    for claim in claims:
        sd = book_settings.PLANNING_SD.get(claim.endpoint, math.nan)
        rows.append({
            "claim": claim.claim,
            "endpoint": claim.endpoint,
            "rule": f"{claim.rule}, {'τ' if claim.rule == 'paired' else 'margin'} = {claim.threshold:g}",
            "seeds": n,
            "planning sd": sd,
            "MDE": book_settings.planning_mde(n, claim.endpoint),
            "power": claim.power_note(sd, n, profile) if math.isfinite(sd) else "no planning sd measured",
        })
    return pd.DataFrame(rows).set_index("claim").round(2)


def grade_claims(
    chapter: str,
    graded: Sequence[tuple[verdicts.Claim, Mapping[int, float] | pd.Series, Mapping[int, float] | pd.Series]],
    profile: str,
) -> pd.DataFrame:
    """Grade each ``(claim, candidate per seed, reference per seed)`` by its rule, record the rows for
    the Findings page (``verdicts.record_claims``), and return the verdict table."""
    n = len(book_settings.graded_seeds(profile))
    records = []
    for claim, candidate, reference in graded:
        verdict = claim.grade(candidate, reference)
        mde_planned = book_settings.planning_mde(n, claim.endpoint)
        records.append({**verdicts.claim_record(claim, verdict, mde_planned), "profile": profile})
    verdicts.record_claims(chapter, records, verdicts.findings_dir(profile))
    table = pd.DataFrame(records).set_index("claim")
    table["mean ± se"] = [f"{m:+.2f} ± {s:.2f}" for m, s in zip(table["mean"], table["se"])]
    return table[["statement", "rule", "threshold", "n", "mean ± se", "mde", "grade"]].round(2)


def _mean_sd(values: pd.Series) -> str:
    if len(values) < 2:
        return f"{values.mean():.2f}"
    return f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"
