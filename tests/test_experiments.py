import json

import pytest
import torch

from robustq import experiments
from robustq.experiments import Experiment, run
from robustq.profiles import PROFILES, resolve_profile

TINY = dict(dataset="synthetic", epochs=1, batch_size=128)


def test_profile_fills_missing_fields_and_explicit_fields_win():
    smoke = Experiment(profile="smoke").resolved()
    assert (smoke.epochs, smoke.train_size, smoke.batch_size) == (2, PROFILES["smoke"].train_size, 16)
    assert Experiment(profile="smoke", epochs=3).resolved().epochs == 3


def test_the_smoke_profile_learns():
    result = run(Experiment(profile="smoke"), progress=False)
    assert result.metrics["final_loss"] < 2.30  # ln(10): a model at chance
    assert Experiment(profile="paper").resolved().train_size is None


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
    [({"method": "magic"}, "method must be one of .*, got 'magic'"), ({"model": "vgg"}, "model must be one of .*, got 'vgg'"),
     ({"dataset": "mnist"}, "dataset must be one of .*, got 'mnist'"), ({"method": "kure", "method_params": {"lam": -1.0}}, "lam"),
     ({"method": "qat_ste", "method_params": {"bit_width": 1}}, "bit_width"),
     ({"keep": "best"}, "keep must be one of"),
     ({"method": "qat_ste", "keep": "best_target"}, r"validation split \(val_size > 0"),
     ({"method": "symreg", "keep": "best_target", "val_size": 100}, "'symreg' has none")],
)
def test_bad_experiments_are_rejected_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Experiment(**kwargs)


def test_key_depends_on_the_resolved_config_only():
    base = Experiment(profile="smoke")
    assert base.key() == Experiment(profile="smoke", epochs=2).key()  # the profile's own value
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
    assert "failed verification" in capsys.readouterr().err
    assert not second.cached and second.metrics["test_acc"] == first.metrics["test_acc"]


def test_result_json_holds_config_metrics_and_history(isolated_cache):
    result = run(Experiment(method="satnl", **TINY), progress=False)
    record = json.loads((isolated_cache / result.experiment.key() / "result.json").read_text())
    assert record["config"]["method_params"]["form"] == "scaled_tanh"
    assert record["metrics"]["test_acc"] == result.test_acc and len(record["history"]) == 1
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in result.model.modules())


@pytest.mark.parametrize("method", ["qat_lsq", "qat_ste", "dorefa"])
def test_quantized_acc_is_reproduced_by_bit_sweep_with_the_trained_quantizer(method):
    from robustq import ptq

    exp = Experiment(method=method, method_params={"bit_width": 3}, profile="smoke", test_size=500)
    trained = run(exp, progress=False)
    cached = run(exp, progress=False)
    assert cached.cached and cached.quantizers == trained.quantizers
    edge_bits = {d["bit_width"] for d in trained.quantizers.values()}
    assert edge_bits == {3, 8}  # the book's QAT setting: 8-bit stem and classifier
    data = experiments.dataset_for(exp)
    for result in (trained, cached):
        frame = ptq.bit_sweep(result, data, w_bits=(3,), policy=("trained",))
        assert frame.acc.item() == trained.metrics["quantized_acc"]


def test_trained_policy_needs_a_qat_result():
    from robustq import ptq

    exp = Experiment(profile="smoke", test_size=200)
    with pytest.raises(ValueError, match="QAT-trained Result"):
        ptq.bit_sweep(run(exp, progress=False), experiments.dataset_for(exp), policy=("trained",))


@pytest.mark.parametrize("kwargs, message", [
    ({"test_size": 0}, "test_size must be a positive int"),
    ({"seed": -1}, "seed must be an int >= 0"),
    ({"val_size": -5}, "val_size must be an int >= 0"),
    ({"batch_size": 5000}, "batch_size=5000 exceeds train_size=512"),
])
def test_bad_sizes_fail_before_training(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Experiment(profile="smoke", **kwargs).resolved()


def test_a_data_path_that_is_a_file_says_so(tmp_path, monkeypatch):
    from robustq import datafiles

    path = tmp_path / "fmnist"
    path.write_text("")
    with pytest.raises(FileNotFoundError, match="is a file, not a folder"):
        datafiles.fashion_mnist_folder(path)


def test_train_observed_retraces_the_cached_run_and_calls_its_hooks(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTQ_CACHE", str(tmp_path))
    exp = Experiment(dataset="synthetic", method="baseline", epochs=1, train_size=256, batch_size=64, seed=3)
    steps, epochs = [], []
    history = experiments.train_observed(
        exp, on_step_end=[lambda model, epoch, step: steps.append((epoch, step))],
        on_epoch_end=[lambda model, epoch: {"observed": float(epoch)}])
    assert steps == [(0, i) for i in range(4)] and history["observed"].tolist() == [0.0]
    cached = experiments.run(exp, progress=False)
    assert history["loss"].tolist() == cached.history["loss"].tolist()


def test_evaluation_kinds_counts_each_row_by_its_costliest_setting():
    import pandas as pd

    frame = pd.DataFrame({
        "a_bits": [32, 4, 32, 32, 32, 32],
        "policy": ["minmax", "minmax", "mse", "minmax", "minmax", "minmax"],
        "bias_correction": [False, False, False, True, False, False],
        "rounding": ["nearest", "nearest", "nearest", "nearest", "adaround", "block"],
    })
    assert experiments.evaluation_kinds(frame) == {
        "plain": 1, "activations": 1, "mse": 1, "bias_corrected": 1, "adaround": 1, "block": 1,
    }


@pytest.mark.parametrize("method", ["oscillation", "qat_ste"])
def test_best_target_keeps_the_epoch_with_the_best_validation_accuracy_at_the_target(method, isolated_cache):
    from robustq import ptq

    exp = Experiment(method=method, method_params={"bit_width": 3}, val_size=200, keep="best_target",
                     **{**TINY, "epochs": 2})
    result = run(exp, progress=False)
    history = result.history
    assert history["kept"].sum() == 1
    kept = history.loc[history["kept"], "selection_score"].item()
    assert kept == history["selection_score"].max()
    data = experiments.dataset_for(exp)
    if result.quantizers:  # a QAT model: its own quantizer at the target
        score = ptq.bit_sweep(result, experiments._scored_on(data, "val"), w_bits=(3,), policy=("trained",)).acc.item()
    else:
        score = ptq.target_accuracy(result.model, data, 3, "val")
    assert score == kept
