"""Train every model a set of chapters needs that the cache lacks, one job each, on this machine or
a SLURM cluster: ``python -m robustq grid --profile paper``.

**What runs.** The book-settings models the chapters' manifest lists (:mod:`robustq.manifest`: each
method graded on every graded seed, and the book methods a chapter shows on seed 0), in four
phases, because a graded run needs the λ its method's choice picked on the selection seeds:

1. *choices*: every open choice's selection runs, its reference's and one per candidate
   (:func:`~robustq.book_settings.selection_runs`, what :func:`~robustq.book_settings.choose` trains);
2. *grid extensions*: one candidate past the end where a first grid's choice sits
   (:func:`~robustq.book_settings.extension_runs`, what ``choose`` trains next);
3. *lazy rule*: the full and the lazy penalty at the chosen λ
   (:func:`~robustq.book_settings.lazy_rule_runs`, what :func:`~robustq.book_settings.choose_lazy` trains);
4. *graded*: each method as the book runs it (:func:`~robustq.book_settings.experiment`) on
   every graded seed, and the seed-0 models.

A phase's list is computed once the phase before it is in the cache, so ``choose`` and
``settings_for`` only read it; a phase with a failed job stops the grid after that phase. Two things
keep both cores busy across the phases (:func:`phase_runs`): a graded run joins the first phase
after which its method is decided (:func:`ready_graded_runs`: the baseline with the choices, a
choice's graded runs with the lazy rule), and each phase runs its longest jobs first (their
:attr:`~robustq.book_settings.MethodSettings.cost`), so that no long job is left alone at its end. A
selection run's job also scores the model on its choice's validation endpoint
(:func:`validation_endpoints`), cached, which the rule between the phases then reads instead of
evaluating every model in this process while the workers wait (51 s of the cold book grid). Models a
notebook trains outside the book settings (the manifest's ``Extra`` rows: MobileNetV2,
SatNL's forms, the unweighted gradient-ℓ1 penalty, DoReFa's sinusoid domains, SymReg's 2:2 pairing,
WRPN's default initialisation, retraced trajectories, timed steps) are not run here: the notebook
trains them when it runs.

**How.** Each missing experiment is one job of submitit (https://github.com/facebookincubator/submitit,
pinned): a Python process of its own that calls :func:`robustq.experiments.run` and returns its key
and test accuracy. submitit is pure Python with two small dependencies, is the usual way to send
Python functions to SLURM, and runs the same jobs as local subprocesses; Ray would add a wheel of
hundreds of MB and daemons (raylet, GCS) to a book that runs on two cores. ``local`` runs the
processes on this machine; ``slurm`` submits one ``sbatch`` job each; ``debug`` runs them one by
one in this process (a failure opens pdb there, as submitit's debug executor does); ``auto`` is
SLURM where ``srun`` is on the PATH, else local. Each job logs to
``<cache>/grid-logs/<job id>_0_log.err`` (and ``.out``).

``pool`` keeps :attr:`Grid.parallel` worker processes alive for the whole grid
(:class:`concurrent.futures.ProcessPoolExecutor`), each training one experiment after another: no
interpreter start, torch import and dataset load per job, and no per-job log (a failure's traceback
comes back as the job's error). It is what ``book/execute.py`` trains the book's models with, two
workers on two cores. Each worker keeps the pinned thread count, so its models are the notebooks'
to the last bit, and waits for work passively (``OMP_WAIT_POLICY=PASSIVE``, read by OpenMP when the
worker loads torch): two workers of two threads that spin while they wait, as OpenMP's threads do by
default, slow each other several-fold on two cores, while two that sleep trained eight book models
in 0.90 times the time of one process alone, with the same weights (``benchmarks/workers.py
--models 8``: 7.9 s a model against 8.8, the workers' start included).

At most :attr:`Grid.parallel` jobs run at once: locally one on a CPU (each with the pinned thread
count of :mod:`robustq.kernels`, so that its models are the notebooks'; split between the jobs only
under ``ROBUSTQ_NATIVE_KERNELS``) and :attr:`Grid.per_gpu` per visible GPU, each job pinned to one
GPU; on SLURM each job gets a GPU of its own when this machine has one (run the grid on a GPU node:
cache keys include the device type, so the jobs' must be this machine's).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from robustq import book_settings, cache, experiments, kernels, manifest, params, profiles
from robustq.book_settings import METHODS
from robustq.endpoints import ENDPOINTS
from robustq.experiments import Experiment

EXECUTORS = ("auto", "local", "pool", "slurm", "debug")
LOG_FOLDER = "grid-logs"
# Generous: a paper-profile model sees 75 times the book recipe's images, about 9 minutes for the
# baseline and 27 for gradient-l1 (3 units) at the book's measured speed on 2 CPU cores.
DEFAULT_TIMEOUT_MIN = 240
POLL_S = 0.5
# OpenMP's threads sleep while they wait for work instead of spinning (GNU libgomp and LLVM libomp
# read it once, when torch loads them): several pool workers then share the cores
WAIT_POLICY = {"OMP_WAIT_POLICY": "PASSIVE"}

CHAPTERS = tuple(manifest.CHAPTERS)


@dataclass(frozen=True)
class Grid:
    """What to run and where, checked by :func:`configure`. ``executor`` is resolved (never
    ``"auto"``); ``parallel`` None means one job on a CPU, ``per_gpu`` per visible GPU, and no
    limit on SLURM (its scheduler queues them); ``slurm`` holds extra ``sbatch`` parameters of
    ``submitit.SlurmExecutor`` (``partition``, ``account``, ``cpus_per_task``, ...)."""

    chapters: tuple[str, ...] = CHAPTERS
    profile: str = profiles.DEFAULT_PROFILE
    executor: str = "local"
    parallel: int | None = None
    per_gpu: int = 1
    timeout_min: int = DEFAULT_TIMEOUT_MIN
    slurm: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Failure:
    """A job that did not leave its experiment in the cache: what it was, why, and its log."""

    experiment: str
    error: str
    log: str | None

    def __str__(self) -> str:
        return f"{self.experiment}: {self.error}" + (f" (log: {self.log})" if self.log else "")


@dataclass(frozen=True)
class PhaseReport:
    phase: str
    needed: int
    ran: int
    failures: tuple[Failure, ...] = ()


# --- validation: every setting is checked before anything is enumerated or submitted -------------


def configure(chapters: Sequence[str] | None = None, profile: str | None = None, executor: str = "auto",
              parallel: int | None = None, per_gpu: int | None = None, timeout_min: int = DEFAULT_TIMEOUT_MIN,
              slurm: dict[str, Any] | None = None,
              blame: Callable[[str], contextlib.AbstractContextManager] = lambda _setting: contextlib.nullcontext(),
              ) -> Grid:
    """A checked :class:`Grid`; ``ValueError`` naming the first bad setting and its fix. ``blame``
    wraps each setting's check (the command line prefixes the flag that set it)."""
    with blame("chapters"):
        checked_chapters = check_chapters(chapters)
    with blame("executor"):
        resolved = resolve_executor(executor)
    for name, value, example, none_means in (("parallel", parallel, 2, "1 on a CPU, per_gpu per GPU"),
                                             ("per_gpu", per_gpu, 2, "1"),
                                             ("timeout_min", timeout_min, DEFAULT_TIMEOUT_MIN, None)):
        with blame(name):
            params.check_int(name, value, minimum=1, example=example, none_means=none_means)
    with blame("per_gpu"):
        check_per_gpu(per_gpu, resolved)
    with blame("slurm"):
        checked_slurm = check_slurm_parameters(slurm or {}, resolved)
    return Grid(checked_chapters, profiles.resolve_profile(profile), resolved, parallel, per_gpu or 1, timeout_min,
                checked_slurm)


def check_chapters(chapters: Sequence[str] | None) -> tuple[str, ...]:
    """The chapters in book order (all of them for None), or ``ValueError`` naming an unknown one."""
    if chapters is None:
        return CHAPTERS
    for chapter in chapters:
        if chapter not in CHAPTERS:
            raise ValueError(f"unknown chapter {chapter!r}; the book's chapters are {', '.join(CHAPTERS)} "
                             "(two digits, as in the notebooks' names)")
    return tuple(chapter for chapter in CHAPTERS if chapter in chapters)


def resolve_executor(name: str) -> str:
    """``local``, ``slurm`` or ``debug``; ``auto`` is SLURM where its ``srun`` is on the PATH (as
    ``submitit.AutoExecutor`` decides), else local."""
    if name not in EXECUTORS:
        raise ValueError(f"unknown executor {name!r}; known: {', '.join(EXECUTORS)}")
    has_slurm = shutil.which("srun") is not None
    if name == "slurm" and not has_slurm:
        raise ValueError("SLURM's srun is not on the PATH here: run the grid on the cluster, or use --executor local")
    if name == "auto":
        return "slurm" if has_slurm else "local"
    return name


def check_per_gpu(per_gpu: int | None, executor: str) -> None:
    """``per_gpu`` packs jobs onto this machine's GPUs: it needs the local executor and a GPU."""
    if per_gpu is None:
        return
    if executor != "local":
        raise ValueError(f"it packs local jobs onto this machine's GPUs, not {executor} ones (SLURM gives each "
                         "job a whole GPU): drop --per-gpu, or use --executor local")
    if not visible_gpus():
        raise ValueError("no GPU is visible here, so there is nothing to pack jobs onto: "
                         "use --parallel to run several jobs on the CPU")


def check_slurm_parameters(slurm: dict[str, Any], executor: str) -> dict[str, Any]:
    """Extra ``sbatch`` parameters, each one ``submitit.SlurmExecutor`` knows."""
    if not slurm:
        return {}
    if executor != "slurm":
        raise ValueError(f"sbatch parameters apply to SLURM jobs, not {executor} ones: use --executor slurm")
    import submitit  # here and in executor_for only: enumerating and --dry-run work without it

    known = submitit.SlurmExecutor._valid_parameters()  # the names its update_parameters accepts
    for name in slurm:
        if name not in known:
            raise ValueError(f"unknown sbatch parameter {name!r}; submitit knows: {', '.join(sorted(known))}")
    return dict(slurm)


def visible_gpus() -> list[int]:
    """Indices of the GPUs this process sees, as ``CUDA_VISIBLE_DEVICES`` numbers them (the local
    executor pins each job to one by setting it)."""
    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return list(range(torch.cuda.device_count()))
    entries = [entry.strip() for entry in listed.split(",") if entry.strip()]
    if not all(entry.isdigit() for entry in entries):
        raise ValueError(f"CUDA_VISIBLE_DEVICES={listed} names GPUs by UUID; the local executor pins jobs to GPUs "
                         "by index: list indices (e.g. CUDA_VISIBLE_DEVICES=0,1) or unset it")
    return [int(entry) for entry in entries]


# --- what the chapters need, phase by phase ------------------------------------------------------


def chapter_methods(chapters: Iterable[str]) -> tuple[list[str], list[str]]:
    """(methods graded on every graded seed, methods shown on seed 0) of ``chapters``, in book order
    (:mod:`robustq.manifest`)."""
    graded = list(dict.fromkeys(name for chapter in chapters for name in manifest.graded_methods(chapter)))
    seed0 = dict.fromkeys(name for chapter in chapters for name in manifest.seed0_methods(chapter))
    return graded, [name for name in seed0 if name not in graded]


def choice_runs(chapters: Iterable[str], profile: str) -> list[Experiment]:
    """Phase 1: the selection runs of every choice the chapters' methods make or inherit."""
    return _unique(exp for chapter in chapters for exp in manifest.selection_experiments(chapter, profile))


def extension_runs(chapters: Iterable[str], profile: str) -> list[Experiment]:
    """Phase 2: the runs that extend a choice's grid once where its first grid's choice sits at an
    end (reads phase 1 from the cache)."""
    return _unique(exp for chapter in chapters for exp in manifest.extension_experiments(chapter, profile))


def lazy_rule_runs(chapters: Iterable[str], profile: str) -> list[Experiment]:
    """Phase 3: the full and the lazy penalty at the chosen λ, for each method with a lazy rule
    (reads phases 1 and 2 from the cache)."""
    return _unique(exp for chapter in chapters for exp in manifest.lazy_experiments(chapter, profile))


def graded_runs(chapters: Iterable[str], profile: str) -> list[Experiment]:
    """Phase 4: each graded method on every graded seed and the seed-0 methods on the first one,
    with their book settings (reads phases 1 to 3 from the cache)."""
    return _unique(exp for chapter in chapters for exp in manifest.book_experiments(chapter, profile))


PHASES: tuple[tuple[str, Callable[[Iterable[str], str], list[Experiment]]], ...] = (
    ("choices", choice_runs), ("grid extensions", extension_runs), ("lazy rule", lazy_rule_runs),
    ("graded", graded_runs),
)


def _unique(runs: Iterable[Experiment]) -> list[Experiment]:
    return list(dict.fromkeys(runs))  # Experiment hashes and compares by its configuration


def ready_graded_runs(chapters: Iterable[str], profile: str) -> list[Experiment]:
    """The graded and seed-0 runs (phase 4's) of every method the cache already decides
    (:func:`decided`): they can train beside an earlier phase's jobs."""
    graded, seed0 = chapter_methods(chapters)
    seeds = book_settings.graded_seeds(profile)
    runs = []
    for name in (*graded, *seed0):
        if decided(name, profile):
            runs += [book_settings.experiment(name, seed, profile) for seed in (seeds if name in graded else seeds[:1])]
    return _unique(runs)


def decided(name: str, profile: str) -> bool:
    """Whether book method ``name``'s settings follow from the cache alone: its choice (own or
    inherited) has its selection runs and, where the first grid's choice sits at an end, the runs
    that extend it; its lazy rule, if it has one, its runs. Checked in that order, so that nothing
    is asked of ``choose`` before its runs exist (it would train them here)."""
    entry = METHODS[name]
    source = entry.inherits or name
    if METHODS[source].choice is not None and not (
            all(map(in_cache, book_settings.selection_runs(source, profile)))
            and all(map(in_cache, book_settings.extension_runs(source, profile)))):
        return False
    return entry.lazy_every <= 1 or all(map(in_cache, book_settings.lazy_rule_runs(name, profile)))


def phase_runs(number: int, chapters: Iterable[str], profile: str) -> list[Experiment]:
    """What phase ``number`` (1-based, of :data:`PHASES`) trains: its own runs and, before the
    last phase, the graded runs already decided (:func:`ready_graded_runs`), the most costly first."""
    chapters = tuple(chapters)
    runs = PHASES[number - 1][1](chapters, profile)
    if number < len(PHASES):
        runs = _unique([*runs, *ready_graded_runs(chapters, profile)])
    return sorted(runs, key=cost, reverse=True)  # stable: equal costs keep the book's order


def cost(exp: Experiment) -> float:
    """An experiment's training cost in baseline units: the largest of the book entries that run
    its method with its training (the baseline with Adam costs more than with SGD), 1 for a method
    no entry runs."""
    return max((entry.cost for entry in METHODS.values() if entry.method == exp.method
                and all(getattr(exp, name) == value for name, value in entry.training.items())), default=1.0)


def validation_endpoints(number: int, chapters: Iterable[str], profile: str) -> dict[Experiment, tuple[str, ...]]:
    """The endpoints each selection run of phase ``number`` is scored on, on its validation split,
    by the rule of every choice it belongs to (a reference run may serve two choices): phase 1's
    first grids, phase 2's extensions, nothing in the later phases."""
    listing = {1: book_settings.selection_runs, 2: book_settings.extension_runs}.get(number)
    scored: dict[Experiment, tuple[str, ...]] = {}
    if listing is None:
        return scored
    sources = dict.fromkeys(source for chapter in chapters for source in manifest.choice_sources(chapter))
    for source in sources:
        endpoint = METHODS[source].choice.endpoint
        for exp in listing(source, profile):
            scored[exp] = tuple(dict.fromkeys([*scored.get(exp, ()), endpoint]))
    return scored


def in_cache(exp: Experiment) -> bool:
    """Whether ``exp`` has a finished entry (its ``result.json``) under this machine's device type."""
    return (experiments.cache_dir() / exp.resolved().key() / "result.json").exists()


def describe(exp: Experiment) -> str:
    """One line naming an experiment: method, explicit parameters, seed, and selection runs as such."""
    selection = " (selection, validation split)" if exp.val_size else ""
    return f"{exp.method} {json.dumps(exp.method_params, sort_keys=True)} seed {exp.seed}{selection}"


# --- running: one job per experiment ------------------------------------------------------------


def run_experiment(exp: Experiment, env: dict[str, str], threads: int | None = None,
                   endpoints: Sequence[str] = ()) -> dict[str, Any]:
    """One job: :func:`robustq.experiments.run` in the job's process, then the model's value of each
    of ``endpoints`` on its validation split (cached for the choices' rule); returns its key and
    metrics."""
    os.environ.update(env)  # the cache and profile of the grid, whatever environment the job got
    if threads is not None:
        torch.set_num_threads(threads)  # jobs that share the CPU split its cores
    result = experiments.run(exp, progress=False)
    for endpoint in endpoints:
        ENDPOINTS[endpoint].value(result, split="val")
    return {"key": result.experiment.key(), "test_acc": result.test_acc, "cached": result.cached}


def run_jobs(exps: Sequence[Experiment], grid: Grid, desc: str = "jobs", progress: bool = True,
             executor=None, endpoints: dict[Experiment, tuple[str, ...]] | None = None) -> list[Failure]:
    """Run each experiment as one job, at most as many at once as :func:`slots` allows, with a
    progress bar on stderr; returns the failed ones (a failure does not stop the others). Without
    ``executor``, one is opened for these jobs (:func:`opened`). ``endpoints`` lists, per
    experiment, the validation endpoints its job scores (:func:`run_experiment`)."""
    if not exps:
        return []
    if executor is None:
        with opened(grid) as own:
            return run_jobs(exps, grid, desc, progress, own, endpoints)
    endpoints = endpoints or {}
    free = slots(grid, len(exps))
    # pinned: the thread count is in the key
    split = grid.executor in ("local", "pool") and len(free) > 1 and kernels.opted_out()
    threads = max(1, (os.cpu_count() or 1) // len(free)) if split else None
    env = {experiments.CACHE_ENV: str(experiments.cache_dir().resolve()), profiles.PROFILE_ENV: grid.profile}
    pending, running, failures = list(exps), {}, []
    with tqdm(total=len(exps), desc=desc, unit="job", disable=not progress, file=sys.stderr) as bar:

        def finish(gpu: int | None, failure: Failure | None) -> None:
            free.append(gpu)
            if failure is not None:
                failures.append(failure)
                bar.write(f"robustq: job failed: {failure}", file=sys.stderr)
            bar.update()
            bar.set_postfix(failed=len(failures))

        while pending or running:
            while pending and free:
                exp, gpu = pending.pop(0), free.pop(0)
                try:
                    running[_submit(executor, grid, exp, gpu, env, threads, endpoints.get(exp, ()))] = (exp, gpu)
                except Exception as error:  # noqa: BLE001 (e.g. sbatch refusing a partition): reported like a failed job
                    finish(gpu, Failure(describe(exp), f"not submitted: {_reason(error)}", None))
            finished = [job for job in running if job.done()]
            for job in finished:
                exp, gpu = running.pop(job)
                finish(gpu, _failure(job, exp))
            if not finished:
                time.sleep(POLL_S)
    return failures


def slots(grid: Grid, n_jobs: int) -> list[int | None]:
    """One entry per job that may run at once: the GPU it is pinned to, or None (CPU, or SLURM,
    which places jobs itself)."""
    if grid.executor == "debug":
        return [None]
    if grid.executor == "slurm":
        return [None] * min(n_jobs, grid.parallel or n_jobs)
    gpus = visible_gpus()
    if not gpus or grid.executor == "pool":
        return [None] * (grid.parallel or 1)
    packed = [gpu for _ in range(grid.per_gpu) for gpu in gpus]  # round robin: spread before stacking
    return packed[: grid.parallel] if grid.parallel else packed


@contextlib.contextmanager
def opened(grid: Grid):
    """The executor of ``grid`` (:func:`executor_for`) for the ``with`` block; a pool's workers are
    stopped when it ends."""
    executor = executor_for(grid)
    try:
        yield executor
    finally:
        if isinstance(executor, concurrent.futures.Executor):
            executor.shutdown(wait=True, cancel_futures=True)


def executor_for(grid: Grid):
    """The executor of ``grid``: a pool of worker processes (:func:`worker_pool`), or submitit's,
    its time limit (and on SLURM its sbatch parameters) set."""
    if grid.executor == "pool":
        return worker_pool(grid.parallel or 1)
    import submitit  # only running jobs needs it (a notebook-only install such as Colab's lacks it)

    folder = experiments.cache_dir() / LOG_FOLDER  # files are named after the job id
    if grid.executor == "debug":
        return submitit.DebugExecutor(folder)
    if grid.executor == "local":
        executor = submitit.LocalExecutor(folder)
        executor.update_parameters(timeout_min=grid.timeout_min)
        return executor
    executor = submitit.SlurmExecutor(folder)
    gpus = {"gpus_per_node": 1} if torch.cuda.is_available() else {}
    executor.update_parameters(**{"job_name": "robustq", "time": grid.timeout_min, **gpus, **grid.slurm})
    return executor


def worker_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    """``workers`` started processes (spawned, so that each loads torch afresh) that train one job
    after another, their OpenMP threads waiting passively (:data:`WAIT_POLICY`, unless this
    environment sets it)."""
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    added = {name: value for name, value in {**WAIT_POLICY, experiments.JOBS_AT_ONCE_ENV: str(workers)}.items()
             if name not in os.environ}
    os.environ.update(added)  # a spawned worker copies this process's environment (torch is loaded here already)
    try:
        for started in [pool.submit(os.getpid) for _ in range(workers)]:  # one each, so that all start now
            started.result()
    finally:
        for name in added:
            del os.environ[name]
    return pool


def _submit(executor, grid: Grid, exp: Experiment, gpu: int | None, env: dict[str, str], threads: int | None,
            endpoints: tuple[str, ...] = ()):
    if grid.executor == "local":
        pinned = () if gpu is None else (gpu,)  # submitit sets the job's CUDA_VISIBLE_DEVICES to it
        executor.update_parameters(gpus_per_node=len(pinned), visible_gpus=pinned)
    return executor.submit(run_experiment, exp, env, threads, endpoints)


def _failure(job, exp: Experiment) -> Failure | None:
    try:
        job.result()
    except Exception as error:  # noqa: BLE001 (raised in the job, killed, timed out): one failed experiment
        paths = getattr(job, "paths", None)  # a submitit job's; a pool's future has no log file
        return Failure(describe(exp), _reason(error), str(paths.stderr) if paths else None)
    return None


def _reason(error: BaseException) -> str:
    """One line of why a job failed: the exception its traceback ends with (submitit's
    ``FailedJobError`` holds the traceback between two dashed rules), else the error's first lines."""
    text = str(error)
    if "with trace:" in text:
        text = text.split("-" * 22)[1]
        return [line.strip() for line in text.splitlines() if line.strip()][-1]
    return " ".join(text.split("\n")[:2]).strip() or type(error).__name__


# --- the grid: phases in order -------------------------------------------------------------------


def run_grid(grid: Grid, progress: bool = True) -> list[PhaseReport]:
    """Run the phases in order, each phase's missing experiments as jobs (:func:`phase_runs`); stops
    after a phase with a failure (the next phase's list reads this one's results). One report per
    phase run."""
    cache.ensure_usable(experiments.cache_dir())
    reports = []
    with opened(grid) as executor:  # one pool for every phase
        for number, (phase, _) in enumerate(PHASES, 1):
            needed = phase_runs(number, grid.chapters, grid.profile)
            ran, failures = run_missing(needed, grid, f"phase {number}/{len(PHASES)} ({phase})", progress, executor,
                                        validation_endpoints(number, grid.chapters, grid.profile))
            reports.append(PhaseReport(phase, len(needed), ran, tuple(failures)))
            if failures:
                break
    return reports


def run_missing(needed: Sequence[Experiment], grid: Grid, desc: str = "jobs", progress: bool = True,
                executor=None, endpoints: dict[Experiment, tuple[str, ...]] | None = None) -> tuple[int, list[Failure]]:
    """Run the experiments of ``needed`` that are not in the cache (:func:`run_jobs`); returns how
    many ran and what failed, including a job that finished without leaving its result."""
    missing = [exp for exp in needed if not in_cache(exp)]
    failures = run_jobs(missing, grid, desc, progress, executor, endpoints)
    if not failures:  # the next phase would train in this process what is missing here
        failures = [Failure(describe(exp), "its job finished, but its result is not in the cache", None)
                    for exp in missing if not in_cache(exp)]
    return len(missing), failures


def dry_run(grid: Grid) -> list[str]:
    """What :func:`run_grid` would run, as lines: every phase whose list can be computed from the
    cache (a phase's list needs the phase before it cached) and its missing experiments."""
    lines = []
    blocked = None
    for number, (phase, _) in enumerate(PHASES, 1):
        title = f"phase {number}/{len(PHASES)} ({phase})"
        if blocked is not None:
            lines.append(f"{title}: listed once phase {blocked} is in the cache")
            continue
        needed = phase_runs(number, grid.chapters, grid.profile)
        missing = [exp for exp in needed if not in_cache(exp)]
        lines.append(f"{title}: {len(missing)} of {len(needed)} experiments to run")
        lines += [f"  {describe(exp)}" for exp in missing]
        if missing:
            blocked = number
    return lines
