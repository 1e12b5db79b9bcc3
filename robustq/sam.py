"""Sharpness-aware minimization: SAM (Foret et al., ICLR 2021, arXiv 2010.01412) and ASAM
(Kwon et al., ICML 2021, arXiv 2102.11600), wrapped around any torch optimizer.

The training loop drives the two steps itself::

    loss.backward(); sam.first_step(); sam.zero_grad()
    closure().backward(); sam.second_step()

``first_step`` moves every parameter to ``w + eps`` (the approximate worst case within radius
``rho``), ``second_step`` puts the original weights back and lets the base optimizer step with
the gradient taken at ``w + eps``. ``param_groups``, ``state_dict`` and ``load_state_dict``
belong to the base optimizer, so LR schedulers and checkpoints work on ``sam.base_optimizer``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from robustq.params import check_choice

SAM_KINDS = ("sam", "asam")
DEFAULT_RHO = {"sam": 0.05, "asam": 0.5}  # SAM paper's default; ASAM paper's CIFAR value
DEFAULT_ETA = 0.01
_NORM_EPS = 1e-12


class SAM:
    """SAM (Foret et al., arXiv 2010.01412, §2) and ASAM (Kwon et al., arXiv 2102.11600).

    [paper] SAM perturbs by ``eps = rho * g / ||g||`` (the p = 2 solution of SAM's inner
    maximisation); ASAM (``adaptive=True``) by
    ``eps = rho * T^2 g / ||T g||`` with ``T = |w| + eta`` elementwise, ``g`` the gradient over all
    parameters at once (one global norm). Our deviation: ASAM's reference code applies ``T`` only
    to parameters whose name contains ``"weight"`` (``T = 1`` for biases); this class does not
    see names and applies ``T`` to every parameter passed in ``params``.

    ``rho=None`` means ``DEFAULT_RHO``: 0.05 for SAM, 0.5 for ASAM. Parameters whose ``.grad`` is
    ``None`` at ``first_step`` are neither perturbed nor counted in the norm.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer: torch.optim.Optimizer,
        rho: float | None = None,
        adaptive: bool = False,
        eta: float = DEFAULT_ETA,
    ) -> None:
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(
                "base_optimizer must be a torch.optim.Optimizer instance, "
                f"got {type(base_optimizer).__name__}"
            )
        rho = DEFAULT_RHO["asam" if adaptive else "sam"] if rho is None else rho
        if not rho >= 0:
            raise ValueError(f"rho must be >= 0, got {rho!r}")
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0, got {eta!r}")
        self.params = _flatten_params(params)
        if not self.params:
            raise ValueError("params must hold at least one parameter, got none")
        self.base_optimizer = base_optimizer
        self.rho = float(rho)
        self.adaptive = bool(adaptive)
        self.eta = float(eta)
        self.perturbations: dict[torch.Tensor, torch.Tensor] = {}
        self._originals: dict[torch.Tensor, torch.Tensor] = {}
        self._perturbed = False

    @torch.no_grad()
    def first_step(self) -> None:
        """SAM/ASAM ascent step (Foret et al. §2; Kwon et al.): move each parameter that has a
        gradient to ``w + eps`` and remember ``eps`` (in ``self.perturbations``) and ``w``."""
        if self._perturbed:
            raise RuntimeError("first_step called twice without second_step in between")
        self._perturbed = True
        self.perturbations = {}
        with_grad = [p for p in self.params if p.grad is not None]
        if not with_grad:
            return
        steps = perturbations(with_grad, [p.grad for p in with_grad], self.rho, self.adaptive, self.eta)
        for p, eps in zip(with_grad, steps):
            self._originals[p] = p.detach().clone()
            self.perturbations[p] = eps
            p.add_(eps)

    @torch.no_grad()
    def second_step(self) -> None:
        """SAM/ASAM descent step (Foret et al. §2; Kwon et al.): restore the weights saved by
        ``first_step`` exactly (a copy, not ``w + eps - eps``), then step the base optimizer with
        the gradients now in ``.grad`` (taken at ``w + eps``)."""
        if not self._perturbed:
            raise RuntimeError("second_step called without first_step before it")
        for p, original in self._originals.items():
            p.copy_(original)
        self._originals.clear()
        self._perturbed = False
        self.base_optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Delegates to the base optimizer."""
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The base optimizer's param groups (the same list, so LR changes apply to it)."""
        return self.base_optimizer.param_groups

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (SAM itself keeps no state between steps)."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Delegates to the base optimizer."""
        self.base_optimizer.load_state_dict(state_dict)

    def __repr__(self) -> str:
        kind = "ASAM" if self.adaptive else "SAM"
        return f"{kind}(rho={self.rho}, eta={self.eta}, base_optimizer={type(self.base_optimizer).__name__})"


@torch.no_grad()
def perturbations(
    params: list[torch.Tensor], grads: list[torch.Tensor], rho: float, adaptive: bool, eta: float = DEFAULT_ETA
) -> list[torch.Tensor]:
    """The ascent step of SAM (Foret et al., arXiv 2010.01412, eq. 2), ``eps = rho g / ||g||``, or
    of ASAM (Kwon et al., arXiv 2102.11600, eq. 9) with ``adaptive=True``,
    ``eps = rho T^2 g / ||T g||`` with ``T = |w| + eta`` elementwise; one global norm over every
    ``(param, grad)`` pair. :class:`SAM` steps with it; :mod:`robustq.analysis` measures it."""
    preconditioners = [p.abs() + eta if adaptive else 1.0 for p in params]
    norm = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(t * g) for t, g in zip(preconditioners, grads)])
    )
    return [(rho / (norm + _NORM_EPS)) * (t * t * g) for t, g in zip(preconditioners, grads)]


def make_sam(
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    base_optimizer: torch.optim.Optimizer,
    kind: str = "sam",
    rho: float | None = None,
) -> SAM:
    """SAM (Foret et al., arXiv 2010.01412) for ``kind="sam"`` or ASAM (Kwon et al.,
    arXiv 2102.11600, ``eta = 0.01``) for ``kind="asam"``; ``rho=None`` takes the kind's default
    (0.05 for SAM, 0.5 for ASAM, the ASAM paper's CIFAR value)."""
    check_choice("kind", kind, SAM_KINDS)
    return SAM(params, base_optimizer, rho=DEFAULT_RHO[kind] if rho is None else rho, adaptive=kind == "asam")


def _flatten_params(params: Iterable[torch.Tensor] | Iterable[dict[str, Any]]) -> list[torch.Tensor]:
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors or of param-group dicts, got a single tensor")
    flat: list[torch.Tensor] = []
    for item in params:
        flat.extend(item["params"] if isinstance(item, dict) else [item])
    return flat
