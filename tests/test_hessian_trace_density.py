"""Hutchinson / Hutch++ traces and SLQ densities against the exact trace and spectrum of the dense Hessian.

The statistical checks (errors against the reported standard errors over many seeds) run on the dense
matrix as an operator, which gives the same numbers as the HessianOperator for the same seed (checked
here) at a fraction of the cost.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_hessian.hessian import (
    DenseOperator,
    HessianOperator,
    hutchinson_trace,
    spectral_density,
    top_eigenvalues,
)
from lightning_hessian.hessian.density import gaussian_density
from tests.helpers.problems import loss_fn, problem, spectrum


def exact_trace(H: torch.Tensor) -> float:
    return float(H.diagonal().sum())


def test_hutchinson_meets_a_1pct_target_on_the_hessian_operator() -> None:
    model, batch, H = problem("mlp")
    op = HessianOperator(model, loss_fn, batch)
    result = hutchinson_trace(op, rel_tol=0.01, max_samples=10_000, seed=0)
    assert result.converged and result.num_hvps == result.num_samples == op.num_hvps
    assert 1.96 * result.std_error <= 0.01 * abs(result.estimate)  # the target, at 95% confidence
    error = abs(result.estimate - exact_trace(H))
    assert error <= 3 * result.std_error and error <= 0.015 * exact_trace(H)  # over seeds: see below
    assert result.num_samples > 1000  # this Hessian needs thousands of probes: the rule did not stop early


def test_hutchplusplus_meets_the_target_with_fewer_hvps() -> None:
    model, batch, H = problem("cnn")
    op = HessianOperator(model, loss_fn, batch)
    result = hutchinson_trace(op, rel_tol=0.01, method="hutch++", seed=0)
    assert result.converged and result.method == "hutch++"
    assert abs(result.estimate - exact_trace(H)) <= 0.01 * exact_trace(H)
    variance = 2 * (H.pow(2).sum() - H.diagonal().pow(2).sum())  # of one Rademacher sample z^T H z
    plain_needs = float(1.96 * variance.sqrt() / (0.01 * exact_trace(H))) ** 2
    assert result.num_hvps < plain_needs / 4
    same = hutchinson_trace(DenseOperator(H), rel_tol=0.01, method="hutch++", seed=0)  # same probes, same numbers
    assert same.num_samples == result.num_samples
    assert same.estimate == pytest.approx(result.estimate, rel=1e-9)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_standard_error_matches_the_observed_error_over_seeds(method: str) -> None:
    H = problem("cnn")[2]
    op, tr = DenseOperator(H), exact_trace(H)
    runs = [hutchinson_trace(op, num_samples=60, seed=s, method=method) for s in range(40)]
    z = torch.tensor([(r.estimate - tr) / r.std_error for r in runs])
    assert 0.5 <= (z.abs() <= 1).float().mean() <= 0.9  # ~68% within one SE
    assert (z.abs() <= 2).float().mean() >= 0.85  # ~95% within two
    assert abs(float(z.mean())) <= 3 / math.sqrt(len(runs)) * 1.5  # unbiased
    errors = torch.tensor([r.estimate - tr for r in runs])
    mean_se = sum(r.std_error for r in runs) / len(runs)
    assert 0.6 <= mean_se / float(errors.pow(2).mean().sqrt()) <= 1.6


def test_1pct_target_holds_over_seeds() -> None:
    H = problem("cnn")[2]
    tr = exact_trace(H)
    runs = [hutchinson_trace(DenseOperator(H), rel_tol=0.01, method="hutch++", seed=s) for s in range(30)]
    within = sum(abs(r.estimate - tr) <= 0.01 * tr for r in runs)
    assert all(r.converged for r in runs) and within >= 25  # the target is a 95% interval


def test_krylov_deflated_trace_reuses_the_eigenvalue_run() -> None:
    H = problem("cnn")[2]
    tr, op = exact_trace(H), DenseOperator(H)
    eig = top_eigenvalues(op, k=1, tol=1e-3, min_iter=20, return_basis=True)
    Q = eig.basis
    assert eig.num_hvps == op.num_hvps >= 20 and Q.shape == (eig.num_hvps, H.shape[0])
    torch.testing.assert_close(Q @ Q.T, torch.eye(Q.shape[0], dtype=H.dtype), rtol=0, atol=1e-10)
    assert eig.basis_trace == pytest.approx(float((Q @ H @ Q.T).trace()), rel=1e-10)  # no extra products
    runs = [hutchinson_trace(op, num_samples=20, seed=s, basis=Q, basis_trace=eig.basis_trace) for s in range(40)]
    z = torch.tensor([(r.estimate - tr) / r.std_error for r in runs])
    assert 0.5 <= (z.abs() <= 1).float().mean() <= 0.9 and (z.abs() <= 2).float().mean() >= 0.85  # SE calibrated
    assert all(r.num_hvps == 20 for r in runs)  # the basis products are not counted again
    P = torch.eye(H.shape[0], dtype=H.dtype) - Q.T @ Q  # one deflated probe's variance vs a plain one's
    rest = P @ H @ P
    deflated = 2 * (rest.pow(2).sum() - rest.diagonal().pow(2).sum())
    plain = 2 * (H.pow(2).sum() - H.diagonal().pow(2).sum())
    assert deflated < plain / 10
    small = H[:60, :60]  # a basis spanning the whole space leaves nothing to estimate
    whole = top_eigenvalues(DenseOperator(small), k=1, min_iter=60, max_iter=60, return_basis=True)
    exact = hutchinson_trace(DenseOperator(small), num_samples=4, basis=whole.basis, basis_trace=whole.basis_trace)
    assert exact.estimate == pytest.approx(exact_trace(small), rel=1e-9) and exact.std_error < 1e-9
    with pytest.raises(ValueError, match="method='hutchinson'"):
        hutchinson_trace(op, method="hutch++", basis=Q, basis_trace=eig.basis_trace)
    with pytest.raises(ValueError, match="basis_trace"):
        hutchinson_trace(op, basis=Q)


def test_krylov_deflated_target_holds_over_seeds() -> None:
    """The spectrum callback's default: 20 Lanczos steps, then probes (at least 10) to a 5% target."""
    H = problem("cnn")[2]
    tr, op = exact_trace(H), DenseOperator(H)
    within = 0
    for s in range(60):
        eig = top_eigenvalues(op, k=1, tol=1e-3, min_iter=20, seed=s, return_basis=True)
        result = hutchinson_trace(op, rel_tol=0.05, min_samples=10, batch=10, seed=100 + s, basis=eig.basis[:20],
                                  basis_trace=float(eig.basis_projection[:20, :20].trace()))
        within += abs(result.estimate - tr) <= 0.05 * tr
    assert within >= 53  # a 95% interval: 57 of 60 expected


def test_trace_arguments_are_checked() -> None:
    op = DenseOperator(torch.eye(4, dtype=torch.float64))
    assert hutchinson_trace(op, num_samples=8).estimate == pytest.approx(4.0)  # z^T I z = dim exactly
    with pytest.raises(ValueError, match="num_samples"):
        hutchinson_trace(op, num_samples=1)
    with pytest.raises(ValueError, match="method"):
        hutchinson_trace(op, method="girard")
    with pytest.raises(ValueError, match="confidence"):
        hutchinson_trace(op, confidence=1.5)
    with pytest.raises(ValueError, match="num_samples >= 2"):
        hutchinson_trace(op, num_samples=6, method="hutch++", sketch_size=3)


def test_density_on_the_operator_equals_the_dense_matrix_run_and_is_normalised() -> None:
    model, batch, H = problem("mlp")
    op = HessianOperator(model, loss_fn, batch)
    ours = spectral_density(op, num_runs=6, lanczos_steps=25, deflate=5, seed=3)
    dense = spectral_density(DenseOperator(H), num_runs=6, lanczos_steps=25, deflate=5, seed=3)
    torch.testing.assert_close(ours.weights, dense.weights, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(ours.nodes, dense.nodes, rtol=1e-6, atol=1e-8)
    assert (ours.weights >= 0).all()
    torch.testing.assert_close(ours.weights.sum(1), torch.ones(6, dtype=torch.float64), rtol=0, atol=1e-12)
    step = float(ours.grid[1] - ours.grid[0])
    assert float(ours.density.sum()) * step == pytest.approx(1.0, abs=1e-3)
    top = spectrum("mlp").flip(0)[:5]  # the deflated outliers are spikes at the Lanczos eigenvalues (residual
    # target 1e-3: the eigenvalue error is about its square)
    torch.testing.assert_close(ours.nodes[0, :5].sort(descending=True).values, top, rtol=1e-5, atol=0)
    assert ours.num_hvps == op.num_hvps


def test_density_implied_trace_within_1pct() -> None:
    H = problem("cnn")[2]
    tr = exact_trace(H)
    result = spectral_density(DenseOperator(H), num_runs=200, lanczos_steps=10, deflate=100, batch=50, seed=0)
    assert result.trace_std_error <= 0.003 * tr
    assert abs(result.trace - tr) <= 0.01 * tr
    plain = spectral_density(DenseOperator(H), num_runs=200, lanczos_steps=10, deflate=0, batch=50, seed=0)
    assert abs(plain.trace - tr) <= 3 * plain.trace_std_error  # unbiased without deflation too, noisier
    assert plain.trace_std_error > 5 * result.trace_std_error
    full = spectral_density(DenseOperator(H), num_runs=20, lanczos_steps=10, deflate=10, batch=20)
    cheap = spectral_density(DenseOperator(H), num_runs=20, lanczos_steps=10, deflate=10, batch=20, reorth="none")
    assert cheap.trace == pytest.approx(full.trace, rel=1e-9)  # the trace needs only the first step
    torch.testing.assert_close(cheap.weights.sum(1), torch.ones(20, dtype=torch.float64), rtol=0, atol=1e-12)
    # the caller's own eigenpairs (largest algebraic here) deflate as well, with no second Lanczos run
    op = DenseOperator(H)
    pairs = top_eigenvalues(op, k=100, tol=1e-8, seed=0)
    before = op.num_hvps
    given = spectral_density(op, num_runs=200, lanczos_steps=10, batch=50, seed=0, eigenpairs=pairs)
    assert given.num_hvps == op.num_hvps - before == 200 * 10
    assert abs(given.trace - tr) <= min(0.01 * tr, 3 * given.trace_std_error)


def test_density_recovers_a_known_spectrum() -> None:
    g = torch.Generator().manual_seed(0)
    eig = torch.cat([torch.linspace(-1, 1, 30, dtype=torch.float64), torch.tensor([4.0, 6.0], dtype=torch.float64)])
    Q = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64)).Q
    op = DenseOperator(Q @ torch.diag(eig) @ Q.T)
    result = spectral_density(op, num_runs=300, lanczos_steps=32, deflate=0, sigma=0.2, batch=100)
    used = result.weights > 1e-8
    assert (torch.cdist(result.nodes[used][:, None], eig[:, None]).min(1).values < 1e-6).all()  # nodes exact
    exact = gaussian_density(result.grid, eig, torch.full((32,), 1 / 32, dtype=torch.float64), 0.2)
    step = float(result.grid[1] - result.grid[0])
    assert float((result.density - exact).abs().sum()) * step < 0.1  # L1 distance of the two densities


def test_probe_draws_ignore_the_default_device() -> None:
    """Lightning's configure_model runs under torch.device(root_device): seeded probes must not follow it."""
    from lightning_hessian.hessian.lanczos import start_vectors
    from lightning_hessian.hessian.trace import rademacher

    def draws():
        return (rademacher(3, 7, torch.Generator().manual_seed(1), torch.float32, torch.device("cpu")),
                start_vectors(7, None, 1, torch.float32, torch.device("cpu")))

    plain = draws()
    with torch.device("meta"):
        under_meta = draws()
    for a, b in zip(plain, under_meta):
        assert b.device.type == "cpu" and torch.equal(a, b)


def test_default_sketch_and_deflation_fit_a_tiny_operator() -> None:
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 6, generator=g, dtype=torch.float64)
    H = A @ A.T
    tr = hutchinson_trace(DenseOperator(H), method="hutch++", rel_tol=0.01, batch=16, max_samples=400)
    assert tr.converged and tr.std_error <= 0.01 * tr.estimate  # a 5-column sketch, probes for the rest
    assert abs(tr.estimate - float(H.trace())) <= 4 * tr.std_error
    dens = spectral_density(DenseOperator(H))  # 5 pairs deflated, the sixth from quadrature
    assert abs(dens.trace - float(H.trace())) <= 1e-8 * float(H.trace())


def test_eigenpairs_spanning_the_space_are_the_density() -> None:
    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 5, generator=g, dtype=torch.float64)
    H = A @ A.T - 2 * torch.eye(5, dtype=torch.float64)
    op = DenseOperator(H)
    pairs = top_eigenvalues(op, k=5, tol=1e-10, seed=0)  # every pair: no room left for quadrature
    before = op.num_hvps
    dens = spectral_density(op, num_runs=3, eigenpairs=pairs)
    assert op.num_hvps == before and dens.num_hvps == 0
    torch.testing.assert_close(dens.nodes, pairs.eigenvalues.to(torch.float64).expand(3, 5))
    torch.testing.assert_close(dens.weights.sum(1), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-15)
    assert dens.trace == pytest.approx(float(H.trace()), rel=1e-10) and dens.trace_std_error == 0.0
