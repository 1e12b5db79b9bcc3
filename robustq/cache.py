"""What makes a cached result trustworthy: a key that covers the config, the code and the data,
verified entries, one writer per entry, and a cache folder proved usable before any work starts.

* :func:`code_fingerprint`: SHA-256 of the modules on a path (training, or quantization), parsed
  with docstrings removed, so editing a docstring or a comment keeps the cache and editing code
  does not.
* :func:`data_fingerprint`: SHA-256 of a dataset's source files, memoised by path, size and mtime.
* :func:`file_sha256`, :func:`quarantine`: entries record the hash of each file they need; one that
  fails verification is moved aside (never served, never silently deleted) with a one-line warning
  on stderr.
* :func:`entry_lock`: a per-entry ``filelock`` lock, so that of two identical runs the second waits
  and then loads the first one's result.
* :func:`ensure_usable`: the cache folder is created, proved writable with a probe file and checked
  for free space before training; stale temporary files of dead processes are removed.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import filelock

from robustq.files import write_atomic

TRAINING_MODULES = ("data", "models", "methods", "qat", "quant", "regularizers", "reparam", "sam", "satnl", "train")
EVALUATION_MODULES = ("data", "ptq", "qat", "quant", "train")  # train: its evaluate() scores every model
MIN_FREE_BYTES = 64 * 2**20  # a checkpoint and a model of the largest network, with room to spare
QUARANTINE = "quarantine"
LOCK_TIMEOUT_S = 3600.0  # a run waits at most this long for another process training the same entry


class CacheError(RuntimeError):
    """The cache folder cannot be used (not a folder, not writable, full)."""


# --- fingerprints --------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def code_fingerprint(modules: tuple[str, ...]) -> str:
    """SHA-256 of ``robustq.<module>`` sources as parsed code without docstrings (``ast.dump``):
    comments, docstrings and formatting do not change it; any change to what runs does. Computed
    once per process: every cache key and evaluation needs it."""
    digest = hashlib.sha256()
    for name in sorted(modules):
        digest.update(name.encode())
        digest.update(_module_ast(name).encode())
    return digest.hexdigest()


@lru_cache(maxsize=None)
def _module_ast(name: str) -> str:
    path = Path(importlib.import_module(f"robustq.{name}").__file__)
    return source_ast(path.read_text())


def source_ast(source: str) -> str:
    """``ast.dump`` of ``source`` with every module, class and function docstring removed."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, annotate_fields=False, include_attributes=False)


def data_fingerprint(files: Sequence[Path], memo: Path | None = None) -> str:
    """SHA-256 over the SHA-256 of each file (and its name). Each file's hash is memoised by
    ``(path, size, mtime)`` in ``memo`` (a JSON file) so a second run does not reread the data."""
    known = _read_memo(memo)
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        signature = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if signature not in known:
            known[signature] = file_sha256(path)
        digest.update(path.name.encode())
        digest.update(known[signature].encode())
    if memo is not None:
        _write_memo(memo, known)
    return digest.hexdigest()


def _read_memo(memo: Path | None) -> dict[str, str]:
    if memo is None or not memo.exists():
        return {}
    try:
        known = json.loads(memo.read_text())
        return known if isinstance(known, dict) else {}
    except ValueError:
        return {}  # a damaged memo only costs rereading the files


def _write_memo(memo: Path, known: dict[str, str]) -> None:
    try:
        write_atomic(memo, lambda tmp: tmp.write_text(json.dumps(known, indent=1, sort_keys=True)))
    except OSError:
        pass  # the memo is an optimisation; ensure_usable reports an unusable cache folder


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- entries -------------------------------------------------------------------------------------


def quarantine(entry: Path, reason: str) -> Path | None:
    """Move a failed entry aside to ``<cache>/quarantine/<name>-<time>`` and say so on stderr;
    returns the new path (``None`` if the entry could not be moved, which is also reported)."""
    target = entry.parent / QUARANTINE / f"{entry.name}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(entry, target)
    except OSError as error:
        warn(f"cache entry {entry} failed verification ({reason}) and could not be moved aside ({error}); "
             f"fix its permissions or delete it by hand")
        raise CacheError(f"cannot move the failed cache entry {entry} aside: {error}") from error
    warn(f"cache entry {entry} failed verification ({reason}); moved to {target}, retraining")
    return target


def entry_lock(entry: Path) -> filelock.FileLock:
    """The lock of one cache entry (a ``.lock`` file beside it): hold it around load-or-train."""
    return filelock.FileLock(str(entry) + ".lock", timeout=LOCK_TIMEOUT_S)


def remove_stale_temporaries(folder: Path) -> None:
    """Delete ``.<name>.<pid>.tmp`` files (``files.write_atomic``) whose process is gone."""
    if not folder.is_dir():
        return
    for tmp in folder.glob(".*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ensure_usable(root: Path, needed_bytes: int = MIN_FREE_BYTES) -> None:
    """Create ``root``, prove it writable with a probe file and check its free space, before any
    training; raise :class:`CacheError` naming the path and the fix otherwise."""
    fix = "set ROBUSTQ_CACHE to a writable folder with free space"
    if root.exists() and not root.is_dir():
        raise CacheError(f"the experiment cache {root} is a file, not a folder; {fix}")
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".probe.{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise CacheError(f"the experiment cache {root} is not writable ({error.strerror or error}); {fix}") from None
    free = shutil.disk_usage(root).free
    if free < needed_bytes:
        raise CacheError(
            f"the experiment cache {root} has {free / 2**20:.0f} MiB free, {needed_bytes / 2**20:.0f} MiB needed; {fix}"
        )


def warn(message: str) -> None:
    """One line on stderr: diagnostics never mix with a command's output on stdout."""
    print(f"robustq: {message}", file=sys.stderr, flush=True)
