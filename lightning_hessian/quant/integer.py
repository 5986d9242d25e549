"""int8 inference with the deployed arithmetic: convert a calibrated, BN-folded quantized model to ``IntegerModel``.

An ``IntegerModel`` is a straight-line program of steps, each one kernel of the exported ONNX model
(``export.py`` lowers every step type to its onnxruntime operator), computing in torch exactly what
onnxruntime computes, bit for bit:

- ``QuantizeStep``: the float input to codes (``QuantizeLinear``);
- ``ConvStep`` / ``LinearStep``: int8 weight codes times int8 input codes summed in int32 (``torch._int_mm``
  over an im2col view), plus an int32 bias, then the requantization of one reader ``QuantAct``
  (``QLinearConv``, ``QGemm``) or, for the model output, the float32 dequantization;
- ``AddStep``: a residual sum of two codes requantized for one reader (``QLinearAdd``);
- ``PoolStep``: an integer window sum whose ``1/window`` rides in the reader's requantization;
- ``RequantStep``: codes to another quantizer's codes (a ``QuantAct`` reading a ``QuantAct``);
- ``ReluStep``, ``ReshapeStep``, ``PermuteStep``, ``DequantizeStep``: ReLU and data movement, and the exit.

The arithmetic is ``quantizers.requantize`` / ``requantize_sum``: float32 multiplies rounded half to even,
as onnxruntime's kernels do on x86-64 (the quantization-aware training rounds at the same places). Every
quantizer of the trained model becomes the requantization of the step producing its input, so a layer
whose output several quantizers read (e.g. a block input read at 4 and at 8 bits) becomes one step per
distinct reader.

``to_integer_model`` runs the model once on an example input (eval mode) to record which module reads
which tensor: it works on any model whose forward code only reshapes, permutes, drops out and applies ReLU
between quantized modules; anything else is reported with a clear error. The torch model is the
reference of what is deployed (tests check it against onnxruntime), what ``export_program`` saves, and
what the recipes evaluate; it is not the fast path (two to three times slower than float torch on CPU):
the exported ONNX model is (``benchmarks/results/integer_latency.md``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_hessian.quant.modules import (
    _BATCHNORMS,
    IDENTITY_OPS,
    RELU_OPS,
    RESHAPE_OPS,
    TRANSPOSE_OPS,
    QuantAdaptiveAvgPool,
    QuantResidualAdd,
    _float_leftovers,
    _QuantConv,
    _QuantLayer,
    window_sum,
)
from lightning_hessian.quant.quantizers import (
    INT32_MAX,
    ActivationQuantizer,
    dequantize,
    quantize_input,
    requantize,
    requantize_sum,
    zero_point,
)

_INT8_OFFSET = 128  # unsigned 8-bit codes (0..255) enter the int8 GEMM as code - 128
_MAX_ADD_RATIO = 2.0**22  # QLinearAdd's float32 sum must stay far inside int32 before it saturates to 8 bits


@dataclass(frozen=True)
class QParams:
    """How an activation tensor is coded: integers in ``[qmin, qmax]`` times the float32 ``scale``."""

    scale: float
    qmin: int
    qmax: int

    @classmethod
    def of(cls, quantizer: ActivationQuantizer) -> QParams:
        return cls(float(quantizer.scale().float()), *quantizer.qrange())

    @property
    def zero_point(self) -> int:
        """Zero point of the uint8 container the deployed model stores these codes in."""
        return zero_point(self.qmin)

    def tensor(self) -> Tensor:
        return torch.tensor(self.scale, dtype=torch.float32)


class _Step(nn.Module):
    """One kernel of the deployed model; ``out_q`` codes its output (``None``: a float output)."""

    out_q: QParams | None = None


class QuantizeStep(_Step):
    """The float model input to codes, as ``QuantizeLinear`` (the one float op on entry)."""

    def __init__(self, out_q: QParams):
        super().__init__()
        self.out_q = out_q

    def forward(self, x: Tensor) -> Tensor:
        return quantize_input(x, self.out_q.tensor(), self.out_q.qmin, self.out_q.qmax)


class RequantStep(_Step):
    """Codes of one quantizer to the codes of another (a ``QuantAct`` reading a ``QuantAct``)."""

    def __init__(self, in_q: QParams, out_q: QParams):
        super().__init__()
        self.in_q, self.out_q = in_q, out_q

    def forward(self, x: Tensor) -> Tensor:
        return requantize(x, self.in_q.tensor(), self.out_q.tensor(), self.out_q.qmin, self.out_q.qmax)


class _GemmStep(_Step):
    """int8 weight codes times int8 input codes into int32, an int32 bias, then ``out_q``'s requantization.

    Unsigned 8-bit input codes (0..255) enter the int8 GEMM shifted by -128, and the matching
    ``128 * sum(w)`` is folded into the bias, so the int32 accumulator is exact.
    """

    def __init__(self, name: str, layer: _QuantLayer, in_q: QParams, out_q: QParams | None, matrix: Tensor):
        super().__init__()
        codes, bias, weight_scale = layer.integer_params()
        self.name, self.in_q, self.out_q, self.weight_bits = name, in_q, out_q, layer.weight_bits
        self.offset = _INT8_OFFSET if in_q.qmax > 127 else 0
        bias = torch.zeros(codes.shape[0], dtype=torch.long) if bias is None else bias
        # the kernels sum uint8 containers (up to 255) times the weights, then add the bias and zero-point terms
        bound = 255 * codes.flatten(1).abs().sum(1) + bias.abs() + 128 * codes.flatten(1).sum(1).abs()
        if bool((bound > INT32_MAX).any()):
            raise ValueError(f"layer {name!r}: its int32 accumulator may overflow (|weight codes| x largest input "
                             f"code + |bias code| reaches {int(bound.max())} > 2^31 - 1)")
        self.register_buffer("weight", codes.to(torch.int8))  # the layer's layout: what ONNX stores
        self.register_buffer("bias", bias.int())
        self.register_buffer("weight_scale", weight_scale)
        # float32 s_in * s_w per output channel, as onnxruntime multiplies them
        self.register_buffer("acc_scale", in_q.tensor() * weight_scale, persistent=False)
        self.register_buffer("matrix", matrix.t().contiguous().to(torch.int8), persistent=False)  # (K, out)
        self.register_buffer("gemm_bias", (bias + self.offset * matrix.sum(1)).int(), persistent=False)

    def _gemm(self, cols: Tensor) -> Tensor:
        """int32 accumulators of the (rows, K) int8 GEMM codes ``cols``."""
        return torch._int_mm(cols.contiguous(), self.matrix).add_(self.gemm_bias)

    def _output(self, acc: Tensor) -> Tensor:
        scale = self.acc_scale.view(-1, *([1] * (acc.dim() - 2))) if acc.dim() > 2 else self.acc_scale
        if self.out_q is None:
            return dequantize(acc, scale)
        return requantize(acc, scale, self.out_q.tensor(), self.out_q.qmin, self.out_q.qmax)


class LinearStep(_GemmStep):
    """A quantized ``Linear`` (``QGemm``) over the last dimension of its input."""

    def __init__(self, name: str, layer: _QuantLayer, in_q: QParams, out_q: QParams | None):
        super().__init__(name, layer, in_q, out_q, layer.integer_params()[0])

    def forward(self, x: Tensor) -> Tensor:
        acc = self._gemm((x - self.offset).to(torch.int8).reshape(-1, self.matrix.shape[0]))
        return self._output(acc).view(*x.shape[:-1], -1)


class ConvStep(_GemmStep):
    """N-d convolution (``QLinearConv``) as an int8 GEMM over unfolded (im2col) channels-last codes.

    The input is moved to channels-last once so every im2col row is a run of contiguous channels (the
    weight matrix is laid out as ``(kernel..., in_channels)`` to match): a 20x faster gather than NC-first.
    Padding holds the code of 0.
    """

    def __init__(self, name: str, layer: _QuantConv, in_q: QParams, out_q: QParams | None):
        codes = layer.integer_params()[0]
        d = codes.dim() - 2
        super().__init__(name, layer, in_q, out_q, codes.permute(0, *range(2, 2 + d), 1).reshape(codes.shape[0], -1))
        self.kernel_size, self.stride, self.dilation = layer.kernel_size, layer.stride, layer.dilation
        if layer.padding == "same":
            total = [dil * (k - 1) for dil, k in zip(layer.dilation, layer.kernel_size)]
            self.pads = [(t // 2, t - t // 2) for t in total]
        else:
            self.pads = [(0, 0)] * d if layer.padding == "valid" else [(p, p) for p in layer.padding]

    def forward(self, x: Tensor) -> Tensor:
        d = len(self.kernel_size)
        pad = [p for pair in reversed(self.pads) for p in pair]  # F.pad order: last dim first
        x = F.pad((x - self.offset).to(torch.int8).movedim(1, -1), [0, 0, *pad], value=-self.offset)
        for i, (k, s, dil) in enumerate(zip(self.kernel_size, self.stride, self.dilation)):
            x = x.unfold(1 + i, dil * (k - 1) + 1, s)  # (N, *out_spatial, C, *window)
        if any(dil > 1 for dil in self.dilation):
            x = x[(..., *(slice(None, None, dil) for dil in self.dilation))]
        n, spatial = x.shape[0], x.shape[1:1 + d]
        # a batch of 1 leaves cols an overlapping-stride view, which _int_mm misreads: _gemm copies it
        cols = x.permute(0, *range(1, 1 + d), *range(2 + d, 2 + 2 * d), 1 + d).reshape(-1, self.matrix.shape[0])
        acc = self._gemm(cols).view(n, *spatial, -1).movedim(-1, 1)
        return self._output(acc).contiguous()


class AddStep(_Step):
    """A residual sum of two codes, requantized for one reader as ``QLinearAdd`` does."""

    def __init__(self, name: str, a_q: QParams, b_q: QParams, out_q: QParams):
        super().__init__()
        self.a_q, self.b_q, self.out_q = a_q, b_q, out_q
        ratio = (a_q.tensor() / out_q.tensor()) + (b_q.tensor() / out_q.tensor())
        if float(ratio) >= _MAX_ADD_RATIO:
            raise ValueError(f"residual addition {name!r}: its input scales are {float(ratio):.3g} times the scale "
                             "of the quantizer reading the sum (onnxruntime's QLinearAdd would overflow); that "
                             "quantizer's range is degenerate: calibrate it on representative inputs")

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return requantize_sum(a, b, self.a_q.tensor(), self.b_q.tensor(), self.a_q.zero_point, self.b_q.zero_point,
                              self.out_q.tensor(), self.out_q.qmin, self.out_q.qmax)


class PoolStep(_Step):
    """Adaptive average pool: an integer window sum requantized once, by ``s_in / (s_out * window)`` in float32
    (``QLinearGlobalAveragePool``'s multiplier)."""

    def __init__(self, output_size: tuple[int | None, ...], input_size: tuple[int, ...], in_q: QParams,
                 out_q: QParams):
        super().__init__()
        self.output_size, self.input_size, self.in_q, self.out_q = output_size, input_size, in_q, out_q
        self.window = math.prod(s // (s if o is None else o) for o, s in zip(output_size, input_size))
        self.register_buffer("window_scale", out_q.tensor() * self.window, persistent=False)  # float32

    @property
    def multiplier(self) -> Tensor:
        return self.in_q.tensor() / self.window_scale

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[2:]) != self.input_size:
            raise ValueError(f"the average pool was converted for inputs of spatial size {self.input_size} (its "
                             f"window is baked into the next scale); got {tuple(x.shape[2:])}")
        return requantize(window_sum(x.long(), self.output_size), self.in_q.tensor(), self.window_scale,
                          self.out_q.qmin, self.out_q.qmax)


class ReluStep(_Step):
    """ReLU on signed codes or on a float output (unsigned readers clamp at 0 in their requantization)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.clamp_min(0)


class ReshapeStep(_Step):
    """Reshape to ``shape``; ``shape[0] is None`` keeps the (dynamic) batch dimension."""

    def __init__(self, shape: tuple[int | None, ...]):
        super().__init__()
        self.shape = shape

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(self.shape) if self.shape[0] is not None else x.reshape(x.shape[0], *self.shape[1:])


class PermuteStep(_Step):
    def __init__(self, perm: tuple[int, ...]):
        super().__init__()
        self.perm = perm

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(self.perm)


class DequantizeStep(_Step):
    """Codes to float32 (``DequantizeLinear``): the exit when a quantizer's codes are the model output."""

    def __init__(self, in_q: QParams):
        super().__init__()
        self.in_q = in_q

    def forward(self, x: Tensor) -> Tensor:
        return dequantize(x, self.in_q.tensor())


class IntegerModel(nn.Module):
    """The deployed model as a program: ``steps[i]`` reads the values ``wiring[i]`` (0 is the float input)
    and writes value ``i + 1``; value ``output`` is the float32 output."""

    def __init__(self, steps: list[_Step], wiring: list[tuple[int, ...]], output: int):
        super().__init__()
        self.steps = nn.ModuleList(steps)
        self.wiring, self.output = wiring, output

    def forward(self, x: Tensor) -> Tensor:
        values = [x]
        for step, inputs in zip(self.steps, self.wiring):
            values.append(step(*(values[i] for i in inputs)))
        return values[self.output]

    def packed_size_bytes(self) -> int:
        """Deployed size: weights at their bit width, int32 biases, float32 weight and activation scales."""
        bits, seen = 0, set()
        for step in self.steps:
            if isinstance(step, _GemmStep) and step.weight.data_ptr() not in seen:
                seen.add(step.weight.data_ptr())
                bits += step.weight.numel() * step.weight_bits + 32 * (step.bias.numel() + step.weight_scale.numel())
        scales = {q for step in self.steps for q in (getattr(step, "in_q", None), step.out_q) if q is not None}
        return (bits + 32 * len(scales) + 7) // 8


# --- conversion: trace which module reads which tensor, then emit one step per kernel ----------------------


@dataclass
class _Codes:
    """A value of the program: codes (``q`` set) or floats (``q`` None)."""

    index: int
    q: QParams | None


@dataclass
class _Pending:
    """The output of a conv/linear/addition/pool, not yet requantized: each reader gets its own step.

    ``ops`` are what the forward code applied on the way (ReLU, reshapes), replayed on the reader's codes.
    """

    kind: str
    module: nn.Module
    name: str
    inputs: tuple[_Codes, ...]
    shape: tuple[int, ...]
    call: int  # which call of which module: readers of one call share its steps
    ops: tuple[tuple, ...] = ()


@dataclass
class _Float:
    """A tensor that a float op touched (between quantized modules): ``why`` names the op."""

    why: str


class _Builder:
    """Emits steps and values, reusing a step that computes the same thing for another reader."""

    def __init__(self):
        self.steps: list[_Step] = []
        self.wiring: list[tuple[int, ...]] = []
        self.cache: dict[Any, _Codes] = {}

    def emit(self, key: Any, make, inputs: tuple[int, ...], q: QParams | None) -> _Codes:
        """The value of ``make()`` on ``inputs``, coded by ``q``; one step per ``key``."""
        if key not in self.cache:
            self.steps.append(make())
            self.wiring.append(inputs)
            self.cache[key] = _Codes(len(self.steps), q)
        return self.cache[key]

    def produce(self, p: _Pending, q: QParams | None) -> _Codes:
        """The step computing ``p`` requantized for ``q`` (``None``: float output), then its forward ops."""
        slots, key = tuple(c.index for c in p.inputs), (p.call, q)
        if p.kind == "layer":
            cls = ConvStep if isinstance(p.module, _QuantConv) else LinearStep
            value = self.emit(key, lambda: cls(p.name, p.module, p.inputs[0].q, q), slots, q)
        elif q is None:
            raise ValueError(f"the model output comes from {p.name!r}, whose sum has no quantizer to round it: end "
                             "the model with a conv or linear layer")
        elif p.kind == "add":
            value = self.emit(key, lambda: AddStep(p.name, p.inputs[0].q, p.inputs[1].q, q), slots, q)
        else:
            value = self.emit(key, lambda: PoolStep(p.module.output_size, p.shape[2:], p.inputs[0].q, q), slots, q)
        for op in p.ops:
            value = self.apply(op, value)
        return value

    def apply(self, op: tuple, value: _Codes) -> _Codes:
        """ReLU or data movement on codes (or floats); ReLU is implied on unsigned codes."""
        if op[0] == "relu" and value.q is not None and value.q.qmin >= 0:
            return value
        make = {"relu": ReluStep, "reshape": lambda: ReshapeStep(op[1]), "permute": lambda: PermuteStep(op[1])}[op[0]]
        return self.emit((op, value.index), make, (value.index,), value.q)


def _op_of(func, args: tuple, kwargs: dict, x: Tensor, out: Tensor) -> tuple | None:
    """The step form of an op the forward code applied: ("relu",), ("reshape", shape), ("permute", perm),
    () for the identity, None for anything else."""
    if func in IDENTITY_OPS or (func in RESHAPE_OPS and out.shape == x.shape):
        return ()
    if func in RELU_OPS:
        return ("relu",)
    if func in RESHAPE_OPS:
        batch = out.dim() and x.dim() and out.shape[0] == x.shape[0]
        return ("reshape", (None, *out.shape[1:]) if batch else tuple(out.shape))
    if func in TRANSPOSE_OPS:
        dims = [*args[1:], *(v for k, v in kwargs.items() if k != "input")]  # transpose(dim0=1, dim1=2) too
        if func in (torch.transpose, Tensor.transpose):
            perm = list(range(x.dim()))
            a, b = (d % x.dim() for d in dims)
            perm[a], perm[b] = perm[b], perm[a]
        else:
            dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else dims
            perm = [d % x.dim() for d in dims]
        return ("permute", tuple(perm))
    return None


class _Recorder(TorchFunctionMode):
    """Records the quantized modules' calls (hooks) and the torch functions the forward code applies
    outside them, in order; holds every traced tensor so their ids stay unique."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.depth = 0
        self.events: list[tuple] = []
        self.handles = []
        self.act_outputs: dict[int, Tensor] = {}
        for m in model.modules():
            if isinstance(m, (ActivationQuantizer, _QuantLayer, QuantResidualAdd, QuantAdaptiveAvgPool)):
                self.handles += [m.register_forward_pre_hook(self._enter), m.register_forward_hook(self._leave)]

    def _enter(self, module, args):
        self.depth += 1

    def _leave(self, module, args, out):
        self.depth -= 1
        if isinstance(module, ActivationQuantizer):
            self.act_outputs[id(module)] = out
            self.events.append(("act", module, args[0], out))
        elif isinstance(module, _QuantLayer):
            self.events.append(("layer", module, self.act_outputs[id(module.act)], out))
        elif isinstance(module, QuantResidualAdd):
            ins = (self.act_outputs[id(module.act_a)], self.act_outputs[id(module.act_b)])
            self.events.append(("add", module, ins, out))
        else:
            self.events.append(("pool", module, self.act_outputs[id(module.act)], out))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0 and isinstance(out, Tensor):
            self.events.append(("op", func, (args, kwargs), out))
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _check_convertible(model: nn.Module) -> None:
    bns = [n for n, m in model.named_modules() if isinstance(m, _BATCHNORMS)]
    if bns:
        raise ValueError(f"BatchNorm layers {bns} are not folded: call fold_batchnorm(model, example_input) first")
    layers, ops = _float_leftovers(model, {})
    leftovers = {**layers, **ops}
    if leftovers:
        raise ValueError(f"layers left in float block integer conversion: {leftovers}; quantize them "
                         "(quantize_model with bits for every layer) or remove them")
    for name, m in model.named_modules():
        if isinstance(m, _QuantConv) and (m.groups != 1 or m.padding_mode != "zeros"):
            raise ValueError(f"{name!r}: integer conv supports groups=1 and padding_mode='zeros' only "
                             f"(got groups={m.groups}, padding_mode={m.padding_mode!r})")
    missing = [n for n, m in model.named_modules() if isinstance(m, ActivationQuantizer) and not m.calibrated]
    if missing:
        raise ValueError(f"activation quantizers {missing} have no calibrated range: run a few training-mode "
                         "batches (or calibrate(model, inputs)) before integer conversion")


def to_integer_model(model: nn.Module, example_input: Tensor) -> IntegerModel:
    """``IntegerModel`` of a calibrated, BN-folded quantized model (``quantize_model`` output).

    ``example_input`` (a batch like the deployment inputs) is run once through ``model`` in eval mode to
    record which module reads which tensor; its spatial size is fixed into average pools. Raises
    ``ValueError`` naming the layers when BatchNorm is unfolded, layers or ops are left in float, ranges
    are uncalibrated, a quantizer is unreachable from ``example_input``, a conv has ``groups > 1`` or a
    ``padding_mode`` other than ``'zeros'``, or an int32 accumulator could overflow.
    """
    _check_convertible(model)
    model = copy.deepcopy(model).eval()
    names = {id(m): n for n, m in model.named_modules()}
    recorder = _Recorder(model)
    try:
        with torch.no_grad(), recorder:
            out = model(example_input)
    finally:
        recorder.remove()
    b = _Builder()
    values: dict[int, _Codes | _Pending | _Float] = {id(example_input): _Codes(0, None)}
    floats: list[str] = []

    def read(t: Tensor, reader: str) -> _Codes | _Pending | _Float:
        value = values.get(id(t), _Float("a tensor not computed from the input"))
        if isinstance(value, _Float):
            floats.append(reader)
        return value

    for kind, obj, args, result in recorder.events:
        name = names.get(id(obj), "")
        if kind == "act":
            x, q = read(args, name), QParams.of(obj)
            if isinstance(x, _Pending):
                values[id(result)] = b.produce(x, q)
            elif isinstance(x, _Float):
                values[id(result)] = x
            elif x.q is None:
                values[id(result)] = b.emit(("quantize", x.index, q), partial(QuantizeStep, q), (x.index,), q)
            else:
                values[id(result)] = x if x.q == q else b.emit(("requant", x.index, q),
                                                                partial(RequantStep, x.q, q), (x.index,), q)
        elif kind == "op":
            func, (op_args, op_kwargs) = obj, args
            traced = [a for a in (*op_args, *op_kwargs.values()) if isinstance(a, Tensor) and id(a) in values]
            if not traced:
                continue
            x = values[id(traced[0])]
            op = _op_of(func, op_args, op_kwargs, traced[0], result) if len(traced) == 1 else None
            what = getattr(func, "__name__", str(func))
            if op is None:
                values[id(result)] = _Float(f"functional {what}")
            elif isinstance(x, _Pending):
                values[id(result)] = x if op == () else _Pending(x.kind, x.module, x.name, x.inputs, x.shape,
                                                                 x.call, (*x.ops, op))
            elif isinstance(x, _Codes):
                values[id(result)] = x if op == () else b.apply(op, x)
            else:
                values[id(result)] = x
        else:
            ins = args if kind == "add" else (args,)
            inputs = tuple(values[id(t)] for t in ins)  # quantizer outputs: codes, or floats already reported
            floated = [v for v in inputs if isinstance(v, _Float)]
            values[id(result)] = floated[0] if floated else _Pending(kind, obj, name, inputs, tuple(ins[0].shape),
                                                                     len(values))

    readers = [names[id(m)] for m in model.modules() if isinstance(m, ActivationQuantizer)]
    reached = {names[id(e[1])] for e in recorder.events if e[0] == "act"}
    unreached = [n for n in readers if n not in reached]
    if unreached:
        raise ValueError(f"quantized modules {unreached} are not reached by example_input; integer conversion "
                         "needs every quantized module on the traced path")
    if floats:
        raise ValueError(f"float tensors reach the quantized modules {sorted(set(floats))}: a functional op or "
                         "unquantized layer sits before them (only reshapes, ReLU and dropout may run between "
                         "quantized modules)")
    final = values.get(id(out)) if isinstance(out, Tensor) else None
    if isinstance(final, _Pending):
        final = b.produce(final, None)
    elif isinstance(final, _Codes) and final.q is not None:
        final = b.emit(("dequantize", final.index), partial(DequantizeStep, final.q), (final.index,), None)
    else:
        raise ValueError("the model output is not produced by a quantized module (float ops after the last layer)")
    return IntegerModel(b.steps, b.wiring, final.index)
