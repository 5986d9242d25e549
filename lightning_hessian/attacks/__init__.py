"""Adversarial attacks in pure torch: FGSM, PGD (L-inf, L2) and the trust-region attack, plus metrics (robust
accuracy, perturbation size, boundary thickness).

Every attack is a function ``attack(model, x, y, eps, **options) -> x_adv`` that:

- takes a batch ``x`` of shape ``(N, ...)`` and int64 labels ``y`` of shape ``(N,)`` on any device, and returns
  detached adversarial inputs of the same shape, with ``||x_adv - x||_norm <= eps``;
- measures ``eps`` (and step sizes, radii, ``clamp``) in the units of ``x`` as the model receives it. For a
  model that normalises its inputs, attack in raw units by passing a model that includes the normalisation,
  e.g. ``nn.Sequential(Normalize(mean, std), net)``; then ``x`` and ``clamp=(0, 1)`` are raw pixel units. To
  attack standardised data directly, give ``clamp`` in standardised units (per channel ``c``,
  ``((0 - mean_c) / std_c, (1 - mean_c) / std_c)``) and ``eps`` in standardised units too;
- clamps to the valid input range ``clamp=(lo, hi)`` (None: no clamping), which must hold the clean ``x`` (up
  to rounding); ``lo`` and ``hi`` are numbers or per-channel sequences (dim 1 of ``x``), so standardised RGB
  data keeps each channel's own pixel range; it is never taken from the batch's own min/max;
- runs the model in eval mode and restores every module's mode afterwards (BatchNorm running statistics
  untouched), takes gradients w.r.t. the input only (parameters' ``.grad`` untouched), and works when
  called under ``torch.no_grad()`` or ``torch.inference_mode()`` (Lightning's validation loop);
- raises ``ValueError`` naming the argument for bad options (``eps <= 0``, ``steps < 1``, unknown ``norm``).

``model`` must return logits ``(N, K)``. Under DDP pass the wrapped module (``ddp_model.module``): attacks
run no parameter backward, which a DDP reducer would wait for.

Example::

    from functools import partial
    from lightning_hessian.attacks import boundary_thickness, pgd, trust_region, robust_accuracy, perturbation_norm

    x_adv = pgd(model, x, y, eps=0.1, steps=10, norm="linf", clamp=(0.0, 1.0))
    acc = robust_accuracy(model, partial(pgd, eps=0.1, clamp=(0.0, 1.0)), loader)
    x_tr = trust_region(model, x, y, norm="l2", clamp=(0.0, 1.0))       # unbounded minimal perturbation
    absolute, relative = perturbation_norm(x, x_tr, "l2")
    thick = boundary_thickness(model, x, y, eps=2.0, clamp=(0.0, 1.0))  # thick.mean, thick.std_error
"""

from lightning_hessian.attacks.fgsm import fgsm
from lightning_hessian.attacks.metrics import (
    PerturbationNorm,
    attack_success_rate,
    perturbation_norm,
    robust_accuracy,
)
from lightning_hessian.attacks.pgd import pgd
from lightning_hessian.attacks.thickness import Thickness, boundary_thickness, targeted_log_odds
from lightning_hessian.attacks.thickness_metric import BoundaryThickness, ThicknessStats
from lightning_hessian.attacks.trust_region import trust_region

__all__ = [
    "BoundaryThickness",
    "PerturbationNorm",
    "Thickness",
    "ThicknessStats",
    "attack_success_rate",
    "boundary_thickness",
    "fgsm",
    "perturbation_norm",
    "pgd",
    "robust_accuracy",
    "targeted_log_odds",
    "trust_region",
]

