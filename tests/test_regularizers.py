import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from robustq.quant import QuantSpec, quantize
from robustq import regularizers
from robustq.regularizers import grad_l1, kure, oscillation, sinreq, sinreq_grid, sinreq_lambda, sym_reg

BIT_WIDTHS = range(2, 9)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- SymReg ---------------------------------------------------------------------------------------

SCOPES = ["layer", "channel", "kernel"]
PAIRINGS = ["1:1", "2:2"]


def _naive_pair_sums(s):
    """1:1 sums of a sorted list, the median (odd length) paired with itself."""
    n = len(s)
    return [s[k] + s[n - 1 - k] for k in range((n + 1) // 2)]


def _naive_set_penalty(values, pairing):
    """The docstring's ``L`` of one set, as loops over a sorted Python list."""
    s, n = sorted(values), len(values)
    if pairing == "1:1":
        sums = _naive_pair_sums(s)
    else:
        groups = n // 4
        sums = [s[2 * k] + s[2 * k + 1] + s[n - 1 - 2 * k] + s[n - 2 - 2 * k] for k in range(groups)]
        sums += _naive_pair_sums(s[2 * groups : n - 2 * groups])
    return sum(x**2 for x in sums) / n


def _naive_spread(values):
    n = len(values)
    if n == 1:
        return values[0] ** 2
    mean = sum(values) / n
    return sum((x - mean) ** 2 for x in values) / n


def naive_sym_reg(w, pairing, scope, normalize):
    """The docstring's definition, written as loops over nested Python lists."""
    rows = [w.reshape(-1).tolist()] if scope == "layer" else w.reshape(w.shape[0], -1).tolist()
    kernel_size = math.prod(w.shape[2:]) if w.dim() >= 3 else 1
    penalties = []
    for row in rows:
        if scope == "kernel" and kernel_size > 1:
            sets = [row[i : i + kernel_size] for i in range(0, len(row), kernel_size)]
        else:
            sets = [row]
        for values in sets:
            penalty = _naive_set_penalty(values, pairing)
            penalties.append(penalty / (_naive_spread(row) + 1e-12) if normalize else penalty)
    return sum(penalties) / len(penalties)


@settings(max_examples=80, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    pairing=st.sampled_from(PAIRINGS),
    scope=st.sampled_from(SCOPES),
    normalize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_sym_reg_matches_naive_formula(shape, pairing, scope, normalize, seed):
    w = torch.randn(*shape, dtype=torch.float64, generator=_generator(seed)).exp()  # skewed
    expected = naive_sym_reg(w, pairing, scope, normalize)
    assert sym_reg(w, pairing, scope, normalize).item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def _mirrored_sets(n_sets, size, seed):
    """``n_sets`` shuffled sets of ``size`` weights, each the union of v and -v (plus 0 if odd)."""
    g = _generator(seed)
    half = torch.randn(n_sets, size // 2, dtype=torch.float64, generator=g)
    zeros = torch.zeros(n_sets, size % 2, dtype=torch.float64)
    sets = torch.cat([half, -half, zeros], dim=1)
    return sets[:, torch.randperm(size, generator=g)]


def _sets_shape(shape, scope):
    """(number of sets, weights per set) of ``scope`` for a tensor of ``shape``."""
    numel, out = math.prod(shape), shape[0]
    kernel_size = math.prod(shape[2:])
    if scope == "layer":
        return 1, numel
    if scope == "kernel" and kernel_size > 1:
        return out * shape[1], kernel_size
    return out, numel // out


conv_or_linear_shapes = st.one_of(
    st.tuples(st.integers(1, 4), st.integers(1, 4)),
    st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
)


@settings(max_examples=120, deadline=None)
@given(
    shape=conv_or_linear_shapes,
    pairing=st.sampled_from(PAIRINGS),
    scope=st.sampled_from(SCOPES),
    normalize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_sym_reg_is_zero_on_mirrored_sets_and_positive_otherwise(shape, pairing, scope, normalize, seed):
    n_sets, size = _sets_shape(shape, scope)
    mirrored = _mirrored_sets(n_sets, size, seed).reshape(shape)
    assert sym_reg(mirrored, pairing, scope, normalize).item() == pytest.approx(0.0, abs=1e-12)
    generic = torch.randn(shape, dtype=torch.float64, generator=_generator(seed + 1))
    assert sym_reg(generic, pairing, scope, normalize).item() > 0


@pytest.mark.parametrize("pairing", PAIRINGS)
@pytest.mark.parametrize("normalize", [False, True])
def test_sym_reg_counts_the_median_of_odd_sets(pairing, normalize):
    odd = torch.tensor([-2.0, -1.0, 0.5, 1.0, 2.0], dtype=torch.float64)
    assert sym_reg(odd, pairing, normalize=False).item() == pytest.approx((2 * 0.5) ** 2 / 5)
    for scope in SCOPES:
        assert sym_reg(odd.reshape(1, 5), pairing, scope, normalize).item() > 0
        assert sym_reg(odd.reshape(1, 1, 5), pairing, scope, normalize).item() > 0
        with_zero_median = odd.clone()
        with_zero_median[2] = 0.0
        assert sym_reg(with_zero_median.reshape(1, 1, 5), pairing, scope, normalize).item() == 0.0


def test_sym_reg_two_to_two_pairs_the_leftover_middle():
    # N = 6: one group per tail (-3 - 2) + (4 + 5) = 4, middle (0, 1) paired 1:1 -> 1
    w = torch.tensor([-3.0, -2.0, 0.0, 1.0, 4.0, 5.0])
    assert sym_reg(w, "2:2", normalize=False).item() == pytest.approx((4**2 + 1**2) / 6)
    # N = 7: the middle (0, 1, 3) -> (0 + 3)^2 + (2 * 1)^2
    w = torch.tensor([-3.0, -2.0, 0.0, 1.0, 3.0, 4.0, 5.0])
    assert sym_reg(w, "2:2", normalize=False).item() == pytest.approx((4**2 + 3**2 + 2**2) / 7)
    # 2:2 only mirrors pair sums: zero on this asymmetric set, which 1:1 catches
    coarse = torch.tensor([-3.0, -1.0, 2.0, 2.0])
    assert sym_reg(coarse, "2:2").item() == 0.0 and sym_reg(coarse, "1:1").item() > 0


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("pairing", PAIRINGS)
def test_sym_reg_of_single_weights(scope, pairing):
    lone = torch.tensor([[3.0]], dtype=torch.float64, requires_grad=True)
    assert sym_reg(lone, pairing, scope, normalize=False).item() == pytest.approx(4 * 9.0)
    # normalised by its mean of squares, not its zero variance: bounded, with a vanishing gradient
    penalty = sym_reg(lone, pairing, scope, normalize=True)
    penalty.backward()
    assert penalty.item() == pytest.approx(4.0)
    assert lone.grad.abs().item() < 1e-9
    assert sym_reg(torch.zeros(1, 1), pairing, scope).item() == 0.0
    rows_of_one = torch.tensor([[1.0], [-2.0], [0.0]])  # Linear(1, 3)
    if scope != "layer":
        assert sym_reg(rows_of_one, pairing, scope, normalize=False).item() == pytest.approx((4 + 16 + 0) / 3)
        assert sym_reg(rows_of_one, pairing, scope).item() == pytest.approx((4 + 4 + 0) / 3)


# A (2 outputs, 2 inputs, 1 x 3) conv weight; its kernels, rows and sorted layer:
#   k00 = [-1, 0, 1]  k01 = [1, 2, 3]  |  row 0 = [-1, 0, 1, 1, 2, 3], variance 5/3
#   k10 = [0, 0, 2]   k11 = [-1, -1, 1] |  row 1 = [-1, -1, 0, 0, 1, 2], variance 41/36
#   layer = [-1, -1, -1, 0, 0, 0, 1, 1, 1, 2, 2, 3], variance 227/144
HAND_CONV = [[[[-1.0, 0.0, 1.0]], [[1.0, 2.0, 3.0]]], [[[0.0, 0.0, 2.0]], [[-1.0, -1.0, 1.0]]]]
HAND_VALUES = {
    # kernels: 0, (4^2 + (2*2)^2)/3, ((0+2)^2 + 0)/3, (0 + (2*-1)^2)/3; 2:2 = 1:1 for N = 3
    ("kernel", "1:1", False): (0 + 32 / 3 + 4 / 3 + 4 / 3) / 4,
    ("kernel", "2:2", False): (0 + 32 / 3 + 4 / 3 + 4 / 3) / 4,
    # each kernel over its row's variance: (0 + (32/3)/(5/3) + 2 (4/3)/(41/36)) / 4
    ("kernel", "1:1", True): (32 / 5 + 2 * 48 / 41) / 4,
    # rows: (2^2 + 2^2 + 2^2)/6 and ((-1+2)^2 + 0 + 0)/6
    ("channel", "1:1", False): (12 / 6 + 1 / 6) / 2,
    # rows: ((-1+0+2+3)^2 + (1+1)^2)/6 and ((-1-1+1+2)^2 + (0+0)^2)/6
    ("channel", "2:2", False): (20 / 6 + 1 / 6) / 2,
    ("channel", "1:1", True): (2 / (5 / 3) + (1 / 6) / (41 / 36)) / 2,
    # pairs 2, 1, 1, 1, 1, 1
    ("layer", "1:1", False): 9 / 12,
    # pair groups (-2 + 5), (-1 + 3), (0 + 2)
    ("layer", "2:2", False): 17 / 12,
    ("layer", "1:1", True): (9 / 12) / (227 / 144),
}


@pytest.mark.parametrize("scope, pairing, normalize", list(HAND_VALUES))
def test_sym_reg_hand_computed_values(scope, pairing, normalize):
    w = torch.tensor(HAND_CONV, dtype=torch.float64)
    expected = HAND_VALUES[scope, pairing, normalize]
    assert sym_reg(w, pairing, scope, normalize).item() == pytest.approx(expected, rel=1e-12)


def test_sym_reg_known_value():
    w = torch.tensor([0.0, 1.0, 2.0, 5.0])
    # pairs (0 + 5) and (1 + 2): (25 + 9) / 4
    assert sym_reg(w, normalize=False).item() == pytest.approx(34 / 4)
    # one 2:2 group: (0 + 1 + 2 + 5)^2 / 4
    assert sym_reg(w, pairing="2:2", normalize=False).item() == pytest.approx(64 / 4)


@pytest.mark.parametrize("shape", [(4, 6), (4, 6, 1, 1)], ids=["linear", "conv1x1"])
@pytest.mark.parametrize("pairing", PAIRINGS)
@pytest.mark.parametrize("normalize", [False, True])
def test_sym_reg_kernel_scope_falls_back_to_channel(shape, pairing, normalize):
    w = torch.randn(shape, dtype=torch.float64, generator=_generator(13))
    kernel, channel = sym_reg(w, pairing, "kernel", normalize), sym_reg(w, pairing, "channel", normalize)
    assert kernel.item() == channel.item()


@pytest.mark.parametrize("pairing", PAIRINGS)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("normalize", [False, True])
def test_sym_reg_zero_on_mirrored_and_positive_on_skewed(pairing, scope, normalize):
    half = torch.rand(6, 20, generator=_generator(1))
    mirrored = torch.cat([half, -half], dim=1)[:, torch.randperm(40, generator=_generator(2))]
    assert sym_reg(mirrored, pairing, scope, normalize).item() == 0.0
    skewed = torch.empty(6, 40).exponential_(generator=_generator(3))
    assert sym_reg(skewed, pairing, scope, normalize).item() > 0.01


@pytest.mark.parametrize("scope", SCOPES)
def test_sym_reg_normalized_is_scale_free(scope):
    w = torch.randn(8, 3, 3, 3, dtype=torch.float64, generator=_generator(4)).exp()
    assert torch.allclose(sym_reg(100.0 * w, scope=scope), sym_reg(w, scope=scope))
    assert not torch.allclose(
        sym_reg(100.0 * w, scope=scope, normalize=False), sym_reg(w, scope=scope, normalize=False)
    )


@pytest.mark.parametrize("pairing", PAIRINGS)
def test_sym_reg_kernel_scope_sees_asymmetry_that_channel_scope_misses(pairing):
    # each row mirrors about 0, but its two kernels are shifted apart: with inputs of different
    # means the output still shifts, which only kernel scope penalises
    w = torch.tensor([[[[0.0, 1.0, 2.0]], [[-2.0, -1.0, 0.0]]]] * 2)
    assert sym_reg(w, pairing, "channel").item() == 0.0
    assert sym_reg(w, pairing, "layer").item() == 0.0
    assert sym_reg(w, pairing, "kernel").item() > 0


@pytest.mark.parametrize("pairing", PAIRINGS)
@pytest.mark.parametrize("scope", ["layer", "channel"])
@pytest.mark.parametrize("normalize", [False, True])
def test_sym_reg_gradcheck(pairing, scope, normalize):
    w = torch.randn(3, 9, dtype=torch.float64, generator=_generator(5)).exp().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: sym_reg(t, pairing, scope, normalize), (w,))


@pytest.mark.parametrize("shape", [(2, 3, 1, 5), (2, 2, 2, 3), (3, 1, 1, 1)], ids=["odd", "even", "single"])
@pytest.mark.parametrize("pairing", PAIRINGS)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("normalize", [False, True])
def test_sym_reg_gradcheck_on_conv_weights(shape, pairing, scope, normalize):
    w = torch.randn(shape, dtype=torch.float64, generator=_generator(14)).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: sym_reg(t, pairing, scope, normalize), (w,))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"pairing": "3:3"}, r"pairing must be one of \('1:1', '2:2'\), got '3:3'"),
        ({"scope": "row"}, r"scope must be one of \('layer', 'channel', 'kernel'\), got 'row'"),
    ],
)
def test_sym_reg_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sym_reg(torch.randn(10), **kwargs)


def test_sym_reg_rejects_empty_and_scalar_channel():
    with pytest.raises(ValueError, match="empty"):
        sym_reg(torch.empty(0))
    for scope in ("channel", "kernel"):
        with pytest.raises(ValueError, match=f"scope='{scope}' needs a tensor with an output-channel axis"):
            sym_reg(torch.tensor(1.0), scope=scope)


# --- KURE -----------------------------------------------------------------------------------------


def test_kure_uniform_is_near_zero_and_gaussian_near_closed_form():
    uniform = torch.rand(1_000_000, generator=_generator(6), dtype=torch.float64) * 2 - 1
    assert kure(uniform).item() < 1e-3
    gaussian = torch.randn(1_000_000, generator=_generator(7), dtype=torch.float64)
    assert kure(gaussian).item() == pytest.approx((3 - 1.8) ** 2, abs=0.03)


def test_kure_uses_unbiased_std():
    # std([-1, 1]) = sqrt(2) unbiased, so the standardized values are +-1/sqrt(2): kurtosis 1/4.
    assert kure(torch.tensor([-1.0, 1.0]), target=0.0).item() == pytest.approx(0.25**2)


def test_kure_gradcheck():
    w = torch.randn(40, dtype=torch.float64, generator=_generator(8)).requires_grad_()
    assert torch.autograd.gradcheck(kure, (w,))


def test_kure_rejects_single_weight():
    with pytest.raises(ValueError, match="at least 2 weights"):
        kure(torch.tensor([1.0]))


# --- SinReQ ---------------------------------------------------------------------------------------


def _levels(bit_width, grid):
    if grid == "wrpn":
        n = 2 ** (bit_width - 1) - 1
        return torch.arange(-n, n + 1, dtype=torch.float64) / n
    n = 2**bit_width - 1
    return 2 * torch.arange(n + 1, dtype=torch.float64) / n - 1


@pytest.mark.parametrize("grid", ["wrpn", "dorefa"])
@pytest.mark.parametrize("bit_width", BIT_WIDTHS)
def test_sinreq_zero_on_grid_and_one_at_half_steps(grid, bit_width):
    levels = _levels(bit_width, grid)
    step, _ = sinreq_grid(bit_width, grid)
    assert step == pytest.approx((levels[1] - levels[0]).item())
    assert sinreq(levels, bit_width, grid).item() == pytest.approx(0.0, abs=1e-20)
    assert sinreq(levels[:-1] + step / 2, bit_width, grid).item() == pytest.approx(1.0, abs=1e-12)


def test_sinreq_dorefa_acts_on_raw_weights_with_half_step_shift():
    step, shift = sinreq_grid(3, "dorefa")
    assert (step, shift) == pytest.approx((2 / 7, 1 / 7))
    assert sinreq(torch.tensor([0.0], dtype=torch.float64), 3, "dorefa").item() == pytest.approx(1.0)


@pytest.mark.parametrize("grid", ["wrpn", "dorefa"])
def test_sinreq_gradcheck(grid):
    w = torch.randn(30, dtype=torch.float64, generator=_generator(9)).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: sinreq(t, 3, grid), (w,))


def test_sinreq_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"grid must be one of \('wrpn', 'dorefa'\), got 'lsq'"):
        sinreq(torch.randn(4), 4, grid="lsq")
    with pytest.raises(ValueError, match="bit_width"):
        sinreq(torch.randn(4), 1)
    with pytest.raises(ValueError, match="bit_width"):
        sinreq(torch.randn(4), True)


def test_sinreq_lambda_schedule():
    assert sinreq_lambda(40, 200) == pytest.approx(0.5)
    assert sinreq_lambda(0, 200) == pytest.approx(0.5 * (1 + math.tanh(-2)))
    assert sinreq_lambda(0, 10, ramp=0.5) < 0.02 and sinreq_lambda(9, 10, ramp=0.5) > 0.98
    values = [sinreq_lambda(e, 30, ramp=3.0) for e in range(30)]
    assert values == sorted(values)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"epochs": 0}, "epochs must be"), ({"ramp": -1.0}, r"ramp must be > 0 \(in epochs\), got -1.0")],
)
def test_sinreq_lambda_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sinreq_lambda(**{"epoch": 1, "epochs": 10, **kwargs})


# --- Oscillation ----------------------------------------------------------------------------------


def _maxabs_quantize(w, bit_width):
    qmax = 2 ** (bit_width - 1) - 1
    scale = w.abs().max() / qmax
    return scale * torch.round(w / scale), scale


@pytest.mark.parametrize("bit_width", BIT_WIDTHS)
def test_oscillation_value_and_gradient_with_detached_scale(bit_width):
    w = torch.randn(5, 7, generator=_generator(bit_width)).requires_grad_()
    penalty = oscillation(w, bit_width)
    penalty.backward()
    q, _ = _maxabs_quantize(w.detach(), bit_width)
    assert torch.allclose(penalty, (q**2 - w.detach() ** 2).mean())
    assert torch.allclose(w.grad, 2 * (q - w.detach()) / w.numel(), atol=1e-7)
    shared = quantize(w.detach(), QuantSpec(bit_width))
    assert torch.allclose(q, shared, atol=1e-6)


def test_oscillation_released_code_gradient_flows_through_scale():
    bit_width, w = 3, torch.randn(20, dtype=torch.float64, generator=_generator(10)).requires_grad_()
    oscillation(w, bit_width, detach_scale=False).backward()
    q, scale = _maxabs_quantize(w.detach(), bit_width)
    codes = torch.round(w.detach() / scale)
    d_penalty_d_scale = (2 * q * (codes - w.detach() / scale)).mean()
    expected = 2 * (q - w.detach()) / w.numel()
    top = w.detach().abs().argmax()
    expected[top] += d_penalty_d_scale * torch.sign(w.detach()[top]) / (2 ** (bit_width - 1) - 1)
    assert torch.allclose(w.grad, expected)
    assert not torch.allclose(w.grad, 2 * (q - w.detach()) / w.numel())


def test_oscillation_of_zeros_is_zero():
    assert oscillation(torch.zeros(4), 4).item() == 0.0


def test_oscillation_rejects_bad_bit_width():
    with pytest.raises(ValueError, match="bit_width"):
        oscillation(torch.randn(4), 17)


# --- Gradient L1 ----------------------------------------------------------------------------------


def _mlp_loss(w1, b1, w2, b2, x, y):
    hidden = torch.tanh(x @ w1.T + b1)
    return 0.5 * ((hidden @ w2.T + b2 - y) ** 2).mean()


def _mlp_tensors(seed=11):
    g = _generator(seed)
    shapes = [(5, 3), (5,), (2, 5), (2,)]
    params = [torch.randn(s, dtype=torch.float64, generator=g).requires_grad_() for s in shapes]
    x = torch.randn(4, 3, dtype=torch.float64, generator=g)
    y = torch.randn(4, 2, dtype=torch.float64, generator=g)
    return params, x, y


def test_grad_l1_equals_explicit_sum_of_abs_grads():
    params, x, y = _mlp_tensors()
    loss = _mlp_loss(*params, x, y)
    explicit = sum(g.abs().sum() for g in torch.autograd.grad(loss, params, retain_graph=True))
    assert torch.allclose(grad_l1(loss, params), explicit)


def test_grad_l1_is_differentiable_wrt_parameters():
    params, x, y = _mlp_tensors()
    w1, b1, w2, b2 = params

    def penalty(first_weight):
        return grad_l1(_mlp_loss(first_weight, b1, w2, b2, x, y), [first_weight, w2])

    assert torch.autograd.gradcheck(penalty, (w1,))
    penalty(w1).backward()
    assert w1.grad is not None and b1.grad is not None and w2.grad.abs().sum() > 0


def test_grad_l1_on_activations_captured_by_hook():
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    captured = []
    model[1].register_forward_hook(lambda module, inputs, output: captured.append(output))
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    out = model(x)
    loss = 0.5 * ((out - y) ** 2).sum()
    explicit = ((out - y) @ model[2].weight).abs().sum()
    penalty = grad_l1(loss, captured)
    assert torch.allclose(penalty, explicit)
    penalty.backward()
    assert model[0].weight.grad is not None


def test_grad_l1_unused_and_frozen_tensors_contribute_zero():
    params, x, y = _mlp_tensors()
    loss = _mlp_loss(*params, x, y)
    unused = torch.randn(3, dtype=torch.float64, requires_grad=True)
    frozen = torch.randn(3, dtype=torch.float64)
    assert torch.allclose(grad_l1(loss, params + [unused, frozen]), grad_l1(loss, params))
    assert grad_l1(loss, [unused]).item() == 0.0
    assert grad_l1(loss, [frozen]).item() == 0.0


def test_grad_l1_rejects_bad_arguments():
    params, x, y = _mlp_tensors()
    loss = _mlp_loss(*params, x, y)
    with pytest.raises(ValueError, match="at least one tensor"):
        grad_l1(loss, [])
    with pytest.raises(ValueError, match="loss must be a scalar"):
        grad_l1(torch.stack([loss, loss]), params)


def test_grad_l1_scales_weight_each_tensor():
    params, x, y = _mlp_tensors()
    loss = _mlp_loss(*params, x, y)
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    scales = [2.0, 0.0, 0.5, 1.0]
    expected = sum(s * g.abs().sum() for s, g in zip(scales, grads))
    assert torch.allclose(grad_l1(loss, params, scales=scales), expected)
    assert grad_l1(loss, params, scales=[0.0] * 4).item() == 0.0


@pytest.mark.parametrize(
    "scales, match",
    [
        ([1.0], r"scales must have one entry per tensor \(4\), got 1"),
        ([1.0, -1.0, 1.0, 1.0], "scales must be >= 0"),
    ],
)
def test_grad_l1_rejects_bad_scales(scales, match):
    params, x, y = _mlp_tensors()
    with pytest.raises(ValueError, match=match):
        grad_l1(_mlp_loss(*params, x, y), params, scales=scales)


def test_sym_reg_seconds_times_the_penalty_and_its_backward_without_touching_the_weights():
    weights = [torch.randn(8, 4, 3, 3), torch.randn(10, 32)]
    before = [w.clone() for w in weights]
    for pairing in regularizers.SYM_PAIRINGS:
        seconds = regularizers.sym_reg_seconds(weights, pairing, "channel", repeats=3)
        assert 0 < seconds < 1
    assert all(torch.equal(w, b) and w.grad is None for w, b in zip(weights, before))


def test_grad_l1_half_steps_are_half_the_min_max_step_and_detached():
    weights = [torch.tensor([0.5, -7.0], requires_grad=True), torch.tensor([[1.4, 0.0]])]
    half_steps = regularizers.grad_l1_half_steps(weights, bit_width=4)  # qmax = 7
    assert half_steps == pytest.approx([0.5, 0.1])
    assert all(isinstance(h, float) for h in half_steps)


@pytest.mark.parametrize(
    "weights, bit_width, match",
    [([], 4, "at least one tensor"), ([torch.zeros(0)], 4, "at least one element"),
     ([torch.ones(2)], 1, "bit_width must be in 2..16")],
)
def test_grad_l1_half_steps_rejects_bad_arguments(weights, bit_width, match):
    with pytest.raises(ValueError, match=match):
        regularizers.grad_l1_half_steps(weights, bit_width)


def test_grad_l1_maps_each_gradient_through_its_transform_before_the_norm():
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    loss = (w * torch.tensor([3.0, 4.0])).sum()  # dL/dw = (3, 4)
    doubled = regularizers.grad_l1(loss, [w], transforms=[lambda g: 2 * g])
    assert doubled.item() == pytest.approx(14.0)
    with pytest.raises(ValueError, match="one entry per tensor"):
        regularizers.grad_l1(loss, [w], transforms=[None, None])
