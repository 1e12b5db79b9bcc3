"""Speed of robustq.quant against torch's own fake quantization, on one conv-weight-sized tensor.

Claim: ``quantize(x, QuantSpec(8))`` costs at most 1.2x the bare torch equivalent (``x.abs().amax()``
-> scale -> ``torch.fake_quantize_per_tensor_affine``), per-tensor and per-channel; the wrapper adds
only Python overhead and a few tiny tensor ops. Also printed: the cost of the ``mse``, ``percentile``
and ``aciq`` range policies relative to ``minmax`` (no target: they do more work by design).

Second claim: the ``mse`` policy, which searches 100 clip ratios in batched passes, costs at most
~15x ``minmax`` per tensor, on conv and linear weights of a small CNN and a post-ReLU activation
batch (``MSE_SHAPES``), per-tensor and per-channel, symmetric and asymmetric, 8-bit.

Measured on: a float32 tensor of shape (256, 256, 4, 4) = 1,048,576 elements, CPU, torch's default
thread count (printed). Each number is the median of 41 timed calls after 5 untimed ones (3 after 1
for the policies; for the ``mse`` table 21 after 3, or 3 after 1 above a million elements);
ours and torch's calls alternate so that drift in a shared machine's load hits both alike. The
reference numbers in the book were taken on 2 CPU cores shared with other jobs, so expect noise of
~10%. On cores that other jobs keep busy, each multi-threaded torch op can also wait for a scheduler
slice (~7 ms there), which swamps the ``mse`` table (its batched ops are multi-threaded, minmax's
small ops are not): run it with ``OMP_NUM_THREADS=1`` on such a machine. Prints tables; never
asserts; exit status 0.

    .venv/bin/python benchmarks/quant.py
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch

from robustq.quant import QuantSpec, quantize

SHAPE = (256, 256, 4, 4)
BIT_WIDTH = 8
TARGET = 1.2
WARMUP = 5
REPEATS = 41  # per-call cost ~1 ms: plenty
POLICY_REPEATS = 3  # mse evaluates 100 clip ratios per call (one warm-up call here)
MSE_TARGET = 15.0
MSE_REPEATS = 21
# (shape, activation-like): conv weights (first layer, middle, last), a linear layer, post-ReLU activations.
MSE_SHAPES = [((16, 1, 3, 3), False), ((32, 16, 3, 3), False), ((128, 32, 3, 3), False), ((10, 1152), False),
              ((512, 16, 28, 28), True)]


def seconds(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def paired_medians(ours, theirs, repeats: int = REPEATS, warmup: int = WARMUP) -> tuple[float, float]:
    """Median seconds per call of two functions timed alternately, after warm-up."""
    for _ in range(warmup):
        ours(), theirs()
    a, b = [], []
    for _ in range(repeats):
        a += seconds(ours, 1)
        b += seconds(theirs, 1)
    return statistics.median(a), statistics.median(b)


def main() -> None:
    threads = torch.get_num_threads()  # the default: one per core
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.randn(SHAPE) * 0.05
    qmax = 2 ** (BIT_WIDTH - 1) - 1
    zero = torch.zeros((), dtype=torch.int32)
    zeros = torch.zeros(SHAPE[0], dtype=torch.int32)

    def torch_per_tensor():
        scale = x.abs().amax() / qmax
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, -qmax, qmax)

    def torch_per_channel():
        scale = x.abs().amax(dim=(1, 2, 3)) / qmax
        return torch.fake_quantize_per_channel_affine(x, scale, zeros, 0, -qmax, qmax)

    per_tensor, per_channel = QuantSpec(BIT_WIDTH), QuantSpec(BIT_WIDTH, per_channel=True)
    # Same answer first: a speed comparison of different computations would mean nothing.
    same = torch.equal(quantize(x, per_tensor), torch_per_tensor()) and torch.equal(
        quantize(x, per_channel), torch_per_channel())

    rows = []
    for name, spec, reference in [("per-tensor", per_tensor, torch_per_tensor),
                                  ("per-channel", per_channel, torch_per_channel)]:
        ours, theirs = paired_medians(lambda: quantize(x, spec), reference)
        ratio = ours / theirs
        rows.append((f"minmax {name} vs torch", ours, theirs, f"{ratio:.2f}x",
                     f"<= {TARGET}x", "PASS" if ratio <= TARGET else "MISS"))
    for granularity, per_ch in [("per-tensor", False), ("per-channel", True)]:
        base = QuantSpec(BIT_WIDTH, per_channel=per_ch)
        for policy in ("mse", "percentile", "aciq"):
            spec = QuantSpec(BIT_WIDTH, per_channel=per_ch, policy=policy)
            ours, theirs = paired_medians(lambda: quantize(x, spec), lambda: quantize(x, base), POLICY_REPEATS, 1)
            rows.append((f"{policy} {granularity} vs minmax", ours, theirs, f"{ours / theirs:.1f}x", "-", ""))

    print(f"robustq.quant benchmark: x {tuple(SHAPE)} float32 ({x.numel():,} elements), {BIT_WIDTH}-bit")
    print(f"torch {torch.__version__}, {threads} threads, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"load average {os.getloadavg()[0]:.1f} (other jobs on the cores inflate times, less so the ratios)")
    print(f"median of {REPEATS} calls after {WARMUP} warm-up calls ({POLICY_REPEATS} after 1 for the policies)")
    print(f"outputs bit-identical to torch's: {'yes' if same else 'NO, the ratios compare different work'}\n")
    print_table(rows, ("comparison", "ours (ms)", "ref (ms)", "ratio", "target", ""))
    print(f"\nmse search vs minmax on realistic tensors, {BIT_WIDTH}-bit float32 "
          "(weights: randn * 0.05; activations: relu(randn))\n")
    print_table(mse_rows(), ("tensor", "mse (ms)", "minmax (ms)", "ratio", "target", ""))


def mse_rows() -> list[tuple]:
    """One row per tensor of ``MSE_SHAPES`` and grid: the ``mse`` policy's cost against ``minmax``'s."""
    rows = []
    for shape, activation in MSE_SHAPES:
        x = torch.randn(shape).relu() if activation else torch.randn(shape) * 0.05
        repeats, warmup = (POLICY_REPEATS, 1) if x.numel() > 1_000_000 else (MSE_REPEATS, 3)
        for per_channel, symmetric in [(False, True), (False, False), (True, True), (True, False)]:
            mse, minmax = (QuantSpec(BIT_WIDTH, symmetric=symmetric, per_channel=per_channel, policy=policy)
                           for policy in ("mse", "minmax"))
            ours, theirs = paired_medians(lambda: quantize(x, mse), lambda: quantize(x, minmax), repeats, warmup)
            ratio = ours / theirs
            name = f"{tuple(shape)} {'per-channel' if per_channel else 'per-tensor'} {'sym' if symmetric else 'asym'}"
            rows.append((name, ours, theirs, f"{ratio:.1f}x", f"<= {MSE_TARGET:.0f}x",
                         "PASS" if ratio <= MSE_TARGET else "MISS"))
    return rows


def print_table(rows: list[tuple], header: tuple[str, ...]) -> None:
    table = [header] + [(r[0], f"{r[1] * 1e3:.2f}", f"{r[2] * 1e3:.2f}", *r[3:]) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("  ".join(cell.ljust(w) if j == 0 else cell.rjust(w) for j, (cell, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


if __name__ == "__main__":
    main()
