import copy

import pytest
import torch
from torch import nn

from robustq import models, ptq
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
    with pytest.raises(ValueError, match="a_spec, bias_correction and bn_reestimate need calib"):
        ptq.quantize_model(trained[0].model, QuantSpec(4), QuantSpec(8))


def test_bit_sweep_returns_one_tidy_row_per_configuration(trained):
    result, data = trained
    frame = ptq.bit_sweep(result.model, data, w_bits=(8, 2), a_bits=(None, 8), per_channel=(False, True), calib_size=128)
    assert len(frame) == 2 * 2 * 2
    assert set(frame.columns) == {
        "w_bits", "a_bits", "symmetric", "per_channel", "policy", "fold", "first_last_8bit", "bias_correction",
        "acc", "fp_acc",
    }
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
