"""The chapter manifest: the one place that says what each chapter trains and evaluates.

Each :class:`Chapter` lists, as data, the book methods it grades on every graded seed and shows on
seed 0 (with their book settings: :func:`robustq.book_settings.experiment`), the models it runs
outside the book settings (:class:`Extra`: another network, another parameter, a retraced
trajectory) and the passes over the test set it makes (:class:`Evaluations`). Everything else is
derived from it:

* the selection runs (each method's open choice, :func:`robustq.book_settings.selection_runs`, and
  the runs that extend its grid once, :func:`robustq.book_settings.extension_runs`) and the lazy
  rule's runs, for every method a chapter uses;
* :func:`experiments_of`, the experiments a chapter asks for, which the grid
  (:mod:`robustq.grid`) trains and ``tests/test_manifest.py`` compares with what each notebook
  asked for under the ``smoke`` profile;
* :func:`run_plan`, every model the book trains under the chapter that first needs it, with its
  cost, and :func:`estimate_minutes`.

Adding a method to the book: an entry in :data:`robustq.book_settings.METHODS` and a name in one
chapter's ``graded`` (or ``seed0``); the grid, the run plan and chapter 08 (every ``compared``
method) follow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import pandas as pd

from robustq import book_settings, endpoints, experiments, methods, params, profiles
from robustq.book_settings import METHODS
from robustq.experiments import Experiment

EVALUATION_KINDS = (*experiments.EVALUATION_KINDS, "passes")

COMPARISON_CHAPTER = "08"  # it grades every compared method (MethodSettings.compared) besides its own
# The run plan counts one grid extension per choice (book_settings.extension_runs): whether a choice's
# first grid puts it at an end is known only once its selection runs are trained.
EXTENSIONS = 1


EXTRA_KINDS = ("run", "retrace", "timed")


@dataclass(frozen=True)
class Extra:
    """``models`` models a chapter trains outside the book settings, at about ``cost`` baseline
    units each: ``run`` (trained and cached by :func:`robustq.experiments.run`), ``retrace``
    (trained again, uncached, with measurement hooks: :func:`robustq.experiments.train_observed`)
    or ``timed`` (a few timed steps of one method, nothing stored:
    :func:`robustq.comparison.step_seconds`)."""

    note: str
    models: int
    cost: float = 1.0
    kind: str = "run"

    def __post_init__(self) -> None:
        params.check_choice("kind", self.kind, EXTRA_KINDS)


@dataclass(frozen=True)
class Evaluations:
    """Evaluations a chapter runs that no earlier chapter ran (cached ones are free): ``per_model``
    for each model of ``name`` on ``seeds`` (``"graded"``: every graded seed; ``"seed 0"`` or
    ``"selection"``: ``per_model`` in all), of one ``kind``: a row of :func:`robustq.experiments.sweep` of that cost
    (:data:`robustq.experiments.EVALUATION_KINDS`, counted by ``tests/test_manifest.py`` under the
    smoke profile) or ``"passes"``, an analysis's forward passes over a batch (estimated)."""

    name: str
    seeds: str
    per_model: int
    kind: str = "plain"
    note: str = ""

    def __post_init__(self) -> None:
        params.check_choice("seeds", self.seeds, ("graded", "seed 0", "selection"))
        params.check_choice("kind", self.kind, EVALUATION_KINDS)

    def count(self, n_graded: int) -> int:
        return self.per_model * (n_graded if self.seeds == "graded" else 1)


@dataclass(frozen=True)
class Chapter:
    """What one chapter trains and evaluates (see the module docstring)."""

    graded: tuple[str, ...] = ()
    seed0: tuple[str, ...] = ()
    extras: tuple[Extra, ...] = ()
    evaluations: tuple[Evaluations, ...] = ()
    seconds: float = 0.0  # measured work outside models and evaluations (synthetic tensors)


PRIMARY = 8  # evaluations of the primary endpoint (variants43) per model
GRID = len(endpoints.GRID_BITS)  # the weight grid, W8-W2

def _evaluations(name: str, seeds: str, note: str = "", **kinds: int) -> tuple[Evaluations, ...]:
    """One :class:`Evaluations` row per kind of evaluation (``plain=14, mse=4``)."""
    return tuple(Evaluations(name, seeds, count, kind, note) for kind, count in kinds.items())


def _is_qat(name: str) -> bool:
    return any(isinstance(part, methods.QAT) for part in methods.make(METHODS[name].method).parts)


# Chapter 08's new evaluations per compared method, (per graded seed, on seed 0 only): a method no
# earlier chapter evaluated gets its weight grid and primary endpoint on every seed and the
# secondary settings (folded, MSE, W4A4, ...) on seed 0 (a QAT-type model: its own grid and W4A4);
# the methods below were partly evaluated by their own chapters first.
PTQ_FIRST_SEEN = ({"plain": GRID + PRIMARY}, {"plain": 13, "mse": 4, "activations": 1})
QAT_FIRST_SEEN = ({"plain": GRID}, {"activations": 1})
COMPARISON_SEEN_BEFORE = {
    "baseline": ({}, {"plain": 1}),
    "symreg": ({}, {"plain": 1, "activations": 1}),
    "satnl": ({}, PTQ_FIRST_SEEN[1]),
    "symreg_satnl_asam": ({}, PTQ_FIRST_SEEN[1]),
    "grad_l1": ({"plain": PRIMARY}, {"plain": 13, "mse": 4}),
    "oscillation": ({"plain": PRIMARY}, PTQ_FIRST_SEEN[1]),
    **{name: ({}, {"activations": 1}) for name in ("wrpn", "sinreq_wrpn", "qat_ste", "qat_lsq")},
}


def _comparison_evaluations() -> tuple[Evaluations, ...]:
    """Chapter 08's new evaluations of every compared method (:data:`COMPARISON_SEEN_BEFORE`)."""
    rows = []
    for name in (name for name, entry in METHODS.items() if entry.compared):
        first_seen = QAT_FIRST_SEEN if _is_qat(name) else PTQ_FIRST_SEEN
        graded, seed0 = COMPARISON_SEEN_BEFORE.get(name, first_seen)
        rows += _evaluations(name, "graded", "the weight grid and the primary endpoint", **graded)
        rows += _evaluations(name, "seed 0", "secondary settings", **seed0)
    return tuple(rows)


CHAPTERS: dict[str, Chapter] = {
    # synthetic tensors only: draws, clip searches and a learned-rounding layer beside the fixed cost
    # of a chapter; 12.1-13.2 s in all alone after the cold build of 94198ce, but 9.6, 9.9 and 11.1 s
    # inside the cold builds of ba18b60, 8bd9e0c and 31e772f, which the estimate follows
    "00": Chapter(seconds=5.5),
    "01": Chapter(("baseline", "symreg"), ("symreg_layer", "symreg_kernel"), evaluations=(
        # analysis passes (estimated): SQNR drop and bias drift per seed, layer grids and the drift
        # table on seed 0 (bias correction included)
        *_evaluations("baseline", "graded", "SQNR drop and bias drift per seed", passes=9),
        *_evaluations("symreg", "graded", "bias drift per seed", passes=4),
        *_evaluations("baseline", "seed 0", "layer-by-layer grid, drift table, analytic link", passes=75),
    )),
    "02": Chapter(("baseline", "satnl"), evaluations=(
        *_evaluations("baseline", "graded", "the policy grid W4-W2", plain=9, mse=3),
        *_evaluations("satnl", "graded", "the policy grid W4-W2", plain=9, mse=3),
        *_evaluations("satnl", "graded", "clip curves and min-max log excess (estimated)", passes=2),
    )),
    "03": Chapter(("baseline", "symreg"), ("symreg_layer", "symreg_kernel"), extras=(
        Extra("SymReg with the 2:2 pairing, seed 0", 1),
        # 9.2-9.5 s of training each in the cold build of 94198ce, and each of its evaluations about
        # three times a CNN's (the cell: 46 s for two models and 16 evaluations counted as CNN rows)
        Extra("MobileNetV2 with and without depthwise SymReg, the profile's training subset", 2, cost=1.7),
    ), evaluations=(
        # the bias-corrected weight grid: C3.4 reads W4-W2 from it, chapter 08's bar all of it
        *_evaluations("baseline", "graded", "W8-W2 (C3.1 over W4-W2) and bias-corrected (C3.4), the primary "
                      "endpoint, the worst case at W3", plain=GRID + 20, mse=4, bias_corrected=GRID),
        *_evaluations("symreg", "graded", "W8-W2 (C3.1 over W4-W2), the primary endpoint, the worst case at W3",
                      plain=GRID + 20, mse=4),
        *_evaluations("baseline", "seed 0", "the ablation's W3", plain=1),
        *_evaluations("symreg", "seed 0", "ablation (scopes, pairing), MobileNetV2, bias-corrected SymReg's grid",
                      plain=44, bias_corrected=GRID),
        *_evaluations("baseline", "graded", "learned rounding at W2 (C3.5; chapter 08's bar)", adaround=1),
        *_evaluations("symreg", "graded", "learned rounding at W2 (C3.5)", adaround=1),
        *_evaluations("baseline", "seed 0", "learned rounding at W3", adaround=1),
        *_evaluations("symreg", "seed 0", "learned rounding at W3", adaround=1),
    )),
    "04": Chapter(("baseline", "symreg", "satnl", "symreg_satnl_asam", "qat_lsq", "symreg_satnl_lsq"),
                  ("asam", "satnl_asam"),
                  evaluations=(
        *_evaluations("satnl", "graded", "W8-W2 (C4.5 over W4-W2), the primary endpoint", plain=GRID + 8),
        *_evaluations("symreg_satnl_asam", "graded", "W8-W2 (C4.4 over W4-W2), the primary endpoint", plain=GRID + 8),
        *_evaluations("qat_lsq", "graded", "cross-bit, own quantizer", plain=6),
        *_evaluations("symreg_satnl_lsq", "graded", "cross-bit, own quantizer", plain=6),
        *_evaluations("asam", "seed 0", "ASAM and SatNL+ASAM alone; cross-bit of four models", plain=22),
        *_evaluations("baseline", "seed 0", "Hessian, noise and ASAM-perturbation passes (estimated)", passes=180),
        *(row for name in ("satnl", "symreg_satnl_asam")
          for row in (*_evaluations(name, "graded", "learned rounding at W2 (C4.7, C4.8)", adaround=1),
                      *_evaluations(name, "seed 0", "learned rounding at W3", adaround=1))),
    )),
    "05": Chapter(("baseline", "grad_l1", "qat_ste"), extras=(
        Extra("the unweighted penalty at the chosen λ, selection seed", 1, cost=METHODS["grad_l1"].cost),
    ), evaluations=(
        *_evaluations("baseline", "graded", "W6A6, W4A4, W8A8 (its W8-W2: chapter 03)", activations=3),
        *_evaluations("grad_l1", "graded", "W8-W2; W6A6, W4A4, W8A8", plain=6, activations=3),
        *_evaluations("qat_ste", "graded", "own quantizer, W8-W2", plain=6),
        *_evaluations("grad_l1", "selection", "the weightings at W4 and W3, with the baseline's", plain=6),
        *_evaluations("grad_l1", "seed 0", "the first-order bound (estimated)", passes=10),
    )),
    "06": Chapter(("baseline", "wrpn", "sinreq_wrpn", "dorefa", "sinreq_dorefa"), extras=(
        Extra("WRPN and SinReQ-WRPN retraced with a grid-distance hook", 2, kind="retrace"),
        Extra("WRPN with the default init, seed 0", 1),
        # C6.1's τ is a share of the room on the selection seeds: the float baseline (chapter 01
        # trained it) less WRPN (the choice's reference) and DoReFa (trained here)
        Extra("the float baseline on the selection seeds, read for C6.1's room", 2, cost=0.0),
        Extra("DoReFa on the selection seeds, for C6.1b's room", 2, cost=1.03),
    ), evaluations=(
        *(row for name in ("wrpn", "sinreq_wrpn", "dorefa", "sinreq_dorefa")
          for row in _evaluations(name, "graded", "own quantizer, W8-W2 (W3 graded)", plain=GRID)),
        *_evaluations("dorefa", "selection", "C6.1b's room: W3 on validation", plain=2),
    )),
    "07": Chapter(("baseline", "qat_ste_adam", "oscillation"), extras=(
        Extra("three models retraced with an oscillation tracker", 3, kind="retrace"),
        # chapter 01 trained them; read beside the Adam-trained float model (the choice's reference)
        Extra("the float baseline on the selection seeds", 2, cost=0.0),
    ), evaluations=(
        *_evaluations("oscillation", "graded", "W8-W2, unfolded and folded", plain=2 * GRID),
        *_evaluations("baseline", "graded", "W8-W2 folded", plain=GRID),
        *_evaluations("qat_ste_adam", "graded", "own quantizer, W8-W2", plain=GRID),
    )),
    "08": Chapter(("baseline", "kure"), extras=(
        # 12.7-13.9 s for the 11 methods (about 0.11 units each: setup and 35 steps), in a cell of
        # their own; the 72 and 67 s of that cell in the cold builds of 4b34db9 and ac9ee1d were
        # mostly the primary-endpoint evaluations it also ran
        Extra("overhead: 35 timed steps of every compared method, not stored",
              sum(entry.compared for entry in METHODS.values()), cost=0.11, kind="timed"),
    ), evaluations=_comparison_evaluations()),  # the bias-corrected baseline's grid: chapter 03's
}


def evaluations_of(number: str, extensions: Mapping[str, int] | None = None) -> tuple[Evaluations, ...]:
    """Every new evaluation chapter ``number`` runs: its entry's, and the validation endpoint of
    every selection run of the choices it is the first to make (:func:`choice_evaluations`)."""
    return (*chapter(number).evaluations, *choice_evaluations(number, extensions))


def choice_evaluations(number: str, extensions: Mapping[str, int] | None = None) -> tuple[Evaluations, ...]:
    """The evaluations of the choices chapter ``number`` makes first: each choice's endpoint on the
    validation split of its reference's and every candidate's selection run, on every selection
    seed (:func:`robustq.book_settings.choose`). ``extensions`` gives, per choosing method, the
    candidates its grid was extended by (0 or 1) once known; the plan counts :data:`EXTENSIONS`."""
    earlier = {source for other in CHAPTERS if other < number for source in choice_sources(other)}
    rows = []
    for source in (name for name in choice_sources(number) if name not in earlier):
        choice = METHODS[source].choice
        extended = EXTENSIONS if extensions is None else extensions[source]
        models = (len(choice.candidates) + 1 + extended) * len(book_settings.SELECTION_SEEDS)
        cells = _endpoint_cells(endpoints.ENDPOINTS[choice.endpoint], _is_qat(source))
        rows += _evaluations(source, "selection", f"the choice's validation {choice.endpoint}",
                             **{kind: count * models for kind, count in cells.items()})
    return tuple(rows)


def _endpoint_cells(endpoint: endpoints.Endpoint, qat: bool) -> dict[str, int]:
    """Rows of each kind one model's evaluation of ``endpoint`` has (a QAT-type model: its own
    quantizer, so the quantizer variants collapse to one)."""
    cells: dict[str, int] = {}
    for sweep in (endpoint.sweep,) if isinstance(endpoint.sweep, dict) else endpoint.sweep:
        kept = {key: values for key, values in sweep.items()
                if not (qat and key in endpoints.QUANTIZER_VARIANTS)}
        if "mse" in kept.get("policy", ()):
            raise ValueError(f"endpoint {endpoint.name!r}: the run plan does not count MSE rows of a choice")
        kind = "activations" if "a_bits" in kept else "plain"
        cells[kind] = cells.get(kind, 0) + math.prod(len(values) for values in kept.values())
    return cells


def chapter(number: str) -> Chapter:
    """The manifest entry of chapter ``number`` (``"00"``-``"08"``)."""
    if number not in CHAPTERS:
        raise ValueError(f"unknown chapter {number!r}; the book's chapters are {', '.join(CHAPTERS)}")
    return CHAPTERS[number]


def graded_methods(number: str) -> tuple[str, ...]:
    """The book methods chapter ``number`` grades on every graded seed (chapter 08: also every
    ``compared`` method)."""
    graded = chapter(number).graded
    if number == COMPARISON_CHAPTER:
        graded = (*graded, *(name for name, entry in METHODS.items() if entry.compared))
    return tuple(dict.fromkeys(graded))


def seed0_methods(number: str) -> tuple[str, ...]:
    """The book methods chapter ``number`` shows on the first graded seed only."""
    return tuple(name for name in chapter(number).seed0 if name not in graded_methods(number))


def choice_sources(number: str) -> tuple[str, ...]:
    """The methods whose open choice the chapter's methods make or inherit."""
    sources = (METHODS[name].inherits or name for name in (*graded_methods(number), *seed0_methods(number)))
    return tuple(name for name in dict.fromkeys(sources) if METHODS[name].choice is not None)


def lazy_methods(number: str) -> tuple[str, ...]:
    """The chapter's methods with a lazy rule (:data:`robustq.book_settings.LAZY_RULE`)."""
    return tuple(name for name in (*graded_methods(number), *seed0_methods(number)) if METHODS[name].lazy_every > 1)


def selection_experiments(number: str, profile: str | None = None) -> list[Experiment]:
    """Every selection run of the choices the chapter makes or inherits (no training: candidates
    and reference only)."""
    return _unique(exp for name in choice_sources(number) for exp in book_settings.selection_runs(name, profile))


def extension_experiments(number: str, profile: str | None = None) -> list[Experiment]:
    """The runs that extend a choice's grid once where its first grid's choice sits at an end (they
    read the selection runs: those first)."""
    return _unique(exp for name in choice_sources(number) for exp in book_settings.extension_runs(name, profile))


def lazy_experiments(number: str, profile: str | None = None) -> list[Experiment]:
    """The lazy rule's runs (they need the chosen λ: the selection runs first)."""
    return _unique(exp for name in lazy_methods(number) for exp in book_settings.lazy_rule_runs(name, profile))


def book_experiments(number: str, profile: str | None = None) -> list[Experiment]:
    """The chapter's methods with their book settings: graded on every graded seed, seed-0 methods
    on the first (they need the choices and the lazy rule: their runs first)."""
    seeds = book_settings.graded_seeds(profile)
    return _unique([*(book_settings.experiment(name, seed, profile) for name in graded_methods(number) for seed in seeds),
                    *(book_settings.experiment(name, seeds[0], profile) for name in seed0_methods(number))])


def experiments_of(number: str, profile: str | None = None) -> list[Experiment]:
    """Every book-settings experiment chapter ``number`` asks for: selection (the grid extensions
    included), lazy rule, graded and seed-0 runs (its :class:`Extra` models are counted, not listed)."""
    return _unique([*selection_experiments(number, profile), *extension_experiments(number, profile),
                    *lazy_experiments(number, profile), *book_experiments(number, profile)])


def _unique(experiments) -> list[Experiment]:
    return list(dict.fromkeys(experiments))


# --- the run plan ---------------------------------------------------------------------------------

BUDGET_MINUTES = 36.0  # the plan's estimate must fit this (the book's cap is 40 minutes, goal 30)
CALIBRATED_PROFILE = "book"  # the profile whose chapter times the constants below were measured on

# Measured on the 2-core machine (AMD EPYC, the pinned AVX2 kernels), book recipe: a training unit
# (a baseline model with its setup, first evaluation and cache writes, inside a notebook) and one row
# of an evaluation of each kind, as benchmarks/evaluations.py prints it (a W3 sweep of one row, the
# model's float pass given). With the test subset halved to 2,500 images (robustq/profiles.py) it
# printed 0.22-0.30 s a plain row (0.42 at 5,000), 0.46 with activations, 0.22 with MSE ranges and
# 0.81-1.01 bias-corrected (its calibration passes do not shrink), and 0.21-0.30 s for the float pass
# that a model's sweeps now share (experiments.float_accuracy: repeated in every sweep before, about
# 400 passes a build that the plan never counted, which put the cold build of 7f99028 3 minutes over
# it). The unit is fitted to the cold build of c513878 (nothing else running but a 97-s test during
# chapters 00 and 01): 37.8 minutes of notebooks against 38.0 estimated, every chapter within 10%
# (08: 211 s against 235) but 00 (15.1 s against 12, the test beside it). The cold build of ba18b60
# (nothing else running): 37.2 minutes, every chapter within 10% but 00 (9.6 s, 20% under) and 08
# (191 s, 19% under). The cold build of 8bd9e0c, with 24 learned roundings in chapters 03 and 04
# (chapter 08's bar among them): 38.4 minutes against 39.3 estimated, every chapter within 10% but
# 05 (348 s, 12% under), 07 (226 s, 16% over) and 08 (165 s, 15% under). The cold build of 31e772f
# (the oscillation regularizer with Adam and its STE-QAT reference, three side-checks made exercises):
# 39.4 minutes against 40.8 estimated; with gradient-ℓ1's, the regularizer's and STE-QAT (Adam)'s
# costs and chapter 00 set from it, 39.1 estimated, every chapter within 10% but 02 (82.5 s, 10.4%
# under; 92 s in the build before). Chapter times of one commit move by 10-20% between cold builds
# on the same machine.
SECONDS_PER_UNIT = 10.3
# A learned rounding (500 AdaRound steps per layer) took 8.3 s a model at W2 in the cold build of 7f99028
# (chapter 08's bar cell: 41.6 s for five, float passes included); at the book's 300 steps since
# (robustq/profiles.py), 4.7-4.9 s on the selection seeds (benchmarks/adaround.py --choose-iterations),
# cost proportional to the steps. Block reconstruction: 10.9-11.9 s a model at 500 steps per block
# (benchmarks/adaround.py); no chapter runs it.
# Refitted to the mean of three cold builds (d071d97, 46a3525, 6f3b33a: 35.5, 39.1 and 39.3 minutes
# executing; chapters move 10-20% between them): a plain row 0.225 s, an MSE row 0.35 (chapter 02's
# policy grid ran 9% over at 0.25, chapter 06's own-quantizer grid 11% under), every chapter then
# within 9% of its three-build mean.
SECONDS_PER_EVALUATION = {"plain": 0.225, "activations": 0.5, "mse": 0.35, "bias_corrected": 1.0, "adaround": 5.0,
                          "block": 7.0, "passes": 0.4}
SECONDS_PER_CHAPTER = 5.0
# The grid before the notebooks (book/execute.py): two pool workers on the two cores, one unit a
# baseline model with its test evaluation and cache writes (the choices' evaluations, between the
# grid's phases, priced by kind), and a model the notebooks then load from the cache (checksum,
# state, its first float pass), counted in the chapter that first needs it. Fitted to the mean of
# two cold builds in CI mode, both with the reference's numbers: d071d97 (grid 1,207 s, notebooks
# 925 s, 35.5 minutes) and 46a3525 an hour later on the same machine (1,323 s and 1,022 s, 39.1
# minutes): 37.4 estimated against 37.3 measured, every row within 10% of the mean but 06 (102 s
# against 115 estimated). SECONDS_PER_UNIT above prices only the models a notebook trains itself
# (the Extra rows). Since the grid keeps both workers busy across its phases (graded runs beside the
# choices' runs, the costliest jobs first, the choices' validation endpoints scored by the workers:
# robustq.grid), the cold CI-mode builds of b5449df and 7b07a08 (reference numbers) took 1,213 and
# 1,188 s for the grid, 8.1 s a unit; the schedule before it took 1,282 and 1,333 s in the builds of b673211 and 6f3b33a
# (8.6 and 8.9 s a unit) and 1,274 s alone, timed job by job: 92% of the workers' time busy, 51 s
# of it waiting on the choices' evaluations in the main process.
SECONDS_PER_GRID_UNIT = 8.1
SECONDS_PER_CACHED_MODEL = 0.9


def run_plan(profile: str = "book") -> pd.DataFrame:
    """Every model the book trains and every evaluation it runs, chapter by chapter, derived from
    :data:`CHAPTERS`: a model is counted under the first chapter that needs it, with its cost in
    baseline-model units (``METHODS[name].cost`` × models), and ``runs_in`` says where the build runs
    it: ``grid`` (the book-settings models and the choices' evaluations, before the notebooks,
    ``book/execute.py``) or ``notebook``. Nothing is trained to make it: the choices' values do not
    change what is trained, only which λ."""
    n = len(profiles.get(profile).seeds)
    seen: set[tuple] = set()
    rows = []
    for number, entry in CHAPTERS.items():
        for name, seeds, models, note in _chapter_models(number, n):
            new = [model for model in models if model not in seen]
            seen.update(new)
            if new:
                rows.append(_row(number, name, seeds, note, models=len(new), units=len(new) * METHODS[name].cost,
                                 runs_in="grid"))
        for extra in entry.extras:
            rows.append(_row(number, "(extra)", "", extra.note, models=extra.models, units=extra.models * extra.cost,
                             runs_in="notebook"))
        # a choice's evaluations run in the grid, between its phases (robustq.book_settings.choose)
        for group, runs_in in ((entry.evaluations, "notebook"), (choice_evaluations(number), "grid")):
            rows += [_row(number, evaluations.name, evaluations.seeds, evaluations.note,
                          evaluations=evaluations.count(n), kind=evaluations.kind, runs_in=runs_in)
                     for evaluations in group]
        if entry.seconds or not any(row["chapter"] == number for row in rows):
            rows.append(_row(number, "", "", "synthetic tensors only", seconds=entry.seconds))
    return pd.DataFrame(rows)


def _row(chapter: str, name: str, seeds: str, note: str, *, models: int = 0, units: float = 0.0, seconds: float = 0.0,
         evaluations: int = 0, kind: str = "", runs_in: str = "notebook") -> dict:
    return {"chapter": chapter, "name": name, "seeds": seeds, "models": models, "units": units,
            "evaluations": evaluations, "kind": kind, "seconds": seconds, "runs_in": runs_in, "note": note}


def _chapter_models(number: str, n: int):
    """(method, seeds, model identities, note) of a chapter, symbolically (no choice is made)."""
    seeds = book_settings.SELECTION_SEEDS
    for source in choice_sources(number):
        choice = METHODS[source].choice
        yield (choice.reference, "selection", [("selection", choice.reference, seed) for seed in seeds],
               "a choice's validation reference")
        candidates = (*choice.candidates, *(("extension",) * EXTENSIONS))
        yield (source, "selection", [("selection", source, value, seed) for value in candidates for seed in seeds],
               "λ candidates, the grid extended once")
    for name in lazy_methods(number):
        # the full penalty at the chosen λ is that candidate's selection run: only the lazy one is new
        yield name, "selection", [("lazy", name, METHODS[name].lazy_every)], "the lazy rule's lazy run"
    for name in graded_methods(number):
        yield name, "graded", [(name, seed) for seed in range(n)], "graded"
    for name in seed0_methods(number):
        yield name, "seed 0", [(name, 0)], "seed 0, descriptive"


def estimate_minutes(plan: pd.DataFrame, seconds_per_unit: float = SECONDS_PER_UNIT,
                     seconds_per_evaluation: dict[str, float] | None = None,
                     seconds_per_chapter: float = SECONDS_PER_CHAPTER,
                     seconds_per_grid_unit: float = SECONDS_PER_GRID_UNIT) -> float:
    """Estimated build time of a plan, in minutes: the grid's training units (``runs_in == "grid"``,
    trained before the notebooks by two workers, ``book/execute.py``) × their seconds each, the
    notebooks' own training units × seconds per unit, each grid model's loading in the chapter that
    first needs it, evaluations × their kind's seconds, each chapter's fixed cost (a kernel,
    imports, figures) and the measured seconds of work outside models and evaluations
    (:attr:`Chapter.seconds`)."""
    parts = _seconds(plan, seconds_per_unit, seconds_per_evaluation, seconds_per_chapter, seconds_per_grid_unit)
    return sum(parts.values()) / 60


def chapter_seconds(plan: pd.DataFrame) -> pd.Series:
    """The plan's estimate in seconds for the grid (``"grid"``) and for each chapter's notebook,
    indexed by chapter number; the build's status page prints it beside each measured time."""
    by_chapter = {number: _seconds(rows)["notebooks"] for number, rows in plan.groupby("chapter")}
    return pd.Series({"grid": _seconds(plan)["grid"], **by_chapter})


def _seconds(plan: pd.DataFrame, seconds_per_unit: float = SECONDS_PER_UNIT,
             seconds_per_evaluation: dict[str, float] | None = None,
             seconds_per_chapter: float = SECONDS_PER_CHAPTER,
             seconds_per_grid_unit: float = SECONDS_PER_GRID_UNIT) -> dict[str, float]:
    costs = SECONDS_PER_EVALUATION if seconds_per_evaluation is None else seconds_per_evaluation
    in_grid = plan["runs_in"] == "grid"
    evaluations = plan["evaluations"] * plan["kind"].map(costs).fillna(0.0)
    fixed = plan["seconds"].sum() + plan["chapter"].nunique() * seconds_per_chapter
    loads = plan.loc[in_grid, "models"].sum() * SECONDS_PER_CACHED_MODEL
    notebooks = plan.loc[~in_grid, "units"].sum() * seconds_per_unit + loads + evaluations[~in_grid].sum() + fixed
    return {"grid": plan.loc[in_grid, "units"].sum() * seconds_per_grid_unit + evaluations[in_grid].sum(),
            "notebooks": notebooks}
