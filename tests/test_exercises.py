"""Every exercise that says "rerun with ``-p name value``" (or ``-y "name: value"``) names a
parameter the notebook has, with a value its checks accept; the cheap ones run under papermill."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import nbformat
import pytest
import yaml

from robustq import params

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
OPTION = re.compile(r"`-p (\w+) ([^`]+)`|`-y \"(\w+): ([^\"]+)\"`")
CHEAP = ("00_quantization_primer.ipynb",)  # seconds under the smoke profile


def exercise_parameters(path: Path) -> list[tuple[str, object]]:
    """``(name, value)`` of every parameter an exercise of the notebook asks to change."""
    nb = nbformat.read(path, as_version=4)
    found = []
    for cell in nb.cells:
        if cell.cell_type != "markdown" or "{exercise}" not in cell.source:
            continue
        for match in OPTION.finditer(cell.source):
            name, value = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
            found.append((name, yaml.safe_load(value)))
    return found


def parameter_names(path: Path) -> set[str]:
    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    return {target.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign)
            for target in node.targets if isinstance(target, ast.Name)}


CASES = [(path.name, name, value) for path in sorted(NOTEBOOKS.glob("*.ipynb"))
         for name, value in exercise_parameters(path)]


def test_every_chapter_has_an_exercise_that_changes_a_parameter():
    assert {case[0] for case in CASES} == {path.name for path in NOTEBOOKS.glob("*.ipynb")}


@pytest.mark.parametrize("notebook, name, value", CASES, ids=[f"{c[0][:2]}-{c[1]}" for c in CASES])
def test_an_exercise_parameter_exists_and_its_value_is_valid(notebook, name, value):
    assert name in parameter_names(NOTEBOOKS / notebook), f"{notebook} has no parameter {name!r}"
    params.check(name, value)


@pytest.mark.parametrize("notebook", CHEAP)
def test_a_cheap_exercise_runs_under_papermill(notebook, tmp_path):
    papermill = pytest.importorskip("papermill")
    for name, value in exercise_parameters(NOTEBOOKS / notebook):
        papermill.execute_notebook(str(NOTEBOOKS / notebook), str(tmp_path / notebook), cwd=str(NOTEBOOKS),
                                   parameters={"profile": "smoke", name: value}, kernel_name="python3",
                                   progress_bar=False)
