"""The cost of the pinned CPU kernels (``robustq/kernels.py``): the book's baseline recipe (one model,
seed 0) trained with the pin and with the machine's own kernels (``ROBUSTQ_NATIVE_KERNELS=1``), each
in a fresh process with an empty cache, in turns, ROUNDS times; prints the median of each and their
ratio. Both processes use the same thread count, so the ratio is the instruction sets' alone.

    .venv/bin/python benchmarks/kernels.py
    .venv/bin/python benchmarks/kernels.py --emulate Haswell baseline qat_lsq   # needs qemu-user

``--emulate CPU METHOD ...`` instead checks that the pin gives the same weights on another CPU: each
method's smoke model is trained here and under ``qemu-x86_64 -cpu CPU`` (Debian's ``qemu-user``;
Haswell is an Intel model with AVX2 and no AVX-512), and their tensors are compared (the ``model.pt``
files themselves differ: torch.save names its archive after the temporary file). Emulation is slow,
minutes a model.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile

import torch

ROUNDS = 3
TRAIN = """
import json, time
import torch
from robustq import experiments
start = time.perf_counter()
result = experiments.run(experiments.Experiment(method="baseline", seed=0, profile="book"), progress=False)
print(json.dumps({"seconds": time.perf_counter() - start, "capability": torch.backends.cpu.get_cpu_capability(),
                  "threads": torch.get_num_threads(), "test_acc": result.test_acc}))
"""
SETTINGS = {"pinned": {}, "native": {"ROBUSTQ_NATIVE_KERNELS": "1", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}}
PINNED = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "NPY_DISABLE_CPU_FEATURES")


def train_once(extra: dict[str, str]) -> dict:
    env = {name: value for name, value in os.environ.items() if name not in PINNED}
    with tempfile.TemporaryDirectory() as cache:
        env.update(extra, ROBUSTQ_CACHE=cache)
        out = subprocess.run([sys.executable, "-c", TRAIN], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def trained_weights(method: str, cache: str, prefix: list[str]) -> str:
    """SHA-256 of the tensors of ``method``'s smoke model, trained by ``prefix + [python, -m robustq ...]``."""
    env = {**os.environ, "ROBUSTQ_CACHE": cache}
    out = subprocess.run([*prefix, sys.executable, "-m", "robustq", "train", "--method", method, "--profile", "smoke",
                          "--no-progress"], env=env, capture_output=True, text=True, check=True)
    state = torch.load(f"{cache}/{json.loads(out.stdout)['key']}/model.pt", weights_only=True)
    return hashlib.sha256(b"".join(tensor.numpy().tobytes() for tensor in state.values())).hexdigest()[:16]


def emulate(cpu: str, methods: list[str]) -> None:
    for method in methods:
        with tempfile.TemporaryDirectory() as here, tempfile.TemporaryDirectory() as there:
            native = trained_weights(method, here, [])
            emulated = trained_weights(method, there, ["qemu-x86_64", "-cpu", cpu])
        print(f"{method:20s} here {native}  {cpu} {emulated}  {'same' if native == emulated else 'DIFFERENT'}",
              flush=True)


def main() -> None:
    if sys.argv[1:2] == ["--emulate"]:
        return emulate(sys.argv[2], sys.argv[3:])
    runs = {name: [] for name in SETTINGS}
    for _ in range(ROUNDS):
        for name, extra in SETTINGS.items():
            runs[name].append(train_once(extra))
    for name, rows in runs.items():
        print(f"{name:7s} {rows[0]['capability']:7s} {rows[0]['threads']} threads  "
              f"median {statistics.median(r['seconds'] for r in rows):5.1f} s  test acc {rows[0]['test_acc']:.4f}")
    ratio = statistics.median(p["seconds"] / n["seconds"] for p, n in zip(runs["pinned"], runs["native"]))
    print(f"pinned / native training time: {ratio:.2f}x (median of {ROUNDS} paired rounds)")


if __name__ == "__main__":
    main()
