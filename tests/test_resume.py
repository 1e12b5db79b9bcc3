"""A training run killed after an epoch (SIGKILL: no cleanup) resumes through ``run()`` from its
checkpoint and ends with the weights of a run that was never interrupted: for the plain loop, SAM's
two-pass step, LSQ's trained quantizer (optimizer state of its step sizes), and gradient-l1's warm
start, whose penalty (and memory layout) begins only in the second epoch."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from robustq import experiments
from robustq.experiments import Experiment

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "baseline": {},
    "asam": {},
    "qat_lsq": {},
    "grad_l1": {"warmup_epochs": 1},
}
KILL_AFTER_FIRST_CHECKPOINT = textwrap.dedent("""
    import os, signal, sys
    from robustq import experiments, train
    save = train._save_checkpoint
    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)  # the checkpoint of epoch 1 is on disk; nothing else runs
    train._save_checkpoint = save_then_die
    experiments.run(experiments.Experiment(**eval(sys.argv[1])), progress=False)
""")


def _experiment(method: str) -> Experiment:
    return Experiment(method=method, method_params=CASES[method], dataset="synthetic", epochs=2, batch_size=128,
                      train_size=256)  # two steps an epoch: enough to carry optimizer state across the kill


@pytest.mark.parametrize("method", list(CASES))
def test_a_killed_run_resumes_through_run_to_the_uninterrupted_weights(method, tmp_path, monkeypatch):
    exp = _experiment(method)
    monkeypatch.setenv("ROBUSTQ_CACHE", str(tmp_path / "uninterrupted"))
    reference = experiments.run(exp, progress=False)

    killed_cache = tmp_path / "killed"
    fields = {name: getattr(exp, name) for name in ("method", "method_params", "dataset", "epochs", "batch_size",
                                                    "train_size")}
    env = {**os.environ, "ROBUSTQ_CACHE": str(killed_cache), "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_CHECKPOINT, repr(fields)], env=env,
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    entry = killed_cache / exp.key()
    assert (entry / "checkpoint.pt").exists() and not (entry / "result.json").exists()

    monkeypatch.setenv("ROBUSTQ_CACHE", str(killed_cache))
    resumed = experiments.run(exp, progress=False)
    assert not resumed.cached and len(resumed.history) == 2
    for name, tensor in reference.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name
    assert resumed.metrics["test_acc"] == reference.metrics["test_acc"]
    assert not (entry / "checkpoint.pt").exists()
