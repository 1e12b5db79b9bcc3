"""Training throughput: robustq's loop vs a textbook PyTorch loop, same model, batch and run.

Claim: holding the whole split as a uint8 tensor and augmenting whole batches with tensor ops
(airbench style), in channels_last memory format, trains the book's `cnn` on Fashion-MNIST at least 1.5x faster than the textbook
`DataLoader(TensorDataset-like dataset with per-sample transforms)` loop on the 2-core CPU machine.
Both loops do the same work per step (random crop with 2-pixel padding, horizontal flip,
normalisation, SGD with Nesterov momentum). Each is timed over REPEATS epochs of a 12,800-image
subset after one warm-up epoch; medians are reported. Also printed: the achieved fraction of the
machine's measured matmul FLOP/s, and the peak memory (max RSS) of a one-epoch book-profile run.

    .venv/bin/python benchmarks/throughput.py
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import matmul_flops_per_s, median_time, training_flops_per_image  # noqa: E402

from robustq import models  # noqa: E402
from robustq.data import load_dataset  # noqa: E402
from robustq.train import TrainConfig, train  # noqa: E402

SUBSET, BATCH, REPEATS, TARGET = 12_800, 256, 3, 1.5


class PerSampleDataset(TorchDataset):
    """The textbook way: one image at a time through Python-level transforms."""

    def __init__(self, images, labels, mean, std, padding=2):
        self.images, self.labels, self.mean, self.std, self.padding = images, labels, mean, std, padding

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        image = self.images[i].float().div(255)
        image = F.pad(image, [self.padding] * 4)
        top, left = torch.randint(0, 2 * self.padding + 1, (2,)).tolist()
        image = image[:, top : top + 28, left : left + 28]
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
        return (image - self.mean) / self.std, self.labels[i]


def textbook_epoch(model, loader, optimizer):
    model.train()
    for x, y in loader:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def peak_memory_of_book_epoch() -> float:
    """Max RSS (GiB) of a child process training one book-profile epoch on all 60k images."""
    code = (
        "import resource; from robustq.experiments import Experiment, run; "
        "run(Experiment(epochs=1, profile='book'), progress=False); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    env = dict(os.environ, ROBUSTQ_CACHE=tempfile.mkdtemp())
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.strip().splitlines()[-1]) / 2**20


def main() -> None:
    torch.manual_seed(0)
    data = load_dataset("fashion-mnist", train_size=SUBSET)
    mean, std = torch.tensor(data.mean).view(-1, 1, 1), torch.tensor(data.std).view(-1, 1, 1)

    model = models.make_model("cnn", 1, 10)
    config = TrainConfig(epochs=1, batch_size=BATCH, schedule="constant", lr=0.01)
    ours = median_time(lambda: train(model, data, config, progress=False), REPEATS)

    textbook_model = models.make_model("cnn", 1, 10)
    dataset = PerSampleDataset(data.train.images, data.train.labels, mean, std)
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, drop_last=True)
    optimizer = torch.optim.SGD(textbook_model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    theirs = median_time(lambda: textbook_epoch(textbook_model, loader, optimizer), REPEATS)

    images = (SUBSET // BATCH) * BATCH
    ours_ips, theirs_ips = images / ours, images / theirs
    peak_flops = matmul_flops_per_s()
    achieved = ours_ips * training_flops_per_image(model, (1, 28, 28))
    print(f"{'loop':28s} {'images/s':>10s}")
    print(f"{'robustq (whole-batch ops)':28s} {ours_ips:10.0f}")
    print(f"{'textbook DataLoader':28s} {theirs_ips:10.0f}")
    ratio = ours_ips / theirs_ips
    print(f"ratio robustq / textbook: {ratio:.2f}x (target >= {TARGET}x: {'PASS' if ratio >= TARGET else 'MISS'})")
    print(f"matmul peak {peak_flops / 1e9:.1f} GFLOP/s; training achieves {achieved / 1e9:.1f} GFLOP/s "
          f"= {achieved / peak_flops:.0%} of it")
    print(f"torch threads: {torch.get_num_threads()}")
    print(f"peak memory (max RSS) of one book-profile epoch: {peak_memory_of_book_epoch():.2f} GiB (target <= 2 GiB)")


if __name__ == "__main__":
    main()
