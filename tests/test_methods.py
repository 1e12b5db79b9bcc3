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
    [("nope", {}, r"method must be one of \('baseline', .*\), got 'nope'"),
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


def test_oscillation_on_the_deployed_layers_skips_batchnorm_and_the_8_bit_edges():
    model = _penalty_grads("oscillation", models.make_model("cnn", 1, 10), scope="deployed")
    stem, classifier = methods.stem_and_classifier(model)
    layers = dict(methods.weighted_layers(model))
    assert _grad_is_zero(layers[stem]) and _grad_is_zero(layers[classifier])
    assert not any(_grad_is_zero(m) for name, m in layers.items() if name not in (stem, classifier))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.weight.grad is None for m in norms)
    with pytest.raises(ValueError, match="scope must be one of"):
        methods.make("oscillation", scope="bn")


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


# --- gradient-ℓ1: weighting of its terms and lazy regularization ---------------------------------


def _conv_bn_net():
    torch.manual_seed(5)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3, bias=False), torch.nn.BatchNorm2d(2, eps=1e-12), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(2 * 4 * 4, 3),
    ).double().train()


def _grad_l1_context(model, step=0):
    x = torch.randn(8, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    loss = F.cross_entropy(model(x), torch.arange(8) % 3)
    return StepContext(loss=loss, activations=[], epoch=0, epochs=1, step=step)


def _weight_grad_l1s(model):
    """``||dL/dW_l||_1`` of the conv and the linear layer, by hand."""
    weights = [model[0].weight, model[4].weight]
    return [g.abs().sum() for g in torch.autograd.grad(_grad_l1_context(model).loss, weights)]


def test_grad_l1_defaults_keep_the_unweighted_penalty_on_every_step():
    part = methods.make("grad_l1").parts[0]
    assert (part.weighting, part.lazy_every, part.reference_bit_width) == ("none", 1, 3)
    model = _conv_bn_net()
    expected = part.lam_w * sum(_weight_grad_l1s(model))
    assert torch.allclose(part.penalty(model, _grad_l1_context(model, step=7)), expected, rtol=1e-12)


def test_grad_l1_step_weighting_is_the_papers_bound_by_hand():
    model = _conv_bn_net()
    part = methods.GradL1(lam_w=0.5, lam_a=0.0, weighting="step", reference_bit_width=4)
    half_steps = [float(w.detach().abs().max()) / 7 / 2 for w in (model[0].weight, model[4].weight)]  # qmax(4)=7
    expected = 0.5 * sum(h * g for h, g in zip(half_steps, _weight_grad_l1s(model)))
    assert torch.allclose(part.penalty(model, _grad_l1_context(model)), expected, rtol=1e-12)


def test_grad_l1_step_weighting_weighs_each_activation_term_by_its_half_step_by_hand():
    model = _conv_bn_net()
    x = torch.randn(8, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    hidden = model[:4](x)  # the linear layer's input, a captured activation
    loss = F.cross_entropy(model[4](hidden), torch.arange(8) % 3)
    context = StepContext(loss=loss, activations=[hidden], epoch=0, epochs=1, step=0)
    part = methods.GradL1(lam_w=0.0, lam_a=0.5, weighting="step", reference_bit_width=4)
    half_step = float(hidden.max() - min(float(hidden.min()), 0.0)) / 15 / 2  # 2^4 - 1 = 15 codes
    (grad,) = torch.autograd.grad(loss, [hidden], retain_graph=True)
    assert torch.allclose(part.penalty(model, context), 0.5 * half_step * grad.abs().sum(), rtol=1e-12)


def test_grad_l1_step_weighting_removes_the_conv_bn_scaling_exploit():
    model, c = _conv_bn_net(), 4.0
    step, none = (methods.GradL1(lam_w=1.0, lam_a=0.0, weighting=w) for w in ("step", "none"))
    conv_term, linear_term = _weight_grad_l1s(model)
    step_before = step.penalty(model, _grad_l1_context(model))
    with torch.no_grad():
        model[0].weight.mul_(c)  # BN (batch statistics) undoes it: the same network
    assert torch.allclose(step.penalty(model, _grad_l1_context(model)), step_before, rtol=1e-9)
    assert torch.allclose(none.penalty(model, _grad_l1_context(model)), conv_term / c + linear_term, rtol=1e-9)


def test_lazy_grad_l1_averages_to_the_full_penalty_over_k_steps():
    model, k = _conv_bn_net(), 3
    full = methods.GradL1(lam_a=0.0).penalty(model, _grad_l1_context(model))
    lazy = methods.GradL1(lam_a=0.0, lazy_every=k)
    terms = [lazy.penalty(model, _grad_l1_context(model, step)) for step in range(5, 5 + k)]
    assert [t is not None for t in terms] == [False, True, False]  # only step 6 = 2k
    assert torch.allclose(sum(t for t in terms if t is not None) / k, full, rtol=1e-12)


def _count_double_backprops(monkeypatch):
    calls = []
    grad = torch.autograd.grad

    def counting(*args, **kwargs):
        calls.append(kwargs.get("create_graph", False))
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    return calls


@pytest.mark.parametrize("lazy_every, expected", [(1, 6), (2, 3), (4, 2)])
def test_lazy_grad_l1_runs_the_double_backward_on_every_kth_global_step(synthetic, monkeypatch, lazy_every, expected):
    import dataclasses

    from robustq.data import Split

    small = dataclasses.replace(synthetic, train=Split(synthetic.train.images[:48], synthetic.train.labels[:48]),
                                val=None)
    method = methods.make("grad_l1", lazy_every=lazy_every)
    model = models.make_model("cnn", small.in_channels, small.num_classes)
    calls = _count_double_backprops(monkeypatch)
    train(model, small, TrainConfig(epochs=2, batch_size=16, lr=0.01), method.extensions(model), progress=False)
    # 2 epochs x 3 steps = global steps 0..5; a per-epoch count would give 4 calls, not 3, for k = 2
    assert calls == [True] * expected


@pytest.mark.parametrize(
    "params, match",
    [({"weighting": "layer"}, "weighting must be one of"),
     ({"reference_bit_width": 1}, "GradL1.reference_bit_width: bit_width must be in 2..16"),
     ({"lazy_every": 0}, "GradL1.lazy_every must be a positive int, got 0"),
     ({"lazy_every": 2.0}, "GradL1.lazy_every must be of type int")],
)
def test_grad_l1_rejects_bad_weighting_bit_width_and_lazy_every(params, match):
    with pytest.raises(ValueError, match=match):
        methods.make("grad_l1", **params)


# --- SinReQ's strength schedule --------------------------------------------------------------------


def test_sinreq_schedule_is_constant_by_default_and_tanh_on_request():
    import math

    constant = methods.make("sinreq_wrpn", lam=0.3).parts[1]
    assert constant.schedule == "constant"
    assert [constant.strength(e, 10) for e in range(10)] == [0.3] * 10
    tanh = methods.make("sinreq_dorefa", lam=0.3, schedule="tanh", ramp=2.0).parts[1]
    expected = [0.3 * 0.5 * (1 + math.tanh((e - 0.2 * 10) / 2.0)) for e in range(10)]
    assert [tanh.strength(e, 10) for e in range(10)] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("schedule", ["constant", "tanh"])
def test_sinreq_penalty_is_the_scheduled_strength_times_the_layer_sum(schedule):
    from robustq import regularizers

    method = methods.make("sinreq_wrpn", lam=0.5, bit_width=3, schedule=schedule, ramp=1.0)
    model = method.prepare(models.make_model("cnn", 1, 10))
    stem, classifier = methods.stem_and_classifier(model)
    total = sum(regularizers.sinreq(methods.latent_weight(m), 3, "wrpn")
                for n, m in methods.weighted_layers(model) if n not in (stem, classifier))
    loss = torch.zeros(())
    for epoch in (0, 3):
        context = StepContext(loss=loss, activations=[], epoch=epoch, epochs=5)
        penalty = method.extensions(model).penalty(model, context)
        assert torch.allclose(penalty, method.parts[1].strength(epoch, 5) * total)


def test_sinreq_rejects_an_unknown_schedule():
    with pytest.raises(ValueError, match=r"schedule must be one of \('constant', 'tanh'\), got 'cosine'"):
        methods.make("sinreq_wrpn", schedule="cosine")


@pytest.mark.parametrize("domain", ["raw", "normalized"])
def test_sinreq_dorefa_sinusoid_acts_on_the_requested_domain(domain):
    from robustq import qat, regularizers

    method = methods.make("sinreq_dorefa", lam=1.0, bit_width=3, domain=domain)
    model = method.prepare(models.make_model("cnn", 1, 10))
    stem, classifier = methods.stem_and_classifier(model)
    inner = [m for n, m in methods.weighted_layers(model) if n not in (stem, classifier)]
    normalize = (lambda w: qat.DoReFaWeight(3).pre_rounding(w)) if domain == "normalized" else (lambda w: w)
    total = sum(regularizers.sinreq(normalize(methods.latent_weight(m)), 3, "dorefa") for m in inner)
    context = StepContext(loss=torch.zeros(()), activations=[], epoch=0, epochs=1)
    assert torch.allclose(method.extensions(model).penalty(model, context), total)


def test_sinreq_rejects_an_unknown_domain():
    with pytest.raises(ValueError, match=r"domain must be one of \('raw', 'normalized'\), got 'tanh'"):
        methods.make("sinreq_dorefa", domain="tanh")


def test_a_fixed_parameter_of_a_later_part_does_not_hide_the_routed_one():
    combo = methods.make("symreg_satnl_asam_kure", lam=10.0)
    assert [getattr(p, "lam", None) for p in combo.parts] == [10.0, None, None, 1.0]
    assert combo.params()["lam"] == 10.0  # what the experiment's cache key records
    assert methods.make("symreg_satnl_asam_kure", lam=0.1).params() != combo.params()


def test_wrpn_can_start_at_its_grid_scale():
    assert methods.make("wrpn", init_to_grid=True).parts[0].init_to_grid
    with pytest.raises(ValueError, match="init_to_grid"):
        methods.make("wrpn", init_to_grid="yes")
