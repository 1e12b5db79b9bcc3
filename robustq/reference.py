"""The book's committed reference: every graded number, per claim and seed, and every accuracy a
chapter exports, one line each, so that any change of a result is a line in ``git diff``.

``make book`` writes ``book/reference/<profile>/`` after the chapters ran (:func:`write`); under CI
(``$CI`` set) it compares the build with the committed files instead (:func:`differences`) and fails
on any difference, printing each one. The reference is never shown as a result: it makes every change
of a number reviewable. A refactor leaves it untouched; a protocol change shows what moved.

Values are written with ``repr``, which round-trips a float exactly: the comparison is exact on
purpose (one ulp that differs is a different build, and training makes it grow).
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from robustq.files import write_atomic

MODE_ENV = "ROBUSTQ_REFERENCE"
MODES = ("write", "compare", "off")
CLAIM_FIELDS = ("grade", "mean", "se", "n", "threshold", "mde_planned")
SEED_FIELDS = ("candidate", "reference", "leave_one_out", "ceiling")  # a ceiling only where a claim has one


def mode(environ: Mapping[str, str] | None = None) -> str:
    """``$ROBUSTQ_REFERENCE`` if set, else ``compare`` under CI (``$CI`` set and not ``false``),
    else ``write``.

    >>> mode({}), mode({"CI": "true"}), mode({"CI": "true", "ROBUSTQ_REFERENCE": "off"})
    ('write', 'compare', 'off')
    """
    environ = os.environ if environ is None else environ
    chosen = environ.get(MODE_ENV) or ("compare" if environ.get("CI", "") not in ("", "0", "false") else "write")
    if chosen not in MODES:
        raise ValueError(f"${MODE_ENV}={chosen!r} is not one of {', '.join(MODES)}; unset it for the default")
    return chosen


def claim_lines(records: Sequence[Mapping]) -> str:
    """A chapter's claim records (``robustq.verdicts.claim_record``) as tab-separated lines
    ``claim, field, seed, value``: the grade and its numbers, then each seed's candidate and
    reference endpoint and the grade with that seed left out.

    >>> print(claim_lines([{"claim": "C1", "grade": "reproduced", "mean": 0.5, "se": 0.1, "n": 2,
    ...     "threshold": 0.0, "mde_planned": 1.0, "candidate": {"0": 1.0, "1": 2.0},
    ...     "reference": {"0": 0.5, "1": 1.5}, "leave_one_out": {"0": "inconclusive", "1": "inconclusive"}}]),
    ...     end="")  # doctest: +NORMALIZE_WHITESPACE
    claim field seed value
    C1 grade - reproduced
    C1 mean - 0.5
    C1 se - 0.1
    C1 n - 2
    C1 threshold - 0.0
    C1 mde_planned - 1.0
    C1 candidate 0 1.0
    C1 candidate 1 2.0
    C1 reference 0 0.5
    C1 reference 1 1.5
    C1 leave_one_out 0 inconclusive
    C1 leave_one_out 1 inconclusive
    """
    lines = ["claim\tfield\tseed\tvalue"]
    for record in records:
        claim = record["claim"]
        lines += [f"{claim}\t{name}\t-\t{_text(record[name])}" for name in CLAIM_FIELDS]
        for name in SEED_FIELDS:
            lines += [f"{claim}\t{name}\t{seed}\t{_text(value)}" for seed, value in record.get(name, {}).items()]
    return "\n".join(lines) + "\n"


def _text(value: object) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def snapshot(findings: Path, downloads: Path, chapters: Iterable[str]) -> dict[str, str]:
    """What the reference holds for the executed ``chapters``: ``<chapter>.tsv`` from each one's
    claim records in ``findings``, and each CSV download it wrote in ``downloads`` (named after
    it), as file name -> text."""
    files = {}
    for chapter in chapters:
        records = findings / f"{chapter}.json"
        if records.exists():
            files[f"{chapter}.tsv"] = claim_lines(json.loads(records.read_text()))
        for download in sorted(downloads.glob(f"{chapter}*.csv")):
            files[download.name] = download.read_text()
    return files


def write(folder: Path, files: Mapping[str, str]) -> list[str]:
    """Write each file into ``folder`` (atomically), leaving the other chapters' files as they are;
    return the names whose text changed."""
    changed = [name for name, text in files.items() if _read(folder / name) != text]
    for name in changed:
        write_atomic(folder / name, lambda tmp, text=files[name]: tmp.write_text(text))
    return changed


def differences(folder: Path, files: Mapping[str, str]) -> list[str]:
    """Every line in which this build's ``files`` differ from the committed ones in ``folder``
    (a unified diff without context, per file), or a line naming a file the reference lacks."""
    lines = []
    for name, text in files.items():
        committed = _read(folder / name)
        if committed is None:
            lines.append(f"{folder / name}: not in the reference (run make book outside CI and commit it)")
            continue
        lines += [line.rstrip("\n") for line in difflib.unified_diff(
            committed.splitlines(keepends=True), text.splitlines(keepends=True),
            fromfile=f"reference/{name}", tofile=f"this build/{name}", n=0)]
    return lines


def _read(path: Path) -> str | None:
    return path.read_text() if path.exists() else None
