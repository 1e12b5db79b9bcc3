"""What learned rounding (AdaRound, robustq/adaround.py) costs per model and bit-width, and what it
buys over rounding to nearest, on the book's seed-0 baseline (trained, or read from the cache).

For each weight bit-width, the model is deployed as the book's primary setting (symmetric per-tensor
min-max, BN unfolded, stem and classifier at 8 bits) with nearest rounding and with learned rounding
on the profile's calibration batch, for a few iteration budgets; the script prints the seconds the
learned rounding took (its own ratio to one nearest-rounding evaluation beside it), the test accuracy
of both, and the share of weights that learned rounding rounds the other way. Run alone: another
process on the two cores slows it.

    .venv/bin/python benchmarks/adaround.py [--profile book] [--bits 4 3 2] [--iterations 100 500]
"""

from __future__ import annotations

import argparse
import time

from robustq import adaround, book_settings, experiments, profiles, ptq
from robustq.quant import QuantSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="book")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--iterations", type=int, nargs="+", default=[100, 500])
    args = parser.parse_args()
    result = book_settings.run("baseline", 0, args.profile)
    data = experiments.dataset_for(result.experiment)
    calib = ptq.calibration_batch(data, profiles.get(args.profile).calibration_images)
    reference = ptq.materialize(result.model)
    print(f"baseline seed 0, float {100 * result.test_acc:.2f}%, {len(calib)} calibration images")
    for bits in args.bits:
        spec = QuantSpec(bits)
        start = time.perf_counter()
        nearest = 100 * ptq.accuracy(ptq.quantize_model(result.model, spec), data)
        evaluation = time.perf_counter() - start
        for iterations in args.iterations:
            quantized = ptq.materialize(result.model)
            start = time.perf_counter()
            report = adaround.round_model(quantized, reference, spec, calib,
                                          config=adaround.AdaRoundConfig(iterations=iterations))
            seconds = time.perf_counter() - start
            learned = 100 * ptq.accuracy(quantized, data)
            print(f"W{bits} {iterations:5d} iterations: {seconds:6.1f} s ({seconds / evaluation:5.1f}x an evaluation)"
                  f"  nearest {nearest:6.2f}%  learned {learned:6.2f}%  flipped {100 * report['flipped'].mean():4.1f}%"
                  f"  layers kept nearest: {int((report['kept'] == 'nearest').sum())} of {len(report)}")


if __name__ == "__main__":
    main()
