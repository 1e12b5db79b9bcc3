"""Execute every chapter notebook with papermill and write the book's status page.

    python book/execute.py --profile book [notebooks/01_x.ipynb ...]

First the book's models (every model of the book settings the chapters' manifest lists) are
trained by :mod:`robustq.grid`'s worker pool, two at a time on two cores (``--workers``); the
notebooks then find them in the experiment cache, and train only the few models they run outside
the book settings. Executed copies land in book/notebooks/ (git-ignored). All notebooks run even if
one fails, so one broken chapter does not hide the others; the exit status is non-zero if any failed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import papermill

from robustq import endpoints, grid, kernels, manifest, profiles, reference, verdicts
from robustq.files import write_atomic

BOOK = Path(__file__).resolve().parent
ROOT = BOOK.parent
CELL_TIMEOUT_S = 1800
REFERENCE = BOOK / "reference"


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
    collapse_injected_parameters(partial)
    os.replace(partial, out)
    return True, _papermill_duration(out), ""


GRID_ROW = "models (grid)"  # the status page's row for the training before the notebooks
GRID_SENTENCE = ("The first row is the training of the book's models before the notebooks, by "
                 "`robustq.grid`'s pool of workers (two at a time on two cores); the notebooks then load them "
                 "from the experiment cache and train only the models they run outside the book settings. ")


def chapter_of(notebook: str) -> str:
    """The chapter number a notebook's name starts with (``"05"`` for ``05_gradient_l1``)."""
    return notebook.split("_", 1)[0]


def default_workers() -> int:
    """Training jobs at once: one per pinned thread group of this machine's cores, and at least two
    (two workers of two threads that wait passively share two cores faster than one alone)."""
    return max(2, (os.cpu_count() or 1) // kernels.REFERENCE_THREADS)


def train_models(notebooks: list[Path], profile: str, workers: int) -> tuple[bool, float, str]:
    """Train every book-settings model the notebooks' chapters need (:func:`robustq.grid.run_grid`,
    ``workers`` pool workers); return (ok, seconds, failures). A failed job is retrained, and its
    error shown, by the notebook that needs it."""
    chapters = [name for name in dict.fromkeys(chapter_of(notebook.stem) for notebook in notebooks)
                if name in grid.CHAPTERS]
    settings = grid.configure(chapters, profile, executor="pool", parallel=workers)
    start = time.perf_counter()
    reports = grid.run_grid(settings, progress=False)
    for report in reports:
        print(f"  phase {report.phase}: {report.ran} of {report.needed} trained", flush=True)
    failures = [str(failure) for report in reports for failure in report.failures]
    return not failures, time.perf_counter() - start, "; ".join(failures)[:300]


def collapse_injected_parameters(executed: Path) -> None:
    """Tag papermill's injected parameters cell ``hide-input``, like the chapter's own parameters
    cell: the page opens on the chapter, and the values it ran with are one click away."""
    nb = json.loads(executed.read_text())
    for cell in nb["cells"]:
        tags = cell.get("metadata", {}).get("tags", [])
        if "injected-parameters" in tags and "hide-input" not in tags:
            tags.append("hide-input")
    write_atomic(executed, lambda tmp: tmp.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n"))


def _plan_estimates(profile: str) -> dict[str, float]:
    """Each chapter's run-plan estimate in seconds, or nothing for a profile it is not measured on."""
    if profile != manifest.CALIBRATED_PROFILE:
        return {}
    return manifest.chapter_seconds(manifest.run_plan(profile)).to_dict()


def _papermill_duration(executed: Path) -> float:
    return float(json.loads(executed.read_text())["metadata"]["papermill"]["duration"])


def write_status(rows: list[tuple[str, bool, float, str]], profile: str) -> None:
    environment = kernels.environment()
    lines = [
        "# Build status",
        "",
        (f"Executed by papermill on {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC with profile `{profile}`. "
         + (GRID_SENTENCE if rows and rows[0][0] == GRID_ROW else "")
         + "A notebook's time is papermill's own measurement of its execution."),
        "",
    ]
    if environment["reference kernels"] != "yes":
        lines += [
            "```{warning}",
            "This build did not run the reference kernels, so its numbers are not the reference ones "
            f"(`book/reference/`): {environment['reference kernels'].removeprefix('no: ')}.",
            "```",
            "",
        ]
    estimates = _plan_estimates(profile)
    lines += [
        ("The run plan's estimate (`robustq.manifest.run_plan`, its constants measured on a cold build) "
         "stands beside each time where the plan is calibrated for this profile; the chapter times of "
         "one commit vary between builds and between machines of the same kind (the README gives "
         "measured builds), more when other work runs beside them."),
        "",
        "| step | status | execution time (s) | run plan (s) | measured / plan |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    planned_total = 0.0
    for name, ok, seconds, error in rows:
        status = "ok" if ok else f"failed: {error}".replace("|", "\\|")
        estimate = estimates.get("grid" if name == GRID_ROW else chapter_of(name))
        planned = f"{estimate:.0f} | {seconds / estimate:.2f}" if estimate else "— | —"
        planned_total += estimate or 0.0
        lines.append(f"| {name} | {status} | {seconds:.1f} | {planned} |")
    lines += [
        f"| **total** | | **{sum(r[2] for r in rows):.1f}** | **{planned_total:.0f}** | |",
        "",
        "## Environment",
        "",
        "What decides the numbers besides the code: torch's CPU kernels are pinned to one instruction set",
        "and thread count (`robustq/kernels.py`), so that every x86-64 machine computes the same floats.",
        "",
        "| | |",
        "| --- | --- |",
        f"| commit | {_commit()} |",
        f"| Python | {platform.python_version()} |",
        f"| torch | {_torch_version()} |",
        f"| CPU count | {os.cpu_count()} |",
        f"| platform | {platform.platform()} |",
        *(f"| {name} | {value} |" for name, value in environment.items()),
        "",
    ]
    write_atomic(BOOK / "status.md", lambda tmp: tmp.write_text("\n".join(lines)))


def _torch_version() -> str:
    import torch

    return f"{torch.__version__} (CUDA {'available' if torch.cuda.is_available() else 'not available'})"


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
        "endpoint and rule were written in its chapter before the build that graded it (the protocol",
        "history at the end lists what changed since protocol v1, and why); the grade comes",
        "from `robustq.verdicts` over the graded seeds, paired by seed: *reproduced* when the effect",
        "is surely positive and at least the threshold τ on average, *smaller than claimed* when it is",
        "surely positive but surely below τ, *not reproduced* when its 95% interval lies at or below 0",
        "(no gain, or a loss), *inconclusive* otherwise (for `equivalent` claims: surely within, or",
        "surely outside, the margin). *mean ± se* is the mean paired difference over seeds and its",
        "standard error, in the endpoint's unit (accuracy points unless stated); *MDE*",
        "is the true effect this many seeds tell from zero with 80% power ((t₀.₉₇₅ + t₀.₈₀) · sd / √n),",
        "planned before the run from the selection seeds and observed in this build. A claim whose MDE",
        "exceeds half its threshold is underpowered in this profile: its grade is what the rule gives,",
        "and the `paper` profile grades it with more data. *Stable* counts, of the grades with one",
        "seed left out in turn, those",
        "that agree with the claim's grade: a claim marked ⚠ has a verdict that one seed fewer would",
        "change (one seed decides it, or a seed fewer leaves it undecided). *Room*, for a claim on",
        "quantized accuracy, is how far the reference sat below the float baseline (mean over seeds):",
        "the most a candidate could win without a better float model. Where it is below τ, no method",
        "could reproduce the claim by robustness alone, and the claim is *not gradable at this scale*:",
        "its mean ± se is shown, its rule is not applied (protocol v2).",
        "",
    ]
    if findings.empty:
        lines.append("No chapter recorded a graded claim in this build.")
    else:
        findings = findings[findings["chapter_file"].isin(executed)]
        lines += [
            "| claim | grade | statement | rule | mean ± se | room | MDE plan / obs. | stable |",
            "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for record in findings.to_dict("records"):
            row = argparse.Namespace(**record)
            rule = f"{row.rule}, {'τ' if row.rule == 'paired' else 'margin'} {row.threshold:g}"
            lines.append(
                f"| {{doc}}`{_breakable(row.claim)} <notebooks/{row.chapter_file}>` | **{row.grade}** | {_statement(record)} | {rule} | "
                f"{verdicts.mean_se(row.mean, row.se)} {endpoints.endpoint_unit(row.endpoint)} | {verdicts.format_points(verdicts.room(record))} | "
                f"{verdicts.format_points(row.mde_planned)}&nbsp;/&nbsp;{verdicts.format_points(row.mde)} | "
                f"{_stability(record)} |"
            )
    lines += protocol_history(findings)
    write_atomic(BOOK / "findings.md", lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    write_atomic(BOOK / "findings_lead.md", lambda tmp: tmp.write_text(findings_lead(findings, profile)))
    write_atomic(BOOK / "findings_summary.md", lambda tmp: tmp.write_text(findings_summary(findings)))


PROTOCOL = BOOK / "protocol"


def protocol_history(findings) -> list[str]:
    """The Findings page's *Protocol history*: each claim's grade under protocol v1 (the committed
    ``book/protocol/v1_grades.tsv``) beside this build's, then the changes and their reasons
    (``book/protocol/v2_changes.md``)."""
    v1 = pd.read_csv(PROTOCOL / "v1_grades.tsv", sep="\t", comment="#").set_index("claim").to_dict("index")
    now = {} if findings.empty else {record["claim"]: record for record in findings.to_dict("records")}
    lines = ["", "## Protocol history", "",
             "| claim | protocol v1: grade | v1: mean ± se | this build: grade | this build: mean ± se |",
             "| --- | --- | ---: | --- | ---: |"]
    for claim in dict.fromkeys([*v1, *now]):
        old, new = v1.get(claim), now.get(claim)
        old_cells = f"{old['grade']} | {verdicts.mean_se(old['mean'], old['se'])}" if old else "— | —"
        new_cells = f"**{new['grade']}** | {verdicts.mean_se(new['mean'], new['se'])}" if new else "— | —"
        lines.append(f"| {_breakable(claim)} | {old_cells} | {new_cells} |")
    moved = sum(claim in v1 and v1[claim]["grade"] != record["grade"] for claim, record in now.items())
    lines += ["", f"{_count(moved, 'claim')} of the {len(now)} graded in this build changed grade.", "",
              (PROTOCOL / "v2_changes.md").read_text().strip(), ""]
    return lines


def findings_lead(findings, profile: str) -> str:
    """The front page's first sentences: what was trained and what the grades came to, per source
    of claim (the papers', the book's own hypotheses, checks), computed from the records."""
    if findings.empty:
        return "No chapter recorded a graded claim in this build.\n"
    sizes = profiles.get(profile)
    images = f"{sizes.train_size:,}" if sizes.train_size else "all the"
    return (f"This build (profile `{profile}`) trained the book's small CNN on {images} Fashion-MNIST training "
            f"images for {sizes.epochs} epochs, {len(sizes.seeds)} graded seeds per method, and graded "
            f"{_count(len(findings), 'claim')}. {grades_by_source(findings)} {room_sentence(findings)}\n")


def findings_summary(findings) -> str:
    """The front page's table: per claim its grade, statement, effect in its own unit, threshold and
    a link to its chapter (the Findings page has the rules and MDEs)."""
    if findings.empty:
        return ""
    lines = ["| claim | grade | statement | effect (mean ± se) | threshold | room | seeds |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for record in findings.to_dict("records"):
        row = argparse.Namespace(**record)
        unit = endpoints.endpoint_unit(row.endpoint)
        bound = "τ" if row.rule == "paired" else "margin"
        lines.append(f"| {{doc}}`{_breakable(row.claim)} <notebooks/{row.chapter_file}>` | **{row.grade}** | "
                     f"{_statement(record)} | {verdicts.mean_se(row.mean, row.se)} {unit} | {bound} {row.threshold:g} | "
                     f"{verdicts.format_points(verdicts.room(record))} | {row.n} |")
    return "\n".join(lines) + "\n"


# the papers' claims first (their words or a summary's), then the book's own, then the checks
SOURCE_GROUPS = (("the papers' claims", ("paper", "summary")), ("the book's own hypotheses", ("book",)),
                 ("checks that hold by construction", ("check",)))
SOURCE_MARKS = {"paper": "", "summary": " *(from a summary)*", "book": " *(the book's hypothesis)*",
                "check": " *(a check)*"}


def grades_by_source(findings) -> str:
    """One sentence per source group that graded something: ``Of the papers' claims (25): ...``."""
    sentences = []
    for name, members in SOURCE_GROUPS:
        grades = findings.loc[findings["source"].isin(members), "grade"]
        if len(grades):
            sentences.append(f"Of {name} ({len(grades)}): {verdicts.tally(grades)}.")
    return " ".join(sentences)


def room_sentence(findings) -> str:
    """How many paired claims on quantized accuracy had less room to win than their tau (the
    reference closer to the float baseline than tau: :func:`robustq.verdicts.room`), or nothing
    when no claim has a room."""
    rooms = [(verdicts.room(record), record["threshold"]) for record in findings.to_dict("records")
             if record["rule"] == "paired"]
    rooms = [(room, tau) for room, tau in rooms if math.isfinite(room)]  # NaN: a claim without a ceiling
    if not rooms:
        return ""
    short = sum(room < tau for room, tau in rooms)
    if short == 0:
        return f"Each of the {_count(len(rooms), 'paired claim')} on quantized accuracy had at least τ of room to win."
    return (f"On {short} of {_count(len(rooms), 'paired claim')} on quantized accuracy, the reference sat less "
            "than τ below the float baseline (the *room* column): no method could reach τ there by "
            "robustness alone, so those claims are *not gradable at this scale*.")


def _statement(record: dict) -> str:
    return record["statement"] + SOURCE_MARKS[record["source"]]


def _breakable(claim: str) -> str:
    """A claim id that may wrap after each underscore (``C8.symreg_satnl_asam``), so that the
    narrow first column of a findings table stays narrow."""
    return claim.replace("_", "_\u200b")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' if n != 1 else ''}"


def _stability(record: dict) -> str:
    """``5/5``, or ``⚠ 3/5`` when a leave-one-seed-out grade differs from the claim's."""
    agreeing, n = verdicts.stability(record)
    return f"{agreeing}/{n}" if agreeing == n else f"⚠ {agreeing}/{n}"


def update_reference(profile: str, executed: list[str], mode: str) -> bool:
    """Write this build's graded numbers and exported accuracies into ``book/reference/<profile>/``
    (``mode`` write), or compare them with the committed ones and print each difference (compare,
    under CI); return False if the build differs from the reference."""
    files = reference.snapshot(verdicts.findings_dir(profile), BOOK / "notebooks", executed)
    folder = REFERENCE / profile
    reasons = kernels.reference_deviations()
    if mode == "compare":
        lines = reference.differences(folder, files)
        for line in lines:
            print(line, flush=True)
        verdict = "differs from" if lines else "equals"
        print(f"reference: this build {verdict} {folder.relative_to(ROOT)} ({len(files)} files compared)"
              + (f"; its kernels are not the reference ones: {'; '.join(reasons)}" if reasons else ""), flush=True)
        return not lines
    if reasons:
        print(f"reference: not written, this build's kernels are not the reference ones: {'; '.join(reasons)}",
              flush=True)
        return True
    changed = reference.write(folder, files)
    print(f"reference: {len(changed)} of {len(files)} files in {folder.relative_to(ROOT)} changed"
          + (f" ({', '.join(changed)}): commit them with the change that moved them" if changed else ""), flush=True)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="book")
    parser.add_argument("--reference", choices=reference.MODES, default=None,
                        help=f"write the reference numbers, compare with them, or neither "
                             f"(default: ${reference.MODE_ENV}, else compare under CI, else write)")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="training jobs at once before the notebooks run (default: %(default)s on this "
                             "machine); 0 leaves the training to the notebooks")
    parser.add_argument("notebooks", nargs="*", type=Path)
    args = parser.parse_args()
    mode = args.reference or reference.mode()
    notebooks = args.notebooks or sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    shutil.rmtree(verdicts.findings_dir(args.profile), ignore_errors=True)  # only this build's records
    rows = []
    if args.workers:
        print(f"training the chapters' models, {args.workers} at a time (profile {args.profile}) ...", flush=True)
        ok, seconds, error = train_models(notebooks, args.profile, args.workers)
        print(f"  {'ok' if ok else 'FAILED'} in {seconds:.1f} s {error}", flush=True)
        rows.append((GRID_ROW, ok, seconds, error))
    for notebook in notebooks:
        print(f"executing {notebook.name} (profile {args.profile}) ...", flush=True)
        ok, seconds, error = execute(notebook.resolve(), args.profile)
        print(f"  {'ok' if ok else 'FAILED'} in {seconds:.1f} s {error}", flush=True)
        rows.append((notebook.stem, ok, seconds, error))
    write_status(rows, args.profile)
    executed = [name for name, ok, _, _ in rows if ok and name != GRID_ROW]
    write_findings(args.profile, executed)
    if not all(ok for _, ok, _, _ in rows):
        print("reference: left as it is, since a chapter failed", flush=True)
        return 1
    return 0 if mode == "off" or update_reference(args.profile, executed, mode) else 1


if __name__ == "__main__":
    sys.exit(main())
