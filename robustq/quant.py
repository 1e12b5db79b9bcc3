"""Uniform fake quantization: the quantizer shared by every chapter.

``fake_quant`` is dequantize(quantize(x)) and runs on PyTorch's own fake-quant kernels
(``torch.fake_quantize_per_tensor_affine`` / ``torch.fake_quantize_per_channel_affine``), so it is
bit-identical to them. ``choose_qparams`` picks the scale and zero point from a tensor under a
``QuantSpec``; ``quantize`` does both steps.

Grids (methods.md §0):

* symmetric, narrow range: ``s = t / (2^(b-1) - 1)``, codes in ``[-(2^(b-1) - 1), 2^(b-1) - 1]``,
  zero point 0. Rounding is half-to-even, so the quantizer is an odd function, which the SymReg
  argument (Park et al., ECCV 2022, arXiv 2208.00338) needs.
* asymmetric: ``s = (hi - lo) / (2^b - 1)``, ``z = round(-lo / s)``, codes in ``[0, 2^b - 1]``.
  The range always contains 0, so zero is exactly representable.

Range policies choose the clipping threshold ``t`` (or ``lo, hi``): ``minmax`` (the observed range),
``mse`` (the clip ratio with least squared error, searched on a grid), ``percentile``, and ``aciq``
(the analytic clip of Banner et al., arXiv 1810.05723, for a Laplace or Gaussian prior).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

POLICIES = ("minmax", "mse", "percentile", "aciq")
ACIQ_PRIORS = ("laplace", "gaussian")
MIN_BIT_WIDTH, MAX_BIT_WIDTH = 2, 16
MSE_GRID_SIZE = 100

# Kernels of torch's fake-quant ops accept these dtypes; float64 takes the pure-torch path.
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def validate_bit_width(bit_width: int) -> int:
    """Return ``bit_width`` if it is an int in 2..16, else raise ``ValueError`` saying so."""
    if isinstance(bit_width, bool) or not isinstance(bit_width, int):
        raise ValueError(
            f"bit_width must be an int in {MIN_BIT_WIDTH}..{MAX_BIT_WIDTH}, got {bit_width!r} "
            f"({type(bit_width).__name__}); pass e.g. bit_width=4"
        )
    if not MIN_BIT_WIDTH <= bit_width <= MAX_BIT_WIDTH:
        raise ValueError(
            f"bit_width must be in {MIN_BIT_WIDTH}..{MAX_BIT_WIDTH}, got {bit_width}; "
            "1-bit (binary) networks need a different quantizer"
        )
    return bit_width


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
    return torch.fake_quantize_per_channel_affine(
        x, scale.reshape(-1).float(), zero_point.reshape(-1), axis, qmin, qmax
    )


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
        if self.policy not in POLICIES:
            raise ValueError(f"QuantSpec.policy must be one of {POLICIES}, got {self.policy!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"QuantSpec.percentile must be in (50, 100], got {self.percentile!r}")
        if self.aciq_prior not in ACIQ_PRIORS:
            raise ValueError(f"QuantSpec.aciq_prior must be one of {ACIQ_PRIORS}, got {self.aciq_prior!r}")

    @property
    def qrange(self) -> tuple[int, int]:
        return qrange(self.bit_width, signed=self.symmetric, narrow_range=self.narrow_range)


def choose_qparams(
    x: torch.Tensor, spec: QuantSpec, axis: int = 0
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Scale, zero point and code range for ``x`` under ``spec``.

    Per-channel qparams have the shape of ``x`` reduced to size 1 on every axis but ``axis``.
    Raises ``ValueError`` if ``x`` holds NaN or infinity.
    """
    x = x.detach()
    groups = _as_groups(x, spec.per_channel, axis)
    qmin, qmax = spec.qrange
    if spec.symmetric:
        bound = _symmetric_bound(groups, spec)
        scale = _safe_scale(bound / qmax, x.dtype)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        lo, hi = _asymmetric_bounds(groups, spec)
        scale = _safe_scale((hi - lo) / (qmax - qmin), x.dtype)
        zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax).to(torch.int32)
    shape = _qparam_shape(x, spec.per_channel, axis)
    return scale.reshape(shape), zero_point.reshape(shape), qmin, qmax


def quantize(x: torch.Tensor, spec: QuantSpec, axis: int = 0) -> torch.Tensor:
    """Fake-quantize ``x`` under ``spec``: ``fake_quant(x, *choose_qparams(x, spec, axis))``.

    >>> quantize(torch.tensor([-1.0, 0.2, 0.5]), QuantSpec(3))
    tensor([-1.0000,  0.3333,  0.6667])
    """
    return fake_quant(x, *choose_qparams(x, spec, axis))


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


def _safe_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # An all-zero group has range 0; a tiny positive scale maps it to 0 instead of NaN.
    return torch.clamp(scale, min=torch.finfo(dtype).tiny)


def _check_finite(value: torch.Tensor) -> None:
    # NaN and inf propagate through max/min, so checking the reduced range is enough.
    if not torch.isfinite(value).all():
        raise ValueError(
            "cannot quantize a tensor holding NaN or infinity; check the model or data for "
            "a diverged training run (non-finite weights or activations)"
        )


def _symmetric_bound(groups: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    absmax = groups.abs().amax(dim=1)
    _check_finite(absmax)
    if spec.policy == "minmax":
        return absmax
    if spec.policy == "mse":
        return absmax * _mse_clip_ratio(groups, spec, lambda r: (-r * absmax, r * absmax))
    if spec.policy == "percentile":
        bound = _quantile(groups.abs(), spec.percentile / 100.0)
    else:
        spread = _aciq_spread(groups - groups.mean(dim=1, keepdim=True), spec.aciq_prior)
        bound = torch.minimum(aciq_alpha(spec.bit_width, spec.aciq_prior) * spread, absmax)
    # A zero clip for a group that is not all zero (percentile on a mostly-zero group, aciq on a
    # constant one) would send all of it to ~0; such a group keeps its min-max range.
    return torch.where(bound > 0, bound, absmax)


def _asymmetric_bounds(groups: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = groups.amin(dim=1), groups.amax(dim=1)
    _check_finite(torch.stack([lo, hi]))
    minmax_lo, minmax_hi = lo.clamp(max=0), hi.clamp(min=0)
    if spec.policy == "percentile":
        q = spec.percentile / 100.0
        lo, hi = _quantile(groups, 1.0 - q), _quantile(groups, q)
    elif spec.policy == "aciq":
        mean = groups.mean(dim=1)
        alpha = aciq_alpha(spec.bit_width, spec.aciq_prior) * _aciq_spread(groups - mean[:, None], spec.aciq_prior)
        lo, hi = torch.maximum(mean - alpha, lo), torch.minimum(mean + alpha, hi)
    elif spec.policy == "mse":
        ratio = _mse_clip_ratio(groups, spec, lambda r: (r * lo.clamp(max=0), r * hi.clamp(min=0)))
        lo, hi = ratio * lo, ratio * hi
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    collapsed = lo == hi  # a zero range for a group that may not be all zero: keep its min-max range
    return torch.where(collapsed, minmax_lo, lo), torch.where(collapsed, minmax_hi, hi)


def _quantile(groups: torch.Tensor, q: float) -> torch.Tensor:
    # Sorting instead of torch.quantile, which refuses inputs above 16M elements.
    ordered = groups.sort(dim=1).values
    position = q * (groups.shape[1] - 1)
    below, frac = int(math.floor(position)), position - math.floor(position)
    above = min(below + 1, groups.shape[1] - 1)
    return ordered[:, below] * (1 - frac) + ordered[:, above] * frac


def mse_grid(size: int = MSE_GRID_SIZE) -> torch.Tensor:
    """Clip ratios searched by the ``mse`` policy: ``1/size, 2/size, ..., 1``. Ratio 1 (min-max)
    is on the grid, so the ``mse`` choice never has larger error than ``minmax``."""
    return torch.arange(1, size + 1, dtype=torch.float64) / size


def _mse_clip_ratio(groups, spec, bounds_at) -> torch.Tensor:
    """Per group, the clip ratio on ``mse_grid()`` with least quantization MSE (first on ties)."""
    qmin, qmax = spec.qrange
    best_err = torch.full((groups.shape[0],), math.inf, dtype=groups.dtype, device=groups.device)
    best_ratio = torch.ones_like(best_err)
    for ratio in mse_grid().tolist():
        lo, hi = bounds_at(ratio)
        # The same scale and zero point as choose_qparams, so the grid searched is the grid used.
        if spec.symmetric:
            scale = _safe_scale(hi / qmax, groups.dtype)
            zero_point = torch.zeros_like(scale, dtype=torch.int32)
        else:
            scale = _safe_scale((hi - lo) / (qmax - qmin), groups.dtype)
            zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax).to(torch.int32)
        err = (fake_quant(groups, scale[:, None], zero_point[:, None], qmin, qmax) - groups).pow(2).mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return best_ratio


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
    if prior not in ACIQ_PRIORS:
        raise ValueError(f"prior must be one of {ACIQ_PRIORS}, got {prior!r}")
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
