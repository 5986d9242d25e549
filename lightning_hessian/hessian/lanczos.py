"""Extreme eigenpairs by thick-restart (block) Lanczos with full reorthogonalisation.

The solver keeps an orthonormal basis ``V`` and the projection ``T = V^T H V`` of the operator, so restarts
(keep the best Ritz vectors, continue from the residual directions) and warm starts from several vectors
(e.g. last epoch's eigenvectors) are the same operation. It is written as a "reverse communication" loop
(``request`` vectors, ``feed`` their products) so several solvers can share one batched ``matmat`` call:
``blocks.per_layer_top_eigenvalue`` runs one per layer in lockstep.

One start vector's Krylov space holds one copy of each eigenvalue, so a repeated eigenvalue (a linear head
with several outputs under MSE repeats every value once per output) would be found once and the next distinct
value taken for the following pair, with small residuals. For ``k > 1`` the solver therefore searches for
copies once its pairs have converged: a second Lanczos run in the complement of the basis, from a random
vector, until its extreme pair converges; a value it finds among the wanted ones joins the basis and the
search repeats, so ``k`` pairs are the top ``k`` counted with multiplicity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from lightning_hessian.checks import check_choice, check_positive_int
from lightning_hessian.hessian.operator import LinearOperator, check_finite, working_dtype

WHICH = ("LA", "LM", "SA")
SEARCH_TOL = 1e-2  # the search for repeated eigenvalues runs until its pair's residual is this small (relative)


@dataclass
class EigenResult:
    """Eigenpairs of a Hessian operator.

    ``eigenvalues`` (float64, CPU) are ordered by ``which``: descending for "LA", descending magnitude for
    "LM", ascending for "SA"; ``eigenvectors`` is ``(k, dim)`` (rows, unit norm, on the operator's device);
    ``residual_norms[i] = ||H x_i - lambda_i x_i||``; ``num_hvps`` counts the HVPs this call made;
    ``converged`` says every residual met ``tol * |lambda_i|``. ``stepped_vectors`` are the rows ``H x_i`` at unit
    norm, known from the products made (one power step beyond the Ritz vectors, for free): for ``"LA"`` and
    ``"LM"``, a better warm start for the next call than ``eigenvectors`` when the run stopped before
    converging. With ``return_basis``, ``basis`` holds the orthonormal Krylov basis ``V`` (rows, in the order
    built, unless a restart compressed it) the run multiplied by ``H``, and ``basis_projection = V H V^T``,
    known without further products; its trace ``basis_trace`` is the exact part of a deflated trace estimate
    (``hutchinson_trace(op, basis=..., basis_trace=...)``).
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residual_norms: torch.Tensor
    num_hvps: int
    converged: bool
    iterations: int
    basis: torch.Tensor | None = None
    basis_projection: torch.Tensor | None = None
    stepped_vectors: torch.Tensor | None = None

    @property
    def basis_trace(self) -> float | None:
        return None if self.basis_projection is None else float(self.basis_projection.trace())


def check_common(op: LinearOperator, k: int, which: str, tol: float, max_iter: int) -> None:
    check_positive_int(k, "k")
    if k > op.dim:
        raise ValueError(f"k={k} exceeds the operator dimension {op.dim}")
    check_choice(which, "which", WHICH)
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}")
    check_positive_int(max_iter, "max_iter")


def start_vectors(
    dim: int, v0: torch.Tensor | None, seed: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``v0`` as ``(p, dim)`` rows, or one seeded Gaussian vector (drawn on CPU: same on every device/rank)."""
    if v0 is None:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(1, dim, generator=g, device="cpu", dtype=torch.float64).to(device=device, dtype=dtype)
    v0 = v0.detach().to(device=device, dtype=dtype)
    if v0.dim() == 1:
        v0 = v0[None]
    if v0.dim() != 2 or v0.shape[1] != dim or v0.shape[0] == 0:
        raise ValueError(f"v0 must have shape (dim,) or (p, dim) with dim={dim}, got {tuple(v0.shape)}")
    if not bool(torch.isfinite(v0).all()):
        raise ValueError("v0 holds NaN or Inf")
    return v0


_CLOSED = 1e-10  # a new direction this small (relative to ||H||) is rounding left by an invariant subspace


class KrylovSolver:
    """One thick-restart Lanczos run on an operator of size ``dim`` (reverse communication).

    ``request()`` returns the rows whose products are needed next (``None`` once finished);
    ``feed(HX)`` gives them back. ``ncv`` bounds the basis (memory ``ncv * dim``); ``block_size`` is how
    many vectors go to the operator at once (default: the number of start vectors). With
    ``check_multiplicity`` (and ``k > 1``), converged pairs are followed by the search for repeated
    eigenvalues (module docstring); its products count in ``num_hvps``. ``deflate`` (orthonormal rows): the
    solver works in their orthogonal complement (the caller projects the products), as that search does.
    ``stop_above`` (``which="LA"``): finish once the ``k``-th Ritz value exceeds it (``decided``).
    """

    def __init__(
        self,
        dim: int,
        k: int,
        which: str,
        start: torch.Tensor,
        tol: float,
        max_iter: int,
        ncv: int | None,
        block_size: int | None,
        seed: int,
        min_iter: int = 0,
        check_multiplicity: bool = True,
        deflate: torch.Tensor | None = None,
        stop_above: float | None = None,
    ):
        self.dim, self.k, self.which, self.tol, self.max_iter = dim, k, which, tol, max_iter
        self.stop_above = stop_above
        self.decided = False  # the k-th Ritz value passed ``stop_above``: every wanted value is known to exceed it
        self.deflate = deflate
        self.space = dim - (0 if deflate is None else deflate.shape[0])  # dimension of the space searched
        self.min_iter = min(min_iter, self.space)
        self.block = block_size or start.shape[0]
        p = start.shape[0]
        default = max(2 * k + 2 * max(self.block, p), k + p + self.block + 20, min(100, 2**27 // dim))
        self.cap = min(self.space, ncv if ncv is not None else default)
        if self.cap < self.space and self.cap < k + p + self.block + 1:
            raise ValueError(f"ncv={self.cap} too small: need at least k + len(v0) + block_size + 1")
        self.V = torch.empty(self.cap, dim, dtype=start.dtype, device=start.device)  # rows past ``m`` unused
        self.T = np.zeros((self.cap, self.cap))  # float64 on the CPU: small dense work is cheaper in NumPy
        self.seed = seed
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.eps = torch.finfo(start.dtype).eps
        self.scale = 0.0  # running estimate of ||H|| (largest projection seen), for the breakdown threshold
        self.n = 0  # basis vectors whose products are known (columns of T filled)
        self.m = 0  # basis vectors in use; V[n:m] are pending
        self.closed = False  # the last products added no direction beyond rounding: an invariant subspace
        self.wanted_when_closed: np.ndarray | None = None
        self._append(start.clone(), float(torch.linalg.vector_norm(start, dim=1).max()))
        if self.m == 0:
            raise ValueError("v0 is zero")
        self.num_hvps = 0
        self.iterations = 0
        self.theta, self.S, self.residuals = np.zeros(0), np.zeros((0, 0)), np.zeros(0)
        self.converged = False
        self.searched = not (check_multiplicity and k > 1)  # no copy of a wanted value left to look for
        self.searches = 0
        self.search: KrylovSolver | None = None  # the run looking for copies, while one is under way

    # ------------------------------------------------------------------------------------- basis work
    def _orthogonalise(self, W: torch.Tensor, upto: int) -> torch.Tensor:
        """Coefficients ``h`` of ``W`` on ``V[:upto]`` (two Gram-Schmidt passes); ``W`` is updated in place."""
        if upto == 0:
            return W.new_zeros(W.shape[0], 0)
        basis = self.V[:upto]
        h = W @ basis.T
        W.addmm_(h, basis, alpha=-1)
        h2 = W @ basis.T
        W.addmm_(h2, basis, alpha=-1)
        return h.add_(h2)

    def _append(self, W: torch.Tensor, scale: float) -> np.ndarray:
        """Orthonormalise the rows of ``W`` (already orthogonal to the basis: ``_orthogonalise``) against each
        other, and append the new directions.

        Returns ``B`` with ``W_j = sum_l B[l, j] q_l`` over the appended ``q_l``; a row left with a norm
        below rounding level of ``scale`` adds no new direction (an invariant subspace, or the whole
        space, is spanned) and is dropped.
        """
        coeffs = np.zeros((W.shape[0], W.shape[0]))
        added, closed = 0, True
        for j in range(W.shape[0]):
            w = W[j]
            new = self.V[self.m : self.m + added]
            for _ in range(2 if added else 0):
                c = new @ w
                w.addmv_(new.T, c, alpha=-1)
                coeffs[:added, j] += c.double().cpu().numpy()
            beta = float(torch.linalg.vector_norm(w))
            closed &= beta <= _CLOSED * scale
            if beta > 100 * self.eps * scale and self.m + added < self.cap:
                coeffs[added, j] = beta
                torch.div(w, beta, out=self.V[self.m + added])
                added += 1
        self.closed = closed
        self.m += added
        return coeffs[:added]

    def _random_direction(self) -> None:
        """Add a random direction orthogonal to the basis (after an invariant subspace is found)."""
        w = torch.randn(1, self.dim, generator=self.gen, device="cpu", dtype=torch.float64).to(self.V)
        for _ in range(2 if self.deflate is not None else 0):
            w -= (w @ self.deflate.T) @ self.deflate
        self._orthogonalise(w, self.m)
        self.V[self.m] = w[0] / torch.linalg.vector_norm(w[0])
        self.m += 1

    def request(self) -> torch.Tensor | None:
        """Rows ``X`` (``(c, dim)``) whose products ``H X`` are needed next, or ``None`` when finished."""
        if self.search is not None:
            X = self.search.request()
            if X is not None:  # projected, so the search sees the operator restricted to the complement
                return X - (X @ self.search.deflate.T) @ self.search.deflate
            self.converged, self.searched, self.search = self.search.converged, self.search.converged, None
        if self.converged or self.decided or self.num_hvps >= self.max_iter:
            return None
        if self.m == self.n:  # no pending direction: the basis spans an invariant subspace
            if self.m >= self.space:
                return None
            if self.m + 1 > self.cap:
                self._restart()
            self._random_direction()
        elif self.m + self.block > self.cap and self.m < self.space and self.n > self.k:
            self._restart()
        c = min(self.block, self.m - self.n, self.max_iter - self.num_hvps)
        return self.V[self.n : self.n + c]

    def feed(self, HX: torch.Tensor) -> None:
        """Take the products of the rows last returned by ``request``."""
        c = HX.shape[0]
        if self.search is not None:
            self._feed_search(HX.to(self.V))
            return
        j0, j1 = self.n, self.n + c
        W = HX.to(self.V).clone()
        h = self._orthogonalise(W, self.m).double().cpu().numpy()
        self.T[j0:j1, : self.m] = h
        self.T[: self.m, j0:j1] = h.T
        if c > 1:  # the block's own coefficients, symmetrised (equal up to rounding)
            D = self.T[j0:j1, j0:j1]
            D[:] = 0.5 * (D + D.T)
        self.scale = max(self.scale, float(np.abs(h).max()))
        self.n = j1
        m_before = self.m
        B = self._append(W, self.scale)
        if B.shape[0]:
            self.T[m_before : self.m, j0:j1] = B
            self.T[j0:j1, m_before : self.m] = B.T
        self.num_hvps += c
        self.iterations += 1
        self._ritz()
        self._check_closed_subspace()
        if self.converged and not self.searched and not self.decided:
            self._start_search()

    # ---------------------------------------------------------------------------- repeated eigenvalues
    def _start_search(self) -> None:
        """Look for copies of the wanted values: Lanczos from a random vector orthogonal to the multiplied basis (a
        copy of a found eigenvalue is orthogonal to the whole Krylov space in exact arithmetic). The pending
        directions stay in the search's space: once the Krylov space has closed, rounding leaves the next one
        pointing at the very copy that is missing."""
        basis = self.V[: self.n]
        if self.n >= self.space:  # the basis spans the space: nothing left unseen
            self.searched = True
            return
        budget = self.max_iter - self.num_hvps
        self.converged = False  # until the search says nothing wanted is left (or the budget ends first)
        if budget <= 0:
            return
        g = torch.Generator().manual_seed(self.seed + 7919 + self.searches)
        w = torch.randn(1, self.dim, generator=g, device="cpu", dtype=torch.float64).to(self.V)
        for _ in range(2):
            w -= (w @ basis.T) @ basis
        if float(torch.linalg.vector_norm(w)) <= 100 * self.eps * math.sqrt(self.dim):
            self.converged = self.searched = True
            return
        self.searches += 1
        self.search = KrylovSolver(self.dim, 1, self.which, w, max(self.tol, SEARCH_TOL), budget, None, 1,
                                   self.seed + self.searches, check_multiplicity=False, deflate=basis)

    def _feed_search(self, HX: torch.Tensor) -> None:
        """Products for the search, restricted to the complement. A value it finds among the wanted ones joins
        this basis as the next direction to multiply, once converged to ``tol``; it ends without one once its
        pair has converged nearer its own value than the wanted ones (no wanted copy hides behind it)."""
        search = self.search
        search.feed(HX - (HX @ search.deflate.T) @ search.deflate)
        self.num_hvps += HX.shape[0]
        self.iterations += 1
        if not search.n:
            return
        if not self._wanted_over(float(search.theta[0])):
            gap = self._distance(float(search.theta[0]))
            if search.converged and not search.closed and float(search.residuals[0]) > gap / 2:
                search.converged = False
            return
        if float(search.residuals[0]) > self.tol * abs(float(search.theta[0])) and search.n < search.space:
            search.tol, search.converged = self.tol, False  # a wanted value: join only once as precise as the rest
            return
        found = self.search.result().eigenvectors[:1].clone()
        self.search = None
        if self.m + 1 > self.cap and self.n > self.k:
            self._restart()
        self._insert(found)

    def _insert(self, u: torch.Tensor) -> None:
        """Put ``u`` (a row orthogonal to the multiplied basis) first among the pending directions.

        The pending rows ``P`` carry the basis relation ``H V_n = V_n T + P^T B``; they are re-expressed as
        ``u`` and the orthonormalised rest of them, and ``B`` with them, so a pending direction that rounding
        has turned towards ``u`` hands its coupling to ``u`` instead of hiding it.
        """
        n, m = self.n, self.m
        self._orthogonalise(u, n)
        norm = float(torch.linalg.vector_norm(u))
        if m + 1 > self.cap or norm <= 100 * self.eps:  # no room (a tiny ncv), or nothing new after all
            self.converged = self.searched = True
            return
        u = u / norm
        P, B = self.V[n:m].clone(), self.T[n:m, :n].copy()
        along = P @ u[0]  # P = along u + rest
        rest = P - along[:, None] * u
        kept = list(rest)
        for _ in range(2):  # orthonormalise the rest among themselves, dropping what lies along u
            out = []
            for r in kept:
                for q in out:
                    r = r - torch.dot(q, r) * q
                if float(torch.linalg.vector_norm(r)) > 100 * self.eps:
                    out.append(r / torch.linalg.vector_norm(r))
            kept = out
        Q = torch.stack(kept) if kept else P[:0]
        C = (rest @ Q.T).double().cpu().numpy()  # rest = C Q
        self.T[n:, :] = 0
        self.T[:, n:] = 0
        rows = np.concatenate([(along.double().cpu().numpy() @ B)[None], C.T @ B])  # u's and Q's couplings
        self.V[n] = u[0]
        self.V[n + 1 : n + 1 + Q.shape[0]] = Q
        self.T[n : n + rows.shape[0], :n] = rows
        self.T[:n, n : n + rows.shape[0]] = rows.T
        self.m = n + rows.shape[0]
        self.converged = False

    def _wanted_over(self, value: float) -> bool:
        """Whether ``value`` belongs among the ``k`` wanted values found so far (ties within ``tol`` included)."""
        return self._distance(value) <= 0

    def _distance(self, value: float) -> float:
        """How far ``value`` lies on the unwanted side of the ``k``-th wanted value (less ``tol`` of it)."""
        kth = float(self.theta[self.k - 1])
        margin = self.tol * abs(kth)
        if self.which == "LA":
            return kth - margin - value
        if self.which == "SA":
            return value - kth - margin
        return abs(kth) - margin - abs(value)

    def _check_closed_subspace(self) -> None:
        """Pairs of an invariant subspace have zero residuals but say nothing of the rest of the space: after the
        basis closes (``n < dim``), a fresh direction (random, or what rounding left) is explored, and the pairs
        count as converged only once such an exploration closed again without changing them, or changed them and
        then passed the residual test."""
        if self.n < self.k or self.n >= self.space:
            return
        wanted = self.theta[: self.k]
        known = self.wanted_when_closed
        same = known is not None and np.allclose(wanted, known, rtol=self.tol, atol=self.tol * self.scale)
        if self.closed:
            self.wanted_when_closed = wanted.copy()
            self.converged = same and self.num_hvps >= self.min_iter
        elif same:  # exploring a new direction that has not (yet) changed the wanted pairs
            self.converged = False

    # ------------------------------------------------------------------------------------ Rayleigh-Ritz
    def _ritz(self) -> None:
        n = self.n
        theta, S = np.linalg.eigh(self.T[:n, :n])  # T is kept exactly symmetric
        key = -theta if self.which == "LA" else theta if self.which == "SA" else -np.abs(theta)
        order = np.argsort(key, kind="stable")
        theta, S = theta[order], S[:, order]
        residuals = np.linalg.norm(self.T[n : self.m, :n] @ S, axis=0)
        self.theta, self.S, self.residuals = theta, S, residuals
        if n >= self.k:
            wanted = residuals[: self.k] <= self.tol * np.abs(theta[: self.k])
            self.converged = (bool(wanted.all()) and self.num_hvps >= self.min_iter) or n >= self.space
            if self.stop_above is not None and theta[self.k - 1] > self.stop_above and self.num_hvps >= self.min_iter:
                self.decided = True

    def _restart(self) -> None:
        """Keep the most wanted Ritz vectors and the pending directions; drop the rest of the basis."""
        n, m = self.n, self.m
        pending = m - n
        room = self.cap - pending - self.block
        keep = max(self.k, min(room, (room + self.k) // 2))
        S = self.S[:, :keep]
        Y = torch.from_numpy(S.T.copy()).to(self.V) @ self.V[:n]
        P = self.V[n:m].clone()
        C = self.T[n:m, :n] @ S
        self.V[:keep] = Y
        self.V[keep : keep + pending] = P
        self.T[:] = 0
        self.T[:keep, :keep] = np.diag(self.theta[:keep])
        self.T[keep : keep + pending, :keep] = C
        self.T[:keep, keep : keep + pending] = C.T
        self.n, self.m = keep, keep + pending
        self._ritz()

    def result(self, return_basis: bool = False) -> EigenResult:
        k = min(self.k, self.n)
        vectors = torch.from_numpy(self.S[:, :k].T.copy()).to(self.V) @ self.V[: self.n]
        # H V_n = V_n T + P^T B (P the pending rows), so H x_i = theta_i x_i + P^T B s_i without a product
        coupling = torch.from_numpy((self.T[self.n : self.m, : self.n] @ self.S[:, :k]).T.copy()).to(self.V)
        stepped = torch.from_numpy(self.theta[:k].copy()).to(self.V)[:, None] * vectors
        stepped += coupling @ self.V[self.n : self.m]
        stepped /= torch.linalg.vector_norm(stepped, dim=1, keepdim=True).clamp_min(torch.finfo(stepped.dtype).tiny)
        basis = self.V[: self.n].clone() if return_basis else None
        projection = torch.from_numpy(self.T[: self.n, : self.n].copy()) if return_basis else None
        return EigenResult(
            eigenvalues=torch.from_numpy(self.theta[:k].copy()),
            eigenvectors=vectors,
            residual_norms=torch.from_numpy(self.residuals[:k].copy()),
            num_hvps=self.num_hvps,
            converged=self.converged and k == self.k,
            iterations=self.iterations,
            basis=basis,
            basis_projection=projection,
            stepped_vectors=stepped,
        )


def top_eigenvalues(
    op: LinearOperator,
    k: int = 1,
    which: str = "LA",
    max_iter: int = 1000,
    tol: float = 1e-3,
    v0: torch.Tensor | None = None,
    seed: int = 0,
    ncv: int | None = None,
    block_size: int | None = None,
    min_iter: int = 0,
    return_basis: bool = False,
    check_multiplicity: bool = True,
    stop_above: float | None = None,
) -> EigenResult:
    """The ``k`` extreme eigenpairs of ``op`` by thick-restart Lanczos with full reorthogonalisation.

    Args:
        op: a ``HessianOperator`` (or anything with ``dim``, ``dtype``, ``device`` and ``matmat``).
        k: number of eigenpairs.
        which: ``"LA"`` largest algebraic, ``"LM"`` largest magnitude, ``"SA"`` smallest algebraic.
        max_iter: budget of Hessian-vector products (each vector counts).
        tol: stop when every wanted pair has ``||H x - lambda x|| <= tol * |lambda|``; the eigenvalue
            error is then at most ``tol * |lambda|`` and usually far smaller (quadratic in the residual).
        v0: warm start, ``(dim,)`` or ``(p, dim)`` (e.g. the previous call's ``eigenvectors``). Several
            rows are summed (unit rows) into one start vector, which converges in fewer HVPs than a block
            start; with ``block_size`` they start a block instead. Default: a Gaussian vector from ``seed``.
        ncv: basis size before a thick restart (memory ``ncv * dim``). Default: up to 100 vectors while
            the basis holds at most 2**27 numbers, and at least ``max(2k + 2b, k + 2b + 20)`` (block size
            ``b``). A larger basis means fewer HVPs, mostly for "SA" (small eigenvalues are clustered).
        block_size: run block Lanczos with this many vectors per ``matmat`` call (default 1; cheaper per
            vector when batched HVPs are, but usually more HVPs in all).
        min_iter: make at least this many HVPs even when converged earlier, to grow the Krylov basis (whose
            span holds the top and bottom of the spectrum) for a deflated trace estimate.
        return_basis: keep the Krylov basis and its projected trace in the result (``basis``,
            ``basis_trace``; memory ``basis size * dim``).
        check_multiplicity: for ``k > 1``, once the pairs converge, search the complement of the basis for
            copies of the wanted eigenvalues (a single start vector sees one copy of a repeated eigenvalue),
            so the result is the top ``k`` counted with multiplicity; it costs the products of one more
            short Lanczos run (benchmarks/hessian_vs_pyhessian.py). ``k = 1`` never needs it.
        stop_above: (``which="LA"`` only) stop as soon as the ``k``-th Ritz value exceeds this number. Ritz values
            are lower bounds of the eigenvalues (``theta_i <= lambda_i``), so every wanted eigenvalue is then known
            to exceed it, and the result holds those lower bounds (``converged`` unless they also met ``tol``):
            for a caller that only asks whether the top eigenvalue is above a threshold (ABS's growth rule).

    Products that come back NaN or infinite stop the run with ``NonFiniteError``, whose message says
    whether the loss itself is (``"the loss is NaN at this probe"``).

    Example: the top three of a matrix whose second eigenvalue is repeated, counted twice::

        >>> import torch
        >>> from lightning_hessian.hessian import DenseOperator, top_eigenvalues
        >>> H = torch.diag(torch.tensor([5.0, 3.0, 3.0, 1.0, 0.5, 0.1], dtype=torch.float64))
        >>> result = top_eigenvalues(DenseOperator(H), k=3, tol=1e-8)
        >>> [round(v, 6) for v in result.eigenvalues.tolist()], result.converged
        ([5.0, 3.0, 3.0], True)
    """
    check_common(op, k, which, tol, max_iter)
    if stop_above is not None and (which != "LA" or not math.isfinite(stop_above)):
        raise ValueError(f"stop_above needs which='LA' and a finite number, got which={which!r}, "
                         f"stop_above={stop_above!r}")
    if not isinstance(min_iter, int) or not 0 <= min_iter <= max_iter:
        raise ValueError(f"min_iter must be an int in [0, max_iter], got {min_iter!r}")
    if block_size is not None and (not isinstance(block_size, int) or not 1 <= block_size <= op.dim):
        raise ValueError(f"block_size must be an int in [1, dim], got {block_size!r}")
    start = start_vectors(op.dim, v0, seed, working_dtype(op.dtype), op.device)
    if block_size is None and start.shape[0] > 1:
        start = (start / torch.linalg.vector_norm(start, dim=1, keepdim=True)).sum(0, keepdim=True)
    elif block_size is not None and start.shape[0] < block_size:  # pad the block with seeded Gaussians
        g = torch.Generator().manual_seed(seed)  # rows after the first: the default start is that stream's first
        extra = torch.randn(block_size, op.dim, generator=g, device="cpu", dtype=torch.float64)[start.shape[0]:]
        start = torch.cat([start, extra.to(start)])
    solver = KrylovSolver(op.dim, k, which, start, tol, max_iter, ncv, block_size, seed, min_iter,
                          check_multiplicity, stop_above=stop_above)
    while (X := solver.request()) is not None:
        solver.feed(check_finite(op, op.matmat(X)))
    return solver.result(return_basis)
