"""The grid command: what it enumerates per chapter and phase, the jobs it runs as real processes,
and its argument checks."""

import json
import multiprocessing
import os
import re
import types
from pathlib import Path

import pandas as pd
import pytest
import torch

from robustq import book_settings, experiments, grid, manifest
from robustq.__main__ import main
from robustq.book_settings import GRAD_L1_LAM, METHODS
from robustq.experiments import Experiment

ROOT = Path(__file__).resolve().parents[1]
TINY = {"dataset": "synthetic", "epochs": 1, "batch_size": 128, "profile": "smoke"}


@pytest.fixture
def nothing_trains(isolated_cache, monkeypatch):
    """A test failure if anything trains or a job is submitted."""

    def forbidden(*_args, **_kwargs):
        raise AssertionError("a model was trained or a job submitted")

    for name in ("run", "train"):
        monkeypatch.setattr(experiments, name, forbidden)
    monkeypatch.setattr(grid, "run_jobs", forbidden)
    return isolated_cache


def _fake_result(val_acc=0.5):
    return types.SimpleNamespace(history=pd.DataFrame({"val_acc": [val_acc]}))


@pytest.fixture
def recorded_runs(monkeypatch):
    """Every experiment book_settings asks ``experiments.run`` for, answered without training; the
    lazy rule adopts lazy regularization."""
    seen = []

    def record(exp, **_kwargs):
        seen.append(exp)
        return _fake_result()

    monkeypatch.setattr(experiments, "run", record)
    monkeypatch.setattr(book_settings.Endpoint, "value", lambda endpoint, result, split="test": 50.0)
    monkeypatch.setattr(book_settings, "choose_lazy", lambda name, profile=None, progress=False: {"adopted": True})
    return seen


# --- what runs -----------------------------------------------------------------------------------


def test_chapter_05_starts_with_the_grad_l1_candidates_and_the_baseline_reference(nothing_trains):
    first = grid.choice_runs(["05"], "smoke")
    assert first == [exp for seed in book_settings.SELECTION_SEEDS for exp in (
        book_settings.selection_experiment("baseline", "smoke", seed),
        *(book_settings.selection_experiment("grad_l1", "smoke", seed, lam_w=lam, lam_a=lam)
          for lam in GRAD_L1_LAM.candidates))]
    assert all(exp.seed in book_settings.SELECTION_SEEDS and exp.val_size > 0 for exp in first)
    lines = grid.dry_run(grid.Grid(chapters=("05",), profile="smoke"))
    # the choice's runs, and beside them the graded runs no choice decides (the baseline, STE-QAT),
    # the costliest first
    independent = [book_settings.experiment(name, seed, "smoke") for name in ("baseline", "qat_ste")
                   for seed in book_settings.graded_seeds("smoke")]
    assert grid.phase_runs(1, ["05"], "smoke") == sorted([*first, *independent], key=grid.cost, reverse=True)
    assert lines[0] == "phase 1/4 (choices): 12 of 12 experiments to run"
    assert lines[1] == f"  {grid.describe(first[1])}"  # gradient-l1 (1.6 units) before STE-QAT and the baseline
    assert lines[-4] == f"  {grid.describe(independent[1])}"  # the baseline (1 unit) last
    assert [grid.cost(exp) for exp in independent] == [1.0, 1.0, METHODS["qat_ste"].cost, METHODS["qat_ste"].cost]
    assert grid.cost(book_settings.experiment("baseline_adam", 0, "smoke")) == METHODS["baseline_adam"].cost
    assert lines[-3:] == ["phase 2/4 (grid extensions): listed once phase 1 is in the cache",
                          "phase 3/4 (lazy rule): listed once phase 1 is in the cache",
                          "phase 4/4 (graded): listed once phase 1 is in the cache"]
    assert not any(nothing_trains.glob("*/result.json"))


def _methods_of(chapters):
    graded, seed0 = grid.chapter_methods(chapters)
    return graded + seed0


def test_the_phases_list_what_book_settings_trains(recorded_runs):
    for name in {METHODS[n].inherits or n for n in _methods_of(["01", "08"])}:
        book_settings.choose(name, "smoke")
    chosen_by_book = set(recorded_runs)
    assert set(grid.choice_runs(["01", "08"], "smoke")) | set(grid.extension_runs(["01", "08"], "smoke")) \
        == chosen_by_book

    lazy = grid.lazy_rule_runs(["05"], "smoke")
    assert lazy == [book_settings.selection_experiment("grad_l1", "smoke", **book_settings.chosen_params(
        "grad_l1", "smoke"), lazy_every=k) for k in (1, METHODS["grad_l1"].lazy_every)]

    recorded_runs.clear()
    for name in grid.chapter_methods(["05"])[0]:
        book_settings.run_graded(name, "smoke")
    graded_by_book = {exp for exp in recorded_runs if exp.seed not in book_settings.SELECTION_SEEDS}
    assert set(grid.graded_runs(["05"], "smoke")) == graded_by_book
    assert any(exp.method_params.get("lazy_every") == 4 for exp in graded_by_book)  # the rule adopted it


def test_a_method_is_decided_once_its_choice_and_lazy_rule_are_in_the_cache(recorded_runs, monkeypatch):
    cached = set()
    monkeypatch.setattr(grid, "in_cache", lambda exp: exp in cached)
    chapters = ["01", "05"]
    assert {exp.method for exp in grid.ready_graded_runs(chapters, "smoke")} == {"baseline", "qat_ste"}
    assert not recorded_runs  # nothing was asked of the choices' runs
    cached.update(grid.choice_runs(chapters, "smoke"))
    cached.update(grid.extension_runs(chapters, "smoke"))
    ready = {exp.method for exp in grid.ready_graded_runs(chapters, "smoke")}
    assert ready == {"baseline", "qat_ste", "symreg"}  # gradient-l1 waits for its lazy rule
    recorded_runs.clear()
    grid.ready_graded_runs(chapters, "smoke")
    grid.validation_endpoints(2, chapters, "smoke")
    assert not recorded_runs  # each choice's runs were scored once, and the rule remembers them
    cached.update(grid.lazy_rule_runs(chapters, "smoke"))
    assert set(grid.ready_graded_runs(chapters, "smoke")) == set(grid.graded_runs(chapters, "smoke"))
    assert grid.phase_runs(4, chapters, "smoke") == sorted(grid.graded_runs(chapters, "smoke"), key=grid.cost,
                                                           reverse=True)


def test_each_selection_run_is_scored_on_the_endpoint_of_every_choice_it_serves(nothing_trains):
    scored = grid.validation_endpoints(1, ["05", "07"], "smoke")
    reference = book_settings.selection_experiment("baseline", "smoke", book_settings.SELECTION_SEEDS[0])
    assert scored[reference] == (METHODS["grad_l1"].choice.endpoint,)
    assert set(scored) == set(grid.choice_runs(["05", "07"], "smoke"))
    assert all(scored[exp] == (METHODS["oscillation"].choice.endpoint,) for exp in scored
               if exp.method == "oscillation")
    assert grid.validation_endpoints(3, ["05"], "smoke") == {}


def test_a_job_leaves_its_validation_endpoint_in_the_evaluation_cache(isolated_cache, monkeypatch):
    exp = Experiment(**TINY, val_size=128)
    env = {experiments.CACHE_ENV: str(isolated_cache), "ROBUSTQ_PROFILE": "smoke"}
    assert grid.run_experiment(exp, env, endpoints=("w2",))["cached"] is False

    def evaluated(*_args, **_kwargs):
        raise AssertionError("the endpoint was evaluated again")

    monkeypatch.setattr(grid.experiments.ptq, "bit_sweep", evaluated)
    assert 0 <= book_settings.ENDPOINTS["w2"].value(experiments.run(exp), split="val") <= 100  # read, not evaluated
    with pytest.raises(AssertionError, match="evaluated again"):  # an endpoint the job did not score
        book_settings.ENDPOINTS["target"].value(experiments.run(exp), split="val")


def test_the_chapter_table_names_the_methods_each_notebook_trains():
    for chapter, entry in manifest.CHAPTERS.items():
        notebook = next((ROOT / "notebooks").glob(f"{chapter}_*.ipynb"))
        cells = json.loads(notebook.read_text())["cells"]
        code = "\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "code")
        quoted = set(re.findall(r'"([a-z0-9_]+)"', code)) & set(METHODS)
        listed = set(entry.graded) | set(entry.seed0)
        references = {METHODS[name].choice.reference for name in listed if METHODS[name].choice}
        assert listed <= quoted <= set(_methods_of([chapter])) | references, chapter
    assert {name for name, entry in METHODS.items() if entry.compared} <= set(grid.chapter_methods(["08"])[0])


def test_jobs_are_packed_round_robin_onto_the_visible_gpus(monkeypatch):
    monkeypatch.setattr(grid, "visible_gpus", lambda: [0, 1])
    assert grid.slots(grid.Grid(per_gpu=2), 10) == [0, 1, 0, 1]
    assert grid.slots(grid.Grid(per_gpu=2, parallel=3), 10) == [0, 1, 0]
    monkeypatch.setattr(grid, "visible_gpus", list)
    assert grid.slots(grid.Grid(), 10) == [None]
    assert grid.slots(grid.Grid(parallel=2), 10) == [None, None]
    assert grid.slots(grid.Grid(executor="slurm", parallel=4), 3) == [None] * 3


def test_slurm_jobs_get_the_time_limit_a_gpu_if_here_and_the_sbatch_parameters(tmp_path, monkeypatch):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\n")
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    settings = grid.configure(timeout_min=60, slurm={"partition": "gpu", "job_name": "mine"})
    assert settings.executor == "slurm"
    parameters = grid.executor_for(settings).parameters
    gpu = {"gpus_per_node": 1} if torch.cuda.is_available() else {}
    assert parameters == {"job_name": "mine", "time": 60, "partition": "gpu", **gpu}
    with pytest.raises(ValueError, match="unknown sbatch parameter 'partitoin'"):
        grid.configure(slurm={"partitoin": "gpu"})


# --- running: real processes ---------------------------------------------------------------------


def test_local_jobs_fill_the_cache_once_and_failures_are_reported(isolated_cache):
    good = Experiment(**TINY)
    diverging = Experiment(**TINY, lr=1e30)
    settings = grid.Grid(executor="local", parallel=2, profile="smoke", timeout_min=5)

    ran, failures = grid.run_missing([good, diverging], settings, progress=False)
    assert ran == 2 and grid.in_cache(good) and not grid.in_cache(diverging)
    (failure,) = failures
    assert failure.experiment == grid.describe(diverging) and "loss became nan" in failure.error
    assert "NonFiniteLossError" in Path(failure.log).read_text()
    logs = sorted((isolated_cache / grid.LOG_FOLDER).glob("*_log.err"))
    assert len(logs) == 2  # a process each

    assert grid.run_missing([good], settings, progress=False) == (0, [])
    assert sorted((isolated_cache / grid.LOG_FOLDER).glob("*_log.err")) == logs  # nothing started


def test_a_pool_trains_in_long_lived_workers_and_reports_failures(isolated_cache):
    good, other, diverging = Experiment(**TINY), Experiment(**TINY, seed=1), Experiment(**TINY, lr=1e30)
    settings = grid.Grid(executor="pool", parallel=2, profile="smoke")
    environment = dict(os.environ)
    with grid.opened(settings) as pool:
        workers = {child.pid for child in multiprocessing.active_children()}
        ran, failures = grid.run_missing([good, diverging, other], settings, progress=False, executor=pool)
        assert {child.pid for child in multiprocessing.active_children()} == workers  # the same two processes
    assert len(workers) == 2 and not multiprocessing.active_children()
    assert dict(os.environ) == environment  # the passive wait is the workers' alone
    assert ran == 3 and grid.in_cache(good) and grid.in_cache(other) and not grid.in_cache(diverging)
    (failure,) = failures
    assert "loss became nan" in failure.error and failure.log is None
    record = json.loads((isolated_cache / good.resolved().key() / "result.json").read_text())
    assert record["metrics"]["jobs_at_once"] == 2
    assert experiments.run(Experiment(**TINY, seed=2)).metrics["jobs_at_once"] == 1


# --- the command line ----------------------------------------------------------------------------

BAD_ARGUMENTS = [
    (["--chapters", "09"], "--chapters", "00, 01, 02"),
    (["--chapters", "5"], "--chapters", "two digits"),
    (["--executor", "ray"], "--executor", "auto, local, pool, slurm, debug"),
    (["--executor", "slurm"], "--executor", "--executor local"),
    (["--parallel", "0"], "--parallel", "positive int"),
    (["--per-gpu", "0"], "--per-gpu", "positive int"),
    (["--per-gpu", "2"], "--per-gpu", "use --parallel"),
    (["--per-gpu", "2", "--executor", "debug"], "--per-gpu", "use --executor local"),
    (["--timeout-min", "0"], "--timeout-min", "positive int"),
    (["--slurm", "partition=gpu"], "--slurm", "use --executor slurm"),
    (["--profile", "huge"], "--profile", "smoke, book, paper"),
]


@pytest.mark.parametrize("argv, flag, fix", BAD_ARGUMENTS, ids=[" ".join(case[0]) for case in BAD_ARGUMENTS])
def test_a_bad_grid_argument_is_one_line_naming_it(argv, flag, fix, nothing_trains, monkeypatch, capsys):
    monkeypatch.setattr(grid.shutil, "which", lambda _name: None)  # no SLURM here
    monkeypatch.setattr(grid, "visible_gpus", list)  # and no GPU
    assert main(["grid", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"robustq: error: argument {flag}: ") and err.count("\n") == 1, err
    assert fix in err
    assert not nothing_trains.exists()


def test_the_dry_run_lists_phase_1_and_runs_nothing(nothing_trains, capsys):
    assert main(["grid", "--profile", "smoke", "--chapters", "05", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "phase 1/4 (choices): 12 of 12 experiments to run" and len(out) == 16
    assert not any(nothing_trains.glob("*/result.json"))


def test_configure_resolves_auto_to_local_without_slurm(monkeypatch):
    monkeypatch.setattr(grid.shutil, "which", lambda _name: None)
    settings = grid.configure(chapters=["08", "05"], profile="paper", parallel=2)
    assert (settings.executor, settings.chapters, settings.parallel, settings.per_gpu) == ("local", ("05", "08"), 2, 1)
    with pytest.raises(ValueError, match="parallel must be a positive int"):
        grid.configure(parallel=0)


def test_failed_jobs_exit_with_status_1_and_are_listed(monkeypatch, capsys):
    failure = grid.Failure("kure {} seed 3", "loss became nan", "/cache/grid-logs/7_0_log.err")
    monkeypatch.setattr(grid, "run_grid", lambda settings, progress: [grid.PhaseReport("choices", 4, 2, (failure,))])
    assert main(["grid", "--chapters", "08", "--no-progress"]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out)["phases"] == [{"phase": "choices", "needed": 4, "ran": 2, "failed": 1}]
    assert err.splitlines() == [
        "robustq: error: 1 job(s) failed; fix the cause and rerun the same command (what finished is cached):",
        f"  {failure}",
    ]
    assert "/cache/grid-logs/7_0_log.err" in err
