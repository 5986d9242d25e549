"""int8 inference with the deployed arithmetic: convert a calibrated, BN-folded quantized model to ``IntegerModel``.

An ``IntegerModel`` is a straight-line program of steps, each one kernel of the exported ONNX model
(``export.py`` lowers every step type to its onnxruntime operator), computing in torch exactly what
onnxruntime computes, bit for bit:

- ``QuantizeStep``: the float input to codes (``QuantizeLinear``);
- ``ConvStep`` / ``LinearStep``: int8 weight codes times int8 input codes summed in int32 (``torch._int_mm``
  over an im2col view), plus an int32 bias, then the requantization of one reader ``QuantAct``
  (``QLinearConv``, ``QGemm``) or, for the model output, the float32 dequantization; weight scales per output
  channel, or per group of output rows (Q-BERT's groups: each row takes its group's scale);
- ``GroupLinearStep``: a linear layer with scales per group of input columns (int4 practice), which no int8
  kernel takes: one int32 GEMM per column group (``QGemm`` with a float output, its bias in the group holding the
  row's largest scale), the partial results dequantized by ``s_in * s_group`` and summed in float32 in group
  order, then rounded onto the reader's grid (``QuantizeLinear``). Exact against onnxruntime, but not integer-only:
  a float32 sum of as many terms as groups per output;
- ``EmbeddingStep``: int8 codes gathered by index and multiplied by their float32 scales (``Gather``, ``Mul``): a
  float entry into the graph, like the model input's;
- ``AddStep``: a residual sum of two codes requantized for one reader (``QLinearAdd``);
- ``PoolStep``: an integer window sum whose ``1/window`` rides in the reader's requantization;
- ``RequantStep``: codes to another quantizer's codes (a ``QuantAct`` reading a ``QuantAct``);
- ``ReluStep``, ``ReshapeStep``, ``PermuteStep``, ``DequantizeStep``: ReLU and data movement, and the exit.

Float islands (``to_integer_model(..., float_ops=True)``): the transformer ops that have no integer kernel run in
float32 between quantized layers, each one step: ``LayerNormStep`` (``F.layer_norm``: ``LayerNormalization``),
``GeluStep`` (``F.gelu``: ``Gelu``), ``AttentionStep`` (``F.scaled_dot_product_attention``: ``MatMul``, scale,
``Softmax``, ``MatMul``) and ``FloatAddStep`` (a float ``+``, e.g. a residual connection without quantizers: ``Add``).
Their inputs are dequantized (``DequantizeStep``, or a layer's float output) and their outputs quantized again by
the next ``QuantAct`` (``QuantizeLinear``). onnxruntime's float kernels for them do not round as torch's do (sums
in another order, another ``exp``), so such a model equals its export up to float32 rounding inside the islands,
not bit for bit; without ``float_ops`` these ops are an error naming them.

The arithmetic is ``quantizers.requantize`` / ``requantize_sum``: float32 multiplies rounded half to even,
as onnxruntime's kernels do on x86-64 (the quantization-aware training rounds at the same places). Every
quantizer of the trained model becomes the requantization of the step producing its input, so a layer
whose output several quantizers read (e.g. a block input read at 4 and at 8 bits) becomes one step per
distinct reader.

``to_integer_model`` runs the model once on an example input (eval mode) to record which module reads
which tensor: it works on any model whose forward code only reshapes, permutes, drops out and applies ReLU
between quantized modules (and, with ``float_ops=True``, the float islands above); anything else is reported
with a clear error. The torch model is the
reference of what is deployed (tests check it against onnxruntime), what ``export_program`` saves, and
what the recipes evaluate; it is not the fast path (two to three times slower than float torch on CPU):
the exported ONNX model is (``benchmarks/results/integer_latency.md``).
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_hessian.quant.layers import (
    QuantAdaptiveAvgPool,
    QuantEmbedding,
    QuantResidualAdd,
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
from lightning_hessian.quant.swap import (
    BATCHNORMS,
    FLOAT_MODULES,
    IDENTITY_OPS,
    RELU_OPS,
    RESHAPE_OPS,
    TRANSPOSE_OPS,
    _float_leftovers,
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


class GroupLinearStep(_Step):
    """A quantized ``Linear`` with weight scales per group of input columns, over the last dimension of its input.

    Per column group ``g``: the int8 GEMM of that group's input and weight codes into int32, plus the row's int32 bias
    in the group whose scale is the row's largest (``bias`` codes are on that grid, ``s_in * max_g s_{row,g}``), then
    ``float32(acc_g) * float32(s_in * s_{row,g})`` (``QGemm`` with a float output); the groups' results summed in
    float32 in group order, then ``QuantizeLinear`` onto ``out_q``'s grid (``None``: the float sum is the output).
    """

    def __init__(self, name: str, layer: _QuantLayer, in_q: QParams, out_q: QParams | None):
        super().__init__()
        codes, bias, scales = layer.integer_params()
        out, k = codes.shape
        groups = scales.shape[1]
        width = k // groups
        self.name, self.in_q, self.out_q, self.weight_bits = name, in_q, out_q, layer.weight_bits
        self.groups, self.width = groups, width
        self.offset = _INT8_OFFSET if in_q.qmax > 127 else 0
        bias = torch.zeros(out, dtype=torch.long) if bias is None else bias
        blocks = codes.view(out, groups, width)
        home = scales.argmax(dim=1)  # the first group holding the row's largest scale: the bias grid
        group_bias = torch.where(home == torch.arange(groups).view(-1, 1), bias, 0)  # (groups, out)
        bound = 255 * blocks.abs().sum(2).t() + group_bias.abs() + 128 * blocks.sum(2).t().abs()
        if bool((bound > INT32_MAX).any()):
            raise ValueError(f"layer {name!r}: a column group's int32 accumulator may overflow (|weight codes| x "
                             f"largest input code + |bias code| reaches {int(bound.max())} > 2^31 - 1)")
        self.register_buffer("weight", codes.to(torch.int8))
        self.register_buffer("bias", group_bias.int())  # per group: the bias where the row's largest scale is
        self.register_buffer("weight_scale", scales.float())  # (out, groups)
        self.register_buffer("acc_scale", in_q.tensor() * scales.float().t().contiguous(), persistent=False)
        self.register_buffer("matrix", blocks.permute(1, 2, 0).contiguous().to(torch.int8), persistent=False)
        self.register_buffer("gemm_bias", (group_bias + self.offset * blocks.sum(2).t()).int(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        rows = (x - self.offset).to(torch.int8).reshape(-1, self.groups, self.width)
        total = None
        for g in range(self.groups):
            acc = torch._int_mm(rows[:, g].contiguous(), self.matrix[g]).add_(self.gemm_bias[g])
            part = dequantize(acc, self.acc_scale[g])
            total = part if total is None else total.add_(part)
        y = total.view(*x.shape[:-1], -1)
        return y if self.out_q is None else quantize_input(y, self.out_q.tensor(), self.out_q.qmin, self.out_q.qmax)


class EmbeddingStep(_Step):
    """A quantized ``Embedding``: int8 codes gathered by index times their float32 scales, a float output.

    The indices are the step's input, or ``indices`` (constant: e.g. positions ``arange(L)``) with no input."""

    def __init__(self, layer: QuantEmbedding, indices: Tensor | None = None):
        super().__init__()
        codes, scales = layer.weight_codes()
        self.weight_bits = layer.weight_bits
        self.register_buffer("weight", codes.to(torch.int8))
        self.register_buffer("weight_scale", (scales if scales.dim() == 2 else scales.view(-1, 1)).contiguous())
        self.register_buffer("indices", None if indices is None else indices.detach().clone())

    def forward(self, indices: Tensor | None = None) -> Tensor:
        indices = self.indices if indices is None else indices
        groups = self.weight_scale.shape[1]
        codes = self.weight[indices].float().unflatten(-1, (groups, -1))
        return (codes * self.weight_scale[indices].unsqueeze(-1)).flatten(-2)


class LayerNormStep(_Step):
    """Float island: ``F.layer_norm`` in float32 (``LayerNormalization``)."""

    def __init__(self, normalized_shape: tuple[int, ...], weight: Tensor | None, bias: Tensor | None, eps: float):
        super().__init__()
        self.normalized_shape, self.eps = tuple(normalized_shape), float(eps)
        self.register_buffer("weight", None if weight is None else weight.detach().float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class GeluStep(_Step):
    """Float island: ``F.gelu`` (``Gelu``, opset 20)."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x, approximate=self.approximate)


class AttentionStep(_Step):
    """Float island: ``F.scaled_dot_product_attention`` of float ``q``, ``k``, ``v`` with a constant additive mask
    (or none), causal or not (``MatMul``, scale, ``Softmax``, ``MatMul``)."""

    def __init__(self, scale: float, mask: Tensor | None, is_causal: bool):
        super().__init__()
        self.scale, self.is_causal = float(scale), bool(is_causal)
        self.register_buffer("mask", None if mask is None else mask.detach().clone())

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, is_causal=self.is_causal, scale=self.scale)


class FloatAddStep(_Step):
    """Float island: ``a + b`` in float32, ``b`` a value or the constant ``other`` (``Add``)."""

    def __init__(self, other: Tensor | None = None):
        super().__init__()
        self.register_buffer("other", None if other is None else other.detach().float().clone())

    def forward(self, a: Tensor, b: Tensor | None = None) -> Tensor:
        return a + (self.other if b is None else b)


FLOAT_STEPS = (LayerNormStep, GeluStep, AttentionStep, FloatAddStep)


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
    and writes value ``i + 1``; value ``output`` is the float32 output.

    >>> from lightning_hessian.models import MNIST1DMLP
    >>> from lightning_hessian.quant import calibrate, quantize_model
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(64, 40)
    >>> qmodel, _ = quantize_model(MNIST1DMLP(hidden=16), 8)
    >>> integer = to_integer_model(calibrate(qmodel, [x]), x)
    >>> [type(step).__name__ for step in integer.steps], integer.float_islands
    (['QuantizeStep', 'LinearStep', 'LinearStep', 'LinearStep'], [])
    >>> with torch.no_grad():  # the fine-tuned network's top-1, from integer arithmetic
    ...     torch.equal(integer(x).argmax(1), qmodel.eval()(x).argmax(1))
    True
    """

    def __init__(self, steps: list[_Step], wiring: list[tuple[int, ...]], output: int):
        super().__init__()
        self.steps = nn.ModuleList(steps)
        self.wiring, self.output = wiring, output

    def forward(self, x: Tensor) -> Tensor:
        values = [x]
        for step, inputs in zip(self.steps, self.wiring):
            values.append(step(*(values[i] for i in inputs)))
        return values[self.output]

    @property
    def float_islands(self) -> list[str]:
        """The float island steps (``float_ops=True``), by type: empty for an integer-only model."""
        return [type(step).__name__ for step in self.steps if isinstance(step, FLOAT_STEPS)]

    def packed_size_bytes(self) -> int:
        """Deployed size: weights at their bit width, int32 biases, float32 weight scales (one per channel or
        group), activation scales and float island parameters."""
        bits, seen = 0, set()
        for step in self.steps:
            weight = getattr(step, "weight", None)
            if isinstance(step, (_GemmStep, GroupLinearStep, EmbeddingStep)) and weight.data_ptr() not in seen:
                seen.add(weight.data_ptr())
                bias = getattr(step, "bias", None)
                biases = bias.shape[1] if isinstance(step, GroupLinearStep) else 0 if bias is None else bias.numel()
                bits += weight.numel() * step.weight_bits + 32 * (step.weight_scale.numel() + biases)
            elif isinstance(step, FLOAT_STEPS):
                bits += 32 * sum(b.numel() for b in step.buffers())
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

    def produce(self, p: _Pending, q: QParams | None, float_ops: bool = False) -> _Codes:
        """The step computing ``p`` requantized for ``q`` (``None``: float output), then its forward ops; a residual
        sum read in float (``float_ops``) is its two inputs dequantized and added in float32."""
        slots, key = tuple(c.index for c in p.inputs), (p.call, q)
        if p.kind == "layer":
            groups = p.module.weight_groups.columns is not None
            cls = ConvStep if isinstance(p.module, _QuantConv) else GroupLinearStep if groups else LinearStep
            value = self.emit(key, lambda: cls(p.name, p.module, p.inputs[0].q, q), slots, q)
        elif q is None and p.kind == "add" and float_ops:
            a, b = (self.dequantized(c) for c in p.inputs)
            value = self.emit(key, FloatAddStep, (a.index, b.index), None)
        elif q is None:
            reader = "a float op reads" if float_ops else "the model output comes from"
            raise ValueError(f"{reader} {p.name!r}, whose sum has no quantizer to round it: end the model with a "
                             "conv or linear layer")
        elif p.kind == "add":
            value = self.emit(key, lambda: AddStep(p.name, p.inputs[0].q, p.inputs[1].q, q), slots, q)
        else:
            value = self.emit(key, lambda: PoolStep(p.module.output_size, p.shape[2:], p.inputs[0].q, q), slots, q)
        for op in p.ops:
            value = self.apply(op, value)
        return value

    def dequantized(self, value: _Codes) -> _Codes:
        """``value`` as float32 (``DequantizeStep`` of codes)."""
        if value.q is None:
            return value
        return self.emit(("dequantize", value.index), partial(DequantizeStep, value.q), (value.index,), None)

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


_RECORDED = (ActivationQuantizer, _QuantLayer, QuantEmbedding, QuantResidualAdd, QuantAdaptiveAvgPool)


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
            if isinstance(m, _RECORDED):
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
        elif isinstance(module, QuantEmbedding):
            self.events.append(("embedding", module, args[0], out))
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


_ADD_OPS = {Tensor.__add__, Tensor.__radd__, Tensor.add, torch.add}
_ISLAND_HINT = "to_integer_model(..., float_ops=True) keeps it as a float island"


def _island(func, args: tuple, kwargs: dict, traced: dict) -> tuple[Any, list[Tensor]] | str | None:
    """A float island op: ``(step factory, its traced tensor inputs)``; a string saying why this call of it cannot be
    one; ``None`` for any other op."""
    if func is F.layer_norm:
        a = inspect.signature(F.layer_norm).bind(*args, **kwargs).arguments
        return partial(LayerNormStep, a["normalized_shape"], a.get("weight"), a.get("bias"), a.get("eps", 1e-5)), \
            [a["input"]]
    if func is F.gelu:
        return partial(GeluStep, kwargs.get("approximate", args[1] if len(args) > 1 else "none")), [args[0]]
    if func is F.scaled_dot_product_attention:
        names = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        a = {**dict(zip(names, args[3:])), **kwargs}
        mask = a.get("attn_mask")
        if isinstance(mask, Tensor) and id(mask) in traced:
            return "an attention mask computed from the input"
        if a.get("dropout_p", 0.0) or a.get("enable_gqa", False):
            return "attention dropout or enable_gqa"
        q = args[0]
        scale = a.get("scale")
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        return partial(AttentionStep, scale, mask, a.get("is_causal", False)), list(args[:3])
    if func in _ADD_OPS:
        if kwargs.get("alpha", 1) != 1 or len(args) != 2 or not all(isinstance(t, Tensor) for t in args):
            return "an addition of a number or with alpha"
        inputs = [t for t in args if id(t) in traced]
        other = next((t for t in args if id(t) not in traced), None)
        return partial(FloatAddStep, other), inputs
    return None


def _check_convertible(model: nn.Module, float_ops: bool) -> None:
    bns = [n for n, m in model.named_modules() if isinstance(m, BATCHNORMS)]
    if bns:
        raise ValueError(f"BatchNorm layers {bns} are not folded: call fold_batchnorm(model, example_input) first")
    layers, ops = _float_leftovers(model, {}, FLOAT_MODULES if float_ops else ())
    leftovers = {**layers, **ops}
    if leftovers:
        hint = "" if float_ops or not any(isinstance(m, FLOAT_MODULES) for m in model.modules()) else \
            f" (LayerNorm, GELU: {_ISLAND_HINT})"
        raise ValueError(f"layers left in float block integer conversion: {leftovers}; quantize them "
                         f"(quantize_model with bits for every layer) or remove them{hint}")
    for name, m in model.named_modules():
        if isinstance(m, _QuantConv) and (m.groups != 1 or m.padding_mode != "zeros"):
            raise ValueError(f"{name!r}: integer conv supports groups=1 and padding_mode='zeros' only "
                             f"(got groups={m.groups}, padding_mode={m.padding_mode!r})")
    missing = [n for n, m in model.named_modules() if isinstance(m, ActivationQuantizer) and not m.calibrated]
    if missing:
        raise ValueError(f"activation quantizers {missing} have no calibrated range: run a few training-mode "
                         "batches (or calibrate(model, inputs)) before integer conversion")


def to_integer_model(model: nn.Module, example_input: Tensor, float_ops: bool = False) -> IntegerModel:
    """``IntegerModel`` of a calibrated, BN-folded quantized model (``quantize_model`` output).

    ``example_input`` (a batch like the deployment inputs: floats, or token indices for a model that starts with an
    embedding) is run once through ``model`` in eval mode to record which module reads which tensor; its spatial
    size is fixed into average pools and its sequence length into attention. ``float_ops=True`` keeps LayerNorm,
    GELU, scaled dot-product attention and float additions as float islands (module docstring); by default they
    are an error naming them. Raises ``ValueError`` naming the layers when BatchNorm is unfolded, layers or ops are
    left in float, ranges are uncalibrated, a quantizer is unreachable from ``example_input``, a conv has
    ``groups > 1`` or a ``padding_mode`` other than ``'zeros'``, or an int32 accumulator could overflow.
    """
    _check_convertible(model, float_ops)
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
    floats: dict[str, str] = {}  # quantized module reading a float tensor -> why that tensor is float

    def read(t: Tensor, reader: str) -> _Codes | _Pending | _Float:
        value = values.get(id(t), _Float("a tensor not computed from the input"))
        if isinstance(value, _Float):
            floats.setdefault(reader, value.why)
        return value

    def as_float(value: _Codes | _Pending) -> _Codes:
        return b.produce(value, None, float_ops=True) if isinstance(value, _Pending) else b.dequantized(value)

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
        elif kind == "embedding":
            idx = values.get(id(args))
            if idx is None:  # constant indices (positions)
                values[id(result)] = b.emit(("embedding", id(obj)), partial(EmbeddingStep, obj, args), (), None)
            elif isinstance(idx, _Codes) and idx.q is None:
                values[id(result)] = b.emit(("embedding", id(obj), idx.index), partial(EmbeddingStep, obj),
                                            (idx.index,), None)
            else:
                values[id(result)] = idx if isinstance(idx, _Float) else _Float(f"embedding {name!r} indexed by codes")
        elif kind == "op":
            func, (op_args, op_kwargs) = obj, args
            traced = [a for a in (*op_args, *op_kwargs.values()) if isinstance(a, Tensor) and id(a) in values]
            if not traced:
                continue
            x = values[id(traced[0])]
            what = getattr(func, "__name__", str(func))
            island = _island(func, op_args, op_kwargs, values)
            if isinstance(island, tuple) and float_ops:
                make, tensors = island
                inputs = [values[id(t)] for t in tensors]
                floated = [v for v in inputs if isinstance(v, _Float)]
                values[id(result)] = floated[0] if floated else b.emit(
                    ("island", id(result)), make, tuple(as_float(v).index for v in inputs), None)
                continue
            if island is not None:
                why = f"{island}: not supported" if isinstance(island, str) else f"no integer kernel: {_ISLAND_HINT}"
                values[id(result)] = _Float(f"functional {what} ({why})")
                continue
            op = _op_of(func, op_args, op_kwargs, traced[0], result) if len(traced) == 1 else None
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
        listed = "; ".join(f"{reader} reads {why}" for reader, why in sorted(floats.items()))
        raise ValueError(f"float tensors reach quantized modules: {listed} (only reshapes, ReLU and dropout may run "
                         "between quantized modules)")
    final = values.get(id(out)) if isinstance(out, Tensor) else None
    if isinstance(final, _Pending):
        final = b.produce(final, None, float_ops)
    elif isinstance(final, _Codes) and final.q is not None:
        final = b.dequantized(final)
    elif not (isinstance(final, _Codes) and final.index > 0):
        why = f": {final.why}" if isinstance(final, _Float) else ""
        raise ValueError(f"the model output is not produced by a quantized module (float ops after the last "
                         f"layer{why})")
    return IntegerModel(b.steps, b.wiring, final.index)
