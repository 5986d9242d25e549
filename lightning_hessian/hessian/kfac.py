"""K-FAC: the Kronecker-factored approximation of the generalised Gauss-Newton (GGN) / Fisher, as a linear operator.

For a layer ``s = W a`` (``Linear``, ``Conv1d``, ``Conv2d``; a bias is a column of ``W`` fed by a constant 1) the
GGN block of the mean loss ``L = 1/N sum_n l_n`` is ``sum_n (a_n a_n^T) (x) (J_n^T H_n J_n)``, with ``H_n`` the
Hessian of ``L`` w.r.t. the network output of sample ``n`` and ``J_n`` the Jacobian of that output w.r.t. ``s``.
K-FAC replaces the sum of Kronecker products by the Kronecker product of two averages,

    ``A = mean_n a_n a_n^T``,   ``G = sum_n J_n^T H_n J_n = mean_n J_n^T (N H_n) J_n``,   block ``~ G (x) A``

(``G`` the left factor because a weight ``(out, in)`` is flattened row by row, as ``named_parameters`` holds it).
Both factors are means over samples, so over several batches (and ranks) they are averaged with sample-count
weights and equal the factors of one batch holding all the data. The block is exact for one sample, and for any
batch of a deep linear network under the mean squared error (``J_n`` and ``H_n`` do not depend on the input).

``G`` comes from backward passes of vectors ``u`` with ``E[u u^T] = H_n`` through the network:

- ``"type-2"`` (exact): the columns of a square root ``S_n S_n^T = H_n`` (one backward pass per output dimension);
- ``"mc"``: ``mc_samples`` Gaussian vectors ``S_n eps`` (unbiased, cheaper for many outputs);
- ``"empirical"``: the gradient of each sample's own loss ``l_n``, i.e. ``G = mean_n g_n g_n^T`` with
  ``g_n = dl_n / ds``: one backward pass, and what a training step's backward already computes.

``H_n`` is not hard-coded per loss: it is the Hessian of the batch loss w.r.t. the model's output, taken by
automatic differentiation (one cheap product per output dimension through the loss alone), so any loss that is a
mean of per-sample terms works: ``F.cross_entropy`` (mean over the batch, ``H_n = (diag p - p p^T) / N``),
``F.mse_loss`` (mean over all ``N * C`` elements, ``H_n = 2 I / (N C)``), label smoothing, BCE. A loss that
couples the samples of a batch is refused.

Weight sharing (a ``Linear`` on ``(N, T, d)`` inputs, the positions of a convolution), after Eschenhagen et al.
2023: ``"expand"`` (default) treats the ``R`` shared positions as more samples (``A`` the mean over ``N R`` rows,
``G`` the sum over the ``R`` positions, averaged over samples); exact when the loss treats the positions as
independent outputs (per-position regression) in a linear network; it is Grosse & Martens' KFC for convolutions.
``"reduce"`` averages the inputs and sums the output gradients over the positions first (exact when the
positions are summed before the loss, e.g. global pooling of a linear network). A layer called several times in
one forward is expanded over its calls.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_hessian.checks import check_choice, check_positive_int
from lightning_hessian.distributed import resolve_distributed
from lightning_hessian.hessian.operator import (
    Batch,
    LossFn,
    ParameterVectors,
    ParamSpec,
    _as_batches,
    _prepare,
    _select_params,
    sample_count,
    working_dtype,
)
from lightning_hessian.seeds import mix_seed

FISHER_TYPES = ("type-2", "mc", "empirical")
KFAC_APPROX = ("expand", "reduce")
KFAC_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)


# ------------------------------------------------------------------------------------------------- layers
class KFACLayer:
    """The geometry of one supported layer: its inputs and output gradients as ``(N, R, features)`` patches.

    ``R`` counts the positions that share the weight (trailing dims of a ``Linear`` input, the output positions of
    a convolution, whose input patches are unfolded like the convolution's own im2col). The weight flattens to
    ``(out, d_in)``; with a bias the input gets a constant 1 as feature ``d_in``.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.conv = isinstance(module, (nn.Conv1d, nn.Conv2d))
        self.out = module.weight.shape[0]
        self.d_in = module.weight[0].numel()

    def _batched(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` with a batch dim (unbatched calls of a layer are one sample)."""
        unbatched = 1 if not self.conv else (2 if isinstance(self.module, nn.Conv1d) else 3)
        return t[None] if t.dim() == unbatched else t

    def _patch_view(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution's input patches as a strided view ``(N, *positions, C, *kernel)`` of the padded input
        (padded as the convolution pads, also for ``padding="same"``): im2col without a copy."""
        m = self.module
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        x = F.pad(self._batched(x), m._reversed_padding_repeated_twice, mode=mode)
        spatial = x.shape[2:]
        positions = [(size - d * (k - 1) - 1) // s + 1
                     for size, k, s, d in zip(spatial, m.kernel_size, m.stride, m.dilation)]
        strides = x.stride()
        size = (x.shape[0], *positions, x.shape[1], *m.kernel_size)
        stride = (strides[0], *[st * s for st, s in zip(strides[2:], m.stride)], strides[1],
                  *[st * d for st, d in zip(strides[2:], m.dilation)])
        return x.as_strided(size, stride, x.storage_offset())

    def samples(self, t: torch.Tensor) -> int:
        """The number of samples in a call's input or output gradient."""
        return self._batched(t).shape[0]

    def input_patches(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, R, d_in)``: each sample's inputs at the ``R`` positions that share the weight."""
        x = self._patch_view(x) if self.conv else self._batched(x)
        return x.reshape(x.shape[0], -1, self.d_in)

    def grad_patches(self, g: torch.Tensor) -> torch.Tensor:
        """``(N, R, out)``: the gradients w.r.t. the layer's output at the same positions."""
        g = self._batched(g)
        return g.flatten(2).transpose(1, 2) if self.conv else g.reshape(g.shape[0], -1, g.shape[-1])

    def input_moment(self, x: torch.Tensor, approx: str, weight: bool, bias: bool, out: torch.Tensor) -> int:
        """Add the sum of ``a a^T`` over the rows of one call's input to ``out`` (the unnormalised ``A``, with the bias
        feature 1 last when ``bias``, alone when not ``weight``) and return the number of rows. ``"expand"``: a row
        per sample and position; ``"reduce"``: a row per sample, its inputs averaged over the positions."""
        x = x.to(out.dtype)
        d = self.d_in
        if self.conv and approx == "expand":
            view = self._patch_view(x)  # (N, *positions, C, *kernel)
            k = len(self.module.kernel_size)
            order = (*range(k + 1, 2 * k + 2), *range(k + 1))  # feature dims first: copies run along rows of x
            columns = view.permute(order).reshape(d, -1)  # (d, rows)
            n = columns.shape[1]
            if weight:
                out[:d, :d].addmm_(columns, columns.T)
            total = columns.sum(1) if bias and weight else None
        else:
            if self.conv:
                view = self._patch_view(x)
                rows = view.reshape(view.shape[0], -1, d).mean(1)
            else:
                x = self._batched(x)
                rows = x.reshape(-1, d) if approx == "expand" else x.reshape(x.shape[0], -1, d).mean(1)
            n = rows.shape[0]
            if weight:
                out[:d, :d].addmm_(rows.T, rows)
            total = rows.sum(0) if bias and weight else None
        if total is not None:
            out[:d, d].add_(total)
            out[d, :d].add_(total)
        if bias:
            out[-1, -1].add_(n)
        return n

    def grad_moment(self, g: torch.Tensor, approx: str, out: torch.Tensor) -> None:
        """Add the sum of ``g g^T`` over the rows of one call's output gradient to ``out`` (the unnormalised ``G``;
        rows as in ``input_moment``, ``"reduce"`` summing a sample's gradients over the positions)."""
        g = self._batched(g.to(out.dtype))
        if self.conv:
            g = g.flatten(2)  # (N, out, R)
            if approx == "expand":
                out.add_(torch.matmul(g, g.transpose(1, 2)).sum(0))  # batched: faster than a transposed copy
                return
            rows = g.sum(2)
        else:
            rows = g.reshape(-1, g.shape[-1]) if approx == "expand" else g.reshape(g.shape[0], -1, g.shape[-1]).sum(1)
        out.addmm_(rows.T, rows)


def kfac_layers(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """``(supported, skipped)``: the layers K-FAC handles, and ``{name: why not}`` for other modules that hold
    trainable parameters of their own (their curvature is left out)."""
    supported: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    inside_attention = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if isinstance(module, KFAC_MODULES) and not own:
            continue
        if isinstance(module, nn.MultiheadAttention) and own:
            skipped[name] = ("nn.MultiheadAttention computes its input projections inside "
                             "F.multi_head_attention_forward, where no hook sees their inputs and outputs")
        elif id(module) in inside_attention:
            skipped[name] = ("the out-projection of nn.MultiheadAttention is applied functionally by its parent, so "
                             "the module's own hooks never run")
        elif isinstance(module, KFAC_MODULES):
            if getattr(module, "groups", 1) != 1:
                skipped[name] = f"grouped convolution (groups={module.groups}) is not supported"
            else:
                supported[name] = module
        elif own:
            skipped[name] = f"{type(module).__name__} is not a Linear, Conv1d or Conv2d layer"
    return supported, skipped


def symmetric_eigen(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (clamped at 0: a factor is positive semi-definite up to rounding) and eigenvectors, in float64
    when the float32 solver does not converge."""
    sym = (matrix + matrix.T) / 2
    try:
        values, vectors = torch.linalg.eigh(sym)
    except torch.linalg.LinAlgError:
        values, vectors = torch.linalg.eigh(sym.double())
        values, vectors = values.to(sym.dtype), vectors.to(sym.dtype)
    return values.clamp_min(0), vectors


@dataclass
class KroneckerEigen:
    """Eigendecomposition of one block ``G (x) A``: ``A = QA diag(dA) QA^T``, ``G = QG diag(dG) QG^T``.

    ``values`` is the ``(out, d_A)`` grid of the block's eigenvalues, ``dG_i dA_j`` (K-FAC) or the
    eigenvalue-corrected ones (EKFAC); matrices are laid out as the weight, ``M`` of shape ``(..., out, d_A)``.
    """

    QA: torch.Tensor
    QG: torch.Tensor
    values: torch.Tensor

    @classmethod
    def of(cls, A: torch.Tensor, G: torch.Tensor) -> KroneckerEigen:
        dA, QA = symmetric_eigen(A)
        dG, QG = symmetric_eigen(G)
        return cls(QA, QG, dG[:, None] * dA[None])

    def rotate(self, M: torch.Tensor) -> torch.Tensor:
        """``QG^T M QA``: coordinates in the block's eigenbasis."""
        return self.QG.T @ M @ self.QA

    def unrotate(self, M: torch.Tensor) -> torch.Tensor:
        return self.QG @ M @ self.QA.T

    def solve(self, M: torch.Tensor, damping: float) -> torch.Tensor:
        """``(block + damping I)^{-1} M``, exact on the Kronecker eigenvalues."""
        return self.unrotate(self.rotate(M) / (self.values + damping))

    def matmul(self, M: torch.Tensor) -> torch.Tensor:
        return self.unrotate(self.rotate(M) * self.values)


# ----------------------------------------------------------------------------------------------- operator
@dataclass
class _Block:
    """One layer's share of the flat vectors: the slices of its selected weight and bias."""

    name: str
    layer: KFACLayer
    weight: slice | None
    bias: slice | None

    @property
    def d_a(self) -> int:
        return (self.layer.d_in if self.weight is not None else 0) + (self.bias is not None)

    def to_matrix(self, V: torch.Tensor) -> torch.Tensor:
        """Rows of flat vectors -> ``(k, out, d_A)`` matrices laid out as ``[W | b]``."""
        parts = []
        if self.weight is not None:
            parts.append(V[:, self.weight].reshape(V.shape[0], self.layer.out, self.layer.d_in))
        if self.bias is not None:
            parts.append(V[:, self.bias].reshape(V.shape[0], self.layer.out, 1))
        return torch.cat(parts, -1)

    def write(self, out: torch.Tensor, M: torch.Tensor) -> None:
        if self.weight is not None:
            out[:, self.weight] = M[..., : self.layer.d_in].reshape(M.shape[0], -1)
        if self.bias is not None:
            out[:, self.bias] = M[..., -1]


class KFACOperator(ParameterVectors):
    """K-FAC of the GGN / Fisher of the sample-weighted mean loss over ``data``, w.r.t. the selected parameters.

    A linear operator like :class:`~lightning_hessian.hessian.operator.HessianOperator` (``dim``, ``dtype``,
    ``device``, ``matmat`` on flat vectors in ``named_parameters`` order, ``names``/``params``/``slices``), so
    ``top_eigenvalues``, ``hutchinson_trace``, ``spectral_density`` and the per-layer block routines run on it;
    it is block diagonal, one block ``G (x) A`` per layer (weight and bias together). What K-FAC makes cheap is
    exact here: ``block_eigenvalues``, ``eigenvalues``, ``block_traces``, ``trace`` and the damped inverse
    ``inverse_matmat``, all from the factors' eigendecompositions.

    Args:
        model: the network (a ``DistributedDataParallel`` wrapper is unwrapped); its train/eval mode is used as
            is. BatchNorm in train mode couples the samples of a batch, which K-FAC ignores: use eval mode.
        loss_fn: ``loss_fn(model, batch) -> scalar``, a mean of per-sample terms computed from the output of
            ``output_module`` (e.g. ``F.cross_entropy(model(x), y)``).
        data: one batch or an iterable of batches, as for ``HessianOperator``; the factors are computed once,
            here (build a new operator after the parameters change).
        params: ``None`` for every trainable parameter of the supported layers (``Linear``, ``Conv1d``,
            ``Conv2d``; the others are named in a warning), or names / patterns / modules / parameters as for
            ``HessianOperator``, each a weight or bias of a supported layer.
        fisher_type: ``"type-2"`` (exact GGN), ``"mc"`` or ``"empirical"`` (see the module docstring).
        mc_samples: vectors per sample for ``"mc"``.
        kfac_approx: ``"expand"`` or ``"reduce"`` for weight sharing.
        eigenvalue_correction: EKFAC (George et al. 2018): keep the Kronecker eigenbasis but replace each
            eigenvalue by the second moment of the per-sample gradients in that basis, from a second pass over the
            data (``diag(Q^T F Q)``, exact for the block of the chosen ``fisher_type`` when it is diagonal there).
        output_module: the module whose output ``loss_fn`` reads; default ``model``'s forward, or, when the loss
            does not call it (a LightningModule whose loss calls ``self.net(x)``), the last outermost submodule call.
            It must run once per ``loss_fn`` call and return an ``(N, ...)`` tensor.
        batch_size_fn: ``batch -> int`` sample count of a batch (its weight); default the first tensor's first dim.
        distributed, process_group: all-reduce the factors as ``HessianOperator`` does (default: when a process
            group is initialised): every rank passes its shard, the factors equal one process on the union.
        seed: seed of the ``"mc"`` draws (offset by the rank under a process group).
        chunk_size: most vectors per ``matmat`` call made by helpers (e.g. HAWQ's quadratic forms).

    ``op.factors[layer] = (A, G)`` (float32 at least); ``op.blocks[layer]`` locates the layer's weight and bias in
    the flat vectors; ``op.eigen(layer)`` is its ``KroneckerEigen``. Conventions against curvlinops'
    ``KFACLinearOperator(separate_weight_and_bias=False)``: the same numbers for type-2 and for the empirical
    Fisher of cross-entropy; for the empirical Fisher of ``MSELoss(reduction="mean")`` curvlinops treats the
    ``C`` outputs of a sample as one likelihood and is ``C`` times ours (ours: each sample's own loss, the mean of
    its ``C`` squared errors); Monte-Carlo draws differ (ours: Gaussian vectors with the output Hessian as
    covariance, theirs: sampled labels), both unbiased for type-2.

    Example::

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from lightning_hessian.hessian import KFACOperator, top_eigenvalues
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
        >>> batches = [(torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))) for _ in range(2)]
        >>> op = KFACOperator(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), batches)
        >>> exact = op.eigenvalues()[:3]                             # from the factors
        >>> lanczos = top_eigenvalues(op, k=3, tol=1e-10).eigenvalues  # Lanczos on the block-diagonal operator
        >>> torch.allclose(lanczos, exact, rtol=1e-6)
        True
        >>> v = torch.randn(1, op.dim, dtype=torch.float64)
        >>> w = op.inverse_matmat(v, damping=1e-3)                  # (K + 1e-3 I)^-1 v, exact from the factors
        >>> torch.allclose(op.matmat(w) + 1e-3 * w, v)
        True
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Any,
        params: Sequence[ParamSpec] | None = None,
        *,
        fisher_type: str = "type-2",
        mc_samples: int = 1,
        kfac_approx: str = "expand",
        eigenvalue_correction: bool = False,
        output_module: nn.Module | None = None,
        batch_size_fn: Callable[[Batch], int] | None = None,
        distributed: bool | None = None,
        process_group: Any = None,
        seed: int = 0,
        chunk_size: int = 32,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model)}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(model, batch) -> scalar tensor")
        check_choice(fisher_type, "fisher_type", FISHER_TYPES)
        check_choice(kfac_approx, "kfac_approx", KFAC_APPROX)
        check_positive_int(mc_samples, "mc_samples")
        check_positive_int(chunk_size, "chunk_size")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        self.model, self.loss_fn = model, loss_fn
        if output_module is not None and not any(m is output_module for m in model.modules()):
            raise ValueError("output_module must be model itself or one of its submodules")
        self.output_module = output_module
        self.fisher_type, self.mc_samples, self.kfac_approx = fisher_type, mc_samples, kfac_approx
        self.eigenvalue_correction = bool(eigenvalue_correction)
        self.batch_size_fn, self.chunk_size = batch_size_fn, chunk_size
        self.distributed = resolve_distributed(distributed)
        self.process_group = process_group
        rank = dist.get_rank(process_group) if self.distributed else 0
        self._generator = torch.Generator().manual_seed(mix_seed(rank, seed))  # seed + 1,000,003 rank

        self.blocks, named = self._layout(params)
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.device, self.dtype = self.params[0].device, self.params[0].dtype
        self.factor_dtype = working_dtype(self.dtype)
        self.slices: dict[str, slice] = {}
        offset = 0
        for n, p in named:
            self.slices[n] = slice(offset, offset + p.numel())
            offset += p.numel()
        self.dim = offset
        for block in self.blocks.values():
            block.weight = self.slices.get(block.weight) if block.weight is not None else None
            block.bias = self.slices.get(block.bias) if block.bias is not None else None

        batches, source = _as_batches(data)
        self._batches = batches if batches is not None else source
        self._failure: Exception | None = None
        self._checked_coupling = False
        self.factors = self._compute_factors()
        self._eigen: dict[str, KroneckerEigen] = {}
        if self.eigenvalue_correction:
            self._correct_eigenvalues()

    # ------------------------------------------------------------------------------------------ layout
    def _layout(self, params: Sequence[ParamSpec] | None) -> tuple[dict[str, _Block], list[tuple[str, nn.Parameter]]]:
        supported, skipped = kfac_layers(self.model)
        owner: dict[int, tuple[str, str]] = {}  # id(param) -> (layer, "weight" | "bias")
        for name, module in supported.items():
            for role in ("weight", "bias"):
                p = getattr(module, role, None)
                if p is None:
                    continue
                if id(p) in owner:
                    raise ValueError(f"parameter {role} of layer {name!r} is shared with layer {owner[id(p)][0]!r}: "
                                     "K-FAC has one block per parameter; untie it or leave it out of params")
                owner[id(p)] = (name, role)
        all_named = list(self.model.named_parameters())
        if params is None:
            named = [(n, p) for n, p in all_named if p.requires_grad and id(p) in owner]
            left = [n for n, p in all_named if p.requires_grad and id(p) not in owner]
            if left:
                why = "; ".join(f"{m or type(self.model).__name__}: {r}" for m, r in skipped.items())
                warnings.warn(f"KFACOperator leaves out {len(left)} trainable parameter(s) {left[:6]}"
                              f"{' ...' if len(left) > 6 else ''} ({why}); pass params= to choose explicitly",
                              UserWarning, stacklevel=3)
            if not named:
                raise ValueError("model has no trainable parameter in a Linear, Conv1d or Conv2d layer")
        else:
            named = _select_params(self.model, params)
            bad = [n for n, p in named if id(p) not in owner]
            if bad:
                raise ValueError(f"params: {bad} are not the weight or bias of a supported layer (Linear, Conv1d, "
                                 f"Conv2d); skipped layers: {skipped or 'none'}")
        blocks: dict[str, _Block] = {}
        for n, p in named:
            layer_name, role = owner[id(p)]
            block = blocks.setdefault(layer_name, _Block(layer_name, KFACLayer(supported[layer_name]), None, None))
            setattr(block, role, n)  # a parameter name for now, a slice once the layout is known
        return blocks, named

    # ---------------------------------------------------------------------------------------- products
    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """The rows ``F v_i`` for the rows ``v_i`` of ``V`` (shape ``(k, dim)``)."""
        if self.eigenvalue_correction:
            return self._per_block(V, lambda name, M: self.eigen(name).matmul(M))
        return self._per_block(V, lambda name, M: self.factors[name][1] @ M @ self.factors[name][0])

    def inverse_matmat(self, V: torch.Tensor, damping: float) -> torch.Tensor:
        """``(F + damping I)^{-1} v_i`` for the rows of ``V``, exact on each block's Kronecker eigenvalues."""
        if not damping >= 0:
            raise ValueError(f"damping must be >= 0, got {damping!r}")
        return self._per_block(V, lambda name, M: self.eigen(name).solve(M, float(damping)))

    def _per_block(self, V: torch.Tensor, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if V.dim() != 2 or V.shape[1] != self.dim:
            raise ValueError(f"expected shape (k, {self.dim}), got {tuple(V.shape)}")
        V = V.to(device=self.device, dtype=self.factor_dtype)
        out = torch.zeros_like(V)
        for name, block in self.blocks.items():
            block.write(out, fn(name, block.to_matrix(V)))
        return out.to(self.dtype)

    # ------------------------------------------------------------------------------------ from factors
    def eigen(self, name: str) -> KroneckerEigen:
        """The eigendecomposition of layer ``name``'s block (computed on first use)."""
        if name not in self._eigen:
            A, G = self.factors[name]
            self._eigen[name] = KroneckerEigen.of(A, G)
        return self._eigen[name]

    def block_eigenvalues(self) -> dict[str, torch.Tensor]:
        """``{layer: every eigenvalue of its block, descending}`` (exact for the operator)."""
        return {name: self.eigen(name).values.flatten().sort(descending=True).values.cpu() for name in self.blocks}

    def eigenvalues(self) -> torch.Tensor:
        """All ``dim`` eigenvalues of the operator, descending (the union of the blocks')."""
        return torch.cat(list(self.block_eigenvalues().values())).sort(descending=True).values

    def block_traces(self) -> dict[str, float]:
        """``{layer: trace of its block}``: ``tr(G) tr(A)`` (or the sum of the corrected eigenvalues)."""
        if self.eigenvalue_correction:
            return {name: float(self.eigen(name).values.sum()) for name in self.blocks}
        return {name: float(A.trace() * G.trace()) for name, (A, G) in self.factors.items()}

    def trace(self) -> float:
        return sum(self.block_traces().values())

    # ----------------------------------------------------------------------------------------- factors
    def _iter_batches(self) -> Iterable[Batch]:
        for batch in self._batches:
            yield _prepare(batch, self.device)

    def _batch_size(self, batch: Batch) -> int:
        if self.batch_size_fn is not None:
            return int(self.batch_size_fn(batch))
        return sample_count(batch)

    def _compute_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{layer: (A, G)}``, each the sample-weighted mean over the batches (and ranks)."""
        sums = {name: [torch.zeros(b.d_a, b.d_a, dtype=self.factor_dtype, device=self.device),
                       torch.zeros(b.layer.out, b.layer.out, dtype=self.factor_dtype, device=self.device)]
                for name, b in self.blocks.items()}
        count = 0
        for batch in self._iter_batches():
            count += self._local(self._add_batch_factors, sums, batch) or 0
        flat = torch.cat([t.reshape(-1) for pair in sums.values() for t in pair])
        flat, count = self._reduce(flat, count)
        out, at = {}, 0
        for name, (A, G) in sums.items():
            A_mean = flat[at : at + A.numel()].reshape(A.shape) / count
            at += A.numel()
            G_mean = flat[at : at + G.numel()].reshape(G.shape) / count
            at += G.numel()
            out[name] = ((A_mean + A_mean.T) / 2, (G_mean + G_mean.T) / 2)
        return out

    def _add_batch_factors(self, sums: dict[str, list[torch.Tensor]], batch: Batch) -> int:
        n = self._batch_size(batch)
        calls, U = self._forward_and_vectors(batch)
        A_batch = {name: torch.zeros_like(pair[0]) for name, pair in sums.items()}
        G_batch = {name: torch.zeros_like(pair[1]) for name, pair in sums.items()}
        rows = dict.fromkeys(sums, 0)
        for name, x, _ in calls:
            block = self.blocks[name]
            rows[name] += block.layer.input_moment(x, self.kfac_approx, block.weight is not None,
                                                   block.bias is not None, A_batch[name])
        for name in sums:
            if rows[name]:
                sums[name][0].add_(A_batch[name], alpha=n / rows[name])
        for u in U:
            grads = self._backward(calls.output, calls, u)
            for (name, _, _), g in zip(calls, grads):
                if g is not None:
                    self.blocks[name].layer.grad_moment(g, self.kfac_approx, G_batch[name])
        for name in sums:
            sums[name][1].add_(G_batch[name], alpha=n)
        return n

    def _correct_eigenvalues(self) -> None:
        """EKFAC: each block's eigenvalues become the mean squared per-sample gradient in its eigenbasis."""
        sums = {name: torch.zeros_like(self.eigen(name).values) for name in self.blocks}
        count = 0
        for batch in self._iter_batches():
            count += self._local(self._add_batch_corrections, sums, batch) or 0
        flat = torch.cat([t.reshape(-1) for t in sums.values()])
        flat, count = self._reduce(flat, count)
        at = 0
        for name, t in sums.items():
            self._eigen[name].values = flat[at : at + t.numel()].reshape(t.shape) / count
            at += t.numel()

    def _add_batch_corrections(self, sums: dict[str, torch.Tensor], batch: Batch) -> int:
        n = self._batch_size(batch)
        calls, U = self._forward_and_vectors(batch)
        rotated_inputs = []
        for name, x, _ in calls:
            block = self.blocks[name]
            a = block.layer.input_patches(x).to(self.factor_dtype)
            parts = [a] if block.weight is not None else []
            parts += [torch.ones_like(a[..., :1])] if block.bias is not None else []
            rotated_inputs.append(torch.cat(parts, -1) @ self.eigen(name).QA)
        for u in U:
            grads = self._backward(calls.output, calls, u)
            per_sample: dict[str, torch.Tensor] = {}
            for (name, _, _), a, g in zip(calls, rotated_inputs, grads):
                if g is None:
                    continue
                gq = self.blocks[name].layer.grad_patches(g).to(self.factor_dtype) @ self.eigen(name).QG
                proj = torch.einsum("nro,nri->noi", gq, a)  # per-sample gradient, in the eigenbasis
                per_sample[name] = per_sample[name] + proj if name in per_sample else proj
            for name, proj in per_sample.items():
                sums[name].add_(proj.square().sum(0), alpha=n)
        return n

    # ---------------------------------------------------------------------------------- one batch's pass
    def _forward_and_vectors(self, batch: Batch) -> tuple[_Calls, list[torch.Tensor]]:
        """Run ``loss_fn`` with the layer calls recorded and return the vectors ``u`` (rows ``(N, ...)`` shaped like
        the output) whose backward passes give ``G``."""
        calls = _Calls(self.model, self.output_module)
        hooks = [b.layer.module.register_forward_hook(calls.layer_hook(name)) for name, b in self.blocks.items()]
        hooks += calls.output_hooks()
        with torch.inference_mode(False), torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            try:
                loss = self.loss_fn(self.model, batch)
            finally:
                for h in hooks:
                    h.remove()
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError("loss_fn must return a scalar tensor (the mean loss over the batch)")
            z = calls.network_output()
            (gz,) = torch.autograd.grad(loss.reshape(()), z, retain_graph=True,
                                        create_graph=self.fisher_type != "empirical")
            N = z.shape[0]
            if self.fisher_type == "empirical":
                return calls, [gz.detach() * math.sqrt(N)]
            S = self._output_hessian_sqrt(z, gz)
            if self.fisher_type == "type-2":
                keep = S.flatten(0, 1).abs().amax(0) > 0  # columns that are zero for every sample add nothing
                return calls, [S[:, :, j].reshape(z.shape) for j in range(S.shape[-1]) if keep[j]]
            eps = torch.randn(self.mc_samples, *S.shape[:2], generator=self._generator, dtype=torch.float64)
            eps = eps.to(device=S.device, dtype=S.dtype) / math.sqrt(self.mc_samples)
            return calls, [torch.einsum("nij,nj->ni", S, e).reshape(z.shape) for e in eps]

    def _output_hessian_sqrt(self, z: torch.Tensor, gz: torch.Tensor) -> torch.Tensor:
        """``S`` of shape ``(N, D, D)`` with ``S_n S_n^T`` the Hessian of the batch loss w.r.t. sample ``n``'s output,
        from ``D`` products through the loss alone (each probe sets one output coordinate of every sample)."""
        N, D = z.shape[0], z[0].numel()
        if not self._checked_coupling and N > 1:
            self._check_separable(z, gz)
        columns = []
        for j in range(D):
            probe = torch.zeros(N, D, dtype=z.dtype, device=z.device)
            probe[:, j] = 1
            (h,) = torch.autograd.grad(gz, z, probe.reshape(z.shape), retain_graph=True, allow_unused=True)
            columns.append(torch.zeros_like(probe) if h is None else h.reshape(N, D))
        H = torch.stack(columns, -1).double()
        values, vectors = torch.linalg.eigh((H + H.transpose(1, 2)) / 2)
        rounding = 100 * D * torch.finfo(z.dtype).eps * float(values.abs().amax())  # H's own rounding error
        if bool((values < -rounding).any()):
            warnings.warn("KFACOperator: the loss is not convex in the model output here (its Hessian has negative "
                          "eigenvalues); they are set to 0, as a GGN needs", RuntimeWarning, stacklevel=4)
        values = torch.where(values > rounding, values, torch.zeros_like(values))
        return (vectors * values.sqrt()[:, None, :]).to(self.factor_dtype)

    def _check_separable(self, z: torch.Tensor, gz: torch.Tensor) -> None:
        probe = torch.zeros_like(z)
        probe[0] = torch.randn(z[0].shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        (h,) = torch.autograd.grad(gz, z, probe, retain_graph=True, allow_unused=True)
        if h is not None and float(h[1:].abs().max()) > 1e-6 * float(h[0].abs().max()) + 1e-30:
            raise ValueError("loss_fn couples the samples of a batch (its Hessian w.r.t. the output is not block "
                             "diagonal over samples); K-FAC needs a mean of per-sample losses")
        self._checked_coupling = True

    def _backward(self, output: torch.Tensor, calls: _Calls, u: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        with torch.inference_mode(False), torch.enable_grad():
            return torch.autograd.grad(output, [o for _, _, o in calls], grad_outputs=u, retain_graph=True,
                                       allow_unused=True)

    # -------------------------------------------------------------------------------- ranks and failures
    def _local(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._failure is not None:
            return None
        try:
            return fn(*args)
        except Exception as err:
            if not self.distributed:
                raise
            self._failure = err  # carried as NaN through the next all-reduce, so no rank waits forever
            return None

    def _reduce(self, flat: torch.Tensor, count: int) -> tuple[torch.Tensor, float]:
        if self.distributed:
            packed = torch.cat([flat, flat.new_tensor([float(count)])])
            if self._failure is not None:
                packed.fill_(float("nan"))
            dist.all_reduce(packed, group=self.process_group)
            flat, count = packed[:-1], float(packed[-1])
            if math.isnan(count):
                failure, self._failure = self._failure, None
                raise RuntimeError(f"KFACOperator: a rank failed computing its factors"
                                   f"{f' (here: {failure!r})' if failure else ''}") from failure
        if count <= 0:
            raise ValueError("data holds no samples (on any rank): pass at least one non-empty batch")
        return flat, count


class _Calls(list):
    """The layer calls of one ``loss_fn`` call, ``(layer name, input, output)``, and the network output ``output``:
    that of ``output_module`` if given; else of ``model``'s forward, or, when ``loss_fn`` does not call it (a
    LightningModule whose loss calls ``self.net``), of the last outermost submodule call."""

    def __init__(self, model: nn.Module, output_module: nn.Module | None) -> None:
        super().__init__()
        self.model, self.output_module = model, output_module
        self.outputs: list[tuple[nn.Module, Any]] = []
        self.output: torch.Tensor | None = None
        self._depth = 0

    def layer_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if isinstance(out, torch.Tensor) and out.requires_grad:
                self.append((name, args[0].detach(), out))
        return hook

    def output_hooks(self) -> list[Any]:
        if self.output_module is not None:
            return [self.output_module.register_forward_hook(lambda m, args, out: self.outputs.append((m, out)))]
        hooks = []
        for module in self.model.modules():
            hooks.append(module.register_forward_pre_hook(self._enter))
            hooks.append(module.register_forward_hook(self._leave))
        return hooks

    def _enter(self, module: nn.Module, args: tuple) -> None:
        self._depth += 1

    def _leave(self, module: nn.Module, args: tuple, out: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.outputs.append((module, out))

    def network_output(self) -> torch.Tensor:
        if self.output_module is not None:
            found, name = [out for _, out in self.outputs], "output_module"
        else:
            found, name = [out for m, out in self.outputs if m is self.model], "model's forward"
            if not found and self.outputs:
                found = [self.outputs[-1][1]]
        if not found:
            raise ValueError("loss_fn never called the model: pass output_module= (the module whose output the "
                             "loss reads)")
        if len(found) > 1:
            raise ValueError(f"{name} ran {len(found)} times in one loss_fn call; K-FAC needs one output per batch "
                             "(pass output_module= the module that produces it)")
        out = found[0]
        if not isinstance(out, torch.Tensor) or out.dim() == 0:
            raise TypeError(f"the network output is a {type(out).__name__}, not a batched tensor: pass output_module= "
                            "the module that returns the logits / predictions")
        if not out.requires_grad:
            raise ValueError("the network output does not depend on any parameter with requires_grad")
        self.output = out
        return out
