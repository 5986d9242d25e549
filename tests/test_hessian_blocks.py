"""Per-layer (diagonal block) eigenvalues and traces against the dense Hessian's diagonal blocks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_hessian.hessian import (
    DenseOperator,
    HessianOperator,
    dense_hessian,
    hutchinson_trace,
    layer_blocks,
    per_layer_top_eigenvalue,
    per_layer_trace,
)
from tests.helpers.problems import loss_fn, problem


def block_indices(op: HessianOperator, params: list[nn.Parameter]) -> torch.Tensor:
    mine = [n for n, p in zip(op.names, op.params) if any(p is q for q in params)]
    return torch.cat([torch.arange(op.dim)[op.slices[n]] for n in mine])


def test_layer_blocks_names_the_weight_layers() -> None:
    model = problem("cnn")[0]
    blocks = layer_blocks(model)
    assert list(blocks) == ["features.0", "features.2", "features.4", "classifier"]
    assert blocks["classifier"] == [model.classifier.weight, model.classifier.bias]
    assert list(layer_blocks(model, (nn.Linear,))) == ["classifier"]


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_per_layer_top_eigenvalues_match_dense_diagonal_blocks(kind: str) -> None:
    model, batch, H = problem(kind)
    op = HessianOperator(model, loss_fn, batch)
    results = per_layer_top_eigenvalue(op, k=2)
    assert list(results) == list(layer_blocks(model))
    for name, params in layer_blocks(model).items():
        idx = block_indices(op, params)
        Hb = H[idx][:, idx]
        ref = torch.linalg.eigvalsh(Hb).flip(0)[:2]
        got = results[name]
        assert ((got.eigenvalues - ref).abs() / ref.abs()).max() <= 1e-4, name
        X = got.eigenvectors  # residuals within the default target, 1e-3
        assert (torch.linalg.vector_norm(X @ Hb - got.eigenvalues[:, None] * X, dim=1) <= 1e-3 * ref.abs()).all()
        assert got.converged
    assert op.num_hvps == sum(r.num_hvps for r in results.values())  # one batched call per round


def test_per_layer_traces_share_probes_and_match_dense_blocks() -> None:
    model, batch, H = problem("cnn")
    op = HessianOperator(model, loss_fn, batch)
    blocks = layer_blocks(model)
    results = per_layer_trace(op, num_samples=400, seed=5)
    assert op.num_hvps == 400  # every layer from the same probes
    z = []
    for name, params in blocks.items():
        idx = block_indices(op, params)
        exact = float(H[idx, idx].sum())
        z.append((results[name].estimate - exact) / results[name].std_error)
        assert results[name].num_samples == 400
    assert max(abs(v) for v in z) <= 3.5
    # the blocks cover every parameter, so their samples add up to the full trace's samples
    full = hutchinson_trace(DenseOperator(H), num_samples=400, seed=5)
    assert sum(r.estimate for r in results.values()) == pytest.approx(full.estimate, rel=1e-9)


def test_per_layer_trace_standard_errors_over_seeds() -> None:
    model, _, H = problem("cnn")
    op_ref = HessianOperator(model, loss_fn, problem("cnn")[1])
    blocks = {name: [op_ref.slices[n] for n, p in zip(op_ref.names, op_ref.params) if any(p is q for q in ps)]
              for name, ps in layer_blocks(model).items()}
    dense = DenseOperator(H)
    exact = {name: sum(float(H.diagonal()[s].sum()) for s in segs) for name, segs in blocks.items()}
    runs = [per_layer_trace(dense, blocks, num_samples=50, seed=s) for s in range(30)]
    z = torch.tensor([[(r.estimate - exact[name]) / r.std_error for name, r in run.items()] for run in runs])
    assert 0.5 <= (z.abs() <= 1).float().mean() <= 0.9
    assert (z.abs() <= 2).float().mean() >= 0.85


def test_rel_tol_stops_when_every_block_meets_it() -> None:
    H = problem("cnn")[2]
    blocks = {"first": slice(0, 100), "rest": slice(100, H.shape[0])}
    results = per_layer_trace(DenseOperator(H), blocks, rel_tol=0.05, seed=0)
    assert all(r.converged and 1.96 * r.std_error <= 0.05 * abs(r.estimate) for r in results.values())


def test_blocks_outside_the_operator_are_rejected() -> None:
    model, batch, _ = problem("mlp")
    op = HessianOperator(model, loss_fn, batch, params=["net.4.*"])
    with pytest.raises(ValueError, match="not in op.params"):
        per_layer_trace(op, {"first": list(model.net[0].parameters())}, num_samples=4)
    with pytest.raises(ValueError, match="exceeds the size"):
        per_layer_top_eigenvalue(op, {"bias": [model.net[4].bias]}, k=11)
    assert list(per_layer_top_eigenvalue(op, k=1)) == ["net.4"]  # default blocks: those inside op.params


@pytest.mark.parametrize("seed", range(3))
def test_per_layer_eigenvalues_repeated_in_a_regression_head_are_all_found(seed: int) -> None:
    """Under MSE a linear head's block is ``I_outputs (x) A^T A / n``: each eigenvalue once per output."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).double()
    x, y = torch.randn(48, 6, generator=g, dtype=torch.float64), torch.randn(48, 3, generator=g, dtype=torch.float64)

    def mse(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return nn.functional.mse_loss(m(b[0]), b[1])

    op = HessianOperator(model, mse, (x, y))
    H = dense_hessian(model, mse, (x, y))
    results = per_layer_top_eigenvalue(op, k=4, seed=seed)
    for name, params in layer_blocks(model).items():
        idx = block_indices(op, params)
        exact = torch.linalg.eigvalsh(H[idx][:, idx]).flip(0)[:4]
        torch.testing.assert_close(results[name].eigenvalues, exact, rtol=1e-4, atol=1e-10)
    head = torch.linalg.eigvalsh(H[-33:, -33:]).flip(0)
    assert torch.allclose(head[:3], head[0].expand(3), rtol=1e-9)  # the head's top value is there thrice
