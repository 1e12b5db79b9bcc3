"""What one evaluation of each kind costs, for the run plan (robustq/manifest.py, SECONDS_PER_EVALUATION).

A kind is what :func:`robustq.experiments.evaluation_kinds` counts in a sweep: ``plain`` (weights
quantized by min-max, one pass over the test subset), ``activations`` (activations calibrated and
fake-quantized too), ``mse`` (ranges searched over clipping ratios) and ``bias_corrected`` (a
calibration pass per layer). Each is timed on the book profile's seed-0 baseline (trained, or read
from the cache) with ``ptq.bit_sweep`` directly, so nothing is read from the evaluation cache, and
given the float accuracy as :func:`robustq.experiments.sweep` gives it (computed once a model): the
median of three W3 evaluations is printed, with its ratio to a plain one, the float pass itself,
and a baseline's training time for the seconds a training unit costs. Run alone: another process on
the two cores slows it.

    .venv/bin/python benchmarks/evaluations.py [--profile book] [--batch-sizes 64 256 512]
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import median_time

from robustq import book_settings, experiments, ptq
from robustq.data import eval_loader
from robustq.quant import QuantSpec
from robustq.train import EVAL_BATCH_SIZE, evaluate

KINDS = {
    "plain": {},
    "activations": {"a_bits": (4,)},
    "mse": {"policy": ("mse",)},
    "bias_corrected": {"bias_correction": (True,)},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="book")
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=(),
                        help="also time one pass over the test subset at each of these batch sizes")
    args = parser.parse_args()
    start = time.perf_counter()
    result = book_settings.run("baseline", 0, args.profile)
    trained = time.perf_counter() - start
    data = experiments.dataset_for(result.experiment)
    float_seconds = median_time(lambda: ptq.float_accuracy(result, data), repeats=3)
    float_acc = ptq.float_accuracy(result, data)  # as experiments.sweep gives it: one float pass a model
    seconds = {kind: median_time(lambda sweep=sweep: ptq.bit_sweep(result, data, w_bits=(3,),
                                                                   fp_acc=lambda _folded: float_acc, **sweep),
                                 repeats=3)
               for kind, sweep in KINDS.items()}
    print(f"{'float pass':15s} {float_seconds:6.2f} s  (once a model and deployment: experiments.float_accuracy)")
    for kind, value in seconds.items():
        print(f"{kind:15s} {value:6.2f} s  ({value / seconds['plain']:.1f}x plain)")
    if args.batch_sizes:
        print_batch_sizes(result, data, args.batch_sizes)
    if not result.cached:
        print(f"a baseline's training, with its setup and cache writes: {trained:.1f} s")


BATCH_ROUNDS = 15


def print_batch_sizes(result, data, batch_sizes) -> None:
    """One scoring pass of the W3-quantized model over the test subset at each batch size, against
    the package's ``EVAL_BATCH_SIZE``: what decides that constant. The sizes take turns in each of
    BATCH_ROUNDS rounds and the median is kept, so a slow spell of the machine hits every size."""
    quantized = ptq.inference_copy(ptq.quantize_model(ptq.materialize(result.model), QuantSpec(3)))
    loaders = {size: eval_loader(data, "test", size) for size in (EVAL_BATCH_SIZE, *batch_sizes)}
    times = {size: [] for size in loaders}
    for _ in range(BATCH_ROUNDS):
        for size, loader in loaders.items():
            start = time.perf_counter()
            evaluate(quantized, loader)
            times[size].append(time.perf_counter() - start)
    seconds = {size: statistics.median(values) for size, values in times.items()}
    for size, value in seconds.items():
        print(f"batch {size:5d}     {value:6.3f} s  ({value / seconds[EVAL_BATCH_SIZE]:.2f}x batch {EVAL_BATCH_SIZE})")


if __name__ == "__main__":
    main()
