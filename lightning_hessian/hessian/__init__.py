"""Hessian spectrum engine (pure torch): HVP operator, top eigenpairs, trace, density, per-layer blocks.

Everything works on a ``HessianOperator`` (the Hessian of ``loss_fn(model, batch)`` averaged over the
data, w.r.t. selected parameters, DDP-aware) or on any object with ``dim``, ``dtype``, ``device`` and
``matmat(V)``::

    from lightning_hessian.hessian import HessianOperator, top_eigenvalues, hutchinson_trace

    def loss_fn(model, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y)

    op = HessianOperator(model, loss_fn, [(x1, y1), (x2, y2)])   # batches weighted by sample count
    # (bare-tensor batches: Batches([x1, x2]), as a plain [x1, x2] reads as one [x, y] batch)
    eig = top_eigenvalues(op, k=5)              # Lanczos: eig.eigenvalues, eig.eigenvectors, eig.residual_norms
    tr = hutchinson_trace(op, rel_tol=0.01)     # tr.estimate +- tr.std_error
    dens = spectral_density(op)                 # SLQ: dens.grid, dens.density, dens.trace
    per_layer = per_layer_trace(op)             # {layer name: TraceResult}, one set of probes for all
    record = measure_spectrum(op, SpectrumOptions(top_k=3))  # the callbacks' and analyze's one measurement

    kfac = KFACOperator(model, loss_fn, [(x1, y1), (x2, y2)])   # K-FAC of the GGN: same algorithms, and
    kfac.eigenvalues(), kfac.block_traces(), kfac.inverse_matmat(V, damping=1e-3)   # exact from the factors

Under an initialised ``torch.distributed`` process group, call these on every rank with the same
arguments and each rank's shard: the results equal a single process on the union of the shards.
"""

from lightning_hessian.hessian.blocks import LAYER_TYPES, layer_blocks, per_layer_top_eigenvalue, per_layer_trace
from lightning_hessian.hessian.density import DensityResult, spectral_density
from lightning_hessian.hessian.diagonal import DiagonalEstimate, hessian_diagonal
from lightning_hessian.hessian.kfac import KFACOperator
from lightning_hessian.hessian.lanczos import EigenResult, top_eigenvalues
from lightning_hessian.hessian.operator import Batches, HessianOperator, LinearOperator
from lightning_hessian.hessian.power import power_iteration
from lightning_hessian.hessian.summary import SpectrumOptions, SpectrumRecord, measure_spectrum
from lightning_hessian.hessian.trace import TraceResult, hutchinson_trace

__all__ = [
    "LAYER_TYPES",
    "Batches",
    "DensityResult",
    "DiagonalEstimate",
    "EigenResult",
    "HessianOperator",
    "KFACOperator",
    "LinearOperator",
    "SpectrumOptions",
    "SpectrumRecord",
    "TraceResult",
    "hessian_diagonal",
    "hutchinson_trace",
    "layer_blocks",
    "measure_spectrum",
    "per_layer_top_eigenvalue",
    "per_layer_trace",
    "power_iteration",
    "spectral_density",
    "top_eigenvalues",
]
