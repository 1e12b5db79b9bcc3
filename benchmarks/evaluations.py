"""What one evaluation of each kind costs, for the run plan (robustq/manifest.py, SECONDS_PER_EVALUATION).

A kind is what :func:`robustq.experiments.evaluation_kinds` counts in a sweep: ``plain`` (weights
quantized by min-max, one pass over the test subset), ``activations`` (activations calibrated and
fake-quantized too), ``mse`` (ranges searched over clipping ratios) and ``bias_corrected`` (a
calibration pass per layer). Each is timed on the book profile's seed-0 baseline (trained, or read
from the cache) with ``ptq.bit_sweep`` directly, so nothing is read from the evaluation cache; the
median of three W3 evaluations is printed, with its ratio to a plain one, and a baseline's training
time for the seconds a training unit costs. Run alone: another process on the two cores slows it.

    .venv/bin/python benchmarks/evaluations.py [--profile book]
"""

from __future__ import annotations

import argparse
import time

from common import median_time

from robustq import book_settings, experiments, ptq

KINDS = {
    "plain": {},
    "activations": {"a_bits": (4,)},
    "mse": {"policy": ("mse",)},
    "bias_corrected": {"bias_correction": (True,)},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="book")
    args = parser.parse_args()
    start = time.perf_counter()
    result = book_settings.run("baseline", 0, args.profile)
    trained = time.perf_counter() - start
    data = experiments.dataset_for(result.experiment)
    seconds = {kind: median_time(lambda sweep=sweep: ptq.bit_sweep(result, data, w_bits=(3,), **sweep), repeats=3)
               for kind, sweep in KINDS.items()}
    for kind, value in seconds.items():
        print(f"{kind:15s} {value:6.2f} s  ({value / seconds['plain']:.1f}x plain)")
    if not result.cached:
        print(f"a baseline's training, with its setup and cache writes: {trained:.1f} s")


if __name__ == "__main__":
    main()
