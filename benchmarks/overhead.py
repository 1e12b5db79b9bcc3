"""Training-time overhead of each method: step time / baseline step time on the book `cnn`.

Claim (issue targets): SymReg <= 1.15x, SatNL <= 1.05x, KURE <= 1.05x, SinReQ <= 1.05x (measured
against its QAT quantizer alone), oscillation <= 1.10x, SAM/ASAM <= 2.1x, gradient-l1 <= 3.5x. The
SymReg paper reports +2.53% training time for its methods (MobileNet-V2, ImageNet, GPU). The loop
trains in channels_last except under double backprop, where that layout is ~3x slower on CPU, so
gradient-l1 is shown against both the channels_last baseline and a contiguous one, and against
the floor of its double backprop (the same second-order pass with a plain sum as penalty): a
gradient-l1 step at that floor costs nothing beyond double backprop itself.

Each method trains one epoch of a 7,680-image Fashion-MNIST subset (batch 256) through the same
`robustq.train.train` loop; rounds are interleaved across methods and the median of ROUNDS is kept,
so slow drifts of the machine hit every method alike. CPU, default torch threads.

    .venv/bin/python benchmarks/overhead.py
"""

from __future__ import annotations

import statistics
import time

import torch

from robustq import methods, models
from robustq.data import load_dataset
from robustq.models import weighted_layers
from robustq.train import StepContext, TrainConfig, train

SUBSET, BATCH, ROUNDS = 7_680, 256, 3
CONTIGUOUS = "baseline_contiguous"  # the baseline without channels_last, the layout gradient-l1 must use
# The same double backprop as gradient-l1 (gradients of the loss w.r.t. every conv/linear weight and
# input, differentiated again) with the cheapest penalty on them, a plain sum: the floor
# gradient-l1's own step time is measured against.
FLOOR = "double_backprop_floor"
# method -> (reference method, target ratio)
TARGETS = {
    "symreg": ("baseline", 1.15),
    "satnl": ("baseline", 1.05),
    "kure": ("baseline", 1.05),
    "sinreq_wrpn": ("wrpn", 1.05),
    "oscillation": ("baseline", 1.10),
    "sam": ("baseline", 2.1),
    "asam": ("baseline", 2.1),
    "satnl_asam": ("baseline", 2.1),
    "grad_l1": ("baseline", 3.5),
    CONTIGUOUS: ("baseline", None),
    "grad_l1 ": (CONTIGUOUS, 3.5),
    FLOOR: (CONTIGUOUS, None),
    " grad_l1": (FLOOR, None),
    "qat_ste": ("baseline", None),
    "qat_lsq": ("baseline", None),
    "wrpn": ("baseline", None),
}


def floor_penalty(model, context: StepContext) -> torch.Tensor:
    tensors = [m.weight for _, m in weighted_layers(model)] + [a for a in context.activations if a.requires_grad]
    grads = torch.autograd.grad(context.loss, tensors, create_graph=True)
    return torch.stack([g.sum() for g in grads]).sum()


def epoch_time(name: str, data) -> float:
    torch.manual_seed(0)
    method = methods.make("baseline" if name in (CONTIGUOUS, FLOOR) else name)
    model = method.prepare(models.make_model("cnn", 1, 10))
    extensions = method.extensions(model)
    extensions.double_backprop = extensions.double_backprop or name in (CONTIGUOUS, FLOOR)
    if name == FLOOR:
        extensions.penalty, extensions.capture_activations = floor_penalty, True
    start = time.perf_counter()
    train(model, data, TrainConfig(epochs=1, batch_size=BATCH, lr=0.01), extensions, progress=False)
    return time.perf_counter() - start


def main() -> None:
    data = load_dataset("fashion-mnist", train_size=SUBSET)
    names = ["baseline", *dict.fromkeys(name.strip() for name in TARGETS)]
    epoch_time("baseline", data)  # warm-up
    times = {name: [] for name in names}
    for _ in range(ROUNDS):
        for name in names:
            times[name].append(epoch_time(name, data))
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"{'method':20s} {'s/epoch':>8s} {'vs':>20s} {'ratio':>6s} {'target':>7s}")
    print(f"{'baseline':20s} {median['baseline']:8.2f}")
    for label, (reference, target) in TARGETS.items():
        name = label.strip()
        ratio = median[name] / median[reference]
        verdict = "" if target is None else f"<= {target:.2f} {'PASS' if ratio <= target else 'MISS'}"
        print(f"{name:20s} {median[name]:8.2f} {reference:>20s} {ratio:6.2f} {verdict}")


if __name__ == "__main__":
    main()
