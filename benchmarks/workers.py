"""How the book's models are best trained on two cores (``book/execute.py``, ``robustq.grid``'s pool):
MODELS baseline models of the book recipe (seeds 0, 1, ...), each setting with an empty cache,

* ``alone``: one after another in one process, OpenMP's threads spinning while they wait (its default);
* ``pool, passive``: ``robustq.grid``'s pool of two workers, each of the pinned two threads, their
  threads sleeping while they wait (``OMP_WAIT_POLICY=PASSIVE``, what the pool sets);
* ``pool, spinning``: the same pool with OpenMP's default wait (``GOMP_SPINCOUNT`` as given), the
  several-fold slowdown of two spinning processes on two cores.

Prints the wall-clock seconds per model of each, its ratio to ``alone``, and whether every setting
trained the same weights (the thread count stays the pinned one, so it must).

    .venv/bin/python benchmarks/workers.py [--models 4] [--spinning]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time

import torch

from robustq import experiments, grid

WORKERS = 2


def fingerprint(cache: str, exps) -> str:
    """SHA-256 of the models' tensors (the ``model.pt`` files differ: torch.save names its archive)."""
    digest = hashlib.sha256()
    for exp in exps:
        state = torch.load(f"{cache}/{exp.resolved().key()}/model.pt", weights_only=True)
        digest.update(b"".join(tensor.numpy().tobytes() for tensor in state.values()))
    return digest.hexdigest()[:16]


def alone(exps) -> tuple[float, str]:
    """Seconds per model trained one after another in a fresh process, and the weights' fingerprint."""
    with tempfile.TemporaryDirectory() as cache:
        seeds = ", ".join(str(exp.seed) for exp in exps)
        code = ("from robustq import experiments\n"
                f"for seed in ({seeds},):\n"
                "    experiments.run(experiments.Experiment(method='baseline', seed=seed, profile='book'))\n")
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], env={**os.environ, experiments.CACHE_ENV: cache}, check=True)
        return (time.perf_counter() - start) / len(exps), fingerprint(cache, exps)


def pooled(exps, environment: dict[str, str]) -> tuple[float, str]:
    """Seconds per model trained by the pool of WORKERS workers (``environment`` set for them)."""
    with tempfile.TemporaryDirectory() as cache:
        saved = {name: os.environ.get(name) for name in (experiments.CACHE_ENV, *environment)}
        os.environ.update({experiments.CACHE_ENV: cache, **environment})
        try:
            settings = grid.Grid(executor="pool", parallel=WORKERS, profile="book")
            start = time.perf_counter()
            _, failures = grid.run_missing(exps, settings, progress=False)
            seconds = (time.perf_counter() - start) / len(exps)
        finally:
            for name, value in saved.items():
                os.environ.pop(name, None) if value is None else os.environ.update({name: value})
        if failures:
            raise SystemExit(f"pool failed: {failures}")
        return seconds, fingerprint(cache, exps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--spinning", action="store_true", help="also the pool with spinning threads (slow)")
    args = parser.parse_args()
    exps = [experiments.Experiment(method="baseline", seed=seed, profile="book") for seed in range(args.models)]
    rows = {"alone": alone(exps), "pool, passive": pooled(exps, {})}
    if args.spinning:
        rows["pool, spinning"] = pooled(exps, {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "30000"})
    base = rows["alone"][0]
    for name, (seconds, weights) in rows.items():
        print(f"{name:15s} {seconds:6.2f} s a model   {seconds / base:5.2f} x alone   weights {weights}")
    same = len({weights for _, weights in rows.values()}) == 1
    print("same weights in every setting" if same else "THE WEIGHTS DIFFER between settings")


if __name__ == "__main__":
    main()
