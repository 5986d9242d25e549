"""The loss along directions in parameter space: 1-D lines and 2-D planes through the current parameters.

Pointed along the Hessian's top eigenvectors these show how far the quadratic model ``L0 + lambda/2 a^2``
holds and how sharp or flat the minimum is (Yao et al., PyHessian; Li et al., "Visualizing the loss
landscape"). The loss is the operator's: the sample-weighted mean over its data, all ranks when distributed.
"""

from __future__ import annotations

import torch

from lightning_hessian.hessian.operator import HessianOperator


def loss_along(op: HessianOperator, directions: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """``L(theta + sum_i coords[m, i] * directions[i])`` for every row ``m`` of ``coords``.

    Args:
        op: the operator whose model, loss, data and parameter selection define the loss.
        directions: ``(k, op.dim)`` flat directions (e.g. unit eigenvectors from ``top_eigenvalues``).
        coords: ``(m, k)`` step lengths along each direction.

    Returns a float64 ``(m,)`` tensor. The parameters are moved in place under ``no_grad`` and restored
    bit for bit afterwards, also when the loss raises; the operator's cached graphs are dropped (they were
    built at the parameters' old storage versions), so it stays usable for HVPs.

    Example: the loss's curvature along the top eigenvector is the top eigenvalue::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_hessian.hessian import HessianOperator, top_eigenvalues
        >>> from lightning_hessian.landscape import loss_along
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
        >>> batch = (torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 2, (16,)))
        >>> op = HessianOperator(model, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), batch)
        >>> top = top_eigenvalues(op, k=1, tol=1e-10)
        >>> h = 1e-3
        >>> steps = torch.tensor([[-h], [0.0], [h]], dtype=torch.float64)
        >>> left, middle, right = loss_along(op, top.eigenvectors, steps)
        >>> bool(torch.isclose((left - 2 * middle + right) / h**2, top.eigenvalues[0], rtol=1e-4))
        True
    """
    if directions.dim() != 2 or directions.shape[1] != op.dim:
        raise ValueError(f"directions must have shape (k, {op.dim}), got {tuple(directions.shape)}")
    if coords.dim() != 2 or coords.shape[1] != directions.shape[0]:
        raise ValueError(f"coords must have shape (m, {directions.shape[0]}), got {tuple(coords.shape)}")
    if not (bool(torch.isfinite(directions).all()) and bool(torch.isfinite(coords).all())):
        raise ValueError("directions and coords must be finite")
    directions = directions.to(device=op.device, dtype=op.dtype)
    coords = coords.to(device=op.device, dtype=op.dtype)
    saved = [p.detach().clone() for p in op.params]
    losses = torch.empty(coords.shape[0], dtype=torch.float64)
    try:
        with torch.no_grad():
            for m in range(coords.shape[0]):
                step = op.unflatten(coords[m] @ directions)
                for p, base, delta in zip(op.params, saved, step):
                    p.copy_(base + delta)
                losses[m] = op.loss()
    finally:
        with torch.no_grad():
            for p, base in zip(op.params, saved):
                p.copy_(base)
        op.clear_cache()
    return losses


def loss_line(op: HessianOperator, direction: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """``L(theta + a * direction)`` for each ``a`` in ``alphas`` (1-D)."""
    return loss_along(op, direction.reshape(1, -1), alphas.reshape(-1, 1))


def loss_plane(
    op: HessianOperator, d1: torch.Tensor, d2: torch.Tensor, alphas: torch.Tensor, betas: torch.Tensor
) -> torch.Tensor:
    """``L(theta + a * d1 + b * d2)`` on the grid ``alphas x betas``: shape ``(len(alphas), len(betas))``."""
    grid = torch.cartesian_prod(alphas.reshape(-1), betas.reshape(-1)).reshape(-1, 2)
    return loss_along(op, torch.stack([d1.reshape(-1), d2.reshape(-1)]), grid).reshape(len(alphas), len(betas))
