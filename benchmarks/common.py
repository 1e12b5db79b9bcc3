"""Helpers shared by the benchmark scripts: timing, model FLOP counting and the selection seeds'
command line."""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from robustq import book_settings


def selection_seed_arguments(description: str, measured: str) -> argparse.Namespace:
    """``--profile`` (default ``book``) and ``--seeds`` (default the selection seeds 100-104), for a
    script that measures ``measured`` on selection seeds; it stops if a graded seed is given, since
    what it chooses must not have looked at one."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--profile", default="book")
    parser.add_argument("--seeds", type=int, nargs="+", default=[100, 101, 102, 103, 104])
    args = parser.parse_args()
    if set(args.seeds) & set(book_settings.graded_seeds(args.profile)):
        raise SystemExit(f"{measured} on selection seeds only; graded seeds must not be looked at")
    return args


def median_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs, after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def training_flops_per_image(model: nn.Module, input_shape: tuple[int, ...]) -> float:
    """Multiply-adds of conv/linear layers ×2 (FLOPs) ×3 (forward, input and weight gradients)."""
    macs = []

    def count(module, inputs, output):
        weight = module.weight
        per_output = weight[0].numel() if isinstance(module, nn.Conv2d) else weight.shape[1]
        macs.append(output[0].numel() * per_output)

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(1, *input_shape))
    for hook in hooks:
        hook.remove()
    return 2.0 * 3.0 * sum(macs)


def matmul_flops_per_s(size: int = 2048, repeats: int = 5) -> float:
    """Measured float32 matmul throughput of this machine (FLOP/s)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2.0 * size**3 / median_time(lambda: a @ b, repeats)
