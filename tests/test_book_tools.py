"""The book's build scripts: the offline check catches remote assets, the status page has its table."""

import importlib.util
from pathlib import Path

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
