"""The Hessian of a loss over a data set as a linear operator on flat parameter vectors.

Every algorithm in this package (Lanczos, power iteration, Hutchinson, SLQ, per-layer blocks) needs only
``op.matmat(V)``: several Hessian-vector products (HVPs) at once. ``HessianOperator`` provides them for any
``loss_fn(model, batch) -> scalar``, over one batch or many (weighted by sample count), and all-reduced
across ranks when a ``torch.distributed`` process group is initialised.
"""

from __future__ import annotations

import fnmatch
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from functools import partial
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call, grad, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_hessian.checks import check_positive_int
from lightning_hessian.distributed import resolve_distributed

Batch = Any
LossFn = Callable[..., Any]
"""``loss_fn(model, batch) -> scalar tensor``, the mean loss over the batch. Typed loosely on purpose: LightningCLI
(jsonargparse) then takes any function or ``functools.partial`` named by its dotted path."""
ParamSpec = str | nn.Module | torch.Tensor

HVP_FORMS = ("reverse", "reverse-batched", "forward")
_CHOICES: dict[tuple, tuple[str, dict[str, float]]] = {}  # measured HVP forms, reused by later operators
_MAX_CHOICES = 256
DEFAULT_CACHE_BYTES = 2**30  # cached first-order graphs beyond this are rebuilt at every product instead


class NonFiniteError(FloatingPointError):
    """Hessian-vector products came back NaN or infinite; the message says whether the loss itself is."""


def nonfinite_message(op: Any) -> str:
    """One line on why products are not finite: the loss at this point, when ``op`` can evaluate it."""
    loss = getattr(op, "loss", None)
    if not callable(loss):
        return "the Hessian-vector products are NaN/Inf"
    try:
        value = loss()
    except Exception as err:  # the loss itself fails: say so rather than hide it behind the products
        return f"the Hessian-vector products are NaN/Inf and the loss raises {err!r}"
    if math.isnan(value):
        return "the loss is NaN at this probe"
    if math.isinf(value):
        return "the loss is Inf at this probe"
    return f"the Hessian-vector products are NaN/Inf although the loss ({value:.6g}) is finite at this probe"


def check_finite(op: Any, products: torch.Tensor) -> torch.Tensor:
    """``products`` if every entry is finite, else raise ``NonFiniteError`` saying whether the loss is: the
    algorithms call this on each ``matmat`` result, so a NaN loss stops a probe at its first product instead of
    surfacing later as an ill-conditioned ``eigh`` or a NaN estimate. Under a process group every rank holds the
    same all-reduced products, so all ranks raise together."""
    if not math.isfinite(float(products.sum())):  # NaN and Inf reach the sum (one reduction, one sync)
        raise NonFiniteError(nonfinite_message(op))
    return products


@runtime_checkable
class LinearOperator(Protocol):
    """What the spectrum algorithms need: a symmetric operator on vectors of length ``dim``."""

    dim: int
    dtype: torch.dtype
    device: torch.device

    def matmat(self, V: torch.Tensor) -> torch.Tensor: ...


class _LossModule(nn.Module):
    """``loss_fn(model, batch)`` as a module, so ``functional_call`` can swap the model's parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def _is_container(x: Any) -> bool:
    return isinstance(x, (tuple, list, Mapping))


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: the dtype of Krylov vectors and of sums over many products (bf16 vectors lose
    orthogonality, bf16 sums drift)."""
    return torch.promote_types(dtype, torch.float32)


class Batches(list):
    """A list read as a list of batches whatever its items are: for batches that are bare tensors, which a
    plain list ``[x1, x2]`` cannot tell from one ``[x, y]`` batch."""


def _as_batches(data: Any) -> tuple[list[Batch] | None, Iterable[Batch] | None]:
    """Split ``data`` into a materialised list of batches or a re-iterable source (e.g. a DataLoader).

    ``Batches`` is a list of batches. Otherwise one batch is a tensor, a dict, or a tuple/list holding at
    least one non-container (``(x, y)``); a tuple/list whose items are all containers is a list of batches
    (possibly empty: a rank may hold no shard); other iterables are sources of batches.
    """
    if isinstance(data, Batches):
        return list(data), None
    if isinstance(data, (torch.Tensor, Mapping)):
        return [data], None
    if isinstance(data, (tuple, list)):
        return ([data], None) if data and not all(_is_container(b) for b in data) else (list(data), None)
    if isinstance(data, Iterable):
        if iter(data) is data:  # a generator or iterator can be read once only: keep its batches
            return list(data), None
        return None, data
    raise TypeError(f"data must be a batch (tensor, tuple, list, dict) or an iterable of batches, got {type(data)}")


def _first_tensor(batch: Batch) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    for item in items:
        found = _first_tensor(item)
        if found is not None:
            return found
    return None


def sample_count(batch: Batch) -> int:
    """Samples in a batch: the first dimension of its first tensor (how the operator weights batches by
    default)."""
    first = _first_tensor(batch)
    if first is None or first.dim() == 0:
        raise ValueError("cannot infer the batch size (no tensor with a batch dim): pass batch_size_fn=")
    return int(first.shape[0])


def _signature(batch: Batch) -> tuple:
    """Shapes and dtypes of a batch's tensors (what an HVP's cost depends on)."""
    if isinstance(batch, torch.Tensor):
        return (tuple(batch.shape), batch.dtype)
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    return tuple(_signature(item) for item in items)


def _prepare(batch: Batch, device: torch.device) -> Batch:
    """Move tensors to ``device`` and make inference-mode tensors usable by autograd (a copy)."""
    if isinstance(batch, torch.Tensor):
        if batch.device != device:
            batch = batch.to(device)
        if batch.is_inference():
            with torch.inference_mode(False):
                return batch.clone()
        return batch
    if isinstance(batch, Mapping):
        out = {k: _prepare(v, device) for k, v in batch.items()}
        return type(batch)(out) if isinstance(batch, dict) else out
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_prepare(v, device) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_prepare(v, device) for v in batch)
    return batch


def _select_params(model: nn.Module, params: Sequence[ParamSpec] | None) -> list[tuple[str, nn.Parameter]]:
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise ValueError("model has no parameters with requires_grad=True: pass params= to select some")
        return chosen
    if isinstance(params, (str, nn.Module, torch.Tensor)):
        params = [params]
    params = list(params)
    if not params:
        raise ValueError("params is empty: pass None (every parameter with requires_grad) or names/modules/tensors")
    by_id = {id(p): n for n, p in named}
    selected: set[str] = set()
    for spec in params:
        if isinstance(spec, str):
            hits = {n for n, _ in named if n == spec or fnmatch.fnmatchcase(n, spec) or n.startswith(spec + ".")}
        elif isinstance(spec, nn.Module):
            hits = {by_id[id(p)] for p in spec.parameters() if id(p) in by_id}
            if not hits:
                raise ValueError(f"params: module {type(spec).__name__} has no parameters inside model")
        elif isinstance(spec, torch.Tensor):
            if id(spec) not in by_id:
                raise ValueError("params: a tensor given in params is not a parameter of model")
            hits = {by_id[id(spec)]}
        else:
            raise TypeError(f"params entries must be names/glob patterns, modules or parameters, got {type(spec)}")
        if not hits:
            raise ValueError(f"params: pattern {spec!r} matches no parameter name (see model.named_parameters())")
        selected |= hits
    return [(n, p) for n, p in named if n in selected]


class ParameterVectors:
    """Flat vectors over selected parameters, as the operators lay them out (``names``, ``params``, ``slices``,
    ``dim``, ``dtype`` set by the operator): one layout for :class:`HessianOperator` and ``KFACOperator``."""

    names: list[str]
    params: list[torch.Tensor]
    slices: dict[str, slice]
    dim: int
    dtype: torch.dtype

    def flatten(self, tensors: Sequence[torch.Tensor] | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-parameter tensors (list in ``op.names`` order, or dict by name) -> one flat vector."""
        if isinstance(tensors, Mapping):
            tensors = [tensors[n] for n in self.names]
        if len(tensors) != len(self.params):
            raise ValueError(f"flatten: expected {len(self.params)} tensors, got {len(tensors)}")
        return torch.cat([t.reshape(-1).to(self.dtype) for t in tensors])

    def unflatten(self, vec: torch.Tensor) -> list[torch.Tensor]:
        """Flat ``(dim,)`` or batched ``(k, dim)`` vector -> views shaped like the parameters."""
        if vec.shape[-1] != self.dim:
            raise ValueError(f"vector length {vec.shape[-1]} != op.dim {self.dim}")
        lead = vec.shape[:-1]
        return [vec[..., self.slices[n]].reshape((*lead, *p.shape)) for n, p in zip(self.names, self.params)]

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """The operator times a flat vector ``v`` of length ``dim``."""
        if v.dim() != 1:
            raise ValueError(f"matvec expects a 1-D vector of length {self.dim}, got shape {tuple(v.shape)}")
        return self.matmat(v[None])[0]

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class HessianOperator(ParameterVectors):
    """Hessian of the sample-weighted mean loss over ``data`` w.r.t. the selected parameters.

    Args:
        model: the network; its train/eval mode is used as is (the caller decides). A
            ``DistributedDataParallel`` wrapper is unwrapped.
        loss_fn: ``loss_fn(model, batch) -> scalar`` tensor, the mean loss over the batch.
        data: one batch (``(x, y)``, a dict, a tensor) or an iterable of batches (list, DataLoader;
            bare-tensor batches in a ``Batches`` list, as ``[x1, x2]`` reads as one ``[x, y]`` batch).
            Tensors are moved to the parameters' device. A rank of a process group may hold no batch; a
            product over no sample at all raises ``ValueError``.
        params: ``None`` for every parameter with ``requires_grad``; else a list of names, glob patterns
            (``"features.*.weight"``), module-name prefixes, modules or parameters. Explicitly selected
            parameters are used even when frozen; ``requires_grad`` itself is never changed.
        hvp: ``"reverse"`` (double backward; several vectors share one first-order graph and loop over
            the second backward), ``"reverse-batched"`` (double backward with ``is_grads_batched``),
            ``"forward"`` (forward-over-reverse, ``jvp`` of ``grad``; several vectors through ``vmap``),
            or ``"auto"``: ``"reverse"`` for one vector (on a cached graph a product is one backward pass,
            less than the forward and backward that forward-over-reverse repeats) and for several on the
            CPU (the loop matched or beat the batched forms on every model of ``benchmarks/hvp_cost.py``);
            on an accelerator, where batching can pay, the first call with several vectors times each
            form on the first batch and keeps the fastest (the timed products are the real ones, reused),
            remembered for later operators on the same model, parameters and batch shapes.
        batch_size_fn: ``batch -> int`` sample count; default: size of the first tensor's first dim.
        cache_graph: keep the first-order gradient graph of batches between calls, so one reverse HVP
            costs one backward pass (memory: those batches' activations). Default: on for materialised
            data (one batch or a list), off for DataLoaders and other re-iterable sources. Build a new
            operator (or call ``clear_cache``) after the parameters change.
        cache_bytes: the most memory the cached graphs may hold (tensors saved for backward, counted as
            each graph is built; default 1 GiB, ``None``: no limit). Batches past it are rebuilt at every
            product, so a product never holds more than the cache plus one batch's graph: chunk a large
            probe set into training-sized batches and its memory stays a small multiple of one training
            step's.
        chunk_size: most vectors pushed through one batched call (bounds memory of ``matmat``).
        distributed: all-reduce HVPs and sample counts over the default (or ``process_group``) group.
            Default: when a process group is initialised. Every rank must make the same calls.

    Vectors are flat: ``op.flatten`` / ``op.unflatten`` convert to and from per-parameter tensors, in the
    order of ``op.names`` / ``op.params``; ``op.slices[name]`` locates a parameter in the flat vector.
    ``op.num_hvps`` counts full-data HVPs, one per vector (timing probes of ``hvp="auto"`` excluded);
    ``op.hvp_choice`` / ``op.hvp_timings`` say which form serves one vector ("single") and several
    ("multi"), and the seconds measured. HVPs run with gradients enabled, outside inference mode and with
    the math SDPA backend (attention has a double backward there), so the operator may be used under
    ``torch.inference_mode()``; no ``.grad`` is written. The caller picks train or eval mode (the papers
    use eval): in train mode dropout makes every product random, and BatchNorm updates its running
    statistics at every forward (restore them afterwards if they matter).

    Example: its products are the exact Hessian's::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_hessian.hessian import HessianOperator, dense_hessian
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
        >>> batch = (torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 2, (16,)))
        >>> loss_fn = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])
        >>> op = HessianOperator(model, loss_fn, batch)
        >>> op.dim, op.names
        (23, ['0.weight', '0.bias', '2.weight', '2.bias'])
        >>> v = torch.randn(op.dim, dtype=torch.float64)
        >>> torch.allclose(op.matvec(v), dense_hessian(model, loss_fn, batch) @ v)
        True
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Any,
        params: Sequence[ParamSpec] | None = None,
        hvp: str = "auto",
        *,
        batch_size_fn: Callable[[Batch], int] | None = None,
        cache_graph: bool | None = None,
        cache_bytes: int | None = DEFAULT_CACHE_BYTES,
        chunk_size: int = 32,
        distributed: bool | None = None,
        process_group: Any = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model)}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(model, batch) -> scalar tensor")
        if hvp != "auto" and hvp not in HVP_FORMS:
            raise ValueError(f"hvp must be 'auto' or one of {HVP_FORMS}, got {hvp!r}")
        check_positive_int(chunk_size, "chunk_size")
        if cache_bytes is not None:
            check_positive_int(cache_bytes, "cache_bytes")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        self.model = model
        self.loss_fn = loss_fn
        named = _select_params(model, params)
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.device = self.params[0].device
        self.dtype = self.params[0].dtype
        self.slices: dict[str, slice] = {}
        offset = 0
        for n, p in named:
            self.slices[n] = slice(offset, offset + p.numel())
            offset += p.numel()
        self.dim = offset
        self.batch_size_fn = batch_size_fn
        batches, self._source = _as_batches(data)
        self._batches = None if batches is None else [_prepare(b, self.device) for b in batches]
        self.cache_graph = self._batches is not None if cache_graph is None else bool(cache_graph)
        self.cache_bytes = cache_bytes
        self.cached_bytes = 0  # what the cached graphs hold (saved tensors other than the parameters)
        self.chunk_size = chunk_size
        self.distributed = resolve_distributed(distributed)
        self.process_group = process_group
        self.hvp = hvp
        self.hvp_choice: dict[str, str] = {} if hvp == "auto" else {"single": hvp, "multi": hvp}
        self.hvp_timings: dict[str, dict[str, float]] = {}
        self.num_hvps = 0
        self._wrapper = _LossModule(model, loss_fn)
        self._keys = tuple("model." + n for n in self.names)
        self._graphs: dict[int, tuple[list[torch.Tensor], list[torch.Tensor | None]]] = {}
        self._failure: Exception | None = None  # a rank-local error, carried as NaN through the next all-reduce

    # ---------------------------------------------------------------------------------------- products
    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """The rows ``H v_i`` for the rows ``v_i`` of ``V`` (shape ``(k, dim)``), computed together."""
        if V.dim() != 2 or V.shape[1] != self.dim:
            raise ValueError(f"matmat expects shape (k, {self.dim}), got {tuple(V.shape)}")
        V = V.to(device=self.device, dtype=self.dtype)
        k = V.shape[0]
        if k == 0:  # nothing to time the HVP forms on
            return V.new_zeros(0, self.dim)
        with torch.inference_mode(False), torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            if V.is_inference():  # an inference tensor from the caller becomes a normal one
                V = V.clone()
            kind = "single" if k == 1 else "multi"
            if kind not in self.hvp_choice and not self._worth_timing(kind):
                self.hvp_choice[kind] = "reverse"
            one = not self.distributed and self._batches is not None and len(self._batches) == 1
            if one and kind in self.hvp_choice and self._batch_size(self._batches[0]) > 0:
                self.num_hvps += k  # one batch: its product is the mean (no weighted sum to build)
                return self._hvp(self.hvp_choice[kind], 0, self._batches[0], V)
            total = torch.zeros(k, self.dim, device=self.device, dtype=working_dtype(self.dtype))
            count = 0
            batches = iter(self._iter_batches())
            start = 0
            if kind not in self.hvp_choice:  # every rank takes part, with or without a batch of its own
                first = next(batches, None)
                hv = self._choose(kind, first, V)
                if first is not None:
                    count += self._local(self._add_weighted, total, first, lambda _: hv) or 0
                    start = 1
            for index, batch in enumerate(batches, start):
                product = partial(self._hvp, self.hvp_choice[kind], index, V=V)
                count += self._local(self._add_weighted, total, batch, product) or 0
            total, count = self._reduce(total, count)
            total /= count
        self.num_hvps += k
        return total.to(self.dtype)

    def loss(self) -> float:
        """Sample-weighted mean loss over the data (all ranks when distributed)."""
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            return float(self.data_mean(lambda batch: self.batch_loss(batch).double()))

    def batch_loss(self, batch: Batch) -> torch.Tensor:
        """``loss_fn(model, batch)`` for one of the operator's batches, checked to be a scalar."""
        return self._check_loss(self._wrapper(batch))

    def data_mean(self, fn: Callable[[Batch], torch.Tensor], shape: tuple[int, ...] = ()) -> torch.Tensor:
        """The sample-weighted float64 mean of ``fn(batch)`` (a tensor of ``shape``) over the data, all ranks
        together when distributed: how the operator averages batches, for other per-batch quantities."""
        total, count = torch.zeros(shape, device=self.device, dtype=torch.float64), 0
        for batch in self._iter_batches():
            count += self._local(self._add_weighted, total, batch, fn) or 0
        total, count = self._reduce(total, count)
        return total / count

    def clear_cache(self) -> None:
        """Drop the cached first-order graphs (needed after the parameters change)."""
        self._graphs.clear()
        self.cached_bytes = 0

    # ---------------------------------------------------------------------------------------- internals
    def _iter_batches(self) -> Iterable[Batch]:
        if self._batches is not None:
            yield from self._batches
            return
        for batch in self._source:
            yield _prepare(batch, self.device)

    def _batch_size(self, batch: Batch) -> int:
        if self.batch_size_fn is not None:
            return int(self.batch_size_fn(batch))
        return sample_count(batch)

    def _add_weighted(self, total: torch.Tensor, batch: Batch, fn: Callable[[Batch], torch.Tensor]) -> int:
        """``total += n * fn(batch)`` for a batch of ``n`` samples; returns ``n``."""
        n = self._batch_size(batch)
        total.add_(fn(batch), alpha=float(n))  # summed in total's dtype, no copy of the product
        return n

    def _local(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, this rank's own work between all-reduces; None once this rank has failed."""
        if self._failure is not None:
            return None
        try:
            return fn(*args)
        except Exception as err:
            self._fail(err)
            return None

    def _fail(self, err: Exception) -> None:
        """Raise ``err``; under a process group, keep it instead: the other ranks would wait for this one in
        the next all-reduce forever. That all-reduce then carries NaN to every rank, so all see the same
        non-finite products and take the same path (e.g. a callback's warning)."""
        if not self.distributed:
            raise err
        self._failure = err

    def _reduce(self, total: torch.Tensor, count: int) -> tuple[torch.Tensor, float]:
        """Sum ``total`` (float32 or float64: counts stay exact) and ``count`` over ranks in one all-reduce."""
        if self.distributed:
            n = torch.tensor([float(count)], dtype=total.dtype, device=total.device)
            packed = torch.cat([total.reshape(-1), n])
            if self._failure is not None:
                packed.fill_(float("nan"))
            dist.all_reduce(packed, group=self.process_group)
            total, count = packed[:-1].reshape(total.shape), float(packed[-1])
            if self._failure is not None:
                warnings.warn(f"HessianOperator: rank {dist.get_rank()} failed ({self._failure!r}); its products "
                              "are NaN on every rank, so all ranks stay in step", RuntimeWarning, stacklevel=3)
                self._failure = None
            if math.isnan(count):
                return total, 1.0
        if count <= 0:
            raise ValueError("data holds no samples (on any rank): pass at least one non-empty batch")
        return total, count

    @staticmethod
    def _check_loss(loss: Any) -> torch.Tensor:
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("loss_fn must return a scalar tensor (the mean loss over the batch)")
        return loss.reshape(())

    def _loss_at(self, leaves: Sequence[torch.Tensor], batch: Batch) -> torch.Tensor:
        return self._check_loss(functional_call(self._wrapper, dict(zip(self._keys, leaves)), (batch,)))

    def _first_order(self, index: int, batch: Batch) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Leaves and differentiable gradients of one batch (cached when ``cache_graph`` and within
        ``cache_bytes``)."""
        if index in self._graphs:
            return self._graphs[index]
        leaves = [p.detach().requires_grad_(True) for p in self.params]
        cache = self.cache_graph and (self.cache_bytes is None or self.cached_bytes < self.cache_bytes)
        saved: dict[int, int] = {}
        own = {leaf.untyped_storage().data_ptr() for leaf in leaves}

        def pack(t: torch.Tensor) -> torch.Tensor:  # sizes what backward keeps; the tensor itself is unchanged
            storage = t.untyped_storage()
            if storage.data_ptr() not in own:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if cache else nullcontext():
            loss = self._loss_at(leaves, batch)
            grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        out = (leaves, [g if g is not None and g.requires_grad else None for g in grads])
        size = sum(saved.values())
        if cache and (self.cache_bytes is None or self.cached_bytes + size <= self.cache_bytes):
            self._graphs[index] = out
            self.cached_bytes += size
        elif cache:  # past the budget: this batch and later ones are rebuilt at every product
            self.cached_bytes = self.cache_bytes
        return out

    def _hvp(self, form: str, index: int, batch: Batch, V: torch.Tensor) -> torch.Tensor:
        """HVPs of one batch for the rows of ``V`` (flat in, flat out)."""
        if form == "forward":
            return self._hvp_forward(batch, V)
        leaves, grads = self._first_order(index, batch)
        cached = index in self._graphs
        pairs = [(g, i) for i, g in enumerate(grads) if g is not None]
        if not pairs:  # the loss is at most linear in every selected parameter
            return torch.zeros_like(V)
        outputs = [g for g, _ in pairs]
        k = V.shape[0]
        if form == "reverse-batched" and k > 1:
            out = torch.empty_like(V)
            for start in range(0, k, self.chunk_size):
                rows = V[start : start + self.chunk_size]
                parts = self.unflatten(rows)
                hv = torch.autograd.grad(
                    outputs, leaves, grad_outputs=[parts[i] for _, i in pairs],
                    retain_graph=cached or start + self.chunk_size < k,
                    is_grads_batched=True, allow_unused=True, materialize_grads=True,
                )
                # a parameter the loss does not reach gets zeros without the batch dimension: expand them
                hv = [h.expand(rows.shape[0], *h.shape) if h.dim() == leaf.dim() else h for h, leaf in zip(hv, leaves)]
                out[start : start + rows.shape[0]] = torch.cat([h.reshape(rows.shape[0], -1) for h in hv], 1)
            return out
        rows = []
        for r in range(k):
            parts = self.unflatten(V[r])
            hv = torch.autograd.grad(
                outputs, leaves, grad_outputs=[parts[i] for _, i in pairs], retain_graph=cached or r < k - 1,
                allow_unused=True, materialize_grads=True,
            )
            rows.append(torch.cat([h.reshape(-1) for h in hv]))
        return torch.stack(rows)

    def _hvp_forward(self, batch: Batch, V: torch.Tensor) -> torch.Tensor:
        primals = tuple(p.detach() for p in self.params)
        grad_fn = grad(lambda leaves: self._loss_at(leaves, batch))

        def one(tangent: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            return jvp(grad_fn, (primals,), (tangent,))[1]

        # torch.func transforms ignore an outer no_grad; it only stops a graph through unselected parameters
        with torch.no_grad():
            if V.shape[0] == 1:
                return torch.cat([h.reshape(-1) for h in one(tuple(self.unflatten(V[0])))])[None]
            out = torch.empty_like(V)
            for start in range(0, V.shape[0], self.chunk_size):
                rows = V[start : start + self.chunk_size]
                hv = vmap(one)(tuple(self.unflatten(rows)))
                out[start : start + rows.shape[0]] = torch.cat([h.reshape(rows.shape[0], -1) for h in hv], 1)
        return out

    def _choose(self, kind: str, batch: Batch | None, V: torch.Tensor) -> torch.Tensor | None:
        """Pick the HVP form for ``kind`` (remembered, else measured) and return the first batch's product (only
        where ``_worth_timing``).

        Under a process group every rank takes the same branch and ends with the same choice, also a rank
        that holds no batch.
        """
        forms = HVP_FORMS
        key = (id(self.model), tuple(self.names), self.dtype, str(self.device), self.cache_graph, kind,
               tuple(m.training for m in self.model.modules()), None if batch is None else _signature(batch))
        known = _CHOICES.get(key)
        miss = batch is not None and known is None
        index = forms.index(known[0]) if known is not None else -1
        if self.distributed:
            packed = torch.tensor([float(miss), float(index)], device=self.device)
            dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=self.process_group)
            miss, index = bool(packed[0]), int(packed[1])
        if not miss:
            self.hvp_choice[kind] = forms[max(index, 0)]
            self.hvp_timings[kind] = dict(known[1]) if known is not None else {}
            return None if batch is None else self._local(self._hvp, self.hvp_choice[kind], 0, batch, V)
        result = self._calibrate(kind, batch, V)
        if batch is not None:
            if len(_CHOICES) >= _MAX_CHOICES:
                _CHOICES.pop(next(iter(_CHOICES)))
            _CHOICES[key] = (self.hvp_choice[kind], dict(self.hvp_timings[kind]))
        return result

    def _worth_timing(self, kind: str) -> bool:
        """Whether ``"auto"`` times the forms for ``kind``: only for several vectors on an accelerator (on the
        CPU, and for one vector anywhere, the loop of reverse products is chosen without measuring)."""
        return kind == "multi" and self.device.type != "cpu"

    def _calibrate(self, kind: str, batch: Batch | None, V: torch.Tensor) -> torch.Tensor | None:
        """Time each HVP form on the first batch (the products are kept), choose the fastest for ``kind``.

        A rank without a batch times nothing but joins the all-reduce that makes every rank choose alike.
        """
        probe = V[:2]
        forms = HVP_FORMS
        timings = dict.fromkeys(forms, 0.0)
        result, errors = None, []
        if batch is not None and self.cache_graph:
            self._local(self._first_order, 0, batch)  # a one-time cost, not part of a cached reverse HVP
        for form in forms if batch is not None and self._failure is None else ():
            try:
                self._sync()
                start = time.perf_counter()
                hv = self._hvp(form, 0, batch, probe)
                self._sync()
                timings[form] = time.perf_counter() - start
                result = hv
            except Exception as err:  # a form this model does not support (e.g. no vmap batching rule)
                timings[form] = float("inf")
                errors.append(err)
        if errors and result is None:  # no form ran: the batch itself fails
            self._fail(errors[0])
        if self.distributed:  # every rank must pick the same form
            packed = torch.tensor([timings[f] for f in forms], dtype=torch.float64, device=self.device)
            dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=self.process_group)
            timings = dict(zip(forms, packed.tolist()))
        choice = min(forms, key=lambda f: timings[f])
        self.hvp_choice[kind] = choice
        self.hvp_timings[kind] = timings
        if result is None or V.shape[0] == probe.shape[0]:
            return result
        rest = self._local(self._hvp, choice, 0, batch, V[probe.shape[0] :])
        return None if rest is None else torch.cat([result, rest])

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
