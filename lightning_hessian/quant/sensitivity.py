"""How much each layer's quantization is expected to raise the loss: HAWQ's Hessian sensitivity.

For a layer with weights ``W_i`` (``n_i`` elements) the second-order change of the loss under a
perturbation ``dW_i`` is about ``dW_i^T H_i dW_i``, with ``H_i`` the layer's diagonal Hessian block.
HAWQ-V2/V3 replace ``H_i`` by its average eigenvalue ``Tr(H_i) / n_i``, so quantizing to ``b`` bits costs

    ``Omega_i(b) = Tr(H_i) / n_i * ||Q_b(W_i) - W_i||^2``

(``Q_b``: the per-channel symmetric weight quantizer of :mod:`~lightning_hessian.quant.quantizers`).
HAWQ-V1 ranks layers by the top eigenvalue of ``H_i`` instead (``metric="eigenvalue"`` uses it in place
of the average trace). Both come from the spectrum engine's per-block routines
(:mod:`lightning_hessian.hessian.blocks`) on one operator over the quantizable weights: a Rademacher
probe ``z`` and one Hessian-vector product give ``z_i^T (H z)_i`` for every block at once.

The average trace treats every direction alike, but ``dW_i`` is not a random direction: rounding errors
are larger on channels with a large range, and curvature concentrates on a few directions. The
``"quadratic"`` metric drops the isotropic proxy and evaluates the quadratic form itself,

    ``Omega_i(b) = dW_i^T H_ii dW_i``,   ``dW_i = Q_b(W_i) - W_i``,

exactly: the vector ``dW_i`` placed in layer ``i``'s block (zero elsewhere) and one Hessian-vector
product, so ``layers x bit widths`` products in all (batched), usually fewer than a converged Hutchinson
trace needs. The first-order term ``g_i^T dW_i`` is left out on purpose: at a trained minimum the mean
gradient is noise around zero, and its sign would make the rounding direction, not the curvature,
decide the plan. Like the trace, the form prices weight rounding only, not activation rounding.

When a layer's input activations take its weight bits (``act_bits="follow"``, HAWQ-V3's W4A4/W8A8),
the bits also decide how coarsely that input is rounded. ``"quadratic+act"`` adds that part,

    ``Omega_i(b) = dW_i^T H_ii dW_i + dA_i^T H_A dA_i``,   ``dA_i = Q_b(A_i) - A_i``,

with ``A_i`` the layer's input on the probe batches, ``Q_b`` the fake quantizer ``QuantAct`` applies
after calibration on the same batches (one per-tensor range, unsigned when the input is never negative)
and ``H_A`` the Hessian of the loss with respect to that input: a zero tensor added to the input by a
forward pre-hook is differentiated twice, one product per layer and bit width, all sharing one
first-order graph per batch. The weight-activation cross term is left out (each part is one layer's
own rounding, like the weight form). Omega of one layer is then what ``Q_b`` on that layer alone costs.

ZeroQ (Cai et al., CVPR 2020) measures a layer's sensitivity without the loss or its Hessian, from the
model's outputs alone: ``metric="kl"`` is

    ``Omega_i(b) = mean_x KL(softmax(f(x)) || softmax(f_{i,b}(x)))``,

``f_{i,b}`` the model with layer ``i``'s weights replaced by ``Q_b(W_i)`` (nothing else changed), one
forward pass per layer, bit width and batch, on any data: ZeroQ's distilled inputs
(:func:`~lightning_hessian.quant.distill.distill_data`) need no labels. It is not a sum over layers, but
the allocation treats it as one, as ZeroQ does.

``"kfac"`` evaluates the same quadratic form on the K-FAC approximation of the layer's Gauss-Newton block,
``Omega_i(b) = <dW_i, G_i dW_i A_i>`` (:class:`~lightning_hessian.hessian.kfac.KFACOperator`, exact type-2): one
forward and one backward pass per output dimension of each probe batch for all layers and bit widths together, no
Hessian-vector product. It drops the Hessian's second-order term of the network (the GGN is the Hessian at a
perfect fit) and the coupling between samples that K-FAC averages out, and needs a loss that is a mean of
per-sample terms (cross-entropy is).

The Hessian part is the expensive one, so it is cached on disk (a JSON file keyed by a hash of the
model's parameters, buffers, structure and code, the loss function's code, the probe data and the estimator
settings: :mod:`~lightning_hessian.quant.measurement_cache`); the perturbations are recomputed every call (no
Hessian-vector product), so re-planning with other bit widths is free for the trace and eigenvalue metrics (the
quadratic forms depend on the bit widths, which are in the key).

Q-BERT (Shen et al., AAAI 2020) ranks the layers of a transformer by the top eigenvalue of each layer's Hessian
block over several data subsamples, its mean plus its spread: ``metric="qbert"`` is

    ``Omega_i(b) = (|mean_s lambda_i^s| + std_s lambda_i^s) * ||Q_b(W_i) - W_i||^2``,

``lambda_i^s`` the top eigenvalue of ``H_ii`` on subsample ``s``: each batch of the probe data is one subsample
(Lanczos per block, as ``"eigenvalue"`` on all the data; the population standard deviation over the batches, 0
for one batch). A layer whose curvature swings between subsamples counts as more sensitive, as in Q-BERT.

Weights quantized in groups (``groups={layer: WeightGroups}``) are perturbed by their own quantizer, so every
metric prices the rounding the quantized layer will apply.
Under ``torch.distributed`` each rank passes its share of the probe data and the products are
all-reduced (see :class:`~lightning_hessian.hessian.operator.HessianOperator`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lightning_hessian.checks import check_choice
from lightning_hessian.distributed import is_distributed
from lightning_hessian.hessian.blocks import block_slices, per_layer_top_eigenvalue, per_layer_trace
from lightning_hessian.hessian.kfac import KFACOperator
from lightning_hessian.hessian.operator import Batches, HessianOperator, LossFn, _as_batches
from lightning_hessian.hessian.trace import MIN_TRACE_SAMPLES, check_sampling
from lightning_hessian.quant.measurement_cache import cache_key, code_of, write_json
from lightning_hessian.quant.quantizers import (
    MAX_BITS,
    ActivationQuantizer,
    WeightGroups,
    quantize_weight,
    validate_bit_choices,
)
from lightning_hessian.quant.swap import quantizable_layers, require_unpacked

METRICS = ("trace", "eigenvalue", "qbert", "quadratic", "quadratic+act", "kfac", "kl")
QUADRATIC_METRICS = ("quadratic", "quadratic+act", "kfac")
PER_BITS_METRICS = (*QUADRATIC_METRICS, "kl")  # measured per bit width, so the bit widths are in the cache key
_CACHE_VERSION = 4


@dataclass
class Sensitivity:
    """Per-layer Hessian sensitivity of a model's quantizable weights.

    ``params[l]`` is ``n_l``; ``trace[l]`` the Hutchinson estimate of ``Tr(H_l)`` and
    ``trace_std_error[l]`` its standard error; ``top_eigenvalue[l]`` the largest eigenvalue of ``H_l``
    (empty unless requested); ``perturbation[l][b] = ||Q_b(W_l) - W_l||^2``; ``quadratic[l][b]`` the exact
    ``dW^T H_ll dW`` for ``dW = Q_b(W_l) - W_l`` and ``act_quadratic[l][b]`` the exact ``dA^T H_A dA`` for the
    layer's rounded input activations; ``kfac[l][b]`` the form ``dW^T (G_l (x) A_l) dW`` of the K-FAC Gauss-Newton
    block; ``subsample_eigenvalues[l]`` the top eigenvalue of ``H_l`` on each probe batch (Q-BERT); ``kl[l][b]``
    ZeroQ's mean KL divergence of the outputs with layer ``l``'s weights at ``b`` bits from the
    float outputs (each empty unless requested). A metric that was not measured
    leaves its tables empty. ``num_hvps`` counts the Hessian-vector products this call made (0 when
    ``cached``).

    >>> from lightning_hessian.hessian import dense_hessian
    >>> from lightning_hessian.quant.quantizers import quantize_weight
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(3, 2)).double()
    >>> batch = (torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,)))
    >>> loss = lambda m, b: F.cross_entropy(m(b[0]), b[1])
    >>> s = layer_sensitivity(model, loss, [batch], bit_choices=(2, 8), metrics=("quadratic",))
    >>> s.metrics, s.params
    (('quadratic',), {'0': 6})
    >>> H = dense_hessian(model, loss, batch)[:6, :6]  # the weight's block (the bias follows it)
    >>> dW = (quantize_weight(model[0].weight, 2) - model[0].weight).detach().flatten()
    >>> abs(s.omega("quadratic")["0"][2] - float(dW @ H @ dW)) < 1e-12
    True
    """

    params: dict[str, int]
    trace: dict[str, float]
    trace_std_error: dict[str, float]
    perturbation: dict[str, dict[int, float]]
    top_eigenvalue: dict[str, float] = field(default_factory=dict)
    quadratic: dict[str, dict[int, float]] = field(default_factory=dict)
    act_quadratic: dict[str, dict[int, float]] = field(default_factory=dict)
    kfac: dict[str, dict[int, float]] = field(default_factory=dict)
    kl: dict[str, dict[int, float]] = field(default_factory=dict)
    subsample_eigenvalues: dict[str, list[float]] = field(default_factory=dict)
    num_samples: int = 0
    num_hvps: int = 0
    converged: bool = True
    cached: bool = False

    @property
    def avg_trace(self) -> dict[str, float]:
        """``Tr(H_l) / n_l``: the average eigenvalue of each layer's Hessian block (HAWQ-V2/V3)."""
        return {name: self.trace[name] / self.params[name] for name in self.trace}

    @property
    def qbert(self) -> dict[str, float]:
        """Q-BERT's sensitivity of each layer: ``|mean| + std`` of its top eigenvalue over the subsamples."""
        out = {}
        for name, values in self.subsample_eigenvalues.items():
            t = torch.tensor(values, dtype=torch.float64)
            out[name] = float(t.mean().abs() + t.std(correction=0))
        return out

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics whose tables were measured."""
        tables = {"trace": self.trace, "eigenvalue": self.top_eigenvalue, "qbert": self.subsample_eigenvalues,
                  "quadratic": self.quadratic,
                  "quadratic+act": self.act_quadratic, "kfac": self.kfac, "kl": self.kl}
        return tuple(m for m in METRICS if tables[m])

    def omega(self, metric: str = "trace") -> dict[str, dict[int, float]]:
        """``Omega[l][b]``, the ``sensitivity`` table of :func:`~lightning_hessian.quant.allocation.allocate_bits`:
        ``Tr(H_l)/n_l`` (``"trace"``), the top eigenvalue (``"eigenvalue"``) or Q-BERT's ``|mean| + std`` of the
        top eigenvalue over subsamples (``"qbert"``) times ``||Q_b(W_l) - W_l||^2``,
        or the exact ``dW^T H_ll dW`` (``"quadratic"``), plus ``dA^T H_A dA`` of the input activations
        (``"quadratic+act"``), the K-FAC form ``dW^T (G (x) A) dW`` (``"kfac"``), or ZeroQ's output KL divergence
        (``"kl"``)."""
        check_choice(metric, "metric", METRICS)
        if metric not in self.metrics:
            raise ValueError(f"metric={metric!r} was not measured (this Sensitivity has {list(self.metrics)}): "
                             f"call layer_sensitivity(..., metrics=[{metric!r}])")
        if metric in ("quadratic", "kfac", "kl"):
            forms = {"quadratic": self.quadratic, "kfac": self.kfac, "kl": self.kl}[metric]
            return {name: dict(table) for name, table in forms.items()}
        if metric == "quadratic+act":
            return {name: {b: q + self.act_quadratic[name][b] for b, q in table.items()}
                    for name, table in self.quadratic.items()}
        curvature = {"trace": self.avg_trace, "eigenvalue": self.top_eigenvalue, "qbert": self.qbert}[metric]
        return {name: {b: curvature[name] * p for b, p in table.items()} for name, table in self.perturbation.items()}

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values only (a checkpoint entry that ``torch.load(weights_only=True)`` reads)."""
        return {
            "params": dict(self.params),
            "trace": dict(self.trace),
            "trace_std_error": dict(self.trace_std_error),
            "perturbation": {name: dict(table) for name, table in self.perturbation.items()},
            "top_eigenvalue": dict(self.top_eigenvalue),
            "quadratic": {name: dict(table) for name, table in self.quadratic.items()},
            "act_quadratic": {name: dict(table) for name, table in self.act_quadratic.items()},
            "kfac": {name: dict(table) for name, table in self.kfac.items()},
            "kl": {name: dict(table) for name, table in self.kl.items()},
            "subsample_eigenvalues": {name: list(values) for name, values in self.subsample_eigenvalues.items()},
            "num_samples": self.num_samples,
            "num_hvps": self.num_hvps,
            "converged": self.converged,
            "cached": self.cached,
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> Sensitivity:
        """Inverse of :meth:`to_dict` (bit widths may come back as strings, e.g. from JSON)."""
        return cls(
            params={k: int(v) for k, v in state["params"].items()},
            trace={k: float(v) for k, v in state["trace"].items()},
            trace_std_error={k: float(v) for k, v in state["trace_std_error"].items()},
            perturbation={k: {int(b): float(p) for b, p in t.items()} for k, t in state["perturbation"].items()},
            top_eigenvalue={k: float(v) for k, v in state.get("top_eigenvalue", {}).items()},
            quadratic={k: {int(b): float(q) for b, q in t.items()} for k, t in state.get("quadratic", {}).items()},
            act_quadratic={k: {int(b): float(q) for b, q in t.items()}
                           for k, t in state.get("act_quadratic", {}).items()},
            kfac={k: {int(b): float(q) for b, q in t.items()} for k, t in state.get("kfac", {}).items()},
            kl={k: {int(b): float(q) for b, q in t.items()} for k, t in state.get("kl", {}).items()},
            subsample_eigenvalues={k: [float(v) for v in values]
                                   for k, values in state.get("subsample_eigenvalues", {}).items()},
            num_samples=int(state.get("num_samples", 0)),
            num_hvps=int(state.get("num_hvps", 0)),
            converged=bool(state.get("converged", True)),
            cached=bool(state.get("cached", False)),
        )


def weight_perturbation(weight: torch.Tensor, bit_choices: Iterable[int],
                        groups: WeightGroups | None = None) -> dict[int, float]:
    """``||Q_b(W) - W||^2`` for each ``b`` (symmetric quantizer per output channel, or in ``groups``), in float64."""
    w = weight.detach()
    return {b: float((quantize_weight(w, b, groups=groups).double() - w.double()).square().sum())
            for b in bit_choices}


def quadratic_forms(op: HessianOperator, weights: Mapping[str, torch.Tensor], bit_choices: Iterable[int],
                    groups: Mapping[str, WeightGroups] | None = None) -> dict[str, dict[int, float]]:
    """``dW^T H_ll dW`` with ``dW = Q_b(W_l) - W_l`` for every layer ``l`` and bit width ``b``, exactly.

    ``op`` is a Hessian operator whose parameters include every tensor of ``weights``; each ``dW`` is
    embedded in its layer's block of a flat vector (zero elsewhere), so ``v^T H v`` only sees ``H_ll``.
    One Hessian-vector product per (layer, bit width), sent ``op.chunk_size`` vectors per ``matmat``. A layer in
    ``groups`` is rounded with its group-wise scales.
    """
    groups = groups or {}
    where = block_slices(op, {name: [w] for name, w in weights.items()})  # raises for a weight not in op.params
    pairs = [(name, b) for name in weights for b in bit_choices]
    out: dict[str, dict[int, float]] = {name: {} for name in weights}
    for start in range(0, len(pairs), op.chunk_size):
        chunk = pairs[start:start + op.chunk_size]
        V = torch.zeros(len(chunk), op.dim, dtype=op.dtype, device=op.device)
        for row, (name, b) in enumerate(chunk):
            w = weights[name].detach()
            V[row, where[name][0]] = (quantize_weight(w, b, groups=groups.get(name)) - w).reshape(-1).to(op.dtype)
        forms = (V.double() * op.matmat(V).double()).sum(1)
        for (name, b), q in zip(chunk, forms.tolist()):
            out[name][b] = q
    return out


def activation_ranges(op: HessianOperator, layers: Mapping[str, nn.Module],
                      momentum: float | None = None) -> dict[str, ActivationQuantizer]:
    """The input range each layer's ``QuantAct`` would calibrate on ``op``'s batches, as a tracking quantizer.

    Running min/max (or the EMA of ``momentum``) of every call's input, over the batches in order; under
    ``torch.distributed`` the ranks' ranges are merged by min/max, as ``HAWQModule.calibrate`` does.
    """
    observers = {name: ActivationQuantizer(MAX_BITS, momentum=momentum).to(op.device) for name in layers}

    def observe(name: str) -> Callable:
        return lambda module, args: observers[name].observe(args[0])

    handles = [m.register_forward_pre_hook(observe(name)) for name, m in layers.items()]
    try:
        op.loss()  # one no-grad pass over the batches (all ranks take part)
    finally:
        for handle in handles:
            handle.remove()
    for name, q in observers.items():
        if op.distributed:
            q.merge_ranks(op.process_group)
        if not q.calibrated:
            raise ValueError(f"layers: {name!r} never ran on the probe data, so its input activations have no range")
    return observers


def activation_quadratic_forms(op: HessianOperator, layers: Mapping[str, nn.Module], bit_choices: Iterable[int],
                               momentum: float | None = None) -> dict[str, dict[int, float]]:
    """``dA^T H_A dA`` with ``dA = Q_b(A_l) - A_l`` for every layer's input ``A_l`` and bit width ``b``, exactly.

    ``Q_b`` is the ``QuantAct`` fake quantizer at ``b`` bits with the range of :func:`activation_ranges`;
    ``H_A`` the Hessian of each batch's loss with respect to the layer's input on that batch (a layer called
    several times per forward perturbs every call). Per batch: a forward pass with a zero leaf added to each
    layer's input by a pre-hook, one first-order graph, then one double backward per (layer, bit width);
    the forms are averaged with sample-count weights and all-reduced like ``op.matmat``. The hooks are
    removed afterwards and add zero, so the model and its outputs are unchanged.
    """
    bits = list(bit_choices)
    observers = activation_ranges(op, layers, momentum)
    quantizers = {name: {b: _frozen(q, b) for b in bits} for name, q in observers.items()}
    pairs = [(name, b) for name in layers for b in bits]
    with torch.inference_mode(False), torch.enable_grad():
        mean = op.data_mean(lambda batch: _batch_act_forms(op, layers, quantizers, batch), shape=(len(pairs),))
    out: dict[str, dict[int, float]] = {name: {} for name in layers}
    for (name, b), q in zip(pairs, mean.tolist()):
        out[name][b] = q
    return out


def kl_divergences(op: HessianOperator, layers: Mapping[str, nn.Module], bit_choices: Iterable[int],
                   groups: Mapping[str, WeightGroups] | None = None) -> dict[str, dict[int, float]]:
    """ZeroQ's ``mean_x KL(softmax(f(x)) || softmax(f_{l,b}(x)))`` for every layer ``l`` and bit width ``b``.

    ``f`` is ``op.model`` as ``op``'s loss function calls it on ``op``'s batches (its forward's output, last
    dimension the logits; every call of a batch counts), ``f_{l,b}`` the same with layer ``l``'s weight
    replaced by ``Q_b(W_l)`` and put back bit for bit afterwards. Per sample (the batch's first dimension),
    averaged with sample-count weights and all-reduced like ``op.matmat``; no gradient is taken. A layer in
    ``groups`` is rounded with its group-wise scales.
    """
    groups = groups or {}
    bits = list(bit_choices)
    pairs = [(name, b) for name in layers for b in bits]
    weights = {name: m.weight for name, m in layers.items()}

    def batch_kl(batch: Any) -> torch.Tensor:
        reference = [F.log_softmax(out.double(), -1) for out in _outputs(op, batch)]
        out = []
        for name, b in pairs:
            w = weights[name]
            saved = w.detach().clone()
            with torch.no_grad():
                w.copy_(quantize_weight(saved, b, groups=groups.get(name)))
            try:
                quantized = _outputs(op, batch)
            finally:
                with torch.no_grad():
                    w.copy_(saved)
            kl = sum(F.kl_div(F.log_softmax(q.double(), -1), p, log_target=True, reduction="sum")
                     for p, q in zip(reference, quantized))
            out.append(kl / reference[0].shape[0])
        return torch.stack(out)

    with torch.no_grad():
        mean = op.data_mean(batch_kl, shape=(len(pairs),))
    op.clear_cache()  # graphs cached before hold the weights at their versions before the swaps
    table: dict[str, dict[int, float]] = {name: {} for name in layers}
    for (name, b), value in zip(pairs, mean.tolist()):
        table[name][b] = value
    return table


def _outputs(op: HessianOperator, batch: Any) -> list[torch.Tensor]:
    """What ``op.model``'s forward returns on ``batch`` when ``op``'s loss function runs it (every call)."""
    outputs: list[Any] = []
    handle = op.model.register_forward_hook(lambda module, args, out: outputs.append(out))
    try:
        op.batch_loss(batch)
    finally:
        handle.remove()
    if not outputs:
        raise ValueError(f"metric='kl' compares the outputs of {type(op.model).__name__}.forward, but the loss "
                         "function never called it; make the loss call model(...)")
    for out in outputs:
        if not isinstance(out, torch.Tensor) or out.dim() < 1:
            raise ValueError(f"metric='kl' compares logits, but {type(op.model).__name__}.forward returns "
                             f"{type(out).__name__}: make it return the logits tensor")
    return outputs


def _frozen(observer: ActivationQuantizer, bits: int) -> ActivationQuantizer:
    """A ``bits``-wide quantizer in eval mode with the observer's range (what ``QuantAct`` applies)."""
    q = ActivationQuantizer(bits, momentum=observer.momentum).to(observer.running_min.device)
    q.load_state_dict(observer.state_dict())
    return q.eval()


def _batch_act_forms(op: HessianOperator, layers: Mapping[str, nn.Module],
                     quantizers: Mapping[str, Mapping[int, ActivationQuantizer]], batch: Any) -> torch.Tensor:
    """The forms of one batch, in ``(layer, bits)`` order, from one first-order graph."""
    deltas: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in layers}

    def perturb(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> tuple:
            delta = torch.zeros_like(args[0], requires_grad=True)
            deltas[name].append(delta)
            inputs[name].append(args[0].detach())
            return (args[0] + delta, *args[1:])
        return hook

    handles = [m.register_forward_pre_hook(perturb(name)) for name, m in layers.items()]
    try:
        loss = op.batch_loss(batch)
    finally:
        for handle in handles:
            handle.remove()
    leaves = [d for name in layers for d in deltas[name]]
    grads = dict(zip(map(id, leaves), torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)))
    forms = []
    for name in layers:
        used = [(d, x, grads[id(d)]) for d, x in zip(deltas[name], inputs[name])
                if grads[id(d)] is not None and grads[id(d)].requires_grad]
        for q in quantizers[name].values():
            if not used:  # the loss is at most linear in this input
                forms.append(0.0)
                continue
            vectors = [q(x) - x for _, x, _ in used]
            hv = torch.autograd.grad([g for _, _, g in used], [d for d, _, _ in used], grad_outputs=vectors,
                                     retain_graph=True, allow_unused=True, materialize_grads=True)
            forms.append(float(sum((v.double() * h.double()).sum() for v, h in zip(vectors, hv))))
    return torch.tensor(forms, dtype=torch.float64, device=op.device)


def layer_sensitivity(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    layers: Iterable[str] | None = None,
    bit_choices: Iterable[int] = (2, 4, 8),
    *,
    rel_tol: float = 0.05,
    min_samples: int = MIN_TRACE_SAMPLES,
    max_samples: int = 400,
    batch: int = 16,
    metrics: Iterable[str] = ("trace",),
    eig_tol: float = 1e-3,
    act_momentum: float | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    groups: Mapping[str, WeightGroups] | None = None,
) -> Sensitivity:
    """Measure :class:`Sensitivity` of ``model``'s quantizable layers on ``data``.

    Args:
        model: the float network, in the train/eval mode the Hessian should be taken in (the caller
            decides; BatchNorm in eval mode is the usual choice).
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss over the batch.
        data: one batch or an iterable of batches (the probe set), as for ``HessianOperator``.
        layers: module paths of ``Conv1d``/``Conv2d``/``Linear`` layers (default: all quantizable ones).
            Only their ``weight`` is measured (biases stay in 32 bits and are not quantized by ``Q_b``).
        bit_choices: bit widths (2..8) for the perturbations.
        metrics: what to measure, any of ``"trace"`` (Hutchinson, per block), ``"eigenvalue"`` (each block's
            top eigenvalue by Lanczos, ``eig_tol``: HAWQ-V1), ``"qbert"`` (each block's top eigenvalue on every
            batch of ``data`` alone: Q-BERT's mean + std over subsamples), ``"quadratic"`` (the exact quadratic forms,
            ``len(layers) * len(bit_choices)`` Hessian-vector products) and ``"quadratic+act"`` (those plus the
            forms of each layer's rounded input activations at the same bits: for ``act_bits="follow"``),
            ``"kfac"`` (the quadratic forms of the K-FAC Gauss-Newton blocks: no Hessian-vector product) and
            ``"kl"`` (ZeroQ: the output KL divergence with one layer's weights quantized, ``len(layers) *
            len(bit_choices)`` forward passes over ``data``; the loss function is only used to run the model).
        act_momentum: how ``QuantAct`` tracks activation ranges (``None``: running min/max, else the EMA
            momentum); ``"quadratic+act"`` rounds each layer's input with the range it calibrates on ``data``.
        rel_tol: Hutchinson stops once every layer's trace has ``std_error <= rel_tol * |trace|``
            (after at least ``min_samples`` probes, at most ``max_samples``; ``converged`` is false then).
        batch: Rademacher probes per batched HVP call.
        seed: seed of the probes and Lanczos start vectors (same seed, same result on every rank).
        cache_dir: folder of the JSON cache; ``None`` disables caching. The key covers the model's
            parameters, buffers, modes, structure (``repr``) and the code of its module classes, the loss
            function's code with the plain values it closes over, every tensor of ``data`` (a shuffling
            DataLoader never hits) and the settings above; what it cannot see is state a loss reads from
            elsewhere (a global, an object it closes over). Under DDP each rank keys its own shard and all
            ranks hit or all measure.
        groups: ``{layer: WeightGroups}`` for layers quantized in groups (the others per channel): their
            perturbations, quadratic forms and KL divergences round with the group-wise scales.
    """
    if iter(data) is data:  # a generator or iterator: read once, for the key and the measurement alike
        data = list(data)
    names = _check_layers(model, layers)
    bits = validate_bit_choices(bit_choices)
    check_sampling(None, rel_tol, batch, min_samples, max_samples)
    if isinstance(metrics, str):
        raise TypeError(f"metrics must be a list of metric names, e.g. [{metrics!r}], got the string {metrics!r}")
    chosen = set(metrics)
    wanted = [m for m in METRICS if m in chosen]
    unknown = sorted(chosen - set(METRICS))
    if unknown or not wanted:
        raise ValueError(f"metrics: {unknown or 'empty'}; choose one or more of {METRICS}")
    modules = dict(model.named_modules())
    weights = {name: modules[name].weight for name in names}
    groups = {name: g for name, g in (groups or {}).items() if not g.per_channel}
    unknown_groups = sorted(set(groups) - set(names))
    if unknown_groups:
        raise ValueError(f"groups names layers {unknown_groups} that are not measured; measured: {names}")
    perturbation = {name: weight_perturbation(w, bits, groups.get(name)) for name, w in weights.items()}
    settings = {
        "version": _CACHE_VERSION, "layers": names, "rel_tol": rel_tol, "min_samples": min_samples,
        "max_samples": max_samples, "batch": batch, "metrics": wanted, "eig_tol": eig_tol, "seed": seed,
        "loss_fn": code_of(loss_fn),
        "bits": bits if set(PER_BITS_METRICS) & set(wanted) else None,
        "act_momentum": act_momentum if "quadratic+act" in wanted else None,
        "groups": {name: str(g) for name, g in sorted(groups.items())},
    }
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"sensitivity-{cache_key(model, data, settings)}.json"
        found = _read_cache(path, perturbation)
        if _all_ranks(found is not None):
            return found
    hessian = _measure(model, loss_fn, data, weights, bits, wanted, rel_tol, min_samples, max_samples, batch,
                       eig_tol, act_momentum, seed, groups)
    if path is not None:
        write_json(path, {k: v for k, v in hessian.items() if k != "num_hvps"})
    return Sensitivity(perturbation=perturbation, **hessian)


def _check_layers(model: nn.Module, layers: Iterable[str] | None) -> list[str]:
    require_unpacked(model, "layer_sensitivity")
    available = quantizable_layers(model)
    if not available:
        raise ValueError(f"model {type(model).__name__} has no quantizable layer (nn.Conv1d, nn.Conv2d or nn.Linear)")
    if layers is None:
        return available
    if isinstance(layers, str):
        raise TypeError(f"layers must be a list of module paths, got the string {layers!r}")
    names = list(layers)
    unknown = [name for name in names if name not in available]
    if unknown or not names:
        raise ValueError(f"layers: {unknown or 'empty list'} are not quantizable layers; choose from {available}")
    return names


def _measure(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    weights: Mapping[str, nn.Parameter],
    bits: list[int],
    metrics: list[str],
    rel_tol: float,
    min_samples: int,
    max_samples: int,
    batch: int,
    eig_tol: float,
    act_momentum: float | None,
    seed: int,
    groups: Mapping[str, WeightGroups],
) -> dict[str, Any]:
    """The Hessian part: block traces from one set of probes, block top eigenvalues, exact quadratic forms."""
    op = HessianOperator(model, loss_fn, data, params=list(weights.values()))
    blocks = {name: [w] for name, w in weights.items()}
    out: dict[str, Any] = {
        "params": {name: w.numel() for name, w in weights.items()},
        "trace": {}, "trace_std_error": {}, "top_eigenvalue": {}, "quadratic": {}, "act_quadratic": {}, "kfac": {},
        "kl": {}, "subsample_eigenvalues": {},
        "num_samples": 0, "converged": True,
    }
    if "trace" in metrics:
        traces = per_layer_trace(op, blocks, rel_tol=rel_tol, confidence=None, batch=batch,
                                 min_samples=min_samples, max_samples=max_samples, seed=seed)
        out["trace"] = {name: t.estimate for name, t in traces.items()}
        out["trace_std_error"] = {name: t.std_error for name, t in traces.items()}
        out["num_samples"] = next(iter(traces.values())).num_samples
        out["converged"] = all(t.converged for t in traces.values())
    if {"quadratic", "quadratic+act"} & set(metrics):
        out["quadratic"] = quadratic_forms(op, weights, bits, groups)
    if "kfac" in metrics:
        out["kfac"] = quadratic_forms(KFACOperator(model, loss_fn, data, params=list(weights.values())), weights, bits,
                                      groups)
    if "quadratic+act" in metrics:
        modules = dict(model.named_modules())
        read = {name: modules[name] for name in weights if not isinstance(modules[name], nn.Embedding)}
        forms = activation_quadratic_forms(op, read, bits, act_momentum) if read else {}
        # an embedding reads indices, which are not rounded: its activation part is 0
        out["act_quadratic"] = {name: forms.get(name, dict.fromkeys(bits, 0.0)) for name in weights}
    if "kl" in metrics:
        modules = dict(model.named_modules())
        out["kl"] = kl_divergences(op, {name: modules[name] for name in weights}, bits, groups)
    if "eigenvalue" in metrics:
        eigs = per_layer_top_eigenvalue(op, blocks, k=1, tol=eig_tol, seed=seed)
        out["top_eigenvalue"] = {name: float(e.eigenvalues[0]) for name, e in eigs.items()}
        out["converged"] = out["converged"] and all(e.converged for e in eigs.values())
    subsample_hvps = 0
    if "qbert" in metrics:
        out["subsample_eigenvalues"], converged, subsample_hvps = subsample_top_eigenvalues(
            model, loss_fn, data, weights, eig_tol, seed)
        out["converged"] = out["converged"] and converged
    out["num_hvps"] = op.num_hvps + subsample_hvps + len(weights) * len(bits) * ("quadratic+act" in metrics)
    return out


def subsample_top_eigenvalues(
    model: nn.Module, loss_fn: LossFn, data: Any,
    weights: Mapping[str, nn.Parameter], tol: float = 1e-3, seed: int = 0,
) -> tuple[dict[str, list[float]], bool, int]:
    """Q-BERT's measurement: each layer's top Hessian-block eigenvalue on every batch of ``data`` on its own.

    Returns ``({layer: [lambda on batch 1, ...]}, all converged, Hessian-vector products)``. Under
    ``torch.distributed`` subsample ``s`` is the union of the ranks' ``s``-th batches, so every rank must hold
    as many batches.
    """
    batches, source = _as_batches(data)
    batches = list(source) if batches is None else batches
    if is_distributed():  # every rank must join every subsample's products
        counts = torch.tensor([len(batches), -len(batches)], device=next(iter(weights.values())).device)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        if int(counts[0]) != -int(counts[1]):
            raise ValueError(f"metric='qbert': the ranks hold {-int(counts[1])} to {int(counts[0])} probe batches, but "
                             "subsample s is every rank's s-th batch: give each rank as many (probe_size a multiple of "
                             "probe_batch_size x world size)")
    blocks = {name: [w] for name, w in weights.items()}
    out: dict[str, list[float]] = {name: [] for name in weights}
    converged, hvps = True, 0
    for batch in batches:
        op = HessianOperator(model, loss_fn, Batches([batch]), params=list(weights.values()))
        eigs = per_layer_top_eigenvalue(op, blocks, k=1, tol=tol, seed=seed)
        for name, e in eigs.items():
            out[name].append(float(e.eigenvalues[0]))
        converged = converged and all(e.converged for e in eigs.values())
        hvps += op.num_hvps
    return out, converged, hvps


def _read_cache(path: Path, perturbation: dict[str, dict[int, float]]) -> Sensitivity | None:
    """The cached measurement, or ``None`` for a missing or unreadable file (measured again, then)."""
    try:
        found = json.loads(path.read_text())
        return Sensitivity.from_dict({**found, "perturbation": perturbation, "num_hvps": 0, "cached": True})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _all_ranks(flag: bool) -> bool:
    """``flag`` on every rank (all-reduced), so all ranks take the cache or all measure (HVPs are collective)."""
    if not is_distributed():
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())
