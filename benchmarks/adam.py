"""The step size of the oscillation regularizer's optimiser, chosen by the book's rule.

The regularizer's authors train with Adam (book/methods.md §4: the released example's step size is
2.5·10⁻⁴, for a far longer run than the book's 375 steps); chapter 07 trains the regularizer and its
STE-QAT and float references that way (``book_settings.OSCILLATION_TRAINING``, protocol v2, change
17), with the book's OneCycle schedule. This script makes the step size by the book's rule for every
open choice (``book_settings.best_on_endpoint``) on a criterion that favours none of the three: the
float reference (``baseline_adam``) at each step size of ``CANDIDATES`` on the selection seeds, its
mean validation accuracy as trained; a choice at an end of the grid extends it once by one step
past that end, as the rule does. It prints each candidate's accuracies, the validation noise and the
choice. Run alone: another process on the two cores slows it.

    .venv/bin/python benchmarks/adam.py [--profile book]
"""

from __future__ import annotations

import argparse
import dataclasses

from robustq import book_settings, experiments, profiles

# The released example's step size, Adam's default (Kingma & Ba) and a step of 4x past it, fixed
# before any ran; 4x apart, so one extension adds 6.25e-5 or 1.6e-2.
CANDIDATES = (2.5e-4, 1e-3, 4e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="book")
    args = parser.parse_args()
    values = {lr: validation_accuracy(args.profile, lr) for lr in CANDIDATES}
    noise = book_settings.validation_noise(max(values.values()),
                                           profiles.get(args.profile).validation_size * len(book_settings.SELECTION_SEEDS))
    chosen = book_settings.best_on_endpoint(values, noise)
    if chosen in (CANDIDATES[0], CANDIDATES[-1]):
        beyond = book_settings.extend_once(CANDIDATES, chosen)
        print(f"the choice sits at an end ({chosen:g}): the grid is extended once, to {beyond:g}")
        values[beyond] = validation_accuracy(args.profile, beyond)
        chosen = book_settings.best_on_endpoint(values, noise)
    print(f"validation noise {noise:.2f} points; chosen step size: {chosen:g}")


def validation_accuracy(profile: str, lr: float) -> float:
    """Mean validation accuracy as trained (points) of ``baseline_adam`` at step size ``lr``."""
    accuracies = [100 * book_settings.final_val_acc(experiments.run(dataclasses.replace(
        book_settings.selection_experiment("baseline_adam", profile, seed), lr=lr)))
        for seed in book_settings.SELECTION_SEEDS]
    mean = sum(accuracies) / len(accuracies)
    print(f"lr {lr:g}: validation accuracy {', '.join(f'{a:.2f}' for a in accuracies)}% (mean {mean:.2f}%)",
          flush=True)
    return mean


if __name__ == "__main__":
    main()
