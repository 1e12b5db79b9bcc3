"""Experiments: a frozen description of one training run, and a cache keyed by its content.

``run(Experiment(...))`` trains the model, or loads it from the cache if an experiment with the same
resolved configuration (and package version) was run before, in this notebook or another. Entries
are written atomically; a corrupt entry is reported and retrained; weights load with
``weights_only=True``.

Profiles size every experiment (design.md, Profiles): ``smoke`` for tests, ``book`` for the
published book, ``paper`` for long runs. A profile fills in the fields left as ``None``; explicit
fields win.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

import robustq
from robustq import methods, models
from robustq.data import DATASET_NAMES, load_dataset
from robustq.files import write_atomic
from robustq.ptq import accuracy
from robustq.train import TrainConfig, save_atomic, train

PROFILE_ENV = "ROBUSTQ_PROFILE"
CACHE_ENV = "ROBUSTQ_CACHE"
DEFAULT_PROFILE = "book"

PROFILES: dict[str, dict[str, Any]] = {
    # every notebook in well under a minute: tiny subsets, one epoch
    "smoke": {"epochs": 1, "train_size": 2048, "test_size": 2000, "batch_size": 128, "seeds": (0,)},
    # the published book: full Fashion-MNIST, a few epochs, results meaningful
    "book": {"epochs": 5, "train_size": None, "test_size": None, "batch_size": 256, "seeds": (0,)},
    # GPU or long runs: more epochs and seeds
    "paper": {"epochs": 30, "train_size": None, "test_size": None, "batch_size": 256, "seeds": (0, 1, 2)},
}


def resolve_profile(profile: str | None = None) -> str:
    """The profile name: ``profile`` if given, else ``$ROBUSTQ_PROFILE``, else ``book``."""
    name = profile or os.environ.get(PROFILE_ENV) or DEFAULT_PROFILE
    if name not in PROFILES:
        raise ValueError(
            f"unknown profile {name!r}; known profiles: {', '.join(PROFILES)} "
            f"(set by the notebook parameter 'profile' or ${PROFILE_ENV})"
        )
    return name


def profile_settings(profile: str | None = None) -> dict[str, Any]:
    """The settings of a profile (epochs, sizes, seeds), as a new dict."""
    return dict(PROFILES[resolve_profile(profile)])


@dataclass(frozen=True)
class Experiment:
    """One training run. ``None`` fields are filled from the profile by :meth:`resolved`.

    >>> Experiment(method="symreg", method_params={"lam": 0.1}, profile="smoke").resolved().epochs
    1
    """

    dataset: str = "fashion-mnist"
    model: str = "cnn"
    method: str = "baseline"
    method_params: dict[str, Any] = field(default_factory=dict)
    epochs: int | None = None
    batch_size: int | None = None
    lr: float = 0.1
    optimizer: str = "sgd"
    schedule: str = "onecycle"
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    # Off by default: with a few epochs the cnn underfits, and crop+flip cost accuracy on
    # Fashion-MNIST (4 epochs, seed 0: 91.1% with, 92.0% without).
    augment: bool = False
    seed: int = 0
    train_size: int | None = None
    test_size: int | None = None
    val_size: int = 0
    profile: str | None = None

    def __post_init__(self) -> None:
        methods.make(self.method, **self.method_params)  # fail now on unknown names or bad values
        if self.dataset not in DATASET_NAMES:
            raise ValueError(f"unknown dataset {self.dataset!r}; known datasets: {', '.join(DATASET_NAMES)}")
        if self.model not in models.available():
            raise ValueError(f"unknown model {self.model!r}; known models: {', '.join(models.available())}")

    def __hash__(self) -> int:
        return hash(self.key())

    def resolved(self) -> Experiment:
        """A copy with the profile's settings filled in for every ``None`` field."""
        name = resolve_profile(self.profile)
        settings = PROFILES[name]
        filled = {
            key: settings[key]
            for key in ("epochs", "batch_size", "train_size", "test_size")
            if getattr(self, key) is None
        }
        return dataclasses.replace(self, profile=name, **filled)

    def config(self) -> dict[str, Any]:
        """The resolved configuration as plain JSON-able data (the profile name excluded: two
        profiles that resolve to the same settings share their cache entries)."""
        config = dataclasses.asdict(self.resolved())
        config.pop("profile")
        config["method_params"] = methods.make(self.method, **self.method_params).params()
        return config

    def key(self) -> str:
        """Content hash of the resolved configuration and the package version."""
        canonical = json.dumps({"config": self.config(), "version": robustq.__version__}, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def train_config(self) -> TrainConfig:
        r = self.resolved()
        return TrainConfig(
            epochs=r.epochs, batch_size=r.batch_size, lr=r.lr, optimizer=r.optimizer, schedule=r.schedule,
            weight_decay=r.weight_decay, label_smoothing=r.label_smoothing, augment=r.augment, seed=r.seed,
        )


@dataclass
class Result:
    experiment: Experiment
    model: nn.Module
    metrics: dict[str, float]
    history: pd.DataFrame
    cached: bool

    @property
    def test_acc(self) -> float:
        return self.metrics["test_acc"]


def cache_dir() -> Path:
    """``$ROBUSTQ_CACHE``, else ``.cache/robustq`` in the checkout, else ``~/.cache/robustq``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    checkout = Path(robustq.__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").exists():
        return checkout / ".cache" / "robustq"
    return Path.home() / ".cache" / "robustq"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(experiment: Experiment, *, progress: bool = True, device: torch.device | str | None = None) -> Result:
    """Train ``experiment``, or load it from the cache. The returned model is in eval mode, with
    plain weights (reparametrizations and QAT quantizers folded in)."""
    exp = experiment.resolved()
    entry = cache_dir() / exp.key()
    cached = _load_entry(entry, exp, device)
    if cached is not None:
        return cached
    return _train_and_store(exp, entry, progress, device)


def dataset_for(exp: Experiment):
    """The dataset of a (resolved) experiment: the profile's subsets, seeded."""
    exp = exp.resolved()
    data = load_dataset(exp.dataset, train_size=exp.train_size, val_size=exp.val_size, seed=exp.seed)
    if exp.test_size is not None:
        data = dataclasses.replace(data, test=data.test.subset(torch.arange(min(exp.test_size, len(data.test)))))
    return data


def _train_and_store(exp: Experiment, entry: Path, progress: bool, device) -> Result:
    seed_everything(exp.seed)
    data = dataset_for(exp)
    model = models.make_model(exp.model, data.in_channels, data.num_classes)
    method = methods.make(exp.method, **exp.method_params)
    model = method.prepare(model)
    outcome = train(
        model, data, exp.train_config(), method.extensions(model), checkpoint=entry / "checkpoint.pt",
        device=device, progress=progress, desc=f"{exp.method} (seed {exp.seed})",
    )
    model = method.finalize(outcome.model).eval()
    metrics = {
        "test_acc": accuracy(model, data),
        "train_time_s": outcome.wall_time_s,
        "images_per_s": outcome.images_per_s,
        "final_loss": outcome.history[-1]["loss"],
        "final_train_acc": outcome.history[-1]["train_acc"],
    }
    save_atomic(model.state_dict(), entry / "model.pt")
    record = {"config": exp.config(), "metrics": metrics, "history": outcome.history}
    write_atomic(entry / "result.json", lambda tmp: tmp.write_text(json.dumps(record, indent=1, sort_keys=True)))
    (entry / "checkpoint.pt").unlink(missing_ok=True)
    return Result(exp, model, metrics, pd.DataFrame(outcome.history), cached=False)


def _load_entry(entry: Path, exp: Experiment, device) -> Result | None:
    if not (entry / "result.json").exists():
        return None
    try:
        record = json.loads((entry / "result.json").read_text())
        state = torch.load(entry / "model.pt", map_location="cpu", weights_only=True)
        model = models.make_model(exp.model, *_data_shape(exp.dataset))
        model.load_state_dict(state)
        model.to(device or "cpu")
        if record["config"] != exp.config():
            raise ValueError("its configuration does not match the experiment")
    except Exception as error:  # any unreadable entry is retrained, never trusted
        print(f"corrupt cache entry {entry} ({type(error).__name__}: {error}); deleting it and retraining")
        shutil.rmtree(entry, ignore_errors=True)
        return None
    return Result(exp, model.eval(), record["metrics"], pd.DataFrame(record["history"]), cached=True)


def _data_shape(dataset: str) -> tuple[int, int]:
    """(in_channels, num_classes) without loading the data."""
    return {"fashion-mnist": (1, 10), "cifar10": (3, 10), "synthetic": (1, 10)}[dataset]
