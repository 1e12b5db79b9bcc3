"""What every chapter notebook does the same way: setup, the fixed test batch, the run summary, the
claims with their power before the run, and the verdict table with its record for the Findings page.

A chapter's first code cell is ``profile = book.setup(profile)``; its claims are
:class:`robustq.verdicts.Claim` objects written before any model is trained, shown with
:func:`power_table`, and graded at the end with :func:`grade_claims`. Numbers and words that the
prose quotes are glued (:func:`glue`) and written in Markdown cells as ``{glue:text}`name:.2f```;
figures are glued (:func:`glue_figure`) and placed with ``{glue:figure}`` and a ``:name:``, so
that the text can number and reference them. CONTRIBUTING.md has the chapter template.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import IPython.display
import matplotlib.pyplot as plt
import myst_nb
import numpy as np
import pandas as pd
import torch

from robustq import book_settings, comparison, endpoints, params, plots, profiles, verdicts
from robustq.data import Dataset, first_batch
from robustq.experiments import CHAPTER_ENV, Result
from robustq.files import write_atomic

# executed chapters: book/execute.py writes them here, and Jupyter Book renders them from here
BOOK_NOTEBOOKS = Path(__file__).resolve().parents[1] / "book" / "notebooks"


def setup(profile: str | None, seed: int = 0, *, chapter: str | None = None, **parameters) -> str:
    """Validate the notebook's parameters (:func:`robustq.params.check_all`: a bad one fails here,
    before any work, naming the fix), resolve the profile, apply the house plot style, seed torch
    and silence known-harmless warnings. ``chapter`` (``"03"``) names what this process runs
    (:data:`robustq.experiments.CHAPTER_ENV`: the runs it asks for are recorded under it)."""
    profile = params.check_all(profile=profile, seed=seed, **parameters)["profile"]
    if chapter is not None:
        os.environ[CHAPTER_ENV] = chapter
    plots.use_style()
    pd.set_option("display.max_colwidth", None)  # verdict and power notes are sentences: show them whole
    warnings.filterwarnings("ignore", message="The figure layout has changed to tight")  # seaborn vs constrained
    torch.manual_seed(seed)
    return profile


def glue(**values: object) -> None:
    """Glue each value under its name for the chapter's Markdown, without showing it in the notebook:
    ``{glue:text}`name``` (or ``name:.2f`` for a number) inline. Values are glued as plain text, so
    ``{glue:md}`` finds no Markdown in them: write sentences without Markdown markup."""
    for name, value in values.items():
        if isinstance(value, (np.generic, torch.Tensor)):
            value = value.item()  # numpy 2 prints np.float64(...), which {glue:text} cannot format
        myst_nb.glue(name, value, display=False)


def glue_figure(name: str, figure: plt.Figure | None = None) -> None:
    """Glue ``figure`` (default: the current one) for a ``{glue:figure}`` directive and close it.

    The figure is also shown in the notebook, for a reader running it; the chapter tags the cell
    ``remove-output`` so that the book shows it once, numbered, where the Markdown places it."""
    figure = figure if figure is not None else plt.gcf()
    myst_nb.glue(name, figure, display=True)
    plt.close(figure)


def holds(condition: bool, yes: str = "holds", no: str = "does not hold") -> str:
    """The word the prose uses for a result that is either true or false (glue the result, never
    type it)."""
    return yes if bool(condition) else no


def count_of(count: int, total: int) -> str:
    """How many of ``total`` things, as the prose says it before a plural noun.

    >>> count_of(0, 10), count_of(3, 10), count_of(10, 10)
    ('none of the 10', '3 of the 10', 'all 10')
    """
    params.check_int("total", total, minimum=1, example=10)
    params.check_int("count", count, example=3)
    if count > total:
        raise ValueError(f"count_of: {count} is more than the total {total}")
    return f"none of the {total}" if count == 0 else f"all {total}" if count == total else f"{count} of the {total}"


def number_range(values: pd.Series | Sequence[float], digits: int = 1, unit: str = "") -> str:
    """``"a to b unit"`` for the smallest and largest of ``values``, or one number if they agree."""
    lo, hi = float(min(values)), float(max(values))
    text = f"{lo:.{digits}f}" if f"{lo:.{digits}f}" == f"{hi:.{digits}f}" else f"{lo:.{digits}f} to {hi:.{digits}f}"
    return f"{text} {unit}".rstrip()


def sizes(profile: str | None, **overrides: int | None) -> profiles.Profile:
    """The profile's sizes (:mod:`robustq.profiles`), with the notebook's parameters that are not
    ``None`` in place of the profile's."""
    return profiles.with_sizes(profile, **overrides)


def test_batch(data: Dataset, n_images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n_images`` normalised images of the (shared, fixed) test split and their labels
    (a profile's ``analysis_images`` or ``hessian_images``)."""
    return first_batch(data, data.test, n_images)


def runs_table(runs: Mapping[str, Mapping[int, Result]]) -> pd.DataFrame:
    """One row per method: seeds, float test accuracy (mean ± sd over seeds), training time, how
    many models came from the cache and how many other training workers shared the CPU with them."""
    rows = []
    for name, by_seed in runs.items():
        acc = endpoints.float_values(by_seed)
        rows.append({
            "method": book_settings.label(name),
            "seeds": ", ".join(map(str, by_seed)),
            "float test accuracy (%)": _mean_sd(acc),
            "training time per model (s)": round(sum(r.metrics["train_time_s"] for r in by_seed.values()) / len(by_seed), 1),
            "from cache": f"{sum(r.cached for r in by_seed.values())} of {len(by_seed)}",
            "other training workers": _beside(by_seed.values()),
        })
    return pd.DataFrame(rows).set_index("method")


def _beside(results) -> str:
    """How many other training jobs could share the CPU while these models trained (the other workers
    of the pool the build trains the book's models in, robustq.grid): their training time is per
    model, beside them."""
    return " or ".join(map(str, sorted({int(r.metrics.get("jobs_at_once", 1)) - 1 for r in results})))


def choices_table(choices: Mapping[str, book_settings.Chosen]) -> pd.DataFrame:
    """The open choices made on the selection seeds, one row per candidate and one for the
    reference model: the mean over the selection seeds of the choice's endpoint on the validation
    split (quantized) and of the validation accuracy as trained (float, or with a QAT model's own
    quantizer), in points, and which candidate the rule chose."""
    rows = []
    for name, chosen in choices.items():
        parameter = " = ".join([chosen.param, *chosen.tied])
        candidates = [(f"{parameter} = {value:g}", chosen.validation[value], chosen.trained_validation[value],
                       "chosen" if value == chosen.value else "")
                      for value in chosen.validation]
        reference = (f"{book_settings.label(chosen.reference)} (reference)", chosen.reference_endpoint,
                     chosen.reference_trained, "")
        for model, quantized, floating, picked in [reference, *candidates]:
            rows.append({
                "method": book_settings.label(name), "model": model,
                f"validation {chosen.endpoint} (points)": round(quantized, 2),
                "validation as trained (points)": round(floating, 2), "rule": picked,
            })
    return pd.DataFrame(rows).set_index(["method", "model"])


# the names a package helper glues for a chapter's prose (tests/test_notebooks_format.py reads it)
GLUED_BY = {"choice_table": ("chosen_value", "chosen_how", "chosen_trained_cost")}


def choice_table(name: str, profile: str) -> pd.DataFrame:
    """:func:`choices_table` of book method ``name``'s open choice, made (or recalled) by
    ``book_settings.choose``, with the picked value, how the rule picked it (endpoint, seeds,
    margin over the runner-up, whether the grid was extended and whether the choice sits at its
    end) and its cost as trained
    (:attr:`~robustq.book_settings.Chosen.trained_cost`, points) glued for the prose."""
    chosen = book_settings.choose(name, profile)
    glue(**dict(zip(GLUED_BY["choice_table"], (f"{chosen.value:g}", chosen.outcome, f"{chosen.trained_cost:+.2f}"))))
    return choices_table({name: chosen})


def with_labels(frame: pd.DataFrame, column: str = "method") -> pd.DataFrame:
    """``frame`` with the book methods in ``column`` under the names a reader knows
    (``book_settings.label``), for a figure's legend."""
    return frame.assign(**{column: frame[column].map(book_settings.label)})


# the claims each chapter declared before its run (power_table), by chapter number: grade_claims
# refuses to record a chapter whose declared claims it was not given, so none goes ungraded
_DECLARED: dict[str, dict[str, verdicts.Claim]] = {}


def power_table(claims: Sequence[verdicts.Claim], profile: str) -> pd.DataFrame:
    """Before the run: each claim's rule and its minimum detectable effect at this profile's number
    of graded seeds, from the spread measured on the selection seeds (``endpoints.PLANNING_SD``).
    The claims are the chapter's declared ones, which :func:`grade_claims` must all grade."""
    n = len(book_settings.graded_seeds(profile))
    rows = []
    for claim in claims:
        _DECLARED.setdefault(claim.chapter, {})[claim.claim] = claim
        sd = endpoints.PLANNING_SD.get(claim.endpoint, math.nan)
        rows.append({
            "claim": claim.claim,
            "endpoint": claim.endpoint,
            "rule": f"{claim.rule}, {'τ' if claim.rule == 'paired' else 'margin'} = {claim.threshold:g}",
            "seeds": n,
            "planning sd": verdicts.format_points(sd),
            "MDE": verdicts.format_points(endpoints.planning_mde(n, claim.endpoint)),
            "power": claim.power_note(sd, n, profile) if math.isfinite(sd) else "no planning sd measured",
        })
    return pd.DataFrame(rows).set_index("claim")


PerSeed = Mapping[int, float] | pd.Series


def grade_claims(
    chapter: str,
    graded: Sequence[tuple[verdicts.Claim, PerSeed, PerSeed] | tuple[verdicts.Claim, PerSeed, PerSeed, PerSeed]],
    profile: str,
) -> pd.DataFrame:
    """Grade each ``(claim, candidate per seed, reference per seed)`` by its rule, record the rows for
    the Findings page (``verdicts.record_claims``), and return the verdict table. A fourth item, for
    a claim on quantized accuracy, is its ceiling per seed (the float baseline's accuracy,
    :func:`robustq.endpoints.float_values`): the table and the Findings then show the *room*
    the candidate had to win (:func:`robustq.verdicts.room`); a paired claim with less room than its
    tau is graded *not gradable at this scale*.

    ``chapter`` is the notebook's file name without ``.ipynb`` (the Findings page links it); every
    claim must be the chapter's (its number) and graded once, and every claim the chapter declared
    with :func:`power_table` must be graded: otherwise nothing is recorded and the error names them."""
    _check_graded(chapter, [claim for claim, *_ in graded])
    n = len(book_settings.graded_seeds(profile))
    records = []
    for claim, candidate, reference, *ceiling in graded:
        verdict = claim.grade(candidate, reference, *ceiling)
        mde_planned = endpoints.planning_mde(n, claim.endpoint)
        records.append({**verdicts.claim_record(claim, verdict, mde_planned), "profile": profile,
                        **verdicts.seed_record(claim, candidate, reference, *ceiling)})
    verdicts.record_claims(chapter, records, verdicts.findings_dir(profile))
    table = pd.DataFrame(records).set_index("claim")
    table["mean ± se"] = [verdicts.mean_se(m, s) for m, s in zip(table["mean"], table["se"])]
    table["room"] = [verdicts.room(record) for record in records]
    for column in ("threshold", "mde", "room"):  # a 1e-5 margin is not 0.0, and one seed has no MDE
        table[column] = table[column].map(verdicts.format_points)
    table["same grade leaving one seed out"] = ["{} of {}".format(*verdicts.stability(r)) for r in records]
    return table[["statement", "rule", "threshold", "room", "n", "mean ± se", "mde", "grade",
                  "same grade leaving one seed out"]]


def claims_figure(chapter: str, profile: str, columns: int = 4) -> plt.Figure:
    """The chapter's graded claims as :func:`grade_claims` recorded them, one panel each
    (:func:`robustq.plots.claim_panels`): every seed's paired difference, the mean and its 95%
    interval, tau or the margin, and the room there was to win."""
    records = verdicts.read_claims(chapter, verdicts.findings_dir(profile))
    panels = [{
        "claim": record["claim"], "grade": record["grade"], "rule": record["rule"],
        "threshold": record["threshold"], "unit": endpoints.endpoint_unit(record["endpoint"]),
        "differences": verdicts.differences(record["candidate"], record["reference"]).to_dict(),
        "mean": record["mean"], "room": verdicts.room(record),
        "half_width": verdicts.half_width(record["se"], record["n"]),
    } for record in records]
    return plots.claim_panels(panels, columns=columns)


def _check_graded(chapter: str, claims: Sequence[verdicts.Claim]) -> None:
    number = chapter.split("_", 1)[0]
    ids = [claim.claim for claim in claims]
    problems = [f"{claim.claim} is chapter {claim.chapter}'s" for claim in claims if claim.chapter != number]
    problems += [f"{claim} is graded twice" for claim in sorted({c for c in ids if ids.count(c) > 1})]
    missing = sorted(set(_DECLARED.get(number, {})) - set(ids))
    problems += [f"{claim} was declared (power_table) but is not graded" for claim in missing]
    if problems:
        raise ValueError(f"chapter {chapter!r} cannot record its claims: {'; '.join(problems)}")


def method_colors(names: Sequence[str]) -> dict[str, tuple[float, float, float]]:
    """A figure's colour per method: chapter 08's compared methods (and its bias-corrected
    baseline) keep one hue each across the book, the chapter's other models take the hues left
    (:func:`robustq.plots.method_colors`). Each colour is keyed by the method's name and by its
    label (``book_settings.label``), so a figure may show either."""
    colors = plots.method_colors(list(names), fixed=[*comparison.compared_methods(), "baseline + bias correction"])
    return {**colors, **{book_settings.label(name): color for name, color in colors.items()}}


def table(frame: pd.DataFrame, decimals: int = 2, missing: str = "—") -> IPython.display.HTML:
    """``frame`` as a chapter page shows it: every float with ``decimals`` decimals, a missing
    value as ``missing`` (a method with no number in a column, not "NaN"), and book methods under
    the names a reader knows (``book_settings.label``: "SymReg + SatNL + ASAM", not
    ``symreg_satnl_asam``) in the index and the column names. The numbers stay those of ``frame``;
    only their display changes."""
    params.check_int("decimals", decimals, minimum=0, example=2)
    shown = frame.rename(index=_label, columns=_label)
    return IPython.display.HTML(shown.to_html(na_rep=missing, float_format=lambda v: fixed(v, decimals)))


def _label(value: object) -> object:
    return book_settings.label(value) if isinstance(value, str) else value


def fixed(value: float, decimals: int = 2) -> str:
    """``value`` with ``decimals`` decimals, and no sign on a value that rounds to zero.

    >>> fixed(42.618599), fixed(-0.00001, 4), fixed(-1.5, 0)
    ('42.62', '0.0000', '-2')
    """
    text = f"{value:.{decimals}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def write_download(frame: pd.DataFrame, name: str) -> Path:
    """Write ``frame`` as the CSV file ``name`` beside the executed notebooks (``book/notebooks/``,
    where a chapter's ``{download}`name``` link finds it), atomically, and return its path."""
    if Path(name).name != name or not name.endswith(".csv"):
        raise ValueError(f"a download is a plain file name ending in .csv, got {name!r}")
    path = BOOK_NOTEBOOKS / name
    write_atomic(path, lambda tmp: frame.to_csv(tmp, index=False))
    return path


def _mean_sd(values: pd.Series) -> str:
    if len(values) < 2:
        return f"{values.mean():.2f}"
    return f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"
