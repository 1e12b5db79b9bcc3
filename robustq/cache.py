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

**Many machines, one cache on NFS.** The entry lock is ``filelock.FileLock``, which is
``flock(2)`` on Linux and macOS, and it is the lock to use there. Since Linux 2.6.12 the NFS client
emulates ``flock`` with a POSIX byte-range lock over the whole file, which the server arbitrates
(NFSv4 natively, NFSv3 through the NLM protocol), so workers on different machines exclude each
other (flock(2), "NFS details"). The kernel releases it when its holder dies, however it is killed,
so a killed worker never leaves an entry locked; a machine that crashes while holding one loses it
when its NFSv4 lease expires (90 s by default) or, on NFSv3, when it reboots. An existence lock
(``filelock.SoftFileLock``, ``O_CREAT | O_EXCL``) would do worse on both counts: its marker outlives
a killed holder, and one written on another machine cannot be proved stale, so the entry would stay
locked for :data:`LOCK_TIMEOUT_S`. The mount must send locks to the server: ``nolock`` and
``local_lock=flock`` or ``all`` keep them on one machine (nfs(5)), and :func:`ensure_usable` warns
when the cache is on such a mount. Even then the cache stays correct, only not exclusive: every file
is renamed into place and every entry verified on load, so two machines can at worst train one
model twice, or leave an entry that is quarantined and retrained. An entry another machine has just
written can stay invisible for the attribute-cache time (``acdirmax``, 60 s by default) and be
trained again; ``lookupcache=positive`` avoids that (nfs(5)).
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import filelock

from robustq.files import write_atomic

# Every robustq module whose code runs while a model is trained and scored (experiments: seeding and
# the test subset; ptq: test_acc and quantized_acc are stored with the model), and while it is
# evaluated: tests/test_cache.py records the modules that run and fails if one is missing here.
TRAINING_MODULES = ("adaround", "cache", "data", "datafiles", "distributed", "experiments", "files", "kernels", "methods",
                    "models", "params", "profiles", "ptq", "qat", "quant", "regularizers", "reparam", "sam", "satnl",
                    "train")
EVALUATION_MODULES = ("adaround", "data", "datafiles", "experiments", "profiles", "ptq", "qat", "quant", "train")  # train: its evaluate() scores every model
MIN_FREE_BYTES = 64 * 2**20  # a checkpoint and a model of the largest network, with room to spare
QUARANTINE = "quarantine"
LOCK_TIMEOUT_S = 3600.0  # a run waits at most this long for another process training the same entry
MOUNTS = Path("/proc/self/mounts")
# nfs(5): with these the client keeps flock() locks to itself; `nolock` implies local_lock=all
LOCAL_LOCK_OPTIONS = frozenset({"nolock", "local_lock=flock", "local_lock=all"})


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
    """The lock of one cache entry (a ``.lock`` file beside it): hold it around load-or-train.
    ``flock`` on Unix, which an NFS client sends to the server and the kernel releases when its
    holder dies (see the module docstring)."""
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
    _warn_once_if_locks_are_local(str(root.resolve()))


def local_lock_mount(root: Path, mounts: Path = MOUNTS) -> str | None:
    """The NFS mount point holding ``root`` if that mount keeps ``flock`` locks local to this
    machine (``nolock``, ``local_lock=flock|all``), else None (also where ``mounts`` is unreadable)."""
    try:
        table = [line.split() for line in mounts.read_text().splitlines()]
    except OSError:
        return None  # not Linux: no /proc/self/mounts
    path = root.resolve()
    holding = []  # (mount point, filesystem type, options) of every mount above path
    for fields in table:
        point = Path(_unescape(fields[1])) if len(fields) >= 4 else None
        if point is not None and (point == path or point in path.parents):
            holding.append((point, fields[2], fields[3].split(",")))
    if not holding:
        return None
    point, fstype, options = max(holding, key=lambda mount: len(mount[0].parts))  # the innermost one
    local = fstype.startswith("nfs") and not LOCAL_LOCK_OPTIONS.isdisjoint(options)
    return str(point) if local else None


def _unescape(field: str) -> str:
    """A /proc/self/mounts field with its octal escapes (``\\040`` for a space) decoded."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


@lru_cache(maxsize=None)
def _warn_once_if_locks_are_local(root: str) -> None:
    point = local_lock_mount(Path(root))
    if point is not None:
        warn(f"the experiment cache {root} is on the NFS mount {point}, whose locks stay on this machine "
             "(nolock or local_lock=flock|all): workers on other machines may train the same model at once; "
             "remount it without nolock and with local_lock=none, or give each machine its own ROBUSTQ_CACHE")


def warn(message: str) -> None:
    """One line on stderr: diagnostics never mix with a command's output on stdout."""
    print(f"robustq: {message}", file=sys.stderr, flush=True)
