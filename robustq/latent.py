"""A trained SatNL result back in ``theta`` space (chapter 04): what training acted on, for
:func:`robustq.analysis.asam_perturbation_by_magnitude` and gradients or curvature in ``theta``.

Park, Jang & Park (ECCV 2022, arXiv 2208.00338), SatNL (forms [recon], :mod:`robustq.satnl`). It
takes an :class:`robustq.experiments.Result` and replays the start of its training, so it lives
beside the runner and not in :mod:`robustq.analysis`, which sits below it.
"""

from __future__ import annotations

import copy
import random

import numpy as np
import torch
from torch import nn

from robustq import experiments, methods, ptq, satnl

LATENT_RTOL = 1e-5  # satnl_latent: largest |f(theta) - W| allowed, relative to the layer's max |W|


def satnl_latent(result: experiments.Result) -> nn.Module:
    """``result``'s trained model back in SatNL's ``theta`` space (Park, Jang & Park, ECCV 2022,
    arXiv 2208.00338; forms [recon], :mod:`robustq.satnl`), for what training acted on: ASAM's
    perturbation of ``theta`` (:func:`robustq.analysis.asam_perturbation_by_magnitude`), gradients and curvature in
    ``theta``.

    A cached result holds plain weights ``W = f(theta)`` (``method.finalize`` folds SatNL) and no
    ``alpha``. Here ``alpha`` is recovered by replaying the start of training
    (``experiments._train_and_store``): ``seed_everything(seed)``, ``dataset_for`` (which draws
    from private generators only, not the global RNG), ``models.make_model`` and
    ``method.prepare``, which rebuilds the initial weights bit for bit and so each layer's
    ``alpha = alpha_mult * std(W_init)``; the cache key covers the training code and the torch
    version, so a cached result was trained by this same code. The global RNGs (python, numpy,
    torch) are restored afterwards. Each SatNL layer then gets that parametrization with
    ``theta = right_inverse(W)`` (large where ``|W|`` is near ``alpha``: expected near
    saturation). Returns an eval-mode copy; ``result.model`` is not touched.

    SatNL only: a QAT quantizer trained on top of it (``symreg_satnl_lsq``) is not restored. A
    method without SatNL gets a plain copy of its model (``ptq.materialize``), unchanged.

    Raises ``ValueError`` if the rebuilt layers do not fit the result's model, or if ``f(theta)``
    differs from the result's weights by more than ``LATENT_RTOL`` times the layer's max ``|W|``
    (``alpha`` below the trained weights: not recovered). The check cannot catch an ``alpha`` too
    large; the replay is what makes it right. Also raises for ``form="normalized_tanh"``:
    ``tanh(theta) / max|tanh(theta)|`` is unchanged by ``theta -> atanh(c tanh(theta))`` for every
    ``c`` in (0, 1], so the folded weights do not determine the trained ``theta``, nor ``f'``.
    """
    latent = ptq.materialize(result.model)
    exp = result.experiment.resolved()
    forms = [p.form for p in methods.make(exp.method, **exp.method_params).parts if isinstance(p, methods.SatNL)]
    if not forms:
        return latent
    if forms[0] == "normalized_tanh":
        raise ValueError(
            "satnl_latent cannot recover theta for form='normalized_tanh': W = tanh(theta)/max|tanh(theta)| "
            "does not change when tanh(theta) is scaled, so the folded weights do not determine theta"
        )
    initial = _initial_model(exp)
    layers = dict(ptq.weighted_layers(latent))
    for name, module in ptq.weighted_layers(initial):
        chain = module.parametrizations["weight"] if torch.nn.utils.parametrize.is_parametrized(module, "weight") else ()
        saturating = [p for p in chain if isinstance(p, satnl.SaturatingWeight)]
        if not saturating:
            continue
        layer = layers.get(name)
        if layer is None or layer.weight.shape != chain.original.shape:
            raise ValueError(f"satnl_latent: layer {name!r} of the rebuilt {exp.model!r} does not match the result's model")
        target = layer.weight.detach().clone()
        parametrization = copy.deepcopy(saturating[0]).to(device=target.device)
        torch.nn.utils.parametrize.register_parametrization(layer, "weight", parametrization)
        with torch.no_grad():
            error = float((layer.weight - target).abs().max())
        scale = float(target.abs().max())
        if not error <= LATENT_RTOL * scale:
            alpha = f" alpha={parametrization.alpha.item():.4g}" if parametrization.form == "scaled_tanh" else ""
            raise ValueError(
                f"satnl_latent: layer {name!r}: f(right_inverse(W)) differs from the result's weights by {error:.3g} "
                f"(max |W| {scale:.4g},{alpha} form={parametrization.form!r}): SatNL's parameters were not recovered"
            )
    if not satnl.has_satnl(latent):
        raise ValueError(f"satnl_latent: the rebuilt {exp.method!r} model has no SatNL layer")
    return latent.eval()


def _initial_model(exp: experiments.Experiment) -> nn.Module:
    """The prepared model of ``exp`` before its first step (:func:`robustq.experiments.prepared`,
    as training builds it); the caller's RNG states are kept."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
            return experiments.prepared(exp.resolved())[2]
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
