"""One validator for every user-facing parameter, from the command line or a notebook's papermill
``parameters`` cell: a bad value fails before any work, with a message naming the parameter and
the fix.

Papermill's ``-p NAME VALUE`` passes strings; lists go through ``-y``, e.g.
``papermill ... -y "bit_widths: [4, 3]"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from robustq import experiments, quant

YAML_HINT = "pass lists to papermill with -y, e.g. -y '{name}: [4, 3]'"  # -p passes strings


def _bit_width(name: str, value: Any) -> int:
    try:
        return quant.validate_bit_width(value)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


def _bit_widths(name: str, value: Any) -> list[int]:
    if isinstance(value, str):
        raise ValueError(f"{name}: must be a list of bit-widths, got the string {value!r}; {YAML_HINT.format(name=name)}")
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{name}: must be a non-empty list of bit-widths (ints in 2..16), got {value!r}")
    return [_bit_width(name, v) for v in value]


def _non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: must be an int >= 0, got {value!r} (e.g. 0)")
    return value


def _positive_int_or_none(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: must be a positive int or None (the profile's default), got {value!r}")
    return value


def _ratio(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1 or not math.isfinite(value):
        raise ValueError(f"{name}: must be a number in (0, 1], got {value!r} (e.g. 0.1)")
    return float(value)


def _profile(name: str, value: Any) -> str:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name}: must be a profile name or None, got {value!r}")
    return experiments.resolve_profile(value)


CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "profile": _profile,
    "seed": _non_negative_int,
    "n_images": _positive_int_or_none,
    "min_ratio": _ratio,
}
SUFFIXES: dict[str, Callable[[str, Any], Any]] = {"_bit_widths": _bit_widths, "bit_widths": _bit_widths, "_bits": _bit_width}


def check(name: str, value: Any, label: str | None = None) -> Any:
    """The validated value of parameter ``name`` (a profile name is resolved); ``ValueError``
    naming the parameter (or ``label``, e.g. a command-line flag) and the fix otherwise. Names
    ending in ``bit_widths`` take a list of bit-widths, names ending in ``_bits`` one bit-width."""
    if name in CHECKS:
        return CHECKS[name](label or name, value)
    for suffix, checker in SUFFIXES.items():
        if name.endswith(suffix):
            return checker(label or name, value)
    raise ValueError(f"unknown parameter {name!r}: add a check for it to robustq.params.CHECKS")


def check_all(**values: Any) -> dict[str, Any]:
    """:func:`check` every keyword; returns the validated values in the same order."""
    return {name: check(name, value) for name, value in values.items()}
