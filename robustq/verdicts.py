"""Grading claims against the seed-to-seed noise (book/methods.md §7): rules written before the run.

A claim compares a *candidate* with a *reference* on one primary endpoint, in accuracy points, over
the same seeds. With the per-seed differences ``d = candidate - reference``,
``se = std(d, ddof=1) / sqrt(n)`` and ``t = t_{0.975, n-1}`` (Student's t quantile; 4.30 for n = 3,
2.78 for n = 5), the 95% interval is ``mean(d) -+ t se``:

* :func:`paired` ("A beats B by at least tau"): *reproduced* iff the interval lies above 0 and
  ``mean(d) >= tau``; *smaller than claimed* iff it lies above 0 and below tau (a clear gain,
  surely smaller than the claim's); *not reproduced* iff it lies at or below 0
  (``mean(d) + t se <= 0``: no gain, or a loss); else *inconclusive*. Where the claim is on
  quantized accuracy and the *room* to win (:func:`room_of`: the float baseline's accuracy less the
  reference's, mean over seeds) is below tau, it is *not gradable at this scale*: no method could
  reach tau by robustness alone, so the rule is not applied.
* :func:`equivalent` ("A matches B within a margin"): *reproduced* iff ``|mean(d)| + t se <= margin``;
  *not reproduced* iff ``|mean(d)| - t se > margin``; else *inconclusive*.

Fewer than two paired seeds always grade *inconclusive*. A claim's minimum detectable effect (MDE)
is the true effect its seeds detect (interval above 0) with 80% power,
``(t_{0.975, n-1} + t_{0.80, n-1}) sd / sqrt(n)``: :func:`minimum_detectable_effect` computes it
before the run from a standard deviation measured on selection seeds, so a chapter can say which
claims its profile can grade (an MDE above tau/2 is underpowered). :class:`Verdict` rows go to the
book's Findings page through :func:`record_claims`. (Protocol v1, until issue #25, graded a claim
*not reproduced* when its interval reached 0 and stayed below tau, and took ``t se`` as its MDE.)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from scipy import stats

from robustq.files import write_atomic
from robustq.params import check_choice, check_int

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
SMALLER = "smaller than claimed"  # a paired claim's clear gain, surely below its tau
NOT_GRADABLE = "not gradable at this scale"  # a paired claim with less room to win than its tau
GRADES = (REPRODUCED, SMALLER, NOT_REPRODUCED, INCONCLUSIVE, NOT_GRADABLE)
CONFIDENCE = 0.975  # two-sided 95%
POWER = 0.80  # the power at which a minimum detectable effect is detected
FINDINGS_ENV = "ROBUSTQ_FINDINGS"
UNDERPOWERED = "underpowered in the {profile} profile; graded in paper"

PerSeed = Mapping[int, float] | pd.Series | Sequence[float]
# where a claim comes from, and how the Findings name it: a [paper] claim is in the paper's own
# words (its abstract); a [summary] one in the third-party summary we read in its place
SOURCES = {
    "paper": "the paper's", "summary": "a summary of the paper", "book": "the book's own hypothesis",
    "check": "a check that holds by construction",
}


def t_quantile(n: int) -> float:
    """``t_{0.975, n-1}``, the two-sided 95% Student quantile for ``n`` paired seeds (n >= 2).

    >>> round(t_quantile(3), 2), round(t_quantile(5), 2)
    (4.3, 2.78)
    """
    check_int("n (paired seeds)", n, minimum=2, example=5)
    return float(stats.t.ppf(CONFIDENCE, n - 1))


def minimum_detectable_effect(sd: float, n: int) -> float:
    """``(t_{0.975, n-1} + t_{0.80, n-1}) sd / sqrt(n)``: the true mean paired difference that a
    claim graded on ``n`` seeds tells from zero with 80% power, given the standard deviation ``sd``
    of paired differences (measured on selection seeds, before the run). ``inf`` for fewer than 2
    seeds.

    >>> round(minimum_detectable_effect(1.0, 5), 2)  # (2.78 + 0.94) / sqrt(5)
    1.66
    """
    if not math.isfinite(sd) or sd < 0:
        raise ValueError(f"sd must be a finite number >= 0, got {sd!r}")
    return math.inf if n < 2 else _power_factor(n) * sd / math.sqrt(n)


def standardised_effect(differences: Sequence[float] | pd.Series) -> float:
    """``mean(d) / sd(d)`` of paired per-seed differences (``sd`` with ``ddof=1``): an effect in
    units of its own seed-to-seed spread, by which issue #25 ("choose among candidate endpoints by
    standardised effect, not by noise alone") has the book choose a claim's endpoint on the
    selection seeds. An endpoint where the effect is large but every seed disagrees scores low, and
    so does one where the seeds agree on nothing. NaN for fewer than 2 differences; ±inf when they
    are all equal and not 0.

    >>> standardised_effect([2.0, 3.0, 4.0])
    3.0
    >>> standardised_effect([1.0, 1.0])
    inf
    """
    d = pd.Series(differences, dtype=float)
    if len(d) < 2:
        return math.nan
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0:
        return math.copysign(math.inf, mean) if mean else math.nan
    return mean / sd


def _power_factor(n: int) -> float:
    return t_quantile(n) + float(stats.t.ppf(POWER, n - 1))


@dataclass(frozen=True)
class Verdict:
    """The grade of one comparison and the numbers behind it (points; ``se``/``mde`` NaN/inf when
    n < 2). ``threshold`` is ``tau`` for :func:`paired`, the margin for :func:`equivalent`."""

    rule: str
    grade: str
    mean: float
    se: float
    n: int
    threshold: float

    @property
    def mde(self) -> float:
        """Minimum detectable effect of this comparison at 80% power, from its observed spread:
        ``(t_0.975 + t_0.80) se``."""
        return _power_factor(self.n) * self.se if self.n >= 2 else math.inf

    @property
    def interval(self) -> tuple[float, float]:
        """95% confidence interval of the mean difference, ``mean -+ t se``."""
        half = half_width(self.se, self.n)
        return self.mean - half, self.mean + half

    def summary(self) -> str:
        """``+2.3 ± 1.1 points (n = 5)``: mean ± se, for prose and tables."""
        return f"{mean_se(self.mean, self.se)} points (n = {self.n})"


def differences(candidate: PerSeed, reference: PerSeed) -> pd.Series:
    """``candidate - reference`` per seed. Mappings and Series are paired by seed and must hold the
    same seeds (a seed without its partner is an error that names it, never dropped in silence);
    plain sequences are paired by position and must have the same length."""
    cand, ref = _as_series(candidate, "candidate"), _as_series(reference, "reference")
    if not isinstance(candidate, (Mapping, pd.Series)) and len(cand) != len(ref):
        raise ValueError(f"candidate has {len(cand)} seeds and reference {len(ref)}: pair them by seed")
    common = cand.index.intersection(ref.index)
    if len(common) == 0:
        raise ValueError("candidate and reference share no seed: pass per-seed values keyed by seed")
    only_candidate, only_reference = cand.index.difference(ref.index), ref.index.difference(cand.index)
    if len(only_candidate) or len(only_reference):
        raise ValueError(f"unpaired seeds: {sorted(only_candidate)} only in the candidate, {sorted(only_reference)} "
                         "only in the reference; grade both on the same seeds")
    return (cand.loc[common] - ref.loc[common]).astype(float)


def paired(candidate: PerSeed, reference: PerSeed, tau: float, room: float = math.nan) -> Verdict:
    """Grade "candidate beats reference by at least ``tau`` points" (book/methods.md §7); with a
    ``room`` below ``tau`` (:func:`room_of`), *not gradable at this scale* (NaN: no room known).

    >>> paired({0: 80.0, 1: 82.0, 2: 81.0}, {0: 70.0, 1: 71.0, 2: 70.5}, tau=2).grade
    'reproduced'
    >>> paired([70.0, 71.0, 70.0], [70.5, 70.0, 70.2], tau=3).grade
    'inconclusive'
    >>> paired([69.0, 69.2, 69.1], [70.5, 70.0, 70.2], tau=3).grade
    'not reproduced'
    >>> paired({0: 71.0, 1: 71.2, 2: 71.1}, {0: 70.0, 1: 70.1, 2: 70.0}, tau=3).grade
    'smaller than claimed'
    >>> paired({0: 71.0, 1: 71.2, 2: 71.1}, {0: 70.0, 1: 70.1, 2: 70.0}, tau=3, room=2.5).grade
    'not gradable at this scale'

    ``tau`` is at least 0: with a negative ``tau`` the rule would still ask for a mean above 0, so it
    is no test of "A is at most |tau| worse than B" (a non-inferiority claim, which it refuses)."""
    _check_threshold("tau", tau)
    mean, se, n = _mean_se(differences(candidate, reference))
    half = half_width(se, n)
    clear_gain = mean - half > 0
    if room < tau:
        grade = NOT_GRADABLE
    elif clear_gain and mean >= tau:
        grade = REPRODUCED
    elif clear_gain and mean + half < tau:
        grade = SMALLER
    elif mean + half <= 0:
        grade = NOT_REPRODUCED
    else:
        grade = INCONCLUSIVE
    return Verdict("paired", grade, mean, se, n, float(tau))


def equivalent(candidate: PerSeed, reference: PerSeed, margin: float) -> Verdict:
    """Grade "candidate matches reference within ``margin`` points" (book/methods.md §7).

    >>> equivalent([80.0, 80.2, 79.9], [80.1, 80.0, 80.0], margin=1).grade
    'reproduced'
    """
    _check_threshold("margin", margin)
    mean, se, n = _mean_se(differences(candidate, reference))
    half = half_width(se, n)
    grade = _grade(reproduced=abs(mean) + half <= margin, not_reproduced=abs(mean) - half > margin)
    return Verdict("equivalent", grade, mean, se, n, float(margin))


def relative_tau(share: float, room: float) -> float:
    """τ of a claim its paper states as a share of the gap to float accuracy (SinReQ closes 27.5% of
    it on WRPN, Elthakeb et al., arXiv 1905.01416, book/methods.md §3; issue #25): half that ``share`` of the
    ``room`` there is to win (the float baseline's accuracy less the reference's, in points, measured
    on the selection seeds before the graded runs), as an absolute claim's τ is half the paper's gain;
    0 where there is no room.

    >>> relative_tau(0.275, 2.0)
    0.275
    >>> relative_tau(0.5, -1.0)
    0.0
    """
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
        raise ValueError(f"share must be the paper's share of the gap to float, in (0, 1], got {share!r}")
    if not math.isfinite(room):
        raise ValueError(f"room must be a finite number of accuracy points, got {room!r}")
    return 0.5 * share * max(room, 0.0)


def tally(grades: Sequence[str] | pd.Series) -> str:
    """How many claims got each grade, in the order of :data:`GRADES`, for a sentence.

    >>> tally(["reproduced", "not reproduced", "reproduced", "smaller than claimed"])
    '2 reproduced, 1 smaller than claimed and 1 not reproduced'
    >>> tally(["inconclusive"]), tally([])
    ('1 inconclusive', 'no claim graded')
    """
    counts = pd.Series(list(grades), dtype=object).value_counts()
    unknown = sorted(set(counts.index) - set(GRADES))
    if unknown:
        raise ValueError(f"unknown grades {unknown}; the grades are {', '.join(GRADES)}")
    parts = [f"{counts[grade]} {grade}" for grade in GRADES if grade in counts]
    if not parts:
        return "no claim graded"
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def mean_se(mean: float, se: float) -> str:
    """``+0.53 ± 0.03`` for a table or a sentence; a mean that rounds to zero has no minus sign.

    >>> mean_se(0.527, 0.031), mean_se(-0.004, 0.2)
    ('+0.53 ± 0.03', '+0.00 ± 0.20')
    """
    text = f"{mean:+.2f}"
    return f"{'+0.00' if float(text) == 0 else text} ± {se:.2f}"


def format_points(value: float) -> str:
    """A number of points for a table: two decimals, two significant digits below 0.01 (a 1e-5
    margin is not "0.00"), and "—" where there is none (an MDE of fewer than two seeds).

    >>> format_points(2.345), format_points(1e-5), format_points(0.0), format_points(math.nan)
    ('2.35', '1e-05', '0.00', '—')
    """
    if not math.isfinite(value):
        return "—"
    return f"{value:.2f}" if value == 0 or abs(value) >= 0.01 else f"{value:.2g}"


def half_width(se: float, n: int) -> float:
    """``t se``, the half-width of the 95% interval; infinite for fewer than 2 seeds, so that
    neither rule can fire on one seed."""
    return t_quantile(n) * se if n >= 2 else math.inf


def _grade(reproduced: bool, not_reproduced: bool) -> str:
    return REPRODUCED if reproduced else NOT_REPRODUCED if not_reproduced else INCONCLUSIVE


def _mean_se(d: pd.Series) -> tuple[float, float, int]:
    n = len(d)
    se = float(d.std(ddof=1)) / math.sqrt(n) if n >= 2 else math.nan
    return float(d.mean()), se, n


def _as_series(values: PerSeed, name: str) -> pd.Series:
    if isinstance(values, pd.Series):
        series = values
    elif isinstance(values, Mapping):
        series = pd.Series(dict(values))
    else:
        series = pd.Series(list(values))
    if series.index.has_duplicates:
        raise ValueError(f"{name} has a seed twice: {sorted(series.index[series.index.duplicated()])}")
    if series.isna().any() or not all(math.isfinite(float(v)) for v in series):
        raise ValueError(f"{name} holds NaN or infinite accuracies; check the evaluation")
    return series.astype(float)


def _check_threshold(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of accuracy points, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0 points, got {value!r} (paired grades a gain of at least tau, "
                         "equivalent a difference within a margin; neither tests non-inferiority)")


# --- records for the Findings page --------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """A claim as written before the run: its id, what it says, its primary endpoint, the rule
    (``paired`` with ``tau`` or ``equivalent`` with a margin) that will grade it, and where it comes
    from (:data:`SOURCES`: the paper's own words, a summary of the paper, the book's own hypothesis,
    or a check that holds by construction); the Findings count each source apart."""

    chapter: str
    claim: str
    statement: str
    endpoint: str
    rule: str
    threshold: float
    source: str = "paper"

    def __post_init__(self) -> None:
        check_choice("rule", self.rule, ("paired", "equivalent"))
        check_choice("source", self.source, SOURCES)
        _check_threshold("threshold", self.threshold)

    def grade(self, candidate: PerSeed, reference: PerSeed, ceiling: PerSeed | None = None) -> Verdict:
        """Apply the claim's rule to per-seed endpoint values; a paired claim with a ``ceiling`` per
        seed (the float baseline's accuracy) and less room than its tau is not gradable."""
        if self.rule == "equivalent":
            return equivalent(candidate, reference, self.threshold)
        room = math.nan if ceiling is None else room_of(ceiling, reference)
        return paired(candidate, reference, self.threshold, room)

    def power_note(self, sd: float, n: int, profile: str) -> str:
        """Before the run: the MDE at ``n`` seeds (from ``sd`` measured on selection seeds) against
        half the claim's threshold (so that a gain half the claimed one is detected too)."""
        mde = minimum_detectable_effect(sd, n)
        limit = abs(self.threshold) / 2
        if limit == 0:
            return f"MDE {mde:.2g}: smaller true effects will read as inconclusive"
        if mde <= limit:
            return f"MDE {mde:.2g} ≤ τ/2 = {limit:g}: gradable in the {profile} profile"
        return f"MDE {mde:.2g} > τ/2 = {limit:g}: " + UNDERPOWERED.format(profile=profile)


def claim_record(claim: Claim, verdict: Verdict, mde_planned: float) -> dict:
    """One row of the Findings page: the claim, its rule, grade and numbers."""
    return {
        **dataclasses.asdict(claim),
        "grade": verdict.grade,
        "mean": verdict.mean,
        "se": verdict.se,
        "n": verdict.n,
        "mde": verdict.mde,
        "mde_planned": mde_planned,
    }


def leave_one_out(claim: Claim, candidate: PerSeed, reference: PerSeed,
                  ceiling: PerSeed | None = None) -> dict[int, str]:
    """The claim's grade with each paired seed left out in turn: a verdict that one seed decides,
    or that a seed fewer would leave undecided, shows here as a grade that differs.

    >>> claim = Claim("00", "C0", "A beats B", "acc", "paired", 1.0)
    >>> leave_one_out(claim, {0: 3.0, 1: 3.2, 2: 2.9, 3: 3.1}, {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0})
    {0: 'reproduced', 1: 'reproduced', 2: 'reproduced', 3: 'reproduced'}
    """
    d = differences(candidate, reference)
    cand, ref = _as_series(candidate, "candidate"), _as_series(reference, "reference")
    top = None if ceiling is None else _ceiling_on(ceiling, d.index)
    return {seed: claim.grade(cand.loc[d.index.drop(seed)], ref.loc[d.index.drop(seed)],
                              None if top is None else top.loc[d.index.drop(seed)]).grade for seed in d.index}


def stability(record: Mapping) -> tuple[int, int]:
    """``(agreeing, n)``: of a claim record's leave-one-seed-out grades, how many agree with its grade."""
    loo = record.get("leave_one_out")
    grades = list(loo.values()) if isinstance(loo, Mapping) else []  # a record written before it had none
    return sum(grade == record["grade"] for grade in grades), len(grades)


def seed_record(claim: Claim, candidate: PerSeed, reference: PerSeed, ceiling: PerSeed | None = None) -> dict:
    """The per-seed part of a claim's record: each seed's candidate and reference endpoint, the
    leave-one-seed-out grades and, for a claim on quantized accuracy, each seed's ``ceiling`` (the
    float baseline's accuracy: what quantization could at most give back), keyed by seed as text
    (JSON's keys)."""
    d = differences(candidate, reference)
    cand, ref = _as_series(candidate, "candidate"), _as_series(reference, "reference")
    record = {
        "candidate": {str(seed): float(cand.loc[seed]) for seed in d.index},
        "reference": {str(seed): float(ref.loc[seed]) for seed in d.index},
    }
    if ceiling is not None:
        top = _ceiling_on(ceiling, d.index)
        record["ceiling"] = {str(seed): float(top.loc[seed]) for seed in d.index}
    loo = leave_one_out(claim, candidate, reference, ceiling)
    record["leave_one_out"] = {str(seed): grade for seed, grade in loo.items()}
    return record


def room(record: Mapping) -> float:
    """The room a claim's candidate had to win: the mean over seeds of ``ceiling - reference`` (for
    a claim on quantized accuracy, how far the reference sits below the float baseline), NaN for a
    claim without a ceiling. A claim whose room is below its tau could not reach tau by closing the
    gap to float; only a better float accuracy could.

    >>> room({"reference": {"0": 85.0, "1": 86.0}, "ceiling": {"0": 87.0, "1": 87.0}})
    1.5
    >>> room({"reference": {"0": 85.0}})
    nan
    """
    ceiling = record.get("ceiling")
    if not isinstance(ceiling, Mapping) or not ceiling:
        return math.nan
    return room_of(ceiling, record["reference"])


def room_of(ceiling: PerSeed, reference: PerSeed) -> float:
    """The mean over seeds of ``ceiling - reference``, paired by seed (:func:`room`).

    >>> room_of({0: 87.0, 1: 87.0}, {0: 85.0, 1: 86.0})
    1.5
    """
    ref = _as_series(reference, "reference")
    return float((_ceiling_on(ceiling, ref.index) - ref).mean())


def _ceiling_on(ceiling: PerSeed, seeds: pd.Index) -> pd.Series:
    """The ceiling on ``seeds``, or an error naming the seeds it lacks."""
    top = _as_series(ceiling, "ceiling")
    missing = sorted(set(seeds) - set(top.index))
    if missing:
        raise ValueError(f"the ceiling has no value for seeds {missing}; give one per paired seed")
    return top.loc[seeds]


def findings_dir(profile: str) -> Path:
    """Where chapters executed under ``profile`` leave their claim records:
    ``$ROBUSTQ_FINDINGS/<profile>``, else ``findings/<profile>`` in the experiment cache
    (``robustq.experiments.cache_dir()``), so a smoke run never mixes with the book's records."""
    if os.environ.get(FINDINGS_ENV):
        return Path(os.environ[FINDINGS_ENV]) / profile
    from robustq.experiments import cache_dir

    return cache_dir() / "findings" / profile


def record_claims(chapter: str, records: Sequence[dict], folder: Path) -> Path:
    """Write a chapter's claim records as ``<chapter>.json`` in ``folder`` (atomically), replacing
    earlier ones."""
    path = _claims_path(chapter, folder)
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(list(records), indent=1)))
    return path


def read_claims(chapter: str, folder: Path) -> list[dict]:
    """The claim records :func:`record_claims` wrote for ``chapter`` in ``folder``."""
    path = _claims_path(chapter, folder)
    if not path.exists():
        raise FileNotFoundError(f"no claim records for {chapter} in {folder}: grade its claims first "
                                "(robustq.book.grade_claims)")
    return json.loads(path.read_text())


def _claims_path(chapter: str, folder: Path) -> Path:
    return folder / f"{chapter}.json"


def load_findings(folder: Path) -> pd.DataFrame:
    """Every chapter's claim records in ``folder`` as one frame, in chapter order, with a
    ``chapter_file`` column naming the notebook that wrote them."""
    frames = [pd.DataFrame(json.loads(path.read_text())).assign(chapter_file=path.stem)
              for path in sorted(folder.glob("*.json"))]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
