"""Training-time regularizers for quantization robustness: tensors in, scalar tensor out.

Each function penalises one tensor (or, for ``grad_l1``, a list of tensors); which layers get a
penalty and with what strength is decided elsewhere (the registry), not here. Every penalty is
differentiable with respect to its input, and the smooth ones (``sym_reg``, ``kure``, ``sinreq``)
run in pure torch so that they pass ``torch.autograd.gradcheck`` in float64.

Provenance tags follow ``book/methods.md``: [paper], [code], [summary], [recon]. A docstring
marked [recon] describes our reconstruction, not the authors' published formula. Each docstring
states the formula it implements in full and points to the section of ``book/methods.md`` that
records its source; paper equation numbers are cited only where we could check them.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence

import torch

from robustq.params import check_choice
from robustq.quant import qrange, round_ste, validate_bit_width

SYM_PAIRINGS = ("1:1", "2:2")
SYM_SCOPES = ("layer", "channel", "kernel")
SINREQ_GRIDS = ("wrpn", "dorefa")
SINREQ_SCHEDULES = ("constant", "tanh")
SINREQ_DOMAINS = ("raw", "normalized")  # the latent weights, or what the QAT quantizer rounds
GRAD_L1_WEIGHTINGS = ("none", "step")  # every term unweighted, or by its half-step as in the bound
KURTOSIS_OF_UNIFORM = 1.8
SYM_REG_EPS = 1e-12


# --- SymReg (Park, Jang & Park, ECCV 2022, arXiv 2208.00338) -------------------------------------


def sym_reg(
    w: torch.Tensor,
    pairing: str = "1:1",
    scope: str = "layer",
    normalize: bool = True,
) -> torch.Tensor:
    """Order-statistic symmetry penalty, SymReg of Park, Jang & Park (ECCV 2022, arXiv 2208.00338).

    [summary] SymReg pushes the weight distribution towards symmetry about zero, so that an odd
    quantizer leaves the mean of the weights (and so the expected output) unchanged; it has a 1:1
    and a cheaper 2:2 variant and needs a sort. The formula itself is **our reconstruction**
    [recon] (book/methods.md §1; the paper's equations were not available to us).

    **Sets.** ``w`` is split into sets of weights, each penalised on its own; the result is the
    mean over sets. The source does not say at which scope symmetry is enforced, and it matters:
    the expected shift of output ``c`` is ``sum_i dW_ci E[x_i]``, so only row ``c`` counts and
    each input ``i`` has its own mean. So the scope is exposed [recon]:

    * ``scope="layer"``: the whole tensor is one set;
    * ``scope="channel"``: each output row ``w.reshape(w.shape[0], -1)`` is a set;
    * ``scope="kernel"``: each (output, input) slice ``w.reshape(out, in, -1)[o, i]`` of a conv
      weight (its ``k x k`` values) is a set. Where such a slice holds a single weight (Linear
      weights, 1x1 convs, tensors of fewer than 3 dims) ``kernel`` falls back to ``channel``.

    **Penalty of one set.** With its ``N`` weights sorted, ``w_(1) <= ... <= w_(N)``:

    * ``pairing="1:1"``: ``L = (1/N) sum_{k <= ceil(N/2)} (w_(k) + w_(N+1-k))^2``. For odd ``N``
      the last term pairs the median with itself, ``(2 w_med)^2``: a symmetric set has median 0.
    * ``pairing="2:2"``: with ``G = N // 4`` groups of two in each tail and ``m_1 <= ... <= m_r``
      the ``r = N mod 4`` middle weights ``w_(2G+1) .. w_(N-2G)`` that the groups leave over,
      ``L = (1/N) [sum_{k <= G} (w_(2k-1) + w_(2k) + w_(N+1-2k) + w_(N+2-2k))^2
      + sum_{j <= ceil(r/2)} (m_j + m_(r+1-j))^2]``: the middle is paired 1:1, odd ``r`` with the
      median term ``(2 m_med)^2``.

    ``1:1`` is zero iff the set mirrors about zero (``w_(k) = -w_(N+1-k)`` for all ``k``). ``2:2``
    is zero on every mirrored set, but only asks the tails to mirror in sums of two, so some
    asymmetric sets also score zero (e.g. ``[-3, -1, 2, 2]``).

    **Normalisation.** ``normalize=True`` [recon] divides each set's ``L`` by a spread (plus
    ``1e-12``) so that the strength ``lambda`` does not depend on the scale of the weights: the
    population variance of the set in ``layer`` and ``channel`` scope; in ``kernel`` scope that of
    the output row the kernel belongs to (the quantization step is shared by the row, and a
    kernel's few values can have a near-zero variance that would blow the penalty up). A single
    weight has no variance, and no scale-free penalty can tell more than whether it is zero, so a
    set (or row) of one weight is divided by its mean of squares ``w^2`` instead: a lone nonzero
    weight scores exactly 4 with a vanishing gradient instead of ``4 w^2 / 1e-12``. To shrink lone
    weights towards zero use ``normalize=False`` (``L = 4 w^2``). A layer or row of several equal
    weights still divides by ``1e-12``, as before.

    >>> sym_reg(torch.tensor([0.0, 1.0, 2.0, 5.0]), normalize=False)  # ((0 + 5)^2 + (1 + 2)^2) / 4
    tensor(8.5000)
    >>> sym_reg(torch.tensor([-2.0, -1.0, 1.0, 2.0]))
    tensor(0.)
    >>> odd = torch.tensor([-2.0, -1.0, 0.5, 1.0, 2.0])  # median 0.5: (2 * 0.5)^2 / 5
    >>> sym_reg(odd, normalize=False), sym_reg(odd, "2:2", normalize=False)
    (tensor(0.2000), tensor(0.2000))
    >>> conv = torch.tensor([[[[-1.0, 0.0, 1.0]], [[1.0, 2.0, 3.0]]]])  # 1 output, 2 inputs, 1x3
    >>> sym_reg(conv, scope="kernel", normalize=False)  # (0 + ((1 + 3)^2 + (2 * 2)^2) / 3) / 2
    tensor(5.3333)
    >>> sym_reg(conv, scope="channel", normalize=False)  # ((-1 + 3)^2 + (0 + 2)^2 + (1 + 1)^2) / 6
    tensor(2.)
    """
    check_choice("pairing", pairing, SYM_PAIRINGS)
    check_choice("scope", scope, SYM_SCOPES)
    sets = _symmetry_sets(w, scope)
    ordered = torch.sort(sets, dim=1).values
    sums = _one_to_one_sums(ordered) if pairing == "1:1" else _two_to_two_sums(ordered)
    penalty = sums.pow(2).sum(dim=1) / sets.shape[1]
    if normalize:
        penalty = penalty / (_set_spread(w, scope, n_sets=sets.shape[0]) + SYM_REG_EPS)
    return penalty.mean()


def _symmetry_sets(w: torch.Tensor, scope: str) -> torch.Tensor:
    """The sets of ``scope`` as the rows of a 2-D ``[sets, N]`` tensor."""
    if w.numel() == 0:
        raise ValueError("w must not be empty")
    if scope == "layer":
        return w.reshape(1, -1)
    if w.dim() == 0:
        raise ValueError(f"scope={scope!r} needs a tensor with an output-channel axis, got a scalar")
    if scope == "kernel" and _kernel_size(w) > 1:
        return w.reshape(w.shape[0] * w.shape[1], -1)
    return w.reshape(w.shape[0], -1)


def _kernel_size(w: torch.Tensor) -> int:
    return math.prod(w.shape[2:]) if w.dim() >= 3 else 1


def _set_spread(w: torch.Tensor, scope: str, n_sets: int) -> torch.Tensor:
    """Per-set denominator of ``normalize=True``: the spread of the set's layer or row."""
    reference = _symmetry_sets(w, "layer" if scope == "layer" else "channel")
    if reference.shape[1] == 1:
        spread = reference.pow(2).mean(dim=1)
    else:
        spread = reference.var(dim=1, unbiased=False)
    # kernel scope: each row holds n_sets / rows consecutive kernels, all sharing its spread
    return spread.repeat_interleave(n_sets // reference.shape[0])


def _one_to_one_sums(ordered: torch.Tensor) -> torch.Tensor:
    """``w_(k) + w_(N+1-k)`` for ``k <= ceil(N/2)``: an odd set's median is paired with itself."""
    half = (ordered.shape[1] + 1) // 2
    return ordered[:, :half] + ordered.flip(1)[:, :half]


def _two_to_two_sums(ordered: torch.Tensor) -> torch.Tensor:
    """Sums of the k-th lowest pair and the k-th highest pair, then the ``N mod 4`` middle
    weights that the pairs leave over, paired 1:1."""
    n_sets, n = ordered.shape
    n_groups = n // 4
    width = 2 * n_groups
    low = ordered[:, :width].reshape(n_sets, n_groups, 2).sum(dim=2)
    high = ordered.flip(1)[:, :width].reshape(n_sets, n_groups, 2).sum(dim=2)
    middle = _one_to_one_sums(ordered[:, width : n - width])
    return torch.cat([low + high, middle], dim=1)


# --- KURE (Shkolnik et al., NeurIPS 2020, arXiv 2002.07686) ---------------------------------------


def kure(w: torch.Tensor, target: float = KURTOSIS_OF_UNIFORM) -> torch.Tensor:
    """Kurtosis regularization, KURE (Shkolnik et al., NeurIPS 2020, arXiv 2002.07686; book/methods.md §5).

    [code] ``(mean(((w - mu) / sigma)^4) - target)^2`` with ``sigma`` the unbiased standard
    deviation, as in the released code; ``target=1.8`` is the kurtosis of a uniform law. The
    paper's average over layers (``1/L sum_l``) is the caller's job.
    """
    if w.numel() < 2:
        raise ValueError(f"kure needs at least 2 weights to estimate a kurtosis, got {w.numel()}")
    flat = w.reshape(-1)
    standardized = (flat - flat.mean()) / flat.std()
    return (standardized.pow(4).mean() - target).pow(2)


# --- SinReQ (Elthakeb et al., arXiv 1905.01416) --------------------------------------------------


def sinreq_grid(bit_width: int, grid: str = "wrpn") -> tuple[float, float]:
    """Step ``delta`` and ``shift`` of SinReQ's sinusoid (Elthakeb et al., arXiv 1905.01416; book/methods.md §3),
    as in the released code [code]: WRPN ``delta = 1/(2^(k-1) - 1)``, shift 0; DoReFa
    ``delta = 2/(2^k - 1)``, shift ``delta/2`` (zeros on DoReFa's levels ``2i/(2^k - 1) - 1``)."""
    bit_width = validate_bit_width(bit_width)
    check_choice("grid", grid, SINREQ_GRIDS)
    if grid == "wrpn":
        return 1.0 / (2 ** (bit_width - 1) - 1), 0.0
    step = 2.0 / (2**bit_width - 1)
    return step, step / 2


def sinreq(w: torch.Tensor, bit_width: int, grid: str = "wrpn") -> torch.Tensor:
    """Sinusoidal quantization regularizer, SinReQ (Elthakeb et al., arXiv 1905.01416; book/methods.md §3).

    [code] ``mean(sin^2(pi (w + shift) / delta))`` with ``delta, shift`` from ``sinreq_grid``:
    zero on the quantization grid, one half-way between levels. As in the released code, the
    DoReFa sinusoid acts on the **raw** weights, although DoReFa's grid lives in the
    tanh-normalised domain (book/methods.md §3 and §8); we copy that behaviour rather than fix it.
    The sum over layers and the strength (see ``sinreq_lambda``) are the caller's job.
    """
    step, shift = sinreq_grid(bit_width, grid)
    return torch.sin(math.pi * (w + shift) / step).pow(2).mean()


def sinreq_lambda(epoch: float, epochs: int, ramp: float = 20.0) -> float:
    """Strength schedule ``0.5 (1 + tanh((epoch - 0.2 E) / ramp))`` of SinReQ's learned-bit-width
    script (Elthakeb et al., arXiv 1905.01416; book/methods.md §3).

    [code] Only ``compress_classifier_sinreq-Learn_cifar10.py`` (WaveQ's learned bit-widths) ramps
    the strength this way, with ``ramp = 20``; the fixed-bit scripts use a constant strength
    (``cost_factor = 1`` in ``compress_classifier_sinreq_v2.py``), which ``methods.SinReQ`` uses by
    default (``schedule="constant"``). The released runs last hundreds of epochs, where a ramp of
    20 epochs is short; for a run of a few epochs pass a smaller ``ramp`` (e.g. ``0.1 * epochs``) so
    that the strength actually rises from ~0 to ~1 within the run. ``ramp=20`` reproduces the code.

    >>> sinreq_lambda(epoch=40, epochs=200)
    0.5
    """
    if epochs <= 0:
        raise ValueError(f"epochs must be a positive number of epochs, got {epochs!r}")
    if not ramp > 0:
        raise ValueError(f"ramp must be > 0 (in epochs), got {ramp!r}")
    return 0.5 * (1.0 + math.tanh((epoch - 0.2 * epochs) / ramp))


# --- Oscillation-inducing regularizer (Wenshøj, Pepin & Selvan, arXiv 2502.00490) ----------------


def oscillation(w: torch.Tensor, bit_width: int, detach_scale: bool = True) -> torch.Tensor:
    """Oscillation-inducing regularizer of Wenshøj, Pepin & Selvan (2025, arXiv 2502.00490; book/methods.md §4).

    [code] ``mean(q(w)^2 - w^2)`` with the symmetric per-tensor max-abs quantizer
    ``s = max|w| / (2^(b-1) - 1)``, ``q(w) = s * round(w / s)`` and a straight-through round.
    With ``detach_scale=True`` (our default) the gradient is exactly ``2 (q(w) - w) / N``, the
    push away from the nearest level that the paper describes. ``detach_scale=False`` reproduces
    the released code, where the scale is not detached, so the gradient also flows through
    ``s = max|w| / (2^(b-1)-1)`` into the largest weight (book/methods.md §8).
    """
    _, qmax = qrange(bit_width)
    if w.numel() == 0:
        raise ValueError("w must not be empty")
    scale = (w.abs().max() / qmax).clamp_min(torch.finfo(w.dtype).tiny)
    if detach_scale:
        scale = scale.detach()
    quantized = scale * round_ste(w / scale)
    return (quantized.pow(2) - w.pow(2)).mean()


# --- Gradient L1 (Alizadeh et al., ICLR 2020, arXiv 2002.07520) ----------------------------------


def grad_l1(
    loss: torch.Tensor,
    tensors: Iterable[torch.Tensor],
    scales: Sequence[float] | None = None,
    transforms: Sequence[Callable[[torch.Tensor], torch.Tensor] | None] | None = None,
) -> torch.Tensor:
    """Gradient-L1 penalty ``sum_t scale_t ||dL/dt||_1`` of Alizadeh et al. (ICLR 2020,
    arXiv 2002.07520; book/methods.md §2).

    [paper] The first-order loss change under an l_inf-bounded quantization perturbation is
    bounded by ``(delta/2) ||grad L||_1``. [recon] The gradients come from double backprop
    (``torch.autograd.grad(..., create_graph=True)``), so the result is differentiable with
    respect to the model parameters. ``tensors`` may be weights or activations captured with
    forward hooks (non-leaf tensors of the same graph). ``scales`` (default all 1) weights each
    tensor's term, e.g. ``lambda_w`` for weights and ``lambda_a`` for activations; tensors with
    scale 0 are not differentiated at all. Tensors that do not require grad or that ``loss`` does
    not depend on contribute 0. No batch rescaling is applied: with a batch-mean loss the
    activation gradients scale as 1/batch, a choice the caller reports (book/methods.md §8).
    The [paper] bound's weighting of each weight tensor by its half-step is
    ``scales = grad_l1_half_steps(weights, b)`` (times the strength). ``transforms`` (default
    none) maps a tensor's gradient before its norm, differentiably: under DDP the weight gradients
    pass through ``robustq.distributed.mean_across_ranks``, so the norm is of the global batch's
    gradient.
    """
    tensors = list(tensors)
    if not tensors:
        raise ValueError("tensors must hold at least one tensor, got an empty sequence")
    if loss.numel() != 1:
        raise ValueError(f"loss must be a scalar, got a tensor of shape {tuple(loss.shape)}")
    scales = [1.0] * len(tensors) if scales is None else [float(x) for x in scales]
    if len(scales) != len(tensors):
        raise ValueError(f"scales must have one entry per tensor ({len(tensors)}), got {len(scales)}")
    if any(not x >= 0 for x in scales):
        raise ValueError(f"scales must be >= 0, got {scales}")
    transforms = [None] * len(tensors) if transforms is None else list(transforms)
    if len(transforms) != len(tensors):
        raise ValueError(f"transforms must have one entry per tensor ({len(tensors)}), got {len(transforms)}")
    triples = [(t, x, f) for t, x, f in zip(tensors, scales, transforms) if t.requires_grad and x != 0]
    total = loss.new_zeros(())
    if not triples or not loss.requires_grad:
        return total
    grads = torch.autograd.grad(loss, [t for t, _, _ in triples], create_graph=True, allow_unused=True)
    for grad, (_, scale, transform) in zip(grads, triples):
        if grad is not None:
            total = total + scale * (grad if transform is None else transform(grad)).abs().sum()
    return total


def grad_l1_half_steps(weights: Iterable[torch.Tensor], bit_width: int) -> list[float]:
    """Each weight tensor's factor ``Delta_l / 2`` in the [paper] bound of Alizadeh et al. (ICLR
    2020, arXiv 2002.07520; book/methods.md §2): the first-order loss change under quantization is
    at most ``sum_l (Delta_l / 2) ||dL/dW_l||_1``.

    ``Delta_l = max|W_l| / (2^(b-1) - 1)`` is the symmetric per-tensor min-max step at bit-width
    ``b`` (book/methods.md §0). Returned as plain floats, i.e. detached: the step only weighs the
    layer's term; differentiating through it would add a push on ``max|W_l|``, a different
    regularizer. One device sync for all tensors.

    >>> grad_l1_half_steps([torch.tensor([0.5, -7.0])], bit_width=4)  # 7 / 7 / 2
    [0.5]
    """
    weights = list(weights)
    if not weights:
        raise ValueError("weights must hold at least one tensor, got an empty sequence")
    if any(w.numel() == 0 for w in weights):
        raise ValueError("every weight tensor must have at least one element; drop the empty ones")
    _, qmax = qrange(bit_width)
    peaks = torch.stack([w.detach().abs().max().to(torch.float64) for w in weights])
    return (peaks / (2 * qmax)).tolist()


def grad_l1_activation_half_steps(activations: Iterable[torch.Tensor], bit_width: int) -> list[float]:
    """Each activation tensor's factor ``Delta_a / 2`` in the [paper] bound of Alizadeh et al. (ICLR
    2020, arXiv 2002.07520, eq. 7; book/methods.md §2), for the activation terms as
    :func:`grad_l1_half_steps` gives it for the weight terms.

    ``Delta_a = (max(a, 0) - min(a, 0)) / (2^b - 1)`` is the step of the asymmetric min-max grid at
    bit-width ``b`` (with 0 on the grid) that the book calibrates activations with
    (book/methods.md §0), here on the batch itself [recon]: the paper gives no calibration for
    training. Detached, one device sync for all tensors.

    >>> grad_l1_activation_half_steps([torch.tensor([0.0, 3.0])], bit_width=2)  # 3 / 3 / 2
    [0.5]
    """
    activations = list(activations)
    if any(a.numel() == 0 for a in activations):
        raise ValueError("every activation tensor must have at least one element; drop the empty ones")
    if not activations:
        return []
    _, qmax = qrange(bit_width, signed=False)
    spans = torch.stack([(a.detach().max().clamp(min=0) - a.detach().min().clamp(max=0)).to(torch.float64)
                         for a in activations])
    return (spans / (2 * qmax)).tolist()


def sym_reg_seconds(weights: list[torch.Tensor], pairing: str, scope: str, repeats: int = 20) -> float:
    """Median wall time of one SymReg penalty over ``weights`` (mean of :func:`sym_reg` over the
    layers) with its backward pass, in seconds: the cost the 2:2 pairing is said to cut [summary]."""
    leaves = [w.detach().clone().requires_grad_(True) for w in weights]
    times = []
    for _ in range(repeats + 1):  # the first call warms up the allocator and is dropped
        start = time.perf_counter()
        torch.stack([sym_reg(w, pairing, scope) for w in leaves]).mean().backward()
        times.append(time.perf_counter() - start)
    return float(statistics.median(times[1:]))
