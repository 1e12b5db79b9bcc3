import json
import subprocess
import sys

from robustq.__main__ import main


def test_help_explains_every_command(capsys):
    for command in ([], ["train"], ["sweep"]):
        try:
            main([*command, "--help"])
        except SystemExit as stop:
            assert stop.code == 0
    text = capsys.readouterr().out
    assert "--method" in text and "--param" in text and "--w-bits" in text


def test_bad_arguments_exit_non_zero_with_one_line(capsys):
    assert main(["train", "--method", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("robustq: error: unknown method 'nope'") and "\n" not in err
    assert main(["train", "--method", "kure", "--param", "lam=-1"]) == 2


def test_train_prints_its_metrics_as_json():
    out = subprocess.run(
        [sys.executable, "-m", "robustq", "train", "--dataset", "synthetic", "--epochs", "1", "--no-progress"],
        check=True, capture_output=True, text=True,
    ).stdout
    metrics = json.loads(out)
    assert 0 <= metrics["test_acc"] <= 1 and metrics["cached"] is False
