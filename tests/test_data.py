"""Tests of robustq.data and robustq.datafiles: Fashion-MNIST and CIFAR-10 through torchvision,
load_dataset, BatchLoader."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import runpy
import shutil
import struct
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets
import torchvision.datasets.cifar

from robustq import data, datafiles

# ---------------------------------------------------------------------------------------------
# Helpers writing small files in the official formats
# ---------------------------------------------------------------------------------------------

IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049  # IDX: unsigned bytes in 3 and in 1 dimensions


def idx_images_bytes(images: np.ndarray, magic: int = IMAGES_MAGIC) -> bytes:
    count, rows, cols = images.shape
    return struct.pack(">4i", magic, count, rows, cols) + images.astype(np.uint8).tobytes()


def idx_labels_bytes(labels: np.ndarray, magic: int = LABELS_MAGIC) -> bytes:
    return struct.pack(">2i", magic, len(labels)) + labels.astype(np.uint8).tobytes()


def write_gz(path: Path, payload: bytes) -> Path:
    path.write_bytes(gzip.compress(payload))
    return path


def random_mnist(count: int, seed: int, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, size, size), dtype=np.uint8), rng.integers(0, 10, count)


def write_fashion_mnist(folder: Path, train_count: int = 40, test_count: int = 12) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, prefix, count, seed in (("train", "train", train_count, 1), ("test", "t10k", test_count, 2)):
        images, labels = random_mnist(count, seed)
        write_gz(folder / f"{prefix}-images-idx3-ubyte.gz", idx_images_bytes(images))
        write_gz(folder / f"{prefix}-labels-idx1-ubyte.gz", idx_labels_bytes(labels))
        arrays[split] = (images, labels)
    return arrays


def parse_idx_gz(path: Path, header_bytes: int) -> np.ndarray:
    """An independent reading of an IDX .gz file (what robustq parsed itself before torchvision):
    the bytes after the header, as uint8."""
    return np.frombuffer(gzip.decompress(path.read_bytes()), dtype=np.uint8, offset=header_bytes)


def raw_folder(cache: Path) -> Path:
    """The FashionMNIST/raw folder of the one torchvision root under ``cache``."""
    (raw,) = (cache / "data" / "fashion-mnist").glob("*/FashionMNIST/raw")
    return raw


CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


@pytest.fixture
def cifar_folder(tmp_path: Path, monkeypatch) -> tuple[Path, dict]:
    """A small CIFAR-10, Python version, in ``tmp_path/cifar-10-batches-py`` (3 images a batch),
    with torchvision's MD5 lists pointed at its files; returns (root, {file: (images, labels)})."""
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    batches, md5 = {}, {}
    for name in CIFAR_FILES:
        images = rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, 3).tolist()
        entry = {"batch_label": name, "data": images.reshape(3, 3072), "labels": labels}
        (base / name).write_bytes(pickle.dumps(entry))
        batches[name] = (images, np.array(labels))
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": list(data.CIFAR10_CLASSES)}))
    for name in (*CIFAR_FILES, "batches.meta"):
        md5[name] = hashlib.md5((base / name).read_bytes()).hexdigest()
    cifar = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cifar, "train_list", [[name, md5[name]] for name in CIFAR_FILES[:5]])
    monkeypatch.setattr(cifar, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(cifar, "meta", {**cifar.meta, "md5": md5["batches.meta"]})
    return tmp_path, batches


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST: .gz files gunzipped for torchvision.datasets.FashionMNIST
# ---------------------------------------------------------------------------------------------


def test_fashion_mnist_round_trip(tmp_path: Path, isolated_cache: Path) -> None:
    arrays = write_fashion_mnist(tmp_path / "gz")
    dataset = data.load_dataset("fashion-mnist", root=tmp_path / "gz")
    assert dataset.train.images.shape == (40, 1, 28, 28) and dataset.test.images.shape == (12, 1, 28, 28)
    assert dataset.train.images.dtype == torch.uint8 and dataset.train.labels.dtype == torch.int64
    np.testing.assert_array_equal(dataset.train.images[:, 0].numpy(), arrays["train"][0])
    np.testing.assert_array_equal(dataset.test.labels.numpy(), arrays["test"][1])
    raw = raw_folder(isolated_cache)  # the decompressed copy torchvision read
    for source in sorted((tmp_path / "gz").iterdir()):
        assert (raw / source.stem).read_bytes() == gzip.decompress(source.read_bytes())
    assert not list(raw.glob(".*"))  # no temporary files left behind


def test_prepare_is_idempotent_and_follows_a_replaced_file(tmp_path: Path, isolated_cache: Path) -> None:
    write_fashion_mnist(tmp_path, train_count=40)
    root = datafiles.prepare_fashion_mnist(tmp_path)
    images = root / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"
    written = images.stat().st_mtime_ns
    assert datafiles.prepare_fashion_mnist(tmp_path) == root and images.stat().st_mtime_ns == written
    assert len(data.load_dataset("fashion-mnist", root=tmp_path).train) == 40
    write_fashion_mnist(tmp_path, train_count=41)
    assert len(data.load_dataset("fashion-mnist", root=tmp_path).train) == 41  # gunzipped and read again


def test_fashion_mnist_env_var_and_subfolder(tmp_path: Path, monkeypatch) -> None:
    write_fashion_mnist(tmp_path / "fashion-mnist")
    monkeypatch.setenv(datafiles.DATA_ENV_VAR, str(tmp_path))
    assert datafiles.fashion_mnist_folder() == (tmp_path / "fashion-mnist").resolve()
    assert len(data.load_dataset("fashion-mnist").train) == 40


def test_fashion_mnist_missing_file(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="lacks t10k-labels.*apt-get install dataset-fashion-mnist.*ROBUSTQ_DATA"):
        data.load_dataset("fashion-mnist", root=tmp_path)


def test_fashion_mnist_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"does not exist.*apt-get install.*ROBUSTQ_DATA"):
        data.load_dataset("fashion-mnist", root=tmp_path / "nowhere")


@pytest.mark.parametrize("damage", ["truncated", "not gzip"])
def test_a_damaged_gz_names_the_file_and_leaves_no_half_file(tmp_path: Path, isolated_cache: Path,
                                                             damage: str) -> None:
    write_fashion_mnist(tmp_path)
    source = tmp_path / "train-images-idx3-ubyte.gz"
    source.write_bytes(source.read_bytes()[:-30] if damage == "truncated" else b"not gzip at all")
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz is damaged: .*apt-get install"):
        data.load_dataset("fashion-mnist", root=tmp_path)
    raw = raw_folder(isolated_cache)
    assert not (raw / "train-images-idx3-ubyte").exists() and not list(raw.glob(".*"))


def test_a_bad_idx_header_is_reported(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path)
    images, _ = random_mnist(40, seed=1)
    write_gz(tmp_path / "train-images-idx3-ubyte.gz", idx_images_bytes(images, magic=1234))
    with pytest.raises(ValueError, match=r"cannot read the IDX files train-\* gunzipped from .*not Fashion-MNIST"):
        data.load_dataset("fashion-mnist", root=tmp_path)


def test_a_truncated_idx_payload_is_reported(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path)
    images, _ = random_mnist(40, seed=1)
    write_gz(tmp_path / "train-images-idx3-ubyte.gz", idx_images_bytes(images)[:-100])
    with pytest.raises(ValueError, match="torchvision cannot read"):
        data.load_dataset("fashion-mnist", root=tmp_path)


def test_fashion_mnist_wrong_image_size_or_count(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path)
    write_gz(tmp_path / "t10k-images-idx3-ubyte.gz", idx_images_bytes(random_mnist(12, seed=3, size=16)[0]))
    with pytest.raises(ValueError, match=r"t10k-\*\.gz hold 12 images of \(16, 16\) pixels.*expected 28x28"):
        data.load_dataset("fashion-mnist", root=tmp_path)
    write_fashion_mnist(tmp_path)
    write_gz(tmp_path / "train-labels-idx1-ubyte.gz", idx_labels_bytes(random_mnist(39, seed=5)[1]))
    with pytest.raises(ValueError, match="hold 40 images .* and 39 labels"):
        data.load_dataset("fashion-mnist", root=tmp_path)


@pytest.mark.filterwarnings("ignore:'robustq.data' found in sys.modules")
def test_make_data_entry_point(tmp_path: Path, monkeypatch, capsys) -> None:
    """``python -m robustq.data`` (``make data``): the torchvision root, or one line with the fix."""
    write_fashion_mnist(tmp_path)
    monkeypatch.setenv(datafiles.DATA_ENV_VAR, str(tmp_path))
    runpy.run_module("robustq.data", run_name="__main__")
    assert "Fashion-MNIST ready for torchvision in" in capsys.readouterr().out
    monkeypatch.setenv(datafiles.DATA_ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit, match=r"^robustq: error: .*does not exist.*dataset-fashion-mnist"):
        runpy.run_module("robustq.data", run_name="__main__")


@pytest.mark.skipif(
    not (datafiles.DEFAULT_FASHION_MNIST_DIR / datafiles.FASHION_MNIST_FILES[0]).is_file(),
    reason="Debian package dataset-fashion-mnist is not installed",
)
def test_debian_fashion_mnist_through_torchvision_is_bit_identical() -> None:
    folder = datafiles.DEFAULT_FASHION_MNIST_DIR
    dataset = data.load_dataset("fashion-mnist", root=folder)
    for split, prefix, count in ((dataset.train, "train", 60_000), (dataset.test, "t10k", 10_000)):
        images = parse_idx_gz(folder / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(count, 1, 28, 28)
        labels = parse_idx_gz(folder / f"{prefix}-labels-idx1-ubyte.gz", 8)
        assert torch.equal(split.images, torch.from_numpy(images.copy()))
        assert torch.equal(split.labels, torch.from_numpy(labels.astype(np.int64)))
    assert set(dataset.train.labels.unique().tolist()) == set(range(10))
    assert dataset.mean[0] == pytest.approx(0.2860, abs=1e-4)
    assert dataset.std[0] == pytest.approx(0.3530, abs=1e-4)


# --- Fashion-MNIST off Debian: torchvision's download path, against a local mirror ----------------


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def mirror(tmp_path: Path, isolated_cache: Path, monkeypatch):
    """A local HTTP mirror of the Debian files (synthetic ones where the package is absent), set as
    torchvision's only mirror with the served files' own MD5s (Debian recompressed the archives,
    so torchvision's sums do not match them); the Debian path made absent. Yields the served folder."""
    served = tmp_path / "served"
    if (datafiles.DEFAULT_FASHION_MNIST_DIR / datafiles.FASHION_MNIST_FILES[0]).is_file():
        shutil.copytree(datafiles.DEFAULT_FASHION_MNIST_DIR, served)
    else:
        write_fashion_mnist(served)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    md5 = [(name, hashlib.md5((served / name).read_bytes()).hexdigest()) for name in datafiles.FASHION_MNIST_FILES]
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "mirrors", [f"http://127.0.0.1:{server.server_port}/"])
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "resources", md5)
    monkeypatch.setattr(datafiles, "DEFAULT_FASHION_MNIST_DIR", tmp_path / "no-debian-package")
    monkeypatch.delenv(datafiles.DATA_ENV_VAR, raising=False)
    yield served
    server.shutdown()
    server.server_close()


def test_without_the_debian_package_fashion_mnist_is_downloaded_through_torchvision(mirror: Path) -> None:
    folder = datafiles.fashion_mnist_folder()
    for name in datafiles.FASHION_MNIST_FILES:
        assert (folder / name).read_bytes() == (mirror / name).read_bytes()
    written = (folder / datafiles.FASHION_MNIST_FILES[0]).stat().st_mtime_ns
    assert datafiles.fashion_mnist_folder() == folder  # already whole: not fetched again
    assert (folder / datafiles.FASHION_MNIST_FILES[0]).stat().st_mtime_ns == written
    test = data.load_dataset("fashion-mnist").test
    assert torch.equal(test.labels, torchvision.datasets.FashionMNIST(str(folder.parents[1]), train=False).targets)


def test_a_corrupted_download_is_deleted_and_reported(mirror: Path, isolated_cache: Path) -> None:
    labels = mirror / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:-100])  # the mirror serves a truncated copy
    with pytest.raises(FileNotFoundError, match=r"deleted t10k-labels-idx1-ubyte\.gz, which failed the MD5.*"
                                                r"apt-get install dataset-fashion-mnist.*ROBUSTQ_DATA"):
        datafiles.fashion_mnist_folder()
    (raw,) = isolated_cache.glob("data/fashion-mnist/download/FashionMNIST/raw")
    assert not (raw / labels.name).exists()
    assert (raw / "train-images-idx3-ubyte.gz").is_file()  # the whole files stay, for the next try


def test_offline_download_names_the_fix(mirror: Path, monkeypatch) -> None:
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "mirrors", ["http://127.0.0.1:9/"])  # discard port
    with pytest.raises(FileNotFoundError, match=r"could not download it.*Offline, install it with "
                                                r"`sudo apt-get install dataset-fashion-mnist` or set ROBUSTQ_DATA"):
        data.load_dataset("fashion-mnist")


# ---------------------------------------------------------------------------------------------
# CIFAR-10: the Python version through torchvision.datasets.CIFAR10 (MD5 sums patched)
# ---------------------------------------------------------------------------------------------


def test_cifar_round_trip(cifar_folder) -> None:
    root, batches = cifar_folder
    dataset = data.load_dataset("cifar10", root=root)
    assert dataset.train.images.shape == (15, 3, 32, 32) and dataset.test.images.shape == (3, 3, 32, 32)
    train_images = np.concatenate([batches[name][0] for name in CIFAR_FILES[:5]])
    train_labels = np.concatenate([batches[name][1] for name in CIFAR_FILES[:5]])
    np.testing.assert_array_equal(dataset.train.images.numpy(), train_images)  # planes R, G, B
    np.testing.assert_array_equal(dataset.train.labels.numpy(), train_labels)
    np.testing.assert_array_equal(dataset.test.images.numpy(), batches["test_batch"][0])
    assert (dataset.in_channels, dataset.image_size, dataset.num_classes) == (3, 32, 10)
    assert (dataset.crop_padding, dataset.flip) == (4, True)
    assert [p.name for p in data.source_files("cifar10", root)] == [*CIFAR_FILES, "batches.meta"]


def test_cifar_root_may_name_the_batches_folder(cifar_folder, monkeypatch) -> None:
    root, _ = cifar_folder
    monkeypatch.setenv(datafiles.CIFAR10_ENV_VAR, str(root / "cifar-10-batches-py"))
    assert datafiles.cifar10_folder() == root.resolve()
    assert len(data.load_dataset("cifar10").test) == 3


def test_cifar_missing_names_the_fix_and_never_downloads(tmp_path: Path, monkeypatch) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("load_dataset must not download without download=True")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", no_network)
    monkeypatch.setenv(datafiles.CIFAR10_ENV_VAR, str(tmp_path))
    message = r"cifar-10-batches-py lacks data_batch_1.*cifar-10-python\.tar\.gz.*extract it in.*ROBUSTQ_CIFAR10"
    with pytest.raises(FileNotFoundError, match=message):
        data.load_dataset("cifar10")


def test_cifar_md5_mismatch_names_the_file(cifar_folder) -> None:
    root, _ = cifar_folder
    batch = root / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes() + b"\0")
    with pytest.raises(ValueError, match=r"data_batch_3 in .* failed torchvision's MD5 check.*extract"):
        data.load_dataset("cifar10", root=root)


def test_cifar_download_goes_through_torchvision(cifar_folder, monkeypatch) -> None:
    source, _ = cifar_folder
    calls = []

    def fake_download(url, download_root, filename=None, md5=None):  # what torchvision would extract
        calls.append(url)
        target = Path(download_root) / "cifar-10-batches-py"
        target.mkdir(parents=True)
        for file in (source / "cifar-10-batches-py").iterdir():
            (target / file.name).write_bytes(file.read_bytes())

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", fake_download)
    dataset = data.load_dataset("cifar10", root=source / "fresh", download=True)
    assert calls == [datafiles.CIFAR10_URL] and len(dataset.train) == 15
    data.load_dataset("cifar10", root=source / "fresh", download=True)
    assert len(calls) == 1  # present and verified: not fetched again


# ---------------------------------------------------------------------------------------------
# load_dataset
# ---------------------------------------------------------------------------------------------


def test_unknown_dataset_lists_known() -> None:
    message = r"dataset must be one of \('fashion-mnist', 'cifar10', 'synthetic'\), got 'mnist'"
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
    options = {"shuffle": True, "augment": True, "crop_padding": 2, "flip": True, "seed": 7}
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
    x, _ = concat(list(loader_for(split, shuffle=True, seed=4)))
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
