"""Post-training quantization of whole models, and the bit-width sweep every chapter evaluates with.

``quantize_model`` returns a fake-quantized copy deployed as book/methods.md §0 says: BatchNorm
unfolded (the papers' setting) or folded into the preceding conv, stem and classifier at 8 bits or
at the target bit-width, each conv/linear weight quantized by :func:`robustq.quant.quantize` (or,
for a QAT-trained model, by its own trained quantizer), optionally the input of each conv/linear
fake-quantized with ranges calibrated on a few training batches, and the PTQ fixes a training-time
method must beat: bias correction and BN re-estimation. ``bit_sweep`` evaluates a grid of these
settings as one tidy frame. The original model is never modified.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import itertools
from collections.abc import Callable, Iterable, Sequence

import pandas as pd
import torch
import torch.fx
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.fusion import fuse_conv_bn_eval

from robustq import adaround, qat, quant
from robustq.data import Dataset, Split, eval_loader, first_batch
from robustq.models import edge_layers, weighted_layers
from robustq.params import check_choice
from robustq.quant import QuantSpec
from robustq.train import EVAL_BATCH_SIZE, evaluate

FLOAT_BITS = 32  # how tidy frames label an unquantized tensor
LEARNED_ROUNDINGS = {"adaround": adaround.round_model, "block": adaround.round_blocks}
ROUNDINGS = ("nearest", *LEARNED_ROUNDINGS)  # how quantize_model rounds each weight onto its grid
TRAINED = "trained"  # bit_sweep's policy name for a QAT model's own quantizer


def fold_bn(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every ``BatchNorm2d`` folded into the ``Conv2d`` that
    feeds it: ``W' = W * gamma / sqrt(var + eps)``, ``b' = beta + (b - mean) * gamma / sqrt(var + eps)``
    (Krishnamoorthi 2018, arXiv 1806.08342, §2.5), computed by torch's
    ``torch.nn.utils.fusion.fuse_conv_bn_eval``. Outputs equal the original's in eval mode up to
    float rounding.

    A conv feeds a BN when, in an ``nn.Sequential`` (not overriding ``forward``), the conv is the
    child right before the BN: our ``ConvBN``, torchvision's ``Conv2dNormActivation`` and ResNet
    ``downsample``. A Sequential of just the pair becomes the fused conv (so ``ConvBN`` ``stem``
    folds to the conv ``stem``); otherwise the conv is replaced by the fused conv and the BN by
    ``nn.Identity``. The other BNs (torchvision ResNet's ``conv1``/``bn1`` attributes) are matched
    on the model's ``torch.fx`` graph: the BN's input must be the output of a conv that nothing else
    uses, each called once; the pair is replaced the same way, in the module tree, so module types,
    names and hooks other than the pair's stay. Raises ``ValueError`` for a BN that follows no conv
    (or if ``torch.fx`` cannot trace the model to tell).
    """
    folded = materialize(model)
    for parent in list(folded.modules()):
        for name, child in list(parent.named_children()):
            pair = list(child.children()) if _plain_sequential(child) else []
            if len(pair) == 2 and _foldable(*pair):
                setattr(parent, name, _fuse(*pair))
    for sequential in [m for m in folded.modules() if _plain_sequential(m)]:
        children = list(sequential.named_children())
        for (conv_name, conv), (bn_name, bn) in itertools.pairwise(children):
            if _foldable(conv, bn):
                setattr(sequential, conv_name, _fuse(conv, bn))
                setattr(sequential, bn_name, nn.Identity())
    left = [name for name, m in folded.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if left:
        _fold_traced(folded, left)
    return folded.eval()


def _plain_sequential(module: nn.Module) -> bool:
    # Only Sequential's own forward guarantees that each child's output is the next child's input.
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and bn.running_mean is not None
        and bn.num_features == conv.out_channels
    )


@torch.no_grad()
def _fuse(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    fused = fuse_conv_bn_eval(conv, bn)
    # A bias made from BN's buffers would not require grad; keep every fused parameter as trainable
    # as the conv's weight, as a freshly built conv would be.
    fused.bias.requires_grad_(fused.weight.requires_grad)
    return fused


def _fold_traced(model: nn.Module, norms: list[str]) -> None:
    """Fold each BN of ``norms`` into the conv feeding it in ``model``'s ``torch.fx`` graph, in place."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as error:  # fx raises TraceError, TypeError, ... on data-dependent code
        raise ValueError(
            f"cannot fold BatchNorm2d {norms}: they are not right after a Conv2d in an nn.Sequential, "
            f"and torch.fx cannot trace the model to find their conv ({error}); deploy with fold=False"
        ) from error
    modules = dict(model.named_modules())
    calls = collections.Counter(node.target for node in graph.nodes if node.op == "call_module")
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in norms or len(node.args) != 1 or node.kwargs:
            continue
        source = node.args[0]
        if (
            isinstance(source, torch.fx.Node) and source.op == "call_module" and len(source.users) == 1
            and calls[source.target] == calls[node.target] == 1
            and _foldable(modules[source.target], modules[node.target])
        ):
            model.set_submodule(source.target, _fuse(modules[source.target], modules[node.target]))
            model.set_submodule(node.target, nn.Identity())
    left = [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if left:
        raise ValueError(
            f"cannot fold BatchNorm2d {left}: each must have running statistics and take the output of a "
            "Conv2d that nothing else uses (BN after an addition or a ReLU has no conv to fold into); "
            "deploy with fold=False"
        )


def materialize(model: nn.Module) -> nn.Module:
    """An eval-mode copy whose parametrized weights (SatNL, QAT) are replaced by their values."""
    plain = copy.deepcopy(model).eval()
    for module in plain.modules():
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return plain



def quantize_model(
    model: nn.Module,
    w_spec: QuantSpec | None,
    a_spec: QuantSpec | None = None,
    calib: torch.Tensor | None = None,
    *,
    first_last_8bit: bool = True,
    fold: bool = False,
    bias_correction: bool = False,
    bn_reestimate: bool = False,
    trained_quantizers: dict[str, dict] | None = None,
    rounding: str = "nearest",
    rounding_config: adaround.AdaRoundConfig | None = None,
) -> nn.Module:
    """A fake-quantized copy of ``model``, deployed as book/methods.md §0 describes.

    * ``w_spec`` quantizes every conv/linear weight (per output channel along axis 0 when
      ``w_spec.per_channel``); ``None`` keeps weights in float. With ``trained_quantizers`` (a QAT
      model's :attr:`robustq.experiments.Result.quantizers`) the model's own trained quantizers are
      used instead, at ``w_spec.bit_width`` (only that field of ``w_spec`` counts).
    * ``fold=False`` (the papers' setting, the default) quantizes the conv weights as trained and
      keeps BatchNorm in float; ``fold=True`` folds BN into the convs first (integer inference).
    * ``first_last_8bit=True`` (the primary setting) keeps the stem conv and the classifier at 8
      bits; ``False`` quantizes every layer at the target bit-width.
    * ``a_spec`` quantizes the input of every conv/linear with ranges calibrated on ``calib`` (a
      normalised batch of training images); a layer whose calibration inputs are all >= 0 (after
      ReLU) gets an unsigned grid with zero point 0.
    * ``bn_reestimate`` (unfolded only) re-estimates BN statistics on ``calib`` after weight
      quantization (Nagel et al. 2022, arXiv 2203.11086); ``bias_correction`` then subtracts each
      output channel's mean shift on ``calib``, layer by layer (:func:`correct_bias`, Nagel et al.
      2019, arXiv 1906.04721). Both are the PTQ fixes a training-time method must beat.
    * ``rounding="adaround"`` learns each weight's rounding, layer by layer, on ``calib`` instead
      of rounding to nearest (AdaRound, Nagel et al. 2020, arXiv 2004.10568:
      :func:`robustq.adaround.round_model` with ``rounding_config``), on ``w_spec``'s grid;
      ``rounding="block"`` learns it block by block against each block's output (BRECQ, Li et al.
      2021, arXiv 2102.05426: :func:`robustq.adaround.round_blocks`). Neither for a QAT model's own
      quantizers.
    """
    check_choice("rounding", rounding, ROUNDINGS)
    learned = rounding in LEARNED_ROUNDINGS and w_spec is not None
    if (a_spec is not None or bias_correction or bn_reestimate or learned) and calib is None:
        raise ValueError(
            "a_spec, bias_correction, bn_reestimate and a learned rounding need calib: pass a batch "
            "of normalised training images, e.g. calib=calibration_batch(data)"
        )
    if learned and trained_quantizers:
        raise ValueError("a QAT model is deployed with its own quantizers: pass rounding='nearest'")
    if trained_quantizers and fold:
        raise ValueError("a QAT model's own quantizers act on unfolded weights: pass fold=False")
    if bn_reestimate and fold:
        raise ValueError("bn_reestimate needs the BatchNorm layers: pass fold=False")
    quantized = deployment(model, fold)
    reference = copy.deepcopy(quantized) if bias_correction or learned else None
    if w_spec is not None and trained_quantizers:
        qat.requantize(quantized, trained_quantizers, _edge_rule(quantized, w_spec.bit_width, first_last_8bit))
    elif learned:
        device = next(quantized.parameters()).device
        LEARNED_ROUNDINGS[rounding](quantized, reference, w_spec, calib.to(device), first_last_8bit=first_last_8bit,
                                    config=rounding_config or adaround.AdaRoundConfig())
    elif w_spec is not None:
        _quantize_weights(quantized, w_spec, first_last_8bit)
    if bn_reestimate:
        reestimate_bn(quantized, calib)
    if a_spec is not None:
        attach_activation_quantizers(quantized, calibrate(quantized, calib, a_spec))
    if bias_correction:
        correct_bias(quantized, reference, calib)
    return quantized.eval()


def _edge_rule(model: nn.Module, bit_width: int, first_last_8bit: bool):
    """``(layer name, trained bit-width) -> bit-width`` for re-quantizing a QAT model: edges at 8
    bits in the primary setting, every other layer at ``bit_width``."""
    edges = edge_layers(model, first_last_8bit)
    return lambda name, _trained: quant.edge_bits(bit_width) if name in edges else bit_width


@torch.no_grad()
def _quantize_weights(model: nn.Module, spec: QuantSpec, first_last_8bit: bool) -> None:
    edges = edge_layers(model, first_last_8bit)
    for name, module in weighted_layers(model):
        module.weight.copy_(quant.quantize(module.weight, quant.layer_spec(spec, name in edges), axis=0))


@torch.no_grad()
def reestimate_bn(model: nn.Module, calib: torch.Tensor, batch_size: int = 256) -> None:
    """Recompute every BatchNorm's running statistics of ``model`` (in place) as the plain average
    over ``calib`` in batches, after quantization changed the layers' outputs (Nagel et al. 2022,
    arXiv 2203.11086, §4.3)."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not norms:
        raise ValueError("the model has no BatchNorm to re-estimate (was it folded?): pass fold=False")
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the calibration batches
    model.train()
    device = next(model.parameters()).device
    for chunk in calib.split(batch_size):
        model(chunk.to(device))
    model.eval()


@torch.no_grad()
def correct_bias(quantized: nn.Module, reference: nn.Module, calib: torch.Tensor) -> None:
    """Empirical bias correction (Nagel et al. 2019, arXiv 1906.04721, §4.2), in place: layer by
    layer in module order, subtract from each output channel's bias the mean shift
    ``E[y_q] - E[y]`` of that layer's output on ``calib``, measured with the already-corrected
    quantized layers below it. Afterwards the logits' per-class mean on ``calib`` equals
    ``reference``'s (the same network in float) to float error. A conv without bias gets one."""
    device = next(quantized.parameters()).device
    target = _output_means(reference, calib.to(device))
    for name, layer in weighted_layers(quantized):
        shift = _output_means(quantized, calib.to(device), only=name)[name] - target[name]
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros_like(shift))
        layer.bias.sub_(shift)


class _LayerReached(Exception):
    """Raised by a forward hook once the only layer asked for has its output: the layers above it
    need not run."""


def _output_means(model: nn.Module, x: torch.Tensor, only: str | None = None) -> dict[str, torch.Tensor]:
    """Per conv/linear layer (or only ``only``), its output's mean per channel on ``x``."""
    means: dict[str, torch.Tensor] = {}

    def hook(name):
        def store(_module, _args, out):
            dims = [d for d in range(out.dim()) if d != 1]
            means[name] = out.double().mean(dim=dims).to(out.dtype)
            if name == only:
                raise _LayerReached

        return store

    layers = [(n, m) for n, m in weighted_layers(model) if only is None or n == only]
    handles = [m.register_forward_hook(hook(n)) for n, m in layers]
    try:
        model.eval()(x)
    except _LayerReached:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return means


@torch.no_grad()
def calibrate(model: nn.Module, calib: torch.Tensor, a_spec: QuantSpec) -> dict[str, tuple]:
    """Per conv/linear layer, the qparams of its input on the calibration batch."""
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_pre_hook(lambda _m, args, name=name: inputs.__setitem__(name, args[0].detach()))
        for name, module in weighted_layers(model)
    ]
    try:
        model.eval()(calib.to(next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    qparams = {}
    for name, x in inputs.items():
        spec = dataclasses.replace(a_spec, symmetric=False) if bool((x >= 0).all()) else a_spec
        qparams[name] = quant.choose_qparams(x, dataclasses.replace(spec, per_channel=False))
    return qparams


def attach_activation_quantizers(model: nn.Module, qparams: dict[str, tuple]) -> None:
    """Fake-quantize the input of each named layer with fixed, calibrated qparams."""
    for name, module in weighted_layers(model):
        module.register_forward_pre_hook(lambda _m, args, qp=qparams[name]: (quant.fake_quant(args[0], *qp),))


def calibration_batch(data: Dataset, size: int = 512, seed: int = 0) -> torch.Tensor:
    """``size`` normalised training images drawn with a seeded permutation (no augmentation)."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(data.train.labels), generator=generator)[:size]
    subset = Split(data.train.images[index], data.train.labels[index])
    return first_batch(data, subset, len(index))[0]


def accuracy(model: nn.Module, data: Dataset, split: str = "test", batch_size: int = EVAL_BATCH_SIZE) -> float:
    """Top-1 accuracy in [0, 1] on ``data.<split>``, in large batches.

    The pass runs on :func:`inference_copy`: BatchNorm fused into the conv before it, after the
    weights were quantized, so a model deployed with BN unfolded is still scored as deployed."""
    loader = eval_loader(data, split, batch_size, next(model.parameters()).device)
    return evaluate(inference_copy(model), loader)


def inference_copy(model: nn.Module) -> nn.Module:
    """``fold_bn(model)`` where it applies, else an eval-mode copy: the same function in exact
    arithmetic (outputs within float rounding), about a quarter faster on CPU, where the separate BN
    pass over every activation is memory-bound. Used only to compute outputs, never to quantize.
    A model without BatchNorm (already folded), or still parametrized (a QAT model during
    training), is returned as it is: there is nothing to fuse, or its weights are not plain yet."""
    modules = list(model.modules())
    if not any(isinstance(m, nn.BatchNorm2d) for m in modules) or any(map(parametrize.is_parametrized, modules)):
        return model
    try:
        return fold_bn(model)
    except ValueError:  # a BN with no conv to fuse into: evaluate the model as it is
        return materialize(model)


def bit_sweep(
    model: nn.Module,
    data: Dataset,
    w_bits: Sequence[int] = (8, 6, 5, 4, 3, 2),
    a_bits: Sequence[int | None] = (None,),
    *,
    symmetric: Iterable[bool] = (True,),
    per_channel: Iterable[bool] = (False,),
    policy: Iterable[str] = ("minmax",),
    fold: Iterable[bool] = (False,),
    first_last_8bit: Iterable[bool] = (True,),
    bias_correction: Iterable[bool] = (False,),
    rounding: Iterable[str] = ("nearest",),
    calib_size: int = 512,
    rounding_iterations: int = adaround.AdaRoundConfig.iterations,
    rounding_lr: float = adaround.AdaRoundConfig.lr,
    fp_acc: Callable[[bool], float] | None = None,
) -> pd.DataFrame:
    """Test accuracy of ``model`` quantized at every combination of the arguments.

    ``model`` is a module or a :class:`robustq.experiments.Result`; a QAT-trained result also
    accepts ``policy="trained"``: its own quantizers at each ``w_bits`` (cross-bit away from its
    target; LSQ's step carried, book/methods.md §7), unfolded. The defaults are the book's primary
    setting (book/methods.md §0): weights only, symmetric per-tensor min-max, BN unfolded, stem and
    classifier at 8 bits. One tidy row per combination, with ``acc`` and the float model's
    ``fp_acc`` (same deployment, unquantized); ``a_bits`` of ``FLOAT_BITS`` means float
    activations, else an asymmetric min-max spec calibrated on the float model. ``rounding``
    ``"adaround"`` (layer by layer) or ``"block"`` (block by block) learns the weights' rounding on
    the calibration batch (:func:`quantize_model`, ``rounding_iterations`` Adam steps of size
    ``rounding_lr`` per layer or block); a QAT model's own quantizer rounds to nearest only.
    ``fp_acc(folded)`` gives :func:`float_accuracy` where the caller keeps it (cached per model:
    :func:`robustq.experiments.sweep`); without it each deployment's float pass is computed here.
    """
    model, quantizers = _model_and_quantizers(model)
    policies = tuple(policy)
    if TRAINED in policies and not quantizers:
        raise ValueError("policy 'trained' needs a QAT-trained Result (experiments.run of a QAT method)")
    _check_bits(w_bits, a_bits)
    roundings = tuple(check_choice("rounding", r, ROUNDINGS) for r in rounding)
    rounding_config = adaround.AdaRoundConfig(iterations=rounding_iterations, lr=rounding_lr)
    calib = calibration_batch(data, calib_size)
    rows = []
    for folded in fold:
        deployed = deployment(model, folded)
        float_acc = fp_acc(folded) if fp_acc is not None else accuracy(deployed, data)
        act_qparams = {a: calibrate(deployed, calib, QuantSpec(a, symmetric=False)) for a in a_bits if a is not None}
        settings = itertools.product(symmetric, per_channel, policies, first_last_8bit, bias_correction, roundings,
                                     w_bits, a_bits)
        for sym, pc, pol, edges, corrected, rounded, w, a in settings:
            if pol == TRAINED and (folded or rounded != "nearest"):
                continue  # a QAT model's own quantizer acts on unfolded weights, rounding to nearest
            quantized = quantize_model(
                deployed, QuantSpec(w, sym, True, pc, "minmax" if pol == TRAINED else pol), fold=False,
                first_last_8bit=edges, bias_correction=corrected, calib=calib,
                trained_quantizers=quantizers if pol == TRAINED else None, rounding=rounded,
                rounding_config=rounding_config,
            )
            if a is not None:
                attach_activation_quantizers(quantized, act_qparams[a])
            rows.append(
                {"w_bits": w, "a_bits": a or FLOAT_BITS, "symmetric": sym, "per_channel": pc, "policy": pol,
                 "fold": folded, "first_last_8bit": edges, "bias_correction": corrected, "rounding": rounded,
                 "acc": accuracy(quantized, data), "fp_acc": float_acc}
            )
    return pd.DataFrame(rows)


def target_accuracy(model: nn.Module, data: Dataset, bit_width: int, split: str = "test") -> float:
    """Accuracy in [0, 1] on ``data.<split>`` at one weight bit-width in the book's primary setting
    (book/methods.md §0: symmetric per-tensor min-max, BN unfolded, stem and classifier at 8 bits):
    the score of checkpoint selection for a float-trained model (:mod:`robustq.experiments`)."""
    return accuracy(quantize_model(deployment(model, False), QuantSpec(bit_width)), data, split)


def deployment(model: nn.Module, folded: bool) -> nn.Module:
    """The float model as :func:`bit_sweep` deploys it: BN folded into the convs, or an eval-mode
    copy with plain weights."""
    return fold_bn(model) if folded else materialize(model)


def float_accuracy(model: nn.Module, data: Dataset, folded: bool = False) -> float:
    """``fp_acc`` of :func:`bit_sweep`: the accuracy of the float model deployed with BN folded
    or unfolded (``model``: a module or a :class:`robustq.experiments.Result`)."""
    return accuracy(deployment(_model_and_quantizers(model)[0], folded), data)


def _model_and_quantizers(model_or_result) -> tuple[nn.Module, dict[str, dict]]:
    if isinstance(model_or_result, nn.Module):
        return model_or_result, {}
    return model_or_result.model, getattr(model_or_result, "quantizers", {}) or {}


def _check_bits(w_bits: Sequence[int], a_bits: Sequence[int | None]) -> None:
    for bits in w_bits:
        quant.validate_bit_width(bits)
    for bits in a_bits:
        if bits is not None:
            quant.validate_bit_width(bits)
