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
    ("seed", -1, "seed: must be an int >= 0"),
    ("n_images", 0, "n_images: must be a positive int or None"),
    ("min_ratio", 1.5, "min_ratio: must be a number in (0, 1]"),
    ("profile", "nope", "unknown profile 'nope'"),
    ("colour", "red", "unknown parameter 'colour'"),
])
def test_bad_parameters_name_themselves_and_the_fix(name, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        params.check(name, value)


def test_good_parameters_come_back_checked():
    assert params.check_all(profile=None, bit_widths=(4, 3), n_images=None, min_ratio=0.1) == {
        "profile": "smoke", "bit_widths": [4, 3], "n_images": None, "min_ratio": 0.1}


def test_a_notebook_rejects_a_string_list_from_papermill_before_any_work(tmp_path):
    out = tmp_path / "02.ipynb"
    done = subprocess.run(
        [sys.executable, "-m", "papermill", str(ROOT / "notebooks" / "02_range_clamping.ipynb"), str(out),
         "-p", "profile", "smoke", "-p", "extra_bit_widths", "[1]", "--cwd", str(ROOT / "notebooks")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode != 0
    assert "pass lists to papermill with -y" in done.stderr + done.stdout
