import json

import pytest
import torch

from robustq import experiments
from robustq.experiments import PROFILES, Experiment, resolve_profile, run

TINY = dict(dataset="synthetic", epochs=1, batch_size=128)


def test_profile_fills_missing_fields_and_explicit_fields_win():
    smoke = Experiment(profile="smoke").resolved()
    assert (smoke.epochs, smoke.train_size, smoke.batch_size) == (1, PROFILES["smoke"]["train_size"], 128)
    assert Experiment(profile="smoke", epochs=3).resolved().epochs == 3
    assert Experiment(profile="book").resolved().train_size is None


def test_profile_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("ROBUSTQ_PROFILE", "paper")
    assert resolve_profile(None) == "paper" and Experiment().resolved().profile == "paper"
    monkeypatch.delenv("ROBUSTQ_PROFILE")
    assert resolve_profile(None) == "book"


def test_unknown_profile_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown profile 'fast'.*smoke, book, paper"):
        Experiment(profile="fast").resolved()


@pytest.mark.parametrize(
    "kwargs, match",
    [({"method": "magic"}, "unknown method 'magic'"), ({"model": "vgg"}, "unknown model 'vgg'"),
     ({"dataset": "mnist"}, "unknown dataset 'mnist'"), ({"method": "kure", "method_params": {"lam": -1.0}}, "lam"),
     ({"method": "qat_ste", "method_params": {"bit_width": 1}}, "bit_width")],
)
def test_bad_experiments_are_rejected_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Experiment(**kwargs)


def test_key_depends_on_the_resolved_config_only():
    base = Experiment(profile="smoke")
    assert base.key() == Experiment(profile="smoke", epochs=1).key()  # the profile's own value
    assert base.key() != Experiment(profile="smoke", seed=1).key()
    assert base.key() != Experiment(profile="smoke", method="symreg").key()
    assert Experiment(method="symreg").key() != Experiment(method="symreg", method_params={"lam": 0.5}).key()
    assert Experiment(method="symreg").key() == Experiment(method="symreg", method_params={"lam": 1.0}).key()


def test_cache_hit_returns_the_same_metrics_without_training(monkeypatch, isolated_cache):
    first = run(Experiment(**TINY), progress=False)
    assert not first.cached and 0 <= first.test_acc <= 1

    def no_training(*args, **kwargs):
        raise AssertionError("a cached experiment must not train")

    monkeypatch.setattr(experiments, "train", no_training)
    second = run(Experiment(**TINY), progress=False)
    assert second.cached and second.metrics == first.metrics
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
    assert not list(isolated_cache.rglob("*.tmp")) and not list(isolated_cache.rglob("checkpoint.pt"))


@pytest.mark.parametrize("damage", ["model.pt", "result.json"])
def test_corrupt_cache_entry_is_reported_and_retrained(damage, isolated_cache, capsys):
    first = run(Experiment(**TINY), progress=False)
    (isolated_cache / first.experiment.key() / damage).write_bytes(b"\x00garbage")
    second = run(Experiment(**TINY), progress=False)
    assert "corrupt cache entry" in capsys.readouterr().out
    assert not second.cached and second.metrics["test_acc"] == first.metrics["test_acc"]


def test_result_json_holds_config_metrics_and_history(isolated_cache):
    result = run(Experiment(method="satnl", **TINY), progress=False)
    record = json.loads((isolated_cache / result.experiment.key() / "result.json").read_text())
    assert record["config"]["method_params"]["form"] == "scaled_tanh"
    assert record["metrics"]["test_acc"] == result.test_acc and len(record["history"]) == 1
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in result.model.modules())
