"""Learned rounding (AdaRound, Nagel et al., arXiv 2004.10568) and block reconstruction (BRECQ, Li et
al., arXiv 2102.05426): their equations on fixed cases, exact agreement of the grid with torch's
fake-quant kernels, a block of one layer learning exactly what AdaRound learns, and never worse than
nearest rounding on the reconstruction error they optimise."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from robustq import models, ptq
from robustq.adaround import (
    AdaRoundConfig,
    Grid,
    annealed_beta,
    hard_weights,
    initial_logits,
    layer_forward,
    learn_rounding,
    reconstruction_error,
    rectified_sigmoid,
    round_blocks,
    round_model,
    rounding_regularizer,
    soft_weights,
)
from robustq.quant import QuantSpec, quantize


@given(st.floats(0.0, 0.999))
def test_the_initial_logits_give_back_the_fractional_part(rest):
    h = rectified_sigmoid(initial_logits(torch.tensor(rest, dtype=torch.float64)))
    assert float(h) == pytest.approx(rest, abs=1e-12)


def test_the_regularizer_is_zero_at_0_and_1_and_one_per_weight_half_way():
    v = torch.tensor([-30.0, 30.0])
    assert float(rounding_regularizer(v, beta=20.0)) == 0.0
    assert float(rounding_regularizer(torch.zeros(5), beta=2.0)) == pytest.approx(5.0)


def test_beta_is_off_in_the_warm_start_then_falls_from_start_to_end():
    config = AdaRoundConfig(iterations=100, warm_start=0.2)
    betas = [annealed_beta(i, config) for i in range(100)]
    assert betas[:20] == [None] * 20 and betas[20] == 20.0
    assert all(a >= b for a, b in itertools.pairwise(betas[20:])) and betas[-1] == pytest.approx(2.0, abs=0.01)


@pytest.mark.parametrize("spec", [QuantSpec(3), QuantSpec(4, symmetric=False), QuantSpec(2, per_channel=True)])
def test_the_soft_weights_start_at_the_float_weights_and_nearest_is_torchs_kernel(spec):
    weight = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    grid = Grid.of(weight, spec)
    rest = weight * (1.0 / grid.scale) - grid.floor(weight)
    codes = grid.floor(weight) + grid.zero_point + rest
    inside = (codes >= grid.qmin) & (codes <= grid.qmax)  # an asymmetric grid's rounded zero point clips an end
    assert inside.float().mean() > 0.95
    assert torch.allclose(soft_weights(weight, initial_logits(rest), grid)[inside], weight[inside], atol=1e-6)
    # V on the side nearest rounding takes gives exactly torch's fake-quant of the book's quantize
    up = torch.round(weight * (1.0 / grid.scale)) - grid.floor(weight)
    assert torch.equal(hard_weights(weight, torch.where(up > 0, 1.0, -1.0), grid), quantize(weight, spec))
    assert torch.equal(grid.nearest(weight), quantize(weight, spec))


def test_correlated_inputs_round_one_weight_up_where_nearest_rounds_both_down():
    # The paper's point (§2): two weights 0.45 and 0.35 of a step above a level, always multiplied
    # by the same input. Nearest rounds both down, an output error of 0.8 steps; rounding the first
    # up errs by 0.2.
    layer = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.45, 1.35]]) / 3)
    grid = Grid(torch.tensor(1 / 3), torch.tensor(0, dtype=torch.int32), -3, 3)
    x = torch.ones(64, 2) * torch.linspace(0.5, 1.5, 64).unsqueeze(1)
    rounded, report = learn_rounding(layer_forward(layer), layer.weight, grid, x, layer(x),
                                     AdaRoundConfig(iterations=400, lr=1e-2))
    assert (rounded * 3).round().flatten().tolist() == [2.0, 1.0]
    assert report["kept"] == "learned" and report["error_learned"] < report["error_nearest"] / 4
    assert report["flipped"] == 0.5


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), bits=st.sampled_from([2, 3, 4]), iterations=st.sampled_from([1, 20, 200]))
def test_learned_rounding_never_reconstructs_worse_than_nearest_and_moves_a_weight_one_level_at_most(
        seed, bits, iterations):
    generator = torch.Generator().manual_seed(seed)
    layer = nn.Linear(8, 4)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(4, 8, generator=generator))
    x = torch.randn(96, 8, generator=generator)
    grid = Grid.of(layer.weight, QuantSpec(bits))
    rounded, report = learn_rounding(layer_forward(layer), layer.weight, grid, x, layer(x).detach(),
                                     AdaRoundConfig(iterations=iterations, seed=seed))
    with torch.no_grad():
        error = {name: float(reconstruction_error(layer_forward(layer)(w, x), layer(x)))
                 for name, w in (("kept", rounded), ("nearest", grid.nearest(layer.weight)))}
    assert error["kept"] == pytest.approx(min(report["error_learned"], report["error_nearest"]), rel=1e-5)
    assert error["kept"] <= error["nearest"] * (1 + 1e-6)
    nearest = grid.nearest(layer.weight).detach()
    assert ((rounded - nearest).abs() <= grid.scale * 1.0001).all()


def test_a_model_is_rounded_layer_by_layer_onto_its_grid_with_the_edges_at_8_bits():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 10)).eval()
    calib = torch.randn(48, 1, 8, 8)
    reference = ptq.materialize(model)
    quantized = copy.deepcopy(reference)
    report = round_model(quantized, reference, QuantSpec(3), calib, config=AdaRoundConfig(iterations=30))
    assert report["layer"].tolist() == ["0", "3", "6"] and report["w_bits"].tolist() == [8, 3, 8]
    for name, bits in (("0", 8), ("3", 3), ("6", 8)):
        weight = quantized.get_submodule(name).weight
        grid = Grid.of(reference.get_submodule(name).weight, QuantSpec(bits))
        codes = weight / grid.scale
        assert torch.allclose(codes, codes.round(), atol=1e-4), name
    assert torch.equal(reference[0].weight, model[0].weight)  # the float model is left alone


@pytest.mark.parametrize("name", models.available())
def test_the_reconstruction_blocks_compose_to_the_model_and_hold_each_layer_once(name):
    torch.manual_seed(0)
    model = models.make_model(name, 1, 10).eval()
    x = torch.randn(4, 1, 28, 28)
    blocks = models.reconstruction_blocks(model)
    out = x
    with torch.no_grad():
        for block in blocks:
            out = block(out)
        assert torch.equal(out, model(x))
    held = [id(m) for block in blocks for m in block.modules() if isinstance(m, models.WEIGHTED_TYPES)]
    assert sorted(held) == sorted(id(layer) for _, layer in models.weighted_layers(model))


def _toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 10)).eval()


def test_block_reconstruction_with_one_layer_a_block_learns_exactly_what_adaround_learns():
    reference = ptq.materialize(_toy_model())  # not a book network: one weighted layer a block
    calib = torch.randn(48, 1, 8, 8)
    config = AdaRoundConfig(iterations=40)
    by_layer, by_block = copy.deepcopy(reference), copy.deepcopy(reference)
    layers = round_model(by_layer, reference, QuantSpec(2), calib, config=config)
    blocks = round_blocks(by_block, reference, QuantSpec(2), calib, config=config)
    for (name, a), b in zip(by_layer.state_dict().items(), by_block.state_dict().values()):
        assert torch.equal(a, b), name
    assert blocks["block"].tolist() == layers["layer"].tolist()
    assert blocks["error_learned"].tolist() == layers["error_learned"].tolist()


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), bits=st.sampled_from([2, 3]))
def test_block_reconstruction_keeps_each_block_no_worse_than_nearest_and_every_weight_on_its_grid(seed, bits):
    torch.manual_seed(seed)
    reference = ptq.materialize(models.make_model("cnn", 1, 10).eval())
    calib = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    quantized = copy.deepcopy(reference)
    report = round_blocks(quantized, reference, QuantSpec(bits), calib, config=AdaRoundConfig(iterations=10, seed=seed))
    quantized_blocks, float_blocks = models.reconstruction_blocks(quantized), models.reconstruction_blocks(reference)
    assert len(report) == len(quantized_blocks)
    x_quantized, x_float = calib, calib
    with torch.no_grad():
        for quantized_block, float_block, row in zip(quantized_blocks, float_blocks, report.itertuples()):
            x_quantized, x_float = quantized_block(x_quantized), float_block(x_float)
            error = float(reconstruction_error(x_quantized, x_float))  # the rounding kept, measured again
            assert error == pytest.approx(min(row.error_learned, row.error_nearest), rel=1e-4, abs=1e-9)
            assert error <= row.error_nearest * (1 + 1e-4) + 1e-9
    assert report["w_bits"].tolist()[0].startswith("8") and report["w_bits"].tolist()[-1] == "8"
    edges = models.edge_layers(reference)
    for name, layer in models.weighted_layers(quantized):
        float_weight = reference.get_submodule(name).weight
        grid = Grid.of(float_weight, QuantSpec(8 if name in edges else bits))
        codes = layer.weight / grid.scale
        assert torch.allclose(codes, codes.round(), atol=1e-4), name
        assert ((layer.weight - grid.nearest(float_weight)).abs() <= grid.scale * 1.0001).all(), name


def test_a_bad_config_or_layer_is_named():
    with pytest.raises(ValueError, match="iterations"):
        AdaRoundConfig(iterations=0)
    with pytest.raises(ValueError, match="beta_start"):
        AdaRoundConfig(beta_start=1.0, beta_end=2.0)
    with pytest.raises(ValueError, match="nn.Conv2d or nn.Linear"):
        layer_forward(nn.BatchNorm2d(3))
