"""Small problems with exact references: briefly trained float64 models, their batches and dense Hessians."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from lightning_hessian.hessian import dense_hessian
from lightning_hessian.models import MNIST1DCNN, MNIST1DMLP


def fit_full_batch(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float = 1e-2):
    """``steps`` Adam steps of cross-entropy on one batch (a model near a minimum, where the Hessian blocks are
    positive semi-definite), gradients cleared after."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def teacher_batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Signals labelled by a fixed random linear teacher (learnable, so training shapes the Hessian)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 40, generator=g, dtype=torch.float64)
    w = torch.randn(40, 10, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    return x, (x @ w + 0.5 * torch.randn(n, 10, generator=g, dtype=torch.float64)).argmax(1)


@functools.cache
def problem(kind: str) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A briefly trained float64 model, an evaluation batch and the dense Hessian on it (cached)."""
    torch.manual_seed(0)
    model = (MNIST1DMLP(hidden=32) if kind == "mlp" else MNIST1DCNN(channels=8)).double()
    train = teacher_batch(512, seed=1)
    fit_full_batch(model, *train, steps=60)
    batch = teacher_batch(64 if kind == "mlp" else 32, seed=2)
    return model, batch, dense_hessian(model, loss_fn, batch)


@functools.cache
def spectrum(kind: str) -> torch.Tensor:
    """Ascending eigenvalues of ``problem(kind)``'s dense Hessian (cached: eigvalsh takes seconds)."""
    return torch.linalg.eigvalsh(problem(kind)[2])
