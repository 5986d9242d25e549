"""Boundary thickness (Yang et al., "Boundary thickness and robustness in learning models", NeurIPS 2020).

For a sample ``x`` of class ``i`` and a target class ``j``, let ``x'`` be an adversarial point of class ``j``. The
sample's thickness is the length of the part of the segment from ``x`` to ``x'`` on which the softmax margin
``p_i - p_j`` lies strictly between ``alpha`` and ``beta``::

    T(x) = ||x' - x||_2 * integral_0^1 1{alpha < p_i(x(t)) - p_j(x(t)) < beta} dt,   x(t) = x + t (x' - x)

and the boundary thickness of a model is the mean of ``T`` over samples. A thin boundary passes from a confident
``i`` to a confident ``j`` over a short distance; the paper links thick boundaries to robustness, and shows that
adversarial training, mixup and noisy mixup thicken them.

The choices made here, and why:

- ``x'`` is a targeted L2 PGD towards ``j`` (descending the cross-entropy of ``j``) started at ``x`` itself, as in
  the paper's measurements; without a random start the segment of a linear model runs along its weight
  difference, and the only randomness is the choice of ``j``. Lengths are L2, the norm of the attack. The steps
  follow :func:`targeted_log_odds`, whose gradient has the cross-entropy's direction (so the iterates are the
  same in exact arithmetic) but keeps it in float32 once ``p_j`` is near 1, where the cross-entropy's does not.
- ``j`` is drawn uniformly among the classes other than ``i`` (seeded), the paper's random wrong label, or given.
- ``i`` is the class ``y`` given: the paper's definition takes the model's prediction at ``x``
  (``y = model(x).argmax(1)``, what ``BoundaryThickness`` and the callback do by default), which measures the
  model's own boundaries whatever its accuracy; with the labels, a misclassified sample whose ``p_y`` and ``p_j``
  are both small sits in the band from the start, so inaccurate models look thicker.
- The attack and the segment stay inside the valid input range ``clamp`` (the range is convex, so the segment
  between two valid points is valid), never the batch's own min/max.
- The integral is the midpoint rule on ``num_points`` cells: for a band crossed once (as on a linear model)
  the error is at most one cell, ``||x' - x|| / num_points``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from lightning_hessian.attacks._common import Range, check_batch, check_clamp, check_eps
from lightning_hessian.attacks.pgd import pgd
from lightning_hessian.checks import check_number, check_positive_int
from lightning_hessian.modes import training_mode

_INPUTS_PER_FORWARD = 4096  # points of several segments share one forward pass, up to this many inputs


class Thickness(NamedTuple):
    """Boundary thickness of a batch: ``mean`` and its ``std_error`` (0-dim; nan for one sample), ``per_sample``
    thickness ``(N,)`` and ``reached`` ``(N,)`` (bool): whether the model classifies ``x'`` as the target class."""

    mean: torch.Tensor
    std_error: torch.Tensor
    per_sample: torch.Tensor
    reached: torch.Tensor


def check_band(alpha: float, beta: float) -> tuple[float, float]:
    """``(alpha, beta)`` as floats, or a ``ValueError`` unless ``-1 <= alpha < beta <= 1`` (a margin of two
    probabilities lies in ``[-1, 1]``).

    >>> check_band(0, 0.75)
    (0.0, 0.75)
    >>> check_band(0.5, 0.5)
    Traceback (most recent call last):
    ...
    ValueError: need alpha < beta for the band alpha < p_i - p_j < beta, got alpha=0.5, beta=0.5
    """
    alpha, beta = check_number(alpha, "alpha", -1, 1), check_number(beta, "beta", -1, 1)
    if not alpha < beta:
        raise ValueError(f"need alpha < beta for the band alpha < p_i - p_j < beta, got alpha={alpha}, beta={beta}")
    return alpha, beta


def targeted_log_odds(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``sum_n [log sum_{k != j} exp(z_k) - z_j]`` with ``j = targets[n]``: the log-odds against the target class.

    The cross-entropy of ``j`` is ``softplus`` of it, so per sample their gradients differ by a positive factor and
    normalised (L2 PGD) steps agree. The cross-entropy's gradient ``p - e_j`` is computed with ``p_j - 1``, which
    rounds to 0 in float32 once the other classes hold less than about 1e-7, leaving the step's direction to
    rounding; this one's, ``softmax over k != j`` minus ``e_j``, has entries of order 1 at any confidence.

    Example::

        >>> import torch
        >>> from lightning_hessian.attacks import targeted_log_odds
        >>> logits, targets = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([0])
        >>> odds = targeted_log_odds(logits, targets)  # log(e^0 + e^0) - 2
        >>> round(odds.item(), 4), torch.allclose(torch.nn.functional.softplus(odds),
        ...                                       torch.nn.functional.cross_entropy(logits, targets))
        (-1.3069, True)
    """
    others = logits.scatter(1, targets[:, None], -math.inf)
    return (others.logsumexp(1) - logits.gather(1, targets[:, None]).squeeze(1)).sum()


def boundary_thickness(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    alpha: float = 0.0,
    beta: float = 0.75,
    targets: torch.Tensor | None = None,
    steps: int = 20,
    step_size: float | None = None,
    num_points: int = 128,
    clamp: Range | None = None,
    generator: torch.Generator | None = None,
) -> Thickness:
    """Boundary thickness of ``model`` around the samples ``x`` of classes ``y`` (see the module docstring).

    Args:
        model: maps ``x`` to logits ``(N, K)``, ``K >= 2``; run in eval mode, its modes restored afterwards.
        x: inputs ``(N, ...)`` of any shape, in the units the model takes (``eps``, ``step_size``, ``clamp`` too).
        y: int64 classes ``i`` ``(N,)``: the model's predictions at ``x`` (the paper's definition) or the labels.
        eps: L2 radius of the targeted PGD that finds ``x'``; the thickness of a sample is at most ``eps``.
        alpha, beta: the band ``alpha < p_i - p_j < beta`` (the paper's 0 and 0.75).
        targets: int64 target classes ``j`` ``(N,)``, each unlike ``y``; None draws them uniformly among the
            other classes from ``generator``.
        steps, step_size: PGD steps and step length (default ``2.5 * eps / steps``).
        num_points: midpoint-rule cells along each segment.
        clamp: valid input range ``(lo, hi)``, numbers or per-channel sequences; None for no clamping.
        generator: CPU random source of the targets (reproducible on any device).

    Returns:
        :class:`Thickness`: the mean, its standard error, the per-sample values and whether ``x'`` reached ``j``.

    Example::

        >>> import torch
        >>> from lightning_hessian.attacks import boundary_thickness
        >>> model = torch.nn.Linear(2, 2, bias=False)  # class 0 where x_0 > 0, class 1 where x_0 < 0
        >>> model.weight.data = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
        >>> x, y = torch.tensor([[0.5, 0.0], [-0.3, 0.0]]), torch.tensor([0, 1])
        >>> thick = boundary_thickness(model, x, y, eps=10.0, num_points=512)
        >>> # p_i - p_j = tanh(|x_0|): each segment is in the band 0 < p_i - p_j < 0.75 from x to the boundary
        >>> [round(t, 1) for t in thick.per_sample.tolist()], thick.reached.tolist()
        ([0.5, 0.3], [True, True])
    """
    eps = check_eps(eps)
    alpha, beta = check_band(alpha, beta)
    check_positive_int(steps, "steps")
    num_points = check_positive_int(num_points, "num_points")
    check_batch(x, y)
    check_clamp(clamp, x)
    with training_mode(model, False), torch.inference_mode(False), torch.no_grad():
        num_classes = _num_classes(model, x[:1].clone())
    targets = _targets(y, targets, num_classes, generator)
    x_adv = pgd(model, x, targets, eps, steps=steps, step_size=step_size, norm="l2", random_start=False,
                clamp=clamp, loss_fn=targeted_log_odds, targeted=True)
    with training_mode(model, False), torch.inference_mode(False), torch.no_grad():
        x, x_adv = x.clone(), x_adv.clone()
        inside = _share_in_band(model, x, x_adv, y, targets, alpha, beta, num_points)
        reached = model(x_adv).argmax(1) == targets
    per_sample = (x_adv - x).flatten(1).norm(dim=1) * inside
    n = per_sample.numel()
    std_error = per_sample.std() / math.sqrt(n) if n > 1 else per_sample.new_tensor(math.nan)
    return Thickness(per_sample.mean(), std_error, per_sample, reached)


def _num_classes(model: nn.Module, x: torch.Tensor) -> int:
    logits = model(x)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[1] < 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"model must return logits of shape (N, K>=2) for boundary thickness, got {shape}")
    return logits.shape[1]


def _targets(
    y: torch.Tensor, targets: torch.Tensor | None, num_classes: int, generator: torch.Generator | None
) -> torch.Tensor:
    if not bool(((y >= 0) & (y < num_classes)).all()):
        raise ValueError(f"y must hold classes in [0, {num_classes}) (the model returns {num_classes} logits)")
    if targets is None:
        offsets = torch.randint(1, num_classes, y.shape, generator=generator, device="cpu")
        return (y + offsets.to(y.device)) % num_classes
    if (not isinstance(targets, torch.Tensor) or targets.dtype != torch.int64 or targets.shape != y.shape
            or not bool(((targets >= 0) & (targets < num_classes) & (targets != y.to(targets.device))).all())):
        raise ValueError(f"targets must be an int64 tensor of shape {tuple(y.shape)} holding classes in "
                         f"[0, {num_classes}) other than y, got {targets!r}")
    return targets.to(y.device)


def _share_in_band(
    model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, i: torch.Tensor, j: torch.Tensor,
    alpha: float, beta: float, num_points: int,
) -> torch.Tensor:
    """Per sample, the share of the midpoints ``t = (k + 1/2) / num_points`` of the segment where
    ``alpha < p_i - p_j < beta``."""
    n = x.shape[0]
    direction = x_adv - x
    ts = (torch.arange(num_points, dtype=x.dtype, device=x.device) + 0.5) / num_points
    chunk = max(1, _INPUTS_PER_FORWARD // max(n, 1))
    count = torch.zeros(n, dtype=torch.int64, device=x.device)
    for start in range(0, num_points, chunk):
        t = ts[start:start + chunk]
        points = x[None] + t.view(-1, *([1] * x.dim())) * direction[None]
        p = model(points.flatten(0, 1)).softmax(dim=1).view(len(t), n, -1)
        margin = p.gather(2, i.view(1, n, 1).expand(len(t), n, 1)) - p.gather(2, j.view(1, n, 1).expand(len(t), n, 1))
        count += ((margin > alpha) & (margin < beta)).squeeze(2).sum(0)
    return count.to(x.dtype) / num_points
