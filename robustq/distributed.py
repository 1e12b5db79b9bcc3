"""One experiment on several processes: ``torchrun --nproc_per_node=N -m robustq train ...``.

torchrun starts N processes with ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` in their environment. :func:`init_from_env` joins them into one process group
(gloo on CPU, NCCL on CUDA) or fails with :class:`DistributedError`; it never lets N processes
train N separate models. The training loop (:func:`robustq.train.train`) then wraps the model in
``torch.nn.parallel.DistributedDataParallel`` (Li et al., VLDB 2020, arXiv 2006.15704).

What a run on N processes computes (README, "Running at scale"):

* **Data.** ``batch_size`` is the global batch. Every rank draws the same shuffled (and augmented)
  global batch from its in-memory loader and trains on its contiguous shard of ``batch_size / N``
  samples (:func:`shard`), so N processes see the data of one.
* **Gradients.** DDP averages the ranks' gradients of their shard-mean losses: the gradient of
  the global batch-mean loss, as in one process.
* **SAM / ASAM.** The perturbation is computed from that all-reduced gradient, i.e. the one-process
  perturbation, not the per-rank one (the SAM paper's *m*-sharpness with ``m = batch_size / N``,
  Foret et al., ICLR 2021, §4.1), which would change the objective with N.
* **Gradient-ℓ1.** The weight gradients inside the penalty are averaged across ranks
  differentiably (:func:`mean_across_ranks`), so the penalty and its gradient are the
  one-process ones. The activation terms are per sample and need no exchange.
* **BatchNorm.** Batch statistics are each rank's shard's (``SyncBatchNorm`` is GPU-only); running
  statistics are rank 0's (DDP broadcasts buffers at each forward). Only this differs from one
  process by design.
* **Cache.** Only rank 0 reads, locks and writes the cache entry; the key covers the number of
  processes when it is above 1, and ``result.json`` records it as ``world_size``.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

import torch
import torch.distributed as dist

TIMEOUT_ENV = "ROBUSTQ_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 300.0


class DistributedError(RuntimeError):
    """The processes torchrun started cannot train one experiment together."""


def requested_world_size() -> int:
    """The number of processes the launcher started (``$WORLD_SIZE``; 1 without torchrun)."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        size = int(raw)
    except ValueError:
        raise DistributedError(f"WORLD_SIZE={raw!r} is not an int; launch with torchrun --nproc_per_node=N") from None
    if size < 1:
        raise DistributedError(f"WORLD_SIZE={size} must be >= 1; launch with torchrun --nproc_per_node=N")
    return size


def world_size() -> int:
    """Processes in the current process group (1 when none is initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def is_main() -> bool:
    """Whether this process writes files and shows progress (rank 0, or the only process)."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """``device`` with a CUDA index of this process's ``$LOCAL_RANK`` under torchrun."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def init_from_env(device: torch.device | str = "cpu") -> int:
    """Join the processes torchrun started into one group (once per process); return its size.

    Without torchrun (``WORLD_SIZE`` unset or 1) this does nothing and returns 1. Otherwise the
    ranks must meet at ``MASTER_ADDR:MASTER_PORT`` within ``$ROBUSTQ_DIST_TIMEOUT_S`` seconds
    (default 300); if they do not, or the group is not the size torchrun announced, it raises
    :class:`DistributedError` instead of letting each process train alone."""
    requested = requested_world_size()
    if requested == 1 or world_size() > 1:
        return world_size()
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout_s = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    if device.type == "cuda":
        torch.cuda.set_device(local_device(device))
    try:
        dist.init_process_group(backend, timeout=dt.timedelta(seconds=timeout_s))
    except Exception as error:  # the store raises several types (DistStoreError, RuntimeError, ValueError)
        raise DistributedError(
            f"this process is rank {os.environ.get('RANK', '?')} of WORLD_SIZE={requested}, but the ranks did not "
            f"form one {backend} process group at {where} within {timeout_s:g} s ({type(error).__name__}: "
            f"{' '.join(str(error).split())[:200]}); start every rank with one torchrun command (on several "
            f"machines: the same --rdzv-endpoint and --nnodes), or run without torchrun"
        ) from None
    if dist.get_world_size() != requested:
        raise DistributedError(f"the process group has {dist.get_world_size()} ranks, but WORLD_SIZE={requested}")
    return requested


def check_same(value: Any, what: str) -> None:
    """Raise :class:`DistributedError` unless every rank holds the same ``value``."""
    if world_size() == 1:
        return
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        raise DistributedError(f"the ranks disagree on the {what}: {values}; launch every rank with the same arguments")


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def shard(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's contiguous share of a global batch (the whole batch in one process)."""
    size = world_size()
    if size == 1:
        return x, y
    if len(y) % size:
        raise DistributedError(f"a batch of {len(y)} samples does not split over {size} processes; choose a "
                               f"batch size divisible by {size}")
    per_rank = len(y) // size
    start = rank() * per_rank
    return x[start:start + per_rank], y[start:start + per_rank]


def mean_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over ranks, differentiable: the backward pass sums the ranks'
    upstream gradients (``torch.distributed.nn.functional.all_reduce``)."""
    if world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(tensor) / world_size()


def sum_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of a statistic over ranks (not differentiable), in place."""
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor
