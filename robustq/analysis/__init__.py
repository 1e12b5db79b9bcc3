"""Measurements behind the chapters: pure functions, tensors and models in, tidy frames out.

One module per topic; every public name is re-exported here, so ``analysis.bias_drift(...)`` works
as it always has. The package sits below the runner: none of its modules imports
:mod:`robustq.experiments` (nor ``book``, ``book_settings``, ``grid``, ``comparison``).
:func:`robustq.latent.satnl_latent`, which takes an ``experiments.Result``, lives beside the runner.

* :mod:`~robustq.analysis.propagation` (chapter 01; Park, Jang & Park, ECCV 2022, arXiv 2208.00338,
  insight 1): layer outputs (:func:`layer_io`, :func:`layer_outputs`, :func:`quantize_layers`),
  metrics (:func:`kl_divergence`, :func:`mean_shift`, :func:`signed_shift`, :func:`relative_mse`,
  :func:`sqnr_db`), error propagation (:func:`error_propagation`, :func:`propagation_grid`,
  :func:`sqnr_drop`, :func:`bias_drift`, :func:`layer_shifts`), the analytic link
  (:func:`weight_error_mean`, :func:`shift_prediction`) and weight symmetry
  (:func:`weight_symmetry`, :func:`weight_tails`)
* :mod:`~robustq.analysis.clipping` (chapters 00, 02; insight 2): :func:`clip_curve`,
  :func:`model_clip_curves`, :func:`optimal_ratio`, :func:`default_ratios`,
  :func:`minmax_log_excess`, :func:`policy_grid`, :func:`policy_spread`, :func:`spearman`
* :mod:`~robustq.analysis.flatness` (chapter 04; insight 3: magnitude buckets, flatness, ASAM):
  :func:`magnitude_quartile_masks`, :func:`magnitude_sensitivity`, :func:`quartile_contrast`,
  :func:`hessian_power_iteration`, :func:`hessian_top_eigenvalue`, :func:`noise_robustness`,
  :func:`asam_perturbation_by_magnitude`
* :mod:`~robustq.analysis.gradients` (chapter 05, Alizadeh et al. 2020, book/methods.md §2; chapter
  07, book/methods.md §4): :func:`grad_l1_norm`, :func:`first_order_bound`,
  :func:`ste_gradient_decomposition`
* :mod:`~robustq.analysis.oscillations` (chapters 06, 07, book/methods.md §3, §4):
  :func:`grid_distance`, :func:`distance_to_grid`, :func:`integer_levels`,
  :class:`OscillationTracker`, :class:`WeightTrajectory`
"""

from robustq.analysis.clipping import (
    clip_curve,
    default_ratios,
    minmax_log_excess,
    model_clip_curves,
    optimal_ratio,
    policy_grid,
    policy_spread,
    spearman,
)
from robustq.analysis.flatness import (
    HESSIAN_PARAMETERS,
    asam_perturbation_by_magnitude,
    hessian_power_iteration,
    hessian_top_eigenvalue,
    magnitude_quartile_masks,
    magnitude_sensitivity,
    noise_robustness,
    quartile_contrast,
)
from robustq.analysis.gradients import first_order_bound, grad_l1_norm, ste_gradient_decomposition
from robustq.analysis.oscillations import (
    GRID_DOMAINS,
    OSCILLATION_MOMENTUM,
    OSCILLATION_THRESHOLD,
    OscillationTracker,
    WeightTrajectory,
    distance_to_grid,
    grid_distance,
    integer_levels,
)
from robustq.analysis.propagation import (
    KL_BINS,
    KL_EPS,
    KL_MAX_BINS,
    KL_MAX_SAMPLES,
    MODES,
    STD_EPS,
    bias_drift,
    error_propagation,
    kl_divergence,
    layer_io,
    layer_outputs,
    layer_shifts,
    mean_shift,
    propagation_grid,
    quantize_layers,
    relative_mse,
    shift_prediction,
    signed_shift,
    sqnr_db,
    sqnr_drop,
    varying_positions,
    weight_error_mean,
    weight_symmetry,
    weight_tails,
)

__all__ = [  # every public name of the package's modules
    "GRID_DOMAINS", "HESSIAN_PARAMETERS", "KL_BINS", "KL_EPS", "KL_MAX_BINS", "KL_MAX_SAMPLES", "MODES",
    "OSCILLATION_MOMENTUM", "OSCILLATION_THRESHOLD", "STD_EPS", "OscillationTracker", "WeightTrajectory",
    "asam_perturbation_by_magnitude", "bias_drift", "clip_curve", "default_ratios", "distance_to_grid",
    "error_propagation", "first_order_bound", "grad_l1_norm", "grid_distance", "hessian_power_iteration",
    "hessian_top_eigenvalue", "integer_levels", "kl_divergence", "layer_io", "layer_outputs",
    "layer_shifts", "magnitude_quartile_masks", "magnitude_sensitivity", "mean_shift", "minmax_log_excess",
    "model_clip_curves", "noise_robustness", "optimal_ratio", "policy_grid", "policy_spread",
    "propagation_grid", "quantize_layers", "quartile_contrast", "relative_mse", "shift_prediction",
    "signed_shift", "spearman", "sqnr_db", "sqnr_drop", "ste_gradient_decomposition", "varying_positions",
    "weight_error_mean", "weight_symmetry", "weight_tails",
]
