"""One validator for every user-facing parameter, from the command line or a notebook's papermill
``parameters`` cell: a bad value fails before any work, with a message naming the parameter and
the fix. :func:`check_choice` and :func:`check_int` are the package's only choice and integer
validators, :func:`validate_bit_width` its only bit-width validator; at import time this module
imports only :mod:`robustq.profiles` (which imports no ``robustq`` module), so any module may use
them without an import cycle.

Papermill's ``-p NAME VALUE`` passes strings; lists go through ``-y``, e.g.
``papermill ... -y "bit_widths: [4, 3]"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from robustq import profiles

MIN_BIT_WIDTH, MAX_BIT_WIDTH = 2, 16  # the grids of robustq.quant
YAML_HINT = "pass lists to papermill with -y, e.g. -y '{name}: [4, 3]'"  # -p passes strings


def check_choice(name: str, value: Any, allowed: Sequence[Any], *, label: str | None = None) -> Any:
    """``value`` if it is one of ``allowed``, else ``ValueError`` naming the parameter and the
    choices: ``"name must be one of ('a', 'b'), got 'c'"``; with ``label`` (a command-line flag,
    e.g. ``"argument --model"``) ``"argument --model: unknown model 'c'; known: a, b"``."""
    if value in allowed:
        return value
    if label is not None:
        raise ValueError(f"{label}: unknown {name} {value!r}; known: {', '.join(map(str, allowed))}")
    raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def check_int(
    name: str, value: Any, *, minimum: int = 0, example: int | None = None, none_means: str | None = None
) -> int | None:
    """``value`` if it is an int (not a bool) >= ``minimum``, else ``ValueError`` naming ``name``
    and an example value. With ``none_means`` (what None stands for, e.g. "the profile's
    default"), None is accepted too.

    >>> check_int("batch_size", 0, minimum=1, example=128)
    Traceback (most recent call last):
    ValueError: batch_size must be a positive int, got 0 (e.g. 128)
    """
    if value is None and none_means is not None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        if none_means is not None:
            kind += f" or None ({none_means})"
        raise ValueError(f"{name} must be {kind}, got {value!r} (e.g. {minimum if example is None else example})")
    return value


def validate_bit_width(bit_width: int) -> int:
    """Return ``bit_width`` if it is an int in 2..16, else raise ``ValueError`` saying so."""
    if isinstance(bit_width, bool) or not isinstance(bit_width, int):
        raise ValueError(  # noqa: TRY004 (callers, the CLI and book.parameters, report ValueErrors)
            f"bit_width must be an int in {MIN_BIT_WIDTH}..{MAX_BIT_WIDTH}, got {bit_width!r} "
            f"({type(bit_width).__name__}); pass e.g. bit_width=4"
        )
    if not MIN_BIT_WIDTH <= bit_width <= MAX_BIT_WIDTH:
        raise ValueError(
            f"bit_width must be in {MIN_BIT_WIDTH}..{MAX_BIT_WIDTH}, got {bit_width}; "
            "1-bit (binary) networks need a different quantizer"
        )
    return bit_width


def _bit_width(name: str, value: Any) -> int:
    try:
        return validate_bit_width(value)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


def _bit_widths(name: str, value: Any) -> list[int]:
    if isinstance(value, str):
        raise ValueError(  # noqa: TRY004 (callers, the CLI and book.parameters, report ValueErrors)
            f"{name}: must be a list of bit-widths, got the string {value!r}; {YAML_HINT.format(name=name)}"
        )
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{name}: must be a non-empty list of bit-widths (ints in 2..16), got {value!r}")
    return [_bit_width(name, v) for v in value]


def _ratio(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1 or not math.isfinite(value):
        raise ValueError(f"{name}: must be a number in (0, 1], got {value!r} (e.g. 0.1)")
    return float(value)


def _profile(name: str, value: Any) -> str:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name}: must be a profile name or None, got {value!r}")
    return profiles.resolve_profile(value)


CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "profile": _profile,
    "seed": check_int,
    "n_images": partial(check_int, minimum=1, none_means="the profile's default"),
    "min_ratio": _ratio,
}
SUFFIXES: dict[str, Callable[[str, Any], Any]] = {
    "_bit_widths": _bit_widths, "bit_widths": _bit_widths, "_bits": _bit_width,
    "_size": partial(check_int, minimum=1, example=4096, none_means="the profile's default"),
    **{suffix: partial(check_int, minimum=1, example=20) for suffix in ("_repeats", "_draws", "resamples")},
    **{suffix: partial(check_int, minimum=1, example=20, none_means="the profile's default")
       for suffix in ("_iterations", "_steps")},
}


def check(name: str, value: Any, label: str | None = None) -> Any:
    """The validated value of parameter ``name`` (a profile name is resolved); ``ValueError``
    naming the parameter (or ``label``, e.g. a command-line flag) and the fix otherwise. Names
    ending in ``bit_widths`` take a list of bit-widths, names ending in ``_bits`` one bit-width,
    ``_size``, ``_iterations`` and ``_steps`` a positive int or None (the profile's), ``_repeats``,
    ``_draws`` and ``resamples`` a positive int."""
    if name in CHECKS:
        return CHECKS[name](label or name, value)
    for suffix, checker in SUFFIXES.items():
        if name.endswith(suffix):
            return checker(label or name, value)
    raise ValueError(f"unknown parameter {name!r}: add a check for it to robustq.params.CHECKS")


def check_all(**values: Any) -> dict[str, Any]:
    """:func:`check` every keyword; returns the validated values in the same order."""
    return {name: check(name, value) for name, value in values.items()}
