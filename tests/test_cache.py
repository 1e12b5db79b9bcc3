"""Faults injected into the experiment cache with real files and real processes (no mocks of the
cache): every one is caught, reported on stderr, and never served as a result."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from robustq import cache, experiments, profiles
from robustq.experiments import Experiment, run

TINY = dict(dataset="synthetic", epochs=1, batch_size=128)
ROOT = Path(__file__).resolve().parents[1]


def _entry(result) -> Path:
    return experiments.cache_dir() / result.experiment.key()


def test_a_damaged_model_file_is_moved_aside_and_retrained(isolated_cache, capsys):
    first = run(Experiment(**TINY))
    assert "epoch" not in capsys.readouterr().err  # quiet unless asked: a chapter's page shows no log
    weights = _entry(first) / "model.pt"
    blob = bytearray(weights.read_bytes())
    middle = len(blob) // 2
    blob[middle:middle + 64] = bytes(b ^ 0xFF for b in blob[middle:middle + 64])
    weights.write_bytes(bytes(blob))
    second = run(Experiment(**TINY), progress=True)
    err = capsys.readouterr().err
    assert not second.cached and "does not match the SHA-256" in err and str(_entry(first)) in err
    assert "epoch 1/1" in err  # off a terminal, progress is one line per epoch
    assert len(list((isolated_cache / cache.QUARANTINE).iterdir())) == 1
    assert run(Experiment(**TINY), progress=False).cached  # the retrained entry is whole again


@pytest.mark.parametrize("edit", [
    lambda r: r.pop("metrics"),
    lambda r: r.update(metrics={}),
    lambda r: r.update(schema=1),
    lambda r: r["files"].pop("model.pt"),
])
def test_an_incomplete_result_record_is_moved_aside_and_retrained(edit, isolated_cache, capsys):
    first = run(Experiment(**TINY), progress=False)
    path = _entry(first) / "result.json"
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))
    second = run(Experiment(**TINY), progress=False)
    assert not second.cached and "failed verification" in capsys.readouterr().err
    assert second.metrics["test_acc"] == first.metrics["test_acc"]  # same seed, same model


def test_two_identical_runs_at_once_train_once(tmp_path):
    script = textwrap.dedent("""
        import json, sys
        from robustq.experiments import Experiment, run
        result = run(Experiment(dataset="synthetic", epochs=2, batch_size=64), progress=False)
        print(json.dumps({"cached": result.cached, "acc": result.test_acc}))
    """)
    env = {**os.environ, "ROBUSTQ_CACHE": str(tmp_path / "cache"), "ROBUSTQ_PROFILE": "smoke"}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True, cwd=ROOT)
             for _ in range(2)]
    outputs = [json.loads(p.communicate(timeout=300)[0]) for p in procs]
    assert sorted(o["cached"] for o in outputs) == [False, True]
    assert outputs[0]["acc"] == outputs[1]["acc"]


HOLD_LOCK = """
import sys, time
from pathlib import Path
from robustq import cache
lock = cache.entry_lock(Path(sys.argv[1]))  # referenced: a collected lock is released
lock.acquire()
print("held", flush=True)
time.sleep(300)
"""
WAIT_FOR_LOCK = """
import json, sys, time
from pathlib import Path
import filelock
from robustq import cache
start = time.monotonic()
try:
    cache.entry_lock(Path(sys.argv[1])).acquire(timeout=float(sys.argv[2]))
except filelock.Timeout:
    print(json.dumps({"acquired": False, "waited_s": time.monotonic() - start}))
else:
    print(json.dumps({"acquired": True, "at": time.time()}))
"""


def test_the_entry_lock_holds_off_other_processes_until_its_holder_dies(tmp_path):
    entry = str(tmp_path / "0123456789abcdef")

    def python(script, *args, **popen):
        return subprocess.Popen([sys.executable, "-c", script, entry, *args], stdout=subprocess.PIPE, text=True,
                                cwd=ROOT, **popen)

    holder = python(HOLD_LOCK)
    try:
        assert holder.stdout.readline().strip() == "held"
        blocked = json.loads(python(WAIT_FOR_LOCK, "1.0").communicate(timeout=60)[0])
        assert blocked["acquired"] is False and blocked["waited_s"] >= 1.0  # really waited, then gave up
        waiter = python(WAIT_FOR_LOCK, "60")
        time.sleep(0.5)
        killed_at = time.time()
        holder.kill()  # SIGKILL: no release, no cleanup; the kernel drops the flock with the process
        got = json.loads(waiter.communicate(timeout=60)[0])
    finally:
        holder.kill()
        holder.wait()
    assert got["acquired"] is True and killed_at <= got["at"] < killed_at + 10


def test_a_cache_on_an_nfs_mount_with_local_locks_is_named(tmp_path):
    mounts = tmp_path / "mounts"
    inner = tmp_path / "shared cache"
    inner.mkdir()
    escaped = str(inner).replace(" ", "\\040")  # as /proc/self/mounts writes a space

    def table(options):
        return (f"/dev/sda1 / ext4 rw,relatime 0 0\n"
                f"server:/export {tmp_path} nfs4 rw,vers=4.2,local_lock=none,addr=10.0.0.1 0 0\n"
                f"server:/cache {escaped} nfs {options} 0 0\n")

    for options, local in [("rw,vers=3,nolock,local_lock=all", True), ("rw,vers=4.1,local_lock=flock", True),
                           ("rw,vers=4.1,local_lock=posix", False), ("rw,vers=4.1,local_lock=none", False)]:
        mounts.write_text(table(options))
        assert cache.local_lock_mount(inner / "entry", mounts) == (str(inner) if local else None), options
    assert cache.local_lock_mount(tmp_path / "elsewhere", mounts) is None  # the outer mount sends its locks
    assert cache.local_lock_mount(tmp_path, tmp_path / "no such file") is None


def test_an_unusable_cache_is_reported_before_any_training(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")

    def no_training(*args, **kwargs):
        raise AssertionError("training started before the cache was checked")

    monkeypatch.setattr(experiments, "train", no_training)
    monkeypatch.setenv("ROBUSTQ_CACHE", str(blocker))
    with pytest.raises(cache.CacheError, match="is a file, not a folder; set ROBUSTQ_CACHE"):
        run(Experiment(**TINY), progress=False)
    monkeypatch.setenv("ROBUSTQ_CACHE", str(blocker / "below"))
    with pytest.raises(cache.CacheError, match="not writable"):
        run(Experiment(**TINY), progress=False)
    monkeypatch.setenv("ROBUSTQ_CACHE", str(tmp_path / "ok"))
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(1, 1, 1024))
    with pytest.raises(cache.CacheError, match="MiB free"):
        run(Experiment(**TINY), progress=False)


def test_the_key_follows_the_data_files(tmp_path, monkeypatch):
    source = Path("/usr/share/datasets/fashion-mnist")
    copy = tmp_path / "fmnist"
    shutil.copytree(source, copy)
    monkeypatch.setenv("ROBUSTQ_DATA", str(copy))
    before = Experiment(profile="smoke").key()
    (copy / "t10k-labels-idx1-ubyte.gz").write_bytes((source / "t10k-labels-idx1-ubyte.gz").read_bytes() + b"\0")
    assert Experiment(profile="smoke").key() != before
    monkeypatch.setenv("ROBUSTQ_DATA", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="ROBUSTQ_DATA"):
        Experiment(profile="smoke").key()


def test_the_code_fingerprint_ignores_docstrings_and_comments_but_not_code():
    original = 'def f(x):\n    """Doc."""\n    return x + 1\n'
    assert cache.source_ast(original) == cache.source_ast('def f(x):\n    """Other doc."""\n    # why\n    return x + 1\n')
    assert cache.source_ast(original) != cache.source_ast('def f(x):\n    """Doc."""\n    return x + 2\n')


def test_editing_a_method_changes_the_key(monkeypatch):
    before = Experiment(**TINY).key()
    edited = cache.source_ast((ROOT / "robustq" / "methods.py").read_text().replace("lam: float = 1.0", "lam: float = 2.0", 1))
    monkeypatch.setattr(cache, "_module_ast", lambda name, real=cache._module_ast: edited if name == "methods" else real(name))
    cache.code_fingerprint.cache_clear()  # a new process would read the edited file
    try:
        assert Experiment(**TINY).key() != before
    finally:
        cache.code_fingerprint.cache_clear()


def test_stale_temporary_files_of_dead_processes_are_removed(isolated_cache):
    exp = Experiment(**TINY)
    entry = isolated_cache / exp.resolved().key()
    entry.mkdir(parents=True)
    stale = entry / ".checkpoint.pt.999999999.tmp"
    stale.write_bytes(b"half a checkpoint")
    live = entry / ".checkpoint.pt.1.tmp"  # pid 1 is alive: another process may still be writing it
    live.write_bytes(b"being written")
    run(exp, progress=False)
    assert not stale.exists() and live.exists()


def test_cli_output_stays_json_when_an_entry_is_corrupt(tmp_path):
    env = {**os.environ, "ROBUSTQ_CACHE": str(tmp_path / "cache")}
    argv = [sys.executable, "-m", "robustq", "train", "--dataset", "synthetic", "--profile", "smoke", "--epochs", "1"]
    first = json.loads(subprocess.run(argv, env=env, capture_output=True, text=True, cwd=ROOT, check=True).stdout)
    (tmp_path / "cache" / first["key"] / "model.pt").write_bytes(b"garbage")
    done = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=ROOT, check=True)
    assert json.loads(done.stdout)["cached"] is False and "failed verification" in done.stderr


def test_weights_load_only_as_tensors(isolated_cache, capsys):
    first = run(Experiment(**TINY), progress=False)
    entry = _entry(first)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"weights": Evil()}, entry / "model.pt")
    record = json.loads((entry / "result.json").read_text())
    record["files"]["model.pt"] = cache.file_sha256(entry / "model.pt")  # even with a matching hash
    (entry / "result.json").write_text(json.dumps(record))
    assert not run(Experiment(**TINY), progress=False).cached
    assert "pwned" not in capsys.readouterr().out


def test_an_entry_that_cannot_be_moved_aside_is_named_with_the_fix(isolated_cache, monkeypatch, capsys):
    first = run(Experiment(**TINY), progress=False)
    entry = _entry(first)
    (entry / "model.pt").write_bytes(b"garbage")

    def refuse(*_args):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cache.os, "replace", refuse)  # as a read-only entry would
    with pytest.raises(cache.CacheError, match="cannot move the failed cache entry"):
        run(Experiment(**TINY), progress=False)
    assert str(entry) in capsys.readouterr().err


def _robustq_modules_run_by(fn) -> set[str]:
    """The ``robustq`` modules whose functions run while ``fn()`` runs (threads included)."""
    package = str(ROOT / "robustq") + os.sep
    seen: set[str] = set()

    def record(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(package):
            seen.add(Path(frame.f_code.co_filename).stem)

    threading.setprofile(record)
    sys.setprofile(record)
    try:
        fn()
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    return seen - {"__init__", "__main__"}


def test_every_module_that_runs_while_a_model_is_trained_or_scored_is_in_its_key():
    results = []
    trained = _robustq_modules_run_by(lambda: results.append(run(Experiment(method="symreg_satnl_asam", **TINY),
                                                                  progress=False)))
    assert trained <= set(cache.TRAINING_MODULES), f"add to cache.TRAINING_MODULES: {sorted(trained - set(cache.TRAINING_MODULES))}"
    scored = _robustq_modules_run_by(lambda: experiments.sweep(results[0], w_bits=(4,)))
    keyed = set(cache.EVALUATION_MODULES) | set(cache.TRAINING_MODULES)  # an evaluation lives in its model's entry
    assert scored <= keyed, f"add to cache.EVALUATION_MODULES: {sorted(scored - keyed)}"


@pytest.mark.parametrize("module", ["experiments", "ptq"])
def test_editing_the_runner_or_the_scoring_changes_the_model_key(monkeypatch, module):
    before = Experiment(**TINY).key()
    edited = cache.source_ast((ROOT / "robustq" / f"{module}.py").read_text() + "\nEDITED = 1\n")
    monkeypatch.setattr(cache, "_module_ast", lambda name, real=cache._module_ast: edited if name == module else real(name))
    cache.code_fingerprint.cache_clear()
    try:
        assert Experiment(**TINY).key() != before
    finally:
        cache.code_fingerprint.cache_clear()


def test_an_evaluation_is_cached_beside_its_model_and_read_back_exactly(isolated_cache, monkeypatch):
    result = run(Experiment(**TINY), progress=False)
    first = experiments.sweep(result, w_bits=(4, 2), per_channel=(False, True))
    stored = list((_entry(result) / "ptq").glob("*.json"))
    assert len(stored) == 1
    monkeypatch.setattr(experiments.ptq, "bit_sweep", lambda *a, **k: pytest.fail("a cached evaluation was recomputed"))
    again = experiments.sweep(result, w_bits=(4, 2), per_channel=(False, True))
    pd.testing.assert_frame_equal(again, first, check_exact=True)
    monkeypatch.undo()
    monkeypatch.setenv("ROBUSTQ_CACHE", str(isolated_cache))
    experiments.sweep(result, w_bits=(3,))  # other settings: another entry
    assert len(list((_entry(result) / "ptq").glob("*.json"))) == 2


def test_the_sweeps_of_a_model_share_one_cached_float_pass_equal_to_a_fresh_one(isolated_cache, monkeypatch):
    result = run(Experiment(**TINY), progress=False)
    first = experiments.sweep(result, w_bits=(4,), fold=(False, True))
    data = experiments.dataset_for(result.experiment)
    fresh = experiments.ptq.bit_sweep(result, data, w_bits=(4,), fold=(False, True), calib_size=512)
    pd.testing.assert_series_equal(first.set_index("fold")["fp_acc"], fresh.set_index("fold")["fp_acc"])
    monkeypatch.setattr(experiments.ptq, "float_accuracy", lambda *a, **k: pytest.fail("a float pass was repeated"))
    again = experiments.sweep(result, w_bits=(3,), fold=(True, False))
    assert again.set_index("fold")["fp_acc"].to_dict() == first.set_index("fold")["fp_acc"].to_dict()


def test_a_learned_rounding_sweep_takes_the_profiles_steps_and_step_size(isolated_cache, monkeypatch):
    result = run(Experiment(**TINY), progress=False)
    seen = {}

    def bit_sweep(*_args, **settings):
        seen.update(settings)
        return pd.DataFrame({"w_bits": [2], "rounding": ["block"], "acc": [0.5], "fp_acc": [0.9]})

    monkeypatch.setattr(experiments.ptq, "bit_sweep", bit_sweep)
    experiments.sweep(result, w_bits=(2,), rounding=("block",))
    profile = profiles.get(result.experiment.profile)
    assert (seen["rounding_iterations"], seen["rounding_lr"]) == (profile.rounding_iterations, profile.rounding_lr)


def test_a_damaged_float_accuracy_is_named_and_recomputed(isolated_cache, capsys):
    result = run(Experiment(**TINY), progress=False)
    first = experiments.sweep(result, w_bits=(4,))
    (path,) = (_entry(result) / "float").glob("*.json")
    path.write_text("{not json")
    shutil.rmtree(_entry(result) / "ptq")
    again = experiments.sweep(result, w_bits=(4,))
    assert f"recomputing unreadable float accuracy {path}" in capsys.readouterr().err
    assert again["fp_acc"].item() == first["fp_acc"].item()
    assert json.loads(path.read_text())["fp_acc"] == first["fp_acc"].item()  # the entry is whole again


def test_every_accuracy_of_a_5000_image_split_survives_the_evaluation_cache_bit_for_bit():
    frame = pd.DataFrame({"w_bits": 4, "symmetric": True, "policy": "minmax", "acc": [k / 5000 for k in range(5001)]})
    back = experiments.evaluation_from_json(experiments.evaluation_to_json(frame))
    pd.testing.assert_frame_equal(back, frame, check_exact=True)


@pytest.mark.parametrize("damage", ["{not json", "[]", '[{"w_bits": 4}]', "[1, 2]", '{"acc": 1}'])
def test_a_damaged_evaluation_is_named_and_recomputed(isolated_cache, capsys, damage):
    result = run(Experiment(**TINY), progress=False)
    first = experiments.sweep(result, w_bits=(4,))
    (path,) = (_entry(result) / "ptq").glob("*.json")
    path.write_text(damage)
    again = experiments.sweep(result, w_bits=(4,))
    assert f"recomputing unreadable evaluation {path}" in capsys.readouterr().err
    pd.testing.assert_frame_equal(again, first, check_exact=True)
    assert json.loads(path.read_text())[0]["acc"] == first["acc"].iloc[0]  # the entry is whole again


def test_editing_the_evaluation_code_recomputes_the_evaluation(isolated_cache, monkeypatch):
    result = run(Experiment(**TINY), progress=False)
    experiments.sweep(result, w_bits=(4,))
    calls = []
    real_sweep = experiments.ptq.bit_sweep
    monkeypatch.setattr(experiments.ptq, "bit_sweep", lambda *a, **k: calls.append(1) or real_sweep(*a, **k))
    experiments.sweep(result, w_bits=(4,))
    assert calls == []  # the same code: read from the cache
    edited = cache.source_ast((ROOT / "robustq" / "ptq.py").read_text() + "\nEDITED = 1\n")
    monkeypatch.setattr(cache, "_module_ast", lambda name, real=cache._module_ast: edited if name == "ptq" else real(name))
    cache.code_fingerprint.cache_clear()
    try:
        experiments.sweep(result, w_bits=(4,))
    finally:
        cache.code_fingerprint.cache_clear()
    assert calls == [1]
