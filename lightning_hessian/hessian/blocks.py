"""Per-layer (diagonal block) Hessian spectra: the top eigenvalue and the trace of every layer in one call.

A block ``B`` is a set of coordinates of the operator (a layer's parameters); its Hessian is the diagonal
block ``H_BB``. All blocks share the full operator's batched products:

- traces: Rademacher probes over the union of the blocks; ``z_B^T (H z)_B`` is an unbiased sample of
  ``tr(H_BB)`` for every block at once, so one probe costs one HVP whatever the number of layers;
- eigenvalues: one Lanczos solver per block, run in lockstep; each round embeds every block's vector in
  the full space (zero elsewhere) and sends them through a single ``matmat`` call.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from lightning_hessian.hessian.lanczos import EigenResult, KrylovSolver, check_common
from lightning_hessian.hessian.operator import LinearOperator, check_finite, working_dtype
from lightning_hessian.hessian.trace import (
    MIN_TRACE_SAMPLES,
    TraceResult,
    check_sampling,
    rademacher,
    sample_until,
    segment_products,
    z_score,
)

LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Embedding,
)

BlockSpec = nn.Module | Sequence[torch.Tensor] | slice | Sequence[slice]


def layer_blocks(
    model: nn.Module, module_types: tuple[type[nn.Module], ...] = LAYER_TYPES
) -> dict[str, list[nn.Parameter]]:
    """``{module name: its own trainable parameters}`` for every module of ``module_types`` that has any."""
    blocks = {}
    for name, module in model.named_modules():
        if isinstance(module, module_types):
            params = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if params:
                blocks[name] = params
    return blocks


def block_slices(op: LinearOperator, blocks: Mapping[str, BlockSpec] | None) -> dict[str, list[slice]]:
    """Each block's coordinates in ``op``'s flat vectors, as a list of slices."""
    where = {id(p): op.slices[n] for n, p in zip(op.names, op.params)} if hasattr(op, "params") else {}
    if blocks is None:
        model = getattr(op, "model", None)
        if model is None:
            raise ValueError("blocks=None needs a HessianOperator (op.model); pass blocks= explicitly")
        blocks = {n: ps for n, ps in layer_blocks(model).items() if all(id(p) in where for p in ps)}
    out: dict[str, list[slice]] = {}
    for name, spec in blocks.items():
        if isinstance(spec, slice):
            spec = [spec]
        if isinstance(spec, nn.Module):
            params = [p for p in spec.parameters() if id(p) in where]
            if not params:
                raise ValueError(f"blocks[{name!r}]: the module has no parameter among op.params")
            out[name] = [where[id(p)] for p in params]
        elif len(spec) and all(isinstance(s, slice) for s in spec):
            out[name] = list(spec)
        elif len(spec) and all(isinstance(p, torch.Tensor) for p in spec):
            missing = [i for i, p in enumerate(spec) if id(p) not in where]
            if missing:
                raise ValueError(
                    f"blocks[{name!r}]: parameter(s) {missing} are not in op.params; build the operator over them"
                )
            out[name] = [where[id(p)] for p in spec]
        else:
            raise TypeError(f"blocks[{name!r}] must be a module, a list of parameters or of slices")
    if not out:
        raise ValueError("no blocks: no layer of the given types has all its trainable parameters in op.params")
    return out


def _size(segment: list[slice]) -> int:
    return sum(s.stop - s.start for s in segment)


def _gather(X: torch.Tensor, segment: list[slice]) -> torch.Tensor:
    return torch.cat([X[:, s] for s in segment], 1)


def per_layer_top_eigenvalue(
    op: LinearOperator,
    blocks: Mapping[str, BlockSpec] | None = None,
    k: int = 1,
    which: str = "LA",
    max_iter: int = 500,
    tol: float = 1e-3,
    seed: int = 0,
    ncv: int | None = None,
) -> dict[str, EigenResult]:
    """Top-``k`` eigenpairs of every diagonal block ``H_BB`` (Lanczos per block, batched together).

    Args:
        op: the full ``HessianOperator`` (its ``params`` must include every block's parameters).
        blocks: ``{name: module | parameters | slices}``; default: the ``layer_blocks(op.model)`` whose
            parameters are all in ``op``.
        k, which, max_iter, tol, ncv: as in ``top_eigenvalues``, per block (``max_iter`` per block).
        seed: block ``i`` starts from a Gaussian seeded with ``seed + i``.

    Returns ``{name: EigenResult}``; eigenvectors are in block coordinates (the block's parameters
    flattened in ``op`` order); ``num_hvps`` counts that block's vectors.

    Example: each layer's value is the top eigenvalue of its diagonal block of the dense Hessian::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_hessian.hessian import HessianOperator, dense_hessian, per_layer_top_eigenvalue
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
        >>> batch = (torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 2, (16,)))
        >>> loss_fn = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])
        >>> op = HessianOperator(model, loss_fn, batch)
        >>> layers = per_layer_top_eigenvalue(op, tol=1e-10)
        >>> H = dense_hessian(model, loss_fn, batch)
        >>> exact = {"0": torch.linalg.eigvalsh(H[:15, :15])[-1], "2": torch.linalg.eigvalsh(H[15:, 15:])[-1]}
        >>> all(torch.isclose(layers[name].eigenvalues[0], exact[name]) for name in ("0", "2"))
        True
    """
    check_common(op, k, which, tol, max_iter)
    segs = block_slices(op, blocks)
    solvers: dict[str, KrylovSolver] = {}
    for i, (name, seg) in enumerate(segs.items()):
        d = _size(seg)
        if k > d:
            raise ValueError(f"k={k} exceeds the size {d} of block {name!r}")
        g = torch.Generator().manual_seed(seed + i)
        start = torch.randn(1, d, generator=g, device="cpu", dtype=torch.float64)
        start = start.to(device=op.device, dtype=working_dtype(op.dtype))
        solvers[name] = KrylovSolver(d, k, which, start, tol, max_iter, ncv, None, seed + i)
    while True:
        requests = {name: X for name, s in solvers.items() if (X := s.request()) is not None}
        if not requests:
            break
        rows = sum(X.shape[0] for X in requests.values())
        big = torch.zeros(rows, op.dim, dtype=op.dtype, device=op.device)
        at = 0
        for name, X in requests.items():
            col = 0
            for s in segs[name]:
                width = s.stop - s.start
                big[at : at + X.shape[0], s] = X[:, col : col + width]
                col += width
            at += X.shape[0]
        HX = check_finite(op, op.matmat(big))
        at = 0
        for name, X in requests.items():
            solvers[name].feed(_gather(HX[at : at + X.shape[0]], segs[name]))
            at += X.shape[0]
    return {name: s.result() for name, s in solvers.items()}


def per_layer_trace(
    op: LinearOperator,
    blocks: Mapping[str, BlockSpec] | None = None,
    num_samples: int | None = None,
    rel_tol: float = 0.01,
    confidence: float | None = 0.95,
    batch: int = 16,
    min_samples: int = MIN_TRACE_SAMPLES,
    max_samples: int = 2000,
    seed: int = 0,
) -> dict[str, TraceResult]:
    """Trace of every diagonal block ``H_BB`` from the same Rademacher probes (one HVP per probe).

    Probes are zero outside the blocks. Stopping (``rel_tol``, ``confidence``) as in
    ``hutchinson_trace``, until every block meets the target (or ``max_samples``); each block's
    ``converged`` says whether it met it. ``num_hvps`` is the shared total.
    """
    check_sampling(num_samples, rel_tol, batch, min_samples, max_samples)
    z = z_score(confidence)
    segs = block_slices(op, blocks)
    mask = torch.zeros(op.dim, dtype=op.dtype, device=op.device)
    for seg in segs.values():
        for s in seg:
            mask[s] = 1
    gen = torch.Generator().manual_seed(seed)

    def draw(n: int) -> torch.Tensor:
        Z = rademacher(n, op.dim, gen, op.dtype, op.device) * mask
        return segment_products(Z, check_finite(op, op.matmat(Z)), list(segs.values()))

    offset = torch.zeros(len(segs), dtype=torch.float64)
    samples, _ = sample_until(draw, offset, num_samples, rel_tol, z, batch, min_samples, max_samples)
    n = samples.shape[0]
    means, ses = samples.mean(0), samples.std(0) / math.sqrt(n)
    return {
        name: TraceResult(
            estimate=float(means[i]),
            std_error=float(ses[i]),
            num_samples=n,
            num_hvps=n,
            converged=num_samples is not None or bool(z * ses[i] <= rel_tol * means[i].abs()),
        )
        for i, name in enumerate(segs)
    }
