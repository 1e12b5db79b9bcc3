"""Datasets held as uint8 tensors in memory, and a fast vectorised batch loader.

The registry (:data:`DATASETS`) has three datasets:

* ``"fashion-mnist"`` (Xiao et al. 2017, arXiv 1708.07747) and ``"cifar10"`` (Krizhevsky 2009,
  "Learning Multiple Layers of Features from Tiny Images"), read by torchvision from the files
  that :mod:`robustq.datafiles` finds, fetches and checks;
* ``"synthetic"``, class templates plus noise, for tests that must run in seconds.

Files are read once per process; ``load_dataset`` then takes seeded subsets by indexing.
``BatchLoader`` keeps the uint8 images on the device and does crop, flip and normalisation on
whole batches, so an epoch of Fashion-MNIST costs a fraction of a second.

``python -m robustq.data`` (``make data``) gunzips Fashion-MNIST for torchvision, or says how to
get it (:func:`robustq.datafiles.main`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from robustq import datafiles
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
        return datafiles.fashion_mnist_files(root)
    if name == "cifar10":
        return datafiles.cifar10_files(datafiles.cifar10_folder(root))
    return []


class _Parsed(NamedTuple):
    """Official splits plus the training split's per-channel statistics, cached together."""

    train: Split
    test: Split
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _parsed_from_splits(train: Split, test: Split) -> _Parsed:
    return _Parsed(train, test, *channel_mean_std(train.images))


@lru_cache(maxsize=2)
def _fashion_mnist(folder: str, signature: tuple) -> _Parsed:
    """Official splits of the ``.gz`` files in ``folder``; cached per folder and file signature."""
    train, test = (Split(images, labels) for images, labels in datafiles.read_fashion_mnist(folder))
    return _parsed_from_splits(train, test)


def _cifar10_parsed(root: str | os.PathLike | None, download: bool) -> _Parsed:
    folder = datafiles.cifar10_folder(root)
    if download:
        datafiles.download_cifar10(folder)
    files = datafiles.cifar10_files(folder)
    return _cifar10(str(folder), datafiles.file_signature(files))


@lru_cache(maxsize=2)
def _cifar10(folder: str, signature: tuple) -> _Parsed:
    """Official splits of CIFAR-10 under ``folder``; cached per folder and file signature."""
    train, test = (Split(images, labels) for images, labels in datafiles.read_cifar10(folder))
    return _parsed_from_splits(train, test)


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
                f"fashion-mnist is not downloaded by robustq; {datafiles.FASHION_MNIST_INSTALL_HINT}, "
                "then call load_dataset without download=True"
            )
        signature = datafiles.file_signature(source_files(name, root))
        return _fashion_mnist(str(datafiles.fashion_mnist_folder(root)), signature)
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
    chosen = splits[check_choice("split", split, tuple(splits))]
    if chosen is None:
        raise ValueError("dataset has no validation split; load it with val_size > 0")
    return BatchLoader(chosen, batch_size, mean=dataset.mean, std=dataset.std, device=device)


if __name__ == "__main__":  # `make data`
    datafiles.main()
