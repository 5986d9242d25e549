"""Hessian trace by Hutchinson's estimator (and Hutch++), stopping on a relative standard-error target.

Probes are Rademacher vectors drawn from a seeded CPU generator (identical on every device and rank) and
pushed through ``op.matmat`` a batch at a time. The stopping rule is the estimator's own standard error:
stop once the ``confidence`` interval ``estimate +- z * SE`` lies within ``rel_tol * |estimate|`` (so a 1%
target means the error is below 1% with 95% confidence), not the change of the running mean between
two probes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lightning_hessian.checks import check_choice, check_positive_int
from lightning_hessian.hessian.operator import LinearOperator, check_finite

METHODS = ("hutchinson", "hutch++")
MIN_TRACE_SAMPLES = 32  # probes a trace takes before its stopping rule (a standard error needs a few dozen)


@dataclass
class TraceResult:
    """A trace estimate with its standard error.

    ``num_samples`` counts the Hutchinson probes behind ``std_error``; ``num_hvps`` every HVP made
    (for Hutch++ also the sketch); ``converged`` says the ``rel_tol`` target was met (always true for a
    fixed ``num_samples``).
    """

    estimate: float
    std_error: float
    num_samples: int
    num_hvps: int
    converged: bool
    method: str = "hutchinson"


def rademacher(n: int, dim: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``n`` Rademacher (+-1) rows of length ``dim``, drawn on CPU so they do not depend on the device."""
    bits = torch.randint(0, 2, (n, dim), generator=generator, device="cpu", dtype=torch.int8)
    return (bits.to(device=device, dtype=dtype) * 2 - 1).contiguous()


def segment_products(Z: torch.Tensor, HZ: torch.Tensor, segments: Sequence[Sequence[slice]]) -> torch.Tensor:
    """``(n, len(segments))``: ``z^T H z`` restricted to each segment's coordinates, in float64."""
    prod = (Z * HZ).double()
    return torch.stack([sum(prod[:, s].sum(1) for s in segment) for segment in segments], 1).cpu()


def z_score(confidence: float | None) -> float:
    """Two-sided normal quantile for ``confidence`` (1.0, a plain ``SE`` rule, for ``None``)."""
    if confidence is None:
        return 1.0
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1) or None, got {confidence!r}")
    return float(torch.special.ndtri(torch.tensor(0.5 + confidence / 2, dtype=torch.float64)))


def check_sampling(num_samples: int | None, rel_tol: float, batch: int, min_samples: int, max_samples: int) -> None:
    """Raise ``ValueError`` naming the first bad argument of a probing run."""
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 2):
        raise ValueError(f"num_samples must be an int >= 2 (or None to stop on rel_tol), got {num_samples!r}")
    if num_samples is None and not rel_tol > 0:
        raise ValueError(f"rel_tol must be > 0, got {rel_tol!r}")
    for name, value in (("batch", batch), ("min_samples", min_samples), ("max_samples", max_samples)):
        check_positive_int(value, name)
    if num_samples is None and max_samples < max(min_samples, 2):
        raise ValueError(f"max_samples ({max_samples}) must be >= max(min_samples, 2)")


def sample_until(
    draw: Callable[[int], torch.Tensor],
    offset: torch.Tensor,
    num_samples: int | None,
    rel_tol: float,
    z: float,
    batch: int,
    min_samples: int,
    max_samples: int,
) -> tuple[torch.Tensor, bool]:
    """Draw ``(n, S)`` sample rows ``batch`` at a time until every column ``s`` has
    ``z * SE_s <= rel_tol * |offset_s + mean_s|`` (at least ``min_samples``), or ``num_samples`` are drawn."""
    target = num_samples if num_samples is not None else max_samples
    chunks: list[torch.Tensor] = []
    drawn = 0
    while drawn < target:
        chunk = draw(min(batch, target - drawn))
        chunks.append(chunk)
        drawn += chunk.shape[0]
        if num_samples is None and drawn >= max(min_samples, 2):
            samples = torch.cat(chunks)
            se = samples.std(0) / math.sqrt(drawn)
            if bool((z * se <= rel_tol * (offset + samples.mean(0)).abs()).all()):
                return samples, True
    return torch.cat(chunks), num_samples is not None


def hutchinson_trace(
    op: LinearOperator,
    num_samples: int | None = None,
    rel_tol: float = 0.01,
    confidence: float | None = 0.95,
    batch: int = 16,
    min_samples: int = MIN_TRACE_SAMPLES,
    max_samples: int = 2000,
    seed: int = 0,
    method: str = "hutchinson",
    sketch_size: int | None = None,
    basis: torch.Tensor | None = None,
    basis_trace: float | None = None,
) -> TraceResult:
    """Estimate ``tr(H)`` with a standard error.

    Args:
        op: a ``HessianOperator`` (or anything with ``dim``, ``dtype``, ``device`` and ``matmat``).
        num_samples: a fixed number of probes (for Hutch++, of HVPs in all: a third sketch, a third to
            project it, a third Hutchinson on the rest, as in Meyer et al. 2021); ``None`` stops on
            ``rel_tol``.
        rel_tol: stop once ``z * std_error <= rel_tol * |estimate|`` (checked after each batch), where
            ``z`` is the two-sided normal quantile of ``confidence``.
        confidence: confidence level of the ``rel_tol`` target (0.95: z = 1.96); ``None`` for z = 1.
        batch: probes per ``matmat`` call.
        min_samples: fewest probes before the stopping rule is trusted (the standard error of a handful
            of samples is itself noisy).
        max_samples: most probes when stopping on ``rel_tol`` (``converged`` is false if reached).
        seed: seed of the probes (the same seed gives the same probes on every rank and device).
        method: ``"hutchinson"`` or ``"hutch++"``: first take the top of the spectrum exactly from a
            sketch ``Q = orth(H S)`` and estimate only ``tr((I - QQ^T) H (I - QQ^T))`` by probes, which
            pays off when a few eigenvalues dominate the trace.
        sketch_size: Hutch++ sketch columns; default ``num_samples // 3``, or ``batch`` with ``rel_tol``
            (at most ``dim - 1``).
        basis, basis_trace: deflate by a subspace already multiplied by ``H``: orthonormal rows ``Q`` with
            ``tr(Q H Q^T) = basis_trace`` known, e.g. the Krylov basis of a ``top_eigenvalues(...,
            return_basis=True)`` run, whose products are then reused for free (a Krylov-deflated Hutchinson
            estimate: the probes see only ``(I - Q^T Q) H (I - Q^T Q)``). Only with ``method="hutchinson"``.

    Example: the estimate lies within a few standard errors of the exact trace::

        >>> import torch
        >>> from lightning_hessian.hessian import DenseOperator, hutchinson_trace
        >>> A = torch.randn(60, 60, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> H = A @ A.T / 60
        >>> result = hutchinson_trace(DenseOperator(H), rel_tol=0.05)
        >>> result.converged, abs(result.estimate - float(H.trace())) <= 3 * result.std_error
        (True, True)
    """
    check_choice(method, "method", METHODS)
    check_sampling(num_samples, rel_tol, batch, min_samples, max_samples)
    z = z_score(confidence)
    gen = torch.Generator().manual_seed(seed)
    hvps = 0
    exact = 0.0
    Q = None
    remaining = num_samples
    if basis is not None:
        if method != "hutchinson":
            raise ValueError("basis deflation replaces the Hutch++ sketch: use method='hutchinson' with basis")
        if basis.dim() != 2 or basis.shape[1] != op.dim or basis_trace is None:
            raise ValueError(f"basis must be (p, dim={op.dim}) orthonormal rows with basis_trace = tr(Q H Q^T) "
                             f"given, got shape {tuple(basis.shape)} and basis_trace={basis_trace!r}")
        Q, exact = basis.to(device=op.device, dtype=op.dtype), float(basis_trace)
    if method == "hutch++":
        s = sketch_size if sketch_size is not None else (num_samples // 3 if num_samples is not None else batch)
        if sketch_size is None:
            s = min(s, op.dim - 1)
        if not isinstance(s, int) or not 1 <= s < op.dim:
            raise ValueError(f"sketch_size must be an int in [1, dim), got {s!r}")
        if num_samples is not None:
            remaining = num_samples - 2 * s
            if remaining < 2:
                raise ValueError(f"hutch++ needs num_samples >= 2 * sketch_size + 2, got {num_samples}")
        S = rademacher(s, op.dim, gen, op.dtype, op.device)
        Q = torch.linalg.qr(_batched(op, S, batch).T).Q.T.contiguous()  # (s, dim) orthonormal rows
        exact = float((Q * _batched(op, Q, batch)).sum(dtype=torch.float64))
        hvps += 2 * s

    def draw(n: int) -> torch.Tensor:
        Z = rademacher(n, op.dim, gen, op.dtype, op.device)
        if Q is not None:
            Z -= (Z @ Q.T) @ Q
        return segment_products(Z, check_finite(op, op.matmat(Z)), [[slice(0, op.dim)]])

    offset = torch.tensor([exact], dtype=torch.float64)
    samples, converged = sample_until(draw, offset, remaining, rel_tol, z, batch, min_samples, max_samples)
    n = samples.shape[0]
    return TraceResult(
        estimate=exact + float(samples.mean()),
        std_error=float(samples.std()) / math.sqrt(n),
        num_samples=n,
        num_hvps=hvps + n,
        converged=converged,
        method=method,
    )


def _batched(op: LinearOperator, X: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([check_finite(op, op.matmat(X[i : i + batch])) for i in range(0, X.shape[0], batch)])
