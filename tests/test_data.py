"""Tests of robustq.data: IDX and CIFAR-10 parsers, download, load_dataset and BatchLoader."""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from robustq import data

# ---------------------------------------------------------------------------------------------
# Helpers writing small files in the official formats
# ---------------------------------------------------------------------------------------------


def idx_images_bytes(images: np.ndarray, magic: int = data.IDX_IMAGES_MAGIC) -> bytes:
    count, rows, cols = images.shape
    return struct.pack(">4i", magic, count, rows, cols) + images.astype(np.uint8).tobytes()


def idx_labels_bytes(labels: np.ndarray, magic: int = data.IDX_LABELS_MAGIC) -> bytes:
    return struct.pack(">2i", magic, len(labels)) + labels.astype(np.uint8).tobytes()


def write_gz(path: Path, payload: bytes) -> Path:
    path.write_bytes(gzip.compress(payload))
    return path


def random_mnist(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, 28, 28), dtype=np.uint8), rng.integers(0, 10, count)


def write_fashion_mnist(folder: Path, train_count: int = 40, test_count: int = 12) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, count, seed in (("train", train_count, 1), ("test", test_count, 2)):
        images, labels = random_mnist(count, seed)
        write_gz(folder / data.FASHION_MNIST_FILES[f"{split}_images"], idx_images_bytes(images))
        write_gz(folder / data.FASHION_MNIST_FILES[f"{split}_labels"], idx_labels_bytes(labels))
        arrays[split] = (images, labels)
    return arrays


def cifar_records(count: int, seed: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, count, dtype=np.uint8)
    records = np.concatenate([labels[:, None], images.reshape(count, -1)], axis=1)
    return records.tobytes(), images, labels


def cifar_batches(per_file: int = 3) -> dict[str, tuple[bytes, np.ndarray, np.ndarray]]:
    names = data.CIFAR10_TRAIN_FILES + data.CIFAR10_TEST_FILES
    return {name: cifar_records(per_file, seed) for seed, name in enumerate(names)}


def write_cifar_archive(path: Path, batches: dict) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, (blob, _, _) in batches.items():
            info = tarfile.TarInfo(f"{data.CIFAR10_ARCHIVE_FOLDER}/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def expected_cifar(batches: dict, files: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.concatenate([batches[f][1] for f in files]),
        np.concatenate([batches[f][2] for f in files]),
    )


# ---------------------------------------------------------------------------------------------
# IDX / Fashion-MNIST
# ---------------------------------------------------------------------------------------------


def test_idx_round_trip(tmp_path: Path) -> None:
    images, labels = random_mnist(7, seed=0)
    image_path = write_gz(tmp_path / "img.gz", idx_images_bytes(images))
    label_path = write_gz(tmp_path / "lab.gz", idx_labels_bytes(labels))
    np.testing.assert_array_equal(data.read_idx_images(image_path), images)
    np.testing.assert_array_equal(data.read_idx_labels(label_path), labels)


def test_idx_wrong_magic_names_file_and_expected(tmp_path: Path) -> None:
    images, labels = random_mnist(3, seed=0)
    path = write_gz(tmp_path / "img.gz", idx_images_bytes(images, magic=data.IDX_LABELS_MAGIC))
    with pytest.raises(ValueError, match=r"img\.gz has IDX magic number 2049, expected 2051"):
        data.read_idx_images(path)
    path = write_gz(tmp_path / "lab.gz", idx_labels_bytes(labels, magic=1234))
    with pytest.raises(ValueError, match=r"lab\.gz has IDX magic number 1234, expected 2049"):
        data.read_idx_labels(path)


def test_idx_truncated_payload(tmp_path: Path) -> None:
    images, _ = random_mnist(3, seed=0)
    path = write_gz(tmp_path / "img.gz", idx_images_bytes(images)[:-100])
    with pytest.raises(ValueError, match=r"img\.gz is truncated: .* needs 2368 bytes, file has 2268"):
        data.read_idx_images(path)


def test_idx_truncated_gzip_stream(tmp_path: Path) -> None:
    images, _ = random_mnist(3, seed=0)
    path = tmp_path / "img.gz"
    path.write_bytes(gzip.compress(idx_images_bytes(images))[:-30])
    with pytest.raises(ValueError, match=r"img\.gz is truncated .*complete copy"):
        data.read_idx_images(path)


def test_idx_not_gzip(tmp_path: Path) -> None:
    path = tmp_path / "img.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="not a valid gzip file"):
        data.read_idx_images(path)


def test_idx_wrong_image_size(tmp_path: Path) -> None:
    small = np.zeros((2, 16, 16), dtype=np.uint8)
    path = write_gz(tmp_path / "img.gz", idx_images_bytes(small))
    with pytest.raises(ValueError, match="16x16 images, expected 28x28"):
        data.read_idx_images(path)


def test_idx_label_out_of_range(tmp_path: Path) -> None:
    path = write_gz(tmp_path / "lab.gz", idx_labels_bytes(np.array([1, 10])))
    with pytest.raises(ValueError, match=r"label 10, expected labels in 0\.\.9"):
        data.read_idx_labels(path)


def test_fashion_mnist_folder_round_trip(tmp_path: Path) -> None:
    arrays = write_fashion_mnist(tmp_path)
    train, test = data.load_fashion_mnist(tmp_path)
    assert train.images.shape == (40, 1, 28, 28) and test.images.shape == (12, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    np.testing.assert_array_equal(train.images[:, 0].numpy(), arrays["train"][0])
    np.testing.assert_array_equal(test.labels.numpy(), arrays["test"][1])


def test_fashion_mnist_env_var_and_subfolder(tmp_path: Path, monkeypatch) -> None:
    write_fashion_mnist(tmp_path / "fashion-mnist")
    monkeypatch.setenv(data.DATA_ENV_VAR, str(tmp_path))
    assert data.fashion_mnist_folder() == (tmp_path / "fashion-mnist").resolve()
    assert len(data.load_dataset("fashion-mnist").train) == 40


def test_fashion_mnist_count_mismatch(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path)
    _, labels = random_mnist(39, seed=5)
    write_gz(tmp_path / data.FASHION_MNIST_FILES["train_labels"], idx_labels_bytes(labels))
    with pytest.raises(ValueError, match="has 40 images but .*train-labels.* has 39 labels"):
        data.load_fashion_mnist(tmp_path)


def test_fashion_mnist_missing_file(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path)
    (tmp_path / data.FASHION_MNIST_FILES["test_labels"]).unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels.*apt-get install dataset-fashion-mnist"):
        data.load_fashion_mnist(tmp_path)


def test_fashion_mnist_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"does not exist.*apt-get install.*ROBUSTQ_DATA"):
        data.load_fashion_mnist(tmp_path / "nowhere")


def test_replaced_file_is_parsed_again(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path, train_count=40)
    assert len(data.load_fashion_mnist(tmp_path)[0]) == 40
    write_fashion_mnist(tmp_path, train_count=41)
    assert len(data.load_fashion_mnist(tmp_path)[0]) == 41


@pytest.mark.skipif(
    not (data.DEFAULT_FASHION_MNIST_DIR / data.FASHION_MNIST_FILES["train_images"]).is_file(),
    reason="Debian package dataset-fashion-mnist is not installed",
)
def test_debian_fashion_mnist() -> None:
    train, test = data.load_fashion_mnist(data.DEFAULT_FASHION_MNIST_DIR)
    assert train.images.shape == (60_000, 1, 28, 28) and len(train.labels) == 60_000
    assert test.images.shape == (10_000, 1, 28, 28) and len(test.labels) == 10_000
    assert set(train.labels.unique().tolist()) == set(range(10))
    dataset = data.load_dataset("fashion-mnist", root=data.DEFAULT_FASHION_MNIST_DIR)
    assert dataset.mean[0] == pytest.approx(0.2860, abs=1e-4)
    assert dataset.std[0] == pytest.approx(0.3530, abs=1e-4)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 binary format
# ---------------------------------------------------------------------------------------------


def test_cifar_from_archive(tmp_path: Path) -> None:
    batches = cifar_batches()
    write_cifar_archive(tmp_path / data.CIFAR10_ARCHIVE, batches)
    train, test = data.load_cifar10(tmp_path)
    train_images, train_labels = expected_cifar(batches, data.CIFAR10_TRAIN_FILES)
    assert train.images.shape == (15, 3, 32, 32) and test.images.shape == (3, 3, 32, 32)
    np.testing.assert_array_equal(train.images.numpy(), train_images)
    np.testing.assert_array_equal(train.labels.numpy(), train_labels)
    assert not (tmp_path / data.CIFAR10_ARCHIVE_FOLDER).exists()  # nothing extracted to disk


def test_cifar_record_layout_is_label_then_rgb_planes() -> None:
    record = bytes([7]) + bytes([1]) * 1024 + bytes([2]) * 1024 + bytes([3]) * 1024
    images, labels = data.parse_cifar10_records(record, "one record")
    assert labels.tolist() == [7]
    assert [int(images[0, c, 5, 9]) for c in range(3)] == [1, 2, 3]


@pytest.mark.parametrize("subfolder", ["", data.CIFAR10_ARCHIVE_FOLDER])
def test_cifar_from_extracted_bins(tmp_path: Path, subfolder: str) -> None:
    batches = cifar_batches()
    (tmp_path / subfolder).mkdir(exist_ok=True)
    for name, (blob, _, _) in batches.items():
        (tmp_path / subfolder / name).write_bytes(blob)
    train, test = data.load_cifar10(tmp_path)
    test_images, test_labels = expected_cifar(batches, data.CIFAR10_TEST_FILES)
    np.testing.assert_array_equal(test.images.numpy(), test_images)
    np.testing.assert_array_equal(test.labels.numpy(), test_labels)
    dataset = data.load_dataset("cifar10", root=tmp_path)
    assert (dataset.in_channels, dataset.image_size, dataset.num_classes) == (3, 32, 10)
    assert (dataset.crop_padding, dataset.flip) == (4, True)


def test_cifar_bad_length(tmp_path: Path) -> None:
    batches = cifar_batches()
    blob, images, labels = batches["data_batch_3.bin"]
    batches["data_batch_3.bin"] = (blob[:-5], images, labels)
    write_cifar_archive(tmp_path / data.CIFAR10_ARCHIVE, batches)
    message = r"data_batch_3\.bin has 9214 bytes, expected a positive multiple of 3073"
    with pytest.raises(ValueError, match=message):
        data.load_cifar10(tmp_path)


def test_cifar_bad_label() -> None:
    record = bytes([10]) + bytes(3072)
    with pytest.raises(ValueError, match=r"label 10, expected 0\.\.9"):
        data.parse_cifar10_records(record, "batch")


def test_cifar_missing_member(tmp_path: Path) -> None:
    batches = cifar_batches()
    del batches["test_batch.bin"]
    write_cifar_archive(tmp_path / data.CIFAR10_ARCHIVE, batches)
    with pytest.raises(ValueError, match=r"lacks test_batch\.bin"):
        data.load_cifar10(tmp_path)


def test_cifar_missing_never_downloads(tmp_path: Path, monkeypatch) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("load_cifar10 must not download without download=True")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setenv(data.CIFAR10_ENV_VAR, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"download=True.*by hand and place it in"):
        data.load_dataset("cifar10")


# ---------------------------------------------------------------------------------------------
# Download (no network: urlopen is replaced)
# ---------------------------------------------------------------------------------------------


def fake_urlopen(payload: bytes):
    def urlopen(url, timeout=None):
        return io.BytesIO(payload)

    return urlopen


def test_download_good_md5(tmp_path: Path, monkeypatch) -> None:
    batches = cifar_batches()
    archive = write_cifar_archive(tmp_path / "source.tar.gz", batches).read_bytes()
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen(archive))
    folder = tmp_path / "cifar"
    path = data.download_cifar10(folder, md5=hashlib.md5(archive).hexdigest())
    assert path == (folder / data.CIFAR10_ARCHIVE).resolve() and path.read_bytes() == archive
    assert sorted(p.name for p in folder.iterdir()) == [data.CIFAR10_ARCHIVE]


def test_download_wrong_md5_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen(b"corrupted payload"))
    with pytest.raises(data.DownloadError, match=r"md5 .*expected c32a1d4a.*by hand and place it in"):
        data.download_cifar10(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_download_network_error(tmp_path: Path, monkeypatch) -> None:
    def offline(url, timeout=None):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(data.DownloadError, match=r"could not download .*by hand and place it in"):
        data.download_cifar10(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_load_dataset_download_true(tmp_path: Path, monkeypatch) -> None:
    archive = write_cifar_archive(tmp_path / "source.tar.gz", cifar_batches()).read_bytes()
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen(archive))
    monkeypatch.setattr(data, "CIFAR10_MD5", hashlib.md5(archive).hexdigest())
    dataset = data.load_dataset("cifar10", root=tmp_path / "cifar", download=True)
    assert len(dataset.train) == 15 and len(dataset.test) == 3


# ---------------------------------------------------------------------------------------------
# load_dataset
# ---------------------------------------------------------------------------------------------


def test_unknown_dataset_lists_known() -> None:
    message = "unknown dataset 'mnist'; choose one of fashion-mnist, cifar10, synthetic"
    with pytest.raises(ValueError, match=message):
        data.load_dataset("mnist")


def test_synthetic_defaults() -> None:
    dataset = data.load_dataset("synthetic")
    assert dataset.train.images.shape == (2048, 1, 16, 16)
    assert dataset.test.images.shape == (512, 1, 16, 16)
    assert dataset.val is None and dataset.num_classes == 10
    assert (dataset.crop_padding, dataset.flip) == (0, False)
    assert torch.bincount(dataset.train.labels).tolist() == [205] * 8 + [204] * 2
    assert 0 < dataset.std[0] < 0.5 and 0 < dataset.mean[0] < 1


def test_synthetic_is_deterministic() -> None:
    first, _ = data.make_synthetic_splits(64, 8)
    second, _ = data.make_synthetic_splits(64, 8)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)


def test_subset_sizes_and_val_disjoint() -> None:
    dataset = data.load_dataset("synthetic", train_size=300, val_size=200, seed=3)
    assert len(dataset.train) == 300 and len(dataset.val) == 200
    full = data.load_dataset("synthetic").train
    train_rows = {row.tobytes() for row in dataset.train.images.reshape(300, -1).numpy()}
    val_rows = {row.tobytes() for row in dataset.val.images.reshape(200, -1).numpy()}
    all_rows = {row.tobytes() for row in full.images.reshape(len(full), -1).numpy()}
    assert not train_rows & val_rows and train_rows | val_rows <= all_rows


def test_subset_is_seeded_and_nested() -> None:
    a = data.load_dataset("synthetic", train_size=100, val_size=50, seed=1)
    b = data.load_dataset("synthetic", train_size=100, val_size=50, seed=1)
    c = data.load_dataset("synthetic", train_size=100, val_size=50, seed=2)
    larger = data.load_dataset("synthetic", train_size=400, val_size=50, seed=1)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.val.labels, b.val.labels)
    assert not torch.equal(a.train.images, c.train.images)
    assert torch.equal(a.val.images, larger.val.images)
    larger_rows = {row.tobytes() for row in larger.train.images.reshape(400, -1).numpy()}
    assert all(row.tobytes() in larger_rows for row in a.train.images.reshape(100, -1).numpy())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train_size": 0}, "train_size must be a positive int"),
        ({"train_size": -3}, "train_size must be a positive int"),
        ({"train_size": 2.5}, "train_size must be a positive int"),
        ({"val_size": -1}, "val_size must be an int >= 0"),
    ],
)
def test_invalid_sizes(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        data.load_dataset("synthetic", **kwargs)


def test_train_size_larger_than_available(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path, train_count=40)
    with pytest.raises(ValueError, match=r"train_size=31 is larger than the 30 training samples"):
        data.load_dataset("fashion-mnist", root=tmp_path, train_size=31, val_size=10)
    with pytest.raises(ValueError, match=r"val_size=40 leaves no training data"):
        data.load_dataset("fashion-mnist", root=tmp_path, val_size=40)


def test_fashion_mnist_cannot_download(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path)
    with pytest.raises(ValueError, match="not downloaded by robustq"):
        data.load_dataset("fashion-mnist", root=tmp_path, download=True)


def test_split_validates_types() -> None:
    with pytest.raises(ValueError, match="uint8"):
        data.Split(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        data.Split(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))


def test_channel_mean_std_matches_float_computation() -> None:
    images = torch.randint(0, 256, (10, 3, 5, 5), dtype=torch.uint8)
    mean, std = data.channel_mean_std(images)
    as_float = images.double() / 255
    assert mean == pytest.approx(as_float.mean(dim=(0, 2, 3)).tolist())
    assert std == pytest.approx(as_float.std(dim=(0, 2, 3), unbiased=False).tolist())


# ---------------------------------------------------------------------------------------------
# BatchLoader
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def split() -> data.Split:
    train, _ = data.make_synthetic_splits(100, 1, in_channels=3, image_size=8)
    return train


def loader_for(split: data.Split, **kwargs) -> data.BatchLoader:
    kwargs.setdefault("mean", (0.5, 0.5, 0.5))
    kwargs.setdefault("std", (0.25, 0.25, 0.25))
    return data.BatchLoader(split, kwargs.pop("batch_size", 32), **kwargs)


def concat(batches: list) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def test_loader_shapes_dtypes_and_len(split: data.Split) -> None:
    loader = loader_for(split)
    batches = list(loader)
    assert len(loader) == len(batches) == 4
    assert [len(y) for _, y in batches] == [32, 32, 32, 4]
    x, y = batches[0]
    assert x.shape == (32, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    dropping = loader_for(split, drop_last=True)
    assert len(dropping) == len(list(dropping)) == 3


def test_loader_normalises(split: data.Split) -> None:
    x, y = concat(list(loader_for(split)))
    expected = (split.images.float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(x, expected)
    assert torch.equal(y, split.labels)


def test_loader_same_seed_and_epoch_identical(split: data.Split) -> None:
    options = dict(shuffle=True, augment=True, crop_padding=2, flip=True, seed=7)
    first, second = loader_for(split, **options), loader_for(split, **options)
    first.set_epoch(3)
    second.set_epoch(3)
    for (x1, y1), (x2, y2) in zip(first, second, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_loader_different_seed_or_epoch_differs(split: data.Split) -> None:
    _, order_a = concat(list(loader_for(split, shuffle=True, seed=0)))
    _, order_b = concat(list(loader_for(split, shuffle=True, seed=1)))
    assert not torch.equal(order_a, order_b)
    loader = loader_for(split, shuffle=True, seed=0)
    loader.set_epoch(1)
    _, order_epoch1 = concat(list(loader))
    assert not torch.equal(order_a, order_epoch1)
    assert torch.equal(torch.sort(order_a).values, torch.sort(order_epoch1).values)


def test_loader_iteration_advances_epoch_and_set_epoch_replays(split: data.Split) -> None:
    loader = loader_for(split, shuffle=True, seed=0)
    epoch0, epoch1 = concat(list(loader)), concat(list(loader))
    assert loader.epoch == 2 and not torch.equal(epoch0[1], epoch1[1])
    loader.set_epoch(1)
    replay = concat(list(loader))
    assert torch.equal(replay[0], epoch1[0]) and torch.equal(replay[1], epoch1[1])


def test_loader_shuffle_is_a_permutation(split: data.Split) -> None:
    x, y = concat(list(loader_for(split, shuffle=True, seed=4)))
    plain, _ = concat(list(loader_for(split)))
    assert sorted(map(bytes, x.numpy().reshape(100, -1).view(np.uint8))) == sorted(
        map(bytes, plain.numpy().reshape(100, -1).view(np.uint8))
    )


def test_loader_flip_only_gives_original_or_mirror(split: data.Split) -> None:
    x, _ = concat(list(loader_for(split, augment=True, flip=True, seed=2)))
    plain, _ = concat(list(loader_for(split)))
    same = (x == plain).flatten(1).all(1)
    mirrored = (x == torch.flip(plain, dims=[3])).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 0 < int((mirrored & ~same).sum()) < 100


def test_loader_crop_is_a_shift_with_zero_fill(split: data.Split) -> None:
    padding = 2
    x, _ = concat(list(loader_for(split, augment=True, crop_padding=padding, seed=5)))
    padded = torch.nn.functional.pad(split.images, (padding,) * 4).float()
    padded = (padded / 255 - 0.5) / 0.25
    shifts = range(2 * padding + 1)
    for i in range(len(split)):
        windows = [padded[i, :, r : r + 8, c : c + 8] for r in shifts for c in shifts]
        assert any(torch.allclose(x[i], w, atol=1e-5) for w in windows)
    assert not torch.allclose(x, concat(list(loader_for(split)))[0])


def test_crop_batch_offsets() -> None:
    images = torch.arange(2 * 1 * 3 * 3, dtype=torch.uint8).reshape(2, 1, 3, 3)
    unchanged = data.crop_batch(images, 1, torch.tensor([[1, 1], [1, 1]]))
    assert torch.equal(unchanged, images)
    shifted = data.crop_batch(images, 1, torch.tensor([[0, 0], [2, 1]]))
    assert shifted[0, 0].tolist() == [[0, 0, 0], [0, 0, 1], [0, 3, 4]]
    assert shifted[1, 0].tolist() == [[12, 13, 14], [15, 16, 17], [0, 0, 0]]


def test_flip_batch_equals_torch_flip() -> None:
    images = torch.arange(2 * 2 * 2 * 3, dtype=torch.uint8).reshape(2, 2, 2, 3)
    flipped = data.flip_batch(images, torch.tensor([True, False]))
    assert torch.equal(flipped[0], torch.flip(images[0], dims=[2]))
    assert torch.equal(flipped[1], images[1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size must be a positive int"),
        ({"mean": (0.5,)}, "one value per channel"),
        ({"std": (0.2, 0.0, 0.2)}, "std must be positive"),
        ({"crop_padding": -1}, "crop_padding must be an int >= 0"),
        ({"batch_size": 101, "drop_last": True}, "yields no batch"),
        ({"seed": -1}, "seed must be an int >= 0"),
    ],
)
def test_loader_rejects_bad_arguments(split: data.Split, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        loader_for(split, **kwargs)


def test_loader_helpers_use_dataset_defaults() -> None:
    dataset = data.load_dataset("synthetic", val_size=100)
    train = data.train_loader(dataset, 64, seed=1)
    assert train.shuffle and train.augment and train.crop_padding == 0 and not train.flip
    assert len(data.eval_loader(dataset, "val", batch_size=64)) == 2
    with pytest.raises(ValueError, match="no validation split"):
        data.eval_loader(data.load_dataset("synthetic"), "val")
