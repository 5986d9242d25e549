"""Model swapping: ``quantize_model`` puts quantized layers (:mod:`~lightning_hessian.quant.layers`) in a copy of
any model.

It swaps ``Conv1d``/``Conv2d``/``Linear`` (fake-quantized weights per channel or in groups, a ``QuantAct`` on the
input), ``Embedding`` (fake-quantized weights, no input quantizer: its input is indices), ``ResidualAdd`` (a
``QuantAct`` on each input) and adaptive average pools (a ``QuantAct`` on the input), by module traversal; layer
names are the module paths of the float model, with every ``nn.MultiheadAttention`` unpacked into four linear
layers (:mod:`~lightning_hessian.quant.attention`). Layers it cannot quantize are reported and warned about
(``torch.fx`` also scans for functional ops when the model is traceable).

Example::

    qmodel, report = quantize_model(model, {"features.0": 8, "features.3": 4, ...})  # or bits=8
    calibrate(qmodel, [x1, x2])                 # quant.layers; or fine-tune: ranges track in training mode
    fold_batchnorm(qmodel, x1)                  # quant.folding: freeze BN statistics into the convs
    imodel = to_integer_model(qmodel.eval(), x1)  # lightning_hessian.quant.integer: the deployed arithmetic
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.loss import _Loss

from lightning_hessian.models import ResidualAdd
from lightning_hessian.quant.attention import unpack_attention
from lightning_hessian.quant.layers import (
    QUANT_MODULES,
    QuantAdaptiveAvgPool,
    QuantConv1d,
    QuantConv2d,
    QuantEmbedding,
    QuantLinear,
    QuantResidualAdd,
    _QuantWeights,
)
from lightning_hessian.quant.quantizers import (
    FOLLOW,
    MAX_BITS,
    ActivationQuantizer,
    WeightGroups,
    validate_act_bits,
    validate_bits,
)

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
# Float modules of transformers: no integer kernel; integer conversion keeps them as float islands on request
FLOAT_MODULES = (nn.LayerNorm, nn.GELU, nn.Softmax)
_PASS_THROUGH = (nn.ReLU, nn.Identity, nn.Flatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, ResidualAdd,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)

# Ops that may run between quantized modules: ReLU, the identity in eval (dropout) and pure data movement;
# the integer conversion maps each group onto integer codes.
RELU_OPS = {F.relu, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_}
IDENTITY_OPS = {F.dropout, F.dropout1d, F.dropout2d, torch.clone, Tensor.clone, Tensor.contiguous}
RESHAPE_OPS = {torch.flatten, Tensor.flatten, torch.reshape, Tensor.reshape, Tensor.view, torch.unsqueeze,
               Tensor.unsqueeze, torch.squeeze, Tensor.squeeze}
TRANSPOSE_OPS = {torch.permute, Tensor.permute, torch.transpose, Tensor.transpose}
_FX_ALLOWED = {f.__name__ for f in RELU_OPS | IDENTITY_OPS | RESHAPE_OPS | TRANSPOSE_OPS} | {
    "size", "dim", "getattr", "getitem"}

_SWAP = {nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear, nn.Embedding: QuantEmbedding}
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _swappable(m: nn.Module) -> bool:
    """A plain Conv1d/Conv2d/Linear, or an Embedding without ``max_norm`` (which rescales float weights in place)."""
    return type(m) in _SWAP and getattr(m, "max_norm", None) is None


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names (module paths) of the layers ``quantize_model`` can quantize: plain Conv1d, Conv2d, Linear, Embedding.

    Exact types (and layers already quantized): a subclass stays float, since swapping it would drop what it
    overrides. An ``nn.MultiheadAttention`` at ``attn`` contributes ``attn.q_proj``, ``attn.k_proj``,
    ``attn.v_proj`` and ``attn.out_proj``, its layers once unpacked (``unpack_attention``). The cost tables and
    sensitivities use this same list (on the unpacked model).
    """
    names = []
    packed: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(f"{p}.") for p in packed):
            continue
        if isinstance(m, nn.MultiheadAttention):
            packed.append(name)
            names += [f"{name}.{p}" if name else p for p in _PROJECTIONS]
        elif _swappable(m) or isinstance(m, _QuantWeights):
            names.append(name)
    return names


def require_unpacked(model: nn.Module, who: str) -> None:
    """Refuse a model whose attention projections are no layers (``nn.MultiheadAttention``), naming the fix."""
    if any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        raise ValueError(f"{who}: the model's nn.MultiheadAttention applies its projections inside a functional "
                         "call that no layer hook sees; pass unpack_attention(model) (lightning_hessian.quant), whose "
                         "projections are layers named <attention>.q_proj/k_proj/v_proj/out_proj")


def resolve_groups(groups: Any, weights: Mapping[str, Tensor]) -> tuple[dict[str, WeightGroups], dict[str, str]]:
    """Per-layer ``WeightGroups`` from ``groups`` for layers ``{name: weight}``, and the layers it left per-channel.

    ``groups`` is ``None`` (every layer per-channel), one spec for every layer (``WeightGroups``, ``"tensor"``, a
    mapping with keys ``rows``/``columns``), or ``{layer name: spec}`` (other layers per-channel). One spec applies
    to every layer whose weight it tiles; the others stay per-channel and are returned as ``{name: why}`` (a
    per-layer spec that does not tile its layer is an error).
    """
    if groups is None:
        return {}, {}
    if isinstance(groups, Mapping) and not set(groups) <= {"rows", "columns"}:
        unknown = sorted(set(groups) - set(weights))
        if unknown:
            raise ValueError(f"groups names unknown layers {unknown}; quantizable layers are {list(weights)}")
        out = {name: WeightGroups.parse(spec) for name, spec in groups.items()}
        for name, g in out.items():
            g.blocks(weights[name].shape, f"groups[{name!r}]")
        return {name: g for name, g in out.items() if not g.per_channel}, {}
    spec = WeightGroups.parse(groups)
    if spec.per_channel:
        return {}, {}
    out, left = {}, {}
    for name, w in weights.items():
        try:
            spec.blocks(w.shape, name)
        except ValueError as err:
            left[name] = str(err).split(": ", 1)[1]
            continue
        out[name] = spec
    return out, left


@dataclass
class QuantizationReport:
    """What ``quantize_model`` did: per-layer weight bits, and everything that stays in float.

    ``act_bits`` is the argument (an int or ``"follow"``); ``layer_act_bits`` the input activation bits
    each quantized layer got (embeddings, which read indices, have none: ``embeddings``).

    >>> from lightning_hessian.models import MNIST1DCNN
    >>> bits = {"features.0": 8, "features.2": 4, "features.4": 4, "classifier": 8}
    >>> qmodel, report = quantize_model(MNIST1DCNN(channels=4), bits, act_bits="follow")
    >>> report.layer_act_bits == bits, report.float_layers, report.float_ops
    (True, {}, {})
    >>> type(qmodel.features[2]).__name__, qmodel.features[2].weight_bits, qmodel.features[2].act.bits
    ('QuantConv1d', 4, 4)
    """

    weight_bits: dict[str, int]
    act_bits: int | str
    groups: dict[str, WeightGroups] = field(default_factory=dict)  # layers with group-wise scales (others per-channel)
    float_layers: dict[str, str] = field(default_factory=dict)  # layers with weights left in float: name -> why
    float_ops: dict[str, str] = field(default_factory=dict)  # activations, other weightless modules, functional ops
    batchnorms: list[str] = field(default_factory=list)  # fold with fold_batchnorm before deployment
    fx_error: str | None = None  # why the torch.fx scan for functional ops could not run
    embeddings: list[str] = field(default_factory=list)  # quantized embeddings: no input quantizer

    @property
    def layer_act_bits(self) -> dict[str, int]:
        return {name: b if self.act_bits == FOLLOW else self.act_bits for name, b in self.weight_bits.items()
                if name not in self.embeddings}

    def __str__(self) -> str:
        lines = ["| layer | weight bits | scales | input activation bits |", "|---|---|---|---|"]
        lines += [f"| {name} | {bits} | {self.groups.get(name, WeightGroups())} | {self.layer_act_bits.get(name, '')} |"
                  for name, bits in self.weight_bits.items()]
        lines += [f"| {name} | float ({why}) | | |" for name, why in self.float_layers.items()]
        acts = f"{self.act_bits} bits" if self.act_bits != FOLLOW else \
            f"as the weights ({MAX_BITS} bits into residual adds and pools)"
        lines.append(f"activations: {acts}; BatchNorm to fold: {', '.join(self.batchnorms) or 'none'}")
        if self.float_ops:
            lines.append(f"ops in float: {', '.join(f'{n} ({why})' for n, why in self.float_ops.items())}")
        if self.fx_error:
            lines.append(f"functional ops not scanned (torch.fx could not trace: {self.fx_error})")
        return "\n".join(lines)


def _resolve_bits(bits: int | Mapping[str, int], layers: list[str]) -> dict[str, int]:
    if isinstance(bits, Mapping):
        unknown = sorted(set(bits) - set(layers))
        if unknown:
            raise ValueError(f"bits names unknown layers {unknown}; quantizable layers are {layers}")
        return {name: validate_bits(bits[name], f"bits[{name!r}]") for name in layers if name in bits}
    return dict.fromkeys(layers, validate_bits(bits, "bits"))


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` of ``model``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (ResidualAdd, ActivationQuantizer, *QUANT_MODULES)) or super().is_leaf_module(m, qualname)


def _functional_float_ops(model: nn.Module) -> tuple[dict[str, str], str | None]:
    """Functional ops in ``forward`` code that would run in float, found by ``torch.fx`` when it can trace."""
    try:
        graph = _LeafTracer().trace(model)
    except Exception as err:  # fx cannot trace data-dependent Python control flow; the scan is best effort
        return {}, f"{type(err).__name__}: {str(err).splitlines()[0]}"
    found = {}
    for node in graph.nodes:
        if node.op in ("call_function", "call_method"):
            target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
            if target not in _FX_ALLOWED:
                found[f"<{node.name}>"] = f"functional {target} in forward()"
    return found, None


def _float_leftovers(
    model: nn.Module, weight_bits: Mapping[str, int], ignore: tuple[type, ...] = ()
) -> tuple[dict[str, str], dict[str, str]]:
    """What stays float, as ``(layers, ops)``: modules with weights that are not quantized (a conv/linear not in
    ``bits``, an unsupported type), and weightless leaf modules that compute something (activations other than
    ReLU, pooling). Loss modules are neither (``forward`` never runs them); nor are ``ignore``'s types."""
    layers, ops = {}, {}
    skip = (*BATCHNORMS, *QUANT_MODULES, ActivationQuantizer, _Loss, *ignore)
    for name, m in model.named_modules():
        if not name or isinstance(m, skip) or name in weight_bits:
            continue
        if _swappable(m):
            layers[name] = f"{type(m).__name__} not in bits"
        elif type(m) in _SWAP:
            layers[name] = f"{type(m).__name__} with max_norm (renormalises its float weights in place): unsupported"
        elif isinstance(m, FLOAT_MODULES):  # a float op by design (Q-BERT keeps LayerNorm in float), gain included
            ops[name] = f"{type(m).__name__}: no integer kernel"
        elif list(m.parameters(recurse=False)):
            layers[name] = f"{type(m).__name__}: unsupported layer type"
        elif not list(m.children()) and not isinstance(m, _PASS_THROUGH):
            ops[name] = f"{type(m).__name__}: unsupported op"
    return layers, ops


def quantize_model(
    model: nn.Module, bits: int | Mapping[str, int], act_bits: int | str = 8, momentum: float | None = None,
    ignore: tuple[type, ...] = (), groups: Any = None,
) -> tuple[nn.Module, QuantizationReport]:
    """Quantized copy of ``model`` (the original is untouched) and a report of what was quantized.

    Args:
        model: any ``nn.Module``; Conv1d/Conv2d/Linear/Embedding become ``QuantConv1d``/``QuantConv2d``/
            ``QuantLinear``/``QuantEmbedding`` at the same module path, ``ResidualAdd`` becomes
            ``QuantResidualAdd`` and adaptive average pools become ``QuantAdaptiveAvgPool``; every
            ``nn.MultiheadAttention`` is first unpacked into four linear layers (``unpack_attention``: the copy's
            attention is ``MultiheadAttention``, its layers ``<attention>.q_proj`` ... ``.out_proj``).
        bits: weight bits (2..8) for every quantizable layer, or a dict ``{layer name: bits}`` (layers
            missing from the dict stay in float and are reported).
        act_bits: bit width of every activation quantizer (2..8), or ``"follow"``: each layer's input
            activations take that layer's weight bits (HAWQ-V3's mixed W4A4/W8A8 setting), and the inputs
            of residual additions and pools, which have no weights, keep 8 bits.
        momentum: ``None`` for running min/max activation ranges, else the EMA momentum.
        ignore: module types that compute nothing to quantize (e.g. torchmetrics ``Metric``): not reported.
        groups: which weights share a scale (:func:`resolve_groups`): ``None`` per channel, one spec for every layer
            it tiles (``{"columns": 32}``, ``WeightGroups(rows=4)``, ``"tensor"``; the others stay per-channel,
            with a warning), or ``{layer name: spec}``; ``report.groups`` holds the group-wise layers.

    What stays in float triggers one ``UserWarning`` listing it: layers with weights (unsupported types, layers
    missing from ``bits``: ``report.float_layers``) and ops (weightless modules other than ReLU, dropout and
    reshapes, functional ops found by ``torch.fx``: ``report.float_ops``), which an integer-only model cannot
    hold; loss modules are not listed. BatchNorm stays unfolded for training.
    """
    layers = quantizable_layers(model)
    if not layers:
        raise ValueError("model has no quantizable layer (nn.Conv1d, nn.Conv2d, nn.Linear or nn.Embedding)")
    validate_act_bits(act_bits, "act_bits")
    weight_bits = _resolve_bits(bits, layers)
    model = unpack_attention(model)  # a copy if it has attention to unpack: its projections become layers
    modules = dict(model.named_modules())
    layer_groups, per_channel = resolve_groups(groups, {name: modules[name].weight for name in weight_bits})
    other_bits = MAX_BITS if act_bits == FOLLOW else act_bits  # inputs of additions and pools
    qmodel = copy.deepcopy(model)
    swapped: dict[int, nn.Module] = {}  # a module at several paths (shared) gets one quantized module at all
    for name, m in list(qmodel.named_modules(remove_duplicate=False)):
        if id(m) in swapped:
            set_module(qmodel, name, swapped[id(m)])
            continue
        if name in weight_bits and _swappable(m):
            layer_act = weight_bits[name] if act_bits == FOLLOW else act_bits
            swapped[id(m)] = _SWAP[type(m)].from_float(m, weight_bits[name], layer_act, momentum,
                                                       layer_groups.get(name))
        elif isinstance(m, ResidualAdd):
            swapped[id(m)] = QuantResidualAdd(other_bits, momentum).train(m.training)
        elif isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
            swapped[id(m)] = QuantAdaptiveAvgPool.from_float(m, other_bits, momentum).train(m.training)
        else:
            continue
        set_module(qmodel, name, swapped[id(m)])
    functional, fx_error = _functional_float_ops(model)
    float_layers, float_ops = _float_leftovers(model, weight_bits, ignore)
    report = QuantizationReport(weight_bits=weight_bits, act_bits=act_bits, groups=layer_groups,
                                float_layers=float_layers, float_ops={**float_ops, **functional},
                                batchnorms=[n for n, m in model.named_modules() if isinstance(m, BATCHNORMS)],
                                fx_error=fx_error,
                                embeddings=[n for n in weight_bits if isinstance(modules[n], nn.Embedding)])
    left = {**report.float_layers, **report.float_ops}
    if left:
        listed = "; ".join(f"{n} ({why})" for n, why in left.items())
        warnings.warn(f"quantize_model: {len(left)} layer(s)/op(s) left in float: {listed}", UserWarning, stacklevel=2)
    if per_channel:
        listed = "; ".join(f"{n} ({why})" for n, why in per_channel.items())
        warnings.warn(f"quantize_model: groups={groups!r} does not tile {len(per_channel)} layer(s), which keep "
                      f"per-channel scales: {listed}", UserWarning, stacklevel=2)
    if fx_error:
        warnings.warn(f"quantize_model: torch.fx cannot trace the model ({fx_error}), so functional ops in its "
                      "forward() (e.g. torch.sigmoid, x * y) were not checked: any there run in float",
                      UserWarning, stacklevel=2)
    return qmodel, report
