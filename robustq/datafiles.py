"""The files of the datasets that are read from disk: where they are, how they are fetched, and
the checks that a damaged or foreign file fails with a message naming the fix. The in-memory
datasets built from them are :mod:`robustq.data`'s.

* Fashion-MNIST (Xiao et al. 2017, arXiv 1708.07747) is read by
  ``torchvision.datasets.FashionMNIST`` from a copy of the four IDX files that
  :func:`prepare_fashion_mnist` gunzips into the experiment cache, from the ``.gz`` files of the
  Debian package ``dataset-fashion-mnist``, of a folder named by ``ROBUSTQ_DATA``, or, where
  neither exists (macOS, Colab), fetched by torchvision's own download path
  (:func:`download_fashion_mnist`);
* CIFAR-10 (Krizhevsky 2009, "Learning Multiple Layers of Features from Tiny Images") is read by
  ``torchvision.datasets.CIFAR10`` from the Python version, ``cifar-10-batches-py/``, whose MD5
  sums torchvision checks on every load.

``python -m robustq.data`` (``make data``) runs :func:`main`: it gunzips Fashion-MNIST for
torchvision, or says how to get it.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import zlib
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch

from robustq.files import write_atomic

DATA_ENV_VAR = "ROBUSTQ_DATA"
DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
)  # fmt: skip
FASHION_MNIST_INSTALL_HINT = (
    f"install it with `sudo apt-get install dataset-fashion-mnist` or set {DATA_ENV_VAR} to a folder "
    f"with the four IDX .gz files ({', '.join(FASHION_MNIST_FILES)})"
)
CACHE_ENV_VAR = "ROBUSTQ_CACHE"  # the experiment cache (experiments.cache_dir); decompressed data goes in data/

CIFAR10_ENV_VAR = "ROBUSTQ_CIFAR10"
DEFAULT_CIFAR10_DIR = Path("~/.cache/robustq/data/cifar10")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"  # torchvision's CIFAR10.base_folder


def file_signature(paths: Sequence[Path]) -> tuple[tuple[str, int, int], ...]:
    """(name, size, mtime) of each file: changes when a file is replaced, so stale parses are
    never served."""
    return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in paths)


# --- Fashion-MNIST: Debian's .gz files, gunzipped for torchvision.datasets.FashionMNIST ---------


def fashion_mnist_files(root: str | os.PathLike | None = None) -> list[Path]:
    """The four ``.gz`` files in :func:`fashion_mnist_folder` (``root``); ``FileNotFoundError``
    naming the missing ones and the fix."""
    folder = fashion_mnist_folder(root)
    files = [folder / file for file in FASHION_MNIST_FILES]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST folder {folder} lacks {', '.join(missing)}; {FASHION_MNIST_INSTALL_HINT}"
        )
    return files


def fashion_mnist_folder(root: str | os.PathLike | None = None) -> Path:
    """The folder of the ``.gz`` files: ``root``, else ``$ROBUSTQ_DATA``, else the Debian path,
    else the folder :func:`download_fashion_mnist` fetches them into.

    A folder that lacks the files but has a ``fashion-mnist`` subfolder holding them resolves to
    that subfolder, so ``ROBUSTQ_DATA`` may name a general data folder.
    """
    if root is None:
        root = os.environ.get(DATA_ENV_VAR)
    if root is None and not (DEFAULT_FASHION_MNIST_DIR / FASHION_MNIST_FILES[0]).is_file():
        return download_fashion_mnist()
    folder = Path(root or DEFAULT_FASHION_MNIST_DIR).expanduser()
    if folder.exists() and not folder.is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST folder {folder} is a file, not a folder; {FASHION_MNIST_INSTALL_HINT}"
        )
    if not folder.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST folder {folder} does not exist; {FASHION_MNIST_INSTALL_HINT}")
    subfolder = folder / "fashion-mnist"
    if not (folder / FASHION_MNIST_FILES[0]).is_file() and (subfolder / FASHION_MNIST_FILES[0]).is_file():
        folder = subfolder
    return folder.resolve()


def download_fashion_mnist(root: str | os.PathLike | None = None) -> Path:
    """Fetch the four ``.gz`` files through torchvision's own download path
    (``FashionMNIST(download=True)``: its mirror list, and the MD5 sum of every file) into
    ``root`` (default ``$ROBUSTQ_CACHE/data/fashion-mnist/download``) and return the folder holding
    them; files already there and whole are not fetched again. If a download fails, every file
    that fails its MD5 check is deleted and named in the error, which also names the offline fixes
    (the Debian package, or ``ROBUSTQ_DATA``)."""
    from torchvision.datasets import FashionMNIST
    from torchvision.datasets.utils import check_integrity

    root = Path(root) if root is not None else _data_cache_dir() / "fashion-mnist" / "download"
    raw = root / "FashionMNIST" / "raw"
    complete = raw / ".downloaded"  # written once every file passed its check: later calls stop here
    if complete.is_file():
        return raw.resolve()
    try:
        FashionMNIST(str(root), train=False, download=True)
    except (RuntimeError, OSError) as err:
        bad = [name for name, md5 in FashionMNIST.resources
               if (raw / name).is_file() and not check_integrity(str(raw / name), md5)]
        for name in bad:
            (raw / name).unlink()
        deleted = f"; deleted {', '.join(bad)}, which failed the MD5 check" if bad else ""
        reason = " ".join(str(err).split())
        raise FileNotFoundError(
            f"Fashion-MNIST is not installed and torchvision could not download it into {raw} "
            f"({reason}){deleted}. Offline, {FASHION_MNIST_INSTALL_HINT}"
        ) from err
    write_atomic(complete, lambda tmp: tmp.write_text("torchvision's MD5 checks passed\n"))
    return raw.resolve()


def _data_cache_dir() -> Path:
    """``$ROBUSTQ_CACHE/data``, else ``data/`` in the checkout's or the home's ``.cache/robustq``:
    the rule of ``experiments.cache_dir``, which cannot be imported here (experiments imports
    :mod:`robustq.data`, which imports this module)."""
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR]) / "data"
    checkout = Path(__file__).resolve().parent.parent
    base = checkout / ".cache" if (checkout / "pyproject.toml").exists() else Path.home() / ".cache"
    return base / "robustq" / "data"


def prepare_fashion_mnist(root: str | os.PathLike | None = None) -> Path:
    """The torchvision root for the ``.gz`` files of :func:`fashion_mnist_folder` (``root``): a
    folder of the experiment cache, one per source folder, whose ``FashionMNIST/raw/`` holds the
    four files decompressed. A file missing there, or made from another version of its ``.gz`` (a
    ``.source`` stamp beside it records the path, size and mtime it came from), is gunzipped again;
    each file is written to a temporary file and renamed, so a damaged ``.gz`` or an interrupt
    leaves no half-written file."""
    sources = fashion_mnist_files(root)
    folder = sources[0].parent
    tv_root = _data_cache_dir() / "fashion-mnist" / hashlib.sha256(str(folder).encode()).hexdigest()[:16]
    raw = tv_root / "FashionMNIST" / "raw"
    for source in sources:
        target = raw / source.name.removesuffix(".gz")
        stamp = target.with_name(f"{target.name}.source")
        stat = source.stat()
        origin = f"{source} {stat.st_size} {stat.st_mtime_ns}\n"
        if target.is_file() and stamp.is_file() and stamp.read_text() == origin:
            continue
        write_atomic(target, partial(_gunzip, source))
        write_atomic(stamp, lambda tmp, text=origin: tmp.write_text(text))
    return tv_root


def _gunzip(source: Path, target: Path) -> None:
    try:
        with gzip.open(source, "rb") as compressed, open(target, "wb") as plain:
            shutil.copyfileobj(compressed, plain, 1 << 20)
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise ValueError(
            f"{source} is damaged: truncated or not a gzip file ({err}); replace it with a complete "
            f"copy: {FASHION_MNIST_INSTALL_HINT}"
        ) from err


def read_fashion_mnist(folder: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The official (train, test) splits of the ``.gz`` files in ``folder``, each as uint8 images
    ``[N, 1, 28, 28]`` and int64 labels ``[N]``, read by torchvision from the files
    :func:`prepare_fashion_mnist` gunzips; ``ValueError`` naming the fix if they are not
    Fashion-MNIST."""
    from torchvision.datasets import FashionMNIST  # importing it costs a second: only when used

    tv_root = prepare_fashion_mnist(folder)
    splits = []
    for train in (True, False):
        files = f"{'train' if train else 't10k'}-*"
        try:
            tv_split = FashionMNIST(tv_root, train=train, download=False)
        except (AssertionError, KeyError, RuntimeError, TypeError, ValueError) as err:  # bad IDX header
            detail = f"{type(err).__name__}: {err}" if str(err) else f"{type(err).__name__} on the header"
            raise ValueError(
                f"torchvision cannot read the IDX files {files} gunzipped from {folder} into {tv_root} "
                f"({detail}); the .gz files are damaged or not Fashion-MNIST: {FASHION_MNIST_INSTALL_HINT}"
            ) from err
        images, labels = tv_split.data, tv_split.targets
        top = int(labels.max()) if len(labels) else 0
        if tuple(images.shape[1:]) != (28, 28) or len(images) != len(labels) or top >= 10:
            raise ValueError(
                f"{folder}/{files}.gz hold {len(images)} images of "
                f"{tuple(images.shape[1:])} pixels and {len(labels)} labels up to {top}, expected 28x28 "
                f"images with one label in 0..9 each; the files come from different datasets or are not "
                f"Fashion-MNIST: {FASHION_MNIST_INSTALL_HINT}"
            )
        splits.append((images.unsqueeze(1), labels))
    return splits


# --- CIFAR-10: the Python version, through torchvision.datasets.CIFAR10 -----------------------


def cifar10_folder(root: str | os.PathLike | None = None) -> Path:
    """The torchvision root of CIFAR-10, the folder holding ``cifar-10-batches-py/``: ``root``,
    else ``$ROBUSTQ_CIFAR10``, else ``~/.cache/robustq/data/cifar10``; a path to
    ``cifar-10-batches-py`` itself means its parent."""
    if root is None:
        root = os.environ.get(CIFAR10_ENV_VAR) or DEFAULT_CIFAR10_DIR
    folder = Path(root).expanduser().resolve()
    return folder.parent if folder.name == CIFAR10_FOLDER else folder


def _cifar10_checksums() -> dict[str, str]:
    """File name to MD5 for the seven files torchvision reads, from its own lists."""
    from torchvision.datasets import CIFAR10

    listed = CIFAR10.train_list + CIFAR10.test_list + [[CIFAR10.meta["filename"], CIFAR10.meta["md5"]]]
    return {name: md5 for name, md5 in listed}


def cifar10_files(folder: Path) -> list[Path]:
    """The seven files of CIFAR-10 under the torchvision root ``folder``; ``FileNotFoundError``
    naming the missing ones and the fix."""
    files = [folder / CIFAR10_FOLDER / name for name in _cifar10_checksums()]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 not found: {folder / CIFAR10_FOLDER} lacks {', '.join(missing)}. Download "
            f"{CIFAR10_URL} (the Python version) and extract it in {folder}, or set {CIFAR10_ENV_VAR} "
            f"to the folder that holds {CIFAR10_FOLDER}/, or pass download=True to load_dataset"
        )
    return files


def download_cifar10(folder: Path) -> None:
    """Fetch CIFAR-10 into the torchvision root ``folder`` through torchvision (its archive's MD5
    checked); ``RuntimeError`` naming the manual fix if that fails."""
    from torchvision.datasets import CIFAR10

    try:  # downloads and extracts only what is missing or fails its MD5 check
        CIFAR10(folder, train=False, download=True)
    except (OSError, RuntimeError) as err:
        raise RuntimeError(
            f"could not download CIFAR-10 into {folder} ({err}); download {CIFAR10_URL} by hand "
            f"and extract it there"
        ) from err


def read_cifar10(folder: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The official (train, test) splits of CIFAR-10 under the torchvision root ``folder``, each as
    uint8 images ``[N, 3, 32, 32]`` and int64 labels ``[N]``; ``ValueError`` naming the fix if a
    file fails torchvision's MD5 check."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity

    splits = []
    for train in (True, False):
        try:
            tv_split = CIFAR10(folder, train=train, download=False)
        except RuntimeError as err:  # the files exist (cifar10_files): an MD5 sum does not match
            base = Path(folder) / CIFAR10_FOLDER
            bad = [name for name, md5 in _cifar10_checksums().items() if not check_integrity(base / name, md5)]
            raise ValueError(
                f"{', '.join(bad) or 'a file'} in {base} failed torchvision's MD5 check: damaged, or not "
                f"from the Python version of CIFAR-10; delete {base} and extract {CIFAR10_URL} again"
            ) from err
        images = torch.from_numpy(np.ascontiguousarray(tv_split.data.transpose(0, 3, 1, 2)))  # HWC -> CHW
        splits.append((images, torch.tensor(tv_split.targets, dtype=torch.int64)))
    return splits


def main() -> None:
    """``make data``: gunzip Fashion-MNIST for torchvision, or exit with one line saying how to get it."""
    try:
        print(f"Fashion-MNIST ready for torchvision in {prepare_fashion_mnist()}")
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"robustq: error: {error}") from None
