"""The activation part of ``"quadratic+act"``: ``dA^T H_A dA`` against dense Hessians w.r.t. layer inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import hessian

from lightning_hessian.hessian.operator import HessianOperator
from lightning_hessian.quant.sensitivity import Sensitivity, layer_sensitivity
from tests.helpers.modules import tiny_data, tiny_model
from tests.helpers.problems import loss_fn

BITS = (2, 4, 8)


def relu_model() -> nn.Module:
    """As ``tiny_model`` with a ReLU: the Linear's input is never negative, so its range is unsigned."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(1, 3, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4)).double()


def reference_rounding(a: torch.Tensor, lo: float, hi: float, bits: int) -> torch.Tensor:
    """``Q_b(a) - a`` by hand: QuantAct's per-tensor range rule, unsigned when the range starts at >= 0."""
    if lo >= 0:
        qmin, qmax, scale = 0, 2**bits - 1, hi / (2**bits - 1)
    else:
        qmax = 2 ** (bits - 1) - 1
        qmin, scale = -qmax, max(-lo, hi) / qmax
    return torch.clamp(torch.round(a / scale), qmin, qmax) * scale - a


def dense_activation_forms(model: nn.Sequential, batches) -> dict[str, dict[int, float]]:
    """Sample-weighted ``dA^T H_A dA`` from the dense Hessian of each batch's loss w.r.t. a layer's input."""
    out = {}
    for layer, start in (("0", 0), ("3", 3)):
        inputs = [model[:start](x).detach() for x, _ in batches]  # model[:0] is the identity
        lo, hi = min(float(a.min()) for a in inputs), max(float(a.max()) for a in inputs)
        out[layer] = dict.fromkeys(BITS, 0.0)
        n_total = sum(len(y) for _, y in batches)
        for a, (_, y) in zip(inputs, batches):
            H = hessian(lambda t, y=y, rest=model[start:]: loss_fn(rest, (t, y)))(a).detach().reshape(a.numel(), -1)
            for b in BITS:
                da = reference_rounding(a, lo, hi, b).reshape(-1)
                out[layer][b] += len(y) / n_total * float(da @ H @ da)
    return out


@pytest.mark.parametrize("make_model", [tiny_model, relu_model])
def test_activation_forms_equal_dense_hessians_over_uneven_batches(make_model):
    model = make_model()
    x, y = tiny_data()
    batches = [(x[:20], y[:20]), (x[20:], y[20:])]  # uneven: the forms are weighted by sample count
    exact = dense_activation_forms(model, batches)
    sens = layer_sensitivity(model, loss_fn, batches, bit_choices=BITS, metrics=["quadratic+act"])
    assert sens.metrics == ("quadratic", "quadratic+act")
    assert sens.num_hvps == 2 * 2 * len(BITS)  # weights and activations, one product per layer and bit width
    for layer, table in exact.items():
        for b, value in table.items():
            assert abs(value) > 1e-8
            assert abs(sens.act_quadratic[layer][b] - value) < 1e-4 * abs(value), (layer, b, value)
            assert sens.omega("quadratic+act")[layer][b] == pytest.approx(sens.quadratic[layer][b] + value, rel=1e-4)
    assert Sensitivity.from_dict(sens.to_dict()) == sens


def test_hooks_leave_the_model_unchanged_and_the_forms_are_cached(tmp_path, monkeypatch):
    model, batch = relu_model().train(), tiny_data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = model(batch[0])
    first = layer_sensitivity(model, loss_fn, batch, bit_choices=(4, 8), metrics=["quadratic+act"], cache_dir=tmp_path)
    assert not first.cached and model.training
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(batch[0]), out)

    def no_hvps(self, V):
        raise AssertionError("a cache hit must not compute Hessian-vector products")

    monkeypatch.setattr(HessianOperator, "matmat", no_hvps)
    again = layer_sensitivity(model, loss_fn, batch, bit_choices=(4, 8), metrics=["quadratic+act"], cache_dir=tmp_path)
    assert again.cached and again.act_quadratic == first.act_quadratic
    with pytest.raises(AssertionError, match="must not compute"):  # another range rule: other forms
        layer_sensitivity(model, loss_fn, batch, bit_choices=(4, 8), metrics=["quadratic+act"], act_momentum=0.1,
                          cache_dir=tmp_path)
    with pytest.raises(ValueError, match="'quadratic\\+act' was not measured"):
        Sensitivity.from_dict({**first.to_dict(), "act_quadratic": {}}).omega("quadratic+act")


def test_a_layer_that_never_runs_is_named():
    model = nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 2)).double()
    model.forward = lambda x: model[0](x)
    data = (torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 2, (8,)))
    with pytest.raises(ValueError, match="'1' never ran on the probe data"):
        layer_sensitivity(model, loss_fn, data, bit_choices=(4,), metrics=["quadratic+act"])
