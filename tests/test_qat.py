import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from robustq.qat import (
    QUANTIZERS,
    DoReFaWeight,
    LSQWeight,
    STEWeight,
    WRPNWeight,
    describe_quantizers,
    has_qat,
    prepare_qat,
    quantizer_from_description,
    remove_qat,
    requantize,
    scale_init_to_grid,
)
from robustq.models import ConvBN, make_model, stem_and_classifier
from robustq.quant import QuantSpec, quantize
from robustq.satnl import apply_satnl


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 10),
    ).eval()


def _inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _randn(*shape, seed=0, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- STE ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_channel", [False, True])
def test_ste_weight_is_shared_quantizer_with_identity_gradient(per_channel):
    w = _randn(6, 3, 3, 3, seed=2).requires_grad_()
    out = STEWeight(3, per_channel=per_channel)(w)
    assert torch.equal(out, quantize(w.detach(), QuantSpec(3, per_channel=per_channel)))
    for channel in (out if per_channel else out.reshape(1, -1)):
        assert channel.unique().numel() <= 7
    upstream = _randn(6, 3, 3, 3, seed=3)
    (out * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)


# --- LSQ ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bit_width", [2, 3, 4, 8])
def test_lsq_forward_init_and_scale_gradient_match_the_paper(bit_width):
    v = _randn(4, 25, seed=bit_width).requires_grad_()
    lsq = LSQWeight(bit_width, v)
    q_p = 2 ** (bit_width - 1) - 1
    assert lsq.scale.item() == pytest.approx(2 * v.detach().abs().mean().item() / math.sqrt(q_p))
    with torch.no_grad():  # so that some weights fall outside [-Q_N s, Q_P s]
        lsq.scale.copy_(v.detach().abs().max() / (1.5 * q_p))
    s = lsq.scale.detach().clone()
    out = lsq(v)
    ratio = v.detach() / s
    assert torch.allclose(out, s * torch.round(ratio.clamp(-q_p, q_p)), atol=1e-6)
    upstream = _randn(4, 25, seed=10 + bit_width)
    (out * upstream).sum().backward()
    # LSQ eq. 3: d v_hat / d s = -v/s + round(v/s) inside the range, -Q_N below, Q_P above.
    inside = (ratio > -q_p) & (ratio < q_p)
    d_out_d_s = torch.where(inside, torch.round(ratio) - ratio, torch.sign(ratio) * q_p)
    assert (~inside).any() and inside.any()
    g = 1 / math.sqrt(v.numel() * q_p)
    assert lsq.scale.grad.item() == pytest.approx(g * (upstream * d_out_d_s).sum().item(), rel=1e-4)
    assert torch.allclose(v.grad, torch.where(inside, upstream, torch.zeros_like(upstream)))
    assert torch.equal(v.grad == 0, ~inside)


def test_lsq_rejects_all_zero_init():
    with pytest.raises(ValueError, match="all-zero init_weight"):
        LSQWeight(4, torch.zeros(3, 3))


def test_lsq_scale_is_a_model_parameter_after_prepare():
    model = prepare_qat(small_cnn(), "lsq", 4)
    names = [name for name, _ in model.named_parameters()]
    assert "0.parametrizations.weight.0.scale" in names
    model(_inputs()).sum().backward()
    assert model[0].parametrizations.weight[0].scale.grad is not None


# --- DoReFa and WRPN ------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(bit_width=st.integers(2, 8), scale=st.floats(0.01, 10.0), seed=st.integers(0, 2**16))
def test_dorefa_outputs_lie_on_its_2k_levels(bit_width, scale, seed):
    half = _randn(1000, seed=seed, scale=scale)
    w = torch.cat([half, -half])  # both ends of the grid are reached
    out = DoReFaWeight(bit_width)(w)
    n = 2**bit_width - 1
    levels = 2 * (torch.arange(n + 1, dtype=w.dtype) / n) - 1
    assert torch.isin(out, levels).all()
    assert out.abs().max().item() == 1.0
    if bit_width <= 3:
        assert out.unique().numel() == 2**bit_width


@settings(max_examples=30, deadline=None)
@given(bit_width=st.integers(2, 8), seed=st.integers(0, 2**16))
def test_wrpn_outputs_lie_on_its_2k_minus_1_levels(bit_width, seed):
    # random weights, and a dense sweep of [-1.5, 1.5] that reaches every level (4,000 uniform draws
    # alone left one of the 255 8-bit levels empty about once in a few hundred examples)
    drawn = torch.rand(4000, generator=torch.Generator().manual_seed(seed)) * 3 - 1.5
    w = torch.cat([drawn, torch.linspace(-1.5, 1.5, 4001)])
    out = WRPNWeight(bit_width)(w)
    n = 2 ** (bit_width - 1) - 1
    levels = torch.arange(-n, n + 1, dtype=w.dtype) / n
    assert torch.isin(out, levels).all()
    assert out.unique().numel() == 2**bit_width - 1


def test_wrpn_gradient_is_zero_outside_unit_interval():
    w = torch.tensor([-2.0, -0.3, 0.4, 1.5], requires_grad=True)
    WRPNWeight(3)(w).sum().backward()
    assert torch.equal(w.grad, torch.tensor([0.0, 1.0, 1.0, 0.0]))


def test_scale_init_to_grid_spans_wrpn_grid_and_keeps_the_float_function_under_batch_norm():
    torch.manual_seed(0)
    model = make_model("cnn", 1, 10).train()
    x = torch.randn(16, 1, 28, 28)
    stem_name, classifier_name = stem_and_classifier(model)
    before, stem = model(x), model.get_submodule(stem_name).weight.clone()
    scale_init_to_grid(model, exclude=(stem_name, classifier_name))
    convs = [m.conv for m in model.modules() if isinstance(m, ConvBN)]
    assert torch.equal(convs[0].weight, stem)  # excluded
    assert all(c.weight.abs().max().item() == pytest.approx(1.0) for c in convs[1:])
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-4)  # BN on batch statistics
    assert (WRPNWeight(3)(convs[1].weight) != 0).float().mean() > 0.3  # most weights no longer round to 0


# --- prepare_qat / remove_qat ---------------------------------------------------------------------


def _pre_rounding(quantizer, w):
    if quantizer == "dorefa":
        return torch.tanh(w) / torch.tanh(w).abs().max()
    if quantizer == "wrpn":
        return w.clamp(-1, 1)
    return w


def _requantize(quantizer, w, bit_width):
    """The training quantizer applied to the weight remove_qat leaves."""
    if quantizer == "ste":
        return quantize(w, QuantSpec(bit_width))
    if quantizer == "wrpn":
        return WRPNWeight(bit_width)(w)
    n = 2**bit_width - 1
    return 2 * (torch.round((w / 2 + 0.5) * n) / n) - 1


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_prepare_then_remove_round_trip(quantizer):
    reference = small_cnn()
    model = prepare_qat(small_cnn(), quantizer, 3, exclude=["0"])
    assert has_qat(model)
    assert not parametrize.is_parametrized(model[0])
    assert parametrize.is_parametrized(model[3], "weight") and parametrize.is_parametrized(model[7], "weight")
    latent = {name: model.get_submodule(name).parametrizations.weight.original for name in ("3", "7")}
    quantized = {name: model.get_submodule(name).weight.detach().clone() for name in ("3", "7")}
    model(_inputs())
    remove_qat(model)
    assert not has_qat(model)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert torch.equal(model[0].weight, reference[0].weight)
    for name in ("3", "7"):
        weight, original = model.get_submodule(name).weight, reference.get_submodule(name).weight
        assert weight is latent[name]  # the Parameter object survives, so optimizers stay valid
        assert torch.allclose(weight, _pre_rounding(quantizer, original), atol=1e-7)
        if quantizer != "lsq":
            assert torch.allclose(_requantize(quantizer, weight.detach(), 3), quantized[name], atol=1e-6)
    if quantizer in ("ste", "lsq"):
        assert torch.equal(model(_inputs()), reference(_inputs()))


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_qat_training_step_updates_latent_weights(quantizer):
    model = prepare_qat(small_cnn(), quantizer, 4).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model[3].parametrizations.weight.original.detach().clone()
    model(_inputs()).pow(2).mean().backward()
    optimizer.step()
    assert not torch.equal(model[3].parametrizations.weight.original, before)


def test_per_channel_ste_prepare():
    model = prepare_qat(small_cnn(), "ste", 2, per_channel=True)
    for row in model[3].weight:
        assert row.unique().numel() <= 3


def test_prepare_qat_refuses_twice_and_satnl():
    model = prepare_qat(small_cnn(), "ste", 4)
    with pytest.raises(ValueError, match="already prepared"):
        prepare_qat(model, "lsq", 4)
    with pytest.raises(ValueError, match="already has a weight parametrization"):
        apply_satnl(model)
    with_satnl = apply_satnl(small_cnn())
    with pytest.raises(ValueError, match=r"layer '0' already has a weight parametrization; e.g. SatNL: fold it first"):
        prepare_qat(with_satnl)
    assert not has_qat(with_satnl)
    prepare_qat(apply_satnl(small_cnn(), include=["0"]), exclude=["0"])  # documented way to combine


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"quantizer": "pact"}, r"quantizer must be one of \('ste', 'lsq', 'dorefa', 'wrpn'\), got 'pact'"),
        ({"bit_width": 1}, r"bit_width must be in 2..16, got 1"),
        ({"bit_width": 17}, r"bit_width must be in 2..16, got 17"),
        ({"bit_width": True}, r"bit_width must be an int"),
        ({"bit_width": 4.0}, r"bit_width must be an int"),
        ({"quantizer": "lsq", "per_channel": True}, r"per_channel=True is only supported by quantizer='ste'"),
        ({"per_channel": 1}, r"per_channel must be True or False, got 1"),
        ({"exclude": ["0", "1", "fc"]}, r"exclude names modules that are not Conv2d/Linear.*\['1', 'fc'\]"),
        ({"exclude": "0"}, r"exclude must be a collection of module names, got the string '0'"),
    ],
)
def test_prepare_qat_rejects_bad_arguments(kwargs, match):
    model = small_cnn()
    with pytest.raises(ValueError, match=match):
        prepare_qat(model, **kwargs)
    assert not has_qat(model)


def test_prepare_qat_failure_leaves_model_untouched():
    model = small_cnn()
    with torch.no_grad():
        model[7].weight.zero_()
    with pytest.raises(ValueError, match="all-zero"):
        prepare_qat(model, "lsq", 4)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


def test_remove_qat_without_qat_raises():
    with pytest.raises(ValueError, match="no QAT quantizer"):
        remove_qat(small_cnn())


@pytest.mark.parametrize("cls", [DoReFaWeight, WRPNWeight])
def test_quantizer_constructors_validate_bit_width(cls):
    with pytest.raises(ValueError, match="bit_width"):
        cls(0)
    with pytest.raises(ValueError, match="bit_width"):
        STEWeight(20)


# --- the book's QAT setting: 8-bit edges, re-quantizing with the trained quantizer ---------------


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_edge_bit_width_puts_the_stem_and_classifier_at_8_bits(quantizer):
    model = prepare_qat(small_cnn(), quantizer, 3, edge_bit_width=8)
    bits = {name: d["bit_width"] for name, d in describe_quantizers(model).items()}
    assert bits == {"0": 8, "3": 3, "7": 8}


@pytest.mark.parametrize("quantizer", ["wrpn", "dorefa"])
def test_an_edge_quantizer_scales_the_8_bit_edges_to_their_layer(quantizer):
    model = prepare_qat(small_cnn(), quantizer, 3, edge_bit_width=8, edge_quantizer="ste")
    kinds = {name: (d["quantizer"], d["bit_width"]) for name, d in describe_quantizers(model).items()}
    assert kinds == {"0": ("ste", 8), "3": (quantizer, 3), "7": ("ste", 8)}


def test_wrpns_fixed_grid_leaves_a_classifier_a_few_levels_the_scaled_grid_many():
    scaled = prepare_qat(small_cnn(), "wrpn", 3, edge_bit_width=8, edge_quantizer="ste")
    fixed = prepare_qat(small_cnn(), "wrpn", 3, edge_bit_width=8)
    with torch.no_grad():
        for model in (scaled, fixed):
            model[7].parametrizations.weight.original.mul_(0.03 / model[7].parametrizations.weight.original.abs().max())
    assert fixed[7].weight.unique().numel() <= 9  # ±0.03 on a step of 1/127: about 4 levels a side
    assert scaled[7].weight.unique().numel() > 100


def test_a_bad_edge_quantizer_is_named():
    with pytest.raises(ValueError, match="edge_quantizer"):
        prepare_qat(small_cnn(), "wrpn", 3, edge_bit_width=8, edge_quantizer="nearest")


@pytest.mark.parametrize("quantizer", QUANTIZERS)
@pytest.mark.parametrize("edge_quantizer", [None, "ste"])
def test_requantize_reproduces_the_trained_weights_exactly(quantizer, edge_quantizer):
    model = prepare_qat(small_cnn(), quantizer, 3, edge_bit_width=8, edge_quantizer=edge_quantizer).train()
    if quantizer == "lsq":  # move the learned steps away from their initial values
        with torch.no_grad():
            for layer in (model[0], model[3], model[7]):
                if hasattr(layer.parametrizations.weight[0], "scale"):
                    layer.parametrizations.weight[0].scale.mul_(1.37)
    trained = {name: model.get_submodule(name).weight.detach().clone() for name in ("0", "3", "7")}
    descriptions = describe_quantizers(model)
    requantize(remove_qat(model), json.loads(json.dumps(descriptions)))  # through JSON, as the cache keeps it
    for name, weight in trained.items():
        assert torch.equal(model.get_submodule(name).weight, weight), name


def test_lsq_step_is_carried_to_other_bit_widths_with_the_same_clipping_range():
    quantizer = LSQWeight(3, torch.ones(10))
    carried = quantizer_from_description({"quantizer": "lsq", "bit_width": 3, "scale": 0.6}, torch.ones(10), 5)
    assert carried.bit_width == 5
    assert math.isclose(float(carried.scale) * carried.q_p, 0.6 * quantizer.q_p, rel_tol=1e-6)


def test_requantize_rejects_a_record_of_other_layers():
    with pytest.raises(ValueError, match="does not have"):
        requantize(small_cnn(), {"9": {"quantizer": "ste", "bit_width": 3}})


# --- QAT stacked on SatNL (the symreg_satnl_lsq stack) -------------------------------------------


def _lsq_on_satnl(bit_width: int = 3) -> nn.Module:
    model = apply_satnl(small_cnn())  # scaled_tanh
    with torch.no_grad():
        for layer in model.modules():
            if parametrize.is_parametrized(layer, "weight"):
                layer.parametrizations.weight.original.mul_(2.5)  # push some weights into saturation
    return prepare_qat(model, "lsq", bit_width, stack_on_satnl=True)


def test_lsq_stacked_on_satnl_computes_q_of_f_theta_bit_for_bit():
    model = _lsq_on_satnl()
    for layer in (model[0], model[3], model[7]):
        satnl, lsq = layer.parametrizations.weight
        theta = layer.parametrizations.weight.original.detach()
        assert torch.equal(layer.weight, lsq(satnl(theta)))  # q(f(theta)), in that order
        by_hand = satnl.alpha * torch.tanh(theta / satnl.alpha)
        step = lsq.scale.detach()
        expected = step * torch.round(torch.clamp(by_hand / step, -3, 3))
        assert torch.allclose(layer.weight, expected, rtol=0, atol=1e-6)
        assert torch.allclose(layer.weight / step, torch.round(layer.weight / step), atol=1e-5)  # on LSQ's grid


def test_removing_a_stacked_quantizer_leaves_satnl_and_requantizes_exactly():
    model = _lsq_on_satnl()
    trained = {name: m.weight.detach().clone() for name, m in model.named_modules() if name in ("0", "3", "7")}
    record = json.loads(json.dumps(describe_quantizers(model)))
    assert set(record) == {"0", "3", "7"} and {d["quantizer"] for d in record.values()} == {"lsq"}
    f_theta = {name: model.get_submodule(name).parametrizations.weight[0](
        model.get_submodule(name).parametrizations.weight.original).detach() for name in trained}
    remove_qat(model)
    assert not has_qat(model)
    assert all(type(model.get_submodule(n).parametrizations.weight[0]).__name__ == "SaturatingWeight" for n in trained)
    assert all(torch.equal(model.get_submodule(n).weight, f_theta[n]) for n in trained)
    from robustq.satnl import remove_satnl

    requantize(remove_satnl(model), record)
    assert all(torch.equal(model.get_submodule(n).weight, trained[n]) for n in trained)


class _Doubler(nn.Module):
    def forward(self, w):
        return 2 * w


def test_stacking_is_refused_for_other_quantizers_and_other_parametrizations():
    with pytest.raises(ValueError, match=r"stack_on_satnl=True needs a quantizer .* one of \('ste', 'lsq'\)"):
        prepare_qat(apply_satnl(small_cnn()), "dorefa", 3, stack_on_satnl=True)
    with pytest.raises(ValueError, match="already prepared"):
        prepare_qat(_lsq_on_satnl(), "lsq", 3, stack_on_satnl=True)
    with pytest.raises(ValueError, match="already has a weight parametrization"):
        apply_satnl(prepare_qat(small_cnn(), "lsq", 3))  # SatNL never goes on top of a quantizer
    other = small_cnn()
    parametrize.register_parametrization(other[3], "weight", _Doubler())
    with pytest.raises(ValueError, match=r"layer '3' already has a weight parametrization"):
        prepare_qat(other, "lsq", 3, stack_on_satnl=True)
    assert not has_qat(other)
