"""Top eigenpairs by power iteration with deflation, as in the ABSA and HAWQ papers.

Kept for parity with those papers' numbers: ``top_eigenvalues`` (Lanczos) reaches the same pairs with
several times fewer Hessian-vector products and should be preferred otherwise.
"""

from __future__ import annotations

import torch

from lightning_hessian.hessian.lanczos import EigenResult, check_common, start_vectors
from lightning_hessian.hessian.operator import LinearOperator, check_finite, working_dtype


def power_iteration(
    op: LinearOperator,
    k: int = 1,
    max_iter: int = 100,
    tol: float = 1e-4,
    v0: torch.Tensor | None = None,
    seed: int = 0,
) -> EigenResult:
    """The ``k`` largest-magnitude eigenpairs, one at a time, each iterated in the complement of the
    ones already found (projection deflation).

    Args:
        op: a ``HessianOperator`` (or anything with ``dim``, ``dtype``, ``device`` and ``matmat``).
        k: number of eigenpairs.
        max_iter: most HVPs per eigenpair.
        tol: stop an eigenpair when ``||H v - lambda v|| <= tol * |lambda|`` (a residual test, rather than
            the change of the Rayleigh quotient, which stalls early on close eigenvalues).
        v0: start vectors, ``(dim,)`` or ``(p, dim)``: row ``i`` starts eigenpair ``i`` (the rest are
            seeded Gaussians).
        seed: seed of the Gaussian start vectors.

    Returns the pairs ordered by decreasing magnitude (``which="LM"`` of ``top_eigenvalues``).

    Example::

        >>> import torch
        >>> from lightning_hessian.hessian import DenseOperator, power_iteration
        >>> H = torch.diag(torch.tensor([5.0, -4.0, 1.0, 0.5], dtype=torch.float64))
        >>> [round(v, 6) for v in power_iteration(DenseOperator(H), k=2, tol=1e-9).eigenvalues.tolist()]
        [5.0, -4.0]
    """
    check_common(op, k, "LM", tol, max_iter)
    work = working_dtype(op.dtype)  # vectors in at least float32, as Lanczos keeps its basis
    given = start_vectors(op.dim, v0, seed, work, op.device) if v0 is not None else None
    g = torch.Generator().manual_seed(seed)
    found = torch.zeros(0, op.dim, dtype=work, device=op.device)
    values, residuals = [], []
    num_hvps, converged = 0, True
    for i in range(k):
        if given is not None and i < given.shape[0]:
            v = given[i].clone()
        else:
            v = torch.randn(op.dim, generator=g, device="cpu", dtype=torch.float64).to(device=op.device, dtype=work)
        lam, res, done, x = 0.0, float("inf"), False, v
        for _ in range(max_iter):
            x = v - found.T @ (found @ v)
            x /= torch.linalg.vector_norm(x)
            v = check_finite(op, op.matmat(x[None]))[0].to(work)
            num_hvps += 1
            v -= found.T @ (found @ v)  # the deflated operator (I - UU^T) H (I - UU^T)
            lam = float(torch.dot(x, v))
            res = float(torch.linalg.vector_norm(v - lam * x))
            if res <= tol * abs(lam):
                done = True
                break
        converged &= done
        values.append(lam)
        residuals.append(res)
        found = torch.cat([found, x[None]])
    order = torch.argsort(torch.tensor(values, dtype=torch.float64).abs(), descending=True)
    return EigenResult(
        eigenvalues=torch.tensor(values, dtype=torch.float64)[order],
        eigenvectors=found[order.to(found.device)],
        residual_norms=torch.tensor(residuals, dtype=torch.float64)[order],
        num_hvps=num_hvps,
        converged=converged,
        iterations=num_hvps,
    )
