"""Exact references for small models: the dense Hessian and a dense matrix as an operator.

Every algorithm of :mod:`lightning_hessian.hessian` runs on a :class:`DenseOperator` exactly as on a
``HessianOperator``, so a small problem's estimates can be checked against ``torch.linalg.eigvalsh``::

    >>> import torch
    >>> from torch import nn
    >>> from lightning_hessian.hessian import DenseOperator, dense_hessian, top_eigenvalues
    >>> model = nn.Linear(3, 2).double()
    >>> batch = (torch.randn(8, 3, dtype=torch.float64), torch.tensor([0, 1] * 4))
    >>> H = dense_hessian(model, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), batch)
    >>> H.shape
    torch.Size([8, 8])
    >>> top = top_eigenvalues(DenseOperator(H), k=1, tol=1e-10).eigenvalues[0]
    >>> bool(torch.isclose(top, torch.linalg.eigvalsh(H)[-1]))
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_hessian.hessian.operator import LossFn


class DenseOperator:
    """A dense symmetric ``(dim, dim)`` matrix as a ``LinearOperator``; counts its products in ``num_hvps``."""

    def __init__(self, matrix: torch.Tensor):
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square (dim, dim), got shape {tuple(matrix.shape)}")
        self.matrix, self.dim, self.dtype, self.device = matrix, matrix.shape[0], matrix.dtype, matrix.device
        self.num_hvps = 0

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``V @ matrix`` for rows ``V`` of shape ``(m, dim)``, in the matrix's dtype (as ``HessianOperator``)."""
        self.num_hvps += V.shape[0]
        return V.to(self.matrix) @ self.matrix


class _LossOf(nn.Module):
    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def dense_hessian(model: nn.Module, loss_fn: LossFn, batch: Any,
                  names: Sequence[str] | None = None) -> torch.Tensor:
    """The exact Hessian of ``loss_fn(model, batch)`` w.r.t. the named parameters (default: all that require grad,
    in ``named_parameters`` order, flattened as ``HessianOperator`` flattens them), by ``torch.func`` (reverse over
    reverse), in the model's current mode. Memory grows as ``dim**2``: for models of a few thousand parameters."""
    wrapper = _LossOf(model, loss_fn)
    named = dict(model.named_parameters())
    chosen = [n for n, p in named.items() if p.requires_grad] if names is None else list(names)
    if unknown := [n for n in chosen if n not in named]:
        raise ValueError(f"names: {unknown} are not parameters of the model (see model.named_parameters())")
    shapes = [named[n].shape for n in chosen]
    flat = torch.cat([named[n].detach().reshape(-1) for n in chosen])

    def loss(vector: torch.Tensor) -> torch.Tensor:
        tensors, start = {}, 0
        for name, shape in zip(chosen, shapes):
            tensors[f"model.{name}"] = vector[start:start + shape.numel()].view(shape)
            start += shape.numel()
        return functional_call(wrapper, tensors, (batch,))

    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no second derivative
        return torch.func.jacrev(torch.func.grad(loss), chunk_size=256)(flat).detach()
