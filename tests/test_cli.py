import dataclasses
import json
import subprocess
import sys
import time

import pandas as pd
import pytest

from robustq import experiments, profiles
from robustq.__main__ import build_parser, main, sweep_table, validate_args
from robustq.train import NonFiniteLossError

# (command line, the argument the error must name, a piece of the fix it must give)
BAD_ARGUMENTS = [
    (["sweep", "--w-bits", "1"], "--w-bits", "2..16"),
    (["sweep", "--w-bits", "8", "17"], "--w-bits", "2..16"),
    (["sweep", "--w-bits", "four"], "--w-bits", "invalid int value"),
    (["sweep", "--rounding", "stochastic"], "--rounding", "'nearest', 'adaround'"),
    (["train", "--seed", "-1"], "--seed", ">= 0"),
    (["train", "--epochs", "0"], "--epochs", "positive int"),
    (["train", "--epochs", "1.5"], "--epochs", "invalid int value"),
    (["train", "--batch-size", "-3"], "--batch-size", "positive int"),
    (["train", "--train-size", "0"], "--train-size", "positive int"),
    (["train", "--lr", "nan"], "--lr", "finite number >= 0"),
    (["train", "--lr", "inf"], "--lr", "finite number >= 0"),
    (["train", "--lr", "-0.1"], "--lr", "finite number >= 0"),
    (["train", "--optimizer", "rmsprop"], "--optimizer", "sgd, adam"),
    (["train", "--profile", "huge"], "--profile", "smoke, book, paper"),
    (["train", "--method", "nope"], "--method", "known: baseline"),
    (["train", "--method", "kure", "--param", "lam=-1"], "--param", "finite number >= 0"),
    (["train", "--method", "kure", "--param", "foo=1"], "--param", "its hyperparameters are: lam"),
    (["train", "--param", "lam"], "--param", "NAME=VALUE"),
    (["train", "--dataset", "mnist"], "--dataset", "fashion-mnist"),
    (["train", "--model", "vgg"], "--model", "cnn"),
    (["train", "--book", "symreg_v2"], "--book", "known: baseline, symreg"),
    (["train", "--book", "kure", "--method", "symreg"], "--book", "drop --method"),
    (["train", "--book", "kure", "--param", "foo=1"], "--param", "its hyperparameters are: lam"),
]


@pytest.fixture
def nothing_runs(isolated_cache, monkeypatch):
    """An empty cache folder, and a test failure if anything loads data or trains."""

    def forbidden(*_args, **_kwargs):
        raise AssertionError("data loaded or model trained before the arguments were validated")

    for name in ("run", "dataset_for", "load_dataset", "train"):
        monkeypatch.setattr(experiments, name, forbidden)
    isolated_cache.mkdir()
    return isolated_cache


def test_help_explains_every_command(capsys):
    for command in ([], ["train"], ["sweep"]):
        with pytest.raises(SystemExit) as stop:
            main([*command, "--help"])
        assert stop.value.code == 0
    text = capsys.readouterr().out
    assert "--method" in text and "--param" in text and "--w-bits" in text


@pytest.mark.parametrize("argv, flag, fix", BAD_ARGUMENTS, ids=[" ".join(case[0]) for case in BAD_ARGUMENTS])
def test_a_bad_argument_is_rejected_at_once_in_one_line_naming_it(argv, flag, fix, nothing_runs, capsys):
    start = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - start < 1.0
    err = capsys.readouterr().err
    assert err.startswith(f"robustq: error: argument {flag}: ") and err.count("\n") == 1
    assert fix in err
    assert not any(nothing_runs.iterdir())


def test_a_bad_profile_from_the_environment_is_named(nothing_runs, monkeypatch, capsys):
    monkeypatch.setenv("ROBUSTQ_PROFILE", "huge")
    assert main(["train"]) == 2
    assert capsys.readouterr().err.startswith("robustq: error: $ROBUSTQ_PROFILE: unknown profile 'huge'")


def test_a_missing_command_is_one_line(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("robustq: error: ") and "command" in err and err.count("\n") == 1


def test_validate_args_returns_the_experiment_to_run():
    args = build_parser().parse_args(["sweep", "--method", "kure", "--param", "lam=0.5", "--w-bits", "4"])
    exp = validate_args(args)
    assert (exp.method, exp.method_params, exp.profile) == ("kure", {"lam": 0.5}, None)
    assert exp.train_config().epochs == profiles.get("smoke").epochs  # the smoke profile of conftest
    assert validate_args(build_parser().parse_args(["methods"])) is None


def test_book_trains_a_method_as_the_chapters_run_it_and_methods_book_lists_them(capsys):
    from robustq import book_settings

    args = build_parser().parse_args(["train", "--book", "wrpn", "--seed", "2", "--epochs", "1"])
    exp = validate_args(args)
    assert exp == dataclasses.replace(book_settings.experiment("wrpn", 2, None), epochs=1)
    assert main(["methods", "--book"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(book_settings.METHODS)
    assert any(line.startswith("symreg ") and "SymReg: symreg with scope='channel'; lam chosen from 0.1, 1, 10" in line
               for line in lines)


def test_a_sweep_prints_accuracies_in_percent_one_line_per_bit_width():
    frame = pd.DataFrame({"w_bits": [4, 3], "a_bits": [32, 32], "acc": [0.8712, 0.85], "fp_acc": [0.8766, 0.8766]})
    assert sweep_table(frame).splitlines() == [" w_bits  accuracy (%)  float accuracy (%)",
                                               "      4         87.12               87.66",
                                               "      3         85.00               87.66"]


def test_a_diverged_training_is_one_line_not_a_traceback(monkeypatch, capsys):
    seen = []

    def diverge(exp, **_kwargs):
        seen.append(exp)
        raise NonFiniteLossError("loss became nan at epoch 1, step 3; lower the learning rate")

    monkeypatch.setattr(experiments, "run", diverge)
    assert main(["train", "--dataset", "synthetic", "--lr", "100"]) == 2
    assert seen[0].lr == 100.0
    err = capsys.readouterr().err
    assert err == "robustq: error: loss became nan at epoch 1, step 3; lower the learning rate\n"


def test_the_entry_point_rejects_a_bad_bit_width_before_training(isolated_cache):
    isolated_cache.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "robustq", "sweep", "--dataset", "synthetic", "--w-bits", "8", "1"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("robustq: error: argument --w-bits: bit_width must be in 2..16, got 1")
    assert done.stderr.count("\n") == 1 and not any(isolated_cache.iterdir())


def test_train_prints_its_metrics_as_json():
    out = subprocess.run(
        [sys.executable, "-m", "robustq", "train", "--dataset", "synthetic", "--epochs", "1", "--no-progress"],
        check=True, capture_output=True, text=True,
    ).stdout
    metrics = json.loads(out)
    assert 0 <= metrics["test accuracy (%)"] <= 100 and metrics["cached"] is False
    assert all(len(str(value).split(".")[-1]) <= 4 for value in metrics.values() if isinstance(value, float))
