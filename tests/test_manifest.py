"""The chapter manifest (robustq/manifest.py): what each chapter trains, and what is derived from it
(the grid's run lists, the run plan); after the smoke notebooks of the same ``make test``, that each
notebook asked for exactly the runs its manifest entry lists, retraced and timed as many models as
it says, evaluated only models it asked for, and ran as many new evaluations of each kind as its
entry counts (analysis passes, estimates, excepted)."""

import json
import os
from pathlib import Path

import pytest

from robustq import book_settings, experiments, grid, manifest, methods
from robustq.book_settings import METHODS

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))
# read now: the tests' own fixture points the cache elsewhere and removes the record folder
NOTEBOOK_CACHE = experiments.cache_dir()
RECORDS = Path(os.environ.get(experiments.RECORD_ENV, "/nonexistent"))


def test_every_chapter_notebook_has_a_manifest_entry_and_every_entry_a_notebook():
    assert [nb.name[:2] for nb in NOTEBOOKS] == list(manifest.CHAPTERS)


@pytest.mark.parametrize("number", list(manifest.CHAPTERS))
def test_a_manifest_entry_names_book_methods(number):
    entry = manifest.chapter(number)
    assert set(entry.graded) | set(entry.seed0) <= set(METHODS)
    assert {e.name for e in entry.evaluations} <= set(METHODS)


def test_an_unknown_chapter_or_extra_kind_names_the_fix():
    with pytest.raises(ValueError, match="unknown chapter '09'; the book's chapters are 00"):
        manifest.chapter("09")
    with pytest.raises(ValueError, match="kind must be one of"):
        manifest.Extra("x", 1, kind="cached")


def test_the_run_plan_counts_each_model_once_under_the_first_chapter_that_needs_it():
    plan = manifest.run_plan("book").query("models > 0")
    graded = plan[plan["seeds"] == "graded"]
    assert graded.groupby("name")["models"].sum().eq(5).all()  # five graded seeds, counted once
    assert plan.query("name == 'baseline' and seeds == 'graded'")["chapter"].tolist() == ["01"]
    selection = plan[plan["seeds"] == "selection"]
    # every choice's candidates, its grid's one extension and each choice reference (baseline, WRPN,
    # the Adam-trained float model) on each selection seed, and gradient-l1's lazy run
    choices = [entry.choice for entry in METHODS.values() if entry.choice]
    candidates = sum(len(choice.candidates) + manifest.EXTENSIONS for choice in choices)
    references = len({choice.reference for choice in choices})
    assert references == 3
    assert selection["models"].sum() == (candidates + references) * len(book_settings.SELECTION_SEEDS) + 1


def test_the_run_plan_covers_every_chapter():
    plan = manifest.run_plan("book")
    assert set(plan["chapter"]) == set(manifest.CHAPTERS)
    assert set(plan.query("models > 0 and name != '(extra)'")["name"]) <= set(METHODS)


def test_the_run_plan_fits_the_budget():
    assert manifest.estimate_minutes(manifest.run_plan("book")) <= manifest.BUDGET_MINUTES


def test_the_grid_trains_every_book_settings_model_and_the_notebooks_the_rest():
    plan = manifest.run_plan("book").query("models > 0")
    assert set(plan.query("runs_in == 'grid'")["name"]) <= set(METHODS)
    assert set(plan.query("runs_in == 'notebook'")["name"]) == {"(extra)"}
    seconds = manifest.chapter_seconds(manifest.run_plan("book"))
    assert seconds.index[0] == "grid" and list(seconds.index[1:]) == list(manifest.CHAPTERS)
    assert seconds.sum() == pytest.approx(60 * manifest.estimate_minutes(manifest.run_plan("book")))


@pytest.fixture
def toy_method(monkeypatch):
    """A newcomer's method: a registry entry, its book settings (compared) and nothing else."""
    monkeypatch.setitem(methods.REGISTRY, "toy_kure", ((methods.KURE, {"target": 2.0}),))
    monkeypatch.setitem(METHODS, "toy_kure", book_settings.MethodSettings("toy_kure", {"lam": 0.5}, "08", 1.5,
                                                                         compared=True))
    return "toy_kure"


def test_a_compared_toy_method_reaches_the_grid_and_the_run_plan(toy_method, monkeypatch):
    monkeypatch.setattr(book_settings, "choose", lambda name, profile=None, progress=False: None)  # no training
    monkeypatch.setattr(book_settings, "choose_lazy", lambda name, profile=None, progress=False: {"adopted": False})
    assert toy_method in manifest.graded_methods("08")
    assert toy_method in grid.chapter_methods(["08"])[0]
    runs = grid.graded_runs(["08"], "smoke")
    assert sum(exp.method == toy_method for exp in runs) == len(book_settings.graded_seeds("smoke"))
    row = manifest.run_plan("book").query("name == @toy_method")
    assert row["chapter"].tolist() == ["08"] and row["units"].item() == pytest.approx(5 * 1.5)


# --- after the smoke notebooks --------------------------------------------------------------------


@pytest.fixture(scope="module")
def notebooks_ran(request):
    if not any(item.nodeid.startswith("notebooks/") for item in request.session.items):
        pytest.skip("the chapter notebooks are not part of this session (make test runs them)")


def _recorded(number: str) -> list[dict]:
    path = RECORDS / f"{number}.jsonl"
    assert path.exists(), f"chapter {number} recorded nothing in {RECORDS}: does its book.setup name it?"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.after_notebooks
@pytest.mark.parametrize("number", [n for n in manifest.CHAPTERS if n != "00"])
def test_each_notebook_asks_for_exactly_the_runs_its_manifest_lists(notebooks_ran, number, monkeypatch):
    monkeypatch.setenv(experiments.CACHE_ENV, str(NOTEBOOK_CACHE))  # the choices the notebooks made
    book_settings.forget_choices()
    lines = _recorded(number)
    asked = {line["key"] for line in lines if line["kind"] == "run"}
    listed = {exp.key(): exp for exp in manifest.experiments_of(number, "smoke")}
    unused = [f"{exp.method} seed {exp.seed}" for key, exp in listed.items() if key not in asked]
    assert not unused, f"chapter {number}'s manifest lists runs its notebook never asks for: {unused}"
    extras = manifest.chapter(number).extras
    unlisted = sorted({(line["method"], line["seed"]) for line in lines if line["kind"] == "run"
                       and line["key"] not in listed})
    assert len(asked - set(listed)) == sum(e.models for e in extras if e.kind == "run"), (
        f"chapter {number} trains runs its manifest does not list (add an Extra or a method): {unlisted}")
    evaluated = {(line["method"], line["seed"]) for line in lines if line["kind"] == "sweep" and line["key"] not in asked}
    assert not evaluated, f"chapter {number} evaluates models it does not ask for: {sorted(evaluated)}"
    for kind in ("retrace", "timed"):
        traced = [line["method"] for line in lines if line["kind"] == kind]
        assert len(traced) == sum(e.models for e in extras if e.kind == kind), (number, kind, traced)


def _new_evaluations(number: str) -> dict[str, int]:
    """Rows of each kind in the chapter's evaluations that no earlier chapter asked for."""
    seen = set()
    for earlier in (n for n in manifest.CHAPTERS if "00" < n < number):
        seen |= {(line["key"], line["evaluation"]) for line in _recorded(earlier) if line["kind"] == "sweep"}
    counts = dict.fromkeys(experiments.EVALUATION_KINDS, 0)
    for line in _recorded(number):
        if line["kind"] == "sweep" and (line["key"], line["evaluation"]) not in seen:
            seen.add((line["key"], line["evaluation"]))
            for kind in counts:
                counts[kind] += line[kind]
    return counts


@pytest.mark.after_notebooks
@pytest.mark.parametrize("number", [n for n in manifest.CHAPTERS if n != "00"])
def test_each_notebook_runs_the_new_evaluations_its_manifest_counts(notebooks_ran, number, monkeypatch):
    monkeypatch.setenv(experiments.CACHE_ENV, str(NOTEBOOK_CACHE))  # the choices the notebooks made
    book_settings.forget_choices()
    # the plan counts one grid extension per choice; what the smoke choices extended is known now
    extended = {name: int(book_settings.choose(name, "smoke").extended is not None)
                for name in manifest.choice_sources(number)}
    n = len(book_settings.graded_seeds("smoke"))
    listed = dict.fromkeys(experiments.EVALUATION_KINDS, 0)
    for evaluations in manifest.evaluations_of(number, extended):
        if evaluations.kind in listed:
            listed[evaluations.kind] += evaluations.count(n)
    assert _new_evaluations(number) == listed
