"""Every chapter's claims are graded, under its own name, and the papers' reports name real claims:
checked in the notebooks' sources (statically) and in robustq.book's grading (at run time)."""

import json
import re
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from robustq import book, book_settings, comparison, verdicts

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _source(notebook: Path) -> str:
    return "\n".join("".join(cell["source"]) for cell in json.loads(notebook.read_text())["cells"]
                     if cell["cell_type"] == "code")


def _declared_ids() -> set[str]:
    ids = set()
    for notebook in NOTEBOOKS:
        ids |= set(re.findall(r'Claim\(\s*"\d\d",\s*"(C\d\.[\w.]+)"', _source(notebook)))
    return ids | {f"C8.{name}" for name in comparison.compared_methods() if name != "baseline"}  # 08's generated ids


@pytest.mark.parametrize("notebook", [nb for nb in NOTEBOOKS if not nb.name.startswith("00")], ids=lambda nb: nb.stem)
def test_each_chapter_grades_its_claims_once_under_its_own_file_name(notebook):
    source = _source(notebook)
    calls = re.findall(r'book\.grade_claims\(\s*"([^"]+)"', source)
    assert calls == [notebook.stem], f"{notebook.name}: grade_claims names {calls}"
    assert "book.power_table(" in source, f"{notebook.name} declares no claims before its run"
    numbers = set(re.findall(r'Claim\(\s*"(\d\d)"', source))
    assert numbers <= {notebook.name[:2]}, f"{notebook.name} declares claims of chapters {sorted(numbers)}"


def test_every_paper_report_names_a_declared_claim():
    unknown = set(book_settings.PAPER_REPORTS) - _declared_ids()
    assert not unknown, f"PAPER_REPORTS names no claim: {sorted(unknown)}"


def _claim(chapter: str, claim: str) -> verdicts.Claim:
    return verdicts.Claim(chapter, claim, "A beats B", "variants43", "paired", 1.0)


def test_a_declared_claim_left_ungraded_stops_the_chapter_before_recording(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTQ_FINDINGS", str(tmp_path))
    monkeypatch.setattr(book, "_DECLARED", {})
    first, second = _claim("97", "C97.1"), _claim("97", "C97.2")
    book.power_table([first, second], "smoke")
    per_seed = ({0: 2.0, 1: 3.0}, {0: 0.0, 1: 0.0})
    with pytest.raises(ValueError, match="C97.2 was declared \\(power_table\\) but is not graded"):
        book.grade_claims("97_toy", [(first, *per_seed)], "smoke")
    with pytest.raises(ValueError, match="C97.1 is graded twice"):
        book.grade_claims("97_toy", [(first, *per_seed), (first, *per_seed), (second, *per_seed)], "smoke")
    with pytest.raises(ValueError, match="C98.1 is chapter 98's"):
        book.grade_claims("97_toy", [(first, *per_seed), (second, *per_seed), (_claim("98", "C98.1"), *per_seed)],
                          "smoke")
    assert not (tmp_path / "smoke" / "97_toy.json").exists()
    table = book.grade_claims("97_toy", [(first, *per_seed), (second, *per_seed)], "smoke")
    assert list(table.index) == ["C97.1", "C97.2"] and (tmp_path / "smoke" / "97_toy.json").exists()


def test_a_claim_with_a_ceiling_records_it_and_shows_its_room_and_its_figure(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTQ_FINDINGS", str(tmp_path))
    monkeypatch.setattr(book, "_DECLARED", {})
    with_room, without = _claim("97", "C97.1"), _claim("97", "C97.2")
    candidate, reference = {0: 86.0, 1: 87.0}, {0: 85.0, 1: 85.5}
    ceiling = {0: 87.0, 1: 88.0}  # the float baseline: room (2.0 + 2.5) / 2
    table = book.grade_claims("97_toy", [(with_room, candidate, reference, ceiling), (without, candidate, reference)],
                              "smoke")
    assert table.loc["C97.1", "room"] == "2.25" and table.loc["C97.2", "room"] == "—"
    records = json.loads((tmp_path / "smoke" / "97_toy.json").read_text())
    assert records[0]["ceiling"] == {"0": 87.0, "1": 88.0} and "ceiling" not in records[1]
    with pytest.raises(ValueError, match=r"no value for seeds \[1\]"):
        book.grade_claims("97_toy", [(with_room, candidate, reference, {0: 87.0}), (without, candidate, reference)],
                          "smoke")
    with pytest.raises(FileNotFoundError, match="no claim records for 96_none"):
        book.claims_figure("96_none", "smoke")
    figure = book.claims_figure("97_toy", "smoke", columns=4)
    shown = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_title() for ax in shown] == ["C97.1\ninconclusive\nτ 1, room 2.25", "C97.2\ninconclusive\nτ 1"]
    assert all(ax.get_legend() is None for ax in shown)  # one legend for the figure, below the panels
    (legend,) = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == ["one seed", "mean, 95% interval", "τ", "room"]
    plt.close(figure)
