"""Execute every chapter notebook with papermill and write the book's status page.

    python book/execute.py --profile book [notebooks/01_x.ipynb ...]

Executed copies land in book/notebooks/ (git-ignored). All notebooks run even if one fails, so one
broken chapter does not hide the others; the exit status is non-zero if any failed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import papermill
import torch

from robustq import verdicts
from robustq.files import write_atomic

BOOK = Path(__file__).resolve().parent
ROOT = BOOK.parent
CELL_TIMEOUT_S = 1800


def execute(notebook: Path, profile: str) -> tuple[bool, float, str]:
    """Run one notebook into book/notebooks/; return (ok, seconds, error summary)."""
    out = BOOK / "notebooks" / notebook.name
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial.ipynb")
    start = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(notebook), str(partial), parameters={"profile": profile}, cwd=str(notebook.parent),
            kernel_name="python3", progress_bar=False, execution_timeout=CELL_TIMEOUT_S,
        )
    except Exception as error:  # papermill wraps the cell's exception; keep its first line
        os.replace(partial, out) if partial.exists() else None
        return False, time.perf_counter() - start, str(error).strip().splitlines()[-1][:300]
    os.replace(partial, out)
    return True, _papermill_duration(out), ""


def _papermill_duration(executed: Path) -> float:
    return float(json.loads(executed.read_text())["metadata"]["papermill"]["duration"])


def write_status(rows: list[tuple[str, bool, float, str]], profile: str) -> None:
    lines = [
        "# Build status",
        "",
        f"Executed by papermill on {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC with profile "
        f"`{profile}`. Times are papermill's own measurement of each notebook's execution, "
        "training included (a model found in the experiment cache is not retrained).",
        "",
        "| notebook | status | execution time (s) |",
        "| --- | --- | ---: |",
    ]
    for name, ok, seconds, error in rows:
        status = "ok" if ok else f"failed: {error}".replace("|", "\\|")
        lines.append(f"| {name} | {status} | {seconds:.1f} |")
    lines += [
        f"| **total** | | **{sum(r[2] for r in rows):.1f}** |",
        "",
        "## Environment",
        "",
        "| | |",
        "| --- | --- |",
        f"| commit | {_commit()} |",
        f"| Python | {platform.python_version()} |",
        f"| torch | {torch.__version__} |",
        f"| torch threads | {torch.get_num_threads()} |",
        f"| CPU count | {os.cpu_count()} |",
        f"| CUDA | {torch.cuda.is_available()} |",
        f"| platform | {platform.platform()} |",
        "",
    ]
    write_atomic(BOOK / "status.md", lambda tmp: tmp.write_text("\n".join(lines)))


def _commit() -> str:
    """The checkout's commit (with "+ local changes" when the tree differs from it), or why not."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"`{commit}`" + (" + local changes" if dirty else "")


def write_findings(profile: str, executed: list[str]) -> None:
    """The Findings page: one row per graded claim, from the records the executed chapters left
    (``robustq.verdicts``), linked to its chapter."""
    findings = verdicts.load_findings(verdicts.findings_dir(profile))
    lines = [
        "# Findings",
        "",
        f"Every claim the chapters grade, as graded in this build (profile `{profile}`). Each claim's",
        "endpoint and rule were written in its chapter before any model was trained; the grade comes",
        "from `robustq.verdicts` over the graded seeds, paired by seed: *reproduced* when the effect",
        "is surely positive and at least the threshold τ, *not reproduced* when it is surely below τ,",
        "*inconclusive* otherwise (for `equivalent` claims: surely within, or surely outside, the",
        "margin). *mean ± se* is the mean paired difference over seeds and its standard error; *MDE*",
        "is the smallest effect this many seeds can tell from zero (t · se), planned before the run",
        "from the selection seeds and observed in this build. A claim whose MDE exceeds its threshold",
        "is underpowered in this profile: its grade is what the rule gives, and the `paper` profile",
        "grades it with more data.",
        "",
    ]
    if findings.empty:
        lines.append("No chapter recorded a graded claim in this build.")
    else:
        findings = findings[findings["chapter_file"].isin(executed)]
        lines += [
            "| chapter | claim | statement | rule | n | mean ± se | MDE plan / obs. | grade |",
            "| --- | --- | --- | --- | ---: | ---: | ---: | --- |",
        ]
        for row in findings.itertuples():
            rule = f"{row.rule}, {'τ' if row.rule == 'paired' else 'margin'} = {row.threshold:g}"
            lines.append(
                f"| {{doc}}`{row.chapter_file[:2]} <notebooks/{row.chapter_file}>` | {row.claim} | {row.statement} | "
                f"{rule} | {row.n} | {_mean_se(row)} | {row.mde_planned:.2f} / {row.mde:.2f} | "
                f"**{row.grade}** |"
            )
    write_atomic(BOOK / "findings.md", lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    write_atomic(BOOK / "findings_summary.md", lambda tmp: tmp.write_text(findings_summary(findings)))


def findings_summary(findings) -> str:
    """The front page's table (``intro.md`` includes it): per claim its grade, the numbers and a
    link to its chapter; the Findings page has the rules and MDEs."""
    if findings.empty:
        return "No chapter recorded a graded claim in this build.\n"
    lines = ["| claim | statement | mean ± se (n) | grade |", "| --- | --- | ---: | --- |"]
    for row in findings.itertuples():
        lines.append(f"| {{doc}}`{row.claim} <notebooks/{row.chapter_file}>` | {row.statement} | "
                     f"{_mean_se(row)} ({row.n}) | **{row.grade}** |")
    return "\n".join(lines) + "\n"


def _mean_se(row) -> str:
    return f"{row.mean:+.2f} ± {row.se:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="book")
    parser.add_argument("notebooks", nargs="*", type=Path)
    args = parser.parse_args()
    notebooks = args.notebooks or sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    shutil.rmtree(verdicts.findings_dir(args.profile), ignore_errors=True)  # only this build's records
    rows = []
    for notebook in notebooks:
        print(f"executing {notebook.name} (profile {args.profile}) ...", flush=True)
        ok, seconds, error = execute(notebook.resolve(), args.profile)
        print(f"  {'ok' if ok else 'FAILED'} in {seconds:.1f} s {error}", flush=True)
        rows.append((notebook.stem, ok, seconds, error))
    write_status(rows, args.profile)
    write_findings(args.profile, [name for name, ok, _, _ in rows if ok])
    return 0 if all(ok for _, ok, _, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
