"""Datasets held as uint8 tensors in memory, and a fast vectorised batch loader.

Three datasets:

* ``"fashion-mnist"`` (Xiao et al. 2017, arXiv 1708.07747), read from the four IDX gzip files of
  the Debian package ``dataset-fashion-mnist`` or of a folder named by ``ROBUSTQ_DATA``;
* ``"cifar10"`` (Krizhevsky 2009, "Learning Multiple Layers of Features from Tiny Images"), read
  from the official *binary* distribution ``cifar-10-binary.tar.gz`` (never from the pickle one);
* ``"synthetic"``, class templates plus noise, for tests that must run in seconds.

Files are parsed once per process; ``load_dataset`` then takes seeded subsets by indexing.
``BatchLoader`` keeps the uint8 images on the device and does crop, flip and normalisation on
whole batches, so an epoch of Fashion-MNIST costs a fraction of a second.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

DATASET_NAMES = ("fashion-mnist", "cifar10", "synthetic")

# (crop_padding, flip) used for training-time augmentation of each dataset.
AUGMENTATION_DEFAULTS: dict[str, tuple[int, bool]] = {
    "fashion-mnist": (2, True),
    "cifar10": (4, True),
    "synthetic": (0, False),
}

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

# --- Fashion-MNIST (IDX files) ---------------------------------------------------------------

DATA_ENV_VAR = "ROBUSTQ_DATA"
DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
FASHION_MNIST_OFFICIAL_COUNTS = {"train": 60_000, "test": 10_000}
IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
MNIST_IMAGE_SIZE = 28
FASHION_MNIST_INSTALL_HINT = (
    "install it with `sudo apt-get install dataset-fashion-mnist` or set "
    f"{DATA_ENV_VAR} to a folder with the four IDX .gz files "
    f"({', '.join(FASHION_MNIST_FILES.values())})"
)

# --- CIFAR-10 (binary distribution) ----------------------------------------------------------

CIFAR10_ENV_VAR = "ROBUSTQ_CIFAR10"
DEFAULT_CIFAR10_DIR = Path("~/.cache/robustq/data/cifar10")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR10_ARCHIVE = "cifar-10-binary.tar.gz"
CIFAR10_ARCHIVE_FOLDER = "cifar-10-batches-bin"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST_FILES = ("test_batch.bin",)
CIFAR10_IMAGE_SIZE = 32
CIFAR10_RECORD_BYTES = 1 + 3 * CIFAR10_IMAGE_SIZE * CIFAR10_IMAGE_SIZE  # label + R, G, B planes
CIFAR10_NUM_CLASSES = 10

# --- synthetic --------------------------------------------------------------------------------

SYNTHETIC_TRAIN_SIZE = 2048
SYNTHETIC_TEST_SIZE = 512
SYNTHETIC_IMAGE_SIZE = 16
SYNTHETIC_NUM_CLASSES = 10
SYNTHETIC_SEED = 1234  # fixed: the synthetic data is a dataset, not a per-run draw
SYNTHETIC_TEMPLATE_GRID = 4  # templates are 4x4 random grids, upsampled: smooth, distinct blobs
SYNTHETIC_NOISE_STD = 0.2

_DOWNLOAD_CHUNK_BYTES = 1 << 20


class DownloadError(RuntimeError):
    """Fetching a dataset archive failed; the message says how to place the file by hand."""


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
# IDX parsing (Fashion-MNIST)
# =============================================================================================


def _read_gzip(path: Path, fix_hint: str) -> bytes:
    """Decompressed bytes of ``path``; missing or corrupt files raise errors naming the fix."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; {fix_hint}")
    try:
        return gzip.decompress(path.read_bytes())
    except EOFError as err:
        raise ValueError(
            f"{path} is truncated (the gzip stream ends early: {err}); replace it with a "
            f"complete copy, i.e. {fix_hint}"
        ) from err
    except (gzip.BadGzipFile, zlib.error) as err:
        raise ValueError(
            f"{path} is not a valid gzip file ({err}); replace it with the original .gz file, "
            f"i.e. {fix_hint}"
        ) from err


def _idx_header(data: bytes, path: Path, expected_magic: int, num_dims: int) -> list[int]:
    """The dimension sizes in an IDX header, after checking its magic number and length."""
    header_bytes = 4 * (1 + num_dims)
    if len(data) < header_bytes:
        raise ValueError(
            f"{path} is truncated: {len(data)} bytes, shorter than the {header_bytes}-byte IDX "
            f"header; replace it with a complete copy ({FASHION_MNIST_INSTALL_HINT})"
        )
    words = np.frombuffer(data, dtype=">u4", count=1 + num_dims)
    magic, dims = int(words[0]), [int(d) for d in words[1:]]
    if magic != expected_magic:
        kind = "images" if expected_magic == IDX_IMAGES_MAGIC else "labels"
        raise ValueError(
            f"{path} has IDX magic number {magic}, expected {expected_magic} (uint8 {kind}); "
            "check that the file is the right one of the four and not swapped or renamed"
        )
    expected_bytes = header_bytes + math.prod(dims)
    if len(data) != expected_bytes:
        problem = "truncated" if len(data) < expected_bytes else "longer than its header says"
        raise ValueError(
            f"{path} is {problem}: header {dims} needs {expected_bytes} bytes, file has "
            f"{len(data)}; replace it with a complete copy ({FASHION_MNIST_INSTALL_HINT})"
        )
    return dims


def read_idx_images(path: str | os.PathLike) -> np.ndarray:
    """Parse a gzipped IDX image file into a uint8 array ``[N, 28, 28]``.

    Format: big-endian int32 magic 2051, count, rows, cols, then the pixels row-major
    (LeCun et al., the MNIST database; reused by Fashion-MNIST, Xiao et al. 2017, arXiv 1708.07747).
    """
    path = Path(path)
    data = _read_gzip(path, FASHION_MNIST_INSTALL_HINT)
    count, rows, cols = _idx_header(data, path, IDX_IMAGES_MAGIC, num_dims=3)
    if (rows, cols) != (MNIST_IMAGE_SIZE, MNIST_IMAGE_SIZE):
        raise ValueError(
            f"{path} holds {rows}x{cols} images, expected {MNIST_IMAGE_SIZE}x{MNIST_IMAGE_SIZE} "
            "(Fashion-MNIST); point the loader at the Fashion-MNIST files"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(count, rows, cols)


def read_idx_labels(path: str | os.PathLike, num_classes: int = 10) -> np.ndarray:
    """Parse a gzipped IDX label file (magic 2049, count, then one byte per label) into uint8 ``[N]``."""
    path = Path(path)
    data = _read_gzip(path, FASHION_MNIST_INSTALL_HINT)
    _idx_header(data, path, IDX_LABELS_MAGIC, num_dims=1)
    labels = np.frombuffer(data, dtype=np.uint8, offset=8)
    if labels.size and int(labels.max()) >= num_classes:
        raise ValueError(
            f"{path} has label {int(labels.max())}, expected labels in 0..{num_classes - 1}; "
            "check that this is a Fashion-MNIST label file"
        )
    return labels


def fashion_mnist_folder(root: str | os.PathLike | None = None) -> Path:
    """The folder to read Fashion-MNIST from: ``root``, else ``$ROBUSTQ_DATA``, else the Debian path.

    A folder that lacks the files but has a ``fashion-mnist`` subfolder holding them resolves to
    that subfolder, so ``ROBUSTQ_DATA`` may name a general data folder.
    """
    if root is None:
        root = os.environ.get(DATA_ENV_VAR) or DEFAULT_FASHION_MNIST_DIR
    folder = Path(root).expanduser()
    if folder.exists() and not folder.is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST folder {folder} is a file, not a folder; {FASHION_MNIST_INSTALL_HINT}"
        )
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST folder {folder} does not exist; {FASHION_MNIST_INSTALL_HINT}"
        )
    subfolder = folder / "fashion-mnist"
    first_file = FASHION_MNIST_FILES["train_images"]
    if not (folder / first_file).is_file() and (subfolder / first_file).is_file():
        folder = subfolder
    return folder.resolve()


def source_files(name: str, root: str | os.PathLike | None = None) -> list[Path]:
    """The files dataset ``name`` is read from (none for ``synthetic``, which is generated): what
    the experiment cache fingerprints, so a model trained on other files is never served."""
    if name == "fashion-mnist":
        folder = fashion_mnist_folder(root)
        files = [folder / file for file in FASHION_MNIST_FILES.values()]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"Fashion-MNIST folder {folder} lacks {', '.join(missing)}; {FASHION_MNIST_INSTALL_HINT}")
        return files
    if name == "cifar10":
        return _cifar10_sources(cifar10_folder(root))
    if name == "synthetic":
        return []
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")


def _file_signature(paths: Sequence[Path]) -> tuple[tuple[str, int, int], ...]:
    """(name, size, mtime) of each existing file: changes when a file is replaced, so stale
    cache entries are never served."""
    return tuple(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in paths if p.is_file()
    )


class _Parsed(NamedTuple):
    """Official splits plus the training split's per-channel statistics, cached together."""

    train: Split
    test: Split
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _parsed_from_splits(train: Split, test: Split) -> _Parsed:
    return _Parsed(train, test, *channel_mean_std(train.images))


def _parsed_from_arrays(
    train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
    test_labels: np.ndarray,
) -> _Parsed:  # fmt: skip
    """uint8 numpy arrays (images with a channel axis) to Splits and statistics; copies once."""
    def to_split(images: np.ndarray, labels: np.ndarray) -> Split:
        return Split(torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)))

    return _parsed_from_splits(to_split(train_images, train_labels), to_split(test_images, test_labels))


@lru_cache(maxsize=2)
def _parse_fashion_mnist(folder: str, signature: tuple) -> _Parsed:
    """Parse the four IDX files of ``folder``; cached per resolved folder and file signature."""
    paths = {key: Path(folder) / name for key, name in FASHION_MNIST_FILES.items()}
    arrays = {}
    for split in ("train", "test"):
        images = read_idx_images(paths[f"{split}_images"])
        labels = read_idx_labels(paths[f"{split}_labels"])
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{paths[f'{split}_images']} has {images.shape[0]} images but "
                f"{paths[f'{split}_labels']} has {labels.shape[0]} labels, expected equal "
                "counts; the two files come from different datasets or one is damaged"
            )
        official = FASHION_MNIST_OFFICIAL_COUNTS[split]
        if Path(folder) == DEFAULT_FASHION_MNIST_DIR.resolve() and images.shape[0] != official:
            raise ValueError(
                f"{paths[f'{split}_images']} has {images.shape[0]} images, expected {official} "
                "in the Debian package; reinstall it with "
                "`sudo apt-get install --reinstall dataset-fashion-mnist`"
            )
        arrays[split] = (images[:, None], labels)
    return _parsed_from_arrays(*arrays["train"], *arrays["test"])


def _fashion_mnist_parsed(root: str | os.PathLike | None) -> _Parsed:
    folder = fashion_mnist_folder(root)
    signature = _file_signature([folder / name for name in FASHION_MNIST_FILES.values()])
    return _parse_fashion_mnist(str(folder), signature)


def load_fashion_mnist(root: str | os.PathLike | None = None) -> tuple[Split, Split]:
    """Official (train, test) splits of Fashion-MNIST (Xiao et al. 2017, arXiv 1708.07747)."""
    parsed = _fashion_mnist_parsed(root)
    return parsed.train, parsed.test


# =============================================================================================
# CIFAR-10 binary distribution
# =============================================================================================


def cifar10_folder(root: str | os.PathLike | None = None) -> Path:
    """The CIFAR-10 folder: ``root``, else ``$ROBUSTQ_CIFAR10``, else ``~/.cache/robustq/data/cifar10``."""
    if root is None:
        root = os.environ.get(CIFAR10_ENV_VAR) or DEFAULT_CIFAR10_DIR
    return Path(root).expanduser().resolve()


def parse_cifar10_records(data: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Split CIFAR-10 binary records into images uint8 ``[N, 3, 32, 32]`` and labels uint8 ``[N]``.

    Each record is 1 label byte then 3072 pixel bytes: the R, G and B planes, each 32x32
    row-major (Krizhevsky 2009, the "binary version" of CIFAR-10).
    """
    if len(data) == 0 or len(data) % CIFAR10_RECORD_BYTES:
        raise ValueError(
            f"{source} has {len(data)} bytes, expected a positive multiple of "
            f"{CIFAR10_RECORD_BYTES} (1 label byte + 3072 pixel bytes per record); the file is "
            "truncated or not from the CIFAR-10 *binary* version: re-download "
            f"{CIFAR10_ARCHIVE}"
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, CIFAR10_RECORD_BYTES)
    labels = records[:, 0]
    if int(labels.max()) >= CIFAR10_NUM_CLASSES:
        raise ValueError(
            f"{source} has label {int(labels.max())}, expected 0..{CIFAR10_NUM_CLASSES - 1}; "
            f"it is not a CIFAR-10 batch (CIFAR-100's binary format differs): re-download "
            f"{CIFAR10_ARCHIVE}"
        )
    size = CIFAR10_IMAGE_SIZE
    return records[:, 1:].reshape(-1, 3, size, size), labels


def _cifar10_bin_folder(folder: Path) -> Path | None:
    """The folder holding all six extracted ``.bin`` files, or None."""
    needed = CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES
    for candidate in (folder, folder / CIFAR10_ARCHIVE_FOLDER):
        if all((candidate / name).is_file() for name in needed):
            return candidate
    return None


def _read_cifar10_members(archive: Path, names: Sequence[str]) -> dict[str, bytes]:
    """Bytes of the named batch files, read straight from the tar.gz without extracting."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            missing = [name for name in names if name not in members]
            if missing:
                raise ValueError(
                    f"{archive} lacks {', '.join(missing)}; it is not the CIFAR-10 binary "
                    f"archive: re-download {CIFAR10_URL}"
                )
            return {name: tar.extractfile(members[name]).read() for name in names}
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(
            f"{archive} is damaged or truncated ({err}); delete it and download it again "
            f"(download_cifar10 or {CIFAR10_URL})"
        ) from err


def _cifar10_missing_error(folder: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"CIFAR-10 not found in {folder}: expected {CIFAR10_ARCHIVE} or the extracted "
        f"{', '.join(CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES)}. Pass download=True to "
        f"load_dataset (or call download_cifar10), or download {CIFAR10_URL} by hand and place "
        f"it in {folder} (or set {CIFAR10_ENV_VAR} to the folder that holds it)"
    )


def _cifar10_sources(folder: Path) -> list[Path]:
    """The files CIFAR-10 is read from: extracted .bin files if present (no decompression),
    else the archive."""
    bin_folder = _cifar10_bin_folder(folder)
    if bin_folder is not None:
        return [bin_folder / name for name in CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES]
    if (folder / CIFAR10_ARCHIVE).is_file():
        return [folder / CIFAR10_ARCHIVE]
    raise _cifar10_missing_error(folder)


@lru_cache(maxsize=2)
def _parse_cifar10(sources: tuple[str, ...], signature: tuple) -> _Parsed:
    """Parse CIFAR-10 from an archive or six .bin files; cached per resolved paths and signature."""
    names = CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES
    if len(sources) == 1:
        blobs = _read_cifar10_members(Path(sources[0]), names)
        labelled = {name: f"{sources[0]}:{name}" for name in names}
    else:
        blobs = {Path(s).name: Path(s).read_bytes() for s in sources}
        labelled = {Path(s).name: s for s in sources}
    parsed = {name: parse_cifar10_records(blobs[name], labelled[name]) for name in names}

    def concatenate(files: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return (
            np.concatenate([parsed[f][0] for f in files]),
            np.concatenate([parsed[f][1] for f in files]),
        )

    return _parsed_from_arrays(
        *concatenate(CIFAR10_TRAIN_FILES), *concatenate(CIFAR10_TEST_FILES)
    )


def load_cifar10(
    root: str | os.PathLike | None = None, *, download: bool = False
) -> tuple[Split, Split]:
    """Official (train, test) splits of CIFAR-10 from the binary distribution (Krizhevsky 2009).

    Reads the extracted ``data_batch_*.bin`` / ``test_batch.bin`` files if present, else the
    members of ``cifar-10-binary.tar.gz`` in memory. Downloads only if ``download=True``.
    """
    parsed = _cifar10_parsed(root, download)
    return parsed.train, parsed.test


def _cifar10_parsed(root: str | os.PathLike | None, download: bool) -> _Parsed:
    folder = cifar10_folder(root)
    try:
        sources = _cifar10_sources(folder)
    except FileNotFoundError:
        if not download:
            raise
        download_cifar10(folder)
        sources = _cifar10_sources(folder)
    return _parse_cifar10(tuple(str(s) for s in sources), _file_signature(sources))


def _md5_of_file(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_DOWNLOAD_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _stream_to_file(url: str, handle, timeout: float) -> str:
    """Copy the body of ``url`` into ``handle``; return its md5 hex digest."""
    digest = hashlib.md5()
    with urllib.request.urlopen(url, timeout=timeout) as response:
        for chunk in iter(lambda: response.read(_DOWNLOAD_CHUNK_BYTES), b""):
            digest.update(chunk)
            handle.write(chunk)
    return digest.hexdigest()


def download_cifar10(
    root: str | os.PathLike | None = None,
    *,
    url: str | None = None,
    md5: str | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download ``cifar-10-binary.tar.gz`` into ``root`` and return its path.

    The file is written to a temporary file in the same folder, its md5 checked, then moved into
    place with ``os.replace``, so a failed or interrupted download never leaves a partial archive.
    An archive already present with the right md5 is kept as is. Failure raises ``DownloadError``.
    ``url`` and ``md5`` default to the official ``CIFAR10_URL`` and ``CIFAR10_MD5``.
    """
    url = CIFAR10_URL if url is None else url
    md5 = CIFAR10_MD5 if md5 is None else md5
    folder = cifar10_folder(root)
    target = folder / CIFAR10_ARCHIVE
    if target.is_file() and _md5_of_file(target) == md5:
        return target
    by_hand = f"download {url} by hand and place it in {folder} as {CIFAR10_ARCHIVE}"
    folder.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=folder, prefix=".cifar10-", suffix=".part", delete=False)
    temp_path = Path(handle.name)
    try:
        with handle:
            actual_md5 = _stream_to_file(url, handle, timeout)
        if actual_md5 != md5:
            raise DownloadError(
                f"downloaded {url} has md5 {actual_md5}, expected {md5} (corrupted or changed "
                f"upstream); the partial file was removed. Try again or {by_hand}"
            )
        os.replace(temp_path, target)
    except (urllib.error.URLError, OSError) as err:
        raise DownloadError(f"could not download {url} ({err}); {by_hand}") from err
    finally:
        temp_path.unlink(missing_ok=True)
    return target


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
        _check_positive_int(name, value)
    generator = torch.Generator().manual_seed(seed)
    templates = _class_templates(num_classes, in_channels, image_size, generator)
    train = _sample_templates(templates, num_train, generator)
    test = _sample_templates(templates, num_test, generator)
    return train, test


# =============================================================================================
# load_dataset
# =============================================================================================


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}; pass e.g. {name}=1000")
    return value


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
    if isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 0:
        raise ValueError(f"val_size must be an int >= 0, got {val_size!r}; pass e.g. val_size=5000")
    if val_size >= pool_size:
        raise ValueError(
            f"val_size={val_size} leaves no training data: the training split has {pool_size} "
            f"samples; pass val_size < {pool_size}"
        )
    available = pool_size - val_size
    if train_size is not None:
        _check_positive_int("train_size", train_size)
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


def _official_splits(
    name: str, root: str | os.PathLike | None, min_train: int, download: bool
) -> tuple[_Parsed, int, int]:
    """(parsed splits, num_classes, image_size) of a named dataset."""
    if name == "fashion-mnist":
        if download:
            raise ValueError(
                f"fashion-mnist is not downloaded by robustq; {FASHION_MNIST_INSTALL_HINT}, "
                "then call load_dataset without download=True"
            )
        return _fashion_mnist_parsed(root), 10, MNIST_IMAGE_SIZE
    if name == "cifar10":
        return _cifar10_parsed(root, download), CIFAR10_NUM_CLASSES, CIFAR10_IMAGE_SIZE
    # synthetic: the pool grows to fit a larger requested training set
    parsed = _synthetic_cached(max(SYNTHETIC_TRAIN_SIZE, min_train))
    return parsed, SYNTHETIC_NUM_CLASSES, SYNTHETIC_IMAGE_SIZE


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
    is always the official one. Files are parsed once per process, so repeated calls with other
    sizes or seeds cost only the indexing. ``download`` applies to CIFAR-10 only.
    For ``"synthetic"`` the training pool has 2048 samples, or ``train_size + val_size`` if larger.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    min_train = (train_size if isinstance(train_size, int) else 0) + (
        val_size if isinstance(val_size, int) else 0
    )
    parsed, num_classes, image_size = _official_splits(name, root, min_train, download)
    full_train = parsed.train
    train_indices, val_indices = _holdout_indices(len(full_train), train_size, val_size, seed)
    crop_padding, flip = AUGMENTATION_DEFAULTS[name]
    return Dataset(
        name=name,
        train=full_train if train_indices is None else full_train.subset(train_indices),
        test=parsed.test,
        val=None if val_indices is None else full_train.subset(val_indices),
        num_classes=num_classes,
        in_channels=int(full_train.images.shape[1]),
        image_size=image_size,
        mean=parsed.mean,
        std=parsed.std,
        crop_padding=crop_padding,
        flip=flip,
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
        self.batch_size = _check_positive_int("batch_size", batch_size)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}; pass e.g. seed=0")
        if len(split) == 0:
            raise ValueError("split is empty; pass a split with at least one sample")
        if isinstance(crop_padding, bool) or not isinstance(crop_padding, int) or crop_padding < 0:
            raise ValueError(
                f"crop_padding must be an int >= 0, got {crop_padding!r}; pass e.g. crop_padding=4"
            )
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
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}; pass e.g. set_epoch(3)")
        self.epoch = epoch

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
