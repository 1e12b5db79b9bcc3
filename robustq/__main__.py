"""Command line: run experiments outside notebooks.

    python -m robustq train --method symreg --param lam=0.1 --profile smoke
    python -m robustq train --book symreg --profile smoke     # SymReg as the book runs it
    python -m robustq sweep --method baseline --w-bits 8 4 3 --profile smoke
    python -m robustq methods [--book]
    python -m robustq grid --profile paper --chapters 01 05 --dry-run
    python -m robustq grid --profile paper --executor slurm --slurm partition=gpu --timeout-min 120

``grid`` trains every model the chosen chapters need that the cache lacks, one job each
(:mod:`robustq.grid`), and exits with status 1 if a job failed.

Every argument is checked before anything is loaded or trained: a bad one is reported as one
``robustq: error: ...`` line on stderr, with exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
from collections.abc import Iterator
from typing import NoReturn

from robustq import book_settings, experiments, grid, methods, models, params, profiles, ptq
from robustq.data import DATASET_NAMES
from robustq.distributed import DistributedError
from robustq.train import OPTIMIZERS, NonFiniteLossError


class _Parser(argparse.ArgumentParser):
    """Reports usage errors as a ``ValueError``, so that ``main`` prints them on one line like
    every other error and returns 2 instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise ValueError(f"{message} (see '{self.prog} --help')")


def _param(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r} (e.g. --param lam=0.1)")
    name, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # a bare string such as pairing=2:2
    return name.strip(), value


def _add_experiment_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default="baseline", help=f"one of: {', '.join(methods.available())}")
    parser.add_argument("--book", metavar="NAME", help="a book method as the chapters run it, with its fixed "
                        "parameters and its choice made on the selection seed (trained first, cached); "
                        f"one of: {', '.join(book_settings.METHODS)}; --param overrides its parameters")
    parser.add_argument("--param", type=_param, action="append", default=[], metavar="NAME=VALUE",
                        help="a method hyperparameter, repeatable (see 'python -m robustq methods')")
    parser.add_argument("--dataset", default="fashion-mnist", help=f"one of: {', '.join(DATASET_NAMES)}")
    parser.add_argument("--model", default="cnn", help=f"one of: {', '.join(models.available())}")
    parser.add_argument("--profile", default=None, help=f"one of: {', '.join(profiles.PROFILES)} "
                        f"(default: ${profiles.PROFILE_ENV} or {profiles.DEFAULT_PROFILE})")
    parser.add_argument("--epochs", type=int, help="default: the profile's")
    parser.add_argument("--batch-size", type=int, help="default: the profile's")
    parser.add_argument("--lr", type=float, help="peak learning rate (default 0.1, or the book method's)")
    parser.add_argument("--optimizer", help=f"one of: {', '.join(OPTIMIZERS)} (sgd: Nesterov; default sgd, or "
                        "the book method's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, help="training subset size (default: the profile's)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


# --- validation: every argument is checked before anything is loaded or trained -----------------


def validate_args(args: argparse.Namespace) -> experiments.Experiment | grid.Grid | None:
    """The subcommand's Experiment (its Grid for ``grid``, None for ``methods``), once every
    argument has been checked.

    Raises ``ValueError`` naming the first bad argument; nothing is loaded, trained or cached."""
    if args.command == "methods":
        return None
    if args.command == "grid":
        return _grid(args)
    _check_numbers(args)
    if hasattr(args, "w_bits"):
        params.check("bit_widths", args.w_bits, label="argument --w-bits")
    with _blame("argument --profile" if args.profile else f"${profiles.PROFILE_ENV}"):
        params.check("profile", args.profile)
    exp = _experiment(args)
    exp.train_config()  # runs TrainConfig's own checks on the values the profile filled in
    return exp


def _check_numbers(args: argparse.Namespace) -> None:
    with _blame("argument --seed"):
        params.check("seed", args.seed)
    for flag in ("--epochs", "--batch-size", "--train-size"):
        value = getattr(args, flag[2:].replace("-", "_"))  # None: the profile's
        if value is not None:
            with _blame(f"argument {flag}"):
                params.check_int(flag[2:], value, minimum=1)
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr >= 0):
        _reject("--lr", f"must be a finite number >= 0, got {args.lr} (e.g. --lr 0.1)")
    if args.optimizer is not None:
        params.check_choice("optimizer", args.optimizer, OPTIMIZERS, label="argument --optimizer")


def _experiment(args: argparse.Namespace) -> experiments.Experiment:
    if args.book is not None:
        return _book_experiment(args)
    params.check_choice("method", args.method, methods.available(), label="argument --method")
    params.check_choice("dataset", args.dataset, DATASET_NAMES, label="argument --dataset")
    params.check_choice("model", args.model, models.available(), label="argument --model")
    with _blame("argument --param"):  # Experiment checks this too, but without naming the argument
        methods.make(args.method, **dict(args.param))
    exp = experiments.Experiment(dataset=args.dataset, model=args.model, method=args.method,
                                 method_params=dict(args.param), seed=args.seed, profile=args.profile)
    return _with_recipe(exp, args)


def _book_experiment(args: argparse.Namespace) -> experiments.Experiment:
    params.check_choice("book method", args.book, book_settings.METHODS, label="argument --book")
    if args.method != "baseline" or args.dataset != "fashion-mnist" or args.model != "cnn":
        _reject("--book", "sets the method, dataset and model itself; drop --method, --dataset and --model")
    entry = book_settings.METHODS[args.book]
    with _blame("argument --param"):
        methods.make(entry.method, **{**entry.params_for(args.profile), **dict(args.param)})
    return _with_recipe(book_settings.experiment(args.book, args.seed, args.profile, **dict(args.param)), args)


def _with_recipe(exp: experiments.Experiment, args: argparse.Namespace) -> experiments.Experiment:
    """``exp`` with the recipe arguments given on the command line (the others keep its values)."""
    recipe = {name: getattr(args, name) for name in ("epochs", "batch_size", "train_size", "lr", "optimizer")}
    return dataclasses.replace(exp, **{name: value for name, value in recipe.items() if value is not None})


def _grid(args: argparse.Namespace) -> grid.Grid:
    with _blame("argument --profile" if args.profile else f"${profiles.PROFILE_ENV}"):
        params.check("profile", args.profile)
    return grid.configure(args.chapters, args.profile, args.executor, args.parallel, args.per_gpu, args.timeout_min,
                          dict(args.slurm), blame=lambda setting: _blame(f"argument --{setting.replace('_', '-')}"))


def _reject(flag: str, message: str) -> NoReturn:
    raise ValueError(f"argument {flag}: {message}")


@contextlib.contextmanager
def _blame(label: str) -> Iterator[None]:
    """Prefix a library's ValueError with the argument that caused it."""
    try:
        yield
    except ValueError as error:
        raise ValueError(f"{label}: {error}") from None


# --- subcommands ---------------------------------------------------------------------------------


def _train(args: argparse.Namespace, exp: experiments.Experiment) -> None:
    result = experiments.run(exp, progress=not args.no_progress)
    print(json.dumps({"key": result.experiment.key(), "cached": result.cached, **readable_metrics(result.metrics)},
                     indent=1, ensure_ascii=False))


# each stored metric as the CLI prints it: its name with its unit, a fraction as a percentage
_READABLE = {
    "test_acc": ("test accuracy (%)", 100, 2), "quantized_acc": ("own-quantizer accuracy (%)", 100, 2),
    "train_time_s": ("training time (s)", 1, 1), "images_per_s": ("images per second", 1, 0),
    "final_loss": ("final training loss", 1, 4), "final_train_acc": ("final training accuracy (%)", 100, 2),
    "jobs_at_once": ("training workers at once", 1, 0),
}


def readable_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """A result's metrics with names that carry their unit, accuracies in percent and no more
    digits than they mean (``{"test_acc": 0.87659}`` prints as ``{"test accuracy (%)": 87.66}``).

    >>> readable_metrics({"test_acc": 0.8765999, "train_time_s": 7.0312})
    {'test accuracy (%)': 87.66, 'training time (s)': 7.0}
    """
    shown = {}
    for name, value in metrics.items():
        label, scale, digits = _READABLE.get(name, (name, 1, 4))
        shown[label] = round(scale * value, digits)
    return shown


def _sweep(args: argparse.Namespace, exp: experiments.Experiment) -> None:
    result = experiments.run(exp, progress=not args.no_progress)
    # as the chapters evaluate: cached, with the profile's calibration batch and learned-rounding budget
    frame = experiments.sweep(result, w_bits=tuple(args.w_bits), a_bits=(None,), rounding=(args.rounding,))
    print(sweep_table(frame))


def sweep_table(frame) -> str:
    """A weight sweep as a reader reads it: one line per bit-width, the quantized and the float
    accuracy in percent (the settings every row shares are the defaults the help names)."""
    shown = frame.assign(**{"accuracy (%)": 100 * frame["acc"], "float accuracy (%)": 100 * frame["fp_acc"]})
    return shown[["w_bits", "accuracy (%)", "float accuracy (%)"]].to_string(index=False, float_format="{:.2f}".format)


def _run_grid(args: argparse.Namespace, settings: grid.Grid) -> None:
    if args.dry_run:
        print("\n".join(grid.dry_run(settings)))
        return
    reports = grid.run_grid(settings, progress=not args.no_progress)
    print(json.dumps({"profile": settings.profile, "chapters": settings.chapters, "executor": settings.executor,
                      "phases": [{"phase": r.phase, "needed": r.needed, "ran": r.ran, "failed": len(r.failures)}
                                 for r in reports]}, indent=1))
    failures = [failure for report in reports for failure in report.failures]
    if failures:
        raise JobsFailed(failures)


class JobsFailed(Exception):
    """Some grid jobs failed: ``main`` lists them on stderr and returns 1."""

    def __init__(self, failures: list[grid.Failure]) -> None:
        super().__init__(f"{len(failures)} job(s) failed; fix the cause and rerun the same command "
                         "(what finished is cached):")
        self.failures = failures


def _methods(args: argparse.Namespace, _exp: None) -> None:
    if args.book:
        print("\n".join(book_methods()))
        return
    for name in methods.available():
        params = ", ".join(f"{row['name']}={row['value']!r}" for row in methods.describe(name))
        print(f"{name:20s} {params}")


def book_methods() -> list[str]:
    """One line per book method (``--book NAME``): its registry method, the parameters the book
    fixes, and the open choice with its candidates (made on the selection seed by the rule the
    chapter states; ``train --book NAME`` makes it)."""
    lines = []
    for name, entry in book_settings.METHODS.items():
        fixed = ", ".join(f"{key}={value!r}" for key, value in entry.params.items()) or "its defaults"
        line = f"{name:24s} {book_settings.label(name)}: {entry.method} with {fixed}"
        if entry.choice is not None:
            chosen = " = ".join([entry.choice.param, *entry.choice.tied])
            line += (f"; {chosen} chosen from {', '.join(f'{c:g}' for c in entry.choice.candidates)}"
                     " (extended once past an end where the choice sits)")
        elif entry.inherits is not None:
            line += f"; its choice is {book_settings.label(entry.inherits)}'s"
        if entry.penalised_share < 1:
            line += f"; penalty over the last {entry.penalised_share:.0%} of the epochs"
        if entry.lazy_every > 1:
            line += f"; lazy (every {entry.lazy_every} steps) if the lazy rule adopts it"
        if entry.training:
            line += f"; trained with {', '.join(f'{key}={value!r}' for key, value in entry.training.items())}"
        if entry.holdout:
            line += "; the validation split held out"
        lines.append(line)
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m robustq", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train one experiment (or load it from the cache), print its metrics")
    _add_experiment_args(train)
    train.set_defaults(func=_train)
    sweep = commands.add_parser("sweep", help="train (or load) one experiment, print its PTQ accuracy per bit-width")
    _add_experiment_args(sweep)
    sweep.add_argument("--w-bits", type=int, nargs="+", default=[8, 6, 4, 3, 2], help="weight bit-widths")
    sweep.add_argument("--rounding", default="nearest", choices=ptq.ROUNDINGS,
                       help="round each weight to nearest, or learn its rounding on the calibration batch: "
                            "layer by layer (adaround) or block by block (block, BRECQ), the profile's steps per "
                            "layer or block")
    sweep.set_defaults(func=_sweep)
    listing = commands.add_parser("methods", help="list the registered methods and their hyperparameters")
    listing.add_argument("--book", action="store_true", help="list the book's methods as the chapters run them")
    listing.set_defaults(func=_methods)
    _add_grid_parser(commands)
    return parser


def _add_grid_parser(commands) -> None:
    jobs = commands.add_parser("grid", help="train every model the chapters need that the cache lacks, one job each")
    jobs.add_argument("--profile", default=None, help=f"one of: {', '.join(profiles.PROFILES)} "
                      f"(default: ${profiles.PROFILE_ENV} or {profiles.DEFAULT_PROFILE})")
    jobs.add_argument("--chapters", nargs="+", metavar="NN", help=f"default: all ({', '.join(grid.CHAPTERS)})")
    jobs.add_argument("--executor", default="auto", help="auto (SLURM where srun is on the PATH, else local), "
                      "local (a subprocess here each), pool (--parallel worker processes here, each training one "
                      "job after another: what the book's build uses), slurm (one sbatch job each) or debug (in "
                      "this process)")
    jobs.add_argument("--parallel", type=int, help="jobs at once (default: 1 on a CPU, --per-gpu per visible GPU, "
                      "no limit on SLURM)")
    jobs.add_argument("--per-gpu", type=int, help="local jobs packed onto each visible GPU (default 1)")
    jobs.add_argument("--timeout-min", type=int, default=grid.DEFAULT_TIMEOUT_MIN,
                      help=f"a job's time limit in minutes (default {grid.DEFAULT_TIMEOUT_MIN})")
    jobs.add_argument("--slurm", type=_param, action="append", default=[], metavar="NAME=VALUE",
                      help="an sbatch parameter of submitit's SlurmExecutor, repeatable (e.g. partition=gpu)")
    jobs.add_argument("--dry-run", action="store_true", help="list what would run, run nothing")
    jobs.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    jobs.set_defaults(func=_run_grid)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.func(args, validate_args(args))
    except (ValueError, FileNotFoundError, NonFiniteLossError, DistributedError) as error:
        print(f"robustq: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except JobsFailed as error:
        print(f"robustq: error: {error}", *(f"  {failure}" for failure in error.failures), sep="\n", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
