"""Lanczos and power iteration against the dense spectrum (eigvalsh of the torch.func Hessian)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_hessian.hessian import DenseOperator, HessianOperator, dense_hessian, power_iteration, top_eigenvalues
from tests.helpers.problems import loss_fn, problem, spectrum


def reference(H: torch.Tensor, which: str, k: int, ev: torch.Tensor | None = None) -> torch.Tensor:
    ev = torch.linalg.eigvalsh(H) if ev is None else ev
    order = {"LA": ev.argsort(descending=True), "SA": ev.argsort(), "LM": ev.abs().argsort(descending=True)}
    return ev[order[which]][:k]


def assert_pairs(result, H: torch.Tensor, which: str, k: int, ev: torch.Tensor | None = None) -> None:
    ref = reference(H, which, k, ev)
    rel_err = (result.eigenvalues - ref).abs() / ref.abs()
    assert rel_err.max() <= 1e-4, (which, rel_err)
    X = result.eigenvectors
    true_res = torch.linalg.vector_norm(X @ H - result.eigenvalues[:, None] * X, dim=1)
    torch.testing.assert_close(result.residual_norms, true_res, rtol=1e-3, atol=1e-10)  # estimates are honest
    assert (true_res <= 1e-3 * result.eigenvalues.abs()).all()  # the default residual target
    torch.testing.assert_close(X @ X.T, torch.eye(k, dtype=X.dtype), atol=1e-8, rtol=0)
    assert result.converged


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("which", ["LA", "LM", "SA"])
def test_top5_match_dense_spectrum(kind: str, which: str) -> None:
    model, batch, H = problem(kind)
    op = HessianOperator(model, loss_fn, batch)
    result = top_eigenvalues(op, k=5, which=which)
    assert_pairs(result, H, which, 5, spectrum(kind))
    assert result.num_hvps == op.num_hvps <= 150


def test_thick_restart_with_a_small_basis_keeps_accuracy() -> None:
    H = problem("cnn")[2]
    op = DenseOperator(H)
    for which in ("LA", "SA"):
        result = top_eigenvalues(op, k=5, which=which, ncv=12)
        assert_pairs(result, H, which, 5, spectrum("cnn"))
        assert result.num_hvps > 12  # the basis did restart


def test_warm_start_from_previous_eigenvectors_saves_hvps() -> None:
    H = problem("cnn")[2]
    # the Lanczos run itself (the search for repeated values after it costs the same either way: below)
    cold = top_eigenvalues(DenseOperator(H), k=5, which="SA", check_multiplicity=False)
    noise = torch.randn(cold.eigenvectors.shape, generator=torch.Generator().manual_seed(0), dtype=H.dtype)
    perturbed = cold.eigenvectors + 0.1 * noise / H.shape[0] ** 0.5  # as after a little training
    warm = top_eigenvalues(DenseOperator(H), k=5, which="SA", v0=perturbed, check_multiplicity=False)
    assert_pairs(warm, H, "SA", 5, spectrum("cnn"))
    assert warm.num_hvps < 0.8 * cold.num_hvps
    searched = top_eigenvalues(DenseOperator(H), k=5, which="SA", v0=perturbed)
    assert_pairs(searched, H, "SA", 5, spectrum("cnn"))
    assert searched.num_hvps < top_eigenvalues(DenseOperator(H), k=5, which="SA").num_hvps
    block = top_eigenvalues(DenseOperator(H), k=5, which="SA", v0=perturbed, block_size=5)  # through matmat
    assert_pairs(block, H, "SA", 5, spectrum("cnn"))


def test_small_dense_matrices_and_exact_invariant_subspaces() -> None:
    g = torch.Generator().manual_seed(0)
    Qm = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64)).Q
    eig = torch.tensor([5.0, 5.0, 2.0, -1.0, -7.0, 0.5], dtype=torch.float64)  # a double eigenvalue
    H = Qm @ torch.diag(eig) @ Qm.T
    result = top_eigenvalues(DenseOperator(H), k=6, which="LM")
    torch.testing.assert_close(result.eigenvalues, torch.tensor([-7.0, 5, 5, 2, -1, 0.5], dtype=torch.float64))
    start = Qm[:, 0] + Qm[:, 2]  # lies in a 2-D invariant subspace; the third pair needs a fresh direction
    result = top_eigenvalues(DenseOperator(H), k=3, v0=start)
    torch.testing.assert_close(result.eigenvalues, torch.tensor([5.0, 5, 2], dtype=torch.float64))


def test_bf16_operator_keeps_a_float32_basis() -> None:
    g = torch.Generator().manual_seed(0)
    Qm = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64)).Q
    H = (Qm @ torch.diag(torch.linspace(-0.5, 1.0, 64, dtype=torch.float64) ** 3) @ Qm.T).bfloat16()
    exact = torch.linalg.eigvalsh(H.double()).flip(0)[:3]
    result = top_eigenvalues(DenseOperator(H), k=3, tol=1e-2)
    torch.testing.assert_close(result.eigenvalues, exact, rtol=2e-2, atol=0)  # bf16 products: ~3 digits


def test_bf16_power_iteration_keeps_float32_vectors() -> None:
    g = torch.Generator().manual_seed(0)
    Qm = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64)).Q
    eig = torch.cat([torch.tensor([10.0, 8.0, 6.0]), torch.linspace(-1, 1, 197)]).double()
    op = DenseOperator((Qm @ torch.diag(eig) @ Qm.T).bfloat16())
    result = power_iteration(op, k=3, max_iter=300, tol=1e-3)  # in bf16 it never converged (632 HVPs)
    assert result.converged and result.eigenvectors.dtype == torch.float32
    torch.testing.assert_close(result.eigenvalues, eig[:3], rtol=2e-3, atol=0)


def test_block_lanczos_pads_the_start_with_distinct_rows() -> None:
    g = torch.Generator().manual_seed(0)
    Qm = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64)).Q
    H = Qm @ torch.diag(torch.cat([torch.tensor([3.0, 3.0]), torch.linspace(0, 1, 18)]).double()) @ Qm.T
    op = DenseOperator(H)
    rows = []
    op.matmat = lambda V, mm=op.matmat: rows.append(V.shape[0]) or mm(V)
    result = top_eigenvalues(op, k=2, block_size=2, check_multiplicity=False)  # the block alone sees both copies
    assert set(rows) == {2}
    torch.testing.assert_close(result.eigenvalues, torch.tensor([3.0, 3.0], dtype=torch.float64))


def test_power_iteration_with_deflation_matches_and_costs_more() -> None:
    model, batch, H = problem("cnn")
    op = HessianOperator(model, loss_fn, batch)
    power = power_iteration(op, k=3, max_iter=2000, tol=1e-5)
    ref = reference(H, "LM", 3, spectrum("cnn"))
    assert ((power.eigenvalues - ref).abs() / ref.abs()).max() <= 1e-4
    assert power.converged
    assert power.num_hvps > 2 * top_eigenvalues(op, k=3, which="LM").num_hvps


def test_budget_and_bad_arguments() -> None:
    H = problem("mlp")[2]
    op = DenseOperator(H)
    capped = top_eigenvalues(op, k=5, which="SA", max_iter=15)
    assert capped.num_hvps == 15 and not capped.converged
    with pytest.raises(ValueError, match="k must"):
        top_eigenvalues(op, k=0)
    with pytest.raises(ValueError, match="which"):
        top_eigenvalues(op, which="largest")
    with pytest.raises(ValueError, match="v0"):
        top_eigenvalues(op, v0=torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="ncv"):
        top_eigenvalues(op, k=5, ncv=6)


@pytest.mark.parametrize("spectrum_head", [[4.0, 2.0, 1.0, 0.0], [5.0, 4.0, 3.0, -1.0]])
def test_a_closed_krylov_space_is_not_taken_for_the_answer(spectrum_head) -> None:
    """The start vector's Krylov space closes after 4 products (3 distinct values + one copy of the repeated
    one): its pairs are exact but the wanted ones lie outside; they used to come back 'converged'."""
    g = torch.Generator().manual_seed(0)
    Qm = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64)).Q
    eig = torch.tensor(spectrum_head[:3] + [spectrum_head[3]] * 57, dtype=torch.float64)
    result = top_eigenvalues(DenseOperator(Qm @ torch.diag(eig) @ Qm.T), k=3, which="SA")
    assert result.converged
    torch.testing.assert_close(result.eigenvalues, torch.full((3,), spectrum_head[3], dtype=torch.float64),
                               rtol=0, atol=1e-10)


def _regression_head(outputs: int, seed: int) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """A linear layer with ``outputs`` outputs under MSE: its Hessian is ``I_outputs (x) X^T X`` up to a factor,
    so every eigenvalue appears exactly ``outputs`` times."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(12, outputs).double()
    x = torch.randn(64, 12, generator=g, dtype=torch.float64) * torch.linspace(0.3, 2.0, 12, dtype=torch.float64)
    return model, (x, torch.randn(64, outputs, generator=g, dtype=torch.float64))


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(model(batch[0]), batch[1])


@pytest.mark.parametrize("outputs", [2, 3])
@pytest.mark.parametrize("seed", range(4))
def test_repeated_top_eigenvalues_are_counted_with_multiplicity(outputs: int, seed: int) -> None:
    """One start vector's Krylov space holds one copy of each eigenvalue: the second top eigenvalue used to be
    the next distinct value, with residuals ~1e-4 and no warning."""
    model, batch = _regression_head(outputs, seed)
    exact = torch.linalg.eigvalsh(dense_hessian(model, mse, batch)).flip(0)
    for k in (2, outputs + 1, 5):
        result = top_eigenvalues(HessianOperator(model, mse, batch), k=k, seed=seed)
        torch.testing.assert_close(result.eigenvalues, exact[:k], rtol=1e-4, atol=0)
        assert result.converged
    plain = top_eigenvalues(HessianOperator(model, mse, batch), k=outputs, seed=seed, check_multiplicity=False)
    assert plain.eigenvalues[1] < exact[1] * (1 - 1e-3)  # what a single Krylov space sees


def test_the_multiplicity_search_costs_nothing_at_k_1() -> None:
    model, batch, _ = problem("cnn")
    op = HessianOperator(model, loss_fn, batch)
    searched, plain = (top_eigenvalues(op, k=1, check_multiplicity=flag) for flag in (True, False))
    assert searched.num_hvps == plain.num_hvps and torch.equal(searched.eigenvalues, plain.eigenvalues)


@pytest.mark.parametrize("seed", range(4))
def test_clustered_repeated_values_at_the_top_are_all_found(seed: int) -> None:
    """Three values within 3% of each other, each repeated 2-4 times, above 37 distinct ones: a copy hiding in
    the pending direction (rounding turns it there once the Krylov space closes), or in a search vector mixed
    with a close neighbour, used to be missed."""
    g = torch.Generator().manual_seed(seed)
    Qm = torch.linalg.qr(torch.randn(120, 120, generator=g, dtype=torch.float64)).Q
    top = torch.tensor([7.9, 7.8, 7.7], dtype=torch.float64) + 0.01 * torch.rand(3, generator=g, dtype=torch.float64)
    values = torch.cat([top.repeat_interleave(2 + seed % 3), torch.linspace(-2, 7.6, 120 - 3 * (2 + seed % 3),
                                                                             dtype=torch.float64)])
    H = Qm @ torch.diag(values) @ Qm.T
    exact = torch.linalg.eigvalsh(H)
    for which, order in (("LA", exact.flip(0)), ("SA", exact), ("LM", exact[exact.abs().argsort(descending=True)])):
        for k in (2, 4, 6):
            result = top_eigenvalues(DenseOperator(H), k=k, which=which, seed=seed)
            torch.testing.assert_close(result.eigenvalues, order[:k], rtol=1e-4, atol=1e-8)


def test_stop_above_ends_once_the_eigenvalues_are_known_to_exceed_it() -> None:
    H = problem("cnn")[2]
    top = spectrum("cnn").flip(0)
    full = top_eigenvalues(DenseOperator(H), k=2, tol=1e-8, check_multiplicity=False)
    for k, threshold in ((1, 0.5 * float(top[0])), (2, 0.8 * float(top[1]))):
        early = top_eigenvalues(DenseOperator(H), k=k, tol=1e-8, stop_above=threshold)
        # Ritz values are lower bounds: past the threshold, below the true eigenvalues, long before convergence
        assert (early.eigenvalues > threshold).all() and (early.eigenvalues <= top[:k] * (1 + 1e-12)).all()
        assert not early.converged and early.num_hvps < full.num_hvps / 2
        stepped = early.eigenvectors @ H  # the next warm start: a power step on, from the products made
        stepped /= torch.linalg.vector_norm(stepped, dim=1, keepdim=True)
        torch.testing.assert_close(early.stepped_vectors, stepped)
    unreachable = top_eigenvalues(DenseOperator(H), k=1, tol=1e-8, stop_above=2 * float(top[0]))
    assert unreachable.converged and torch.allclose(unreachable.eigenvalues, top[:1])
    with pytest.raises(ValueError, match="stop_above needs which='LA'"):
        top_eigenvalues(DenseOperator(H), which="SA", stop_above=0.0)
