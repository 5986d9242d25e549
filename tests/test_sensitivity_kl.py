"""ZeroQ's KL sensitivity (metric="kl") against a direct computation on a copy of the model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_hessian.quant.quantizers import quantize_weight
from lightning_hessian.quant.sensitivity import Sensitivity, layer_sensitivity


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def model_and_data() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 4, 3, stride=2), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 5))
    model.eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 1, 9, generator=g), torch.randint(0, 5, (24,), generator=g)
    return model, [(x[:16], y[:16]), (x[16:], y[16:])]  # batches of 16 and 8: sample-count weights matter


def reference_kl(model: nn.Module, x: torch.Tensor, layer: str, bits: int) -> float:
    """``mean_x KL(p_float || p_quantized)`` on a deep copy with the layer's weight quantized."""
    quantized = copy.deepcopy(model)
    w = quantized.get_submodule(layer).weight
    with torch.no_grad():
        w.copy_(quantize_weight(w, bits))
        p, q = F.log_softmax(model(x).double(), -1), F.log_softmax(quantized(x).double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_kl_equals_a_direct_computation_and_leaves_the_model_unchanged():
    model, batches = model_and_data()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    sens = layer_sensitivity(model, loss_fn, batches, bit_choices=(2, 4, 8), metrics=["kl"])
    x = torch.cat([b[0] for b in batches])
    assert sens.metrics == ("kl",) and sens.num_hvps == 0
    for layer in ("0", "4"):
        for bits in (2, 4, 8):
            assert sens.kl[layer][bits] == pytest.approx(reference_kl(model, x, layer, bits), rel=1e-9, abs=1e-15)
        assert sens.kl[layer][2] > sens.kl[layer][4] > sens.kl[layer][8] > 0
    assert sens.omega("kl") == sens.kl
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # weights put back bit for bit
    assert Sensitivity.from_dict(sens.to_dict()).kl == sens.kl


def test_kl_with_a_hessian_metric_and_from_the_cache(tmp_path):
    """Measured beside Hessian metrics on the same operator (the eigenvalues come after the weight swaps, from
    graphs cached before them), and cached."""
    model, batches = model_and_data()
    metrics = ["kl", "quadratic", "eigenvalue"]
    both = layer_sensitivity(model, loss_fn, batches, bit_choices=(4, 8), metrics=metrics, cache_dir=tmp_path)
    alone = layer_sensitivity(model, loss_fn, batches, bit_choices=(4, 8), metrics=["quadratic", "eigenvalue"])
    for layer in ("0", "4"):
        assert both.quadratic[layer] == pytest.approx(alone.quadratic[layer], rel=1e-6)
    assert both.top_eigenvalue == pytest.approx(alone.top_eigenvalue, rel=1e-6)
    again = layer_sensitivity(model, loss_fn, batches, bit_choices=(4, 8), metrics=metrics, cache_dir=tmp_path)
    assert again.cached and again.kl == both.kl
    other_bits = layer_sensitivity(model, loss_fn, batches, bit_choices=(2, 8), metrics=["kl"], cache_dir=tmp_path)
    assert not other_bits.cached and set(other_bits.kl["0"]) == {2, 8}


def test_kl_through_a_loss_on_dict_batches_and_clear_errors():
    model, batches = model_and_data()
    dict_batches = [{"signal": x, "label": y} for x, y in batches]
    sens = layer_sensitivity(model, lambda m, b: F.cross_entropy(m(b["signal"]), b["label"]), dict_batches,
                             bit_choices=(4,), metrics=["kl"])
    x = torch.cat([b[0] for b in batches])
    assert sens.kl["4"][4] == pytest.approx(reference_kl(model, x, "4", 4), rel=1e-9)

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return {"logits": self.net(x)}

    with pytest.raises(ValueError, match="returns dict: make it return the logits tensor"):
        layer_sensitivity(Wrapper(), lambda m, b: F.cross_entropy(m.net(b[0]), b[1]) + 0 * m(b[0])["logits"].sum(),
                          batches, bit_choices=(4,), metrics=["kl"])
    with pytest.raises(ValueError, match="never called it"):
        layer_sensitivity(Wrapper(), lambda m, b: F.cross_entropy(m.net(b[0]), b[1]), batches, bit_choices=(4,),
                          metrics=["kl"])
