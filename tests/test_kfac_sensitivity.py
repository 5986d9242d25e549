"""HAWQ sensitivity with metric="kfac": the K-FAC quadratic forms, exact where K-FAC is, and a plan from them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_hessian.hessian import KFACOperator
from lightning_hessian.quant.hawq import HAWQModule
from lightning_hessian.quant.quantizers import quantize_weight
from lightning_hessian.quant.sensitivity import Sensitivity, layer_sensitivity
from tests.helpers.allocation import best_allocation
from tests.helpers.modules import LAYERS, float_module, four_class_data


def _ce(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def test_equal_to_the_exact_hessian_forms_for_one_sample_through_a_linear_classifier() -> None:
    """A linear model's Hessian is its GGN, and one sample's GGN block is a Kronecker product: K-FAC is exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 5)).double()
    batch = (torch.randn(1, 12, dtype=torch.float64), torch.tensor([3]))
    sens = layer_sensitivity(model, _ce, batch, bit_choices=(2, 4), metrics=["kfac", "quadratic"])
    for b in (2, 4):
        torch.testing.assert_close(sens.kfac["0"][b], sens.quadratic["0"][b], rtol=1e-10, atol=0)
    assert sens.metrics == ("quadratic", "kfac") and sens.num_hvps == 2  # the two quadratic forms, none for K-FAC


def test_forms_are_the_kronecker_quadratic_forms_of_the_weights() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 3, 5, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 18, 4)).double()
    x = torch.randn(20, 1, 40, dtype=torch.float64)
    y = torch.randint(0, 4, (20,))
    sens = layer_sensitivity(model, _ce, [(x[:8], y[:8]), (x[8:], y[8:])], metrics=["kfac"])
    op = KFACOperator(model, _ce, (x, y), params=["0.weight", "3.weight"])
    for name in ("0", "3"):
        A, G = op.factors[name]
        w = dict(model.named_modules())[name].weight.detach()
        for b in (2, 4, 8):
            dW = (quantize_weight(w, b) - w).reshape(w.shape[0], -1)
            torch.testing.assert_close(sens.kfac[name][b], float((dW * (G @ dW @ A)).sum()), rtol=1e-9, atol=0)
    assert Sensitivity.from_dict(sens.to_dict()).omega("kfac") == sens.omega("kfac")


@pytest.fixture(scope="module")
def trained():
    from tests.helpers.problems import fit_full_batch

    return fit_full_batch(float_module(), *four_class_data(), steps=150)


def test_hawq_plans_from_kfac_without_a_hessian_vector_product(trained) -> None:
    x, y = four_class_data()
    hawq = HAWQModule(trained, budgets={"size": 0.5}, bit_choices=(2, 4, 8), probe_data=[(x, y)], metric="kfac")
    bits = hawq.plan([(x, y)])
    sens = hawq.sensitivity
    assert sens.metrics == ("kfac",) and sens.num_hvps == 0
    omega = sens.omega("kfac")
    assert all(v > 0 for table in omega.values() for v in table.values())
    params = {name: s.params for name, s in hawq.stats.items()}
    size = {name: {b: n * b for b in (2, 4, 8)} for name, n in params.items()}
    budget = sum(params.values()) * (2 + 0.5 * (8 - 2))
    assert bits == best_allocation(omega, {"size": size}, {"size": budget}, [[name] for name in LAYERS])[1]
