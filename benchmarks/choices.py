"""Every open choice of the book made again under another CPU kernel set (issue #25): a rounding-level
perturbation of the whole training, to see which choices it moves.

Each method with a choice (``book_settings.METHODS[...].choice``) is chosen by its rule
(``book_settings.choose``) in a fresh process, once with the pinned kernels (``robustq/kernels.py``)
and once with the machine's own (``ROBUSTQ_NATIVE_KERNELS=1``; AVX-512 where the CPU has it), each
with its own cache (``--pinned-cache``: reuse a cache that holds the pinned selection runs, e.g. the
book's). The script prints, per choice and kernel set, the chosen value, its margin over the runner-up
and the validation endpoint of every candidate, then which choices moved. About 45 baseline units of
training per kernel set on the book profile: run it alone.

    .venv/bin/python benchmarks/choices.py [--profile book] [--pinned-cache PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHOOSE = """
import json, sys, torch
from robustq import book_settings
out = {"capability": torch.backends.cpu.get_cpu_capability(), "choices": {}}
for name, entry in book_settings.METHODS.items():
    if entry.choice is not None and not entry.inherits:
        chosen = book_settings.choose(name, sys.argv[1])
        out["choices"][name] = {"param": chosen.param, "value": chosen.value, "margin": chosen.margin,
                                "noise": chosen.noise, "validation": {str(k): v for k, v in chosen.validation.items()}}
print(json.dumps(out))
"""
PINNED = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "NPY_DISABLE_CPU_FEATURES")


def choices(profile: str, cache: str, native: bool) -> dict:
    """The book's choices made in a fresh process with ``cache``, with the machine's own kernels if
    ``native``, else the pin."""
    env = {name: value for name, value in os.environ.items() if not (native and name in PINNED)}
    env.update(ROBUSTQ_CACHE=cache, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    if native:
        env["ROBUSTQ_NATIVE_KERNELS"] = "1"
    out = subprocess.run([sys.executable, "-c", CHOOSE, profile], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="book")
    parser.add_argument("--pinned-cache", help="a cache holding the pinned selection runs (default: a fresh one)")
    args = parser.parse_args()
    made = {}
    with tempfile.TemporaryDirectory() as fresh_pinned, tempfile.TemporaryDirectory() as fresh_native:
        made["pinned"] = choices(args.profile, args.pinned_cache or fresh_pinned, native=False)
        made["native"] = choices(args.profile, fresh_native, native=True)
    for kernels, result in made.items():
        print(f"{kernels} kernels ({result['capability']}):")
        for name, chosen in result["choices"].items():
            values = ", ".join(f"{k}: {v:.2f}" for k, v in chosen["validation"].items())
            print(f"  {name:14s} {chosen['param']} = {chosen['value']:g}  margin {chosen['margin']:+.2f} "
                  f"(noise {chosen['noise']:.2f})  validation {values}")
    moved = [name for name in made["pinned"]["choices"]
             if made["pinned"]["choices"][name]["value"] != made["native"]["choices"][name]["value"]]
    print(f"moved by the kernel set: {', '.join(moved) if moved else 'none'} "
          f"of {len(made['pinned']['choices'])} choices")


if __name__ == "__main__":
    main()
