"""Shared fixtures: an isolated experiment cache per test and small datasets."""

import os
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


def pytest_collection_modifyitems(session, config, items):
    """Tests marked ``after_notebooks`` read what the chapter notebooks recorded: they run last,
    after ``notebooks/`` (``make test`` collects tests, robustq, then notebooks)."""
    items.sort(key=lambda item: item.get_closest_marker("after_notebooks") is not None)


def pytest_configure(config):
    # the chapter notebooks' kernels inherit this: each appends the runs it asks for to a fresh folder
    os.environ[experiments.RECORD_ENV] = tempfile.mkdtemp(prefix="robustq-record-")
    config.addinivalue_line("markers", "after_notebooks: runs after the notebooks of the same session")
