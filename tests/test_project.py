"""The project's own files agree with each other: pins, version, the README's commands."""

import re
import tomllib
from pathlib import Path

import robustq

ROOT = Path(__file__).resolve().parent.parent


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _pins(lines):
    return dict(re.match(r"\s*-?\s*([A-Za-z0-9_.\-]+)==([^\s#]+)", line).groups() for line in lines if "==" in line)


def test_environment_yml_pins_the_same_versions_as_pyproject():
    project = _pyproject()
    declared = _pins(project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra])
    conda = _pins((ROOT / "environment.yml").read_text().splitlines())
    assert conda == declared


def test_every_declared_dependency_is_pinned_exactly_and_locked():
    project = _pyproject()
    deps = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    assert all("==" in d for d in deps), deps
    lock = _pins((ROOT / "constraints.txt").read_text().splitlines())
    lowered = {k.lower().replace("_", "-"): v for k, v in lock.items()}
    for name, version in _pins(deps).items():
        assert lowered[name.lower()] == version, name


def test_package_version_matches_pyproject():
    assert robustq.__version__ == _pyproject()["version"]


def test_readme_and_ci_run_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    for command in ("make book", "make test"):
        assert command in readme and command in ci


def test_readme_profile_table_matches_the_profiles():
    from robustq.profiles import PROFILES

    readme = (ROOT / "README.md").read_text()
    for name, settings in PROFILES.items():
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{name}` |"))
        assert f"{settings.epochs} epoch" in row, (name, row)
        size = settings.train_size
        assert (f"{size:,}" if size else "all 60,000") in row, (name, row)
