"""Uniform fake quantization: the quantizer shared by every chapter.

``fake_quant`` is dequantize(quantize(x)) and runs on PyTorch's own fake-quant kernels
(``torch.fake_quantize_per_tensor_affine`` / ``torch.fake_quantize_per_channel_affine``), so it is
bit-identical to them. ``choose_qparams`` picks the scale and zero point from a tensor under a
``QuantSpec`` in two steps: the range policy chooses a range, and ``qparams_from_range`` (the only
place the grid arithmetic below is written) turns it into a scale and zero point. ``quantize``
does both and fake-quantizes.

Grids (book/methods.md §0):

* symmetric, narrow range: ``s = t / (2^(b-1) - 1)``, codes in ``[-(2^(b-1) - 1), 2^(b-1) - 1]``,
  zero point 0. Rounding is half-to-even, so the quantizer is an odd function, which the SymReg
  argument (Park et al., ECCV 2022, arXiv 2208.00338) needs.
* asymmetric: ``s = (hi - lo) / (2^b - 1)``, ``z = round(-lo / s)``, codes in ``[0, 2^b - 1]``.
  The range always contains 0, so zero is exactly representable.

Range policies choose the range ``(lo, hi)`` (``(-t, t)`` on a symmetric grid): ``minmax`` (the
observed range), ``mse`` (the clip ratio with least squared error, searched on a grid),
``percentile``, and ``aciq`` (the analytic clip of Banner et al., arXiv 1810.05723, for a Laplace or
Gaussian prior).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from robustq.params import check_choice, validate_bit_width

POLICIES = ("minmax", "mse", "percentile", "aciq")
# The book's one QAT setting (book/methods.md §7), in one place: weights trained at 3 bits, the stem
# conv and the classifier at 8 (as LSQ and SinReQ train), which is also where the primary PTQ
# deployment keeps its edges.
QAT_BIT_WIDTH = 3
EDGE_BIT_WIDTH = 8
ACIQ_PRIORS = ("laplace", "gaussian")
MSE_GRID_SIZE = 100
# Elements per block of the ``mse`` search's batched passes: 1 MiB of float32, so a block stays in
# a core's L2 cache. Its scratch memory is one block, or two rows of a larger group.
_MSE_BATCH_NUMEL = 2**18
# at::internal::GRAIN_SIZE: from this many elements torch splits a reduction to one value by thread.
_TORCH_GRAIN_SIZE = 32768

# Kernels of torch's fake-quant ops accept these dtypes; float64 takes the pure-torch path.
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def qrange(bit_width: int, signed: bool = True, narrow_range: bool = True) -> tuple[int, int]:
    """Integer code range ``(qmin, qmax)`` of a ``bit_width``-bit grid.

    ``narrow_range`` drops the code ``-2^(b-1)`` so that a signed grid is symmetric about zero. An
    unsigned grid has no negative code to drop, so it always uses all ``2^b`` codes.

    >>> qrange(4), qrange(4, narrow_range=False), qrange(4, signed=False)
    ((-7, 7), (-8, 7), (0, 15))
    """
    bit_width = validate_bit_width(bit_width)
    if not signed:
        return 0, 2**bit_width - 1
    qmax = 2 ** (bit_width - 1) - 1
    return (-qmax if narrow_range else -qmax - 1), qmax


def edge_bits(bit_width: int) -> int:
    """The bit-width of the stem and the classifier when the rest is at ``bit_width`` in the primary
    deployment (book/methods.md §0): :data:`EDGE_BIT_WIDTH`, or more where the target is wider.

    >>> edge_bits(3), edge_bits(16)
    (8, 16)
    """
    return max(EDGE_BIT_WIDTH, bit_width)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half-to-even in the forward pass, identity gradient (straight-through estimator,
    Bengio et al. 2013, arXiv 1308.3432)."""
    return x + (torch.round(x) - x).detach()


def fake_quant(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
) -> torch.Tensor:
    """``scale * (clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point)``.

    ``scale`` and ``zero_point`` are tensors broadcastable to ``x``: shape ``()`` for per-tensor,
    or all ones but one axis for per-channel. Float32/16 inputs run on torch's fake-quant kernels
    (bit-identical to them); float64 takes an equivalent pure-torch path. The gradient is
    straight-through for ``x`` (1 inside the range, 0 outside); the qparams are constants.

    >>> fake_quant(torch.tensor([0.26, -1.0, 9.0]), torch.tensor(0.5), torch.tensor(0), -7, 7)
    tensor([ 0.5000, -1.0000,  3.5000])
    """
    scale, zero_point = scale.detach(), zero_point.detach()
    axis = _channel_axis(x, scale)
    if x.dtype not in _KERNEL_DTYPES:
        return _fake_quant_reference(x, scale, zero_point, qmin, qmax)
    zero_point = zero_point.to(torch.int32)
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(
            x, scale.reshape(()).float(), zero_point.reshape(()), qmin, qmax
        )
    x = _within_int_range(x, scale, zero_point, qmin, qmax)
    return torch.fake_quantize_per_channel_affine(
        x, scale.reshape(-1).float(), zero_point.reshape(-1), axis, qmin, qmax
    )


def _within_int_range(x, scale, zero_point, qmin, qmax):
    # torch's per-channel kernel casts x/scale to int64 before it clamps, so |x/scale| > 2^63 wraps
    # to qmin (the per-tensor kernel clamps first). Clamping x one level beyond the grid first keeps
    # every value and every gradient: what lies beyond already maps to qmin/qmax with gradient 0.
    lo = (qmin - 1 - zero_point).to(scale.dtype) * scale
    hi = (qmax + 1 - zero_point).to(scale.dtype) * scale
    return torch.clamp(x, lo.to(x.dtype), hi.to(x.dtype))


def _fake_quant_reference(x, scale, zero_point, qmin, qmax):
    # Same arithmetic as the kernels: multiply by the reciprocal, then round half-to-even.
    unclamped = torch.round(x * (1.0 / scale)) + zero_point
    inside = (unclamped >= qmin) & (unclamped <= qmax)
    out = (torch.clamp(unclamped, qmin, qmax) - zero_point) * scale
    return torch.where(inside, x + (out - x).detach(), out.detach())


def _channel_axis(x: torch.Tensor, scale: torch.Tensor) -> int | None:
    if scale.numel() == 1:
        return None
    if scale.dim() != x.dim() or sum(n != 1 for n in scale.shape) != 1:
        raise ValueError(
            f"scale of shape {tuple(scale.shape)} does not fit x of shape {tuple(x.shape)}: "
            "use shape () for per-tensor or keep one axis for per-channel, e.g. (C, 1, 1, 1)"
        )
    axis = next(i for i, n in enumerate(scale.shape) if n != 1)
    if scale.shape[axis] != x.shape[axis]:
        raise ValueError(
            f"scale has {scale.shape[axis]} channels on axis {axis} but x has {x.shape[axis]}"
        )
    return axis


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize a tensor: grid (bit-width, symmetric, narrow range), granularity and range
    policy. ``percentile`` is used by the ``percentile`` policy, ``aciq_prior`` by ``aciq``.

    >>> QuantSpec(4, policy="mse")
    QuantSpec(bit_width=4, symmetric=True, narrow_range=True, per_channel=False, policy='mse', percentile=99.99, aciq_prior='laplace')
    """

    bit_width: int
    symmetric: bool = True
    narrow_range: bool = True
    per_channel: bool = False
    policy: str = "minmax"
    percentile: float = 99.99
    aciq_prior: str = "laplace"

    def __post_init__(self) -> None:
        validate_bit_width(self.bit_width)
        for name in ("symmetric", "narrow_range", "per_channel"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"QuantSpec.{name} must be True or False, got {getattr(self, name)!r}")
        check_choice("QuantSpec.policy", self.policy, POLICIES)
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"QuantSpec.percentile must be in (50, 100], got {self.percentile!r}")
        check_choice("QuantSpec.aciq_prior", self.aciq_prior, ACIQ_PRIORS)

    @property
    def qrange(self) -> tuple[int, int]:
        return qrange(self.bit_width, signed=self.symmetric, narrow_range=self.narrow_range)


def layer_spec(spec: QuantSpec, edge: bool) -> QuantSpec:
    """The spec one layer is quantized with: ``spec``, or for the stem and the classifier
    (``edge``) the same spec at :func:`edge_bits`.

    >>> layer_spec(QuantSpec(3), edge=True).bit_width, layer_spec(QuantSpec(3), edge=False).bit_width
    (8, 3)
    """
    return dataclasses.replace(spec, bit_width=edge_bits(spec.bit_width)) if edge else spec


def choose_qparams(
    x: torch.Tensor, spec: QuantSpec, axis: int = 0
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Scale, zero point and code range for ``x`` under ``spec``: the policy's range, turned into
    qparams by :func:`qparams_from_range`.

    Per-channel qparams have the shape of ``x`` reduced to size 1 on every axis but ``axis``.
    Raises ``ValueError`` if ``x`` holds NaN or infinity.
    """
    x = x.detach()
    groups = _as_groups(x, spec.per_channel, axis)
    scale, zero_point = qparams_from_range(*_policy_range(groups, spec), spec, x.dtype)
    shape = _qparam_shape(x, spec.per_channel, axis)
    return scale.reshape(shape), zero_point.reshape(shape), *spec.qrange


def quantize(x: torch.Tensor, spec: QuantSpec, axis: int = 0) -> torch.Tensor:
    """Fake-quantize ``x`` under ``spec``: ``fake_quant(x, *choose_qparams(x, spec, axis))``.

    >>> quantize(torch.tensor([-1.0, 0.2, 0.5]), QuantSpec(3))
    tensor([-1.0000,  0.3333,  0.6667])
    """
    return fake_quant(x, *choose_qparams(x, spec, axis))


def qparams_from_range(
    lo: torch.Tensor | float,
    hi: torch.Tensor | float,
    spec: QuantSpec,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and int32 zero point of ``spec``'s grid over the range ``[lo, hi]``, elementwise.

    The range is first widened to contain 0, so that zero is exactly representable (Jacob et al.
    2018, arXiv 1712.05877, §2.1). With ``(qmin, qmax) = spec.qrange`` (Krishnamoorthi 2018,
    arXiv 1806.08342, §2.1 and §2.2; book/methods.md §0):

    * symmetric: ``s = max(-lo, hi) / qmax``, ``z = 0`` (``narrow_range`` changes only ``qmin``);
    * asymmetric: ``s = (hi - lo) / (qmax - qmin)``, ``z = clamp(qmin - round(lo / s), qmin, qmax)``.

    ``s`` is at least the smallest normal number of ``dtype`` (default: that of ``lo`` and ``hi``,
    or torch's default float dtype for integer bounds), so a zero range gives a finite grid that
    maps 0 to 0. Every range policy ends here, as does the ``mse`` search for each clip ratio.

    >>> qparams_from_range(torch.tensor(-1.0), torch.tensor(3.0), QuantSpec(4, symmetric=False))
    (tensor(0.2667), tensor(4, dtype=torch.int32))
    """
    lo, hi = torch.as_tensor(lo), torch.as_tensor(hi)
    dtype = dtype or torch.result_type(lo, hi)
    if not dtype.is_floating_point:  # integer bounds: a scale needs a float dtype
        dtype = torch.get_default_dtype()
    lo, hi = _with_zero(lo.to(dtype), hi.to(dtype))
    qmin, qmax = spec.qrange
    if spec.symmetric:
        scale = _safe_scale(torch.maximum(-lo, hi) / qmax, dtype)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    scale = _safe_scale((hi - lo) / (qmax - qmin), dtype)
    return scale, torch.clamp(qmin - torch.round(lo / scale), qmin, qmax).to(torch.int32)


def _with_zero(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return lo.clamp(max=0), hi.clamp(min=0)


def _safe_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # An all-zero group has range 0; a tiny positive scale maps it to 0 instead of NaN.
    return torch.clamp(scale, min=torch.finfo(dtype).tiny)


# --- range policies ------------------------------------------------------------------------------


def _as_groups(x: torch.Tensor, per_channel: bool, axis: int) -> torch.Tensor:
    """A contiguous 2-D copy or view: one row per group sharing a scale (one row for per-tensor).

    Contiguous because torch sums a strided row in another order than a contiguous one: without it
    a channel's ``aciq`` scale could sit 1 ulp from the per-tensor scale of the same values."""
    if x.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    if not per_channel:
        return x.reshape(1, -1).contiguous()
    if x.dim() == 0 or not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis={axis} is out of range for a tensor of shape {tuple(x.shape)}")
    return x.movedim(axis, 0).reshape(x.shape[axis], -1).contiguous()


def _qparam_shape(x: torch.Tensor, per_channel: bool, axis: int) -> tuple[int, ...]:
    if not per_channel:
        return ()
    shape = [1] * x.dim()
    shape[axis] = x.shape[axis]
    return tuple(shape)


def _check_finite(value: torch.Tensor) -> None:
    # NaN and inf propagate through max/min, so checking the reduced range is enough.
    if not torch.isfinite(value).all():
        raise ValueError(
            "cannot quantize a tensor holding NaN or infinity; check the model or data for "
            "a diverged training run (non-finite weights or activations)"
        )


def _policy_range(groups: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the range ``(lo, hi)`` that ``spec.policy`` chooses, containing 0; a symmetric
    grid's range is ``(-t, t)`` for its clipping threshold ``t``."""
    lo, hi = _minmax_range(groups, spec.symmetric)
    if spec.policy == "minmax":
        return lo, hi
    if spec.policy == "mse":
        ratio = _mse_clip_ratio(groups, spec, lambda r: (r * lo, r * hi))
        clip_lo, clip_hi = ratio * lo, ratio * hi
    elif spec.policy == "percentile":
        clip_lo, clip_hi = _percentile_range(groups, spec)
    else:
        clip_lo, clip_hi = _aciq_range(groups, spec, lo, hi)
    clip_lo, clip_hi = _with_zero(clip_lo, clip_hi)
    # A zero clip for a group that is not all zero (percentile on a mostly-zero group, aciq on a
    # constant one) would send all of it to ~0; such a group keeps its min-max range.
    kept = clip_hi - clip_lo > 0
    return torch.where(kept, clip_lo, lo), torch.where(kept, clip_hi, hi)


def _minmax_range(groups: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The observed range widened to contain 0; symmetric, ``(-max|x|, max|x|)``."""
    if symmetric:
        absmax = groups.abs().amax(dim=1)
        _check_finite(absmax)
        return -absmax, absmax
    lo, hi = groups.amin(dim=1), groups.amax(dim=1)
    _check_finite(torch.stack([lo, hi]))
    return _with_zero(lo, hi)


def _percentile_range(groups: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``p``-th percentile of ``|x|`` (symmetric), or the ``(100 - p)``-th and ``p``-th of ``x``."""
    q = spec.percentile / 100.0
    if spec.symmetric:
        bound = _quantile(groups.abs(), q)
        return -bound, bound
    return _quantile(groups, 1.0 - q), _quantile(groups, q)


def _aciq_range(groups, spec: QuantSpec, lo, hi) -> tuple[torch.Tensor, torch.Tensor]:
    """ACIQ's clip (Banner et al., arXiv 1810.05723): ``alpha`` (:func:`aciq_alpha`) times the
    spread about the mean, within the min-max range ``[lo, hi]``. Symmetric: ``+-alpha`` about 0;
    asymmetric: ``mean +- alpha``."""
    mean = groups.mean(dim=1)
    spread = _aciq_spread(groups - mean[:, None], spec.aciq_prior)
    alpha = aciq_alpha(spec.bit_width, spec.aciq_prior) * spread
    if spec.symmetric:
        bound = torch.minimum(alpha, hi)
        return -bound, bound
    return torch.maximum(mean - alpha, lo), torch.minimum(mean + alpha, hi)


def _quantile(groups: torch.Tensor, q: float) -> torch.Tensor:
    # Sorting instead of torch.quantile, which refuses inputs above 16M elements.
    ordered = groups.sort(dim=1).values
    position = q * (groups.shape[1] - 1)
    below = math.floor(position)
    frac = position - below
    above = min(below + 1, groups.shape[1] - 1)
    return ordered[:, below] * (1 - frac) + ordered[:, above] * frac


def mse_grid(size: int = MSE_GRID_SIZE) -> torch.Tensor:
    """Clip ratios searched by the ``mse`` policy: ``1/size, 2/size, ..., 1``. Ratio 1 (min-max)
    is on the grid, so the ``mse`` choice never has larger error than ``minmax``."""
    return torch.arange(1, size + 1, dtype=torch.float64) / size


def _mse_clip_ratio(groups, spec, bounds_at) -> torch.Tensor:
    """Per group, the clip ratio on ``mse_grid()`` with least quantization MSE (first on ties).

    All (group, ratio) pairs are evaluated in batches; each pair's error is, bit for bit, the MSE
    of ``fake_quant`` on that group alone with the qparams :func:`qparams_from_range` gives for the
    ratio's range ``bounds_at(ratio)``, so the grid searched is the grid used."""
    ratios = mse_grid()
    # Ratios in the dtype torch computes ``python_float * tensor`` in (float32 for float16/bfloat16),
    # so that each bound is the one ``bounds_at(float(ratio))`` gives.
    lo, hi = bounds_at(ratios[:, None].to(groups.device, _opmath_dtype(groups.dtype)))
    scale, zero_point = qparams_from_range(lo, hi, spec, groups.dtype)
    errors = _pair_errors(groups, scale.T.contiguous(), zero_point.T.contiguous(), spec.qrange)
    return _first_least(errors, ratios.to(groups.device, groups.dtype))


def _opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _pair_errors(groups, scale, zero_point, qrange) -> torch.Tensor:
    """MSE of ``fake_quant(groups[g], scale[g, r], zero_point[g, r])`` for every group ``g`` and
    ratio ``r``: shape [group, ratio]."""
    errors = torch.empty_like(scale)
    blocks = _blocks(*scale.shape, groups.shape[1], groups.device)
    # One buffer for all blocks: a fresh one per block costs more (page faults) than the work.
    numel = max(errors[block].numel() for block in blocks) * groups.shape[1] if _emulated(groups) else 0
    scratch = torch.empty(numel, dtype=groups.dtype, device=groups.device)
    for block in blocks:
        rows = groups[block[0]]
        errors[block] = _block_errors(rows, scale[block], zero_point[block], qrange, len(groups) == 1, scratch)
    return errors


def _blocks(n_groups: int, n_ratios: int, n: int, device: torch.device) -> list[tuple[slice, slice]]:
    """(groups, ratios) slices tiling the search into blocks of about ``_MSE_BATCH_NUMEL`` elements:
    whole groups with all their ratios, or, for large groups, ratio chunks of one group. Off the
    CPU, one block per ratio with all groups."""
    if device.type != "cpu":  # GPU reductions sum in an order that depends on the number of rows
        return [(slice(None), slice(r, r + 1)) for r in range(n_ratios)]
    per_block = _MSE_BATCH_NUMEL // n
    if per_block >= n_ratios:
        step = per_block // n_ratios
        return [(slice(g, g + step), slice(None)) for g in range(0, n_groups, step)]
    # At least two ratios per chunk: torch sums a lone row in another order (see _row_means).
    chunks = torch.arange(n_ratios).tensor_split(max(1, n_ratios // max(2, per_block)))
    return [(slice(g, g + 1), slice(int(c[0]), int(c[-1]) + 1)) for g in range(n_groups) for c in chunks]


def _block_errors(x, scale, zero_point, qrange, lone: bool, scratch: torch.Tensor) -> torch.Tensor:
    """MSE of fake-quantizing each row of ``x`` [g, n] with each of its qparams [g, r]: [g, r].
    ``scratch`` holds at least ``g * r * n`` elements of ``x.dtype``; ``lone``: see ``_row_means``."""
    x, scale, zero_point = x[:, None, :], scale[..., None], zero_point[..., None]
    shape = (*scale.shape[:2], x.shape[2])
    if _emulated(x):
        out = scratch[: math.prod(shape)].view(shape)
        squared = _squared_errors_float32(x, scale, zero_point, qrange, out)
    else:  # fake_quant itself: the kernels (GPU, float16, bfloat16), the float64 path; a row per pair
        rows = x.expand(shape).reshape(-1, shape[2])
        y = fake_quant(rows, scale.reshape(-1, 1), zero_point.reshape(-1, 1), *qrange).view(shape)
        squared = y.sub_(x).pow_(2)
    return _row_means(squared.view(-1, shape[2]), lone).view(shape[:2])


def _emulated(x: torch.Tensor) -> bool:
    """Whether the search emulates the fake-quant kernel for ``x`` (see ``_fake_quant_float32``)."""
    return x.dtype == torch.float32 and x.device.type == "cpu"


def _squared_errors_float32(x, scale, zero_point, qrange, out: torch.Tensor) -> torch.Tensor:
    """``(fake_quant(x, scale, zero_point) - x) ** 2`` into ``out`` [g, r, n], broadcasting."""
    # Column tiles, so that all passes over a tile hit the cache even when a row does not fit.
    width = max(1, _MSE_BATCH_NUMEL // (out.shape[0] * out.shape[1]))
    for start in range(0, out.shape[2], width):
        tile = x[..., start : start + width]
        y = _fake_quant_float32(tile, scale, zero_point, *qrange, out=out[..., start : start + width])
        # One pass instead of sub_ and pow_, with their two roundings: (y - x) * (y - x).
        torch.ops.aten.mse_loss.out(y, tile.expand_as(y), reduction=0, out=y)  # 0: no reduction
    return out


def _fake_quant_float32(x, scale, zero_point, qmin: int, qmax: int, out: torch.Tensor) -> torch.Tensor:
    """torch's float32 fake-quant kernels step for step, broadcasting, into ``out``: ``x * (1 / s)``
    rounded half-to-even, plus ``z``, clamped to ``[qmin, qmax]``, minus ``z``, times ``s``."""
    codes = torch.mul(x, 1.0 / scale, out=out).round_()
    if not zero_point.any():  # adding 0 would change only the sign of zero outputs, not |y - x|
        return codes.clamp_(qmin, qmax).mul_(scale)
    zero_point = zero_point.to(x.dtype)
    return codes.add_(zero_point).clamp_(qmin, qmax).sub_(zero_point).mul_(scale)


def _row_means(squared: torch.Tensor, lone: bool) -> torch.Tensor:
    """Mean of each row, summed in the order torch sums that row's error when its group is quantized
    on its own: a ``lone`` (per-tensor) row as a tensor of one row, else as one row among several.

    The orders differ in the last bit: torch sums a single row of ``_TORCH_GRAIN_SIZE`` or more
    elements in one piece per thread, but gives each thread whole rows when there are several."""
    if not lone or squared.shape[1] < _TORCH_GRAIN_SIZE or torch.get_num_threads() == 1:
        return squared.mean(dim=1)
    return torch.cat([row.mean(dim=1) for row in squared.split(1)])


def _first_least(errors: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per row of ``errors``, the entry of ``values`` at its first least error: what a scan keeping
    the first strictly smaller error chooses. Starting from an error of inf and a value of 1, it
    keeps 1 where no error is finite, and never chooses a NaN."""
    errors = torch.where(errors.isnan(), math.inf, errors)
    least = errors.amin(dim=1)
    chosen = values[(errors == least[:, None]).int().argmax(dim=1)]
    return torch.where(least < math.inf, chosen, torch.ones_like(chosen))


def _aciq_spread(centered: torch.Tensor, prior: str) -> torch.Tensor:
    """Laplace scale ``b = E|x - mean|`` or Gaussian ``sigma``, per group."""
    if prior == "laplace":
        return centered.abs().mean(dim=1)
    return centered.pow(2).mean(dim=1).sqrt()


@lru_cache(maxsize=None, typed=True)
def aciq_alpha(bit_width: int, prior: str = "laplace") -> float:
    """Optimal clip ``alpha`` in units of the prior's spread (Banner et al., ACIQ, arXiv 1810.05723,
    eq. 5 for Laplace(b=1), its Gaussian analogue for sigma=1).

    Minimises clipping noise plus the uniform rounding noise ``alpha^2 / (3 * 4^M)`` of an
    ``M``-bit grid over ``[-alpha, alpha]``, numerically on a fine grid rather than from the
    paper's table, so it holds for every bit-width. Matches the paper's values
    (Laplace 2.83, 3.89, 5.03 for 2, 3, 4 bits) to 0.01.
    """
    bit_width = validate_bit_width(bit_width)
    check_choice("prior", prior, ACIQ_PRIORS)
    alpha = torch.linspace(0.01, 40.0, 400_000, dtype=torch.float64)
    rounding = alpha**2 / (3 * 4.0**bit_width)
    if prior == "laplace":
        clipping = 2 * torch.exp(-alpha)
    else:
        normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
        tail = 1 - normal.cdf(alpha)
        density = torch.exp(normal.log_prob(alpha))
        clipping = 2 * ((1 + alpha**2) * tail - alpha * density)
    return float(alpha[torch.argmin(clipping + rounding)])
