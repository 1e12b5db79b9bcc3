import pytest
import torch
import torch.nn.functional as F

from robustq import methods, models
from robustq.train import StepContext, TrainConfig, train

REQUIRED = {"baseline", "symreg", "satnl", "symreg_satnl", "satnl_asam", "symreg_satnl_asam", "kure", "grad_l1",
            "sinreq_dorefa", "sinreq_wrpn", "dorefa", "wrpn", "oscillation", "qat_ste", "qat_lsq"}


def test_registry_names_every_method_of_the_book():
    assert REQUIRED <= set(methods.available())


@pytest.mark.parametrize(
    "name, params, match",
    [("nope", {}, "unknown method 'nope'; known methods: baseline"),
     ("symreg", {"lam": -0.1}, "SymReg.lam must be a finite number >= 0"),
     ("grad_l1", {"lam_a": float("inf")}, "lam_a"),
     ("qat_lsq", {"bit_width": 17}, "bit_width must be in 2..16"),
     ("sinreq_wrpn", {"bit_width": 3.5}, "bit_width"),
     ("symreg", {"pairing": "3:3"}, "pairing must be one of"),
     ("satnl", {"form": "sigmoid"}, "form must be one of"),
     ("kure", {"lam": "big"}, "KURE.lam must be of type float"),
     ("symreg", {"rho": 0.1}, "has no hyperparameter 'rho'; its hyperparameters are: lam, normalize"),
     ("sinreq_dorefa", {"quantizer": "ste"}, "has no hyperparameter 'quantizer'"),
     ("asam", {"rho": -1.0}, "rho")],
)
def test_bad_methods_and_hyperparameters_raise_naming_the_problem(name, params, match):
    with pytest.raises(ValueError, match=match):
        methods.make(name, **params)


def test_shared_hyperparameters_reach_every_part():
    method = methods.make("sinreq_dorefa", bit_width=3)
    assert [p.bit_width for p in method.parts] == [3, 3]


def _penalty_grads(name, model, **params):
    method = methods.make(name, **params)
    model = method.prepare(model)
    x = torch.randn(4, 1, 28, 28)
    loss = F.cross_entropy(model(x), torch.zeros(4, dtype=torch.long))
    penalty = method.extensions(model).penalty(model, StepContext(loss=loss, activations=[], epoch=0, epochs=1))
    penalty.backward()
    return model


def _grad_is_zero(module):
    weight = methods.latent_weight(module)
    return weight.grad is None or not weight.grad.any()


def test_symreg_skips_depthwise_convs():
    model = _penalty_grads("symreg", models.make_model("mobilenetv2", 1, 10))
    convs = [m for _, m in methods.weighted_layers(model) if isinstance(m, torch.nn.Conv2d)]
    assert any(methods.is_depthwise(m) for m in convs)
    assert all(_grad_is_zero(m) == methods.is_depthwise(m) for m in convs)


def test_kure_skips_the_first_conv_and_the_classifier():
    model = _penalty_grads("kure", models.make_model("cnn", 1, 10))
    stem, classifier = methods.stem_and_classifier(model)
    layers = dict(methods.weighted_layers(model))
    assert _grad_is_zero(layers[stem]) and _grad_is_zero(layers[classifier])
    assert not any(_grad_is_zero(m) for name, m in layers.items() if name not in (stem, classifier))


def test_sinreq_acts_on_latent_weights_and_skips_stem_and_classifier():
    model = _penalty_grads("sinreq_wrpn", models.make_model("cnn", 1, 10))
    stem, classifier = methods.stem_and_classifier(model)
    layers = dict(methods.weighted_layers(model))
    assert _grad_is_zero(layers[stem]) and _grad_is_zero(layers[classifier])
    assert not _grad_is_zero(next(m for n, m in layers.items() if n not in (stem, classifier)))


def test_oscillation_regularizes_batchnorm_unless_excluded():
    model = models.make_model("cnn", 1, 10)
    bn_name = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d))
    regularized = _penalty_grads("oscillation", model)
    bn = dict(regularized.named_modules())[bn_name]
    assert bn.weight.grad is not None
    excluded = _penalty_grads("oscillation", models.make_model("cnn", 1, 10), exclude=(bn_name,))
    assert dict(excluded.named_modules())[bn_name].weight.grad is None


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_every_method_trains_with_a_falling_loss_and_ends_with_plain_weights(name, synthetic):
    torch.manual_seed(0)
    method = methods.make(name)
    model = method.prepare(models.make_model("cnn", synthetic.in_channels, synthetic.num_classes))
    config = TrainConfig(epochs=2, batch_size=128, lr=0.05)
    result = train(model, synthetic, config, method.extensions(model), progress=False)
    first, second = (h["loss"] for h in result.history)
    assert second < first, f"{name}: mean training loss rose from {first:.3f} to {second:.3f}"
    model = method.finalize(result.model)
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in model.modules())


# --- symreg_satnl_lsq: LSQ stacked on SatNL, SymReg on f(theta) ----------------------------------


def test_symreg_satnl_lsq_accepts_the_parameters_of_its_parts():
    method = methods.make("symreg_satnl_lsq", bit_width=3, edge_bit_width=8, scope="channel", lam=0.5)
    params = method.params()
    assert (params["quantizer"], params["bit_width"], params["scope"], params["lam"]) == ("lsq", 3, "channel", 0.5)
    with pytest.raises(ValueError, match="has no hyperparameter 'quantizer'"):
        methods.make("symreg_satnl_lsq", quantizer="dorefa")


def test_symreg_satnl_lsq_quantizes_f_theta_and_regularizes_f_theta():
    from robustq import qat, regularizers

    method = methods.make("symreg_satnl_lsq", bit_width=3, lam=1.0)
    model = method.prepare(models.make_model("cnn", 1, 10))
    layers = [m for _, m in methods.weighted_layers(model)]
    f_theta = [m.parametrizations.weight[0](m.parametrizations.weight.original) for m in layers]
    for m, w in zip(layers, f_theta):
        assert torch.equal(m.weight, m.parametrizations.weight[1](w))  # the forward weight is q(f(theta))
    loss = F.cross_entropy(model(torch.randn(4, 1, 28, 28)), torch.zeros(4, dtype=torch.long))
    penalty = method.extensions(model).penalty(model, StepContext(loss=loss, activations=[], epoch=0, epochs=1))
    on_f = torch.stack([regularizers.sym_reg(w, "1:1", "layer") for w in f_theta]).mean()
    on_q = torch.stack([regularizers.sym_reg(m.weight, "1:1", "layer") for m in layers]).mean()
    assert torch.equal(penalty, on_f) and not torch.allclose(penalty, on_q)
    assert set(qat.describe_quantizers(model)) == {name for name, _ in methods.weighted_layers(model)}


def test_symreg_satnl_lsq_trains_a_step_and_finalizes_to_f_theta(synthetic):
    import math

    from robustq import qat

    torch.manual_seed(0)
    method = methods.make("symreg_satnl_lsq", bit_width=3)
    model = method.prepare(models.make_model("cnn", synthetic.in_channels, synthetic.num_classes))
    scale = model.get_submodule(methods.weighted_layers(model)[1][0]).parametrizations.weight[1].scale
    before = scale.detach().clone()
    result = train(model, synthetic, TrainConfig(epochs=1, batch_size=256, lr=0.05), method.extensions(model),
                   progress=False)
    assert math.isfinite(result.history[-1]["loss"]) and not torch.equal(scale.detach(), before)
    record = qat.describe_quantizers(result.model)
    f_theta = {n: m.parametrizations.weight[0](m.parametrizations.weight.original).detach()
               for n, m in methods.weighted_layers(result.model)}
    plain = method.finalize(result.model)
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in plain.modules())
    assert all(torch.equal(m.weight, f_theta[n]) for n, m in methods.weighted_layers(plain))
    assert {d["quantizer"] for d in record.values()} == {"lsq"}
