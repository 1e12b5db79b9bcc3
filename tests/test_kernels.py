"""The pinned CPU kernels (robustq/kernels.py): set before torch loads them, the same in the Makefile,
reported when torch runs others, and part of every CPU model's cache key."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from robustq import experiments, kernels

ROOT = Path(__file__).resolve().parent.parent
X86 = kernels.is_x86()


def _clean_env(**extra: str) -> dict[str, str]:
    pinned = kernels.pinned_variables("x86_64")
    env = {name: value for name, value in os.environ.items() if name not in pinned and name != kernels.OPT_OUT_ENV}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def _python(code: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=_clean_env(**extra), capture_output=True, text=True,
                          check=True)


def test_the_makefile_pins_the_same_variables_as_the_package():
    exported = dict(re.findall(r"^export (\w+) \?= (.+)$", (ROOT / "Makefile").read_text(), flags=re.MULTILINE))
    pinned = kernels.pinned_variables("x86_64")
    assert {name: exported.get(name) for name in pinned} == pinned


def test_pin_fills_unset_variables_keeps_explicit_ones_and_respects_the_opt_out():
    environ = {"OMP_NUM_THREADS": "8"}
    added = kernels.pin(environ)
    assert "OMP_NUM_THREADS" not in added and environ["OMP_NUM_THREADS"] == "8"
    assert environ["MKL_NUM_THREADS"] == "2"
    if X86:
        assert environ["ATEN_CPU_CAPABILITY"] == "avx2" and environ["MKL_CBWR"] == "COMPATIBLE"
    opted = {kernels.OPT_OUT_ENV: "1"}
    assert kernels.pin(opted) == {} and opted == {kernels.OPT_OUT_ENV: "1"}
    assert not kernels.opted_out({kernels.OPT_OUT_ENV: "0"})


def test_deviations_name_each_reason_a_build_is_not_the_reference():
    pinned = kernels.pinned_variables("x86_64")
    assert kernels.deviations("AVX2", 2, dict(pinned), "x86_64") == []
    reasons = kernels.deviations("AVX512", 4, {**pinned, "MKL_CBWR": "AUTO", kernels.OPT_OUT_ENV: "1"}, "x86_64")
    assert reasons == [f"{kernels.OPT_OUT_ENV} is set (the machine's own kernels)", "torch runs AVX512 kernels, not AVX2",
                       "torch uses 4 threads, not 2", "MKL_CBWR=AUTO (pinned: COMPATIBLE)"]
    assert "not x86-64" in kernels.deviations("DEFAULT", 2, {}, "aarch64")[0]


@pytest.mark.skipif(not X86, reason="the instruction-set pin is for x86-64")
def test_importing_robustq_pins_torchs_kernels_even_after_torch_was_imported():
    out = _python("import torch, robustq; print(torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())")
    assert out.stdout.split() == ["AVX2", "2"] and out.stderr == ""


@pytest.mark.skipif(not X86, reason="the instruction-set pin is for x86-64")
def test_another_capability_is_reported_in_one_line_and_the_opt_out_is_silent():
    code = "from robustq import kernels; kernels.check()"
    lines = _python(code, ATEN_CPU_CAPABILITY="default").stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("robustq: warning: torch runs DEFAULT CPU kernels, not the pinned AVX2")
    assert _python(code, ATEN_CPU_CAPABILITY="default", ROBUSTQ_NATIVE_KERNELS="1").stderr == ""


def test_a_cpu_models_cache_key_holds_its_kernels():
    import torch

    exp = experiments.Experiment(profile="smoke")
    material = exp.key_material("cpu")
    assert material["kernels"] == {"capability": torch.backends.cpu.get_cpu_capability(),
                                   "threads": torch.get_num_threads()}
    assert "kernels" not in exp.key_material("cuda")


def test_the_environment_table_says_whether_the_kernels_are_the_reference_ones():
    table = kernels.environment()
    assert {"CPU", "torch CPU capability", "MKL", "oneDNN", "$MKL_CBWR", "reference kernels"} <= set(table)
    code = "from robustq import kernels; print(kernels.environment()['reference kernels'])"
    if X86:  # elsewhere no build is the reference one
        assert _python(code).stdout.strip() == "yes"  # pinned by the import, before torch and NumPy load
    native = _python(code, ROBUSTQ_NATIVE_KERNELS="1").stdout.strip()
    assert native.startswith(f"no: {kernels.OPT_OUT_ENV} is set")
