"""Properties of the shared quantizer (robustq.quant), checked with hypothesis and against torch.

Exact comparisons (``torch.equal``) throughout: the quantizer runs on torch's fake-quant kernels, so
there is no tolerance to hide behind. Where a property holds only for some grids or policies, the
test says which and why instead of loosening the check.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

from robustq import quant
from robustq.quant import (
    ACIQ_PRIORS,
    POLICIES,
    QuantSpec,
    aciq_alpha,
    choose_qparams,
    fake_quant,
    qparams_from_range,
    quantize,
)

FAST = settings(max_examples=40, deadline=None)
# torch's observers never let a scale fall below float32 eps; ours go down to the smallest normal.
OBSERVER_EPS = torch.finfo(torch.float32).eps

# --- strategies ----------------------------------------------------------------------------------

bit_widths = st.integers(2, 8)
shapes = st.one_of(
    st.tuples(st.integers(1, 32)),
    st.tuples(st.integers(1, 8), st.integers(1, 16)),
    st.tuples(st.integers(1, 6), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3)),  # conv weight
)
# Magnitudes 1e-10..1e10 (and exact zeros) times a per-tensor power of two down to 2^-40: any absolute
# size from ~1e-22 up, and up to 1e20 between the largest and smallest non-zero value of one tensor,
# past the 2^63 ratio where torch's per-channel kernel wraps (robustq clamps first; see
# test_per_channel_values_far_beyond_the_grid_clamp_instead_of_wrapping).
magnitudes = st.floats(float(np.float32(1e-10)), float(np.float32(1e10)), width=32)
elements = st.one_of(st.just(0.0), magnitudes, magnitudes.map(lambda v: -v))


@st.composite
def tensors(draw, shape=shapes, min_dims=1):
    shape = draw(shape.filter(lambda s: len(s) >= min_dims))
    values = draw(hnp.arrays(np.float32, shape, elements=elements))
    return torch.from_numpy(values) * 2.0 ** -draw(st.integers(0, 40))


@st.composite
def specs(draw, policy=st.sampled_from(POLICIES), symmetric=st.booleans(), narrow_range=st.booleans(),
          per_channel=st.booleans()):
    return QuantSpec(
        draw(bit_widths),
        symmetric=draw(symmetric),
        narrow_range=draw(narrow_range),
        per_channel=draw(per_channel),
        policy=draw(policy),
        percentile=draw(st.sampled_from([90.0, 99.0, 99.99, 100.0])),
        aciq_prior=draw(st.sampled_from(ACIQ_PRIORS)),
    )


@st.composite
def tensor_spec_axis(draw, **spec_kwargs):
    spec = draw(specs(**spec_kwargs))
    x = draw(tensors())
    axis = draw(st.integers(-x.dim(), x.dim() - 1))
    return x, spec, axis


def codes(y: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """The integer codes of a fake-quantized ``y`` (float64: exact for codes below 2^15)."""
    return torch.round(y.double() / scale.double()) + zero_point.double()


# --- grids ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bit_width, narrow, full, unsigned",
    [
        (2, (-1, 1), (-2, 1), (0, 3)),
        (3, (-3, 3), (-4, 3), (0, 7)),
        (4, (-7, 7), (-8, 7), (0, 15)),
        (8, (-127, 127), (-128, 127), (0, 255)),
        (16, (-32767, 32767), (-32768, 32767), (0, 65535)),
    ],
)
def test_qrange_values(bit_width, narrow, full, unsigned):
    assert quant.qrange(bit_width) == narrow
    assert quant.qrange(bit_width, narrow_range=False) == full
    assert quant.qrange(bit_width, signed=False) == unsigned
    assert quant.qrange(bit_width, signed=False, narrow_range=False) == unsigned
    assert QuantSpec(bit_width, symmetric=False, narrow_range=True).qrange == unsigned


@FAST
@given(tensor_spec_axis())
def test_output_is_on_the_grid_and_within_range(case):
    x, spec, axis = case
    y = quantize(x, spec, axis)
    scale, zero_point, qmin, qmax = choose_qparams(x, spec, axis)
    assert y.dtype == x.dtype and y.shape == x.shape
    q = codes(y, scale, zero_point)
    assert q.min() >= qmin and q.max() <= qmax
    # On the grid: rebuilding y from its integer codes, as the kernel does, gives y bit for bit.
    assert torch.equal(y, (q - zero_point.double()).float() * scale)
    if spec.policy == "minmax":  # min-max never clips: every value is within half a step
        assert ((y.double() - x.double()).abs() <= scale.double() / 2 * (1 + 1e-6)).all()


@FAST
@given(tensor_spec_axis())
def test_fake_quant_is_idempotent_with_fixed_qparams(case):
    x, spec, axis = case
    qparams = choose_qparams(x, spec, axis)
    y = fake_quant(x, *qparams)
    assert torch.equal(fake_quant(y, *qparams), y)


@FAST
@given(tensor_spec_axis(policy=st.just("minmax"), symmetric=st.just(True)))
def test_quantize_is_idempotent_for_symmetric_minmax(case):
    # Re-choosing qparams on the output gives back the same scale: max|y| = qmax * s. This does not
    # hold in general for the other grids and policies, and the test does not claim it:
    # * asymmetric: the zero point is rounded, so the grid ends (-z*s, (qmax-z)*s) are not the data's
    #   (lo, hi); the output's range is another width and so another scale;
    # * percentile and aciq: the statistic (a quantile, a mean |x|) of the output differs from x's;
    # * mse: its squared errors underflow to 0 in float32 for tensors below ~1e-19, where every clip
    #   ratio ties and the first (0.01) wins.
    x, spec, axis = case
    y = quantize(x, spec, axis)
    assert torch.equal(quantize(y, spec, axis), y)


def test_asymmetric_requantization_moves_the_grid():
    # The caveat above, pinned on one example: [-1, 1] at 3 bits has z = 4 (3.5 rounded to even), so
    # the grid [-4s, 3s] clips +1 to 3s = 0.857; the output's range [-0.857, 0.857] then gets another
    # scale and zero point, and re-quantizing moves its values by a large fraction of a step.
    x = torch.tensor([-1.0, 0.0, 1.0])
    spec = QuantSpec(3, symmetric=False)
    y = quantize(x, spec)
    assert (quantize(y, spec) - y).abs().max() > 0.1


@FAST
@given(tensor_spec_axis(symmetric=st.just(True), narrow_range=st.just(True)))
def test_symmetric_narrow_range_is_odd(case):
    x, spec, axis = case
    assert torch.equal(quantize(-x, spec, axis), -quantize(x, spec, axis))


@FAST
@given(tensor_spec_axis(symmetric=st.just(True), narrow_range=st.just(True)))
def test_symmetric_narrow_range_is_odd_with_fixed_qparams(case):
    # What SymReg needs: within one tensor (one set of qparams), q(-w) = -q(w) for every w.
    x, spec, axis = case
    qparams = choose_qparams(x, spec, axis)
    assert torch.equal(fake_quant(-x, *qparams), -fake_quant(x, *qparams))


@pytest.mark.parametrize(
    "spec",
    [QuantSpec(3, symmetric=False), QuantSpec(3, narrow_range=False, policy="percentile", percentile=60.0)],
    ids=["asymmetric", "full-range-clipping"],
)
def test_other_grids_are_not_odd_with_fixed_qparams(spec):
    # Asymmetric: the zero point shifts the grid off zero's centre. Full range: a clipped negative
    # value lands on the extra code -2^(b-1), which has no positive mirror.
    x = torch.tensor([-0.2, 0.1, 0.5, 1.0])
    qparams = choose_qparams(x, spec)
    assert not torch.equal(fake_quant(-x, *qparams), -fake_quant(x, *qparams))


@FAST
@given(tensor_spec_axis(per_channel=st.just(True)), st.booleans())
def test_per_channel_equals_per_tensor_row_by_row(case, use_axis_zero):
    x, spec, axis = case
    axis = 0 if use_axis_zero else axis
    per_tensor = replace(spec, per_channel=False)
    rows = torch.stack([quantize(row, per_tensor) for row in x.movedim(axis, 0)]).movedim(0, axis)
    assert torch.equal(quantize(x, spec, axis), rows)


# --- against torch's own ops ---------------------------------------------------------------------


def torch_qparams_per_tensor(x, bit_width, symmetric):
    """Scale and zero point from torch's MinMaxObserver, configured as our grid."""
    if symmetric:
        qmax = 2 ** (bit_width - 1) - 1
        observer = MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric,
                                  quant_min=-qmax, quant_max=qmax)
    else:
        observer = MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine,
                                  quant_min=0, quant_max=2**bit_width - 1)
    observer(x)
    scale, zero_point = observer.calculate_qparams()
    return scale.reshape(()), zero_point.reshape(()).to(torch.int32), observer.quant_min, observer.quant_max


@FAST
@given(tensors(), bit_widths, st.booleans())
def test_bit_identical_to_torch_per_tensor(x, bit_width, symmetric):
    scale, zero_point, qmin, qmax = torch_qparams_per_tensor(x, bit_width, symmetric)
    assume(scale > OBSERVER_EPS)
    x_ours, x_torch = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = quantize(x_ours, QuantSpec(bit_width, symmetric=symmetric))
    reference = torch.fake_quantize_per_tensor_affine(x_torch, scale, zero_point, qmin, qmax)
    assert torch.equal(ours, reference)
    ours.sum().backward()
    reference.sum().backward()
    assert torch.equal(x_ours.grad, x_torch.grad)


@FAST
@given(tensors(min_dims=2), bit_widths, st.booleans(), st.integers(0, 1))
def test_bit_identical_to_torch_per_channel(x, bit_width, symmetric, axis):
    if symmetric:
        qmax = 2 ** (bit_width - 1) - 1
        observer = PerChannelMinMaxObserver(ch_axis=axis, dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                            quant_min=-qmax, quant_max=qmax)
    else:
        observer = PerChannelMinMaxObserver(ch_axis=axis, dtype=torch.quint8, qscheme=torch.per_channel_affine,
                                            quant_min=0, quant_max=2**bit_width - 1)
    observer(x)
    scale, zero_point = observer.calculate_qparams()
    assume(bool((scale > OBSERVER_EPS).all()))
    spec = QuantSpec(bit_width, symmetric=symmetric, per_channel=True)
    reference = torch.fake_quantize_per_channel_affine(
        x, scale, zero_point.to(torch.int32), axis, observer.quant_min, observer.quant_max
    )
    assert torch.equal(quantize(x, spec, axis), reference)


# --- the range -> qparams primitive --------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, lo, hi, scale, zero_point",
    [
        (QuantSpec(4), -1.0, 0.5, torch.tensor(1.0) / 7, 0),  # symmetric: the larger magnitude
        (QuantSpec(4, narrow_range=False), -0.5, 1.0, torch.tensor(1.0) / 7, 0),  # narrow range: qmin only
        (QuantSpec(4, symmetric=False), -1.0, 3.0, torch.tensor(4.0) / 15, 4),  # z = round(3.75)
        (QuantSpec(4, symmetric=False), 0.5, 2.0, torch.tensor(2.0) / 15, 0),  # widened to [0, 2]
        (QuantSpec(4, symmetric=False), -3.0, -1.0, torch.tensor(3.0) / 15, 15),  # widened to [-3, 0]
        (QuantSpec(4, symmetric=False), -0.625, 3.125, torch.tensor(3.75) / 15, 2),  # -lo / s = 2.5, to even
    ],
    ids=["symmetric", "full-range", "asymmetric", "positive-range", "negative-range", "tie"],
)
def test_qparams_from_range_values(spec, lo, hi, scale, zero_point):
    got_scale, got_zero_point = qparams_from_range(torch.tensor(lo), torch.tensor(hi), spec)
    assert torch.equal(got_scale, scale) and got_zero_point.dtype == torch.int32
    assert got_zero_point.item() == zero_point
    from_floats = qparams_from_range(lo, hi, spec)  # Python floats: float32, as torch.tensor(lo)
    assert torch.equal(from_floats[0], scale) and from_floats[1].item() == zero_point


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spec", [QuantSpec(4), QuantSpec(4, symmetric=False)], ids=["sym", "asym"])
def test_qparams_from_a_zero_range_map_zero_to_zero(spec, dtype):
    scale, zero_point = qparams_from_range(torch.zeros(3, dtype=dtype), torch.zeros(3, dtype=dtype), spec)
    assert scale.dtype == dtype and torch.equal(scale, torch.full((3,), torch.finfo(dtype).tiny, dtype=dtype))
    assert torch.equal(zero_point, torch.zeros(3, dtype=torch.int32))
    zeros = torch.zeros(3, 5, dtype=dtype)
    assert torch.equal(fake_quant(zeros, scale[:, None], zero_point[:, None], *spec.qrange), zeros)


# torch's observers clamp the scale at float32's eps (1.2e-7): ranges whose scale would be smaller
# differ from robustq's on purpose (robustq keeps such a grid, floored at the smallest normal float).
observer_ranges = st.floats(float(np.float32(1e-4)), 1e3, width=32)


@FAST
@given(st.lists(st.tuples(observer_ranges, observer_ranges), min_size=1, max_size=6), bit_widths, st.booleans())
def test_qparams_from_range_match_torch_observers(ranges, bit_width, symmetric):
    # Element by element the observer's qparams of the tensor [-a, b]; all at once, the same.
    lo = -torch.tensor([a for a, _ in ranges])
    hi = torch.tensor([b for _, b in ranges])
    spec = QuantSpec(bit_width, symmetric=symmetric)
    scale, zero_point = qparams_from_range(lo, hi, spec)
    for i in range(len(ranges)):
        expected = torch_qparams_per_tensor(torch.stack([lo[i], hi[i]]), bit_width, symmetric)
        assert torch.equal(scale[i], expected[0]) and torch.equal(zero_point[i], expected[1])


@FAST
@given(tensors(), specs())
def test_asymmetric_zero_is_exactly_representable(x, spec):
    spec = replace(spec, symmetric=False)
    x = x.clone()
    x.view(-1)[::2] = 0.0  # plant zeros
    scale, zero_point, qmin, qmax = choose_qparams(x, spec)
    assert qmin <= zero_point.min() and zero_point.max() <= qmax
    y = fake_quant(x, scale, zero_point, qmin, qmax)
    assert (y.view(-1)[::2] == 0).all()
    zeros = torch.zeros_like(x)
    assert torch.equal(fake_quant(zeros, scale, zero_point, qmin, qmax), zeros)


# --- range policies ------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(tensor_spec_axis(policy=st.just("mse")))
def test_mse_policy_never_worse_than_minmax(case):
    x, spec, axis = case
    minmax = replace(spec, policy="minmax")

    def group_mse(y):  # the same arithmetic (shape, dtype, reduction) as the policy's search
        diff = (y - x).movedim(axis, 0).reshape(x.shape[axis], -1) if spec.per_channel else (y - x).reshape(1, -1)
        return diff.contiguous().pow(2).mean(dim=1)

    assert (group_mse(quantize(x, spec, axis)) <= group_mse(quantize(x, minmax, axis))).all()


def test_mse_policy_clips_a_heavy_tailed_sample():
    # Non-vacuous: on a Laplace sample at 3 bits the search picks a real clip (ratio < 1) and gains.
    x = torch.distributions.Laplace(0.0, 1.0).sample((20_000,))
    spec, minmax = QuantSpec(3, policy="mse"), QuantSpec(3)
    assert choose_qparams(x, spec)[0] < 0.6 * choose_qparams(x, minmax)[0]
    assert (quantize(x, spec) - x).pow(2).mean() < 0.5 * (quantize(x, minmax) - x).pow(2).mean()


def _reference_mse_clip_ratio(groups, spec, bounds_at):
    """The ``mse`` search as first written, one fake-quant pass per clip ratio: the specification
    that the batched ``quant._mse_clip_ratio`` must meet bit for bit."""
    qmin, qmax = spec.qrange
    best_err = torch.full((groups.shape[0],), math.inf, dtype=groups.dtype, device=groups.device)
    best_ratio = torch.ones_like(best_err)
    for ratio in quant.mse_grid().tolist():
        scale, zero_point = quant.qparams_from_range(*bounds_at(ratio), spec, groups.dtype)
        err = (fake_quant(groups, scale[:, None], zero_point[:, None], qmin, qmax) - groups).pow(2).mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return best_ratio


def assert_mse_search_matches_reference(x, spec, axis=0):
    """Both searches on the policy's own call (its groups and bounds), and the qparams each gives."""
    searches = []
    batched = quant._mse_clip_ratio

    def both(groups, spec, bounds_at):
        searches.append((batched(groups, spec, bounds_at), _reference_mse_clip_ratio(groups, spec, bounds_at)))
        return searches[-1][0]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quant, "_mse_clip_ratio", both)
        ours = choose_qparams(x, spec, axis)
        patch.setattr(quant, "_mse_clip_ratio", _reference_mse_clip_ratio)
        reference = choose_qparams(x, spec, axis)
    [(chosen, expected)] = searches
    assert chosen.dtype == expected.dtype and torch.equal(chosen, expected)
    assert torch.equal(ours[0], reference[0]) and torch.equal(ours[1], reference[1])
    assert ours[2:] == reference[2:]


@settings(max_examples=60, deadline=None)
@given(tensor_spec_axis(policy=st.just("mse")), st.sampled_from([torch.float32, torch.float64]),
       st.booleans(), st.sampled_from([None, 64, 1000]))
def test_mse_search_is_bit_identical_to_reference(case, dtype, zero_channel, batch_numel):
    # batch_numel: small blocks split a group's ratios into chunks and its rows into column tiles.
    x, spec, axis = case
    x = x.to(dtype)
    if zero_channel:  # per-channel, an all-zero group: every ratio ties at error 0
        x.select(axis, 0).zero_()
    with pytest.MonkeyPatch.context() as patch:
        if batch_numel is not None:
            patch.setattr(quant, "_MSE_BATCH_NUMEL", batch_numel)
        assert_mse_search_matches_reference(x, spec, axis)


@pytest.mark.parametrize("numel, symmetric", [(quant._TORCH_GRAIN_SIZE - 1, True),
                                              (quant._TORCH_GRAIN_SIZE - 1, False), (40_000, False)])
def test_mse_search_matches_reference_on_a_long_row(numel, symmetric):
    # From _TORCH_GRAIN_SIZE elements torch sums a per-tensor error row in per-thread pieces.
    x = torch.distributions.Laplace(0.0, 1.0).sample((numel,))
    assert_mse_search_matches_reference(x, QuantSpec(4, symmetric=symmetric, policy="mse"))


def test_a_long_row_alone_sums_in_another_order():
    # Why the search reduces long per-tensor rows one at a time: as rows of a batch they would sum
    # in another order, and their errors (so possibly a near-tie's winner) would differ. Two threads,
    # as the book runs (one thread sums every row in one piece; make test's workers run with one).
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        squared = torch.rand(100, 40_000, generator=torch.Generator().manual_seed(0)) ** 4
        alone = torch.cat([row.mean(dim=1) for row in squared.split(1)])
        assert not torch.equal(squared.mean(dim=1), alone)
        assert torch.equal(quant._row_means(squared, lone=True), alone)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("spec", [QuantSpec(b, symmetric=s, per_channel=c, policy="mse")
                                  for b in (3, 8) for s in (True, False) for c in (True, False)], ids=repr)
def test_mse_search_matches_reference_in_half_precision(spec, dtype):
    x = torch.distributions.Laplace(0.0, 1.0).sample((6, 50)).to(dtype)
    assert_mse_search_matches_reference(x, spec)


@pytest.mark.parametrize(
    "values",
    [[3e38, -3e38, 1.0], [3e38, 3e38, 1.0], [1e-45, 0.0, -1e-45], [1e30, -1e-30, 5.0]],
    ids=["overflowing-range", "huge", "subnormal", "wide"],
)
@pytest.mark.parametrize("bit_width", [2, 8, 16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_search_matches_reference_at_extremes(values, bit_width, symmetric):
    # Infinite scales, infinite or NaN errors and scales clamped to the smallest normal.
    spec = QuantSpec(bit_width, symmetric=symmetric, policy="mse")
    assert_mse_search_matches_reference(torch.tensor(values), spec)


def test_first_least_is_the_strict_scan():
    # The scan starts from error inf and value 1, keeps a value only for a strictly smaller error,
    # and a NaN error is never smaller.
    nan, inf = math.nan, math.inf
    errors = torch.tensor([[3.0, 1.0, 1.0, 2.0], [nan, nan, 5.0, 5.0],
                           [inf, inf, inf, inf], [nan, inf, nan, inf]])
    values = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert torch.equal(quant._first_least(errors, values), torch.tensor([0.2, 0.3, 1.0, 1.0]))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(
    "policy, x",
    [
        ("aciq", torch.full((2, 8), 1.5)),  # constant: zero spread, so a zero aciq clip
        ("percentile", torch.cat([torch.zeros(2, 95), torch.linspace(-1, 1, 10).repeat(2, 1)], dim=1)),
    ],
    ids=["aciq-constant", "percentile-sparse"],
)
def test_a_zero_clip_falls_back_to_minmax(policy, x, symmetric):
    # Without the fallback every value of such a group went to ~1e-38, and through the per-channel
    # kernel's int64 overflow (below) even changed sign.
    for per_channel in (False, True):
        spec = QuantSpec(4, symmetric=symmetric, per_channel=per_channel, policy=policy, percentile=90.0)
        minmax = replace(spec, policy="minmax")
        assert torch.equal(quantize(x, spec), quantize(x, minmax))


def test_an_aciq_range_that_overflows_falls_back_to_minmax():
    # The mean of these values overflows to inf and the asymmetric aciq range to (NaN, hi): a NaN
    # range keeps the min-max range, as a zero one does, instead of giving a NaN scale.
    x = torch.tensor([3e38, 3e38, 1.0])
    spec = QuantSpec(4, symmetric=False, policy="aciq")
    scale, zero_point, _, _ = choose_qparams(x, spec)
    minmax = choose_qparams(x, replace(spec, policy="minmax"))
    assert torch.equal(scale, minmax[0]) and torch.equal(zero_point, minmax[1])


def test_per_channel_values_far_beyond_the_grid_clamp_instead_of_wrapping():
    # torch's fake_quantize_per_channel_affine casts x/scale to int64 before clamping, so |x/scale|
    # > 2^63 wraps to qmin: two channels whose 90th percentile is 1e-30 while their maximum is 1e3
    # (spread 1e33) came out at the grid's negative end. (One channel would take the per-tensor kernel.)
    x = torch.cat([torch.full((2, 95), 1e-30), torch.full((2, 5), 1e3)], dim=1).requires_grad_()
    spec = QuantSpec(4, per_channel=True, policy="percentile", percentile=90.0)
    y = quantize(x, spec)
    assert torch.equal(y, quantize(x, replace(spec, per_channel=False)))
    y.sum().backward()
    assert torch.equal(x.grad, (x.detach() <= 1e-30 * 8).float())  # straight through inside the grid only


@pytest.mark.parametrize("bit_width", range(2, 9))
@pytest.mark.parametrize(
    "prior, table",
    [
        ("laplace", [2.83, 3.89, 5.03, 6.2, 7.41, 8.64, 9.89]),  # Banner et al. 2019
        ("gaussian", [1.71, 2.15, 2.55, 2.94, 3.29, 3.61, 3.92]),
    ],
)
def test_aciq_alpha_matches_banner_table(prior, table, bit_width):
    assert aciq_alpha(bit_width, prior) == pytest.approx(table[bit_width - 2], abs=0.015)


def test_aciq_policy_clips_at_alpha_times_spread():
    x = torch.distributions.Laplace(0.0, 2.0).sample((50_000,))
    scale, _, _, qmax = choose_qparams(x, QuantSpec(4, policy="aciq"))
    b = (x - x.mean()).abs().mean()
    assert float(scale * qmax) == pytest.approx(aciq_alpha(4, "laplace") * float(b), rel=1e-5)


# --- straight-through estimator and the float64 path ---------------------------------------------


@st.composite
def exact_grid_case(draw):
    """Values k/4 * s with s a power of two: x / s and every output are exact in float32 and float64,
    ties (k/4 = n + 1/2) included, so both paths must agree bit for bit."""
    bit_width, symmetric, narrow = draw(bit_widths), draw(st.booleans()), draw(st.booleans())
    qmin, qmax = quant.qrange(bit_width, signed=symmetric, narrow_range=narrow)
    scale = torch.tensor(2.0 ** draw(st.integers(-12, 4)))
    zero_point = torch.tensor(0 if symmetric else draw(st.integers(qmin, qmax)), dtype=torch.int32)
    quarter_steps = draw(st.lists(st.integers(4 * (qmin - zero_point.item() - 3),
                                              4 * (qmax - zero_point.item() + 3)), min_size=1, max_size=40))
    x = torch.tensor(quarter_steps, dtype=torch.float64) / 4 * scale.double()
    return x, scale, zero_point, qmin, qmax


@FAST
@given(exact_grid_case())
def test_ste_gradient_is_one_inside_and_zero_outside(case):
    x, scale, zero_point, qmin, qmax = case
    unclamped = torch.round(x / scale.double()) + zero_point  # exact: x / scale is a multiple of 1/4
    inside = ((unclamped >= qmin) & (unclamped <= qmax)).double()
    for dtype in (torch.float32, torch.float64):  # the kernel and the reference path
        leaf = x.to(dtype).requires_grad_()
        fake_quant(leaf, scale.to(dtype), zero_point, qmin, qmax).sum().backward()
        assert torch.equal(leaf.grad.double(), inside), dtype


@FAST
@given(exact_grid_case())
def test_float64_reference_matches_float32_kernel(case):
    x, scale, zero_point, qmin, qmax = case
    kernel = fake_quant(x.float(), scale, zero_point, qmin, qmax)
    reference = fake_quant(x, scale.double(), zero_point, qmin, qmax)
    assert reference.dtype == torch.float64
    assert torch.equal(reference, kernel.double())
    # half-to-even at ties: 0.5 -> 0, 1.5 -> 2, -0.5 -> 0 (a floor-based grid would differ)
    ties = torch.tensor([0.5, 1.5, -0.5, -1.5]) * scale
    assert torch.equal(fake_quant(ties, scale, torch.tensor(0), -7, 7) / scale, torch.tensor([0.0, 2.0, 0.0, -2.0]))


def test_float64_per_channel_reference_matches_kernel():
    scale = torch.tensor([0.5, 0.25, 2.0]).reshape(3, 1)
    x = torch.arange(-40, 40, dtype=torch.float64).reshape(1, -1).repeat(3, 1) / 8
    zero_point = torch.zeros(3, 1, dtype=torch.int32)
    assert torch.equal(fake_quant(x, scale.double(), zero_point, -7, 7),
                       fake_quant(x.float(), scale, zero_point, -7, 7).double())


@pytest.mark.parametrize("spec", [QuantSpec(4, symmetric=s, per_channel=c, policy=p)
                                  for s in (True, False) for c in (True, False) for p in POLICIES],
                         ids=lambda s: f"{'sym' if s.symmetric else 'asym'}-{'pc' if s.per_channel else 'pt'}-{s.policy}")
def test_all_zero_tensor_quantizes_to_zeros(spec):
    x = torch.zeros(4, 3, 2, 2, requires_grad=True)
    y = quantize(x, spec)
    assert torch.equal(y, torch.zeros_like(y))
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    scale = choose_qparams(x, spec)[0]
    assert torch.isfinite(scale).all() and (scale > 0).all()


# --- bad inputs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bit_width", [1, 17, 0, -4, 4.0, True, "4", None])
def test_bad_bit_width_raises(bit_width):
    with pytest.raises(ValueError, match="bit_width"):
        QuantSpec(bit_width)
    with pytest.raises(ValueError, match="bit_width"):
        quant.qrange(bit_width)


def test_aciq_alpha_validates_after_caching():
    aciq_alpha(4, "laplace")  # cache (4, "laplace"); the float key (4.0, "laplace") must not hit it
    with pytest.raises(ValueError, match="bit_width"):
        aciq_alpha(4.0, "laplace")
    with pytest.raises(ValueError, match="prior"):
        aciq_alpha(4, "cauchy")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"policy": "max"}, "policy"),
        ({"policy": "MSE"}, "policy"),
        ({"percentile": 50.0}, "percentile"),
        ({"percentile": 100.5}, "percentile"),
        ({"percentile": -1.0}, "percentile"),
        ({"percentile": math.nan}, "percentile"),
        ({"aciq_prior": "cauchy"}, "aciq_prior"),
        ({"symmetric": 1}, "symmetric"),
        ({"symmetric": "yes"}, "symmetric"),
        ({"narrow_range": None}, "narrow_range"),
        ({"per_channel": 0}, "per_channel"),
    ],
)
def test_bad_spec_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec(4, **kwargs)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("spec", [QuantSpec(4), QuantSpec(4, symmetric=False), QuantSpec(4, per_channel=True, policy="mse")],
                         ids=["sym", "asym", "pc-mse"])
def test_non_finite_input_raises(bad, spec):
    x = torch.randn(3, 5)
    x[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or infinity"):
        quantize(x, spec)


@pytest.mark.parametrize("spec", [QuantSpec(4), QuantSpec(4, per_channel=True)], ids=["pt", "pc"])
def test_empty_tensor_raises(spec):
    with pytest.raises(ValueError, match="empty"):
        quantize(torch.zeros(0, 3), spec)


@pytest.mark.parametrize("axis", [2, -3, 5])
def test_axis_out_of_range_raises(axis):
    with pytest.raises(ValueError, match="axis"):
        quantize(torch.randn(3, 4), QuantSpec(4, per_channel=True), axis=axis)


@pytest.mark.parametrize(
    "scale_shape, match",
    [((5, 1), "channels on axis 0"), ((1, 3, 1), "does not fit"), ((3, 4), "does not fit"), ((4,), "does not fit")],
)
def test_fake_quant_scale_that_does_not_fit_raises(scale_shape, match):
    x = torch.randn(3, 4)
    scale = torch.full(scale_shape, 0.1)
    with pytest.raises(ValueError, match=match):
        fake_quant(x, scale, torch.zeros(scale_shape, dtype=torch.int32), -7, 7)
