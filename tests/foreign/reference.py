"""Exact references for the foreign-module tests: the library's dense Hessian, taken in eval mode (as the probes
measure: dropout off, BatchNorm on its running statistics)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_hessian.hessian import dense_hessian as library_dense_hessian
from lightning_hessian.modes import training_mode


def dense_hessian(module: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor], batch: Any,
                  names: Sequence[str] | None = None) -> torch.Tensor:
    """The Hessian of ``loss_fn(module, batch)`` w.r.t. the named parameters (default: all that require grad)."""
    with training_mode(module, False):
        return library_dense_hessian(module, loss_fn, batch, names)


def dense_top_eigenvalue(module: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor], batch: Any) -> float:
    hessian = dense_hessian(module, loss_fn, batch).double()
    return float(torch.linalg.eigvalsh((hessian + hessian.T) / 2)[-1])
