"""Experiments: a frozen description of one training run, and a cache keyed by its content.

``run(Experiment(...))`` trains the model, or loads it from the cache if an experiment with the same
key was run before, in this notebook or another: the resolved configuration, the package version,
the training code, the data files, the torch version and the device type (``Experiment.key``).
Entries are written atomically and locked while written; each records the SHA-256 of its weights,
and one that fails verification is moved aside and retrained (:mod:`robustq.cache`); weights load
with ``weights_only=True``.

A profile (:mod:`robustq.profiles`: ``smoke`` for tests, ``book`` for the published book, ``paper``
for long runs) fills in the fields left as ``None``; explicit fields win.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

import robustq
from robustq import cache, distributed, kernels, methods, models, profiles, ptq, qat
from robustq.data import DATASET_NAMES, load_dataset, source_files
from robustq.files import write_atomic
from robustq.params import check_choice, check_int
from robustq.ptq import accuracy
from robustq.train import TrainConfig, default_device, save_atomic, train

TEST_SUBSET_SEED = 0  # one fixed test subset for every experiment, whatever its seed
CACHE_ENV = "ROBUSTQ_CACHE"
# With $ROBUSTQ_RECORD set to a folder, every run, retrace and evaluation a process asks for is
# appended to <folder>/<chapter>.jsonl, the chapter named by $ROBUSTQ_CHAPTER (book.setup sets it):
# tests/test_manifest.py compares what each notebook asked for with its manifest entry.
RECORD_ENV = "ROBUSTQ_RECORD"
CHAPTER_ENV = "ROBUSTQ_CHAPTER"
JOBS_AT_ONCE_ENV = "ROBUSTQ_JOBS_AT_ONCE"  # training jobs sharing the CPU (robustq.grid's pool workers)


# Which epoch's model an experiment keeps: the last, or the one with the best validation accuracy at
# its method's target bit-width as it deploys (checkpoint selection, the oscillation paper's protocol).
KEEP_RULES = ("last", "best_target")


@dataclass(frozen=True)
class Experiment:
    """One training run. ``None`` fields are filled from the profile by :meth:`resolved`.

    >>> Experiment(method="symreg", method_params={"lam": 0.1}, profile="smoke").resolved().epochs
    2
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
    keep: str = "last"  # which epoch's model: the last, or the best at the target (KEEP_RULES)
    profile: str | None = None

    def __post_init__(self) -> None:
        methods.make(self.method, **self.method_params)  # fail now on unknown names or bad values
        check_choice("dataset", self.dataset, DATASET_NAMES)
        check_choice("model", self.model, models.available())
        for name, example in (("epochs", 3), ("batch_size", 64), ("train_size", 8000), ("test_size", 5000)):
            check_int(name, getattr(self, name), minimum=1, example=example, none_means="the profile's")
        check_int("val_size", self.val_size, example=1000)
        check_int("seed", self.seed)
        check_choice("keep", self.keep, KEEP_RULES)
        if self.keep == "best_target":
            _check_selectable(self.method, self.method_params, self.val_size)

    def __hash__(self) -> int:
        return hash(json.dumps(self.config(), sort_keys=True))

    def resolved(self) -> Experiment:
        """A copy with the profile's settings filled in for every ``None`` field."""
        settings = profiles.get(self.profile)
        name = settings.name
        filled = {
            key: getattr(settings, key)
            for key in ("epochs", "batch_size", "train_size", "test_size")
            if getattr(self, key) is None
        }
        resolved = dataclasses.replace(self, profile=name, **filled)
        if resolved.train_size is not None and resolved.batch_size > resolved.train_size:
            raise ValueError(
                f"batch_size={resolved.batch_size} exceeds train_size={resolved.train_size}: every epoch would "
                "be empty; lower the batch size or raise the training-set size"
            )
        return resolved

    def config(self) -> dict[str, Any]:
        """The resolved configuration as plain JSON-able data (the profile name excluded: two
        profiles that resolve to the same settings share their cache entries)."""
        config = dataclasses.asdict(self.resolved())
        config.pop("profile")
        config["method_params"] = methods.make(self.method, **self.method_params).params()
        return config

    def key(self, device: torch.device | str | None = None) -> str:
        """Content hash of everything a trained model depends on (:func:`key_material`)."""
        canonical = json.dumps(self.key_material(device), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def key_material(self, device: torch.device | str | None = None) -> dict[str, Any]:
        """The resolved configuration, the package version, a fingerprint of the training code
        (docstrings and comments excluded) and of the data files, the torch version, the device
        type and, on a CPU, the kernels' instruction set and thread count (:mod:`robustq.kernels`):
        a change to any of them trains a new model instead of serving an old one."""
        device_type = torch.device(device).type if device is not None else default_device().type
        material = {
            "config": self.config(),
            "version": robustq.__version__,
            "code": cache.code_fingerprint(cache.TRAINING_MODULES),
            "data": _data_fingerprint(self.dataset),
            "torch": torch.__version__,
            "device": device_type,
        }
        if device_type == "cpu":  # other kernels or threads round otherwise, and train other models
            material["kernels"] = {"capability": torch.backends.cpu.get_cpu_capability(),
                                   "threads": torch.get_num_threads()}
        if distributed.world_size() > 1:  # a DDP run is another computation (BN statistics per shard)
            material["world_size"] = distributed.world_size()
        return material

    def train_config(self) -> TrainConfig:
        r = self.resolved()
        return TrainConfig(
            epochs=r.epochs, batch_size=r.batch_size, lr=r.lr, optimizer=r.optimizer, schedule=r.schedule,
            weight_decay=r.weight_decay, label_smoothing=r.label_smoothing, augment=r.augment, seed=r.seed,
        )


@dataclass
class Result:
    """A trained experiment: the finalized model (plain weights), its metrics and history, and for
    QAT-type methods the description of its trained quantizers (``qat.describe_quantizers``), with
    which ``ptq.bit_sweep(result, ..., policy=("trained",))`` evaluates it as it deploys.
    ``metrics["quantized_acc"]`` is that accuracy at the training bit-width, BN unfolded."""

    experiment: Experiment
    model: nn.Module
    metrics: dict[str, float]
    history: pd.DataFrame
    cached: bool
    quantizers: dict[str, dict] = field(default_factory=dict)

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


def run(experiment: Experiment, *, progress: bool = False, device: torch.device | str | None = None) -> Result:
    """Train ``experiment``, or load it from the cache. The returned model is in eval mode, with
    plain weights (reparametrizations and QAT quantizers folded in).

    Quiet unless ``progress`` (a bar on a terminal, one line per epoch elsewhere): a chapter's page
    shows results, not training logs.

    Before any work the cache folder is proved usable (:func:`robustq.cache.ensure_usable`). The
    entry is locked while it is loaded or trained, so a second identical run waits and then loads
    the first one's result; an entry that fails verification is moved aside and retrained.

    Under torchrun the processes first join one group (:func:`robustq.distributed.init_from_env`)
    and train the experiment together; only rank 0 touches the cache entry."""
    exp = experiment.resolved()
    _record("run", exp)
    kernels.check()
    distributed.init_from_env(device or default_device())
    if distributed.world_size() > 1:
        return _run_distributed(exp, progress, device)
    root = cache_dir()
    cache.ensure_usable(root)
    entry = root / exp.key(device)
    with cache.entry_lock(entry):
        cached = _load_entry(entry, exp, device)
        if cached is not None:
            return cached
        cache.remove_stale_temporaries(entry)
        return _train_and_store(exp, entry, progress, device)


def _run_distributed(exp: Experiment, progress: bool, device) -> Result:
    """``run`` on every rank of a process group: rank 0 looks the entry up under its lock and
    tells the others; all ranks then load it or train it together, and rank 0 stores it."""
    key = exp.key(device)
    distributed.check_same(key, "experiment (its cache key)")
    entry = cache_dir() / key
    main = distributed.is_main()
    if main:
        cache.ensure_usable(cache_dir())
    with cache.entry_lock(entry) if main else contextlib.nullcontext():
        cached = _load_entry(entry, exp, device) if main else None
        if distributed.broadcast(cached is not None):
            return cached if main else _load_entry(entry, exp, device)
        if main:
            cache.remove_stale_temporaries(entry)
        result = _train_and_store(exp, entry, progress, device)
        distributed.barrier()  # the entry is complete before any rank moves on
        return result


def _record(kind: str, exp: Experiment, **details: str | int) -> None:
    folder = os.environ.get(RECORD_ENV)
    if not folder:
        return
    line = {"kind": kind, "key": exp.key(), "method": exp.method, "seed": exp.seed, **details}
    with open(Path(folder) / f"{os.environ.get(CHAPTER_ENV, 'unnamed')}.jsonl", "a") as file:
        file.write(json.dumps(line) + "\n")  # one short append per line: concurrent writers do not interleave


def dataset_for(exp: Experiment):
    """The dataset of a (resolved) experiment: the profile's training subset (seeded by the
    experiment's seed) and, with ``test_size``, one fixed test subset shared by every experiment
    and chapter (seeded by ``TEST_SUBSET_SEED``, whatever the experiment's seed), so that models
    are compared on the same images."""
    exp = exp.resolved()
    data = load_dataset(exp.dataset, train_size=exp.train_size, val_size=exp.val_size, seed=exp.seed)
    if exp.test_size is not None and exp.test_size < len(data.test):
        order = torch.randperm(len(data.test), generator=torch.Generator().manual_seed(TEST_SUBSET_SEED))
        data = dataclasses.replace(data, test=data.test.subset(order[: exp.test_size].sort().values))
    return data


def sweep(result: Result, split: str = "test", **settings: Any) -> pd.DataFrame:
    """``ptq.bit_sweep(result, <its test split>, **settings)``, cached beside the model: a chapter
    that asks for an evaluation another chapter already ran reads it instead of re-evaluating.
    ``split="val"`` scores a selection run on its validation split instead (the choices' rule).
    The calibration batch (activations, bias correction, learned rounding) has the profile's size
    unless ``calib_size`` is given, and learned rounding the profile's steps per layer and step size
    unless ``rounding_iterations`` and ``rounding_lr`` are.

    Keyed by the settings, the package version and a fingerprint of the evaluation code; an
    unreadable entry is reported on stderr and recomputed."""
    check_choice("split", split, ("test", "val"))
    profile = profiles.get(result.experiment.profile)
    if any(rounding in ptq.LEARNED_ROUNDINGS for rounding in settings.get("rounding", ())):
        settings = {"rounding_iterations": profile.rounding_iterations, "rounding_lr": profile.rounding_lr, **settings}
    settings = {"calib_size": profile.calibration_images, **settings}
    def evaluate() -> pd.DataFrame:
        data = _scored_on(dataset_for(result.experiment), split)
        return ptq.bit_sweep(result, data, fp_acc=lambda folded: float_accuracy(result, data, split, folded),
                             **settings)

    path = _evaluation_path(result, "ptq", split, {"settings": settings})
    frame = _cached(path, "evaluation", evaluate, evaluation_to_json, evaluation_from_json)
    _record("sweep", result.experiment, evaluation=path.stem, **evaluation_kinds(frame))
    return frame


def float_accuracy(result: Result, data, split: str, folded: bool) -> float:
    """:func:`robustq.ptq.float_accuracy` of a model on ``data`` (its ``split``), cached beside the
    model: every sweep of one model shares its float pass instead of repeating it."""
    return _cached(_evaluation_path(result, "float", split, {"folded": folded}), "float accuracy",
                   lambda: ptq.float_accuracy(result, data, folded),
                   lambda value: json.dumps({"fp_acc": value}), lambda text: float(json.loads(text)["fp_acc"]))


def _cached(path: Path, what: str, compute, dump, load):
    """``load`` of the file at ``path``, or ``compute()`` written there atomically by ``dump``; an
    unreadable file is reported on stderr (naming ``what`` and ``path``) and recomputed."""
    if path.exists():
        try:
            return load(path.read_text())
        except (ValueError, TypeError, KeyError) as error:
            cache.warn(f"recomputing unreadable {what} {path} ({error})")
    value = compute()
    write_atomic(path, lambda tmp: tmp.write_text(dump(value)))
    return value


def _evaluation_path(result: Result, folder: str, split: str, material: dict[str, Any]) -> Path:
    """Where an evaluation of ``result`` is cached, in ``folder`` of its entry: keyed by
    ``material``, the package version, a fingerprint of the evaluation code and (other than the test
    subset) the split."""
    material = {**material, "version": robustq.__version__,  # json writes tuples as lists
                "code": cache.code_fingerprint(cache.EVALUATION_MODULES)}
    if split != "test":
        material["split"] = split
    digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / result.experiment.key() / folder / f"{digest}.json"


def _scored_on(data, split: str):
    """``data`` with the split to score in its ``test`` place (what ``ptq.bit_sweep`` scores)."""
    if split == "test":
        return data
    if data.val is None:
        raise ValueError("split='val' needs a selection run's validation split (an Experiment with val_size > 0)")
    return dataclasses.replace(data, test=data.val)


EVALUATION_KINDS = ("plain", "activations", "mse", "bias_corrected", *ptq.LEARNED_ROUNDINGS)


def evaluation_kinds(frame: pd.DataFrame) -> dict[str, int]:
    """How many rows of an evaluation cost what (the run plan's kinds, :mod:`robustq.manifest`):
    bias-corrected (a calibration pass per layer), MSE ranges (a search over clipping ratios),
    calibrated activations, learned rounding (an optimisation per layer, or per block), or plain (a quantized
    copy and one pass over the test subset)."""
    kind = pd.Series("plain", index=frame.index)
    if "a_bits" in frame:
        kind[frame["a_bits"] < ptq.FLOAT_BITS] = "activations"
    if "policy" in frame:
        kind[frame["policy"] == "mse"] = "mse"
    if "bias_correction" in frame:
        kind[frame["bias_correction"].astype(bool)] = "bias_corrected"
    if "rounding" in frame:
        for rounding in ptq.LEARNED_ROUNDINGS:
            kind[frame["rounding"] == rounding] = rounding
    counts = kind.value_counts()
    return {name: int(counts.get(name, 0)) for name in EVALUATION_KINDS}


def evaluation_to_json(frame: pd.DataFrame) -> str:
    """An evaluation as JSON records, each float written by ``repr``: it reads back bit for bit
    (pandas' own ``to_json`` returned 1,432 of the 5,001 accuracies k/5000 one ulp off)."""
    return json.dumps(frame.to_dict(orient="records"))


def evaluation_from_json(text: str) -> pd.DataFrame:
    """The frame :func:`evaluation_to_json` wrote, exactly; ``ValueError`` if it is not one.

    >>> frame = pd.DataFrame({"w_bits": [4, 3], "acc": [4350 / 5000, 4349 / 5000]})
    >>> evaluation_from_json(evaluation_to_json(frame)).equals(frame)
    True
    """
    records = json.loads(text)
    if not isinstance(records, list) or not all(isinstance(record, dict) for record in records):
        raise ValueError("not a list of records")
    frame = pd.DataFrame.from_records(records)
    if "acc" not in frame.columns or not len(frame):
        raise ValueError("no accuracy column")
    return frame


def train_observed(exp: Experiment, on_step_end=(), on_epoch_end=(), *, progress: bool = False,
                   device: torch.device | str | None = None, purpose: str = "retrace") -> pd.DataFrame:
    """Train ``exp``'s recipe again, uncached, with measurement hooks (``train.Extensions``
    ``on_step_end`` / ``on_epoch_end``, e.g. an ``analysis.OscillationTracker``) and return its
    history. Hooks only observe: on CPU the same seed retraces the cached model's trajectory.
    ``purpose`` (``"retrace"`` or ``"timed"``) is what the run is recorded as (:data:`RECORD_ENV`)."""
    exp = exp.resolved()
    _record(purpose, exp)
    data, method, model = prepared(exp)
    extensions = dataclasses.replace(method.extensions(model), on_step_end=list(on_step_end),
                                     on_epoch_end=list(on_epoch_end))
    outcome = train(model, data, exp.train_config(), extensions, device=device, progress=progress, desc=f"{exp.method} (seed {exp.seed}, observed)")
    return pd.DataFrame(outcome.history)


def prepared(exp: Experiment):
    """``(data, method, model)`` of a resolved experiment before its first step: seeded, then the
    dataset, the initial model and the method's preparation (SatNL, QAT), always in this order, so
    the initial weights (and SatNL's bounds, drawn from them) are the same wherever it is called."""
    seed_everything(exp.seed)
    data = dataset_for(exp)
    model = models.make_model(exp.model, data.in_channels, data.num_classes)
    method = methods.make(exp.method, **exp.method_params)
    return data, method, method.prepare(model)


def _check_selectable(method: str, method_params: dict[str, Any], val_size: int) -> None:
    """``keep="best_target"`` needs a validation split and a method with a target bit-width."""
    if val_size == 0:
        raise ValueError("keep='best_target' selects the epoch on validation accuracy: give the experiment a "
                         "validation split (val_size > 0, e.g. 1000), or keep='last'")
    if "bit_width" not in methods.make(method, **method_params).params():
        raise ValueError(f"keep='best_target' scores each epoch at the method's target bit-width, and {method!r} "
                         "has none (no bit_width parameter): use keep='last'")


def _target_score(exp: Experiment, data):
    """Checkpoint selection's score (``keep="best_target"``): validation accuracy at the method's
    ``bit_width`` as the model deploys, with its own quantizer for a QAT model (as it trains),
    after post-training quantization in the primary setting for a float model."""
    bit_width = exp.config()["method_params"]["bit_width"]

    def score(model: nn.Module) -> float:
        if qat.describe_quantizers(model):
            return accuracy(model, data, "val")
        return ptq.target_accuracy(model, data, bit_width, "val")

    return score


def _train_and_store(exp: Experiment, entry: Path, progress: bool, device) -> Result:
    data, method, model = prepared(exp)
    outcome = train(
        model, data, exp.train_config(), method.extensions(model), checkpoint=entry / "checkpoint.pt",
        device=device, progress=progress, desc=f"{exp.method} (seed {exp.seed})",
        select=_target_score(exp, data) if exp.keep == "best_target" else None,
    )
    trained = outcome.model.eval()
    quantizers = qat.describe_quantizers(trained)
    own_quantizer = {"quantized_acc": accuracy(trained, data)} if quantizers else {}
    model = method.finalize(trained).eval()
    if not distributed.is_main():  # the same model on every rank; rank 0 stores it
        return Result(exp, model, {"test_acc": accuracy(model, data), **own_quantizer}, pd.DataFrame(outcome.history),
                      cached=False, quantizers=quantizers)
    metrics = {
        "test_acc": accuracy(model, data),
        **own_quantizer,
        "train_time_s": outcome.wall_time_s,
        "images_per_s": outcome.images_per_s,
        "final_loss": outcome.history[-1]["loss"],
        "final_train_acc": outcome.history[-1]["train_acc"],
        "jobs_at_once": jobs_at_once(),
    }
    save_atomic(model.state_dict(), entry / "model.pt")
    record = {
        "schema": SCHEMA_VERSION, "config": exp.config(), "metrics": metrics, "history": outcome.history,
        "quantizers": quantizers, "files": {"model.pt": cache.file_sha256(entry / "model.pt")},
        "key_material": exp.key_material(device), "world_size": distributed.world_size(),
    }
    write_atomic(entry / "result.json", lambda tmp: tmp.write_text(json.dumps(record, indent=1, sort_keys=True)))
    (entry / "checkpoint.pt").unlink(missing_ok=True)
    return Result(exp, model, metrics, pd.DataFrame(outcome.history), cached=False, quantizers=quantizers)


def jobs_at_once() -> int:
    """How many training jobs may share this machine's CPU with this one: the size of the pool it
    trains in (``$ROBUSTQ_JOBS_AT_ONCE``, set by :func:`robustq.grid.worker_pool` for its workers,
    whose others may sit idle at a phase's end), 1 otherwise. A model's ``train_time_s`` is its time
    beside them."""
    return int(os.environ.get(JOBS_AT_ONCE_ENV) or 1)


def _load_entry(entry: Path, exp: Experiment, device) -> Result | None:
    if not (entry / "result.json").exists():
        return None
    try:
        record = json.loads((entry / "result.json").read_text())
        _check_record(record, exp)
        if cache.file_sha256(entry / "model.pt") != record["files"]["model.pt"]:
            raise ValueError("model.pt does not match the SHA-256 its result.json recorded")
        state = torch.load(entry / "model.pt", map_location="cpu", weights_only=True)
        model = models.make_model(exp.model, *_data_shape(exp.dataset))
        model.load_state_dict(state)
    except Exception as error:  # any entry that fails verification is moved aside, never served
        cache.quarantine(entry, f"{type(error).__name__}: {error}")
        return None
    return Result(
        exp, model.to(device or "cpu").eval(), record["metrics"], pd.DataFrame(record["history"]), cached=True,
        quantizers=record["quantizers"],
    )


SCHEMA_VERSION = 2
_RECORD_TYPES = {"schema": int, "config": dict, "metrics": dict, "history": list, "quantizers": dict, "files": dict}
_METRICS = ("test_acc", "train_time_s", "images_per_s", "final_loss", "final_train_acc")


def _check_record(record: Any, exp: Experiment) -> None:
    """Raise ``ValueError`` unless ``record`` is a complete result of ``exp`` of this schema."""
    if not isinstance(record, dict):
        raise ValueError("result.json does not hold an object")
    for key, kind in _RECORD_TYPES.items():
        if not isinstance(record.get(key), kind):
            raise ValueError(f"result.json lacks {key!r} of type {kind.__name__}")
    if record["schema"] != SCHEMA_VERSION:
        raise ValueError(f"schema {record['schema']}, expected {SCHEMA_VERSION}")
    bad = [m for m in _METRICS if not isinstance(record["metrics"].get(m), (int, float))]
    if bad or not record["history"] or not isinstance(record["files"].get("model.pt"), str):
        raise ValueError(f"incomplete result (metrics {bad or 'ok'}, {len(record['history'])} epochs of history)")
    if record["config"] != exp.config():
        raise ValueError("its configuration does not match the experiment")


@lru_cache(maxsize=None)
def _fingerprint_of(files: tuple[tuple[str, int, int], ...], memo: str) -> str:
    return cache.data_fingerprint([Path(path) for path, _, _ in files], Path(memo))


def _data_fingerprint(dataset: str) -> str:
    """SHA-256 of the dataset's source files (``data.source_files``), memoised in the process by
    their size and mtime and on disk in the cache folder."""
    files = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in source_files(dataset))
    return _fingerprint_of(files, str(cache_dir() / "data-fingerprints.json")) if files else f"{dataset}:generated"


def _data_shape(dataset: str) -> tuple[int, int]:
    """(in_channels, num_classes) without loading the data."""
    return {"fashion-mnist": (1, 10), "cifar10": (3, 10), "synthetic": (1, 10)}[dataset]
