"""One set of CPU kernels for every build, so that the book's numbers are the same on every x86-64
machine.

torch, oneDNN, MKL and NumPy choose their CPU kernels by the instruction set of the processor. On an
AVX-512 machine torch runs AVX-512 kernels, whose float rounding differs from the AVX2 kernels' by an
ulp here and there; training turns those ulps into other models (the book's baseline, seed 0, on an
AMD EPYC: 86.94% test accuracy with its AVX-512 kernels, 87.18% with AVX2 kernels and MKL's AVX2
branch, 86.96% with the pin below; each repeatable), and near-threshold grades follow.

So every robustq process pins, before torch loads its kernels, the level that every x86-64 machine
of the last decade has, and the thread count of the reference machine:

* ``ATEN_CPU_CAPABILITY=avx2``: torch's own kernels (PyTorch, "CPU capability" dispatch);
* ``ONEDNN_MAX_CPU_ISA=AVX2``: oneDNN's convolutions (oneDNN, "CPU dispatcher control");
* ``MKL_CBWR=COMPATIBLE``: MKL's conditional numerical reproducibility branch that runs the same
  code on every x86-64 processor (Intel MKL developer guide, "Obtaining numerically reproducible
  results"). Its ``AVX2`` branch is not enough: on this AMD machine and on an emulated Intel
  Haswell (``qemu-x86_64 -cpu Haswell``, AVX2 and no AVX-512) it gave other matrix products and
  other ``exp``/``log`` (MKL's vector maths, which torch calls), and so other models, while
  ``COMPATIBLE`` gave the same weights on both; it costs about 10% of a book model's training time
  (``benchmarks/kernels.py``);
* ``NPY_DISABLE_CPU_FEATURES``: NumPy's AVX-512 dispatch targets (NumPy, "CPU build options");
* ``OMP_NUM_THREADS=2`` and ``MKL_NUM_THREADS=2``: reductions split their work by thread, so the
  count changes the order of additions (MKL's reproducibility also assumes a fixed count).

Each variable is set only where the environment leaves it unset (an explicit value wins, and the
status page then shows it). ``ROBUSTQ_NATIVE_KERNELS=1`` opts out of the whole pin, e.g. for speed on
a machine with more cores; the numbers are then not the reference ones, and the book's status page
says so. :func:`check` prints one line on stderr when torch runs at another capability than pinned.
Nothing here imports torch at module level: :func:`pin` must run before torch is imported.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from collections.abc import MutableMapping
from functools import lru_cache
from pathlib import Path

OPT_OUT_ENV = "ROBUSTQ_NATIVE_KERNELS"
REFERENCE_CAPABILITY = "AVX2"
REFERENCE_THREADS = 2
THREAD_VARIABLES = {"OMP_NUM_THREADS": str(REFERENCE_THREADS), "MKL_NUM_THREADS": str(REFERENCE_THREADS)}
X86_VARIABLES = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "COMPATIBLE",
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",  # NumPy 2's dispatch targets above AVX2
}
CPU_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile")
CPUINFO = Path("/proc/cpuinfo")


def is_x86(machine: str | None = None) -> bool:
    """Whether ``machine`` (default: this one's, ``platform.machine()``) is x86-64."""
    return (machine or platform.machine()).lower() in ("x86_64", "amd64")


def pinned_variables(machine: str | None = None) -> dict[str, str]:
    """The variables the pin sets on ``machine``: the thread counts everywhere, the instruction-set
    caps on x86-64 only (other architectures have other kernels, and NumPy would reject the names).

    >>> sorted(pinned_variables("aarch64"))
    ['MKL_NUM_THREADS', 'OMP_NUM_THREADS']
    >>> pinned_variables("x86_64")["ATEN_CPU_CAPABILITY"]
    'avx2'
    """
    return {**THREAD_VARIABLES, **(X86_VARIABLES if is_x86(machine) else {})}


def opted_out(environ: MutableMapping[str, str] | None = None) -> bool:
    """Whether ``$ROBUSTQ_NATIVE_KERNELS`` asks for the machine's own kernels (any value but
    empty or ``0``)."""
    environ = os.environ if environ is None else environ
    return environ.get(OPT_OUT_ENV, "") not in ("", "0")


def pin(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set every pinned variable that ``environ`` (default ``os.environ``) leaves unset, unless the
    user opted out; return what was set. Runs when ``robustq`` is imported, before torch."""
    environ = os.environ if environ is None else environ
    if opted_out(environ):
        return {}
    added = {name: value for name, value in pinned_variables().items() if name not in environ}
    environ.update(added)
    return added


def deviations(capability: str, threads: int, environ: MutableMapping[str, str] | None = None,
               machine: str | None = None) -> list[str]:
    """Why a process with torch's ``capability`` and ``threads`` intra-op threads is not in the
    reference environment (empty when it is): opted out, another capability, another thread count,
    a pinned variable set to another value, or another architecture.

    >>> deviations("AVX2", 2, {name: value for name, value in pinned_variables("x86_64").items()}, "x86_64")
    []
    >>> deviations("AVX512", 2, {}, "x86_64")[0]
    'torch runs AVX512 kernels, not AVX2'
    """
    environ = os.environ if environ is None else environ
    reasons = [f"{OPT_OUT_ENV} is set (the machine's own kernels)"] if opted_out(environ) else []
    if not is_x86(machine):
        reasons.append(f"{machine or platform.machine()} is not x86-64: other kernels, other rounding")
    elif capability != REFERENCE_CAPABILITY:
        reasons.append(f"torch runs {capability} kernels, not {REFERENCE_CAPABILITY}")
    if threads != REFERENCE_THREADS:
        reasons.append(f"torch uses {threads} threads, not {REFERENCE_THREADS}")
    for name, value in pinned_variables(machine).items():
        if name in environ and environ[name] != value:
            reasons.append(f"{name}={environ[name]} (pinned: {value})")
    return reasons


@lru_cache(maxsize=1)
def check() -> str | None:
    """Once per process: one line on stderr if torch dispatches its CPU kernels at another level
    than the pinned one (torch imported before ``robustq`` with the pin unset, an explicit
    ``ATEN_CPU_CAPABILITY``, or a CPU without AVX2); returns that line, or ``None``."""
    import torch

    if opted_out() or not is_x86():
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == REFERENCE_CAPABILITY:
        return None
    line = (f"robustq: warning: torch runs {capability} CPU kernels, not the pinned {REFERENCE_CAPABILITY}: "
            "numbers will differ from the book's reference; import robustq before torch, or run through "
            f"make (set {OPT_OUT_ENV}=1 to choose the machine's own kernels on purpose)")
    print(line, file=sys.stderr)
    return line


def reference_deviations() -> list[str]:
    """Why this process does not compute the reference numbers (empty when it does):
    :func:`deviations` for its torch, and NumPy dispatch targets above AVX2."""
    import torch

    numpy_targets = _numpy_targets_above_avx2()
    return deviations(torch.backends.cpu.get_cpu_capability(), torch.get_num_threads()) + (
        [f"NumPy dispatches {' '.join(numpy_targets)}"] if numpy_targets else [])


def environment() -> dict[str, str]:
    """What decides the numbers on this machine, for the book's status page: CPU model and flags,
    torch's capability and threads, the pinned variables, the MKL and oneDNN versions, and whether
    this is the reference environment (and if not, why)."""
    import numpy
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    threads = torch.get_num_threads()
    numpy_targets = _numpy_targets_above_avx2()
    reasons = reference_deviations()
    libraries = _library_versions(torch.__config__.show())
    return {
        "CPU": _cpu_model(),
        "CPU flags that matter": " ".join(flag for flag in CPU_FLAGS if flag in _cpu_flags()) or "unknown",
        "machine": platform.machine(),
        "torch CPU capability": capability,
        "torch threads (intra-op / inter-op)": f"{threads} / {torch.get_num_interop_threads()}",
        **{f"${name}": os.environ.get(name, "(unset)") for name in (*X86_VARIABLES, *THREAD_VARIABLES)},
        f"${OPT_OUT_ENV}": os.environ.get(OPT_OUT_ENV, "(unset)"),
        "MKL": libraries.get("mkl", "not in this torch build"),
        "oneDNN": libraries.get("onednn", "not in this torch build"),
        "NumPy": f"{numpy.__version__}, dispatch above AVX2: {' '.join(numpy_targets) or 'none'}",
        "reference kernels": "yes" if not reasons else "no: " + "; ".join(reasons),
    }


def _numpy_targets_above_avx2() -> list[str]:
    """NumPy's dispatch targets above AVX2 that this process uses (NumPy reads
    ``NPY_DISABLE_CPU_FEATURES`` once, when it is imported)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # NumPy 1 or another layout: nothing to report
        return []
    disabled = X86_VARIABLES["NPY_DISABLE_CPU_FEATURES"].split()
    return [name for name in disabled if features.get(name)] if is_x86() else []


def _library_versions(config: str) -> dict[str, str]:
    """MKL's and oneDNN's versions from ``torch.__config__.show()``.

    >>> _library_versions("  - Intel(R) oneAPI Math Kernel Library Version 2024.2-Product Build\\n"
    ...                   "  - Intel(R) MKL-DNN v3.12.0 (Git Hash 80afa71)")
    {'mkl': '2024.2', 'onednn': 'v3.12.0'}
    """
    found = {}
    if match := re.search(r"Math Kernel Library Version ([\w.]+)", config):
        found["mkl"] = match.group(1)
    if match := re.search(r"MKL-DNN (v[\w.]+)", config):
        found["onednn"] = match.group(1)
    return found


def _cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or "unknown"


def _cpu_flags() -> set[str]:
    return set((_cpuinfo_field("flags") or "").split())


def _cpuinfo_field(name: str) -> str | None:
    try:
        text = CPUINFO.read_text()
    except OSError:
        return None
    match = re.search(rf"^{re.escape(name)}\s*:\s*(.*)$", text, flags=re.MULTILINE)
    return match.group(1).strip() if match else None
