"""KFACOperator against dense references: the block-diagonal GGN from torch.func, the Kronecker blocks written out,
the convolution itself for the patch geometry, and curvlinops' KFACLinearOperator where installed."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

from lightning_hessian.hessian import (
    KFACOperator,
    hutchinson_trace,
    per_layer_top_eigenvalue,
    per_layer_trace,
    top_eigenvalues,
)
from lightning_hessian.hessian.kfac import KFACLayer, kfac_layers


def _ce(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def _mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(model(batch[0]), batch[1])


def dense_ggn(model: nn.Module, loss_of_output, x: torch.Tensor, y: torch.Tensor, names: list[str]) -> torch.Tensor:
    """``J^T H J`` of the mean loss over the batch, w.r.t. the named parameters (flattened in order)."""
    params = dict(model.named_parameters())

    def output(selected):
        return functional_call(model, {**params, **selected}, (x,))

    selected = {n: params[n].detach() for n in names}
    out = output(selected)
    jac = jacrev(output)(selected)
    J = torch.cat([jac[n].reshape(out.numel(), -1) for n in names], 1)
    H = hessian(lambda o: loss_of_output(o, y))(out.detach()).reshape(out.numel(), out.numel())
    return (J.T @ H @ J).detach()


def block_diagonal(op: KFACOperator, matrix: torch.Tensor) -> torch.Tensor:
    """``matrix`` with everything outside the operator's layer blocks set to zero."""
    mask = torch.zeros_like(matrix)
    for block in op.blocks.values():
        idx = torch.cat([torch.arange(s.start, s.stop) for s in (block.weight, block.bias) if s is not None])
        mask[idx[:, None], idx[None]] = 1
    return matrix * mask


def assert_operator_equals(op: KFACOperator, reference: torch.Tensor, rtol: float = 1e-6) -> None:
    V = torch.randn(4, op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    expected = V @ reference
    got = op.matmat(V)
    assert (got - expected).abs().max() <= rtol * expected.abs().max()


def deep_linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4, bias=False), nn.Linear(4, 3)).double()


def small_cnn(conv: type[nn.Module] = nn.Conv2d, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    flat = 3 * 3 * 3 if conv is nn.Conv2d else 3 * 4  # 8x8 images, length-10 signals

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = conv(2, 4, 3, padding=1)
            self.c2 = conv(4, 3, 3, stride=2)
            self.fc = nn.Linear(flat, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.tanh(self.c2(torch.tanh(self.c1(x)))).flatten(1))

    return Net().double()


# ---------------------------------------------------------------------------------------------- exactness
def test_deep_linear_mse_equals_the_block_diagonal_ggn_over_several_batches() -> None:
    model = deep_linear()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(13, 6, generator=g, dtype=torch.float64), torch.randn(13, 3, generator=g, dtype=torch.float64)
    op = KFACOperator(model, _mse, [(x[:4], y[:4]), (x[4:], y[4:])])  # unequal batches, sample-weighted
    ggn = dense_ggn(model, F.mse_loss, x, y, op.names)
    assert_operator_equals(op, block_diagonal(op, ggn))
    assert op.dim == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_deep_linear_with_shared_positions_is_exact_for_its_approximation(approx: str) -> None:
    """``expand``: one output per position (per-position regression); ``reduce``: positions averaged before the
    loss. Eschenhagen et al. 2023: each approximation is exact in its setting for a linear network."""
    torch.manual_seed(0)
    layers = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3)).double()
    model = layers if approx == "expand" else nn.Sequential(layers, _MeanOverPositions())
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 7, 4, generator=g, dtype=torch.float64)
    y = torch.randn(6, 7, 3, generator=g, dtype=torch.float64) if approx == "expand" else torch.randn(
        6, 3, generator=g, dtype=torch.float64)
    op = KFACOperator(model, _mse, (x, y), kfac_approx=approx)
    assert_operator_equals(op, block_diagonal(op, dense_ggn(model, F.mse_loss, x, y, op.names)))


class _MeanOverPositions(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1)


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_one_sample_block_is_the_kronecker_product_exactly(loss: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.Softplus(), nn.Linear(5, 4)).double()
    x = torch.randn(1, 6, dtype=torch.float64)
    y = torch.tensor([2]) if loss == "ce" else torch.randn(1, 4, dtype=torch.float64)
    loss_fn, of_output = (_ce, F.cross_entropy) if loss == "ce" else (_mse, F.mse_loss)
    op = KFACOperator(model, loss_fn, (x, y))
    reference = block_diagonal(op, dense_ggn(model, of_output, x, y, op.names))
    assert_operator_equals(op, reference)
    # the exact spectrum from the factors is the dense block-diagonal one
    dense = torch.linalg.eigvalsh(reference).flip(0)
    torch.testing.assert_close(op.eigenvalues(), dense, atol=1e-10 * float(dense[0]), rtol=0)
    torch.testing.assert_close(op.trace(), float(reference.trace()), rtol=1e-10, atol=0)


def test_blocks_are_written_out_kronecker_products_with_the_bias_as_a_last_input_column() -> None:
    model = small_cnn()
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(5, 2, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (5,), generator=g)
    op = KFACOperator(model, _ce, (x, y))
    for name, block in op.blocks.items():
        A, G = op.factors[name]
        out, d_in = block.layer.out, block.layer.d_in
        K = torch.kron(G, A).reshape(out, d_in + 1, out, d_in + 1)  # (out, [W | b]) x (out, [W | b])
        perm = [o * (d_in + 1) + i for o in range(out) for i in range(d_in)]
        perm += [o * (d_in + 1) + d_in for o in range(out)]
        dense = K.reshape(out * (d_in + 1), -1)[perm][:, perm]  # weight rows first, then the bias: op's order
        idx = torch.cat([torch.arange(block.weight.start, block.weight.stop),
                         torch.arange(block.bias.start, block.bias.stop)])
        E = torch.zeros(len(idx), op.dim, dtype=torch.float64)
        E[torch.arange(len(idx)), idx] = 1
        torch.testing.assert_close(op.matmat(E)[:, idx], dense, rtol=1e-12, atol=1e-15)


def test_monte_carlo_converges_to_the_exact_factors() -> None:
    model = small_cnn()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(8, 2, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (8,), generator=g)
    exact = KFACOperator(model, _ce, (x, y))

    def error(samples: int, seed: int) -> float:
        mc = KFACOperator(model, _ce, (x, y), fisher_type="mc", mc_samples=samples, seed=seed)
        return max(float((mc.factors[n][1] - G).norm() / G.norm()) for n, (_, G) in exact.factors.items())

    few = sum(error(4, s) for s in range(3)) / 3
    many = sum(error(400, s) for s in range(3)) / 3
    assert many < 0.1 and many < few / 5  # 1/sqrt(M): 100x the samples, 10x smaller error
    mc = KFACOperator(model, _ce, (x, y), fisher_type="mc", mc_samples=5)
    for name, (A, _) in exact.factors.items():  # A does not depend on the sampling
        torch.testing.assert_close(mc.factors[name][0], A, rtol=1e-12, atol=0)


def test_empirical_is_the_mean_of_per_sample_gradient_outer_products() -> None:
    """For one Linear layer the empirical block is ``mean_n vec(dl_n/dW) vec(dl_n/dW)^T`` with ``A`` and ``G`` both
    averaged, i.e. ``(mean a a^T) (x) (mean g g^T)``, computed here from per-sample gradients."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3, bias=False).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    op = KFACOperator(model, _ce, (x, y), fisher_type="empirical")
    g = torch.stack([torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), model.weight)[0] @ x[i]
                     / x[i].dot(x[i]) for i in range(6)])  # dl_n/ds_n, recovered from the rank-one dl_n/dW
    torch.testing.assert_close(op.factors[""][1], g.T @ g / 6, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(op.factors[""][0], x.T @ x / 6, rtol=1e-12, atol=0)


def test_ekfac_is_the_diagonal_of_the_true_block_in_the_kronecker_eigenbasis() -> None:
    model = small_cnn()
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(5, 2, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (5,), generator=g)
    op = KFACOperator(model, _ce, (x, y), eigenvalue_correction=True)
    ggn = dense_ggn(model, F.cross_entropy, x, y, op.names)
    for name, block in op.blocks.items():
        eig = op.eigen(name)
        idx = torch.cat([torch.arange(block.weight.start, block.weight.stop),
                         torch.arange(block.bias.start, block.bias.stop)])
        true_block = ggn[idx][:, idx]
        # the eigenbasis vectors QG[:, i] QA[:, j]^T laid out as [W | b], flattened in op order
        basis = torch.einsum("oi,dj->ijod", eig.QG, eig.QA)
        flat = torch.cat([basis[..., :-1].reshape(*basis.shape[:2], -1), basis[..., -1]], -1).reshape(-1, len(idx))
        expected = torch.einsum("kp,pq,kq->k", flat, true_block, flat).reshape(eig.values.shape)
        torch.testing.assert_close(eig.values, expected, rtol=1e-9, atol=1e-14)
    # the corrected operator is symmetric and its trace is that of the true block diagonal
    torch.testing.assert_close(op.trace(), float(block_diagonal(op, ggn).trace()), rtol=1e-9, atol=0)


def test_ekfac_equals_kfac_where_kfac_is_exact() -> None:
    model = deep_linear()
    x, y = torch.randn(9, 6, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64)
    plain, corrected = KFACOperator(model, _mse, (x, y)), KFACOperator(model, _mse, (x, y), eigenvalue_correction=True)
    V = torch.randn(3, plain.dim, dtype=torch.float64)
    torch.testing.assert_close(corrected.matmat(V), plain.matmat(V), rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------- algorithms
def test_every_algorithm_runs_on_it_and_agrees_with_the_factors() -> None:
    model = small_cnn()
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(16, 2, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (16,), generator=g)
    op = KFACOperator(model, _ce, [(x[:8], y[:8]), (x[8:], y[8:])])
    exact = op.eigenvalues()
    lanczos = top_eigenvalues(op, k=3, tol=1e-8)
    torch.testing.assert_close(lanczos.eigenvalues, exact[:3], rtol=1e-6, atol=0)
    tr = hutchinson_trace(op, num_samples=400, seed=0)
    assert abs(tr.estimate - op.trace()) < 4 * tr.std_error
    per_block = op.block_eigenvalues()
    layer_top = per_layer_top_eigenvalue(op, k=1, tol=1e-8)
    for name, result in layer_top.items():
        torch.testing.assert_close(result.eigenvalues[0], per_block[name][0].double(), rtol=1e-6, atol=0)
    traces = per_layer_trace(op, num_samples=300, seed=1)
    for name, t in traces.items():
        assert abs(t.estimate - op.block_traces()[name]) < 4 * t.std_error + 1e-12


def test_damped_inverse_inverts_the_damped_operator() -> None:
    model = small_cnn(nn.Conv1d)
    x, y = torch.randn(6, 2, 10, dtype=torch.float64), torch.randint(0, 5, (6,))
    op = KFACOperator(model, _ce, (x, y))
    V = torch.randn(3, op.dim, dtype=torch.float64)
    for damping in (1e-3, 1.0):
        W = op.inverse_matmat(V, damping)
        torch.testing.assert_close(op.matmat(W) + damping * W, V, rtol=1e-8, atol=1e-8)


# ----------------------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("conv", [
    nn.Conv1d(3, 4, 3, stride=2, padding=1),
    nn.Conv1d(3, 4, 3, padding="same", dilation=2, padding_mode="reflect"),
    nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
    nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular", bias=False),
])
def test_input_patches_times_the_weight_is_the_convolution(conv: nn.Module) -> None:
    layer = KFACLayer(conv)
    x = torch.randn(2, 3, *([9] if isinstance(conv, nn.Conv1d) else [7, 8]))
    out = conv(x)
    patches = layer.input_patches(x)
    expected = out.flatten(2).transpose(1, 2)
    if conv.bias is not None:
        expected = expected - conv.bias
    torch.testing.assert_close(patches @ conv.weight.reshape(layer.out, -1).T, expected, rtol=1e-5, atol=1e-5)
    assert patches.shape[1] == expected.shape[1]
    unbatched = layer.input_patches(x[0])  # an unbatched call is one sample
    torch.testing.assert_close(unbatched, patches[:1])


# ---------------------------------------------------------------------------------------------- interfaces
def test_default_params_skip_unsupported_layers_with_a_warning_and_explicit_ones_are_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3)).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    with pytest.warns(UserWarning, match="LayerNorm"):
        op = KFACOperator(model, _ce, (x, y))
    assert op.names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    with pytest.raises(ValueError, match=r"\['1.weight'\] are not the weight or bias"):
        KFACOperator(model, _ce, (x, y), params=["1.weight"])
    weight_only = KFACOperator(model, _ce, (x, y), params=["0.weight", "2.*"])
    assert weight_only.blocks["0"].bias is None and weight_only.factors["0"][0].shape == (4, 4)
    torch.testing.assert_close(weight_only.factors["2"][1], op.factors["2"][1])


def test_multihead_attention_and_grouped_convolutions_are_reported_not_silently_used() -> None:
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2), "depthwise": nn.Conv1d(4, 4, 3, groups=4),
                           "proj": nn.Linear(8, 8)})
    supported, skipped = kfac_layers(model)
    assert list(supported) == ["proj"]
    assert set(skipped) == {"attn", "attn.out_proj", "depthwise"}
    assert "F.multi_head_attention_forward" in skipped["attn"] and "groups=4" in skipped["depthwise"]


def test_lightning_style_module_dict_batches_and_a_loss_that_calls_a_submodule() -> None:
    net = deep_linear()

    class Wrapper(nn.Module):  # a LightningModule-like wrapper whose loss never calls its own forward
        def __init__(self) -> None:
            super().__init__()
            self.net = net

    x, y = torch.randn(7, 6, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    reference = KFACOperator(net, _mse, (x, y))
    op = KFACOperator(Wrapper(), lambda m, b: F.mse_loss(m.net(b["x"]), b["y"]), {"x": x, "y": y})
    V = torch.randn(2, op.dim, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(V), reference.matmat(V))
    with pytest.raises(ValueError, match="ran 2 times"):
        KFACOperator(net, lambda m, b: F.mse_loss(m(b[0]) + m(b[0]), b[1]), (x, y))


def test_a_loss_that_couples_the_samples_is_refused() -> None:
    model = deep_linear()
    x = torch.randn(5, 6, dtype=torch.float64)

    def batch_softmax_loss(m: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return -torch.log_softmax(m(batch).sum(1), 0)[0]  # normalised over the batch

    with pytest.raises(ValueError, match="couples the samples"):
        KFACOperator(model, batch_softmax_loss, x)


@pytest.mark.parametrize("kwargs, match", [
    ({"fisher_type": "fisher"}, "fisher_type"), ({"kfac_approx": "mean"}, "kfac_approx"),
    ({"mc_samples": 0}, "mc_samples"), ({"output_module": nn.Linear(2, 2)}, "output_module"),
])
def test_bad_arguments_name_themselves(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        KFACOperator(deep_linear(), _mse, (torch.randn(3, 6).double(), torch.randn(3, 3).double()), **kwargs)


# ---------------------------------------------------------------------------------------------- curvlinops
CURVLINOPS = importlib.util.find_spec("curvlinops") is not None


@pytest.mark.slow
@pytest.mark.skipif(not CURVLINOPS, reason="curvlinops-for-pytorch is not installed (make bench-setup)")
@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_same_numbers_as_curvlinops(loss: str, fisher_type: str, approx: str) -> None:
    """Same operator as ``curvlinops.KFACLinearOperator(..., separate_weight_and_bias=False)``. One convention
    differs: for ``MSELoss(reduction="mean")`` curvlinops' empirical Fisher takes the likelihood of the whole
    ``C``-dimensional output (``4/C (f - y)(f - y)^T`` per sample) where ours takes each sample's own loss
    ``||f - y||^2 / C`` (``4/C^2``), so theirs is ``C`` times ours."""
    from curvlinops import KFACLinearOperator

    model = small_cnn()
    g = torch.Generator().manual_seed(8)
    x = torch.randn(12, 2, 8, 8, generator=g, dtype=torch.float64)
    y = (torch.randint(0, 5, (12,), generator=g) if loss == "ce"
         else torch.randn(12, 5, generator=g, dtype=torch.float64))
    loss_module = nn.CrossEntropyLoss() if loss == "ce" else nn.MSELoss()
    data = [(x[:5], y[:5]), (x[5:], y[5:])]
    theirs = KFACLinearOperator(model, loss_module, list(model.parameters()), data, fisher_type=fisher_type,
                                kfac_approx=approx, separate_weight_and_bias=False, check_deterministic=False)
    ours = KFACOperator(model, lambda m, b: loss_module(m(b[0]), b[1]), data, fisher_type=fisher_type,
                        kfac_approx=approx)
    V = torch.randn(ours.dim, 3, dtype=torch.float64, generator=g)
    convention = 5.0 if (loss, fisher_type) == ("mse", "empirical") else 1.0
    expected = torch.as_tensor(theirs @ V) / convention
    torch.testing.assert_close(ours.matmat(V.T).T, expected, rtol=1e-10, atol=1e-14)
