"""Quantized layers, module swapping and BatchNorm folding for quantization-aware training.

``quantize_model`` swaps ``Conv1d``/``Conv2d``/``Linear`` (fake-quantized weights per channel, a ``QuantAct``
on the input), ``ResidualAdd`` (a ``QuantAct`` on each input) and adaptive average pools (a ``QuantAct`` on
the input) on any model, by module traversal; layer names are the module paths of the float model. Layers
it cannot quantize are reported and warned about (``torch.fx`` also scans for functional ops when the
model is traceable).

Every quantizer sits on the input of the module that reads it and rounds what reaches it once: a layer's
accumulator (through ReLU, reshapes), a residual sum, a pooled sum or the model input. That is where the
deployed model rounds too: each ``QuantAct`` becomes the output requantization of the kernel producing
its input (``QLinearConv``, ``QGemm``, ``QLinearAdd``; ``lightning_hessian.quant.integer``), which
rounds half to even as ``fake_quantize`` does. Training runs with BatchNorm unfolded; ``fold_batchnorm``
then folds the frozen statistics into the preceding conv for deployment.

Example::

    qmodel, report = quantize_model(model, {"features.0": 8, "features.3": 4, ...})  # or bits=8
    calibrate(qmodel, [x1, x2])                 # or fine-tune: ranges track in training mode
    fold_batchnorm(qmodel, x1)                  # freeze BN statistics into the convs
    imodel = to_integer_model(qmodel.eval(), x1)  # lightning_hessian.quant.integer: the deployed arithmetic
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.loss import _Loss
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from lightning_hessian.models import ResidualAdd
from lightning_hessian.modes import training_mode
from lightning_hessian.quant.quantizers import (
    FOLLOW,
    MAX_BITS,
    ActivationQuantizer,
    bias_codes,
    quantize_bias,
    quantize_weight,
    validate_act_bits,
    validate_bits,
    weight_codes,
    weight_scale,
)

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
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


class QuantAct(ActivationQuantizer):
    """Activation quantizer module: model inputs, and the input of every quantized layer, addition and pool.

    Fake-quantizes in training and eval; deployed, it is the requantization fused into the kernel that
    produces its input (or the ``QuantizeLinear`` of the model input).
    """


class _QuantLayer:
    """Shared behaviour of the quantized conv/linear layers (mixed in before the torch layer class)."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    weight_bits: int
    act: QuantAct

    def _init_quant(self, weight_bits: int, act_bits: int, momentum: float | None) -> None:
        self.weight_bits = validate_bits(weight_bits, "weight_bits")
        self.act = QuantAct(act_bits, signed=None, momentum=momentum)

    def integer_params(self) -> tuple[Tensor, Tensor | None, Tensor]:
        """Weight codes (int64), int32 bias codes (int64, or None) and their float32 scales per output channel
        (``weight_scale``): the single source of the integer parameters for conversion and export.
        """
        codes, scale = weight_codes(self.weight, self.weight_bits)
        bias = None if self.bias is None else bias_codes(self.bias, scale.double() * self.act.scale().double())
        return codes.long(), bias, scale.float()

    def _layer_op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(x)
        scale = weight_scale(self.weight, self.weight_bits)  # once, for the weight and the bias grid
        weight = quantize_weight(self.weight, self.weight_bits, scale)
        bias = self.bias
        if bias is not None and self.act.calibrated:
            bias = quantize_bias(bias, scale * self.act.scale())
        return self._layer_op(x, weight, bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight_bits={self.weight_bits}"


class _QuantConv(_QuantLayer):
    @classmethod
    def from_float(cls, conv: nn.Module, weight_bits: int, act_bits: int = 8, momentum: float | None = None):
        """Quantized copy of ``conv`` sharing its parameters."""
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype,
                weight_bits=weight_bits, act_bits=act_bits, momentum=momentum)
        q.weight, q.bias = conv.weight, conv.bias
        return q.train(conv.training)

    def _layer_op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return self._conv_forward(x, weight, bias)


class QuantConv1d(_QuantConv, nn.Conv1d):
    """``nn.Conv1d`` with per-channel fake-quantized weights, an int32 bias and a quantized input."""

    def __init__(self, *args, weight_bits: int = 8, act_bits: int = 8, momentum: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(weight_bits, act_bits, momentum)


class QuantConv2d(_QuantConv, nn.Conv2d):
    """``nn.Conv2d`` with per-channel fake-quantized weights, an int32 bias and a quantized input."""

    def __init__(self, *args, weight_bits: int = 8, act_bits: int = 8, momentum: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(weight_bits, act_bits, momentum)


class QuantLinear(_QuantLayer, nn.Linear):
    """``nn.Linear`` with per-channel fake-quantized weights, an int32 bias and a quantized input."""

    def __init__(self, *args, weight_bits: int = 8, act_bits: int = 8, momentum: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(weight_bits, act_bits, momentum)

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_bits: int, act_bits: int = 8, momentum: float | None = None):
        """Quantized copy of ``linear`` sharing its parameters."""
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                device=linear.weight.device, dtype=linear.weight.dtype, weight_bits=weight_bits,
                act_bits=act_bits, momentum=momentum)
        q.weight, q.bias = linear.weight, linear.bias
        return q.train(linear.training)

    def _layer_op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)


class QuantResidualAdd(nn.Module):
    """Quantized ``a + b``: each input quantized (``act_a``, ``act_b``), their sum left for its readers to round.

    Deployed as one ``QLinearAdd`` per distinct reader quantizer: the two codes are rescaled and summed in
    float32 straight onto the reader's grid, one rounding, as the reader's ``fake_quantize`` of the sum does.
    """

    def __init__(self, bits: int = 8, momentum: float | None = None):
        super().__init__()
        self.act_a = QuantAct(bits, signed=None, momentum=momentum)
        self.act_b = QuantAct(bits, signed=None, momentum=momentum)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.act_a(a) + self.act_b(b)


def window_sum(x: Tensor, output_size: tuple[int | None, ...]) -> Tensor:
    """Sum over the equal windows of an adaptive average pool (``(N, C, *spatial)``; dtype kept)."""
    spatial = x.shape[2:]
    out = [s if o is None else o for o, s in zip(output_size, spatial)]
    if any(s % o for o, s in zip(out, spatial)):
        raise ValueError(f"integer average pooling needs input size {tuple(spatial)} divisible by the output "
                         f"size {tuple(out)} (equal windows)")
    shape = [x.shape[0], x.shape[1]]
    for o, s in zip(out, spatial):
        shape += [o, s // o]
    return x.reshape(shape).sum(dim=tuple(3 + 2 * i for i in range(len(out))), dtype=x.dtype)


class QuantAdaptiveAvgPool(nn.Module):
    """Adaptive average pool of a quantized input (``act``); its mean is left for its readers to round.

    Deployed as an integer window sum whose ``1/window`` rides in the reader's requantization (one rounding).
    """

    def __init__(self, output_size: int | tuple[int | None, ...], dims: int, bits: int = 8,
                 momentum: float | None = None):
        super().__init__()
        self.output_size = (output_size,) * dims if isinstance(output_size, int) or output_size is None \
            else tuple(output_size)
        self.dims = dims
        self.act = QuantAct(bits, signed=None, momentum=momentum)

    @classmethod
    def from_float(cls, pool: nn.Module, bits: int = 8, momentum: float | None = None) -> QuantAdaptiveAvgPool:
        return cls(pool.output_size, 1 if isinstance(pool, nn.AdaptiveAvgPool1d) else 2, bits, momentum)

    def forward(self, x: Tensor) -> Tensor:
        pool = F.adaptive_avg_pool1d if self.dims == 1 else F.adaptive_avg_pool2d
        return pool(self.act(x), self.output_size)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"


QUANT_MODULES = (QuantAct, QuantConv1d, QuantConv2d, QuantLinear, QuantResidualAdd, QuantAdaptiveAvgPool)
_SWAP = {nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names (module paths) of the layers ``quantize_model`` can quantize: plain Conv1d, Conv2d, Linear.

    Exact types (and layers already quantized): a subclass stays float, since swapping it would drop what it
    overrides. The cost tables and sensitivities use this same list.
    """
    return [name for name, m in model.named_modules() if type(m) in _SWAP or isinstance(m, _QuantLayer)]


@dataclass
class QuantizationReport:
    """What ``quantize_model`` did: per-layer weight bits, and everything that stays in float.

    ``act_bits`` is the argument (an int or ``"follow"``); ``layer_act_bits`` the input activation bits
    each quantized layer got.
    """

    weight_bits: dict[str, int]
    act_bits: int | str
    float_layers: dict[str, str] = field(default_factory=dict)  # layers with weights left in float: name -> why
    float_ops: dict[str, str] = field(default_factory=dict)  # activations, other weightless modules, functional ops
    batchnorms: list[str] = field(default_factory=list)  # fold with fold_batchnorm before deployment
    fx_error: str | None = None  # why the torch.fx scan for functional ops could not run

    @property
    def layer_act_bits(self) -> dict[str, int]:
        return {name: b if self.act_bits == FOLLOW else self.act_bits for name, b in self.weight_bits.items()}

    def __str__(self) -> str:
        lines = ["| layer | weight bits | input activation bits |", "|---|---|---|"]
        lines += [f"| {name} | {bits} | {self.layer_act_bits.get(name, '')} |"
                  for name, bits in self.weight_bits.items()]
        lines += [f"| {name} | float ({why}) | |" for name, why in self.float_layers.items()]
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


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
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
    skip = (*_BATCHNORMS, *QUANT_MODULES, ActivationQuantizer, _Loss, *ignore)
    for name, m in model.named_modules():
        if not name or isinstance(m, skip) or name in weight_bits:
            continue
        if type(m) in _SWAP:
            layers[name] = f"{type(m).__name__} not in bits"
        elif list(m.parameters(recurse=False)):
            layers[name] = f"{type(m).__name__}: unsupported layer type"
        elif not list(m.children()) and not isinstance(m, _PASS_THROUGH):
            ops[name] = f"{type(m).__name__}: unsupported op"
    return layers, ops


def quantize_model(
    model: nn.Module, bits: int | Mapping[str, int], act_bits: int | str = 8, momentum: float | None = None,
    ignore: tuple[type, ...] = (),
) -> tuple[nn.Module, QuantizationReport]:
    """Quantized copy of ``model`` (the original is untouched) and a report of what was quantized.

    Args:
        model: any ``nn.Module``; Conv1d/Conv2d/Linear become ``QuantConv1d``/``QuantConv2d``/``QuantLinear``
            at the same module path, ``ResidualAdd`` becomes ``QuantResidualAdd`` and adaptive average
            pools become ``QuantAdaptiveAvgPool``.
        bits: weight bits (2..8) for every quantizable layer, or a dict ``{layer name: bits}`` (layers
            missing from the dict stay in float and are reported).
        act_bits: bit width of every activation quantizer (2..8), or ``"follow"``: each layer's input
            activations take that layer's weight bits (HAWQ-V3's mixed W4A4/W8A8 setting), and the inputs
            of residual additions and pools, which have no weights, keep 8 bits.
        momentum: ``None`` for running min/max activation ranges, else the EMA momentum.
        ignore: module types that compute nothing to quantize (e.g. torchmetrics ``Metric``): not reported.

    What stays in float triggers one ``UserWarning`` listing it: layers with weights (unsupported types, layers
    missing from ``bits``: ``report.float_layers``) and ops (weightless modules other than ReLU, dropout and
    reshapes, functional ops found by ``torch.fx``: ``report.float_ops``), which an integer-only model cannot
    hold; loss modules are not listed. BatchNorm stays unfolded for training.
    """
    layers = quantizable_layers(model)
    if not layers:
        raise ValueError("model has no quantizable layer (nn.Conv1d, nn.Conv2d or nn.Linear)")
    validate_act_bits(act_bits, "act_bits")
    weight_bits = _resolve_bits(bits, layers)
    other_bits = MAX_BITS if act_bits == FOLLOW else act_bits  # inputs of additions and pools
    qmodel = copy.deepcopy(model)
    swapped: dict[int, nn.Module] = {}  # a module at several paths (shared) gets one quantized module at all
    for name, m in list(qmodel.named_modules(remove_duplicate=False)):
        if id(m) in swapped:
            _set_module(qmodel, name, swapped[id(m)])
            continue
        if name in weight_bits and type(m) in _SWAP:
            layer_act = weight_bits[name] if act_bits == FOLLOW else act_bits
            swapped[id(m)] = _SWAP[type(m)].from_float(m, weight_bits[name], layer_act, momentum)
        elif isinstance(m, ResidualAdd):
            swapped[id(m)] = QuantResidualAdd(other_bits, momentum).train(m.training)
        elif isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
            swapped[id(m)] = QuantAdaptiveAvgPool.from_float(m, other_bits, momentum).train(m.training)
        else:
            continue
        _set_module(qmodel, name, swapped[id(m)])
    functional, fx_error = _functional_float_ops(model)
    float_layers, float_ops = _float_leftovers(model, weight_bits, ignore)
    report = QuantizationReport(weight_bits=weight_bits, act_bits=act_bits, float_layers=float_layers,
                                float_ops={**float_ops, **functional},
                                batchnorms=[n for n, m in model.named_modules() if isinstance(m, _BATCHNORMS)],
                                fx_error=fx_error)
    left = {**report.float_layers, **report.float_ops}
    if left:
        listed = "; ".join(f"{n} ({why})" for n, why in left.items())
        warnings.warn(f"quantize_model: {len(left)} layer(s)/op(s) left in float: {listed}", UserWarning, stacklevel=2)
    if fx_error:
        warnings.warn(f"quantize_model: torch.fx cannot trace the model ({fx_error}), so functional ops in its "
                      "forward() (e.g. torch.sigmoid, x * y) were not checked: any there run in float",
                      UserWarning, stacklevel=2)
    return qmodel, report


@torch.no_grad()
def calibrate(
    model: nn.Module, inputs: Iterable[Any], forward: Callable[[nn.Module, Any], object] | None = None
) -> nn.Module:
    """Track activation ranges on ``inputs`` with only the quantizers in training mode.

    ``forward(model, batch)`` runs one batch, e.g. a ``loss_fn(model, batch)`` for ``(x, y)`` batches; by
    default ``model(batch)``. Everything else (BatchNorm statistics, dropout) runs in eval mode; all modes
    are restored afterwards.
    """
    with training_mode(model, False):
        for m in model.modules():
            if isinstance(m, ActivationQuantizer):
                m.train()
        for batch in inputs:
            if forward is None:
                model(batch)
            else:
                forward(model, batch)
    return model


class _UseCounter(TorchFunctionMode):
    """Counts the uses of recorded layer outputs: by leaf modules (pre-hooks) and by functional code.

    Ops inside a leaf module's (or quantized layer's) forward belong to it; any other op that takes a recorded output
    and returns a tensor (``y + z``, ``y.view(...)``; not ``y.shape``) is one more, functional, consumer.
    """

    def __init__(self):
        super().__init__()
        self.depth = 0  # > 0 while a leaf module or a quantized layer runs
        self.producer: dict[int, str] = {}  # id(output) -> layer name
        self.users: dict[int, list[str]] = {}  # id(output) -> consumers, one entry per use
        self.keep: list[Tensor] = []  # hold the outputs so their ids stay unique

    def use(self, consumer: str, args: Any) -> None:
        for a in tree_leaves(args):
            if isinstance(a, Tensor) and id(a) in self.producer:
                self.users[id(a)].append(consumer)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.depth and any(isinstance(o, Tensor) for o in tree_leaves(out)):
            self.use("<functional>", (args, kwargs))
        return out


def _conv_bn_pairs(model: nn.Module, example_input: Tensor) -> dict[str, str]:
    """BatchNorm name -> the conv/linear whose every output it alone consumes, normalising its channel axis."""
    counter, bn_inputs = _UseCounter(), {}

    def pre_hook(name):
        def hook(module, args, kwargs):
            if not counter.depth:  # a module inside a quantized layer belongs to the layer
                counter.use(name, (args, kwargs))
            if isinstance(module, _BATCHNORMS):
                bn_inputs.setdefault(name, []).append(counter.producer.get(id(args[0]) if args else None))
            counter.depth += 1
        return hook

    def post_hook(name):
        def hook(module, args, out):
            counter.depth -= 1
            # the channel axis is dim 1: a batched conv output, or a Linear output of shape (N, features)
            if isinstance(module, tuple(_SWAP)) and out.dim() == (2 if isinstance(module, nn.Linear) else
                                                                  module.weight.dim()):
                counter.keep.append(out)
                counter.producer[id(out)], counter.users[id(out)] = name, []
        return hook

    handles = []
    for name, m in model.named_modules():
        if not list(m.children()) or isinstance(m, tuple(_SWAP)):
            handles.append(m.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
            handles.append(m.register_forward_hook(post_hook(name), always_call=True))
    try:
        with training_mode(model, False), torch.no_grad(), counter:
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    outputs: dict[str, list[list[str]]] = {}
    for i, layer in counter.producer.items():
        outputs.setdefault(layer, []).append(counter.users[i])
    # every call of the BN reads an output of one layer, and every output of that layer is read by the BN alone
    return {bn: layers[0] for bn, layers in bn_inputs.items()
            if layers[0] is not None and set(layers) == {layers[0]}
            and all(users == [bn] for users in outputs[layers[0]])}


@torch.no_grad()
def _fold(layer: nn.Module, bn: nn.Module, bn_name: str) -> None:
    if bn.running_mean is None:
        raise ValueError(f"BatchNorm {bn_name!r} has no running statistics (track_running_stats=False) to fold")
    if bn.num_features != layer.weight.shape[0]:
        raise ValueError(f"BatchNorm {bn_name!r} has {bn.num_features} features but its layer has "
                         f"{layer.weight.shape[0]} output channels")
    factor = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        factor = factor * bn.weight.double()
    bias = torch.zeros_like(factor) if layer.bias is None else layer.bias.double()
    bias = (bias - bn.running_mean.double()) * factor
    if bn.bias is not None:
        bias = bias + bn.bias.double()
    w = layer.weight
    w.copy_((w.double() * factor.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(bias.to(w.dtype))
    else:
        layer.bias.copy_(bias.to(w.dtype))


def fold_batchnorm(model: nn.Module, example_input: Tensor) -> dict[str, str]:
    """Fold each BatchNorm's frozen statistics into the conv/linear feeding it; replace it by ``nn.Identity``.

    Works on float and quantized models, in place. The pairs are found by running ``example_input``
    once (eval mode, no state changed): a BatchNorm is folded when it alone consumes every output of a
    Conv1d/Conv2d/Linear (no other module or functional op reads it, no other call of the layer goes
    elsewhere) and normalises the layer's channels (a Linear output of shape ``(N, features)``).
    Create optimizers after folding (a bias-free conv gains a new bias parameter). Returns
    ``{batchnorm name: layer name}``; BatchNorms that could not be folded are warned about.
    """
    pairs = _conv_bn_pairs(model, example_input)
    modules = dict(model.named_modules())
    for bn_name, layer_name in pairs.items():
        _fold(modules[layer_name], modules[bn_name], bn_name)
        _set_module(model, bn_name, nn.Identity())
    left = [n for n, m in model.named_modules() if isinstance(m, _BATCHNORMS)]
    if left:
        warnings.warn(f"fold_batchnorm: BatchNorm layers {left} are not the only consumer of a conv/linear "
                      "layer's outputs along its channels and stay unfolded (they block integer conversion)",
                      UserWarning, stacklevel=2)
    return pairs
