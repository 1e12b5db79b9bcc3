import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from robustq.satnl import DEFAULT_ALPHA_MULT, SaturatingWeight, apply_satnl, has_satnl, remove_satnl

FORMS = ["tanh", "scaled_tanh", "normalized_tanh"]


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=8, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 10),
    ).eval()


def _inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("form", FORMS)
def test_remove_satnl_folds_exactly(form):
    model = apply_satnl(small_cnn(), form)
    with torch.no_grad():
        for layer in (model[0], model[7]):
            layer.parametrizations.weight.original.mul_(3.0)  # move away from the init
        before = model(_inputs())
        assert has_satnl(model)
        remove_satnl(model)
        assert not has_satnl(model)
        assert not any(parametrize.is_parametrized(m) for m in model.modules())
        assert torch.equal(model(_inputs()), before)


@pytest.mark.parametrize("form", ["tanh", "scaled_tanh"])
def test_apply_satnl_keeps_initial_weights(form):
    reference = small_cnn()
    model = apply_satnl(small_cnn(), form)
    for name in ("0", "3", "7"):
        kept, original = model.get_submodule(name).weight, reference.get_submodule(name).weight
        assert torch.allclose(kept, original, atol=1e-6), name
    assert torch.allclose(model(_inputs()), reference(_inputs()), atol=1e-5)


def test_normalized_tanh_keeps_direction_of_initial_weights():
    reference = small_cnn()
    model = apply_satnl(small_cnn(), "normalized_tanh")
    w0 = reference[0].weight
    assert torch.allclose(model[0].weight, w0 / w0.abs().max(), atol=1e-6)


def test_scaled_tanh_alpha_is_fixed_at_apply_time():
    reference = small_cnn()
    model = apply_satnl(small_cnn(), "scaled_tanh", alpha_mult=2.0)
    satnl = model[0].parametrizations.weight[0]
    assert satnl.alpha.item() == pytest.approx(2.0 * reference[0].weight.std().item())
    with torch.no_grad():
        model[0].parametrizations.weight.original.mul_(10.0)
    assert satnl.alpha.item() == pytest.approx(2.0 * reference[0].weight.std().item())
    assert "parametrizations.weight.0.alpha" in dict(model[0].named_buffers())
    assert DEFAULT_ALPHA_MULT == 3.0


@settings(max_examples=40, deadline=None)
@given(form=st.sampled_from(FORMS), scale=st.floats(0.01, 100.0), seed=st.integers(0, 2**16))
def test_forms_are_bounded(form, scale, seed):
    theta = scale * torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    satnl = SaturatingWeight(form, alpha=0.3 if form == "scaled_tanh" else None)
    w = satnl(theta)
    assert w.abs().max().item() <= (satnl.alpha.item() if form == "scaled_tanh" else 1.0)
    if form == "normalized_tanh":
        assert w.abs().max().item() == pytest.approx(1.0)


@pytest.mark.parametrize("form", ["tanh", "scaled_tanh"])
def test_right_inverse_round_trip(form):
    satnl = SaturatingWeight(form, alpha=0.5 if form == "scaled_tanh" else None)
    bound = 0.5 if form == "scaled_tanh" else 1.0
    uniform = torch.rand(100, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    w = bound * (1.9 * uniform - 0.95)
    assert torch.allclose(satnl(satnl.right_inverse(w)), w)
    theta = torch.randn(100, dtype=torch.float64)
    assert torch.allclose(satnl.right_inverse(satnl(theta)), theta)


@pytest.mark.parametrize("form", ["tanh", "scaled_tanh"])
def test_right_inverse_saturates_weights_beyond_the_bound(form):
    satnl = SaturatingWeight(form, alpha=0.5 if form == "scaled_tanh" else None)
    bound = 0.5 if form == "scaled_tanh" else 1.0
    w = torch.tensor([-3.0, -bound, 0.0, bound, 3.0]) * 1.0
    theta = satnl.right_inverse(w)
    assert torch.isfinite(theta).all()
    back = satnl(theta)
    assert torch.allclose(back, w.clamp(-bound, bound), atol=1e-6)
    assert (back.abs() <= bound).all()


def test_normalized_tanh_round_trip_up_to_scale():
    satnl = SaturatingWeight("normalized_tanh")
    for scale in (0.05, 1.0, 7.0):
        w = scale * torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        theta = satnl.right_inverse(w)
        assert torch.isfinite(theta).all()
        assert torch.allclose(satnl(theta), w / w.abs().max())


def test_satnl_is_trainable_and_gradient_reaches_theta():
    model = apply_satnl(small_cnn(), "scaled_tanh")
    model(_inputs()).sum().backward()
    assert model[0].parametrizations.weight.original.grad.abs().sum() > 0


def test_include_restricts_layers():
    model = apply_satnl(small_cnn(), include=["7"])
    assert parametrize.is_parametrized(model[7], "weight")
    assert not parametrize.is_parametrized(model[0])
    assert not parametrize.is_parametrized(model[1])


def test_apply_satnl_refuses_twice_and_other_parametrizations():
    model = apply_satnl(small_cnn())
    with pytest.raises(ValueError, match="already applied"):
        apply_satnl(model)
    other = small_cnn()
    parametrize.register_parametrization(other[0], "weight", nn.Identity())
    with pytest.raises(ValueError, match="'0' already has a weight parametrization"):
        apply_satnl(other)
    assert not has_satnl(other)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"form": "sigmoid"},
            r"form must be one of \('tanh', 'scaled_tanh', 'normalized_tanh'\), got 'sigmoid'",
        ),
        ({"alpha_mult": 0.0}, r"alpha_mult must be > 0, got 0.0"),
        ({"alpha_mult": -1.0}, r"alpha_mult must be > 0, got -1.0"),
        ({"include": ["1", "nope"]}, r"include names modules that are not Conv2d/Linear.*\['1', 'nope'\]"),
    ],
)
def test_apply_satnl_rejects_bad_arguments(kwargs, match):
    model = small_cnn()
    with pytest.raises(ValueError, match=match):
        apply_satnl(model, **kwargs)
    assert not has_satnl(model)


def test_zero_std_layer_is_refused_without_partial_application():
    model = small_cnn()
    with torch.no_grad():
        model[7].weight.zero_()
    with pytest.raises(ValueError, match="cannot set alpha for layer '7'"):
        apply_satnl(model)
    assert not has_satnl(model)
    apply_satnl(model, "tanh")  # no alpha needed


def test_saturating_weight_rejects_bad_arguments():
    with pytest.raises(ValueError, match="form must be one of"):
        SaturatingWeight("relu")
    with pytest.raises(ValueError, match="alpha must be > 0 for form='scaled_tanh', got None"):
        SaturatingWeight("scaled_tanh")
    with pytest.raises(ValueError, match="alpha must be > 0"):
        SaturatingWeight("scaled_tanh", alpha=-0.1)


def test_remove_satnl_without_satnl_raises():
    with pytest.raises(ValueError, match="no SatNL"):
        remove_satnl(small_cnn())


@pytest.mark.parametrize("name", ["satnl", "qat_lsq", "wrpn"])
def test_a_parametrized_kernel_keeps_its_stored_layout(name):
    """A one-channel stem kernel stored channels_last must reach its convolution so: elementwise
    ops would hand it contiguous strides and run the stem in the slower layout."""
    from robustq import methods, models

    torch.manual_seed(0)
    model = methods.make(name).prepare(models.make_model("cnn", 1, 10)).to(memory_format=torch.channels_last)
    stem = model[0].conv
    assert stem.weight.stride() == stem.parametrizations.weight.original.stride()
    assert torch.equal(stem.weight, stem.parametrizations.weight[0](stem.parametrizations.weight.original))
