"""metric="qbert": each layer's top Hessian eigenvalue over data subsamples (mean + std), against dense Hessians of a
tiny transformer (d=8, 2 heads); group-wise perturbations."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_hessian.hessian import Batches
from lightning_hessian.models.transformer import MNIST1DTransformer
from lightning_hessian.quant import WeightGroups, layer_sensitivity, quantizable_layers, unpack_attention
from lightning_hessian.quant.quantizers import quantize_weight
from tests.foreign.reference import dense_hessian


def _loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def test_qbert_sensitivity_equals_dense_per_layer_eigenvalues_of_a_tiny_transformer():
    torch.manual_seed(0)
    model = unpack_attention(MNIST1DTransformer(length=8, patch=2, dim=8, heads=2, layers=1, mlp=16,
                                                num_classes=3)).double().eval()
    batches = Batches([(torch.randn(6, 8, dtype=torch.float64), torch.randint(3, (6,))) for _ in range(3)])
    layers = ["position", "encoder.layers.0.self_attn.q_proj", "encoder.layers.0.self_attn.v_proj",
              "encoder.layers.0.linear2", "head"]
    groups = {"head": WeightGroups(columns=8)}
    s = layer_sensitivity(model, _loss, batches, layers, (2, 4), metrics=["qbert"], eig_tol=1e-10, groups=groups)
    assert s.metrics == ("qbert",) and s.converged
    for name in layers:
        weight = model.get_submodule(name).weight.detach()
        tops = [float(torch.linalg.eigvalsh(dense_hessian(model, _loss, batch, [f"{name}.weight"]))[-1])
                for batch in batches]
        assert s.subsample_eigenvalues[name] == pytest.approx(tops, rel=1e-6, abs=1e-9)
        expected = abs(sum(tops) / 3) + float(torch.tensor(tops).std(correction=0))
        assert s.qbert[name] == pytest.approx(expected, rel=1e-6)
        d = quantize_weight(weight, 2, groups=groups.get(name)) - weight
        assert s.omega("qbert")[name][2] == pytest.approx(expected * float(d.square().sum()), rel=1e-6)
    head = model.head.weight.detach()  # its groups are priced, not per-channel rounding
    per_channel = s.qbert["head"] * float((quantize_weight(head, 2) - head).square().sum())
    assert s.omega("qbert")["head"][2] != pytest.approx(per_channel, rel=1e-3)
    with pytest.raises(ValueError, match="pass unpack_attention"):
        layer_sensitivity(MNIST1DTransformer(length=8, patch=2, dim=8, heads=2, layers=1), _loss, batches[0])
    assert "encoder.layers.0.self_attn.out_proj" in quantizable_layers(model)


def test_quadratic_act_prices_no_rounding_of_an_embeddings_indices():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(6, 4), nn.Flatten(), nn.Linear(12, 3)).double()
    tokens, y = torch.randint(6, (8, 3)), torch.randint(3, (8,))
    s = layer_sensitivity(model, _loss, (tokens, y), None, (4, 8), metrics=["quadratic+act"])
    assert s.act_quadratic["0"] == {4: 0.0, 8: 0.0} and s.act_quadratic["2"][4] != 0.0
