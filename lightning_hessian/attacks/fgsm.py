"""Fast Gradient Sign Method (Goodfellow, Shlens, Szegedy, ICLR 2015)."""

from __future__ import annotations

import torch
from torch import nn

from lightning_hessian.attacks._common import (
    Criterion,
    Range,
    adversarial_result,
    attack_context,
    check_batch,
    check_clamp,
    check_eps,
    detached_copy,
    input_grad,
)


def fgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    loss_fn: Criterion | None = None,
    clamp: Range | None = None,
    targeted: bool = False,
) -> torch.Tensor:
    """One signed-gradient step of size ``eps`` (L-inf): ``x + eps * sign(grad_x loss)``, clamped to ``clamp``.

    Args:
        model: maps ``x`` to logits; run in eval mode, its mode and buffers restored afterwards.
        x: clean inputs ``(N, ...)``, in the units the model takes (``eps`` and ``clamp`` are in these units).
        y: int64 labels ``(N,)``; with ``targeted=True`` the classes to move towards.
        eps: L-inf radius, > 0.
        loss_fn: ``loss_fn(logits, y) -> scalar`` summed or averaged over samples; default cross-entropy.
        clamp: valid input range ``(lo, hi)``, numbers or per-channel sequences; None for no clamping.
        targeted: descend the loss towards ``y`` instead of ascending it away from ``y``.

    Returns:
        Detached adversarial inputs with ``||x_adv - x||_inf <= eps``.

    Example::

        >>> import torch
        >>> from lightning_hessian.attacks import fgsm
        >>> model = torch.nn.Linear(2, 2, bias=False)  # class 0 where x_0 > 0, class 1 where x_0 < 0
        >>> model.weight.data = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
        >>> x, y = torch.tensor([[0.5, 0.0], [-0.3, 0.0]]), torch.tensor([0, 1])
        >>> fgsm(model, x, y, eps=0.2)  # each sample steps eps towards the boundary x_0 = 0 (x_1 has no gradient)
        tensor([[ 0.3000,  0.0000],
                [-0.1000,  0.0000]])
    """
    eps = check_eps(eps)
    check_batch(x, y)
    clamp = check_clamp(clamp, x)
    with attack_context(model):
        x, y = detached_copy(x), detached_copy(y)
        step = input_grad(model, x, y, loss_fn).sign() * eps
        return adversarial_result(x - step if targeted else x + step, x, eps, "linf", clamp)
