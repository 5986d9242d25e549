"""Projected Gradient Descent attack (Madry et al., ICLR 2018), L-inf and L2."""

from __future__ import annotations

import torch
from torch import nn

from lightning_hessian.attacks._common import (
    Criterion,
    Range,
    adversarial_result,
    as_column,
    ascent_direction,
    attack_context,
    check_batch,
    check_clamp,
    check_eps,
    check_norm,
    detached_copy,
    input_grad,
    into_range,
    project,
)
from lightning_hessian.checks import check_positive_int


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    steps: int = 10,
    step_size: float | None = None,
    norm: str = "linf",
    random_start: bool = True,
    clamp: Range | None = None,
    loss_fn: Criterion | None = None,
    targeted: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``steps`` steepest-ascent steps on the loss, each projected back onto the ``eps``-ball and ``clamp``.

    Args:
        model: maps ``x`` to logits; run in eval mode, its mode and buffers restored afterwards.
        x: clean inputs ``(N, ...)``, in the units the model takes (``eps``, ``step_size``, ``clamp`` too).
        y: int64 labels ``(N,)``; with ``targeted=True`` the classes to move towards.
        eps: radius of the ``norm``-ball around ``x``, > 0.
        steps: number of gradient steps, >= 1.
        step_size: length of each step in ``norm``; default ``2.5 * eps / steps`` (Madry et al.).
        norm: ``"linf"`` (signed-gradient steps) or ``"l2"`` (normalised-gradient steps).
        random_start: start from a uniform point of the L-inf ball, or for L2 from a random direction at a
            uniform random radius in ``[0, eps]``.
        clamp: valid input range ``(lo, hi)``, numbers or per-channel sequences; None for no clamping.
        loss_fn: ``loss_fn(logits, y) -> scalar`` summed or averaged over samples; default cross-entropy.
        targeted: descend the loss towards ``y`` instead of ascending it away from ``y``.
        generator: random source of the start (on ``x``'s device) for reproducible attacks.

    Returns:
        Detached adversarial inputs with ``||x_adv - x||_norm <= eps`` inside ``clamp``.

    Example::

        >>> import torch
        >>> from lightning_hessian.attacks import pgd
        >>> model = torch.nn.Linear(2, 2, bias=False)  # class 0 where x_0 > 0, class 1 where x_0 < 0
        >>> model.weight.data = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
        >>> x, y = torch.tensor([[0.5, 0.0], [-0.3, 0.0]]), torch.tensor([0, 1])
        >>> x_adv = pgd(model, x, y, eps=0.4, norm="l2", random_start=False)  # 10 steps of 0.1, then projected
        >>> x_adv, model(x_adv).argmax(1)  # the second sample (0.3 from the boundary) crossed it
        (tensor([[0.1000, 0.0000],
                [0.1000, 0.0000]]), tensor([0, 0]))
    """
    eps = check_eps(eps)
    steps = check_positive_int(steps, "steps")
    step_size = 2.5 * eps / steps if step_size is None else check_eps(step_size, "step_size")
    norm = check_norm(norm)
    check_batch(x, y)
    clamp = check_clamp(clamp, x)
    sign = -1.0 if targeted else 1.0
    with attack_context(model):
        x, y = detached_copy(x), detached_copy(y)
        x_adv = x
        if random_start:
            x_adv = into_range(x + _random_delta(x, eps, norm, generator), clamp)
        for _ in range(steps):
            grad = input_grad(model, x_adv, y, loss_fn)
            delta = x_adv + (sign * step_size) * ascent_direction(grad, norm) - x
            x_adv = into_range(x + project(delta, eps, norm), clamp)
        return adversarial_result(x_adv, x, eps, norm, clamp)


def _random_delta(x: torch.Tensor, eps: float, norm: str, generator: torch.Generator | None) -> torch.Tensor:
    if norm == "linf":
        return torch.empty_like(x).uniform_(-eps, eps, generator=generator)
    direction = ascent_direction(torch.empty_like(x).normal_(generator=generator), "l2")
    radius = torch.empty(x.shape[0], dtype=x.dtype, device=x.device).uniform_(0, eps, generator=generator)
    return direction * as_column(radius, x)
