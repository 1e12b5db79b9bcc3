"""Shared fixtures: an isolated experiment cache per test and small datasets."""

import os
import shutil
import tempfile

import pytest
import torch
from hypothesis import settings

from robustq import book_settings, experiments
from robustq.data import load_dataset

# `make test` runs the property tests with fewer examples (`--hypothesis-profile=make-test`); a
# property test that sets its own max_examples keeps it. The default profile stays Hypothesis's.
settings.register_profile("make-test", max_examples=30, deadline=None)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own experiment cache and the smoke profile unless it says otherwise."""
    monkeypatch.setenv("ROBUSTQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ROBUSTQ_PROFILE", "smoke")
    # what the notebooks ask for is recorded (tests/test_manifest.py); a unit test's runs are not
    monkeypatch.delenv(experiments.RECORD_ENV, raising=False)
    monkeypatch.delenv(experiments.CHAPTER_ENV, raising=False)
    book_settings.forget_choices()
    torch.manual_seed(0)
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def synthetic():
    return load_dataset("synthetic")


@pytest.fixture(scope="session")
def fmnist_small():
    return load_dataset("fashion-mnist", train_size=2048, seed=0)


# Under `make test` (pytest -n 2 --dist loadscope) one worker runs these in collection order: the
# smoke notebooks, then the modules whose tests read what the notebooks recorded.
NOTEBOOK_GROUP = ("notebooks/", "tests/test_manifest.py", "tests/test_findings_records.py")


def in_notebook_group(nodeid: str) -> bool:
    return nodeid.startswith(NOTEBOOK_GROUP)


def pytest_collection_modifyitems(session, config, items):
    """The smoke notebooks first, then the tests marked ``after_notebooks`` (they read what the
    notebooks recorded), then everything else."""
    def order(item) -> int:
        if item.nodeid.startswith("notebooks/"):
            return 0
        return 1 if item.get_closest_marker("after_notebooks") is not None else 2

    items.sort(key=order)


NOTEBOOK_THREADS = 2


def pytest_runtest_setup(item):
    # make test runs its workers at one thread each; the notebook kernels, on the worker that runs
    # little else, take two (they start after this, and inherit it)
    if os.environ.get("PYTEST_XDIST_WORKER") and item.nodeid.startswith("notebooks/"):
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(NOTEBOOK_THREADS)


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's work units: the notebook group as one unit, sent first (it is first in the
    collection), every other test a unit of its own. (Its ``xdist_group`` marks do not group under
    pytest 9.2, which keeps a node's id where pytest-xdist 3.8 no longer writes it.)"""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class NotebooksTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "notebook group" if in_notebook_group(nodeid) else nodeid

    return NotebooksTogether(config, log)


def pytest_configure(config):
    # the chapter notebooks' kernels inherit this: each appends the runs it asks for to a fresh folder
    config.record_dir = tempfile.mkdtemp(prefix="robustq-record-")
    os.environ[experiments.RECORD_ENV] = config.record_dir
    config.addinivalue_line("markers", "after_notebooks: runs after the notebooks of the same session")


def pytest_unconfigure(config):
    shutil.rmtree(getattr(config, "record_dir", ""), ignore_errors=True)
