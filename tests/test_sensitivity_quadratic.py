"""The exact quadratic sensitivity ``dW^T H_ll dW`` against a dense Hessian, its cost and its cache."""

from __future__ import annotations

import pytest
from torch.func import functional_call, hessian

from lightning_hessian.hessian.operator import HessianOperator
from lightning_hessian.quant.quantizers import quantize_weight
from lightning_hessian.quant.sensitivity import Sensitivity, layer_sensitivity
from tests.helpers.modules import tiny_data, tiny_model
from tests.helpers.problems import loss_fn

BITS = (2, 3, 4, 8)


def dense_quadratic_forms(model, batch) -> dict[str, dict[int, float]]:
    """``dW^T H_ll dW`` from the dense block ``H_ll`` of ``torch.func.hessian`` (float64)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    out = {}
    for layer in ("0", "3"):
        p = f"{layer}.weight"

        def loss(w, p=p):
            return loss_fn(lambda x: functional_call(model, {**params, p: w}, (x,)), batch)

        n = params[p].numel()
        H = hessian(loss)(params[p]).reshape(n, n)
        out[layer] = {}
        for b in BITS:
            dw = (quantize_weight(params[p], b) - params[p]).reshape(-1)
            out[layer][b] = float(dw @ H @ dw)
    return out


def test_quadratic_forms_equal_the_dense_hessian_with_one_product_per_layer_and_bit_width():
    model, batch = tiny_model(), tiny_data()
    exact = dense_quadratic_forms(model, batch)
    sens = layer_sensitivity(model, loss_fn, batch, bit_choices=BITS, metrics=["quadratic"])
    assert sens.num_hvps == 2 * len(BITS) and sens.metrics == ("quadratic",) and sens.trace == {}
    omega = sens.omega("quadratic")
    for layer, table in exact.items():
        assert set(omega[layer]) == set(BITS)
        for b, value in table.items():
            assert abs(value) > 1e-8
            assert abs(omega[layer][b] - value) < 1e-4 * abs(value), (layer, b, omega[layer][b], value)
    # The isotropic proxy differs from the exact form: the rounding error is not a random direction.
    both = layer_sensitivity(model, loss_fn, batch, bit_choices=BITS, metrics=["trace", "quadratic"],
                             max_samples=64)
    assert both.metrics == ("trace", "quadratic")
    for layer, table in sens.quadratic.items():
        assert both.quadratic[layer] == pytest.approx(table, rel=1e-10)
    assert both.omega("trace")["3"][2] != pytest.approx(both.omega("quadratic")["3"][2], rel=0.05)
    assert Sensitivity.from_dict(both.to_dict()) == both


def test_quadratic_forms_are_cached_per_bit_widths(tmp_path, monkeypatch):
    model, batch = tiny_model(), tiny_data()
    first = layer_sensitivity(model, loss_fn, batch, bit_choices=(4, 8), metrics=["quadratic"], cache_dir=tmp_path)
    assert not first.cached and first.num_hvps == 4

    def no_hvps(self, V):
        raise AssertionError("a cache hit must not compute Hessian-vector products")

    monkeypatch.setattr(HessianOperator, "matmat", no_hvps)
    again = layer_sensitivity(model, loss_fn, batch, bit_choices=(4, 8), metrics=["quadratic"], cache_dir=tmp_path)
    assert again.cached and again.num_hvps == 0 and again.omega("quadratic") == first.omega("quadratic")
    with pytest.raises(AssertionError, match="must not compute"):  # other bit widths: other quadratic forms
        layer_sensitivity(model, loss_fn, batch, bit_choices=(2, 4, 8), metrics=["quadratic"], cache_dir=tmp_path)
