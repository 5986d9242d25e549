"""A probe on a NaN/Inf loss says so in one line, at its first products, in every algorithm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_hessian.hessian import (
    HessianOperator,
    hutchinson_trace,
    per_layer_top_eigenvalue,
    per_layer_trace,
    power_iteration,
    spectral_density,
    top_eigenvalues,
)
from lightning_hessian.hessian.operator import NonFiniteError
from tests.test_hessian_operator import loss_fn, problem


def scaled_loss(factor: float):
    def loss(model: nn.Module, batch) -> torch.Tensor:
        return loss_fn(model, batch) * factor
    return loss


@pytest.mark.parametrize("factor, word", [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_every_algorithm_stops_at_its_first_products_and_names_the_loss(factor: float, word: str) -> None:
    model, batch, _ = problem("mlp")
    calls = {
        "top_eigenvalues": lambda op: top_eigenvalues(op, k=3),
        "hutchinson_trace": lambda op: hutchinson_trace(op, max_samples=2000, batch=8),
        "hutch++": lambda op: hutchinson_trace(op, method="hutch++", batch=8),
        "per_layer_top_eigenvalue": lambda op: per_layer_top_eigenvalue(op),
        "per_layer_trace": lambda op: per_layer_trace(op, batch=8),
        "spectral_density": lambda op: spectral_density(op, num_runs=2, deflate=0, batch=2),
        "power_iteration": lambda op: power_iteration(op),
    }
    for name, call in calls.items():
        op = HessianOperator(model, scaled_loss(factor), batch)
        with pytest.raises(NonFiniteError, match=f"^the loss is {word} at this probe$"):
            call(op)
        assert op.num_hvps <= 8, name  # not the whole sample cap (hutchinson_trace used to spend 2000 on NaN)


def test_nan_products_of_a_finite_loss_are_told_apart() -> None:
    model = nn.Linear(3, 1, bias=False).double()
    nn.init.zeros_(model.weight)

    def kink(m: nn.Module, x: torch.Tensor) -> torch.Tensor:  # sqrt(|w|): finite at 0, its derivatives are not
        return m.weight.abs().sqrt().sum() + 0 * m(x).sum()

    op = HessianOperator(model, kink, torch.ones(2, 3, dtype=torch.float64))
    with pytest.raises(NonFiniteError, match=r"products are NaN/Inf although the loss \(0\) is finite"):
        top_eigenvalues(op)
