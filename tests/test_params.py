"""Every notebook parameter and CLI argument goes through robustq.params: bad values fail at once."""

import subprocess
import sys
from pathlib import Path

import pytest

from robustq import params

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, value, message", [
    ("drift_bits", 1, "drift_bits: bit_width must be in 2..16"),
    ("bit_widths", "[4, 3]", "pass lists to papermill with -y"),
    ("bit_widths", [], "non-empty list"),
    ("bit_widths", [4, 99], "bit_widths: bit_width must be in 2..16, got 99"),
    ("seed", -1, "seed must be an int >= 0, got -1 (e.g. 0)"),
    ("seed", True, "seed must be an int >= 0, got True"),
    ("n_images", 0, "n_images must be a positive int or None (the profile's default), got 0"),
    ("min_ratio", 1.5, "min_ratio: must be a number in (0, 1]"),
    ("profile", "nope", "unknown profile 'nope'"),
    ("mobilenet_train_size", 0, "mobilenet_train_size must be a positive int or None (the profile's default)"),
    ("penalty_repeats", "20", "penalty_repeats must be a positive int, got '20' (e.g. 20)"),
    ("colour", "red", "unknown parameter 'colour'"),
])
def test_bad_parameters_name_themselves_and_the_fix(name, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        params.check(name, value)


def test_check_choice_names_the_choices_for_code_and_for_the_command_line():
    assert params.check_choice("grid", "wrpn", ("wrpn", "dorefa")) == "wrpn"
    with pytest.raises(ValueError, match=r"^grid must be one of \('wrpn', 'dorefa'\), got 'lsq'$"):
        params.check_choice("grid", "lsq", ("wrpn", "dorefa"))
    with pytest.raises(ValueError, match=r"^argument --optimizer: unknown optimizer 'rms'; known: sgd, adam$"):
        params.check_choice("optimizer", "rms", ["sgd", "adam"], label="argument --optimizer")


@pytest.mark.parametrize("value", [0, -2, 2.0, "3", True, None])
def test_check_int_rejects_what_is_not_a_positive_int(value):
    with pytest.raises(ValueError, match=rf"^batch_size must be a positive int, got {value!r} \(e\.g\. 128\)$"):
        params.check_int("batch_size", value, minimum=1, example=128)


def test_check_int_accepts_ints_and_none_when_told_what_it_means():
    assert params.check_int("seed", 0) == 0 and params.check_int("epochs", 3, minimum=1) == 3
    assert params.check_int("epochs", None, minimum=1, none_means="the profile's") is None


def test_params_imports_no_robustq_module():  # so that every module may use its validators
    # robustq.kernels is the package's own first import (the CPU pin, before torch), and imports none;
    # robustq.profiles (which profile names are valid) imports none either
    code = "import sys, robustq.params; print(sorted(m for m in sys.modules if m.startswith('robustq.')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "['robustq.kernels', 'robustq.params', 'robustq.profiles']"


def test_good_parameters_come_back_checked():
    assert params.check_all(profile=None, bit_widths=(4, 3), n_images=None, min_ratio=0.1) == {
        "profile": "smoke", "bit_widths": [4, 3], "n_images": None, "min_ratio": 0.1}


def test_a_notebook_rejects_a_string_list_from_papermill_before_any_work(tmp_path):
    out = tmp_path / "02.ipynb"
    done = subprocess.run(
        [sys.executable, "-m", "papermill", str(ROOT / "notebooks" / "02_range_clamping.ipynb"), str(out),
         "-p", "profile", "smoke", "-p", "extra_bit_widths", "[1]", "--cwd", str(ROOT / "notebooks")],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode != 0
    assert "pass lists to papermill with -y" in done.stderr + done.stdout
