import math

import pandas as pd
import pytest
import torch
from torch import nn

from robustq import analysis, models, ptq, quant
from robustq.quant import QuantSpec


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    model = models.make_model("cnn", 1, 10).eval()
    generator = torch.Generator().manual_seed(1)
    for m in model.modules():  # non-trivial BN statistics, so folding matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
    return model


@pytest.fixture(scope="module")
def images():
    return torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(2))


def test_kl_of_identical_samples_is_zero_and_positive_when_shifted():
    y = torch.randn(20_000, generator=torch.Generator().manual_seed(0))
    assert analysis.kl_divergence(y, y.clone()) == 0.0
    assert analysis.kl_divergence(y, y + 0.5) > 0.05
    assert analysis.kl_divergence(y, y + 0.5) > analysis.kl_divergence(y, y + 0.1) > 0


def test_kl_keeps_mass_outside_the_float_range():
    # Q entirely beyond P's range lands in the last bin instead of vanishing.
    p = torch.linspace(0, 1, 1000)
    assert analysis.kl_divergence(p, p + 10.0) > 1.0


def test_mean_shift_and_relative_mse_on_known_changes():
    generator = torch.Generator().manual_seed(0)
    # float64, so that rounding (of sums whose order differs by CPU) is far below the tolerances
    scales = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64).view(1, 3, 1, 1)
    y = torch.randn(64, 3, 5, 5, generator=generator).double() * scales
    shifted = y + 0.5
    per_channel = analysis.mean_shift(y, shifted, reduce=False)
    std = y.transpose(0, 1).reshape(3, -1).std(dim=1, unbiased=False)
    torch.testing.assert_close(per_channel, 0.5 / std, atol=0, rtol=1e-12)
    assert analysis.mean_shift(y, y) == 0.0
    assert analysis.relative_mse(y, 1.1 * y) == pytest.approx(0.01, rel=1e-12)


def test_zero_mean_weight_error_gives_no_mean_shift():
    """A linear layer with mirrored weights in every row, quantized by an odd (symmetric
    narrow-range) quantizer: each row's error has zero mean, so on inputs with a common positive
    mean the output mean does not move, while an asymmetric quantizer shifts it."""
    generator = torch.Generator().manual_seed(0)
    half = torch.randn(16, 64, generator=generator)
    layer = nn.Linear(128, 16, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.cat([half, -half], dim=1))
    x = torch.rand(4096, 128, generator=generator) + 0.5  # positive inputs, like after a ReLU
    sym = analysis.weight_error_mean(layer, QuantSpec(3), fold=False)
    asym = analysis.weight_error_mean(layer, QuantSpec(3, symmetric=False), fold=False)
    assert sym["dw_mean"].abs().max() < 1e-7
    assert asym["dw_mean"].abs().max() > 1e-3
    y = layer(x)
    quantized = analysis.quantize_layers(layer, QuantSpec(3))
    # x has the same mean in every input, so sum_i dW_ci E[x_i] = 0 up to the sampling noise of x
    assert analysis.mean_shift(y, quantized(x)) < 0.02
    asym_layer = analysis.quantize_layers(layer, QuantSpec(3, symmetric=False))
    assert analysis.mean_shift(y, asym_layer(x)) > 5 * analysis.mean_shift(y, quantized(x))


def test_shift_prediction_is_exact_for_a_linear_layer_on_its_mean_input():
    generator = torch.Generator().manual_seed(0)
    # float64: in float32 the two sides differ by ~1e-8 of rounding, by an amount that depends on the CPU
    net = nn.Sequential(nn.Linear(20, 8)).double()
    x = torch.rand(512, 20, generator=generator).double()
    frame = analysis.shift_prediction(net, x, QuantSpec(3, symmetric=False), fold=False)
    assert len(frame) == 8
    # for a linear layer E[dW x] = dW E[x] exactly
    predicted, measured = (torch.tensor(frame[column].to_numpy()) for column in ("predicted", "measured"))
    torch.testing.assert_close(predicted, measured, atol=1e-12, rtol=1e-12)


def test_shift_prediction_tracks_the_measured_shift_in_a_cnn(cnn, images):
    frame = analysis.shift_prediction(cnn, images, QuantSpec(3, symmetric=False))
    assert set(frame["depth"]) == set(range(1, 7))
    assert frame[["measured", "predicted", "predicted_scalar"]].notna().all().all()
    assert frame["measured"].corr(frame["predicted"]) > 0.8


def test_clip_curve_splits_the_error_into_rounding_inside_and_clipping_beyond_the_clip():
    w = torch.distributions.Laplace(0.0, 1.0).sample((3000,))
    curve = analysis.clip_curve(w, bit_widths=(3,), ratios=[0.3, 0.6, 1.0])
    power = w.double().pow(2).mean().item()
    for row in curve.itertuples():
        t = row.r * w.abs().max().item()
        error = (quant.fake_quant(w, torch.tensor(row.step), torch.tensor(0), -3, 3) - w).double().pow(2)
        assert row.clipping == pytest.approx(error[w.abs() > t].sum().item() / w.numel() / power, rel=1e-5)
        assert row.rounding + row.clipping == pytest.approx(row.rel_mse, rel=1e-9)
        assert row.step == pytest.approx(t / 3, rel=1e-6)
    assert curve.loc[curve["r"] == 1.0, "clipping"].item() == 0.0


def test_clip_curve_matches_a_direct_computation_on_a_gaussian_sample():
    w = torch.randn(4000, generator=torch.Generator().manual_seed(0))
    ratios = [0.1, 0.25, 0.5, 0.75, 1.0]
    curve = analysis.clip_curve(w, bit_widths=(2, 4), ratios=ratios)
    assert len(curve) == 2 * len(ratios)
    for row in curve.itertuples():
        qmax = 2 ** (row.bit_width - 1) - 1
        t = row.r * w.abs().max().item()
        s = t / qmax
        direct = (torch.clamp(torch.round(w.double() / s), -qmax, qmax) * s - w.double()).pow(2).mean().item()
        assert row.mse == pytest.approx(direct, rel=1e-4)
        assert row.rel_mse == pytest.approx(direct / w.double().pow(2).mean().item(), rel=1e-4)
        assert row.clipped == pytest.approx(float((w.abs() > t).double().mean()), abs=1e-3)
    asym = analysis.clip_curve(w, bit_widths=(3,), ratios=[1.0], symmetric=False)
    direct = (quant.quantize(w, QuantSpec(3, symmetric=False)) - w).double().pow(2).mean().item()
    # clip_curve averages in float32, in an order that depends on the CPU's vector width
    assert asym["mse"].iloc[0] == pytest.approx(direct, rel=1e-5)


def test_optimal_ratio_picks_the_first_argmin_and_reports_minmax_excess():
    curves = pd.DataFrame({
        "layer": ["a"] * 4 + ["b"] * 3,
        "r": [0.25, 0.5, 0.75, 1.0, 0.5, 0.75, 1.0],
        "mse": [4.0, 1.0, 1.0, 2.0, 3.0, 3.0, 1.5],
    })
    best = analysis.optimal_ratio(curves).set_index("layer")
    assert best.loc["a", "r"] == 0.5 and best.loc["b", "r"] == 1.0
    assert best.loc["a", "minmax_excess"] == 2.0 and best.loc["b", "minmax_excess"] == 1.0


@pytest.mark.parametrize("symmetric", [True, False])
def test_optimal_ratio_agrees_with_the_mse_range_policy(symmetric):
    w = torch.distributions.Laplace(0.0, 1.0).sample((5000,))
    for bit_width in (2, 4):
        curve = analysis.clip_curve(w, (bit_width,), ratios=quant.mse_grid().tolist(), symmetric=symmetric)
        r_star = analysis.optimal_ratio(curve)["r"].item()
        spec = QuantSpec(bit_width, symmetric=symmetric, policy="mse")
        chosen = quant.quantize(w, spec)
        at_r_star = analysis.clip_curve(w, (bit_width,), ratios=[r_star], symmetric=symmetric)["mse"].item()
        # float32 means of the same errors, summed in other orders; the two best ratios differ by > 2e-4 here
        assert (chosen - w).double().pow(2).mean().item() == pytest.approx(at_r_star, rel=1e-5)


def test_error_propagation_one_row_per_layer_and_no_error_at_16_bits(cnn, images):
    n_layers = len(ptq.weighted_layers(ptq.fold_bn(cnn)))
    labels = torch.arange(len(images)) % 10
    # bins=None: the sqrt(n) rule, since 256 fixed bins over this small batch's logits are mostly
    # empty and one value crossing a bin edge moves the KL by ~0.05
    grid = analysis.propagation_grid(cnn, images, [QuantSpec(3), QuantSpec(16)], labels=labels, bins=None)
    assert len(grid) == 2 * 2 * n_layers
    exact_all = grid[(grid["w_bits"] == 16) & (grid["mode"] == "all")]
    assert (exact_all["flips"] == 0).all() and (exact_all["acc"] == exact_all["fp_acc"]).all()
    assert grid.loc[grid["mode"] == "single", ["acc", "flips"]].isna().all().all()
    for (bits, mode), frame in grid.groupby(["w_bits", "mode"]):
        assert list(frame["depth"]) == list(range(1, n_layers + 1))
        assert frame[["kl", "mean_shift", "signed_shift", "rel_mse"]].map(math.isfinite).all().all()
        if bits == 3:
            assert (frame["rel_mse"] > 1e-4).all()
        else:
            assert frame["rel_mse"].max() < 1e-7
            assert frame["mean_shift"].max() < 1e-3
            assert frame["kl"].max() < 1e-3
    # the first layer sees the float input in both modes: local error = propagated error there
    first = grid[(grid["w_bits"] == 3) & (grid["depth"] == 1)].set_index("mode")["rel_mse"]
    assert first["all"] == pytest.approx(first["single"], rel=1e-5)
    # error_propagation is the grid's row block for one spec and mode
    one = analysis.error_propagation(cnn, images, QuantSpec(3), mode="all", bins=None)
    expected = grid[(grid["w_bits"] == 3) & (grid["mode"] == "all")].reset_index(drop=True)
    pd.testing.assert_frame_equal(one, expected[one.columns])
    assert "acc" not in one.columns
    with pytest.raises(ValueError, match="mode"):
        analysis.error_propagation(cnn, images, QuantSpec(4), mode="some")


def test_single_mode_equals_quantizing_one_layer_and_running_the_network(cnn, images):
    folded = ptq.fold_bn(cnn)
    name = ptq.weighted_layers(folded)[3][0]
    y_fp = analysis.layer_outputs(folded, images)[name]
    y_q = analysis.layer_outputs(analysis.quantize_layers(folded, QuantSpec(3), [name]), images)[name]
    single = analysis.error_propagation(cnn, images, QuantSpec(3), mode="single", fold=True)
    assert single["rel_mse"].iloc[3] == pytest.approx(analysis.relative_mse(y_fp, y_q), rel=1e-5)


def test_layer_outputs_are_not_overwritten_by_inplace_relu(cnn, images):
    folded = ptq.fold_bn(cnn)
    outputs = analysis.layer_outputs(folded, images)
    first = ptq.weighted_layers(folded)[0][1]
    torch.testing.assert_close(outputs[ptq.weighted_layers(folded)[0][0]], first(images))
    assert (outputs[ptq.weighted_layers(folded)[0][0]] < 0).any()  # pre-activation, not ReLU'd


def test_weight_symmetry_is_zero_for_mirrored_weights():
    layer = nn.Linear(6, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -1.0, 2.0, -2.0, 0.5, -0.5], [3.0, 1.0, -1.0, -3.0, 0.0, 0.0]]))
    frame = analysis.weight_symmetry(nn.Sequential(layer), fold=False)
    assert frame["sym_reg"].item() == pytest.approx(0.0, abs=1e-12)
    assert frame["skewness"].item() == pytest.approx(0.0, abs=1e-12)
    with torch.no_grad():
        layer.weight.copy_(layer.weight.abs())
    assert analysis.weight_symmetry(nn.Sequential(layer), fold=False)["sym_reg"].item() > 0.5


def test_policy_grid_and_spread(synthetic):
    model = models.make_model("cnn", 1, 10)
    grid = analysis.policy_grid(model, synthetic, policies=("minmax", "mse"), bit_widths=(4,), a_bits=(None,))
    assert len(grid) == 2 and set(grid["policy"]) == {"minmax", "mse"}
    assert (grid["drop"] == grid["fp_acc"] - grid["acc"]).all()
    spread = analysis.policy_spread(grid)
    assert spread["spread"].item() == pytest.approx(grid["acc"].max() - grid["acc"].min())


def test_spearman():
    assert analysis.spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert analysis.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(analysis.spearman([1, 2, 3], [1, 1, 1]))


def test_sqnr_is_minus_ten_log_relative_mse():
    y = torch.randn(64, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noisy = y + 0.1 * torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert analysis.sqnr_db(y, noisy) == pytest.approx(-10 * math.log10(analysis.relative_mse(y, noisy)), rel=1e-12)
    assert analysis.sqnr_db(y, y) == math.inf


def test_signed_shift_cancels_opposite_channel_shifts():
    y = torch.randn(32, 2, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    shifted = y + torch.tensor([0.5, -0.5], dtype=torch.float64).reshape(1, 2, 1, 1) * y.std(dim=(0, 2, 3), unbiased=False).reshape(1, 2, 1, 1)
    assert analysis.signed_shift(y, shifted) == pytest.approx(0.0, abs=1e-12)
    assert analysis.mean_shift(y, shifted) == pytest.approx(0.5, rel=1e-9)


def test_varying_positions_leave_out_constant_patches():
    conv = nn.Conv2d(1, 2, 3, padding=1)
    x = torch.zeros(1, 1, 6, 6)
    x[0, 0, 0, 0] = 1.0  # one bright pixel in a corner; the rest of the image is constant (zero)
    mask = analysis.varying_positions(conv, x)
    assert mask.shape == (1, 6, 6)
    assert mask[0, :2, :2].all() and mask.sum() == 4  # only the windows that see the pixel vary
    assert analysis.varying_positions(nn.Linear(4, 2), torch.zeros(3, 4)) is None


def test_layer_shifts_of_a_bias_corrected_model_are_small_on_the_calibration_batch(cnn, images):
    spec = QuantSpec(3)
    reference = ptq.materialize(cnn)
    plain = analysis.layer_shifts(reference, ptq.quantize_model(cnn, spec, first_last_8bit=False), images)
    corrected = analysis.layer_shifts(
        reference, ptq.quantize_model(cnn, spec, first_last_8bit=False, bias_correction=True, calib=images), images
    )
    assert (corrected["signed_shift"].abs() < 1e-4).all()
    assert plain["mean_shift"].mean() > corrected["mean_shift"].mean()


# --- insight 3: magnitude buckets, Hessian, noise, ASAM's perturbation ----------------------------

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from robustq import satnl


def _partition_ok(weight, n_buckets):
    masks = analysis.magnitude_quartile_masks(weight, n_buckets)
    assert masks.shape == (n_buckets, *weight.shape) and masks.dtype == torch.bool
    assert torch.equal(masks.sum(dim=0), torch.ones_like(weight, dtype=torch.long))  # disjoint, covering
    magnitude = weight.abs()
    for low, high in itertools.pairwise(masks):  # bucket 0 holds the smallest magnitudes
        if low.any() and high.any():
            assert magnitude[low].max() < magnitude[high].min()
    return masks


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 200),
    n_buckets=st.integers(1, 6),
    levels=st.one_of(st.none(), st.integers(1, 4)),
    seed=st.integers(0, 2**16),
)
def test_magnitude_masks_partition_random_and_tie_heavy_weights(n, n_buckets, levels, seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, generator=generator)
    if levels is not None:  # a few magnitudes, both signs: ties everywhere
        weight = torch.randint(-levels, levels + 1, (n,), generator=generator).float() * 0.25
    masks = _partition_ok(weight, n_buckets)
    sizes = masks.sum(dim=tuple(range(1, masks.dim())))
    largest_tie = int(weight.abs().unique(return_counts=True)[1].max())
    assert int((sizes - n / n_buckets).abs().max()) <= largest_tie


def test_magnitude_masks_are_equal_quartiles_without_ties():
    weight = torch.randn(8, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    masks = _partition_ok(weight, 4)
    assert masks.sum(dim=(1, 2, 3, 4)).tolist() == [54, 54, 54, 54]
    with pytest.raises(ValueError, match="n_buckets must be a positive int"):
        analysis.magnitude_quartile_masks(weight, 0)


def _labelled(model, images):
    with torch.no_grad():
        return ptq.materialize(model)(images).argmax(1)  # the float network is right on every image


def test_magnitude_sensitivity_quantizes_one_bucket_of_one_layer(cnn, images):
    labels = _labelled(cnn, images)
    frame = analysis.magnitude_sensitivity(cnn, images, labels, bit_width=2)
    layers = [name for name, _ in ptq.weighted_layers(cnn)]
    assert len(frame) == 4 * len(layers) and list(frame["bucket"].unique()) == [0, 1, 2, 3]
    assert {"depth", "layer", "bucket", "cost_points", "error_rms"} <= set(frame.columns)
    # one row by hand: bucket 3 of the last layer
    net = ptq.materialize(cnn)
    layer = dict(ptq.weighted_layers(net))[layers[-1]]
    w = layer.weight.detach().clone()
    top = analysis.magnitude_quartile_masks(w)[3]
    with torch.no_grad():
        layer.weight.copy_(torch.where(top, quant.quantize(w, QuantSpec(2)), w))
        acc = float((net(images).argmax(1) == labels).double().mean())
    row = frame[(frame["layer"] == layers[-1]) & (frame["bucket"] == 3)].iloc[0]
    assert row["cost_points"] == pytest.approx(100 * (1 - acc))
    fine = analysis.magnitude_sensitivity(cnn, images, labels, bit_width=16)
    assert fine["cost_points"].abs().max() == 0


def test_normalized_sensitivity_gives_every_bucket_the_layer_rms_error(cnn, images):
    labels = _labelled(cnn, images)
    frame = analysis.magnitude_sensitivity(cnn, images, labels, bit_width=3, normalize=True)
    for name, module in ptq.weighted_layers(ptq.materialize(cnn)):
        w = module.weight.detach()
        layer_rms = float((quant.quantize(w, QuantSpec(3)) - w).pow(2).mean().sqrt())
        rms = frame.loc[frame["layer"] == name, "error_rms"]
        assert rms.to_numpy() == pytest.approx([layer_rms] * 4, rel=1e-4)
    assert frame["normalized"].all()


def test_quartile_contrast_averages_smallest_minus_largest_bucket_over_layers():
    frame = pd.DataFrame({
        "model": ["a"] * 4 + ["b"] * 4, "depth": [1, 1, 2, 2] * 2, "layer": ["c1", "c1", "c2", "c2"] * 2,
        "bucket": [1, 0, 0, 1] * 2, "cost_points": [1.0, 5.0, 3.0, 0.0, 0.0, 0.0, 2.0, 4.0],
        "error_rms": 0.1, "n_weights": 4,
    })
    contrast = analysis.quartile_contrast(frame)
    assert contrast.to_dict("records") == [
        {"model": "a", "contrast_points": 3.5, "layers": 2}, {"model": "b", "contrast_points": -1.0, "layers": 2},
    ]
    assert analysis.quartile_contrast(frame[frame["model"] == "a"].drop(columns="model"))["contrast_points"].item() == 3.5


def _quadratic_problem():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(64, 5, generator=generator) * torch.tensor([3.0, 1.0, 1.0, 0.5, 0.5])
    y = torch.randn(64, 1, generator=generator)
    torch.manual_seed(0)
    return nn.Linear(5, 1), x, y


@pytest.mark.parametrize("parameters", ["weights", "trainable"])
def test_hessian_power_iteration_finds_the_top_eigenvalue_of_a_quadratic_loss(parameters):
    model, x, y = _quadratic_problem()
    design = x if parameters == "weights" else torch.cat([x, torch.ones(64, 1)], dim=1)  # bias: a column of ones
    expected = float(torch.linalg.eigvalsh(2 * design.double().T @ design.double() / len(x)).max())
    top = analysis.hessian_top_eigenvalue(model, x, y, iterations=20, parameters=parameters,
                                          loss_fn=torch.nn.functional.mse_loss)
    assert top == pytest.approx(expected, rel=1e-3)
    trace = analysis.hessian_power_iteration(model, x, y, iterations=3, loss_fn=torch.nn.functional.mse_loss)
    assert trace["iteration"].tolist() == [1, 2, 3]


def test_hessian_of_a_satnl_model_is_taken_in_theta():
    model, x, y = _quadratic_problem()
    satnl.apply_satnl(model, form="tanh")
    with torch.no_grad():  # optimal weights: dL/dW = 0, so the Hessian in theta is exactly J^T H_W J
        solution = torch.linalg.lstsq(x.double(), (y - model.bias).double()).solution.float().T
        assert solution.abs().max() < 0.99, "the least-squares weights must lie inside tanh's range"
        model.parametrizations.weight.original.copy_(torch.atanh(solution))
    slope = (1 - model.weight.detach().pow(2)).double().flatten()  # tanh' = 1 - tanh^2
    h_w = 2 * x.double().T @ x.double() / len(x)
    expected = float(torch.linalg.eigvalsh(slope[:, None] * h_w * slope[None, :]).max())
    top = analysis.hessian_top_eigenvalue(model, x, y, iterations=40, parameters="weights",
                                          loss_fn=torch.nn.functional.mse_loss)
    assert top == pytest.approx(expected, rel=1e-3)


def test_noise_robustness_is_seeded_and_vanishes_at_16_bits(cnn, images):
    labels = _labelled(cnn, images)
    first = analysis.noise_robustness(cnn, images, labels, bit_width=2, draws=3, seed=5)
    again = analysis.noise_robustness(cnn, images, labels, bit_width=2, draws=3, seed=5)
    pd.testing.assert_frame_equal(first, again)
    assert first.columns.tolist() == ["bit_width", "draws", "fp_acc", "acc_mean", "acc_sd", "drop_points"]
    assert first["fp_acc"].item() == 1.0 and 0 <= first["acc_mean"].item() <= 1
    fine = analysis.noise_robustness(cnn, images, labels, bit_width=16, draws=2)
    assert fine["acc_mean"].item() == 1.0 and fine["drop_points"].item() == 0


def _hand_layer():
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.1, -0.4], [0.7, 0.2]]))
    return layer, torch.tensor([[1.0, -2.0]]), torch.tensor([1])


def _hand_eps(w, grad, rho, eta):
    t = w.abs() + eta
    return rho * t * t * grad / torch.linalg.vector_norm(t * grad)


def test_asam_perturbation_by_magnitude_matches_a_hand_computation():
    layer, x, y = _hand_layer()
    w = layer.weight.detach()
    probs = torch.softmax(x @ w.T, dim=1)
    grad = (probs - torch.nn.functional.one_hot(y, 2)).T @ x  # dCE/dW of one sample
    eps = _hand_eps(w, grad, rho=0.5, eta=0.01)
    step = float(w.abs().max()) / 3  # W3, symmetric narrow range
    frame = analysis.asam_perturbation_by_magnitude(layer, x, y, rho=0.5, eta=0.01, bit_width=3)
    by_magnitude = eps.abs().flatten()[w.abs().flatten().argsort()]  # 4 weights, one per bucket
    assert frame["n_weights"].tolist() == [1, 1, 1, 1]
    assert frame["mean_abs_eps"].to_numpy() == pytest.approx(by_magnitude.numpy(), rel=1e-5)
    assert frame["eps_over_step"].to_numpy() == pytest.approx((by_magnitude / step).numpy(), rel=1e-5)


def test_asam_perturbation_of_satnl_lives_on_theta_and_is_carried_by_the_slope():
    layer, x, y = _hand_layer()
    satnl.apply_satnl(layer, form="tanh")
    theta = layer.parametrizations.weight.original.detach()
    w = torch.tanh(theta)
    slope = 1 - w.pow(2)
    probs = torch.softmax(x @ w.T, dim=1)
    grad_theta = ((probs - torch.nn.functional.one_hot(y, 2)).T @ x) * slope  # chain rule through tanh
    eps_w = slope * _hand_eps(theta, grad_theta, rho=0.5, eta=0.01)  # eps_w = f'(theta) eps_theta
    frame = analysis.asam_perturbation_by_magnitude(layer, x, y, rho=0.5, eta=0.01, bit_width=3)
    by_magnitude = eps_w.abs().flatten()[w.abs().flatten().argsort()]
    assert frame["mean_abs_eps"].to_numpy() == pytest.approx(by_magnitude.numpy(), rel=1e-5)


# --- satnl_latent: a trained SatNL result back in theta space ------------------------------------

import dataclasses

from robustq import experiments, methods
from robustq.latent import satnl_latent

LATENT_TINY = {"dataset": "synthetic", "epochs": 1, "batch_size": 64, "train_size": 256, "test_size": 200}


@pytest.fixture(scope="module")
def satnl_result(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ROBUSTQ_CACHE", str(tmp_path_factory.mktemp("latent-cache")))
        return experiments.run(experiments.Experiment(method="satnl", seed=3, **LATENT_TINY), progress=False)


def test_satnl_latent_reproduces_the_trained_weights_with_the_training_alpha(satnl_result):
    before = torch.get_rng_state()
    latent = satnl_latent(satnl_result)
    assert torch.equal(torch.get_rng_state(), before)  # the replay keeps the caller's RNG
    assert satnl.has_satnl(latent) and not latent.training
    trained = dict(ptq.weighted_layers(satnl_result.model))
    torch.manual_seed(3)  # the initial model, without loading data: alpha = 3 std(W_init)
    fresh = dict(ptq.weighted_layers(models.make_model("cnn", 1, 10)))
    for name, layer in ptq.weighted_layers(latent):
        w = trained[name].weight.detach()
        assert (layer.weight.detach() - w).abs().max() <= 1e-6 * w.abs().max()
        alpha = torch.tensor(satnl.DEFAULT_ALPHA_MULT * fresh[name].weight.std().item())
        assert torch.equal(layer.parametrizations.weight[0].alpha, alpha)
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(latent(x), satnl_result.model(x), atol=1e-5)
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in satnl_result.model.modules())


def test_asam_perturbation_runs_on_the_satnl_latent(satnl_result):
    latent = satnl_latent(satnl_result)
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    frame = analysis.asam_perturbation_by_magnitude(latent, x, torch.arange(16) % 10, rho=0.5)
    assert len(frame) == 4 * len(ptq.weighted_layers(latent))
    assert frame["eps_over_step"].notna().all() and (frame["eps_over_step"] >= 0).all()


def test_satnl_latent_rejects_weights_its_alpha_cannot_reproduce(satnl_result):
    tampered = ptq.materialize(satnl_result.model)
    with torch.no_grad():
        ptq.weighted_layers(tampered)[0][1].weight.mul_(10.0)  # beyond alpha: saturates
    with pytest.raises(ValueError, match="were not recovered"):
        satnl_latent(dataclasses.replace(satnl_result, model=tampered))


def test_satnl_latent_passes_a_method_without_satnl_through_and_refuses_normalized_tanh(cnn):
    result = experiments.Result(experiments.Experiment(method="baseline", **LATENT_TINY).resolved(), cnn,
                                {}, pd.DataFrame(), cached=True)
    plain = satnl_latent(result)
    assert plain is not cnn and not satnl.has_satnl(plain)
    for a, b in zip(plain.state_dict().values(), cnn.state_dict().values()):
        assert torch.equal(a, b)
    params = {"form": "normalized_tanh"}
    normalized = dataclasses.replace(result, experiment=experiments.Experiment(
        method="satnl", method_params=params, **LATENT_TINY).resolved())
    assert methods.make("satnl", **params).parts[0].form == "normalized_tanh"
    with pytest.raises(ValueError, match="normalized_tanh"):
        satnl_latent(normalized)


# --- gradient-ℓ1: the first-order bound (chapter 05) ---------------------------------------------


def _half_squared_error(out, target):
    return 0.5 * (out - target).pow(2).sum(dim=1).mean()


@pytest.fixture(scope="module")
def linear_regression():
    generator = torch.Generator().manual_seed(7)
    model = nn.Linear(5, 3).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(3, 5, dtype=torch.float64, generator=generator))
    x = torch.randn(32, 5, dtype=torch.float64, generator=generator)
    return model, x, torch.randn(32, 3, dtype=torch.float64, generator=generator)


def test_first_order_bound_on_a_quadratic_loss_matches_the_exact_expansion(linear_regression):
    model, x, target = linear_regression
    bits = [2, 3, 4, 8, 12, 16]
    rows = analysis.first_order_bound(model, x, target, bits, first_last_8bit=False, loss_fn=_half_squared_error)
    assert rows["w_bits"].tolist() == bits
    residual = model(x).detach() - target
    gradient = residual.T @ x / len(x)  # dL/dW of 0.5 mean ||W x + b - t||^2
    for row in rows.itertuples():
        delta = quant.quantize(model.weight.detach(), QuantSpec(row.w_bits)) - model.weight.detach()
        linear_term = float((delta * gradient).sum())
        quadratic_term = float(0.5 * (x @ delta.T).pow(2).sum(dim=1).mean())  # the loss is exactly quadratic
        assert row.first_order == pytest.approx(linear_term, rel=1e-10, abs=1e-15)
        assert row.loss_change == pytest.approx(linear_term + quadratic_term, rel=1e-8, abs=1e-14)
        assert abs(row.first_order) <= row.bound
        step = float(model.weight.detach().abs().max()) / (2 ** (row.w_bits - 1) - 1)
        assert row.bound == pytest.approx(step / 2 * float(gradient.abs().sum()), rel=1e-12)
    assert rows.set_index("w_bits").loc[16, "ratio"] == pytest.approx(1.0, abs=1e-3)  # tiny steps: first order


def test_first_order_bound_on_a_cnn_deploys_edges_at_8_bits_and_keeps_the_model(cnn, images):
    labels = torch.arange(len(images)) % 10
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    rows = analysis.first_order_bound(cnn, images, labels, [8, 4, 2])
    assert list(rows.columns) == ["w_bits", "loss_float", "loss_quantized", "loss_change", "first_order", "bound",
                                  "ratio"]
    assert (rows["first_order"].abs() <= rows["bound"]).all()
    assert rows["bound"].is_monotonic_increasing  # coarser steps, same gradient
    assert all(torch.equal(v, cnn.state_dict()[k]) for k, v in before.items())
    # at 2 bits the stem and the classifier keep their 8-bit step, so the bound is below the all-2-bit one
    every_layer = analysis.first_order_bound(cnn, images, labels, [2], first_last_8bit=False)
    assert rows["bound"].iloc[-1] < every_layer["bound"].iloc[0]


@pytest.mark.parametrize(
    "bits, a_bits, match",
    [([4], 8, "quantizes weights only"), ([], None, "at least one bit-width"), ([1], None, "bit_width must be in")],
)
def test_first_order_bound_rejects_activations_and_bad_bit_widths(linear_regression, bits, a_bits, match):
    model, x, target = linear_regression
    with pytest.raises(ValueError, match=match):
        analysis.first_order_bound(model, x, target, bits, a_bits, first_last_8bit=False, loss_fn=_half_squared_error)


def test_grad_l1_norm_by_hand():
    model = nn.Sequential(nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
    # uniform softmax, label 0: dL/dlogits = (-1/2, 1/2); dL/dW = its outer product with x = (1, 2)
    norm = analysis.grad_l1_norm(model, torch.tensor([[1.0, 2.0]]), torch.tensor([0]))
    assert norm == pytest.approx(0.5 * 3 + 0.5 * 3)  # the bias's gradient does not count
    assert model[0].weight.grad is None


# --- SinReQ and oscillations (chapters 06, 07) -----------------------------------------------------


def _two_layer_net():
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


def _fill(model, make):
    with torch.no_grad():
        for _, layer in ptq.weighted_layers(model):
            layer.weight.copy_(make(layer.weight.shape))


def _grid_levels(bit_width, grid):
    if grid == "wrpn":
        n = 2 ** (bit_width - 1) - 1
        return torch.arange(-n, n + 1) / n
    n = 2**bit_width - 1
    return 2 * torch.arange(n + 1) / n - 1


@pytest.mark.parametrize("grid", ["wrpn", "dorefa"])
@pytest.mark.parametrize("bit_width", [2, 3, 4])
def test_distance_to_grid_is_zero_on_the_grid_and_a_quarter_for_uniform_weights(grid, bit_width):
    generator = torch.Generator().manual_seed(bit_width)
    levels = _grid_levels(bit_width, grid)
    model = _two_layer_net()
    _fill(model, lambda shape: levels[torch.randint(len(levels), shape, generator=generator)])
    on_grid = analysis.distance_to_grid(model, bit_width, grid)
    assert list(on_grid.layer) == ["0", "2"] and list(on_grid.weights) == [72, 1280]
    assert on_grid.distance.max() < 1e-6 and on_grid.outside.max() == 0.0
    _fill(model, lambda shape: torch.rand(shape, generator=generator) * 2 - 1)
    assert analysis.distance_to_grid(model, bit_width, grid, layers=["2"]).distance.item() == pytest.approx(0.25, abs=0.01)


def test_distance_to_grid_reads_dorefa_weights_raw_or_tanh_normalized():
    bit_width, levels = 3, _grid_levels(3, "dorefa")
    model = _two_layer_net()
    generator = torch.Generator().manual_seed(0)
    # tanh(w) = 0.5 * level, so tanh(w) / max|tanh w| is the level itself
    _fill(model, lambda shape: torch.atanh(0.5 * levels[torch.randint(len(levels), shape, generator=generator)]))
    assert analysis.distance_to_grid(model, bit_width, "dorefa", "normalized").distance.max() < 1e-6
    assert analysis.distance_to_grid(model, bit_width, "dorefa", "raw").distance.min() > 0.05
    with pytest.raises(ValueError, match=r"domain must be one of \('raw', 'normalized'\)"):
        analysis.distance_to_grid(model, bit_width, "dorefa", "tanh")


def test_distance_to_grid_reads_the_latent_weights_of_a_qat_model():
    from robustq import qat

    model = qat.prepare_qat(_two_layer_net(), "wrpn", 3)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in ptq.weighted_layers(model):
            layer.parametrizations.weight.original.copy_(torch.rand(layer.weight.shape, generator=generator) * 2 - 1)
    latent = analysis.distance_to_grid(model, 3, "wrpn")
    assert latent.distance.min() > 0.2  # the forward weight layer.weight is on the grid: 0
    with pytest.raises(ValueError, match=r"layers names no conv/linear layer of the model: \['1'\]"):
        analysis.distance_to_grid(model, 3, layers=["1"])


@pytest.mark.parametrize("quantizer", ["ste", "lsq", "dorefa", "wrpn"])
def test_integer_levels_follow_each_qat_quantizer_grid_one_to_one(quantizer):
    from robustq import qat

    torch.manual_seed(0)
    model = qat.prepare_qat(_two_layer_net(), quantizer, 3)
    levels = analysis.integer_levels(model)
    for name, layer in ptq.weighted_layers(model):
        assert torch.equal(levels[name], torch.round(levels[name]))
        _, by_weight = torch.unique(layer.weight.detach(), return_inverse=True)
        _, by_level = torch.unique(levels[name], return_inverse=True)
        assert torch.equal(by_weight, by_level)  # same partition, same order


def test_integer_levels_of_a_float_model_are_the_minmax_grid():
    torch.manual_seed(0)
    model = _two_layer_net()
    levels = analysis.integer_levels(model, bit_width=3)
    for name, layer in ptq.weighted_layers(model):
        scale = layer.weight.abs().max() / 3
        assert torch.equal(levels[name], torch.round(layer.weight.detach() / scale))
    with pytest.raises(ValueError, match="has no QAT quantizer: pass bit_width"):
        analysis.integer_levels(model)


def _track(trajectory, **kwargs):
    tracker = analysis.OscillationTracker(**kwargs)
    for levels in zip(*trajectory):
        tracker.update({"w": torch.tensor(levels, dtype=torch.float32)})
    return tracker


def test_oscillation_tracker_counts_every_reversal_and_no_drift():
    alternating = [0, 1] * 50
    drift = list(range(100))
    rest_then_back = [0, 1, 1, 1, 1, 0] + [0] * 94
    up_up_down = [0, 1, 2, 1] + [1] * 96
    tracker = _track([alternating, drift, rest_then_back, up_up_down])
    state = tracker.states["w"]
    assert state.count.tolist() == [98, 0, 1, 1] and state.steps == 100
    assert state.ema[0].item() == pytest.approx(1 - 0.99**98, rel=1e-5)
    summary = tracker.summary().iloc[0]
    assert (summary.weights, summary.steps, summary.oscillating, summary.ever_oscillated) == (4, 100, 0.25, 0.75)
    assert summary.oscillations_per_weight == pytest.approx(100 / 4)
    assert tracker.oscillating_fraction() == 0.25


def test_oscillation_ema_matches_track_oscillation_step_by_step():
    trajectory = [0, 1, 0, 0, 1, 2, 1, 2]
    momentum, ema, previous, direction = 0.2, 0.0, trajectory[0], 0
    tracker = analysis.OscillationTracker(momentum=momentum)
    for level in trajectory:
        tracker.update({"w": torch.tensor([float(level)])})
        switch = (previous > level) - (previous < level)  # sign(previous - level), as in the released code
        ema = momentum * (direction * switch == -1) + (1 - momentum) * ema
        direction, previous = (switch if switch else direction), level
        assert tracker.states["w"].ema.item() == pytest.approx(ema, rel=1e-6)


def test_oscillation_tracker_runs_as_a_training_hook(synthetic):
    from robustq.train import Extensions, TrainConfig, train

    torch.manual_seed(0)
    tracker = analysis.OscillationTracker(bit_width=3)
    model = models.make_model("cnn", synthetic.in_channels, synthetic.num_classes)
    result = train(model, synthetic, TrainConfig(epochs=1, batch_size=128, lr=0.05), Extensions(on_step_end=[tracker]),
                   progress=False)
    summary = tracker.summary()
    assert list(summary.layer) == [name for name, _ in ptq.weighted_layers(result.model)]
    steps = result.history[0]["images"] // 128
    assert (summary.steps == steps).all() and summary.ever_oscillated.between(0, 1).all()


def test_oscillation_tracker_rejects_bad_settings():
    with pytest.raises(ValueError, match="momentum must be in"):
        analysis.OscillationTracker(momentum=0.0)
    with pytest.raises(ValueError, match="threshold must be in"):
        analysis.OscillationTracker(threshold=1.5)
    with pytest.raises(ValueError, match="has seen no step yet"):
        analysis.OscillationTracker().oscillating_fraction()
    tracker = _track([[0, 1]])
    with pytest.raises(ValueError, match="track each tensor under its own name"):
        tracker.update({"w": torch.zeros(2)})


@pytest.mark.parametrize("bit_width", [2, 3, 4])
def test_ste_gradient_decomposition_is_an_identity_in_one_dimension(bit_width):
    generator = torch.Generator().manual_seed(bit_width)
    x = torch.randn(1000, generator=generator) * 1.7 + 0.3
    y = 0.8 * x + 0.1 * torch.randn(1000, generator=generator)
    result = analysis.ste_gradient_decomposition(x, y, torch.tensor(0.37), bit_width)
    assert result["identity_error"] <= 1e-12 and result["regularizer_error"] <= 1e-12
    assert result["regularizer_match"] <= 1e-12
    assert result["equivalent_lam"] == pytest.approx(float((x.double() ** 2).mean()) / 2)


def test_ste_gradient_decomposition_of_a_layer_and_when_the_regularizer_matches_it():
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(3, 8, generator=generator)
    correlated = torch.randn(500, 8, generator=generator) @ torch.randn(8, 8, generator=generator)
    y = torch.randn(500, 3, generator=generator)
    result = analysis.ste_gradient_decomposition(correlated, y, w, 3)
    assert result["identity_error"] <= 1e-12 and result["regularizer_error"] <= 1e-12
    assert result["regularizer_match"] > 0.05  # input correlations add to the QAT term
    whitened = torch.linalg.qr(torch.randn(500, 8, dtype=torch.float64, generator=generator)).Q * math.sqrt(500 * 2.0)
    matched = analysis.ste_gradient_decomposition(whitened, y, w, 3)  # mean x x^T = 2 I
    assert matched["regularizer_match"] <= 1e-12 and matched["equivalent_lam"] == pytest.approx(24 * 2.0 / 2)
    with pytest.raises(ValueError, match="shapes do not make a linear model"):
        analysis.ste_gradient_decomposition(correlated, y, torch.randn(3, 7), 3)


def test_weight_trajectory_records_the_same_weights_every_step():
    layer = torch.nn.Sequential(torch.nn.Linear(6, 5))
    trajectory = analysis.WeightTrajectory("0", count=3, seed=1)
    values = []
    for step in range(4):
        with torch.no_grad():
            layer[0].weight.add_(1.0)
        trajectory(layer, 0, step)
        values.append(layer[0].weight.detach().flatten()[trajectory.index].tolist())
    frame = trajectory.frame()
    assert list(frame.columns) == ["step", "weight", "value"] and len(frame) == 12
    assert frame.pivot(index="step", columns="weight", values="value").values.tolist() == values
    assert len(set(trajectory.index.tolist())) == 3


def test_weight_trajectory_names_the_layers_when_one_is_missing():
    with pytest.raises(ValueError, match=r"no layer 'conv9'.*\['0'\]"):
        analysis.WeightTrajectory("conv9")(torch.nn.Sequential(torch.nn.Linear(2, 2)))
