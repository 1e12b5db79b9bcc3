"""The book's build scripts: the offline check catches remote assets, the status page has its table,
the launch buttons open the source notebooks."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import yaml

BOOK = Path(__file__).resolve().parent.parent / "book"


def _load(name):
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
    execute.write_status([("00_primer", True, 12.34, ""), ("01_x", False, 3.0, "ValueError: boom | x")], "book")
    text = (tmp_path / "status.md").read_text()
    assert "| 00_primer | ok | 12.3 |" in text and "failed: ValueError: boom \\| x" in text
    assert "**15.3**" in text and "| torch |" in text and "| CPU count |" in text
    assert re.search(r"\| commit \| `[0-9a-f]{40}`( \+ local changes)? \|", text)


def test_findings_page_has_one_linked_row_per_claim_of_the_executed_chapters(tmp_path, monkeypatch):
    from robustq import verdicts

    execute = _load("execute")
    monkeypatch.setattr(execute, "BOOK", tmp_path)
    monkeypatch.setenv("ROBUSTQ_FINDINGS", str(tmp_path / "findings"))
    claim = verdicts.Claim("01", "C1.1", "SymReg beats the baseline", "w432", "paired", 2.0)
    record = verdicts.claim_record(claim, claim.grade({0: 3.0, 1: 4.0, 2: 5.0}, {0: 0.0, 1: 0.0, 2: 0.0}), 2.5)
    folder = verdicts.findings_dir("book")
    verdicts.record_claims("01_error_propagation", [record], folder)
    verdicts.record_claims("02_stale", [record], folder)  # a chapter that failed in this build
    execute.write_findings("book", ["01_error_propagation"])
    text = (tmp_path / "findings.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| {doc}")]
    assert len(rows) == 1 and "{doc}`01 <notebooks/01_error_propagation>`" in rows[0]
    assert "| C1.1 |" in rows[0] and "+4.00 ± 0.58" in rows[0] and "**reproduced**" in rows[0]
    summary = (tmp_path / "findings_summary.md").read_text().splitlines()
    assert summary[0] == "| claim | statement | mean ± se (n) | grade |" and len(summary) == 3
    assert summary[2].startswith("| {doc}`C1.1 <notebooks/01_error_propagation>` |") and "+4.00 ± 0.58 (3)" in summary[2]


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

    monkeypatch.setattr(execute, "execute", fake_execute)
    monkeypatch.setattr(sys, "argv", ["execute.py", "--reference", "write", "01_passing.ipynb", "02_failing.ipynb"])
    assert execute.main() == 1
    assert sorted(path.stem for path in folder.glob("*.json")) == ["01_passing"]  # the stale record is gone
    findings = (tmp_path / "findings.md").read_text()
    assert "C1.1" in findings and "C2.9" not in findings
    assert "| 02_failing | failed: ValueError: boom |" in (tmp_path / "status.md").read_text()
    assert "reference: left as it is, since a chapter failed" in capsys.readouterr().out
    assert not (tmp_path / "reference").exists()
