"""Exact references for the foreign-module tests: the dense Hessian of a loss, by plain autograd."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel


class _LossOf(nn.Module):
    def __init__(self, module: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor]):
        super().__init__()
        self.module, self.loss_fn = module, loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.module, batch)


def dense_hessian(module: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor], batch: Any,
                  names: Sequence[str] | None = None) -> torch.Tensor:
    """The Hessian of ``loss_fn(module, batch)`` w.r.t. the named parameters (default: all that require grad), in
    eval mode, by ``torch.func.hessian`` (forward over reverse) with attention on its plain math kernel."""
    wrapper = _LossOf(module, loss_fn)
    params = {f"module.{n}": p.detach() for n, p in module.named_parameters()
              if (names is None and p.requires_grad) or (names is not None and n in names)}
    keys, shapes = list(params), [p.shape for p in params.values()]
    flat = torch.cat([p.reshape(-1) for p in params.values()])

    def loss(vector: torch.Tensor) -> torch.Tensor:
        tensors, start = {}, 0
        for key, shape in zip(keys, shapes):
            size = shape.numel()
            tensors[key] = vector[start:start + size].view(shape)
            start += size
        return functional_call(wrapper, tensors, (batch,))

    training = module.training
    module.eval()
    try:
        with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernels have no second derivative
            return torch.func.hessian(loss)(flat).detach()
    finally:
        module.train(training)


def dense_top_eigenvalue(module: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor], batch: Any) -> float:
    hessian = dense_hessian(module, loss_fn, batch).double()
    return float(torch.linalg.eigvalsh((hessian + hessian.T) / 2)[-1])
