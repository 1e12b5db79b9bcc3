"""Datasets held as uint8 tensors in memory, and a fast vectorised batch loader.

The registry (:data:`DATASETS`) has three datasets:

* ``"fashion-mnist"`` (Xiao et al. 2017, arXiv 1708.07747), read by
  ``torchvision.datasets.FashionMNIST`` from a copy of the four IDX files that
  :func:`prepare_fashion_mnist` gunzips into the experiment cache, from the ``.gz`` files of the
  Debian package ``dataset-fashion-mnist``, of a folder named by ``ROBUSTQ_DATA``, or, where
  neither exists (macOS, Colab), fetched by torchvision's own download path
  (:func:`download_fashion_mnist`);
* ``"cifar10"`` (Krizhevsky 2009, "Learning Multiple Layers of Features from Tiny Images"), read by
  ``torchvision.datasets.CIFAR10`` from the Python version, ``cifar-10-batches-py/``, whose MD5
  sums torchvision checks on every load;
* ``"synthetic"``, class templates plus noise, for tests that must run in seconds.

Files are read once per process; ``load_dataset`` then takes seeded subsets by indexing.
``BatchLoader`` keeps the uint8 images on the device and does crop, flip and normalisation on
whole batches, so an epoch of Fashion-MNIST costs a fraction of a second.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import shutil
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from robustq.files import write_atomic
from robustq.params import check_choice, check_int


class _Spec(NamedTuple):
    """What a model and the loader need to know about a dataset before reading it; training
    augmentation is a random crop of the image zero-padded by ``crop_padding`` and, with ``flip``,
    a random horizontal flip."""

    num_classes: int
    image_size: int
    crop_padding: int
    flip: bool


DATASETS: dict[str, _Spec] = {
    "fashion-mnist": _Spec(num_classes=10, image_size=28, crop_padding=2, flip=True),
    "cifar10": _Spec(num_classes=10, image_size=32, crop_padding=4, flip=True),
    "synthetic": _Spec(num_classes=10, image_size=16, crop_padding=0, flip=False),
}
DATASET_NAMES = tuple(DATASETS)

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

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

SYNTHETIC_TRAIN_SIZE = 2048
SYNTHETIC_TEST_SIZE = 512
SYNTHETIC_IMAGE_SIZE = DATASETS["synthetic"].image_size
SYNTHETIC_NUM_CLASSES = DATASETS["synthetic"].num_classes
SYNTHETIC_SEED = 1234  # fixed: the synthetic data is a dataset, not a per-run draw
SYNTHETIC_TEMPLATE_GRID = 4  # templates are 4x4 random grids, upsampled: smooth, distinct blobs
SYNTHETIC_NOISE_STD = 0.2


# =============================================================================================
# Containers
# =============================================================================================


@dataclass(frozen=True, eq=False)
class Split:
    """A split held in memory: ``images`` uint8 ``[N, C, H, W]``, ``labels`` int64 ``[N]``.

    The tensors may be shared with the per-process parse cache: treat them as read-only.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"Split.images must be a uint8 tensor [N, C, H, W], got {self.images.dtype} "
                f"with shape {tuple(self.images.shape)}; convert with images.to(torch.uint8)"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise ValueError(
                f"Split.labels must be an int64 tensor [N], got {self.labels.dtype} with shape "
                f"{tuple(self.labels.shape)}; convert with labels.long().reshape(-1)"
            )
        if self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(
                f"Split has {self.images.shape[0]} images but {self.labels.shape[0]} labels; "
                "pass one label per image"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: torch.Tensor) -> Split:
        """The samples at ``indices`` (a copy, in the order given)."""
        return Split(self.images[indices], self.labels[indices])


@dataclass(frozen=True, eq=False)
class Dataset:
    """A dataset: splits plus what a model and loader need to know about them.

    ``mean`` and ``std`` are per channel, in [0, 1] pixel units, computed over the full official
    training split. ``crop_padding`` and ``flip`` are the training augmentation defaults.
    """

    name: str
    train: Split
    test: Split
    val: Split | None
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int
    flip: bool


# =============================================================================================
# Source files, and their parsed splits (cached per process)
# =============================================================================================


def source_files(name: str, root: str | os.PathLike | None = None) -> list[Path]:
    """The files dataset ``name`` is read from (none for ``synthetic``, which is generated): what
    the experiment cache fingerprints, so a model trained on other files is never served."""
    check_choice("dataset", name, DATASET_NAMES)
    if name == "fashion-mnist":
        folder = fashion_mnist_folder(root)
        files = [folder / file for file in FASHION_MNIST_FILES]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"Fashion-MNIST folder {folder} lacks {', '.join(missing)}; {FASHION_MNIST_INSTALL_HINT}"
            )
        return files
    if name == "cifar10":
        return _cifar10_files(cifar10_folder(root))
    return []


def _file_signature(paths: Sequence[Path]) -> tuple[tuple[str, int, int], ...]:
    """(name, size, mtime) of each file: changes when a file is replaced, so stale parses are
    never served."""
    return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in paths)


class _Parsed(NamedTuple):
    """Official splits plus the training split's per-channel statistics, cached together."""

    train: Split
    test: Split
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _parsed_from_splits(train: Split, test: Split) -> _Parsed:
    return _Parsed(train, test, *channel_mean_std(train.images))


# --- Fashion-MNIST: Debian's .gz files, gunzipped for torchvision.datasets.FashionMNIST ---------


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
    the rule of ``experiments.cache_dir``, which cannot be imported here (it imports this module)."""
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
    sources = source_files("fashion-mnist", root)
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


@lru_cache(maxsize=2)
def _fashion_mnist(folder: str, signature: tuple) -> _Parsed:
    """Official splits of the ``.gz`` files in ``folder``; cached per folder and file signature."""
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
        splits.append(Split(images.unsqueeze(1), labels))
    return _parsed_from_splits(*splits)


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


def _cifar10_files(folder: Path) -> list[Path]:
    files = [folder / CIFAR10_FOLDER / name for name in _cifar10_checksums()]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 not found: {folder / CIFAR10_FOLDER} lacks {', '.join(missing)}. Download "
            f"{CIFAR10_URL} (the Python version) and extract it in {folder}, or set {CIFAR10_ENV_VAR} "
            f"to the folder that holds {CIFAR10_FOLDER}/, or pass download=True to load_dataset"
        )
    return files


def _cifar10_parsed(root: str | os.PathLike | None, download: bool) -> _Parsed:
    folder = cifar10_folder(root)
    if download:
        from torchvision.datasets import CIFAR10

        try:  # downloads and extracts only what is missing or fails its MD5 check
            CIFAR10(folder, train=False, download=True)
        except (OSError, RuntimeError) as err:
            raise RuntimeError(
                f"could not download CIFAR-10 into {folder} ({err}); download {CIFAR10_URL} by hand "
                f"and extract it there"
            ) from err
    files = _cifar10_files(folder)
    return _cifar10(str(folder), _file_signature(files))


@lru_cache(maxsize=2)
def _cifar10(folder: str, signature: tuple) -> _Parsed:
    """Official splits of CIFAR-10 under ``folder``; cached per folder and file signature."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity

    splits = []
    for train in (True, False):
        try:
            tv_split = CIFAR10(folder, train=train, download=False)
        except RuntimeError as err:  # the files exist (_cifar10_files): an MD5 sum does not match
            base = Path(folder) / CIFAR10_FOLDER
            bad = [name for name, md5 in _cifar10_checksums().items() if not check_integrity(base / name, md5)]
            raise ValueError(
                f"{', '.join(bad) or 'a file'} in {base} failed torchvision's MD5 check: damaged, or not "
                f"from the Python version of CIFAR-10; delete {base} and extract {CIFAR10_URL} again"
            ) from err
        images = torch.from_numpy(np.ascontiguousarray(tv_split.data.transpose(0, 3, 1, 2)))  # HWC -> CHW
        splits.append(Split(images, torch.tensor(tv_split.targets, dtype=torch.int64)))
    return _parsed_from_splits(*splits)


# =============================================================================================
# Synthetic data
# =============================================================================================


def _class_templates(
    num_classes: int, in_channels: int, image_size: int, generator: torch.Generator
) -> torch.Tensor:
    """Smooth random templates in [0, 1], one per class: coarse random grids upsampled."""
    grid = SYNTHETIC_TEMPLATE_GRID
    coarse = torch.rand(num_classes, in_channels, grid, grid, generator=generator)
    return F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)


def _sample_templates(templates: torch.Tensor, count: int, generator: torch.Generator) -> Split:
    """``count`` noisy copies of the templates: balanced labels, random contrast, Gaussian noise."""
    num_classes = templates.shape[0]
    labels = torch.arange(count) % num_classes
    labels = labels[torch.randperm(count, generator=generator)]
    contrast = 0.6 + 0.4 * torch.rand(count, 1, 1, 1, generator=generator)
    noise = SYNTHETIC_NOISE_STD * torch.randn(
        count, *templates.shape[1:], generator=generator
    )
    pixels = (templates[labels] * contrast + noise).clamp(0.0, 1.0)
    return Split((pixels * 255).round().to(torch.uint8), labels)


def make_synthetic_splits(
    num_train: int = SYNTHETIC_TRAIN_SIZE,
    num_test: int = SYNTHETIC_TEST_SIZE,
    *,
    num_classes: int = SYNTHETIC_NUM_CLASSES,
    in_channels: int = 1,
    image_size: int = SYNTHETIC_IMAGE_SIZE,
    seed: int = SYNTHETIC_SEED,
) -> tuple[Split, Split]:
    """(train, test) splits of a synthetic task: fixed class templates plus noise.

    Train and test share the templates and differ in noise; a small CNN learns it to > 90 %
    in one short epoch, which is what fast tests need.
    """
    for name, value in (("num_train", num_train), ("num_test", num_test),
                        ("num_classes", num_classes), ("in_channels", in_channels),
                        ("image_size", image_size)):  # fmt: skip
        check_int(name, value, minimum=1)
    generator = torch.Generator().manual_seed(seed)
    templates = _class_templates(num_classes, in_channels, image_size, generator)
    train = _sample_templates(templates, num_train, generator)
    test = _sample_templates(templates, num_test, generator)
    return train, test


# =============================================================================================
# load_dataset
# =============================================================================================


def channel_mean_std(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images ``[N, C, H, W]``, in [0, 1] units.

    Computed exactly from a 256-bin histogram per channel: no float copy of the images.
    """
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for channel in range(images.shape[1]):
        counts = torch.bincount(images[:, channel].reshape(-1), minlength=256).double()
        total = counts.sum()
        mean = (counts * values).sum() / total
        variance = (counts * (values - mean) ** 2).sum() / total
        means.append(float(mean))
        stds.append(float(variance.sqrt()))
    return tuple(means), tuple(stds)


def _holdout_indices(
    pool_size: int, train_size: int | None, val_size: int, seed: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Seeded (train, val) index sets of the official training split; None means "all / none".

    Validation takes the first ``val_size`` of a seeded permutation and training the next
    ``train_size``, so for one seed smaller training subsets are nested in larger ones.
    """
    check_int("val_size", val_size, example=5000)
    if val_size >= pool_size:
        raise ValueError(
            f"val_size={val_size} leaves no training data: the training split has {pool_size} "
            f"samples; pass val_size < {pool_size}"
        )
    available = pool_size - val_size
    if train_size is not None:
        check_int("train_size", train_size, minimum=1, example=1000)
        if train_size > available:
            raise ValueError(
                f"train_size={train_size} is larger than the {available} training samples "
                f"available ({pool_size} minus val_size={val_size}); pass train_size <= "
                f"{available} or None for all"
            )
    if train_size in (None, available) and val_size == 0:
        return None, None
    order = torch.randperm(pool_size, generator=torch.Generator().manual_seed(seed))
    end = val_size + (available if train_size is None else train_size)
    val = order[:val_size].sort().values if val_size else None
    return order[val_size:end].sort().values, val


def _official_splits(name: str, root: str | os.PathLike | None, min_train: int, download: bool) -> _Parsed:
    if name == "fashion-mnist":
        if download:
            raise ValueError(
                f"fashion-mnist is not downloaded by robustq; {FASHION_MNIST_INSTALL_HINT}, "
                "then call load_dataset without download=True"
            )
        return _fashion_mnist(str(fashion_mnist_folder(root)), _file_signature(source_files(name, root)))
    if name == "cifar10":
        return _cifar10_parsed(root, download)
    # synthetic: the pool grows to fit a larger requested training set
    return _synthetic_cached(max(SYNTHETIC_TRAIN_SIZE, min_train))


@lru_cache(maxsize=4)
def _synthetic_cached(num_train: int) -> _Parsed:
    return _parsed_from_splits(*make_synthetic_splits(num_train, SYNTHETIC_TEST_SIZE))


def load_dataset(
    name: str,
    *,
    root: str | os.PathLike | None = None,
    train_size: int | None = None,
    val_size: int = 0,
    seed: int = 0,
    download: bool = False,
) -> Dataset:
    """Load ``"fashion-mnist"``, ``"cifar10"`` or ``"synthetic"`` as a :class:`Dataset`.

    ``val_size`` samples of the official training split are held out (seeded) as ``val``;
    ``train_size`` then picks a seeded random subset of the rest (None: all of it). The test split
    is always the official one. Files are read once per process, so repeated calls with other
    sizes or seeds cost only the indexing. ``download`` applies to CIFAR-10 only (torchvision
    fetches the archive and checks its MD5). For ``"synthetic"`` the training pool has 2048
    samples, or ``train_size + val_size`` if larger.
    """
    check_choice("dataset", name, DATASET_NAMES)
    min_train = (train_size if isinstance(train_size, int) else 0) + (
        val_size if isinstance(val_size, int) else 0
    )
    parsed = _official_splits(name, root, min_train, download)
    full_train = parsed.train
    train_indices, val_indices = _holdout_indices(len(full_train), train_size, val_size, seed)
    spec = DATASETS[name]
    return Dataset(
        name=name,
        train=full_train if train_indices is None else full_train.subset(train_indices),
        test=parsed.test,
        val=None if val_indices is None else full_train.subset(val_indices),
        num_classes=spec.num_classes,
        in_channels=int(full_train.images.shape[1]),
        image_size=spec.image_size,
        mean=parsed.mean,
        std=parsed.std,
        crop_padding=spec.crop_padding,
        flip=spec.flip,
    )


# =============================================================================================
# Batch loading
# =============================================================================================


def crop_batch(images: torch.Tensor, padding: int, offsets: torch.Tensor) -> torch.Tensor:
    """Zero-pad ``images [B, C, H, W]`` by ``padding`` and cut an H x W window per sample.

    ``offsets [B, 2]`` holds each window's (top, left) in the padded image, in 0..2*padding;
    (padding, padding) returns the image unchanged. Two gathers, no loop over samples.
    """
    if padding == 0:
        return images
    batch, channels, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    offsets = offsets.to(images.device)
    rows = offsets[:, :1] + torch.arange(height, device=images.device)  # [B, H]
    cols = offsets[:, 1:] + torch.arange(width, device=images.device)  # [B, W]
    row_index = rows[:, None, :, None].expand(batch, channels, height, width + 2 * padding)
    padded = padded.gather(2, row_index)
    col_index = cols[:, None, None, :].expand(batch, channels, height, width)
    return padded.gather(3, col_index)


def flip_batch(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the samples of ``images [B, C, H, W]`` where ``mask [B]`` is True."""
    return torch.where(mask.to(images.device)[:, None, None, None], images.flip(3), images)


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator whose stream depends only on (seed, epoch)."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed((int(state[0]) << 31) ^ int(state[1]))


class BatchLoader:
    """Iterate over a :class:`Split` in batches ``(x float32 [B, C, H, W], y int64 [B])``.

    ``x`` is normalised as ``(pixel / 255 - mean) / std``. The uint8 split moves to ``device``
    once; each batch is indexed, augmented in uint8 (random crop with zero padding, random
    horizontal flip; ``augment=True`` only) and normalised, all as whole-batch tensor ops.

    Shuffling and augmentation draw from a generator seeded by (``seed``, epoch), so epoch ``e``
    is the same whenever it is replayed: call ``set_epoch(e)`` before iterating to resume.
    Each ``iter()`` uses the current epoch and then advances it by one, so plain repeated
    iteration also walks through epochs 0, 1, 2, ...
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        shuffle: bool = False,
        augment: bool = False,
        crop_padding: int = 0,
        flip: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        self.batch_size = check_int("batch_size", batch_size, minimum=1, example=128)
        check_int("seed", seed)
        check_int("crop_padding", crop_padding, example=4)
        if len(split) == 0:
            raise ValueError("split is empty; pass a split with at least one sample")
        if drop_last and len(split) < batch_size:
            raise ValueError(
                f"drop_last=True with batch_size={batch_size} > {len(split)} samples yields no "
                "batch; lower batch_size or pass drop_last=False"
            )
        channels = split.images.shape[1]
        self.device = torch.device(device)
        self._scale, self._shift = _normalisation(mean, std, channels, self.device)
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.shuffle, self.augment, self.drop_last = shuffle, augment, drop_last
        self.crop_padding, self.flip, self.seed = crop_padding, flip, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration produce epoch ``epoch`` (order and augmentation)."""
        self.epoch = check_int("epoch", epoch, example=3)

    def __len__(self) -> int:
        count = len(self.labels)
        return count // self.batch_size if self.drop_last else math.ceil(count / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        return self._batches(_epoch_generator(self.seed, epoch))

    def _batches(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        count = len(self.labels)
        order = torch.randperm(count, generator=generator).to(self.device) if self.shuffle else None
        for batch in range(len(self)):
            start, stop = batch * self.batch_size, min((batch + 1) * self.batch_size, count)
            if order is None:
                images, labels = self.images[start:stop], self.labels[start:stop]
            else:
                images, labels = self.images[order[start:stop]], self.labels[order[start:stop]]
            if self.augment:
                images = self._augment(images, generator)
            yield self._normalise(images), labels

    def _augment(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch = images.shape[0]
        if self.crop_padding:
            offsets = torch.randint(0, 2 * self.crop_padding + 1, (batch, 2), generator=generator)
            images = crop_batch(images, self.crop_padding, offsets)
        if self.flip:
            images = flip_batch(images, torch.rand(batch, generator=generator) < 0.5)
        return images

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().mul_(self._scale).add_(self._shift)


def _normalisation(
    mean: Sequence[float], std: Sequence[float], channels: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with ``pixel * scale + shift == (pixel / 255 - mean) / std``."""
    if len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"mean and std need one value per channel ({channels}), got {len(mean)} and "
            f"{len(std)}; pass dataset.mean and dataset.std"
        )
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {tuple(std)}; pass dataset.std")
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, channels, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, channels, 1, 1)
    return 1.0 / (255.0 * std_t), -mean_t / std_t


def first_batch(data: Dataset, split: Split, n_images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n_images`` of ``split`` (one of ``data``'s, or a subset of one), normalised with
    ``data``'s statistics, and their labels: one fixed batch for an analysis."""
    return next(iter(BatchLoader(split, min(n_images, len(split)), mean=data.mean, std=data.std)))


def train_loader(
    dataset: Dataset, batch_size: int, *, seed: int = 0, augment: bool = True,
    drop_last: bool = False, device: str | torch.device = "cpu",
) -> BatchLoader:  # fmt: skip
    """Shuffled, augmented loader over ``dataset.train`` with the dataset's own defaults."""
    return BatchLoader(
        dataset.train, batch_size, mean=dataset.mean, std=dataset.std, shuffle=True,
        augment=augment, crop_padding=dataset.crop_padding, flip=dataset.flip, seed=seed,
        drop_last=drop_last, device=device,
    )  # fmt: skip


def eval_loader(
    dataset: Dataset, split: str = "test", batch_size: int = 1024,
    device: str | torch.device = "cpu",
) -> BatchLoader:  # fmt: skip
    """Loader over ``dataset.test`` or ``dataset.val`` in order, without augmentation."""
    splits = {"test": dataset.test, "val": dataset.val, "train": dataset.train}
    if split not in splits:
        raise ValueError(f"unknown split {split!r}; choose 'test', 'val' or 'train'")
    chosen = splits[split]
    if chosen is None:
        raise ValueError("dataset has no validation split; load it with val_size > 0")
    return BatchLoader(chosen, batch_size, mean=dataset.mean, std=dataset.std, device=device)


if __name__ == "__main__":  # `make data`: gunzip Fashion-MNIST for torchvision, or say how to get it
    try:
        print(f"Fashion-MNIST ready for torchvision in {prepare_fashion_mnist()}")
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"robustq: error: {error}") from None
