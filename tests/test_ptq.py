import copy

import pytest
import torch
from torch import nn

from robustq import adaround, models, ptq, quant
from robustq.experiments import Experiment, dataset_for, run
from robustq.quant import QuantSpec


def _randomize_bn(model):
    generator = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=generator))
            m.bias.data.copy_(torch.randn(m.num_features, generator=generator))
    return model.eval()


@pytest.mark.parametrize("name, shape", [("cnn", (1, 28, 28)), ("resnet20", (3, 32, 32)), ("mobilenetv2", (3, 32, 32))])
def test_fold_bn_is_exact_and_removes_every_batchnorm(name, shape):
    model = _randomize_bn(models.make_model(name, shape[0], 10))
    folded = ptq.fold_bn(model)
    x = torch.randn(8, *shape)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


TORCHVISION_MODELS = ("mobilenet_v2", "resnet18")
TORCHVISION_INPUT = (3, 32, 32)


@pytest.fixture(scope="module", params=TORCHVISION_MODELS)
def torchvision_model(request):
    """A torchvision model, randomly initialised, with non-trivial BN affine parameters and running
    statistics (from a few train-mode batches), in eval mode."""
    torchvision_models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = getattr(torchvision_models, request.param)(num_classes=10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.add_(0.2 * torch.randn_like(m.weight))
                m.bias.add_(0.2 * torch.randn_like(m.bias))
        model.train()
        for _ in range(3):
            model(torch.randn(4, *TORCHVISION_INPUT) * 2 + 0.5)
    return model.eval()


def test_fold_bn_is_exact_on_torchvision_models(torchvision_model):
    # mobilenet_v2: every BN in a Conv2dNormActivation (a Sequential); resnet18: BN as block
    # attributes (conv1/bn1), matched on the fx graph, and in the downsample Sequential.
    model = torchvision_model
    folded = ptq.fold_bn(model)
    x = torch.randn(2, *TORCHVISION_INPUT)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert type(folded) is type(model)  # folded in the module tree, not turned into an fx GraphModule
    assert len(ptq.weighted_layers(folded)) == len(ptq.weighted_layers(model))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("fold", [False, True])
def test_quantize_model_runs_on_torchvision_models(torchvision_model, fold):
    calib = torch.randn(4, *TORCHVISION_INPUT)
    a_spec = QuantSpec(8, symmetric=False)
    quantized = ptq.quantize_model(torchvision_model, QuantSpec(4), a_spec, calib=calib, fold=fold)
    layers = ptq.weighted_layers(quantized)
    assert all(layer.weight.unique().numel() <= 15 for _, layer in layers[1:-1])  # 4 bits, narrow range
    with torch.no_grad():
        out = quantized(calib)
    assert out.shape == (4, 10) and torch.isfinite(out).all()


class _AttributePair(nn.Module):
    def __init__(self, relu_first: bool = False) -> None:
        super().__init__()
        self.conv, self.bn, self.relu_first = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), relu_first

    def forward(self, x):
        y = self.conv(x)
        return self.bn(torch.relu(y) if self.relu_first else y)


def test_fold_bn_matches_attribute_pairs_on_the_fx_graph():
    model = _randomize_bn(_AttributePair())
    folded = ptq.fold_bn(model)
    assert isinstance(folded.bn, nn.Identity) and folded.conv.bias is not None
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) if x.sum() > 0 else self.conv(x)


@pytest.mark.parametrize(
    "model, match",
    [
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)), "nothing else uses"),
        (_AttributePair(relu_first=True), "nothing else uses"),
        (_Untraceable(), "torch.fx cannot trace"),
    ],
    ids=["sequential-bn-after-relu", "attribute-bn-after-relu", "untraceable"],
)
def test_fold_bn_refuses_a_batchnorm_it_cannot_fold(model, match):
    with pytest.raises(ValueError, match=match):
        ptq.fold_bn(model)


def test_inference_copy_fuses_batchnorm_with_the_same_outputs_and_keeps_activation_hooks():
    model = _randomize_bn(models.make_model("cnn", 1, 10))
    x = torch.randn(64, 1, 28, 28)
    ptq.attach_activation_quantizers(model, ptq.calibrate(model, x, QuantSpec(4, symmetric=False)))
    fused = ptq.inference_copy(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    torch.testing.assert_close(fused(x), model(x), atol=1e-4, rtol=1e-4)
    assert ptq.inference_copy(fused) is fused  # nothing left to fuse: no copy


def test_inference_copy_leaves_batchnorm_it_cannot_fuse_and_a_parametrized_model_as_they_are():
    unfusable = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)).eval()
    assert isinstance(ptq.inference_copy(unfusable)[2], nn.BatchNorm2d)
    from robustq import qat

    prepared = qat.prepare_qat(models.make_model("cnn", 1, 10), "lsq", 3)
    assert ptq.inference_copy(prepared) is prepared


@pytest.fixture(scope="module")
def trained():
    """A baseline trained for two short epochs on a Fashion-MNIST subset (one epoch of 32 steps is
    still in its unstable high-learning-rate phase)."""
    exp = Experiment(epochs=2, train_size=4096, test_size=2000, profile="smoke")
    return run(exp, progress=False), dataset_for(exp)


def test_quantize_model_at_8_bits_stays_within_half_a_point(trained):
    result, data = trained
    fp = ptq.accuracy(result.model, data)
    w8 = ptq.quantize_model(result.model, QuantSpec(8), QuantSpec(8, symmetric=False), calib=ptq.calibration_batch(data))
    assert abs(ptq.accuracy(w8, data) - fp) <= 0.005


def test_quantize_model_never_modifies_the_original(trained):
    result, data = trained
    before = copy.deepcopy(result.model.state_dict())
    ptq.quantize_model(result.model, QuantSpec(2), QuantSpec(4, symmetric=False), calib=ptq.calibration_batch(data, 64))
    for key, value in result.model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_quantized_weights_lie_on_their_grid(trained):
    result, _ = trained
    quantized = ptq.quantize_model(result.model, QuantSpec(3), first_last_8bit=False)
    for _, layer in ptq.weighted_layers(quantized):
        assert layer.weight.unique().numel() <= 7


def test_first_last_8bit_keeps_the_edges_at_8_bits(trained):
    result, _ = trained
    layers = ptq.weighted_layers(ptq.quantize_model(result.model, QuantSpec(2), first_last_8bit=True))
    levels = [layer.weight.unique().numel() for _, layer in layers]
    assert levels[0] > 3 and levels[-1] > 3 and all(n <= 3 for n in levels[1:-1])


def test_activation_spec_needs_calibration_data(trained):
    with pytest.raises(ValueError, match="a_spec, bias_correction, bn_reestimate and a learned rounding need calib"):
        ptq.quantize_model(trained[0].model, QuantSpec(4), QuantSpec(8))


def test_learned_rounding_puts_every_weight_on_its_grid_within_a_level_of_nearest(trained):
    result, data = trained
    calib = ptq.calibration_batch(data, 64)
    nearest = ptq.quantize_model(result.model, QuantSpec(3), first_last_8bit=False)
    learned = ptq.quantize_model(result.model, QuantSpec(3), calib=calib, first_last_8bit=False,
                                 rounding="adaround", rounding_config=adaround.AdaRoundConfig(iterations=20))
    for (name, rounded), (_, chosen) in zip(ptq.weighted_layers(nearest), ptq.weighted_layers(learned)):
        step = quant.choose_qparams(result.model.get_submodule(name).weight, QuantSpec(3))[0]
        assert ((rounded.weight - chosen.weight).abs() <= step * 1.0001).all(), name
        assert chosen.weight.unique().numel() <= 7, name  # the 3-bit narrow grid
    assert 0.0 <= ptq.accuracy(learned, data) <= 1.0


def test_learned_rounding_needs_calib_and_a_ptq_model_and_a_known_name(trained):
    model = trained[0].model
    with pytest.raises(ValueError, match="a learned rounding need calib"):
        ptq.quantize_model(model, QuantSpec(3), rounding="adaround")
    with pytest.raises(ValueError, match="rounding must be one of"):
        ptq.quantize_model(model, QuantSpec(3), rounding="stochastic")
    with pytest.raises(ValueError, match="own quantizers"):
        ptq.quantize_model(model, QuantSpec(3), calib=torch.zeros(2, 1, 28, 28), rounding="adaround",
                           trained_quantizers={"0": {"quantizer": "ste", "bit_width": 3}})


def test_bit_sweep_returns_one_tidy_row_per_configuration(trained):
    result, data = trained
    frame = ptq.bit_sweep(result.model, data, w_bits=(8, 2), a_bits=(None, 8), per_channel=(False, True), calib_size=128)
    assert len(frame) == 2 * 2 * 2
    assert set(frame.columns) == {
        "w_bits", "a_bits", "symmetric", "per_channel", "policy", "fold", "first_last_8bit", "bias_correction",
        "rounding", "acc", "fp_acc",
    }
    assert (frame["rounding"] == "nearest").all()
    assert not frame["fold"].any() and frame["first_last_8bit"].all()  # the primary setting by default
    assert set(frame.a_bits) == {8, ptq.FLOAT_BITS} and frame.acc.between(0, 1).all()
    w8 = frame[(frame.w_bits == 8) & (frame.a_bits == ptq.FLOAT_BITS)].acc
    w2 = frame[(frame.w_bits == 2) & (frame.a_bits == ptq.FLOAT_BITS)].acc
    assert w8.min() > w2.max()


def test_bit_sweep_has_one_column_per_deployment_setting(trained):
    result, data = trained
    frame = ptq.bit_sweep(
        result.model, data, w_bits=(4,), fold=(False, True), first_last_8bit=(True, False),
        bias_correction=(False, True), calib_size=128,
    )
    assert len(frame) == 8
    assert frame.groupby("fold").fp_acc.nunique().eq(1).all()  # one float reference per deployment


def test_bit_sweep_learns_the_rounding_as_quantize_model_does(trained):
    result, data = trained
    frame = ptq.bit_sweep(result.model, data, w_bits=(2,), rounding=("nearest", "adaround"), calib_size=64,
                          rounding_iterations=20).set_index("rounding")
    learned = ptq.quantize_model(result.model, QuantSpec(2), calib=ptq.calibration_batch(data, 64),
                                 rounding="adaround", rounding_config=adaround.AdaRoundConfig(iterations=20))
    assert frame.loc["adaround", "acc"] == ptq.accuracy(learned, data)
    assert frame.loc["nearest", "acc"] == ptq.accuracy(ptq.quantize_model(result.model, QuantSpec(2)), data)
    with pytest.raises(ValueError, match="rounding must be one of"):
        ptq.bit_sweep(result.model, data, w_bits=(2,), rounding=("stochastic",))


def test_bit_sweep_rejects_a_bad_bit_width_before_evaluating(trained):
    with pytest.raises(ValueError, match="bit_width must be in 2..16"):
        ptq.bit_sweep(trained[0].model, trained[1], w_bits=(4, 1))


@pytest.mark.parametrize("fold", [False, True])
def test_bias_correction_matches_the_float_logit_means_on_the_calibration_batch(trained, fold):
    result, data = trained
    calib = ptq.calibration_batch(data, 256)
    reference = ptq.fold_bn(result.model) if fold else ptq.materialize(result.model)
    plain = ptq.quantize_model(result.model, QuantSpec(3), fold=fold, first_last_8bit=False)
    corrected = ptq.quantize_model(result.model, QuantSpec(3), fold=fold, first_last_8bit=False,
                                   bias_correction=True, calib=calib)
    with torch.no_grad():
        target, before, after = (m(calib).double().mean(0) for m in (reference, plain, corrected))
    assert (before - target).abs().max() > 1e-3  # there was a shift to correct
    torch.testing.assert_close(after, target, atol=1e-4, rtol=0)


def test_bias_correction_and_bn_reestimation_need_calibration_data(trained):
    for kwargs in ({"bias_correction": True}, {"bn_reestimate": True}):
        with pytest.raises(ValueError, match="need calib"):
            ptq.quantize_model(trained[0].model, QuantSpec(4), **kwargs)


def test_bn_reestimation_matches_the_batch_statistics_of_the_quantized_model(trained):
    result, data = trained
    calib = ptq.calibration_batch(data, 256)
    quantized = ptq.quantize_model(result.model, QuantSpec(3), bn_reestimate=True, calib=calib)
    first_bn = next(m for m in quantized.modules() if isinstance(m, nn.BatchNorm2d))
    first_conv = next(m for m in quantized.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        out = first_conv(calib)
    torch.testing.assert_close(first_bn.running_mean, out.mean(dim=(0, 2, 3)), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="fold=False"):
        ptq.quantize_model(result.model, QuantSpec(3), fold=True, bn_reestimate=True, calib=calib)
