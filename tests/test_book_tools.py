"""The book's build scripts: the offline check catches remote assets, the status page has its table,
the launch buttons open the source notebooks."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

BOOK = Path(__file__).resolve().parent.parent / "book"


def _load(name):
    if str(BOOK) not in sys.path:  # the scripts import each other, as they do when run from book/
        sys.path.insert(0, str(BOOK))
    spec = importlib.util.spec_from_file_location(name, BOOK / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_offline_check_flags_cdn_scripts_and_passes_local_ones(tmp_path):
    check = _load("check_offline")
    (tmp_path / "index.html").write_text('<script src="_static/mathjax/tex-chtml.js"></script>')
    (tmp_path / "page.html").write_text('<script defer src="https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-chtml.js"></script>')
    found = check.remote_assets(tmp_path)
    assert len(found) == 1 and found[0].startswith("page.html")
    (tmp_path / "page.html").write_text('<a href="https://arxiv.org/abs/2208.00338">paper</a>')
    assert check.remote_assets(tmp_path) == []


def test_status_page_lists_each_notebook_time_and_the_environment(tmp_path, monkeypatch):
    execute = _load("execute")
    monkeypatch.setattr(execute, "BOOK", tmp_path)
    monkeypatch.setattr(execute.manifest, "chapter_seconds", lambda plan: pd.Series({"grid": 20.0, "00": 10.0}))
    execute.write_status([(execute.GRID_ROW, True, 30.0, ""), ("00_primer", True, 12.34, ""),
                          ("01_x", False, 3.0, "ValueError: boom | x")], "book")
    text = (tmp_path / "status.md").read_text()
    assert f"| {execute.GRID_ROW} | ok | 30.0 | 20 | 1.50 |" in text
    assert "| 00_primer | ok | 12.3 | 10 | 1.23 |" in text and "failed: ValueError: boom \\| x | 3.0 | — | — |" in text
    assert "**45.3**" in text and "**30**" in text and "| torch |" in text and "| CPU count |" in text
    assert execute.GRID_SENTENCE in text
    execute.write_status([("00_primer", True, 12.34, "")], "smoke")  # the plan is measured on the book profile
    assert "| 00_primer | ok | 12.3 | — | — |" in (tmp_path / "status.md").read_text()
    assert execute.GRID_SENTENCE not in (tmp_path / "status.md").read_text()  # --workers 0: no grid ran
    assert re.search(r"\| commit \| `[0-9a-f]{40}`( \+ local changes)? \|", text)


def test_findings_page_has_one_linked_row_per_claim_of_the_executed_chapters(tmp_path, monkeypatch):
    from robustq import verdicts

    execute = _load("execute")
    monkeypatch.setattr(execute, "BOOK", tmp_path)
    monkeypatch.setenv("ROBUSTQ_FINDINGS", str(tmp_path / "findings"))
    claim = verdicts.Claim("01", "C1.1", "SymReg beats the baseline", "w432", "paired", 2.0)
    candidate, reference, ceiling = {0: 3.0, 1: 4.0, 2: 5.0}, {0: 0.0, 1: 0.0, 2: 0.0}, {0: 1.0, 1: 1.5, 2: 2.0}
    record = {**verdicts.claim_record(claim, claim.grade(candidate, reference, ceiling), 2.5),
              "reference": {"0": 0.0, "1": 0.0, "2": 0.0},
              "ceiling": {"0": 1.0, "1": 1.5, "2": 2.0}}  # the room: 1.5 points, below tau
    ours = verdicts.Claim("01", "C1.2", "The drift falls", "sqnr_drop_db", "paired", 1.0, source="book")
    hypothesis = verdicts.claim_record(ours, ours.grade({0: 0.5, 1: 0.6, 2: 0.5}, {0: 0.0, 1: 0.0, 2: 0.0}), 1.0)
    folder = verdicts.findings_dir("book")
    verdicts.record_claims("01_error_propagation", [record, hypothesis], folder)
    verdicts.record_claims("02_stale", [record], folder)  # a chapter that failed in this build
    execute.write_findings("book", ["01_error_propagation"])
    text = (tmp_path / "findings.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| {doc}")]
    assert rows[0] == ("| {doc}`C1.1 <notebooks/01_error_propagation>` | **not gradable at this scale** | "
                       "SymReg beats the baseline | "
                       "paired, τ 2 | +4.00 ± 0.58 points | 1.50 | 2.50&nbsp;/&nbsp;3.10 | 0/0 |")  # no leave-one-out
    assert len(rows) == 2 and "| The drift falls *(the book's hypothesis)* |" in rows[1]
    history = text[text.index("## Protocol history"):].splitlines()
    v1 = {line.split("\t")[0]: line.split("\t")[2] for line in
          (execute.PROTOCOL / "v1_grades.tsv").read_text().splitlines()[3:]}
    assert f"| C1.1 | {v1['C1.1']} | +2.41 ± 1.30 | **not gradable at this scale** | +4.00 ± 0.58 |" in history
    assert f"| C1.2 | {v1['C1.2']} |" in "\n".join(history)
    assert sum(line.startswith("| C") for line in history) == len(v1)  # every v1 claim, and no other here
    assert "2 claims of the 2 graded in this build changed grade." in history
    lead = (tmp_path / "findings_lead.md").read_text()
    assert lead == ("This build (profile `book`) trained the book's small CNN on 8,000 Fashion-MNIST training "
                    "images for 3 epochs, 5 graded seeds per method, and graded 2 claims. Of the papers' claims "
                    "(1): 1 not gradable at this scale. Of the book's own hypotheses (1): 1 smaller than claimed. On 1 "
                    "of 1 paired claim on quantized accuracy, the reference sat less than τ below the float "
                    "baseline (the *room* column): no method could reach τ there by robustness alone, so those "
                    "claims are *not gradable at this scale*.\n")
    summary = (tmp_path / "findings_summary.md").read_text().splitlines()
    assert summary[0] == "| claim | grade | statement | effect (mean ± se) | threshold | room | seeds |"
    assert len(summary) == 4
    assert summary[2] == ("| {doc}`C1.1 <notebooks/01_error_propagation>` | **not gradable at this scale** | "
                          "SymReg beats the baseline | +4.00 ± 0.58 points | τ 2 | 1.50 | 3 |")
    assert summary[3].endswith("| **smaller than claimed** | The drift falls *(the book's hypothesis)* | "
                               "+0.53 ± 0.03 dB | τ 1 | — | 3 |")


def test_launch_buttons_open_the_source_notebooks_in_colab():
    launch = _load("launch_buttons")
    config = yaml.safe_load(launch.CONFIG.read_text())
    added = launch.with_launch_buttons(config, "https://github.com/someone/robustq/", "main")
    assert added["repository"] == {"url": "https://github.com/someone/robustq", "branch": "main", "path_to_book": ""}
    assert added["launch_buttons"]["colab_url"] == "https://colab.research.google.com"
    assert added["launch_buttons"]["notebook_interface"] == config["launch_buttons"]["notebook_interface"]
    assert added["sphinx"] == config["sphinx"]
    with pytest.raises(ValueError, match="expected https://github.com/OWNER/REPO"):
        launch.with_launch_buttons(config, "https://gitlab.com/someone/robustq")


def test_the_reference_is_written_outside_ci_and_a_difference_fails_the_build_under_ci(tmp_path, monkeypatch, capsys):
    from robustq import kernels, verdicts

    execute = _load("execute")
    monkeypatch.setattr(execute, "BOOK", tmp_path)
    monkeypatch.setattr(execute, "ROOT", tmp_path)
    monkeypatch.setattr(execute, "REFERENCE", tmp_path / "reference")
    monkeypatch.setattr(kernels, "reference_deviations", lambda: [])
    monkeypatch.setenv("ROBUSTQ_FINDINGS", str(tmp_path / "findings"))
    claim = verdicts.Claim("01", "C1.1", "SymReg beats the baseline", "w432", "paired", 2.0)
    candidate, base = {0: 3.0, 1: 4.0}, {0: 0.0, 1: 0.0}
    record = {**verdicts.claim_record(claim, claim.grade(candidate, base), 2.5),
              **verdicts.seed_record(claim, candidate, base)}
    verdicts.record_claims("01_x", [record], verdicts.findings_dir("book"))
    assert execute.update_reference("book", ["01_x"], "write")
    assert (tmp_path / "reference" / "book" / "01_x.tsv").exists()
    assert execute.update_reference("book", ["01_x"], "compare")
    record["candidate"]["1"] = 4.5
    verdicts.record_claims("01_x", [record], verdicts.findings_dir("book"))
    assert not execute.update_reference("book", ["01_x"], "compare")
    out = capsys.readouterr().out
    assert "+C1.1\tcandidate\t1\t4.5" in out and "this build differs from reference/book" in out


def test_a_build_drops_stale_records_lists_failed_chapters_and_keeps_the_reference(tmp_path, monkeypatch, capsys):
    from robustq import verdicts

    execute = _load("execute")
    for name in ("BOOK", "ROOT"):
        monkeypatch.setattr(execute, name, tmp_path)
    monkeypatch.setattr(execute, "REFERENCE", tmp_path / "reference")
    monkeypatch.setenv("ROBUSTQ_FINDINGS", str(tmp_path / "findings"))
    folder = verdicts.findings_dir("book")
    claim = verdicts.Claim("01", "C1.1", "A beats B", "w432", "paired", 1.0)
    record = verdicts.claim_record(claim, claim.grade({0: 3.0, 1: 4.0}, {0: 0.0, 1: 0.0}), 2.5)
    verdicts.record_claims("02_failing", [{**record, "claim": "C2.9"}], folder)  # left by an earlier build

    def fake_execute(notebook, profile):
        if notebook.stem == "02_failing":
            return False, 1.0, "ValueError: boom"
        verdicts.record_claims(notebook.stem, [record], folder)
        return True, 2.0, ""

    trained = []

    def fake_train_models(notebooks, profile, workers):  # the grid's pool, without its training
        trained.append(([notebook.name for notebook in notebooks], profile, workers))
        return True, 3.0, ""

    monkeypatch.setattr(execute, "execute", fake_execute)
    monkeypatch.setattr(execute, "train_models", fake_train_models)
    monkeypatch.setattr(sys, "argv", ["execute.py", "--reference", "write", "01_passing.ipynb", "02_failing.ipynb"])
    assert execute.main() == 1
    assert trained == [(["01_passing.ipynb", "02_failing.ipynb"], "book", execute.default_workers())]
    assert f"| {execute.GRID_ROW} | ok | 3.0 |" in (tmp_path / "status.md").read_text()
    assert sorted(path.stem for path in folder.glob("*.json")) == ["01_passing"]  # the stale record is gone
    findings = (tmp_path / "findings.md").read_text()
    assert "C1.1" in findings and "C2.9" not in findings
    assert "| 02_failing | failed: ValueError: boom |" in (tmp_path / "status.md").read_text()
    assert "reference: left as it is, since a chapter failed" in capsys.readouterr().out
    assert not (tmp_path / "reference").exists()


def test_the_page_check_names_raw_output_a_build_path_a_missing_image_and_a_book_wide_exercise(tmp_path):
    check = _load("check_pages")
    (tmp_path / "index.html").write_text("<p>The official quantizer gives NaN on a zero tensor.</p>")
    chapter = tmp_path / "notebooks" / "08_comparison.html"
    chapter.parent.mkdir()
    chapter.write_text(
        '<div class="cell_input"><pre>x = math.nan</pre></div>'
        '<div class="cell_output"><table><tr><td>wrpn</td><td>NaN</td><td>-0.00</td></tr></table>'
        "<pre>PosixPath('/build/here/book/notebooks/a.csv')</pre>"
        "<pre>kure (seed 0): epoch 1/3  loss 1.2, train acc 80%</pre></div>"
        '<img src="../_images/there.png"><img src="data:image/png;base64,AAAA">'
        "<p>Exercise 20</p><p>Exercise 8.1</p>"
    )
    found = check.problems(tmp_path, Path("/build/here"))
    kinds = [line.split(": ")[1] for line in found]
    assert all(line.startswith("notebooks/08_comparison.html") for line in found)  # prose may say NaN
    assert sorted(kinds) == sorted(["a NaN", "a Python repr", "a training log", "a negative zero",
                                    "the build machine's path /build/here", "image does not load",
                                    "Exercise 20 is not numbered within chapter 8"]), found
    (tmp_path / "_images").mkdir()
    (tmp_path / "_images" / "there.png").write_bytes(b"png")
    chapter.write_text('<img src="../_images/there.png"><table><tr><td>—</td><td>0.00</td></tr></table>'
                       "<p>Exercise 8.1</p>")
    assert check.problems(tmp_path, Path("/build/here")) == []


def test_figures_tables_and_exercises_are_numbered_per_chapter_in_book_order():
    numbers = _load("_ext/chapter_numbers")
    assert numbers.chapter_prefix("notebooks/08_comparison") == (8,)
    assert numbers.chapter_prefix("notebooks/00_quantization_primer") == (0,)
    assert numbers.chapter_prefix("findings") == ()
    book_wide = {"exercise": {"ex-08-2": (21,), "ex-08-1": (20,)}, "figure": {"fig-b": (31,), "fig-a": (30,)}}
    assert numbers.renumber(book_wide, "notebooks/08_comparison") == {
        "exercise": {"ex-08-1": (8, 1), "ex-08-2": (8, 2)}, "figure": {"fig-a": (8, 1), "fig-b": (8, 2)}}
    assert numbers.renumber({"table": {"t": (4,)}}, "methods") == {"table": {"t": (1,)}}


def test_papermills_injected_parameters_are_collapsed_like_the_chapters_own(tmp_path):
    execute = _load("execute")
    executed = tmp_path / "01_x.ipynb"
    executed.write_text(json.dumps({"cells": [
        {"cell_type": "code", "metadata": {"tags": ["parameters", "hide-input"]}, "source": "profile = None"},
        {"cell_type": "code", "metadata": {"tags": ["injected-parameters"]}, "source": 'profile = "book"'},
        {"cell_type": "markdown", "metadata": {}, "source": "text"}]}))
    execute.collapse_injected_parameters(executed)
    tags = [cell["metadata"].get("tags") for cell in json.loads(executed.read_text())["cells"]]
    assert tags == [["parameters", "hide-input"], ["injected-parameters", "hide-input"], None]


def test_the_browser_check_reads_what_the_page_measured_and_names_a_page_whose_check_did_not_run(tmp_path, monkeypatch):
    check = _load("check_browser")
    asked = []

    def chromium(browser, width, *args):
        asked.append(args[-1])
        measured = '["table 1 (\\"claim\\") runs 96 px past the text column &amp; more"]'
        return subprocess.CompletedProcess(args, 0, stdout=f'<body><pre id="robustq-check">{measured}</pre></body>',
                                           stderr="")

    monkeypatch.setattr(check, "_chromium", chromium)
    (tmp_path / "notebooks").mkdir()
    findings, chapter = tmp_path / "findings.html", tmp_path / "notebooks" / "08_comparison.html"
    assert check.page_problems("chromium", findings, 1024) == ['table 1 ("claim") runs 96 px past the text column & more']
    check.page_problems("chromium", chapter, 1024)
    assert asked[0].endswith("findings.html?robustq-check=tables,images") and asked[1].endswith("?robustq-check=code,images")
    monkeypatch.setattr(check, "_chromium", lambda *a: subprocess.CompletedProcess(a, 1, stdout="", stderr="crashed"))
    assert "the page check did not run" in check.page_problems("chromium", findings, 1024)[0]
