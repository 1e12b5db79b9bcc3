"""Conventions every chapter notebook keeps in git (checked statically, nothing is executed).

Stripped outputs, one papermill ``parameters`` cell holding ``profile``, the python3 kernel, no
training loop and no package installation inside a notebook, ``NN_snake_case.ipynb`` names; the
house style of CONTRIBUTING.md: short code cells, at most a fifth of them removed from the page,
prose in Markdown with glued numbers (every ``{glue:...}`` key is glued by a code cell).
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from robustq import book

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
NAME = re.compile(r"\d{2}_[a-z0-9]+(_[a-z0-9]+)*\.ipynb")
PROFILE_ASSIGNMENT = re.compile(r"^profile\s*=", re.MULTILINE)
# Training belongs in robustq.train; a notebook that steps an optimizer is training in a cell.
TRAINING = re.compile(r"\.backward\(|optimizer\.step\(")
MAX_CELL_LINES = 25  # logical lines (_logical_lines)
# a shown code cell's lines fit the text column at 1024 px (measured: 85 characters of the book's
# monospace font; book/check_browser.py checks the built pages); collapsed cells may be wider
SHOWN_WIDTH = 84
REMOVED_TAGS = {"remove-input", "remove-cell"}
GLUE_REFERENCE = re.compile(r"\{glue:(?:text|md|any)\}`([\w-]+)(?::[^`]*)?`|```\{glue:figure\}\s+([\w-]+)")
INSTALL = re.compile(r"(^|[\s;])[!%]\s*pip\b|\bpip3?\s+install\b|\bconda\s+install\b|\bmamba\s+install\b", re.MULTILINE)


def problems(path: Path) -> list[str]:
    """Every way the notebook at ``path`` breaks the conventions, as readable lines (none: it is fine)."""
    found = []
    if not NAME.fullmatch(path.name):
        found.append(f"file name {path.name!r} is not NN_snake_case.ipynb")
    try:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
    except Exception as error:  # unreadable JSON, wrong schema: report, do not crash the check
        return found + [f"not a valid notebook: {type(error).__name__}: {str(error)[:200]}"]

    kernel = nb.metadata.get("kernelspec", {}).get("name")
    if kernel != "python3":
        found.append(f"kernelspec is {kernel!r}, not 'python3'")

    parameter_cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(parameter_cells) != 1:
        found.append(f"{len(parameter_cells)} cells tagged 'parameters' (need exactly one)")
    elif parameter_cells[0].cell_type != "code" or not PROFILE_ASSIGNMENT.search(parameter_cells[0].source):
        found.append("the 'parameters' cell does not assign `profile`")
    else:  # the page opens on the chapter's question, not on its parameters and imports
        first = nb.cells.index(parameter_cells[0])
        for cell in nb.cells[first:first + 2]:
            if cell.cell_type == "code" and "hide-input" not in cell.get("metadata", {}).get("tags", []):
                found.append(f"cell {nb.cells.index(cell)} (parameters or setup) is not tagged 'hide-input'")

    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        where = f"cell {index}"
        if cell.get("outputs"):
            found.append(f"{where} has outputs (strip them before committing)")
        if cell.get("execution_count") is not None:
            found.append(f"{where} has execution_count {cell.execution_count} (strip it)")
        if match := TRAINING.search(cell.source):
            found.append(f"{where} looks like a training loop ({match.group(0)!r}); train through robustq")
        if match := INSTALL.search(cell.source):
            found.append(f"{where} installs packages ({match.group(0).strip()!r}); dependencies go in pyproject.toml")
        if (lines := _logical_lines(cell.source)) > MAX_CELL_LINES:
            found.append(f"{where} has {lines} lines (at most {MAX_CELL_LINES}: move code into robustq)")
        collapsed = {"hide-input", *REMOVED_TAGS} & set(cell.get("metadata", {}).get("tags", []))
        too_wide = [n for n, line in enumerate(cell.source.splitlines(), 1) if len(line) > SHOWN_WIDTH]
        if too_wide and not collapsed:
            found.append(f"{where} line {too_wide[0]} is wider than {SHOWN_WIDTH} characters, the page's "
                         "code column at 1024 px (wrap it, e.g. ruff format --line-length 84)")
        if "say(" in cell.source:
            found.append(f"{where} writes prose from Python (say); glue the numbers and write Markdown")
    return found + _house_style(nb)


def _logical_lines(source: str) -> int:
    """Statements and comment lines: a call wrapped over several lines to fit the page counts once."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source + "\n").readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):  # IPython magics: count what is there
        return len(source.splitlines())
    ends = {token.start[0] for token in tokens if token.type == tokenize.NEWLINE}
    comments = {token.start[0] for token in tokens if token.type == tokenize.COMMENT}
    return len(ends | comments)


def _house_style(nb) -> list[str]:
    code = [c for c in nb.cells if c.cell_type == "code"]
    removed = [c for c in code if REMOVED_TAGS & set(c.get("metadata", {}).get("tags", []))]
    found = []
    if 5 * len(removed) > len(code):
        found.append(f"{len(removed)} of {len(code)} code cells are removed from the page (at most a fifth)")
    glued = set().union(*(_glued_names(c.source) for c in code)) if code else set()
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        for match in GLUE_REFERENCE.finditer(cell.source):
            if (key := match.group(1) or match.group(2)) not in glued:
                found.append(f"Markdown uses glue key {key!r}, which no code cell glues")
    return found


def _glued_names(source: str) -> set[str]:
    """Keyword names of ``glue(...)`` calls, the names a package helper glues (``book.GLUED_BY``)
    and every string constant (figure names are passed as strings, sometimes through a helper)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:  # IPython magics: the checks above still ran
        return set()
    names = set()
    for node in ast.walk(tree):
        called = getattr(node.func, "attr", getattr(node.func, "id", "")) if isinstance(node, ast.Call) else ""
        if called == "glue":
            names |= {keyword.arg for keyword in node.keywords if keyword.arg}
        elif called in book.GLUED_BY:
            names |= set(book.GLUED_BY[called])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)
    return names


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks/*.ipynb found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_keeps_the_conventions(path):
    assert problems(path) == []


def write(nb, path: Path) -> Path:
    nbformat.write(nb, path)
    return path


def assert_reports(found: list[str], expected: list[str]) -> None:
    """Every expected piece of text appears in the checker's report."""
    report = "\n".join(found)
    for piece in expected:
        assert piece in report, f"missing {piece!r} in:\n{report}"


def good_notebook():
    parameters = new_code_cell('profile = None  # "smoke", "book" or "paper"\nseed = 0')
    parameters.metadata["tags"] = ["parameters", "hide-input"]
    setup = new_code_cell("x = 1", metadata={"tags": ["hide-input"]})
    nb = new_notebook(cells=[new_markdown_cell("# Title"), parameters, setup])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def test_checker_accepts_a_good_notebook(tmp_path):
    assert problems(write(good_notebook(), tmp_path / "07_good_chapter.ipynb")) == []


def test_checker_wants_the_parameters_and_setup_cells_collapsed(tmp_path):
    nb = good_notebook()
    nb.cells[2].metadata["tags"] = []
    assert problems(write(nb, tmp_path / "07_open_setup.ipynb")) == [
        "cell 2 (parameters or setup) is not tagged 'hide-input'"]


def test_checker_rejects_a_bad_notebook(tmp_path):
    nb = good_notebook()
    nb.metadata["kernelspec"]["name"] = "ir"
    executed = new_code_cell("print(1)", execution_count=3)
    executed.outputs = [nbformat.v4.new_output("stream", name="stdout", text="1\n")]
    second_parameters = new_code_cell("seed = 1")
    second_parameters.metadata["tags"] = ["parameters"]
    nb.cells += [
        executed,
        second_parameters,
        new_code_cell("for batch in data:\n    loss = model(batch)\n    loss.backward()\n    optimizer.step()"),
        new_code_cell("!pip install torch"),
        new_code_cell("%pip install seaborn"),
        new_code_cell("import subprocess; subprocess.run('conda install numpy', shell=True)"),
    ]
    assert_reports(problems(write(nb, tmp_path / "Bad Chapter.ipynb")), [
        "file name 'Bad Chapter.ipynb'",
        "kernelspec is 'ir'",
        "2 cells tagged 'parameters'",
        "cell 3 has outputs",
        "cell 3 has execution_count 3",
        "cell 5 looks like a training loop ('.backward(')",
        "cell 6 installs packages ('!pip')",
        "cell 7 installs packages ('%pip')",
        "cell 8 installs packages ('conda install')",
    ])


@pytest.mark.parametrize(
    "source, expected",
    [("seed = 0", "does not assign `profile`"), ("optimizer.step()", "training loop")],
)
def test_checker_rejects_single_faults(tmp_path, source, expected):
    nb = good_notebook()
    if "profile" in expected:
        nb.cells[1].source = source
    else:
        nb.cells.append(new_code_cell(source))
    assert any(expected in line for line in problems(write(nb, tmp_path / "01_fault.ipynb")))


def test_checker_wants_shown_code_within_the_page(tmp_path):
    nb = good_notebook()
    wide = "x = " + " + ".join(["1"] * 30)
    hidden = new_code_cell(wide, metadata={"tags": ["hide-input"]})
    nb.cells += [new_code_cell(f"y = 1\n{wide}"), hidden]
    assert_reports(problems(write(nb, tmp_path / "01_wide.ipynb")), [
        "cell 3 line 2 is wider than 84 characters"])


def test_checker_enforces_the_house_style(tmp_path):
    nb = good_notebook()
    removed = [new_code_cell(f"y{i} = {i}") for i in range(2)]
    for cell in removed:
        cell.metadata["tags"] = ["remove-input"]
    nb.cells += [
        *removed,
        new_code_cell("\n".join(f"z{i} = {i}" for i in range(MAX_CELL_LINES + 1))),
        new_code_cell('book.say(f"{x} points")'),
        new_code_cell('book.glue(acc=0.9)\nbook.glue_figure("fig-known", fig)'),
        new_markdown_cell("{glue:text}`acc:.2f` and {glue:text}`typo`\n\n```{glue:figure} fig-known\n```"),
        new_markdown_cell("```{glue:figure} fig-unknown\n:name: fig-unknown\n```"),
    ]
    found = problems(write(nb, tmp_path / "05_style.ipynb"))
    assert_reports(found, [
        "2 of 7 code cells are removed from the page",
        f"cell 5 has {MAX_CELL_LINES + 1} lines",
        "cell 6 writes prose from Python",
        "glue key 'typo'",
        "glue key 'fig-unknown'",
    ])
    assert not any("'acc'" in line or "'fig-known'" in line for line in found)


def test_checker_reports_unreadable_files(tmp_path):
    path = tmp_path / "02_broken.ipynb"
    path.write_text("{not json")
    assert any("not a valid notebook" in line for line in problems(path))
    missing_parameters = good_notebook()
    missing_parameters.cells[1].metadata["tags"] = []
    assert any("0 cells tagged 'parameters'" in line
               for line in problems(write(missing_parameters, tmp_path / "03_no_parameters.ipynb")))
