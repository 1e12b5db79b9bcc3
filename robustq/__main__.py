"""Command line: run experiments outside notebooks.

    python -m robustq train --method symreg --param lam=0.1 --profile smoke
    python -m robustq sweep --method baseline --w-bits 8 4 3 --profile smoke
    python -m robustq methods
"""

from __future__ import annotations

import argparse
import json
import sys

from robustq import experiments, methods, models
from robustq.data import DATASET_NAMES


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
    parser.add_argument("--param", type=_param, action="append", default=[], metavar="NAME=VALUE",
                        help="a method hyperparameter, repeatable (see 'python -m robustq methods')")
    parser.add_argument("--dataset", default="fashion-mnist", help=f"one of: {', '.join(DATASET_NAMES)}")
    parser.add_argument("--model", default="cnn", help=f"one of: {', '.join(models.available())}")
    parser.add_argument("--profile", default=None, help="smoke, book or paper (default: $ROBUSTQ_PROFILE or book)")
    parser.add_argument("--epochs", type=int, help="default: the profile's")
    parser.add_argument("--batch-size", type=int, help="default: the profile's")
    parser.add_argument("--lr", type=float, default=0.1, help="peak learning rate (default 0.1)")
    parser.add_argument("--optimizer", default="sgd", help="sgd (Nesterov momentum) or adam")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, help="training subset size (default: the profile's)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _experiment(args: argparse.Namespace) -> experiments.Experiment:
    return experiments.Experiment(
        dataset=args.dataset, model=args.model, method=args.method, method_params=dict(args.param),
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
        seed=args.seed, train_size=args.train_size, profile=args.profile,
    )


def _train(args: argparse.Namespace) -> None:
    result = experiments.run(_experiment(args), progress=not args.no_progress)
    print(json.dumps({"key": result.experiment.key(), "cached": result.cached, **result.metrics}, indent=1))


def _sweep(args: argparse.Namespace) -> None:
    from robustq import ptq

    exp = _experiment(args)
    result = experiments.run(exp, progress=not args.no_progress)
    frame = ptq.bit_sweep(result.model, experiments.dataset_for(exp), w_bits=args.w_bits, a_bits=(None,))
    print(frame.to_string(index=False))


def _methods(_args: argparse.Namespace) -> None:
    for name in methods.available():
        params = ", ".join(f"{row['name']}={row['value']!r}" for row in methods.describe(name))
        print(f"{name:20s} {params}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m robustq", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train one experiment (or load it from the cache), print its metrics")
    _add_experiment_args(train)
    train.set_defaults(func=_train)
    sweep = commands.add_parser("sweep", help="train (or load) one experiment, print its PTQ accuracy per bit-width")
    _add_experiment_args(sweep)
    sweep.add_argument("--w-bits", type=int, nargs="+", default=[8, 6, 4, 3, 2], help="weight bit-widths")
    sweep.set_defaults(func=_sweep)
    listing = commands.add_parser("methods", help="list the registered methods and their hyperparameters")
    listing.set_defaults(func=_methods)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"robustq: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
