"""Gradients of the loss against the quantization error: the first-order bound behind gradient-ℓ1
(chapter 05; :func:`grad_l1_norm` also in :mod:`robustq.book_settings`) and the STE gradient of QAT
split into the float gradient and a push off the levels (chapter 07).

* gradient-ℓ1 (Alizadeh et al., ICLR 2020, arXiv 2002.07520; book/methods.md §2):
  :func:`grad_l1_norm`, ``sum_l ||dL/dW_l||_1``, and :func:`first_order_bound`, how well
  ``dW . grad L`` predicts the loss change and how far ``sum_l (Delta_l / 2) ||dL/dW_l||_1`` sits
  above it.
* the STE (Wenshøj, Pepin & Selvan, arXiv 2502.00490; book/methods.md §4):
  :func:`ste_gradient_decomposition`, ``grad_STE L(q(W)) = grad L(W) + (q(W) - W) C`` on a linear
  model.

Pure functions, tensors and models in, numbers and ``pandas`` frames out; ``model`` is never changed.

>>> net = nn.Linear(2, 2)
>>> _ = nn.init.zeros_(net.weight), nn.init.zeros_(net.bias)
>>> grad_l1_norm(net, torch.tensor([[1.0, 2.0]]), torch.tensor([0]))  # dL/dW = (-1/2, 1/2) x (1, 2)
3.0
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from robustq import models, ptq, quant, regularizers
from robustq.analysis._common import _minmax_step
from robustq.quant import QuantSpec

# --- gradient-ℓ1: the first-order bound (chapter 05) ---------------------------------------------


def grad_l1_norm(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, *, loss_fn=F.cross_entropy) -> float:
    """``sum_l ||dL/dW_l||_1`` over every conv and linear weight: the weight term of gradient-ℓ1
    regularization (Alizadeh et al., ICLR 2020, arXiv 2002.07520; book/methods.md §2) with unit
    strength and no weighting, measured on a trained model.

    ``L = loss_fn(model(x), labels)`` on the fixed batch, with a plain eval-mode copy of the model
    (BN on its running statistics; SatNL and QAT weights replaced by their values), so two models
    are compared as they deploy. ``model`` is left as it is.
    """
    plain = ptq.materialize(model)
    _, grads = _loss_and_weight_grads(plain, x, labels, loss_fn)
    return float(sum(g.abs().sum() for g in grads))


def first_order_bound(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    bit_widths: Sequence[int],
    a_bits: int | None = None,
    *,
    first_last_8bit: bool = True,
    loss_fn=F.cross_entropy,
    dtype: torch.dtype = torch.float64,
) -> pd.DataFrame:
    """The first-order view of weight quantization behind gradient-ℓ1 regularization (Alizadeh et
    al., ICLR 2020, arXiv 2002.07520; book/methods.md §2): how well ``dW . grad L`` predicts the loss
    change, and how far the [paper] bound ``sum_l (Delta_l / 2) ||dL/dW_l||_1`` sits above it.

    Each bit-width ``b`` deploys the weights as the book's primary setting does
    (:func:`robustq.ptq.quantize_model` with ``QuantSpec(b)``: symmetric per-tensor min-max, BN
    unfolded, the stem and the classifier at 8 bits unless ``first_last_8bit=False``). One row per
    ``b`` (``w_bits``):

    * ``loss_float``, ``loss_quantized``: ``L(W)`` and ``L(q(W))`` on ``(x, labels)``;
    * ``loss_change``: ``L(q(W)) - L(W)``;
    * ``first_order``: ``sum_l <q(W_l) - W_l, dL/dW_l>``, the gradient taken at ``W``;
    * ``bound``: ``sum_l (Delta_l / 2) ||dL/dW_l||_1`` with ``Delta_l`` the step layer ``l`` is
      quantized with at ``b`` (8 bits for the edges), so ``|first_order| <= bound`` always;
    * ``ratio``: ``loss_change / first_order`` (NaN when ``first_order`` is 0); near 1 where the
      first-order term explains the loss change.

    Sums run over every conv/linear weight; biases and BN stay in float. Models are evaluated in
    eval mode on copies (``model`` is left as it is), in ``dtype`` (float64 by default: at 8 bits
    the loss change is small enough for float32 rounding to blur it); weights are quantized in the
    model's own dtype, as deployed. Weights only: ``a_bits`` must be None, because quantized
    activations would need calibration and a first-order term of their own.
    """
    if a_bits is not None:
        raise ValueError(
            f"first_order_bound quantizes weights only, got a_bits={a_bits!r}: pass a_bits=None "
            "(activation quantization would need calibration and its own first-order term)"
        )
    bit_widths = [quant.validate_bit_width(b) for b in bit_widths]
    if not bit_widths:
        raise ValueError("bit_widths must hold at least one bit-width, e.g. [8, 4, 3, 2]")
    plain = ptq.materialize(model)
    reference = copy.deepcopy(plain).to(dtype)
    x, labels = _in_dtype(x, dtype), _in_dtype(labels, dtype)
    loss_float, grads = _loss_and_weight_grads(reference, x, labels, loss_fn)
    rows = []
    for bit_width in bit_widths:
        quantized = ptq.quantize_model(model, QuantSpec(bit_width), fold=False, first_last_8bit=first_last_8bit)
        half_steps = _deployed_half_steps(plain, bit_width, first_last_8bit)
        deltas = _weight_deltas(quantized, plain, half_steps, dtype)
        loss_quantized = _loss(quantized.to(dtype), x, labels, loss_fn)
        first_order = float(sum((d * g).sum() for d, g in zip(deltas, grads)))
        bound = float(sum(h * g.abs().sum() for h, g in zip(half_steps, grads)))
        change = loss_quantized - loss_float
        rows.append({
            "w_bits": bit_width, "loss_float": loss_float, "loss_quantized": loss_quantized,
            "loss_change": change, "first_order": first_order, "bound": bound,
            "ratio": change / first_order if first_order != 0 else math.nan,
        })
    return pd.DataFrame(rows)


def _in_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floating tensors (inputs, regression targets) in ``dtype``; class labels as they are."""
    return t.to(dtype) if t.is_floating_point() else t


def _loss(net: nn.Module, x: torch.Tensor, labels: torch.Tensor, loss_fn) -> float:
    with torch.no_grad():
        return float(loss_fn(net.eval()(x), labels))


def _loss_and_weight_grads(net: nn.Module, x, labels, loss_fn) -> tuple[float, list[torch.Tensor]]:
    """``L`` and ``dL/dW_l`` of each conv/linear weight of ``net`` (a copy: its weights are made
    differentiable even if they were frozen)."""
    weights = [m.weight.requires_grad_(True) for _, m in ptq.weighted_layers(net)]
    with torch.enable_grad():
        loss = loss_fn(net.eval()(x), labels)
        grads = torch.autograd.grad(loss, weights)
    return float(loss.detach()), [g.detach() for g in grads]


def _deployed_half_steps(plain: nn.Module, bit_width: int, first_last_8bit: bool) -> list[float]:
    """``Delta_l / 2`` of each conv/linear weight as :func:`robustq.ptq.quantize_model` deploys it
    at ``bit_width``: the stem and the classifier at ``max(8, b)`` when ``first_last_8bit``."""
    edges = models.edge_layers(plain, first_last_8bit)
    return [_minmax_step(m.weight, quant.edge_bits(bit_width) if name in edges else bit_width) / 2
            for name, m in ptq.weighted_layers(plain)]


def _weight_deltas(quantized: nn.Module, plain: nn.Module, half_steps: list[float],
                   dtype: torch.dtype) -> list[torch.Tensor]:
    """``q(W_l) - W_l`` per layer in ``dtype``, checked against ``|q(W_l) - W_l| <= Delta_l / 2``
    (up to the rounding of the weights' own dtype): a step that disagrees with the quantizer would
    make ``bound`` wrong without any other sign."""
    deltas = []
    for (name, q), (_, w), half_step in zip(ptq.weighted_layers(quantized), ptq.weighted_layers(plain), half_steps):
        weight = w.weight.detach()
        delta = q.weight.detach().to(dtype) - weight.to(dtype)
        rounding = 4 * torch.finfo(weight.dtype).eps * float(weight.abs().max())
        if float(delta.abs().max()) > half_step + rounding:
            raise RuntimeError(
                f"first_order_bound: layer {name!r} moved by {float(delta.abs().max()):.3g} > Delta/2 = "
                f"{half_step:.3g}; the steps here no longer match ptq.quantize_model's quantizer: update "
                "_deployed_half_steps"
            )
        deltas.append(delta)
    return deltas


# --- the STE gradient of QAT, decomposed (chapter 07) ---


def _relative_gap(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``max|value - reference| / max|reference|``: the largest difference in units of the largest
    entry (elementwise ratios blow up where an entry is near 0)."""
    scale = reference.abs().max().clamp_min(torch.finfo(reference.dtype).tiny)
    return float((value - reference).abs().max() / scale)


def _maxabs_quantize(w: torch.Tensor, bit_width: int) -> torch.Tensor:
    """The oscillation regularizer's quantizer, ``s round_ste(w / s)``, ``s = max|w| / (2^(b-1) - 1)``
    detached: a straight-through QAT with a constant step (book/methods.md §4)."""
    _, qmax = quant.qrange(bit_width)
    scale = (w.detach().abs().max() / qmax).clamp_min(torch.finfo(w.dtype).tiny)
    return scale * quant.round_ste(w / scale)


def ste_gradient_decomposition(
    x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, bit_width: int
) -> dict[str, float]:
    """C7.1: the STE gradient of QAT on a linear model is the float gradient plus a term that
    pushes weights off their level (Wenshøj, Pepin & Selvan, arXiv 2502.00490; book/methods.md §4 [recon]).

    Model ``y_hat = W x`` (``w`` of shape ``(d,)`` for one output, ``(m, d)`` for a layer; ``x`` of
    shape ``(n, d)``, or ``(n,)`` with ``w`` a scalar for the 1-D case; ``y`` of shape ``(n,)`` or
    ``(n, m)``), loss ``L(W) = 1/2 mean_n ||y_n - W x_n||^2``, quantizer ``q`` of
    :func:`_maxabs_quantize` at ``bit_width``. Then exactly
    ``grad_STE L(q(W)) = grad L(W) + (q(W) - W) C`` with ``C = mean_n x_n x_n^T``; for one input
    ``C = E[x^2]`` and the term is the gradient of ``1/2 E[x^2] (q(w)^2 - w^2)``. All in float64.

    Returns ``identity_error``, the largest difference between the STE gradient (autograd, forward
    through ``q``) and ``grad L(W) + (q(W) - W) C`` relative to the largest STE gradient entry
    (the identity holds iff it is at rounding level, <= 1e-5); ``regularizer_error``, the same for
    the autograd gradient of :func:`robustq.regularizers.oscillation` against ``2 (q(W) - W) / N``
    (``N`` weights); ``equivalent_lam = N mean(diag C) / 2``, the strength at which the
    regularizer's gradient equals the QAT term when ``C`` is a multiple of the identity; and
    ``regularizer_match``, the gap between ``(q(W) - W) C`` and ``equivalent_lam`` times the
    regularizer's gradient: 0 (to rounding) for one input, otherwise the share of the QAT term that
    input correlations and unequal input scales add [recon].
    """
    xs, ys, weight = _linear_problem(x, y, w)
    n_weights = weight.numel()
    leaf = weight.clone().requires_grad_(True)
    quantized = _maxabs_quantize(leaf, bit_width)
    ste = torch.autograd.grad(_half_mse(xs, ys, quantized), leaf)[0]
    float_grad = torch.autograd.grad(_half_mse(xs, ys, leaf), leaf)[0]
    moment = xs.T @ xs / xs.shape[0]
    push = (quantized.detach() - weight) @ moment
    reg_grad = torch.autograd.grad(regularizers.oscillation(leaf, bit_width), leaf)[0]
    lam = n_weights * float(torch.diagonal(moment).mean()) / 2
    return {
        "identity_error": _relative_gap(float_grad + push, ste),
        "regularizer_error": _relative_gap(reg_grad, 2 * (quantized.detach() - weight) / n_weights),
        "equivalent_lam": lam,
        "regularizer_match": _relative_gap(lam * reg_grad, push),
    }


def _linear_problem(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(x, y, W)`` as float64 ``(n, d)``, ``(n, m)`` and ``(m, d)`` tensors, shapes checked."""
    weight = w.detach().to(torch.float64)
    weight = weight.reshape(1, -1) if weight.dim() <= 1 else weight
    xs = x.detach().to(torch.float64)
    xs = xs.reshape(-1, 1) if xs.dim() == 1 else xs
    fits = weight.dim() == 2 and xs.dim() == 2 and xs.shape[1] == weight.shape[1]
    if not fits or y.numel() != xs.shape[0] * weight.shape[0] or y.shape[0] != xs.shape[0]:
        raise ValueError(
            f"shapes do not make a linear model y = W x: x {tuple(x.shape)}, y {tuple(y.shape)}, "
            f"w {tuple(w.shape)}; pass x (n, d), w (d,) or (m, d), y (n,) or (n, m)"
        )
    return xs, y.detach().to(torch.float64).reshape(xs.shape[0], -1), weight


def _half_mse(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return 0.5 * (y - x @ weight.T).pow(2).sum(dim=1).mean()
