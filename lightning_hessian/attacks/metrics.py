"""How well an attack worked: success rate, perturbation size, accuracy under attack."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import nn

from lightning_hessian.attacks._common import Attack, check_batch, check_norm, per_sample_norm, predict


def attack_success_rate(
    model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, *, x: torch.Tensor | None = None
) -> torch.Tensor:
    """Fraction of ``x_adv`` the model misclassifies (0-dim tensor; nan if no sample counts).

    With the clean ``x``, only samples the model classifies correctly on ``x`` count, the usual definition for
    minimal-perturbation attacks such as :func:`~lightning_hessian.attacks.trust_region`.

    Example::

        >>> import torch
        >>> from lightning_hessian.attacks import attack_success_rate, fgsm
        >>> model = torch.nn.Linear(2, 2, bias=False)  # class 0 where x_0 > 0, class 1 where x_0 < 0
        >>> model.weight.data = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
        >>> x, y = torch.tensor([[0.5, 0.0], [-0.3, 0.0]]), torch.tensor([0, 1])
        >>> x_adv = fgsm(model, x, y, eps=0.4)  # 0.5 -> 0.1 stays class 0; -0.3 -> 0.1 crosses
        >>> attack_success_rate(model, x_adv, y)
        tensor(0.5000)
    """
    check_batch(x_adv, y)
    wrong = predict(model, x_adv) != y
    if x is None:
        return wrong.float().mean()
    if x.shape != x_adv.shape:
        raise ValueError(f"x must have the shape of x_adv {tuple(x_adv.shape)}, got {tuple(x.shape)}")
    correct = predict(model, x) == y
    return wrong[correct].float().mean()


class PerturbationNorm(NamedTuple):
    """Mean ``||x_adv - x||`` (``absolute``) and mean ``||x_adv - x|| / ||x||`` (``relative``), 0-dim tensors."""

    absolute: torch.Tensor
    relative: torch.Tensor


def perturbation_norm(
    x: torch.Tensor, x_adv: torch.Tensor, norm: str = "l2", *, mask: torch.Tensor | None = None
) -> PerturbationNorm:
    """Mean absolute and relative perturbation size in ``norm`` (``"linf"`` or ``"l2"``) over the batch.

    ``mask`` (bool ``(N,)``) restricts the means to some samples, e.g. the successfully attacked ones.

    Example::

        >>> import torch
        >>> from lightning_hessian.attacks import perturbation_norm
        >>> x = torch.tensor([[0.5, 0.0], [-0.3, 0.0]])
        >>> perturbation_norm(x, x + 0.4, "linf")  # relative: (0.4 / 0.5 + 0.4 / 0.3) / 2
        PerturbationNorm(absolute=tensor(0.4000), relative=tensor(1.0667))
    """
    check_norm(norm)
    if x.shape != x_adv.shape or x.dim() < 2:
        raise ValueError(f"x and x_adv must share one (N, ...) shape, got {tuple(x.shape)} and {tuple(x_adv.shape)}")
    absolute = per_sample_norm(x_adv - x, norm)
    relative = absolute / per_sample_norm(x, norm)
    if mask is not None:
        if mask.dtype != torch.bool or mask.shape != x.shape[:1]:
            raise ValueError(
                f"mask must be a bool tensor of shape ({x.shape[0]},), got {mask.dtype} {tuple(mask.shape)}"
            )
        absolute, relative = absolute[mask], relative[mask]
    return PerturbationNorm(absolute.mean(), relative.mean())


def robust_accuracy(
    model: nn.Module, attack: Attack, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """Accuracy on ``attack(model, x, y)`` over ``(x, y)`` batches (a DataLoader or a list), as a 0-dim tensor.

    ``attack`` is any ``(model, x, y) -> x_adv``, e.g. ``functools.partial(pgd, eps=0.1, clamp=(0, 1))``.

    Example::

        >>> from functools import partial
        >>> import torch
        >>> from lightning_hessian.attacks import fgsm, robust_accuracy
        >>> model = torch.nn.Linear(2, 2, bias=False)  # class 0 where x_0 > 0, class 1 where x_0 < 0
        >>> model.weight.data = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
        >>> x, y = torch.tensor([[0.5, 0.0], [-0.3, 0.0]]), torch.tensor([0, 1])
        >>> robust_accuracy(model, partial(fgsm, eps=0.4), [(x, y)])  # the sample 0.3 from the boundary falls
        tensor(0.5000)
    """
    correct, total = None, 0
    for x, y in batches:
        hits = (predict(model, attack(model, x, y)) == y).sum()
        correct = hits if correct is None else correct + hits
        total += y.numel()
    if total == 0:
        raise ValueError("batches must hold at least one (x, y) batch")
    return correct.float() / total
