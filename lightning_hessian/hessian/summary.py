"""The one spectrum measurement: options in, a record out.

``measure_spectrum`` is what ``HessianSpectrumCallback`` logs at each probe, what ``analyze_model`` reports and
what ``AdaptiveBatchSizeCallback`` decides on, so the same options on the same probe set give the same numbers
in all three. It runs, on one ``HessianOperator``:

- the top ``top_k`` eigenpairs (Lanczos, counted with multiplicity), warm-started from earlier eigenvectors
  when given: the Hessian moves little between probes, so a warm top-1 converges in a few products;
- the trace (optional): by default Hutchinson probes deflated by the eigenvalue run's Krylov basis, whose part
  of the trace is known exactly (the run goes on to ``krylov_steps`` products for it);
- per-layer top eigenvalues and traces, and the spectral density (optional).

Each part's products and seconds are in the record, so a caller can budget the next measurement.

Example: when the Krylov basis spans the whole space (23 products on 23 parameters), the trace is exact::

    >>> import torch
    >>> from torch import nn
    >>> from lightning_hessian.hessian import HessianOperator, SpectrumOptions, dense_hessian, measure_spectrum
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    >>> batch = (torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 2, (16,)))
    >>> loss_fn = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])
    >>> record = measure_spectrum(HessianOperator(model, loss_fn, batch),
    ...                           SpectrumOptions(top_k=2, tol=1e-8, krylov_steps=23))
    >>> H = dense_hessian(model, loss_fn, batch)
    >>> torch.allclose(torch.tensor(record.eigenvalues, dtype=torch.float64), torch.linalg.eigvalsh(H).flip(0)[:2])
    True
    >>> abs(record.trace - float(H.trace())) < 1e-10, record.trace_std_error < 1e-10
    (True, True)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_hessian.checks import check_choice, check_number, check_positive_int, check_seed
from lightning_hessian.hessian.blocks import per_layer_top_eigenvalue, per_layer_trace
from lightning_hessian.hessian.density import DensityResult, spectral_density
from lightning_hessian.hessian.lanczos import EigenResult, top_eigenvalues
from lightning_hessian.hessian.operator import LinearOperator, working_dtype
from lightning_hessian.hessian.trace import hutchinson_trace

TRACE_METHODS = ("krylov", "hutch++", "hutchinson")
WARM_MIX = 0.1  # a warm start's random part (relative norm): every direction, a new top one included, is present
# (at most half the residual target, so a start still on the top eigenvector converges at its first product)


@dataclass
class SpectrumOptions:
    """What ``measure_spectrum`` measures, and how precisely.

    ``tol`` is the eigenpairs' relative residual target (the eigenvalue error is at most ``tol * |lambda|``,
    usually far less); ``max_hvps`` caps each Lanczos run. The trace (``trace_method``: ``"krylov"``,
    ``"hutch++"`` or ``"hutchinson"``) stops once its ``confidence`` interval is within ``trace_rel_tol`` of the
    estimate, after at least ``trace_min_samples`` and at most ``trace_max_samples`` probes; per-layer traces
    use the same rule. The density takes ``density_runs`` SLQ runs of ``density_steps`` products, with the
    eigenpairs as exact spikes. ``seed`` seeds every random draw.
    """

    top_k: int = 1
    tol: float = 1e-3
    max_hvps: int = 1000
    trace: bool = True
    trace_method: str = "krylov"
    krylov_steps: int = 20
    trace_rel_tol: float = 0.05
    trace_min_samples: int = 10
    trace_max_samples: int = 200
    confidence: float = 0.95
    per_layer: bool = False
    density: bool = False
    density_runs: int = 10
    density_steps: int = 40
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("top_k", "max_hvps", "krylov_steps", "trace_min_samples", "trace_max_samples", "density_runs",
                     "density_steps"):
            check_positive_int(getattr(self, name), name)
        check_choice(self.trace_method, "trace_method", TRACE_METHODS)
        check_number(self.tol, "tol", 0, low_open=True)
        check_number(self.trace_rel_tol, "trace_rel_tol", 0, 1, low_open=True, high_open=True)
        check_number(self.confidence, "confidence", 0, 1, low_open=True, high_open=True)
        if self.trace_max_samples < max(self.trace_min_samples, 2):
            raise ValueError(f"trace_max_samples ({self.trace_max_samples}) must be >= max(trace_min_samples, 2)")
        check_seed(self.seed)

    @property
    def extras(self) -> bool:
        """Whether anything beyond the eigenvalues is asked for (trace, per-layer values, density)."""
        return self.trace or self.per_layer or self.density


@dataclass
class SpectrumRecord:
    """One measurement. ``eigen`` holds the eigenpairs (vectors for a warm start or a landscape walk);
    ``hvps`` and ``seconds`` count everything, ``part_hvps`` / ``part_seconds`` each part
    (``"eigenvalues"``, ``"trace"``, ``"per_layer"``, ``"density"``). ``trace_converged`` is false when the
    trace stopped at ``trace_max_samples`` short of its target (its ``trace_std_error`` says how far)."""

    eigen: EigenResult
    hvps: int
    seconds: float
    trace: float | None = None
    trace_std_error: float | None = None
    trace_samples: int = 0
    trace_converged: bool = True
    layer_eigenvalue: dict[str, float] = field(default_factory=dict)
    layer_trace: dict[str, float] = field(default_factory=dict)
    density: DensityResult | None = None
    part_hvps: dict[str, int] = field(default_factory=dict)
    part_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def eigenvalues(self) -> list[float]:
        return [float(v) for v in self.eigen.eigenvalues]

    def values(self) -> list[float]:
        """Every number the record reports (to check them for finiteness at once)."""
        extra = [] if self.trace is None else [self.trace]
        return [*self.eigenvalues, *extra, *self.layer_eigenvalue.values(), *self.layer_trace.values()]


def warm_start_vector(previous: torch.Tensor, dim: int, seed: int, dtype: torch.dtype, device: torch.device,
                      mix: float = WARM_MIX) -> torch.Tensor | None:
    """One start vector from earlier eigenvectors (rows, summed at unit norm) plus a seeded random part of
    relative norm ``mix``; ``None`` if ``previous`` does not fit (another parameter set) or is not finite.

    The random part keeps every direction in the Krylov space, so a run that goes on can still find a new top
    eigenvector after two eigenvalues cross (the old top one is then the second). ``measure_spectrum`` keeps it
    at most half the residual target, so a start still on the top eigenvector converges at its first product;
    like any warm start at a loose target, one on the old top eigenvector after a crossing may stop there."""
    if previous is None or previous.dim() != 2 or previous.shape[1] != dim or not bool(torch.isfinite(previous).all()):
        return None
    rows = previous.to(device=device, dtype=dtype)
    norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    if not bool((norms > 0).all()):
        return None
    x = (rows / norms).sum(0)
    x /= torch.linalg.vector_norm(x).clamp_min(torch.finfo(dtype).tiny)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(dim, generator=g, device="cpu", dtype=torch.float64).to(device=device, dtype=dtype)
    return (x + mix * noise / torch.linalg.vector_norm(noise))[None]


def measure_spectrum(
    op: LinearOperator,
    options: SpectrumOptions,
    warm_start: torch.Tensor | None = None,
    draw: int = 0,
    stop_above: float | None = None,
) -> SpectrumRecord:
    """Measure what ``options`` ask for on ``op`` (the Hessian of a probe set); see the module docstring.

    Args:
        op: a ``HessianOperator`` (or any operator with ``dim``, ``dtype``, ``device``, ``matmat``).
        options: what to measure.
        warm_start: earlier eigenvectors (``(p, dim)`` rows, e.g. the last record's ``eigen.eigenvectors``);
            ignored when they do not fit ``op``.
        draw: which draw of random probes the trace takes (seed ``options.seed + draw``): a callback passes
            its probe count, so successive traces do not share their noise.
        stop_above: stop the eigenvalues once the ``top_k``-th exceeds this (``top_eigenvalues``): they are then
            lower bounds, ``eigen.converged`` unless they met ``tol`` as well.

    Raises ``NonFiniteError`` ("the loss is NaN at this probe") when the products are not finite.
    """
    started = time.perf_counter()
    parts: dict[str, float] = {}
    hvps: dict[str, int] = {}
    krylov = options.trace and options.trace_method == "krylov"
    v0 = warm_start_vector(warm_start, op.dim, options.seed + draw, working_dtype(op.dtype), op.device,
                           mix=min(WARM_MIX, options.tol / 2))
    start = time.perf_counter()
    eig = top_eigenvalues(op, k=min(options.top_k, op.dim), tol=options.tol, max_iter=options.max_hvps, v0=v0,
                          seed=options.seed, min_iter=min(options.krylov_steps, op.dim, options.max_hvps) if krylov
                          else 0, return_basis=krylov, stop_above=stop_above)
    parts["eigenvalues"], hvps["eigenvalues"] = time.perf_counter() - start, eig.num_hvps
    record = SpectrumRecord(eigen=eig, hvps=0, seconds=0.0)
    sampling = dict(rel_tol=options.trace_rel_tol, confidence=options.confidence,
                    min_samples=options.trace_min_samples, max_samples=options.trace_max_samples,
                    batch=min(16, options.trace_min_samples))
    if options.trace:
        start = time.perf_counter()
        tr = hutchinson_trace(op, **sampling, seed=options.seed + draw,
                              method="hutchinson" if krylov else options.trace_method,
                              basis=eig.basis if krylov else None, basis_trace=eig.basis_trace if krylov else None)
        record.trace, record.trace_std_error = float(tr.estimate), float(tr.std_error)
        record.trace_samples, record.trace_converged = tr.num_samples, bool(tr.converged)
        parts["trace"], hvps["trace"] = time.perf_counter() - start, tr.num_hvps
    if options.per_layer:
        start = time.perf_counter()
        eigs = per_layer_top_eigenvalue(op, tol=options.tol, max_iter=options.max_hvps, seed=options.seed)
        record.layer_eigenvalue = {name: float(r.eigenvalues[0]) for name, r in eigs.items()}
        used = sum(r.num_hvps for r in eigs.values())
        if options.trace:
            traces = per_layer_trace(op, **sampling, seed=options.seed + draw)
            record.layer_trace = {name: float(t.estimate) for name, t in traces.items()}
            used += next(iter(traces.values())).num_hvps
        parts["per_layer"], hvps["per_layer"] = time.perf_counter() - start, used
    if options.density:
        start = time.perf_counter()
        record.density = spectral_density(op, num_runs=options.density_runs,
                                          lanczos_steps=min(options.density_steps, op.dim), seed=options.seed,
                                          eigenpairs=eig)
        parts["density"], hvps["density"] = time.perf_counter() - start, record.density.num_hvps
    record.part_seconds, record.part_hvps = parts, hvps
    record.hvps, record.seconds = sum(hvps.values()), time.perf_counter() - started
    return record


def record_summary(record: SpectrumRecord) -> dict[str, Any]:
    """The record's numbers as plain Python values (JSON, a checkpoint's history)."""
    out: dict[str, Any] = {
        "eigenvalues": record.eigenvalues,
        "residual_norms": [float(v) for v in record.eigen.residual_norms],
        "eigen_converged": bool(record.eigen.converged),
        "hvps": int(record.hvps),
        "seconds": float(record.seconds),
    }
    if record.trace is not None:
        out.update(trace=record.trace, trace_std_error=record.trace_std_error, trace_samples=record.trace_samples,
                   trace_converged=record.trace_converged)
    if record.layer_eigenvalue:
        out["layer_eigenvalue"] = dict(record.layer_eigenvalue)
    if record.layer_trace:
        out["layer_trace"] = dict(record.layer_trace)
    return out
