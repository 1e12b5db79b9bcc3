"""What learned rounding (robustq/adaround.py: AdaRound layer by layer, BRECQ's block reconstruction
block by block) costs per model and bit-width, and what it buys over rounding to nearest, on the
book's seed-0 baseline (trained, or read from the cache).

For each weight bit-width, the model is deployed as the book's primary setting (symmetric per-tensor
min-max, BN unfolded, stem and classifier at 8 bits) with nearest rounding and with each learned
rounding on the profile's calibration batch at the profile's step size, for a few iteration budgets
(the profile's among them by default); the script prints the
seconds the learned rounding took (its own ratio to one nearest-rounding evaluation beside it), the
test accuracy of both, and the share of weights that learned rounding rounds the other way. Run
alone: another process on the two cores slows it.

    .venv/bin/python benchmarks/adaround.py [--profile book] [--bits 4 3 2] [--iterations 100 500]
                                            [--rounding adaround block]

``--choose-lr`` instead makes the profile's step size (``Profile.rounding_lr``) by the book's rule
for every open choice (``book_settings.best_on_endpoint``): the selection seeds' baselines with
AdaRound at W2, the profile's steps per layer, each step size of ``CHOICE_LRS``, scored on their
validation split; it prints the mean per step size, the validation noise and the choice.
``--choose-iterations`` makes the profile's steps per layer (``Profile.rounding_iterations``) the
same way, at the profile's step size, over ``CHOICE_ITERATIONS``.
"""

from __future__ import annotations

import argparse
import itertools
import time

from robustq import adaround, book_settings, experiments, profiles, ptq
from robustq.quant import QuantSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="book")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--iterations", type=int, nargs="+", help="steps per layer or block (default: 100, "
                        "the profile's and 500)")
    parser.add_argument("--rounding", nargs="+", default=list(ptq.LEARNED_ROUNDINGS), choices=ptq.LEARNED_ROUNDINGS)
    parser.add_argument("--choose-lr", action="store_true", help="choose the profile's step size (see above)")
    parser.add_argument("--choose-iterations", action="store_true",
                        help="choose the profile's steps per layer at its step size (see above)")
    args = parser.parse_args()
    if args.choose_lr:
        choose(args.profile, "rounding_lr", CHOICE_LRS)
        return
    if args.choose_iterations:
        choose(args.profile, "rounding_iterations", CHOICE_ITERATIONS)
        return
    profile = profiles.get(args.profile)
    budgets = args.iterations or sorted({100, profile.rounding_iterations, 500})
    result = book_settings.run("baseline", 0, args.profile)
    data = experiments.dataset_for(result.experiment)
    calib = ptq.calibration_batch(data, profile.calibration_images)
    reference = ptq.materialize(result.model)
    print(f"baseline seed 0, float {100 * result.test_acc:.2f}%, {len(calib)} calibration images")
    for bits in args.bits:
        spec = QuantSpec(bits)
        start = time.perf_counter()
        nearest = 100 * ptq.accuracy(ptq.quantize_model(result.model, spec), data)
        evaluation = time.perf_counter() - start
        for rounding, iterations in itertools.product(args.rounding, budgets):
            quantized = ptq.materialize(result.model)
            start = time.perf_counter()
            report = ptq.LEARNED_ROUNDINGS[rounding](quantized, reference, spec, calib,
                                                     config=adaround.AdaRoundConfig(iterations=iterations,
                                                                                    lr=profile.rounding_lr))
            seconds = time.perf_counter() - start
            learned = 100 * ptq.accuracy(quantized, data)
            print(f"W{bits} {rounding:8s} {iterations:5d} iterations: {seconds:6.1f} s "
                  f"({seconds / evaluation:5.1f}x an evaluation)  nearest {nearest:6.2f}%  learned {learned:6.2f}%"
                  f"  flipped {100 * report['flipped'].mean():4.1f}%  layers or blocks kept nearest: "
                  f"{int((report['kept'] == 'nearest').sum())} of {len(report)}")


# AIMET's step size, then a decade apart; 1 extends the grid once, as the rule does where its first
# grid's choice sits at an end (10⁻¹ did).
CHOICE_LRS = (1e-3, 1e-2, 1e-1, 1.0)
# Steps per layer at the chosen step size, fixed before they ran: the book's 500 and cheaper budgets.
CHOICE_ITERATIONS = (100, 200, 300, 500)


def choose(profile: str, setting: str, candidates, bits: int = 2) -> None:
    """The book's rule for one of learned rounding's settings (``rounding_lr`` or
    ``rounding_iterations``): each candidate on the selection seeds' baselines at W2, the profile's
    value of the other setting, scored on their validation split."""
    runs = [experiments.run(book_settings.selection_experiment("baseline", profile, seed))
            for seed in book_settings.SELECTION_SEEDS]
    values = {}
    for candidate in candidates:
        accuracies = [100 * experiments.sweep(result, split="val", w_bits=(bits,), rounding=("adaround",),
                                              **{setting: candidate})["acc"].item() for result in runs]
        values[candidate] = sum(accuracies) / len(accuracies)
        print(f"{setting} {candidate:g}: W{bits} validation accuracy {', '.join(f'{a:.2f}' for a in accuracies)}%"
              f" (mean {values[candidate]:.2f}%)", flush=True)
    images = profiles.get(profile).validation_size * len(book_settings.SELECTION_SEEDS)
    noise = book_settings.validation_noise(max(values.values()), images)
    print(f"validation noise {noise:.2f} points; chosen {setting}: {book_settings.best_on_endpoint(values, noise):g}")


if __name__ == "__main__":
    main()
