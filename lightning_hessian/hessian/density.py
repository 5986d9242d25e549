"""Eigenvalue density by stochastic Lanczos quadrature (SLQ), optionally with the top eigenpairs exact.

Each run starts Lanczos from a random unit vector ``v``; the tridiagonal ``T`` it builds gives nodes
(eigenvalues of ``T``) and weights (squared first components of its eigenvectors, summing to 1) of a
quadrature for ``v^T f(H) v``, whose average over runs estimates ``tr(f(H)) / dim``. Runs go through
``op.matmat`` together, ``batch`` at a time; each run keeps only its own basis (``reorth="full"``) or the
last two vectors (``reorth="none"``), so memory is ``batch * lanczos_steps * dim`` at most.

With ``deflate=d`` the top ``d`` eigenpairs (by magnitude) are first found by Lanczos and enter the density
as exact spikes of weight ``1/dim``; SLQ then runs on the rest of the space. A few large outliers carry
most of a trained network's trace and most of SLQ's variance, so this makes the implied trace (and the
outliers' positions) far more accurate for the same number of runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lightning_hessian.checks import check_choice, check_positive_int
from lightning_hessian.hessian.lanczos import EigenResult, top_eigenvalues
from lightning_hessian.hessian.operator import LinearOperator, check_finite, working_dtype

REORTH = ("full", "none")


@dataclass
class DensityResult:
    """SLQ output.

    ``nodes`` and ``weights`` are ``(num_runs, n)`` (float64): run ``r`` approximates the spectral measure
    by ``sum_j weights[r, j] * delta(nodes[r, j])``; each row of ``weights`` is non-negative and sums to 1
    (a run that hit an invariant subspace early is padded with zero weights). ``density`` is the average
    over runs of the Gaussian-smoothed measure on ``grid`` (integrates to 1 over the real line).
    ``trace = dim * mean_r sum_j w_rj lambda_rj`` with its standard error over runs.
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    grid: torch.Tensor
    density: torch.Tensor
    sigma: float
    trace: float
    trace_std_error: float
    num_hvps: int


def _lanczos_runs(
    op: LinearOperator, V0: torch.Tensor, steps: int, Q: torch.Tensor, reorth: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Lanczos from each row of ``V0`` (unit, orthogonal to the rows of ``Q``) on ``(I-QQ^T) H (I-QQ^T)``.

    Returns ``alpha (R, steps)``, ``beta (R, steps - 1)``, the length of each run and the HVPs made.
    """
    R = V0.shape[0]
    alpha = torch.zeros(R, steps, dtype=torch.float64)
    beta = torch.zeros(R, max(steps - 1, 0), dtype=torch.float64)
    length = torch.full((R,), steps, dtype=torch.long)
    keep = steps if reorth == "full" else 2
    basis = torch.zeros(keep, R, op.dim, dtype=V0.dtype, device=V0.device)
    basis[0] = V0
    active = torch.arange(R)
    eps = torch.finfo(V0.dtype).eps
    hvps = 0
    for j in range(steps):
        every = len(active) == R
        v = basis[j % keep] if every else basis[j % keep, active]
        w = check_finite(op, op.matmat(v)).to(v)
        hvps += len(active)
        if Q.shape[0]:
            w -= (w @ Q.T) @ Q
        a = (w * v).sum(1)
        alpha[active, j] = a.double().cpu()
        w -= a[:, None] * v
        if j > 0:
            prev = basis[(j - 1) % keep]
            w -= beta[active, j - 1].to(w)[:, None] * (prev if every else prev[active])
        if reorth == "full":  # two Gram-Schmidt passes against this run's own basis
            for _ in range(2):
                past = basis[: j + 1] if every else basis[: j + 1, active]  # (j+1, a, dim)
                w -= torch.einsum("jad,ja->ad", past, torch.einsum("jad,ad->ja", past, w))
            if Q.shape[0]:
                w -= (w @ Q.T) @ Q
        if j == steps - 1:
            break
        b = torch.linalg.vector_norm(w, dim=1)
        scale = alpha[active, : j + 1].abs().amax(1).to(b) + b
        stop = b <= 100 * eps * scale
        if bool(stop.any()):
            length[active[stop.cpu()]] = j + 1
        beta[active, j] = b.double().cpu()
        nxt = w / b.clamp_min(torch.finfo(b.dtype).tiny)[:, None]
        basis[(j + 1) % keep, active] = nxt
        active = active[~stop.cpu()]
        if len(active) == 0:
            break
    return alpha, beta, length, hvps


def spectral_density(
    op: LinearOperator,
    num_runs: int = 10,
    lanczos_steps: int = 40,
    grid: int | torch.Tensor = 1000,
    sigma: float | None = None,
    seed: int = 0,
    deflate: int | None = None,
    batch: int = 8,
    reorth: str = "full",
    eigenpairs: EigenResult | None = None,
) -> DensityResult:
    """Estimate the Hessian's eigenvalue density by SLQ.

    Args:
        op: a ``HessianOperator`` (or anything with ``dim``, ``dtype``, ``device`` and ``matmat``).
        num_runs: independent Lanczos runs (random unit start vectors; seeded Gaussians projected on the
            complement of the deflated pairs, so every run is an unbiased sample).
        lanczos_steps: Lanczos steps (HVPs) per run: the number of quadrature nodes.
        grid: points of an even grid over the nodes' range (padded by ``5 * sigma``), or the grid itself.
        sigma: Gaussian smoothing width; default 1% of the nodes' range.
        seed: seed of the start vectors (and of the deflation's Lanczos).
        deflate: top eigenpairs (largest magnitude) found first and kept exact (0 for plain SLQ); default
            ``min(10, dim - 1)``.
        batch: runs pushed through ``matmat`` together (memory ``batch * lanczos_steps * dim``).
        reorth: ``"full"`` (reorthogonalise each run against its own basis; reliable nodes) or ``"none"``
            (three-term recurrence, memory ``3 * batch * dim``; ghost copies of outliers may appear, the
            weights and the implied trace remain valid).
        eigenpairs: deflate by these (converged) eigenpairs instead of finding ``deflate`` of them, e.g. the
            caller's own ``top_eigenvalues`` result: any exact pairs are valid spikes, and no second Lanczos
            run is made.

    Example: each run's quadrature weights sum to one, and the implied trace is within a few standard errors::

        >>> import torch
        >>> from lightning_hessian.hessian import DenseOperator, spectral_density
        >>> A = torch.randn(60, 60, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> H = A @ A.T / 60
        >>> result = spectral_density(DenseOperator(H), num_runs=4, lanczos_steps=20, deflate=0)
        >>> torch.allclose(result.weights.sum(1), torch.ones(4, dtype=torch.float64))
        True
        >>> abs(result.trace - float(H.trace())) <= 3 * result.trace_std_error
        True
    """
    for name, value in (("num_runs", num_runs), ("lanczos_steps", lanczos_steps), ("batch", batch)):
        check_positive_int(value, name)
    if deflate is None:
        deflate = min(10, op.dim - 1)
    if not isinstance(deflate, int) or not 0 <= deflate < op.dim:
        raise ValueError(f"deflate must be an int in [0, dim), got {deflate!r}")
    check_choice(reorth, "reorth", REORTH)
    if sigma is not None and not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    dim = op.dim
    hvps = 0
    work = working_dtype(op.dtype)
    Q = torch.zeros(0, dim, dtype=work, device=op.device)
    spikes = torch.zeros(0, dtype=torch.float64)
    if eigenpairs is not None:
        Q, spikes = eigenpairs.eigenvectors.to(device=op.device, dtype=work), eigenpairs.eigenvalues
        deflate = len(spikes)
    elif deflate:
        top = top_eigenvalues(op, k=deflate, which="LM", seed=seed)
        Q, spikes, hvps = top.eigenvectors, top.eigenvalues, top.num_hvps
    steps = min(lanczos_steps, dim - deflate)
    gen = torch.Generator().manual_seed(seed + 7919)
    all_nodes, all_weights = [], []
    spike_weights = torch.full((deflate,), 1.0 / dim, dtype=torch.float64)
    for start in range(0, num_runs, batch):
        n = min(batch, num_runs - start)
        if steps == 0:  # the eigenpairs span the whole space: the spectrum is exactly theirs
            all_nodes += [spikes.to(torch.float64)] * n
            all_weights += [spike_weights] * n
            continue
        V0 = torch.randn(n, dim, generator=gen, device="cpu", dtype=torch.float64).to(device=op.device, dtype=work)
        if deflate:
            V0 -= (V0 @ Q.T) @ Q
        V0 /= torch.linalg.vector_norm(V0, dim=1, keepdim=True)
        alpha, beta, length, used = _lanczos_runs(op, V0, steps, Q, reorth)
        hvps += used
        for r in range(n):
            L = int(length[r])
            T = torch.diag(alpha[r, :L]) + torch.diag(beta[r, : L - 1], 1) + torch.diag(beta[r, : L - 1], -1)
            theta, S = torch.linalg.eigh(T)
            w = torch.zeros(steps, dtype=torch.float64)
            nodes = torch.zeros(steps, dtype=torch.float64)
            w[:L], nodes[:L] = S[0] ** 2, theta
            all_nodes.append(torch.cat([spikes, nodes]))
            all_weights.append(torch.cat([spike_weights, w * (dim - deflate) / dim]))
    nodes, weights = torch.stack(all_nodes), torch.stack(all_weights)
    traces = dim * (nodes * weights).sum(1)
    used_nodes = nodes[weights > 0]
    lo, hi = float(used_nodes.min()), float(used_nodes.max())
    if sigma is None:
        sigma = 0.01 * (hi - lo) if hi > lo else max(abs(hi), 1.0) * 1e-3
    if isinstance(grid, int):
        if grid < 2:
            raise ValueError(f"grid must be >= 2 points or a tensor, got {grid!r}")
        grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, grid, dtype=torch.float64)
    else:
        grid = torch.as_tensor(grid, dtype=torch.float64).flatten()
    density = gaussian_density(grid, nodes.flatten(), weights.flatten() / num_runs, sigma)
    return DensityResult(
        nodes=nodes,
        weights=weights,
        grid=grid,
        density=density,
        sigma=float(sigma),
        trace=float(traces.mean()),
        trace_std_error=float(traces.std() / math.sqrt(num_runs)) if num_runs > 1 else float("nan"),
        num_hvps=hvps,
    )


def gaussian_density(grid: torch.Tensor, nodes: torch.Tensor, weights: torch.Tensor, sigma: float) -> torch.Tensor:
    """``sum_j weights_j N(grid; nodes_j, sigma^2)``, evaluated in chunks of nodes to bound memory."""
    out = torch.zeros_like(grid)
    for i in range(0, nodes.numel(), 4096):
        d = (grid[:, None] - nodes[None, i : i + 4096]) / sigma
        out += (torch.exp(-0.5 * d**2) * weights[None, i : i + 4096]).sum(1)
    return out / (sigma * math.sqrt(2 * math.pi))
