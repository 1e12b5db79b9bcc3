"""The one training loop every method uses.

A method changes training only through :class:`Extensions`: extra loss terms (computed from the
model, and for gradient-ℓ1 from the task loss and captured activations) and an optimizer wrapper
(SAM/ASAM). Reparametrizations (SatNL) and QAT quantizers are registered on the model before it
reaches this loop, so the loop sees ordinary parameters. The terms are added in exactly one place,
:func:`_objective`.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from robustq import distributed
from robustq.data import BatchLoader, Dataset, eval_loader, train_loader
from robustq.files import write_atomic
from robustq.models import weighted_layers
from robustq.params import check_choice, check_int

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("onecycle", "cosine", "constant")
# Batches of 64 to 256 score 5,000 test images (the book's subset then) equally fast on the 2-core CPU
# (0.39-0.48 s a pass, the sizes interleaved: benchmarks/evaluations.py --batch-sizes 64 128 512); 512
# and more are slower (0.48-0.63 s; 2.7 s for 10,000 images at 2048 against 1.5 s at 256). A one-off
# timing that put 128 a third ahead of 256 was the first size of each round paying for it.
EVAL_BATCH_SIZE = 256


class NonFiniteLossError(RuntimeError):
    """Training stopped because the loss became NaN or infinite."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation recipe shared by every method (SGD with Nesterov momentum by default)."""

    epochs: int
    batch_size: int = 256
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    label_smoothing: float = 0.0
    augment: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("epochs", self.epochs, minimum=1, example=3)
        check_int("batch_size", self.batch_size, minimum=1, example=256)
        for name in ("lr", "weight_decay", "momentum", "label_smoothing"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        if self.label_smoothing >= 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")


@dataclass
class StepContext:
    """What a penalty may look at: the task loss, captured layer inputs, and training progress.
    ``step`` counts optimisation steps over the whole run from 0 (``epoch * steps_per_epoch + i``),
    so a resumed run continues the count; both SAM passes of a step share it."""

    loss: torch.Tensor
    activations: list[torch.Tensor]
    epoch: int
    epochs: int
    step: int = 0


@dataclass
class Extensions:
    """How a method changes the loop. ``penalty`` returns the extra loss (already weighted);
    ``capture_activations`` records the input of every conv/linear for it; ``wrap_optimizer``
    turns the base optimizer into a two-step one (SAM/ASAM). ``double_backprop`` marks a penalty
    that differentiates gradients (gradient-ℓ1): from epoch ``double_backprop_from_epoch`` (the end
    of a warm start) the loop trains in the contiguous memory format, faster than channels_last for
    double backprop on CPU. ``bf16_autocast`` says the method's maths survives bfloat16 forward
    passes (:func:`autocast_dtype`).

    Measurements during training (they never change the loss): each ``on_step_end`` hook is called
    as ``hook(model, epoch, step)`` after every optimizer step (0-based epoch and step within the
    epoch) and keeps its own record; each ``on_epoch_end`` hook is called as ``hook(model, epoch)``
    after the epoch (and its validation) and may return a dict of numbers, merged into that epoch's
    ``history`` entry (so it is checkpointed). Both run under ``torch.no_grad()``, in train mode;
    step hooks count in the epoch's wall time. A resumed run calls them only for the epochs it
    trains."""

    penalty: Callable[[nn.Module, StepContext], torch.Tensor] | None = None
    capture_activations: bool = False
    wrap_optimizer: Callable[[list[nn.Parameter], torch.optim.Optimizer], object] | None = None
    double_backprop: bool = False
    double_backprop_from_epoch: int = 0
    bf16_autocast: bool = False
    on_step_end: list[Callable[[nn.Module, int, int], object]] = field(default_factory=list)
    on_epoch_end: list[Callable[[nn.Module, int], dict | None]] = field(default_factory=list)


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict] = field(default_factory=list)
    wall_time_s: float = 0.0
    images_per_s: float = 0.0


def default_device() -> torch.device:
    """CUDA if available (under torchrun, this process's ``$LOCAL_RANK`` GPU), else the CPU."""
    return distributed.local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def autocast_dtype(device: torch.device, extensions: Extensions) -> torch.dtype | None:
    """The forward pass's autocast dtype: bfloat16 on CUDA for methods marked ``bf16_autocast``
    (baseline, SymReg, SatNL, KURE, SAM/ASAM and their combinations: penalties on the weights stay
    float32, and bfloat16 needs no loss scaling), None (float32) on the CPU, under double backprop
    and for QAT-type methods, whose quantizers would see bfloat16-rounded levels. Device type and
    method are both in the cache key, so the choice needs no key of its own."""
    return torch.bfloat16 if device.type == "cuda" and extensions.bf16_autocast else None


def train(
    model: nn.Module,
    data: Dataset,
    config: TrainConfig,
    extensions: Extensions | None = None,
    *,
    checkpoint: Path | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    desc: str = "train",
    select: Callable[[nn.Module], float] | None = None,
) -> TrainResult:
    """Train ``model`` on ``data.train`` with ``config``; resume from ``checkpoint`` if it holds an
    earlier epoch of the same run, and save one after every epoch (atomically).

    With a validation split, ``val_acc`` is recorded for the model returned (after the last epoch,
    or the kept one). ``select`` keeps the best epoch instead of the last (checkpoint selection, as
    the oscillation paper's protocol selects by quantized validation accuracy at its target): it
    scores the model after every epoch, in eval mode (``selection_score`` in the history), and the
    model returned is the one after the highest-scoring epoch (the earliest of equal scores;
    ``kept`` marks it).

    In a process group (torchrun, :mod:`robustq.distributed`) the model trains wrapped in
    ``DistributedDataParallel``, each rank on its shard of every global batch of
    ``config.batch_size``; only rank 0 shows progress and saves checkpoints."""
    extensions = extensions or Extensions()
    device = distributed.local_device(torch.device(device) if device is not None else default_device())
    progress = progress and distributed.is_main()
    model.to(device=device, memory_format=_layout(extensions, 0))  # before DDP sizes its buckets
    net = _data_parallel(model, device)
    forward_dtype = autocast_dtype(device, extensions)
    loader = train_loader(data, config.batch_size, seed=config.seed, augment=config.augment, drop_last=True, device=device)
    optimizer = _make_optimizer(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    stepper = extensions.wrap_optimizer(trainable, optimizer) if extensions.wrap_optimizer else None
    scheduler = _make_scheduler(optimizer, config, len(loader))
    history, start_epoch, best_state = _resume(checkpoint, model, optimizer, scheduler, device)
    val_loader = eval_loader(data, "val", EVAL_BATCH_SIZE, device) if data.val is not None else None

    bar = _progress_bar(config, len(loader), start_epoch, progress, desc)
    for epoch in range(start_epoch, config.epochs):
        loader.set_epoch(epoch)
        memory_format = _layout(extensions, epoch)
        model.to(memory_format=memory_format)  # a no-op unless a warm start's penalty begins
        stats = _train_epoch(net, model, loader, optimizer, stepper, scheduler, extensions, epoch, config, bar,
                             memory_format, forward_dtype)
        if val_loader is not None and epoch == config.epochs - 1:  # the model as trained
            stats["val_acc"] = evaluate(model, val_loader)
        stats.update(_epoch_hooks(model, extensions.on_epoch_end, epoch, stats))
        if select is not None:
            stats["selection_score"] = _score(model, select)
            if stats["selection_score"] > max((h["selection_score"] for h in history), default=-math.inf):
                best_state = {name: value.detach().clone() for name, value in model.state_dict().items()}
        history.append(stats)
        if progress:
            _log_epoch(stats, config.epochs, desc, bar)
        if checkpoint is not None and distributed.is_main():
            _save_checkpoint(checkpoint, model, optimizer, scheduler, history, best_state)
    bar.close()
    if select is not None:
        kept = _keep_best(model, history, best_state)
        if val_loader is not None and "val_acc" not in kept:  # the model as kept
            kept["val_acc"] = evaluate(model, val_loader)
    model.to(memory_format=torch.contiguous_format).eval()
    wall = sum(h["wall_time_s"] for h in history)
    images = sum(h["images"] for h in history)
    return TrainResult(model, history, wall, images / wall if wall > 0 else 0.0)


def _score(model: nn.Module, select: Callable[[nn.Module], float]) -> float:
    was_training = model.training
    try:
        with torch.no_grad():
            return float(select(model.eval()))
    finally:
        model.train(was_training)


def _keep_best(model: nn.Module, history: list[dict], best_state: dict | None) -> dict:
    """Load the highest-scoring epoch's weights into ``model``, mark that epoch ``kept`` and return
    its history entry."""
    scores = [h["selection_score"] for h in history]
    best = scores.index(max(scores))
    for epoch, entry in enumerate(history):
        entry["kept"] = epoch == best
    if best_state is not None:
        model.load_state_dict(best_state)
    return history[best]


def _layout(extensions: Extensions, epoch: int) -> torch.memory_format:
    """channels_last trains convolutions ~1.3x faster here, but double backprop ~1.4x slower
    (``benchmarks/overhead.py``): contiguous from the first epoch with a double-backprop penalty."""
    if extensions.double_backprop and epoch >= extensions.double_backprop_from_epoch:
        return torch.contiguous_format
    return torch.channels_last


def _data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """The module the loop calls forward on: ``model`` itself, or in a process group ``model``
    wrapped in DDP (penalties, hooks and the optimizer keep acting on ``model``)."""
    if distributed.world_size() == 1:
        return model
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def _train_epoch(net, model, loader, optimizer, stepper, scheduler, extensions, epoch, config, bar,
                 memory_format, forward_dtype) -> dict:
    net.train()
    captured: list[torch.Tensor] = []
    handles = _capture_inputs(model, captured) if extensions.capture_activations else []
    loss_sum = torch.zeros((), device=next(model.parameters()).device)
    correct = torch.zeros((), dtype=torch.long, device=loss_sum.device)
    seen, start = 0, time.perf_counter()
    try:
        for step, (x, y) in enumerate(loader):
            x, y = distributed.shard(x.contiguous(memory_format=memory_format), y)
            global_step = epoch * len(loader) + step
            loss, logits = _step(net, model, x, y, optimizer, stepper, extensions, captured, epoch, global_step,
                                 config, forward_dtype)
            _guard_finite(loss, epoch, step)
            scheduler.step()
            _step_hooks(model, extensions.on_step_end, epoch, step)
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix_str(f"loss {loss.item():.3f}", refresh=False)
    finally:
        for handle in handles:
            handle.remove()
    wall = time.perf_counter() - start
    loss_sum, correct = distributed.sum_across_ranks(loss_sum), distributed.sum_across_ranks(correct)
    seen *= distributed.world_size()  # every rank trains on an equal shard
    return {
        "epoch": epoch + 1,
        "loss": float(loss_sum) / seen,
        "train_acc": float(correct) / seen,
        "wall_time_s": wall,
        "images": seen,
        "images_per_s": seen / wall,
    }


def _step(net, model, x, y, optimizer, stepper, extensions, captured, epoch, global_step, config, forward_dtype):
    """One optimisation step; with SAM/ASAM the objective is evaluated twice."""
    loss, logits = _objective(net, model, x, y, extensions, captured, epoch, global_step, config, forward_dtype)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if stepper is None:
        optimizer.step()
        return loss, logits
    stepper.first_step()
    optimizer.zero_grad(set_to_none=True)
    _objective(net, model, x, y, extensions, captured, epoch, global_step, config, forward_dtype)[0].backward()
    stepper.second_step()
    return loss, logits


def _objective(net, model, x, y, extensions, captured, epoch, global_step, config, forward_dtype):
    """Task loss plus the method's penalty: the single place where methods add loss terms.
    ``net`` is ``model`` or its DDP wrapper; the penalty sees ``model``. With a ``forward_dtype``
    only the forward pass runs under autocast; the loss and the penalty are float32."""
    captured.clear()
    if forward_dtype is None:
        logits = net(x)
    else:
        with torch.autocast(x.device.type, dtype=forward_dtype):
            logits = net(x).float()
    loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
    if extensions.penalty is not None:
        context = StepContext(loss=loss, activations=list(captured), epoch=epoch, epochs=config.epochs,
                              step=global_step)
        loss = loss + extensions.penalty(model, context)
    return loss, logits


@torch.no_grad()
def _step_hooks(model, hooks, epoch: int, step: int) -> None:
    for hook in hooks:
        hook(model, epoch, step)


@torch.no_grad()
def _epoch_hooks(model, hooks, epoch: int, stats: dict) -> dict:
    """The values the epoch hooks return, checked not to overwrite the loop's own statistics."""
    record: dict = {}
    for hook in hooks:
        values = hook(model, epoch)
        if values is None:
            continue
        if not isinstance(values, dict):
            raise TypeError(f"an on_epoch_end hook must return a dict of numbers or None, got {type(values).__name__}")
        clash = sorted(set(values) & (set(stats) | set(record)))
        if clash:
            raise ValueError(f"on_epoch_end hook values {clash} would overwrite history entries; rename them")
        record.update(values)
    return record


def _capture_inputs(model: nn.Module, captured: list[torch.Tensor]) -> list:
    def hook(_module, inputs):
        captured.append(inputs[0])

    return [m.register_forward_pre_hook(hook) for _, m in weighted_layers(model)]


def _guard_finite(loss: torch.Tensor, epoch: int, step: int) -> None:
    if not torch.isfinite(loss):
        raise NonFiniteLossError(
            f"loss became {loss.item()} at epoch {epoch + 1}, step {step}; "
            "lower the learning rate or the regularization strength (lam)"
        )


# --- construction --------------------------------------------------------------------------------


def _decay_groups(model: nn.Module) -> list[dict]:
    """Weight decay on conv/linear weights only, not on BatchNorm parameters, biases or scales."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() > 1 else no_decay).append(param)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    groups = _decay_groups(model)
    if config.optimizer == "adam":
        return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        groups, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0,
        weight_decay=config.weight_decay,
    )


def _make_scheduler(optimizer, config: TrainConfig, steps_per_epoch: int):
    total = config.epochs * steps_per_epoch
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total)
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)


def _progress_bar(config: TrainConfig, steps_per_epoch: int, start_epoch: int, enabled: bool, desc: str):
    # A saved notebook keeps every refresh of a bar as a line of its own, so off a terminal the
    # bar is off and _log_epoch prints one line per epoch instead. Both go to stderr: stdout
    # carries only results (the CLI's JSON).
    return tqdm(
        total=config.epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch, desc=desc,
        disable=not (enabled and sys.stderr.isatty()), ncols=78, file=sys.stderr, unit="step",
        bar_format="{desc}: {percentage:3.0f}%|{bar:16}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]",
    )


def _log_epoch(stats: dict, epochs: int, desc: str, bar) -> None:
    if bar.disable:
        val = f", val acc {stats['val_acc']:.1%}" if "val_acc" in stats else ""
        print(
            f"{desc}: epoch {stats['epoch']}/{epochs}  loss {stats['loss']:.3f}, train acc "
            f"{stats['train_acc']:.1%}{val}  [{stats['wall_time_s']:.0f} s, {stats['images_per_s']:.0f} img/s]",
            file=sys.stderr, flush=True,
        )


# --- evaluation ----------------------------------------------------------------------------------


def evaluate(model: nn.Module, loader: BatchLoader) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` (in eval mode) over ``loader``.

    Runs in channels_last (1.7x faster convolutions on this CPU, same predictions) and leaves the
    model as it found it: memory format and train/eval mode."""
    was_training, memory_format = model.training, _memory_format(model)
    model.eval().to(memory_format=torch.channels_last)
    correct = total = 0
    try:
        with torch.inference_mode():
            for x, y in loader:
                correct += int((model(x.contiguous(memory_format=torch.channels_last)).argmax(1) == y).sum())
                total += len(y)
    finally:
        model.to(memory_format=memory_format).train(was_training)
    return correct / total


def _memory_format(model: nn.Module) -> torch.memory_format:
    """channels_last if the model's 4-D parameters are stored so, else contiguous (judged on the
    first one whose layout tells the two apart: a 1-channel kernel is both)."""
    for weight in (p for p in model.parameters() if p.dim() == 4):
        if weight.is_contiguous() != weight.is_contiguous(memory_format=torch.channels_last):
            return torch.contiguous_format if weight.is_contiguous() else torch.channels_last
    return torch.contiguous_format


# --- checkpoints ---------------------------------------------------------------------------------


def _save_checkpoint(path: Path, model, optimizer, scheduler, history, best_state=None) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "history": history,
    }
    if best_state is not None:  # checkpoint selection's best epoch so far, for a resumed run
        state["best"] = best_state
    save_atomic(state, path)


def save_atomic(obj, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: never half a file."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def _resume(path: Path | None, model, optimizer, scheduler, device) -> tuple[list[dict], int, dict | None]:
    if path is None or not Path(path).exists():
        return [], 0, None
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # a truncated or corrupt file: start over rather than crash
        print(f"robustq: ignoring unreadable checkpoint {path} ({type(error).__name__}: {error}); training from scratch",
              file=sys.stderr, flush=True)
        return [], 0, None
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return list(state["history"]), len(state["history"]), state.get("best")


__all__ = [
    "Extensions",
    "NonFiniteLossError",
    "StepContext",
    "TrainConfig",
    "TrainResult",
    "autocast_dtype",
    "default_device",
    "evaluate",
    "save_atomic",
    "train",
]
